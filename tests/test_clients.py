"""What the Kafka client library in use can do here.  Both venvs of scripts/test run this
file: kafka-python 3 (the main run) and the archived fork kafka-python-ng 2.2 (the second
venv), whose consumer group cannot join the test broker: so stdio, producing replies where
their routes say, and reading in assign mode, with no group."""

import json
import subprocess
import sys
import time

import kafka
import kafka_transport as rpc
from harness import SERVER, Topics, local_broker
from kafka_transport import partition_of


def read(bootstrap: str, topic: str, partition: int, count: int) -> list:
    """Assign mode: no group, from the start of one partition."""
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    consumer.assign([kafka.TopicPartition(topic, partition)])
    consumer.seek_to_beginning()
    records, deadline = [], time.monotonic() + 20
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    consumer.close()
    return records


def test_stdio_round_trip_without_kafka():
    done = subprocess.run([sys.executable, str(SERVER), "--backend", "builtin"],
                          input=b'{"id":1,"method":"noop"}\n', capture_output=True, timeout=30)
    assert json.loads(done.stdout) == {"jsonrpc": "2.0", "id": 1, "result": {}}, done
    assert done.returncode == 0


def test_the_transport_produces_replies_where_their_routes_say(broker):
    topics = Topics(broker.bootstrap, create=False)
    replies = topics.output + ".replies"
    local_broker.create_topics(broker.bootstrap, [topics.output], partitions=3)
    local_broker.create_topics(broker.bootstrap, [replies])
    transport = rpc.KafkaTransport(topics.input, topics.output, sink=None, properties={
        "bootstrap.servers": broker.bootstrap, "group.id": topics.group})
    assert transport._connect()  # producer and consumer made; no group join is needed here
    acked = []
    try:
        alice = rpc.Route(b"alice")
        transport.send({"id": 1, "result": {}}, lambda: acked.append(1), alice)
        transport.send({"method": "note", "params": {}}, lambda: acked.append(2), alice)
        transport.send({"id": 2, "result": {}}, lambda: acked.append(3), rpc.Route(
            b"bob", replies, 0, (("kafka_correlationId", b"\x00c1"),)))
        deadline = time.monotonic() + 20
        while len(acked) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(acked) == [1, 2, 3], acked
    finally:
        transport.producer.client.close(5)
        transport._consumer.close()
    first, second = read(broker.bootstrap, topics.output, partition_of(b"alice", 3), 2)
    assert (first.key, json.loads(first.value)["id"]) == (b"1", 1)
    assert second.key is None and json.loads(second.value)["method"] == "note"
    assert all(dict(r.headers)["codex-session"] == b"alice" for r in (first, second))
    (reply,) = read(broker.bootstrap, replies, 0, 1)
    assert dict(reply.headers) == {"codex-session": b"bob", "kafka_correlationId": b"\x00c1"}
