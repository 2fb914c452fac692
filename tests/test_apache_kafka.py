"""Issue 21, first part: the reference's own smoke test (section 5) with Kafka's own tools,
on Apache Kafka itself: kafka-console-producer publishes the request, the reply is read
back, and kafka-consumer-groups shows the server's group caught up (section 4, item 5).
Collected only with TEST_BROKER=apache-kafka (scripts/test runs it so); the tools come from
the same Maven-fetched jars as the broker."""

import json
import subprocess
import time

from conftest import KafkaClient, local_broker

BUILTIN = ["--backend", "builtin"]


def kafka_tool(main_class: str, *args: str, stdin: bytes = b"", timeout: float = 60.0) -> str:
    """One of Kafka's command-line tools (kafka-console-producer.sh and the like run these
    classes), its stdout."""
    result = subprocess.run(["java", "-Xmx256m", "-cp", local_broker.apache_kafka_classpath(),
                             main_class, *args], input=stdin, capture_output=True,
                            timeout=timeout)
    assert result.returncode == 0, (main_class, result.stderr.decode(errors="replace")[-2000:])
    return result.stdout.decode()


def test_the_references_smoke_test_with_kafka_console_producer(topics, start_server):
    server = start_server(topics.server_args(*BUILTIN)).wait_ready()
    client = KafkaClient(topics)
    try:
        kafka_tool("org.apache.kafka.tools.ConsoleProducer", "--bootstrap-server",
                   topics.bootstrap, "--topic", topics.input,
                   stdin=b'{"jsonrpc":"2.0","id":1,"method":"noop","params":{}}\n')
        key, reply = client.reply(1, timeout=30)
        assert (key, reply) == ("1", {"jsonrpc": "2.0", "id": 1, "result": {}})
        # kafka-consumer-groups: the group is at the end of the input topic, lag 0.
        deadline = time.monotonic() + 30
        while True:
            out = kafka_tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                             "--bootstrap-server", topics.bootstrap, "--describe", "--group",
                             topics.group)
            rows = [line.split() for line in out.splitlines() if topics.input in line]
            if rows and rows[0][3:6] == ["1", "1", "0"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert rows and rows[0][3:6] == ["1", "1", "0"], out  # CURRENT-OFFSET LOG-END LAG
    finally:
        client.close()
    assert server.stop() == 0


def test_kafka_console_consumer_reads_the_reply_keyed_by_id(topics, start_server):
    start_server(topics.server_args(*BUILTIN)).wait_ready()
    client = KafkaClient(topics)
    try:
        client.send({"jsonrpc": "2.0", "id": "smoke", "method": "noop", "params": {}})
        client.reply("smoke", timeout=30)
    finally:
        client.close()
    out = kafka_tool("org.apache.kafka.tools.consumer.ConsoleConsumer", "--bootstrap-server",
                     topics.bootstrap, "--topic", topics.output, "--from-beginning",
                     "--max-messages", "1", "--formatter-property", "print.key=true",
                     "--formatter-property", "key.separator=|", "--timeout-ms", "30000")
    key, value = out.strip().split("|", 1)
    assert key == "smoke" and json.loads(value)["result"] == {}, out
