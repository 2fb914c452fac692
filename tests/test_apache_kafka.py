"""Issue 21, first part: the reference's own smoke test (section 5) with Kafka's own tools,
on Apache Kafka itself: kafka-console-producer publishes the request, the reply is read
back, and kafka-consumer-groups shows the server's group caught up (section 4, item 5).
Collected only with TEST_BROKER=apache-kafka (scripts/test runs it so); the tools come from
the same Maven-fetched jars as the broker."""

import json
import os
import subprocess
import time
from typing import Any

import pytest

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


def sasl_server(broker, topics, start_server, how: str, mechanism: str, password: str,
                tmp_path) -> Any:
    """The server on the broker's SASL listener, its login given ``how``: flags-free, by
    -X, a properties file, or the reference's environment variables."""
    args = topics.server_args(*BUILTIN)
    args[args.index("--kafka-bootstrap-servers") + 1] = broker.sasl_bootstrap
    settings = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": mechanism,
                "sasl.username": local_broker.SASL_USER, "sasl.password": password}
    env = dict(os.environ)
    if how == "-X":
        for key, value in settings.items():
            args += ["-X", f"{key}={value}"]
    elif how == "properties file":
        path = tmp_path / "client.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        args += ["--kafka-config", str(path)]
    else:  # the reference's environment variables; the protocol is inferred
        env.update(KAFKA_SASL_MECHANISM=mechanism, KAFKA_SASL_USERNAME=local_broker.SASL_USER,
                   KAFKA_SASL_PASSWORD=password)
    return start_server(args, env=env)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("how", ["-X", "properties file", "environment"])
def test_a_sasl_login_succeeds_and_its_password_is_never_shown(broker, topics, start_server,
                                                               tmp_path, mechanism, how):
    server = sasl_server(broker, topics, start_server, how, mechanism,
                         local_broker.SASL_PASSWORD, tmp_path).wait_ready()
    client = KafkaClient(topics)  # on the PLAINTEXT listener of the same broker
    try:
        client.send({"jsonrpc": "2.0", "id": "sasl", "method": "noop", "params": {}})
        assert client.reply("sasl", timeout=30)[1]["result"] == {}
    finally:
        client.close()
    assert server.stop() == 0
    assert local_broker.SASL_PASSWORD not in server.log and "sasl.password=***" in server.log


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_a_wrong_sasl_password_is_exit_3_naming_the_cause(broker, topics, start_server,
                                                          tmp_path, mechanism):
    wrong = "not-" + local_broker.SASL_PASSWORD
    server = sasl_server(broker, topics, start_server, "-X", mechanism, wrong, tmp_path)
    assert server.process.wait(60) == 3, server.log
    assert f"SASL {mechanism} login as 'alice' failed" in server.log, server.log
    assert wrong not in server.log and local_broker.SASL_PASSWORD not in server.log
