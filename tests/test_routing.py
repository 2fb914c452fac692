"""Issue 10, the transport half: a session is the record key; its records keep to one
partition, in order; replies go where Kafka request-reply clients ask, with their
correlation echoed.  The builtin backend answers, so no Codex is needed here."""

import json
import os
import signal
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

import kafka_transport as rpc
from harness import KafkaClient, Topics, local_broker, read_partitions, read_topic
from kafka_transport import partition_of

BUILTIN = ["--backend", "builtin"]


def send(producer: Any, topic: str, message: Dict[str, Any], key: Optional[bytes] = None,
         headers: Optional[List[Tuple[str, bytes]]] = None) -> None:
    producer.send(topic, value=json.dumps(message).encode(), key=key,
                  headers=headers or []).get(timeout=10)


@pytest.fixture
def three_partition_output(broker) -> Topics:
    topics = Topics(broker.bootstrap, create=False)
    local_broker.create_topics(broker.bootstrap, [topics.input])
    local_broker.create_topics(broker.bootstrap, [topics.output], partitions=3)
    return topics


def test_each_session_keeps_to_its_partition_with_its_header(three_partition_output,
                                                              start_server):
    topics = three_partition_output
    server = start_server(topics.server_args(*BUILTIN)).wait_ready()
    client = KafkaClient(topics)
    sessions = [b"alice", b"bob", b"carol", b"dave", None]
    for n, session in enumerate(sessions * 4):
        send(client.producer, topics.input, {"id": n, "method": "noop"}, key=session)
    found = read_partitions(topics.bootstrap, topics.output, [0, 1, 2], len(sessions) * 4)
    client.close()
    seen = 0
    for partition, records in found.items():
        for record in records:
            reply = json.loads(record.value)
            session = sessions[reply["id"] % len(sessions)]
            want = 0 if session is None else partition_of(session, 3)
            assert partition == want, (session, partition, reply)
            assert record.key == str(reply["id"]).encode()  # keyed by id, as the reference
            headers = dict(record.headers or [])
            assert headers.get(rpc.SESSION_HEADER) == session, (session, record.headers)
            seen += 1
        # Each session's replies in the order its requests were sent.
        for session in sessions:
            ids = [json.loads(r.value)["id"] for r in records
                   if dict(r.headers or []).get(rpc.SESSION_HEADER) == session]
            assert ids == sorted(ids)
    assert seen == len(sessions) * 4
    assert server.stop() == 0


FAMILIES = {  # (reply topic header, reply partition header and its encoding, correlation)
    "spring": ("kafka_replyTopic", "kafka_replyPartition", "int", "kafka_correlationId"),
    "smallrye": ("REPLY_TOPIC", "REPLY_PARTITION", "int", "REPLY_CORRELATION_ID"),
    "nestjs": ("kafka_replyTopic", "kafka_replyPartition", "ascii", "kafka_correlationId"),
    "faststream": ("reply_to", None, None, "correlation_id"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("producer_kind", ["kafka-python", "confluent-kafka"])
def test_request_reply_headers_of_each_client_family(broker, start_server, family,
                                                     producer_kind):
    topic_header, partition_header, encoding, correlation_header = FAMILIES[family]
    topics = Topics(broker.bootstrap)
    replies = topics.input + ".replies"
    local_broker.create_topics(broker.bootstrap, [replies], partitions=2)
    server = start_server(topics.server_args(*BUILTIN)).wait_ready()
    correlation = os.urandom(16)  # raw bytes: echoed unchanged
    headers = [(topic_header, replies.encode()), (correlation_header, correlation)]
    want_partition = 1
    if partition_header:
        headers.append((partition_header, want_partition.to_bytes(4, "big") if encoding == "int"
                        else str(want_partition).encode()))
    else:
        want_partition = partition_of(b"client-7", 2)  # the session's own partition
    request = json.dumps({"id": "r1", "method": "noop"}).encode()
    if producer_kind == "confluent-kafka":
        from confluent_kafka import Producer
        producer = Producer({"bootstrap.servers": topics.bootstrap})
        producer.produce(topics.input, value=request, key=b"client-7", headers=headers)
        assert producer.flush(10) == 0
    else:
        client = KafkaClient(topics)
        client.producer.send(topics.input, value=request, key=b"client-7",
                             headers=headers).get(timeout=10)
        client.close()
    [record] = read_topic(topics.bootstrap, replies, 1, partition=want_partition)
    assert json.loads(record.value) == {"jsonrpc": "2.0", "id": "r1", "result": {}}
    assert record.key == b"r1"
    got = dict(record.headers)
    assert got[correlation_header] == correlation
    assert got[rpc.SESSION_HEADER] == b"client-7"
    # A record carrying REPLY_TOPIC is a request to SmallRye: never copied onto replies.
    assert not set(got) & set(rpc.REPLY_TOPIC_HEADERS + rpc.REPLY_PARTITION_HEADERS)
    assert read_topic(topics.bootstrap, topics.output, 1, timeout=1) == []
    assert server.stop() == 0


def test_refused_and_unusable_routes_get_errors_on_the_output_topic(broker, start_server):
    topics = Topics(broker.bootstrap)
    allowed = topics.input + ".replies"
    local_broker.create_topics(broker.bootstrap, [allowed])
    server = start_server(topics.server_args(
        *BUILTIN, "--kafka-reply-topic-pattern", r".*\.replies")).wait_ready()
    client = KafkaClient(topics, every_session=True)
    cases = [  # (id, key, headers, text in the error)
        ("pattern", b"s", [("kafka_replyTopic", b"elsewhere")], "--kafka-reply-topic-pattern"),
        ("bad-partition", b"s", [("REPLY_PARTITION", b"\x00\x01")], "4-byte"),
        ("bad-topic", b"s", [("reply_to", b"no spaces allowed")], "not a Kafka topic name"),
        ("empty-key", b"", [], "record key (the session) is empty"),
        ("no-such-partition", b"s", [("kafka_replyTopic", allowed.encode()),
                                     ("kafka_replyPartition", b"7")], "has no partition 7"),
        # A partition the output topic lacks, with no reply topic named: every family's header.
        ("output-nestjs", b"s", [("kafka_replyPartition", b"7")], "has no partition 7"),
        ("output-spring", b"s", [("kafka_replyPartition", (7).to_bytes(4, "big"))],
         "has no partition 7"),
        ("output-smallrye", b"s", [("REPLY_PARTITION", (7).to_bytes(4, "big"))],
         "has no partition 7"),
        ("output-default-session", None, [("REPLY_PARTITION", (9).to_bytes(4, "big"))],
         "has no partition 9"),
    ]
    for msg_id, key, headers, _ in cases:
        client.producer.send(topics.input, value=json.dumps(
            {"id": msg_id, "method": "noop"}).encode(), key=key, headers=headers)
    client.send({"id": "after", "method": "noop"})
    assert client.reply("after")[1]["result"] == {}
    for msg_id, _, _, text in cases:
        key, reply = client.reply(msg_id)
        assert key == msg_id and reply["error"]["code"] == rpc.INVALID_REQUEST, reply
        assert text in reply["error"]["message"], reply
    log = server.log
    assert log.count("WARNING") >= len(cases), log
    client.close()
    assert server.stop() == 0


def test_a_session_stays_in_order_across_a_broker_pause(start_server):
    broker = local_broker.start_broker(0)
    try:
        topics = Topics(broker.bootstrap, create=False)
        local_broker.create_topics(broker.bootstrap, [topics.input])
        local_broker.create_topics(broker.bootstrap, [topics.output], partitions=3)
        server = start_server(topics.server_args(*BUILTIN, "--builtin-delay", "0.005"))
        server.wait_ready()
        client = KafkaClient(topics)
        count = 600
        for n in range(count):
            client.producer.send(topics.input, value=json.dumps(
                {"id": n, "method": "noop"}).encode(), key=b"ordered")
        client.producer.flush(10)
        time.sleep(1.0)  # part answered, part still queued
        os.kill(broker.process.pid, signal.SIGSTOP)
        try:
            time.sleep(4)
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        client.close()
        records = read_topic(topics.bootstrap, topics.output, count, timeout=90,
                             partition=partition_of(b"ordered", 3))
        ids = [json.loads(record.value)["id"] for record in records]
        assert ids == list(range(count)), ids[:50]
        assert server.stop() == 0
    finally:
        local_broker.stop_broker(broker)


class FlakyProducer:
    """A kafka-python producer stand-in whose sends to partition 0 fail until healed."""

    def __init__(self):
        self.healed = False
        self.sent: List[bytes] = []

    def partitions_for(self, topic):
        return {0, 1, 2}

    def send(self, topic, value, key, headers, partition):
        producer = self

        class Future:
            def add_callback(self, callback):
                if producer.healed:
                    producer.sent.append(value)
                    callback(None)

            def add_errback(self, errback):
                if not producer.healed:
                    errback(Exception("broker away"))
        return Future()


def test_a_failed_send_is_never_overtaken_by_a_later_one_of_its_partition():
    transport = rpc.KafkaTransport("in", "out", None, {"bootstrap.servers": "127.0.0.1:1",
                                                       "group.id": "g"})
    transport.producer.client = producer = FlakyProducer()
    route = rpc.Route(b"ordered", partition=0)
    for n in range(3):
        transport.send({"id": n, "result": {}}, rpc.nothing, route)
    producer.healed = True
    for n in range(3, 6):  # sent while earlier ones wait for their retry: held behind them
        transport.send({"id": n, "result": {}}, rpc.nothing, route)
    assert producer.sent == []
    for held in transport.producer._held.values():
        for send in held:
            send.due = 0
    # While the lane drains, another thread's new record must still queue behind it.
    real_send = producer.send

    def send_and_interleave(*args, **kwargs):
        future = real_send(*args, **kwargs)
        if len(producer.sent) == 0 and not getattr(producer, "interleaved", False):
            producer.interleaved = True
            transport.send({"id": 6, "result": {}}, rpc.nothing, route)
        return future
    producer.send = send_and_interleave
    transport.producer.resend_due()
    assert [json.loads(value)["id"] for value in producer.sent] == list(range(7))
    assert transport.producer.unacked == 0 and not transport.producer._held


@pytest.mark.parametrize("headers, want", [
    ([], (None, None, ())),
    ([("kafka_replyTopic", b"r.t"), ("kafka_replyPartition", (2).to_bytes(4, "big")),
      ("kafka_correlationId", b"\x00\xffc")], ("r.t", 2, (("kafka_correlationId", b"\x00\xffc"),))),
    ([("REPLY_TOPIC", b"r"), ("REPLY_PARTITION", b"\x00\x00\x00\x07"),
      ("REPLY_CORRELATION_ID", b"id")], ("r", 7, (("REPLY_CORRELATION_ID", b"id"),))),
    ([("kafka_replyPartition", b"12")], (None, 12, ())),  # NestJS: decimal ASCII
    ([("kafka_replyPartition", b"1234")], (None, 1234, ())),  # digits win over 4 bytes
    ([("reply_to", b"r"), ("correlation_id", None), ("other", b"x")],
     ("r", None, (("correlation_id", b""),))),
])
def test_parse_route_reads_each_header_family(headers, want):
    route = rpc.parse_route(b"k", headers)
    assert (route.topic, route.partition, route.correlation) == want
    assert route.session == b"k"


@pytest.mark.parametrize("key, headers, said", [
    (b"", [], "is empty"),
    (b"k" * 1025, [], "1025 bytes"),
    (b"k", [("REPLY_PARTITION", b"\x00\x01")], "neither a 4-byte"),
    (b"k", [("REPLY_PARTITION", b"\xff\xff\xff\xff")], "out of range"),
    (b"k", [("REPLY_PARTITION", b"9999999999")], "out of range"),
    (b"k", [("reply_to", b"a b")], "not a Kafka topic name"),
    (b"k", [("reply_to", "\u00e9".encode())], "not a Kafka topic name"),
    (b"k", [("reply_to", b"..")], "not a Kafka topic name"),
])
def test_parse_route_names_what_is_unusable(key, headers, said):
    with pytest.raises(rpc.InvalidMessage) as info:
        rpc.parse_route(key, headers)
    assert said in info.value.reason
