"""Reliability on a real broker: crashes, broker faults, bursts, bad input, big replies."""

import json
import os
import signal
import socket
import subprocess
import threading
import time
from typing import List, Set

import pytest

import kafka_transport as rpc
from harness import KafkaClient, Topics, local_broker, peak_rss_mb, read_topic

BUILTIN = ["--backend", "builtin"]


def send_many(client: KafkaClient, ids, pad: int = 0) -> None:
    params = {"pad": "x" * pad} if pad else {}
    for msg_id in ids:
        client.producer.send(client.topics.input,
                             json.dumps({"id": msg_id, "method": "noop", "params": params}).encode())
    client.producer.flush(60)


def answered(client: KafkaClient) -> Set:
    return {value.get("id") for _, value in client.seen if "result" in value}


def wait_answered(client: KafkaClient, expected: Set, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not expected <= answered(client):
        if time.monotonic() > deadline:
            missing = expected - answered(client)
            raise AssertionError(f"{len(missing)} requests unanswered, e.g. {sorted(missing)[:10]}")
        client.poll()


def wait_count(client: KafkaClient, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(answered(client)) < count:
        assert time.monotonic() < deadline, f"only {len(answered(client))} answered"
        client.poll()


@pytest.fixture
def own_broker():
    """A broker of this test's own, for faults that must not touch the session broker."""
    started = local_broker.start_broker(0)
    yield started
    local_broker.stop_broker(started)


# --- crashes and shutdown ---------------------------------------------------------

def test_kill_9_mid_stream_then_restart_answers_everything(topics, client, start_server):
    args = topics.server_args(*BUILTIN, "--builtin-delay", "0.002")
    server = start_server(args).wait_ready()
    ids = list(range(3000))
    send_many(client, ids)
    wait_count(client, 300)
    server.stop(signal.SIGKILL)
    assert len(answered(client)) < len(ids), "the crash came too late to test anything"
    start_server(args).wait_ready()
    wait_answered(client, set(ids), timeout=90)


def test_sigterm_under_load_commits_exactly_what_was_answered(topics, client, start_server):
    args = topics.server_args(*BUILTIN, "--builtin-delay", "0.002", "--shutdown-timeout", "30")
    server = start_server(args).wait_ready()
    ids = list(range(5000))
    send_many(client, ids)
    wait_count(client, 500)
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=60) == 0
    assert time.monotonic() - started < 30
    before = len(client.quiet(0.5)) + len(answered(client))
    assert before < len(ids), "the shutdown came too late to test anything"
    start_server(args).wait_ready()
    wait_answered(client, set(ids), timeout=90)
    client.quiet(1.0)
    replies = [value["id"] for _, value in client.seen if "result" in value]
    duplicates = len(replies) - len(set(replies))
    assert duplicates == 0, f"{duplicates} requests answered twice after a clean shutdown"


# --- broker faults ---------------------------------------------------------------

def test_broker_absent_at_start_then_started(start_server):
    port = local_broker.free_port()
    topics = Topics(f"127.0.0.1:{port}", create=False)
    server = start_server(topics.server_args(*BUILTIN))
    server.wait_for_log("cannot connect to kafka at", timeout=30, count=2)
    assert "WARNING" in server.log and "attempt 2" in server.log
    broker = local_broker.start_broker(port)
    try:
        topics.create()
        server.wait_ready(timeout=60)
        client = KafkaClient(topics)
        client.send({"id": 1, "method": "noop"})
        assert client.reply(1, timeout=30)[0] == "1"
        client.close()
        assert server.stop() == 0
    finally:
        local_broker.stop_broker(broker)


def test_broker_paused_10_s_recovers_without_restart(own_broker, start_server):
    topics = Topics(own_broker.bootstrap)
    client = KafkaClient(topics)
    server = start_server(topics.server_args(*BUILTIN, "--builtin-delay", "0.002")).wait_ready()
    ids = list(range(2000))
    send_many(client, ids)
    wait_count(client, 200)
    os.kill(own_broker.process.pid, signal.SIGSTOP)
    try:
        time.sleep(10)
    finally:
        os.kill(own_broker.process.pid, signal.SIGCONT)
    wait_answered(client, set(ids), timeout=120)
    assert server.process.poll() is None
    client.close()


class Relay:
    """A TCP relay 127.0.0.1:listen_port -> 127.0.0.1:target_port that can cut the network:
    every connection reset and new ones refused, until restored."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = local_broker.free_port()
        self._connections: List[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                try:
                    # RST, not FIN: the way a dropped network path looks to a client.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    conn.close()
                except OSError:
                    pass
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.close()
            except OSError:
                pass


def test_network_cut_10_s_recovers_without_restart(start_server):
    broker_port = local_broker.free_port()
    relay = Relay(broker_port)
    broker = local_broker.start_broker(broker_port, advertised_port=relay.port)
    try:
        topics = Topics(f"127.0.0.1:{relay.port}")
        client = KafkaClient(topics)
        server = start_server(topics.server_args(*BUILTIN, "--builtin-delay", "0.002"))
        server.wait_ready()
        ids = list(range(2000))
        send_many(client, ids)
        wait_count(client, 200)
        relay.cut()
        time.sleep(10)
        relay.restore()
        wait_answered(client, set(ids), timeout=120)
        assert server.process.poll() is None
        assert "failed to send kafka message" in server.log or "kafka" in server.log
        client.close()
        assert server.stop() == 0
    finally:
        relay.cut()
        local_broker.stop_broker(broker)


# --- bursts and big replies -------------------------------------------------------

def burst(topics, client, start_server, queue_size: str):
    # The whole burst waits on the topic before the server starts: the worst case.
    ids = list(range(20000))
    send_many(client, ids, pad=3000)  # ~60 MB of requests
    server = start_server(topics.server_args(*BUILTIN, "--builtin-delay", "0.0003",
                                             "--queue-size", queue_size,
                                             "--kafka-offset-reset", "earliest")).wait_ready()
    wait_answered(client, set(ids), timeout=140)
    return server, peak_rss_mb(server.process.pid)


def test_burst_of_20000_with_slow_backend_stays_bounded(topics, client, start_server):
    server, rss = burst(topics, client, start_server, "200")
    assert rss < 80, f"peak RSS {rss:.0f} MB: the burst was buffered, not paused"
    assert "processor queue full: pausing" in server.log


def test_reply_over_the_limit_becomes_an_error(topics, client, start_server):
    server = start_server(topics.server_args(*BUILTIN, "--kafka-max-message-bytes", "100"))
    server.wait_ready()
    client.send({"id": "big", "method": "initialize", "params": {}})
    client.send({"id": "small", "method": "noop"})
    key, reply = client.reply("big")
    assert key == "big"
    assert reply["error"]["code"] == rpc.INTERNAL_ERROR
    assert "bytes over the limit of 100" in reply["error"]["message"]
    assert client.reply("small")[1]["result"] == {}
    assert "ERROR" in server.log and "reply too large for kafka (key big)" in server.log


# --- bad input ----------------------------------------------------------------

CORPUS = [  # (payload, reason in the warning, reply code or None, the reply's id)
    (b"\xc3\x28 bad utf-8", "not UTF-8", None, None),
    (b'{"id": 1, "method": ', "invalid JSON", None, None),
    (b"", "empty payload", None, None),
    (b"null", "must be an object, not null", None, None),
    (b"17", "must be an object, not a number", None, None),
    (b'[{"id": 1, "method": "noop"}]', "must be an object, not an array", None, None),
    (b'{"id": "c1", "foo": 1}', 'no "method", "result" or "error"', rpc.INVALID_REQUEST, "c1"),
    (b'{"id": "c2", "method": 42}', '"method" must be a string', rpc.INVALID_REQUEST, "c2"),
    (b'{"id": {"a": 1}, "method": "noop"}', '"id" must be a string or an integer', None, None),
    (b'{"id": [1], "method": "noop"}', '"id" must be a string or an integer', None, None),
    (b'{"id": true, "method": "noop"}', '"id" must be a string or an integer', None, None),
    (b'{"id": "c3", "method": "noop", "params": 5}', '"params" must be', rpc.INVALID_PARAMS,
     "c3"),
    (b"[" * 10000 + b"]" * 10000, "nested deeper than 100 levels", None, None),
    # Issue 9: each of these once stopped the server or its processor, or was never answered.
    (b'{"id": "c4", "method": "noop", "params": {"x": ' + b"9" * 5000 + b'}}',
     "integer of 5000 digits", rpc.PARSE_ERROR, "c4"),
    (b'{"id": "\\ud800", "method": "noop"}', "lone UTF-16 surrogate", None, None),
    (b'{"id": "c5", "method": "noop", "params": {"s": "\\udfff"}}', "lone UTF-16 surrogate",
     rpc.PARSE_ERROR, "c5"),
    (b'{"id": "c6", "method": "noop", "params": {"x": NaN}}', "NaN is not a JSON number",
     rpc.PARSE_ERROR, "c6"),
    (b'{"id": "c7", "method": "noop", "params": [-Infinity, 1e999]}', "Infinity is not",
     rpc.PARSE_ERROR, "c7"),
    (b'{"id": "c8", "method": "noop", "params": [1e999]}', "beyond the range of a double",
     rpc.PARSE_ERROR, "c8"),
]
BIG_VALID = json.dumps({"id": "big", "method": "noop",
                        "params": {"blob": "b" * (5 * 1024 * 1024)}}).encode()


def test_bad_input_corpus_over_kafka_with_dead_letter_topic(topics, start_server):
    dead = topics.input + ".dlq"
    local_broker.create_topics(topics.bootstrap, [dead])
    client = KafkaClient(topics)
    client.producer.config["max_request_size"] = 8 * 1024 * 1024
    server = start_server(topics.server_args(*BUILTIN, "--kafka-dead-letter-topic", dead))
    server.wait_ready()
    for payload, _, _, _ in CORPUS:
        client.producer.send(topics.input, value=payload)
    client.producer.send(topics.input, value=None, key=b"null-record")
    client.producer.send(topics.input, value=BIG_VALID)
    client.producer.send(topics.input, value=b'{"id": "next", "method": "noop"}')
    client.producer.flush(30)
    assert client.reply("next", timeout=30)[1]["result"] == {}
    assert client.reply("big", timeout=30)[1]["result"] == {}
    for payload, reason, code, msg_id in CORPUS:
        if code is not None:
            key, reply = client.reply(msg_id)
            assert key == msg_id and reply["error"]["code"] == code
            assert reason in reply["error"]["message"]
    log = server.log
    for offset, (payload, reason, _, _) in enumerate(CORPUS):
        assert f"offset {offset}: " in log and reason in log, reason
    # Every unusable record, unchanged, with its origin and reason in the headers.
    letters = read_topic(topics.bootstrap, dead, len(CORPUS) + 1, timeout=30)
    client.close()
    assert len(letters) == len(CORPUS) + 1
    for letter, (payload, reason, _, _) in zip(letters, CORPUS):
        headers = dict(letter.headers)
        assert (letter.value or b"") == payload
        assert headers["__connect.errors.topic"] == topics.input.encode()
        assert headers["__connect.errors.partition"] == b"0"
        assert reason in headers["__connect.errors.exception.message"].decode()
    assert letters[-1].value is None and letters[-1].key == b"null-record"
    offsets = [int(dict(letter.headers)["__connect.errors.offset"]) for letter in letters]
    assert offsets == list(range(len(CORPUS) + 1))


def test_bad_input_corpus_over_stdio(start_server):
    server = start_server(BUILTIN, stdin=subprocess.PIPE)
    lines = [payload for payload, _, _, _ in CORPUS if payload] + [BIG_VALID,
                                                                b'{"id":"next","method":"noop"}']

    def write():
        for line in lines:
            server.process.stdin.write(line + b"\n")
        server.process.stdin.close()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    replies = [json.loads(line) for line in server.process.stdout]
    writer.join(10)
    assert server.process.wait(30) == 0
    # One reply a line: an error for each bad one (id null when none is recoverable).
    assert len(replies) == len(lines)
    for reply, (payload, reason, code, msg_id) in zip(replies, [c for c in CORPUS if c[0]]):
        assert "error" in reply, reply
        assert reason in reply["error"]["message"]
        if code is None:
            assert reply["id"] is None
            assert reply["error"]["code"] in (rpc.PARSE_ERROR, rpc.INVALID_REQUEST)
        else:
            assert reply["error"]["code"] == code and reply["id"] == msg_id
    assert replies[-2] == {"jsonrpc": "2.0", "id": "big", "result": {}}
    assert replies[-1] == {"jsonrpc": "2.0", "id": "next", "result": {}}
    assert server.log.count("invalid payload from stdin") == len(lines) - 2


def test_fatal_producer_error_replaces_the_producer(start_server):
    # A restarted in-memory broker forgets producer ids: kafka-python's idempotent
    # producer then fails for good, and only a fresh producer gets replies through.
    port = local_broker.free_port()
    broker = local_broker.start_broker(port)
    try:
        topics = Topics(broker.bootstrap)
        server = start_server(topics.server_args(*BUILTIN)).wait_ready()
        client = KafkaClient(topics)
        client.send({"id": 1, "method": "noop"})
        assert client.reply(1)[0] == "1"
        client.close()
        local_broker.stop_broker(broker)
        broker = local_broker.start_broker(port)
        topics.create()
        client = KafkaClient(topics)
        # The consumer keeps its old position on the new, empty log: the first records
        # may fall below it, so keep asking until one is answered.
        deadline = time.monotonic() + 60
        for msg_id in range(100, 200):
            client.send({"id": msg_id, "method": "noop"})
            try:
                assert client.reply(msg_id, timeout=3)[0] == str(msg_id)
                break
            except AssertionError:
                assert time.monotonic() < deadline, server.log[-3000:]
        client.close()
        assert "replacing the kafka producer: fatal error" in server.log
        assert server.stop() == 0
    finally:
        local_broker.stop_broker(broker)


def test_record_without_key_or_value_is_dead_lettered_not_retried_forever(topics,
                                                                          start_server):
    from confluent_kafka import Producer
    dead = topics.input + ".dlq"
    local_broker.create_topics(topics.bootstrap, [dead])
    client = KafkaClient(topics)
    server = start_server(topics.server_args(*BUILTIN, "--kafka-dead-letter-topic", dead))
    server.wait_ready()
    producer = Producer({"bootstrap.servers": topics.bootstrap})
    producer.produce(topics.input, value=None)  # kafka-python cannot even produce this
    assert producer.flush(10) == 0
    client.send({"id": "after", "method": "noop"})
    assert client.reply("after")[1]["result"] == {}
    letters = read_topic(topics.bootstrap, dead, 1)
    client.close()
    assert letters and letters[0].value == b"" and letters[0].key is None
    assert dict(letters[0].headers)["__connect.errors.offset"] == b"0"
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10, "an unsendable record held up the shutdown"
    assert "retry 2" not in server.log
