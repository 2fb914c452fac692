"""The server on a real Kafka-protocol broker (Tansu), with the builtin backend."""

import json
import signal
import subprocess
import sys
import threading
import time

import kafka_transport as rpc
from harness import ROOT, TANSU_TUNING

BUILTIN = ["--backend", "builtin"]
NOOP = {"jsonrpc": "2.0", "id": 1, "method": "noop", "params": {}}  # the reference's request


def test_noop_round_trip_keyed_by_id(topics, client, start_server):
    start_server(topics.server_args(*BUILTIN)).wait_ready()
    client.send(NOOP)
    key, reply = client.reply(1)
    assert key == "1"
    assert reply == {"jsonrpc": "2.0", "id": 1, "result": {}}


def test_string_ids_are_keyed_verbatim(topics, client, start_server):
    start_server(topics.server_args(*BUILTIN)).wait_ready()
    for msg_id in ("req-7", "ünï code", "42"):
        client.send({"id": msg_id, "method": "initialize", "params": {}})
    for msg_id in ("req-7", "ünï code", "42"):
        key, reply = client.reply(msg_id)
        assert key == msg_id
        assert reply["result"]["userAgent"].startswith("codex-app-server/")
    # "42" the string and 42 the integer share a key but keep their JSON type.
    assert isinstance(client.reply("42")[1]["id"], str)


def test_unknown_method_gets_method_not_found(topics, client, start_server):
    start_server(topics.server_args(*BUILTIN)).wait_ready()
    client.send({"id": 5, "method": "no/such"})
    key, reply = client.reply(5)
    assert key == "5" and reply["error"]["code"] == rpc.METHOD_NOT_FOUND


def test_notifications_are_produced_unkeyed(topics, client):
    # The transport on its own: a notification handed to send() lands without a key.
    properties = dict(p.split("=") for p in TANSU_TUNING[1::2])
    properties.update({"bootstrap.servers": topics.bootstrap, "group.id": topics.group})
    transport = rpc.KafkaTransport(topics.input, topics.output, sink=None, properties=properties)
    thread = threading.Thread(target=transport.serve_forever, daemon=True)
    thread.start()
    try:
        assert transport.ready.wait(30), "transport never became ready"
        transport.send({"method": "thread/started", "params": {"thread": {"id": "t1"}}})
        transport.send({"id": 3, "result": {}})
        key, note = client.wait_for(lambda k, v: v.get("method") == "thread/started")
        assert key is None
        assert note["params"]["thread"]["id"] == "t1"
        assert client.reply(3)[0] == "3"
    finally:
        transport.close(timeout=10)
        thread.join(10)
    assert not thread.is_alive()


INVALID = [
    (b"\xff\xfe\xfd", "not UTF-8"),
    (b"{not json", "invalid JSON"),
    (None, "empty payload"),
    (b"", "empty payload"),
    (b"[1,2]", "must be an object"),
    (b'"text"', "must be an object"),
    (b"[" * 10000 + b"]" * 10000, "nested deeper than 100 levels"),
]


def test_invalid_payloads_warn_and_service_goes_on(topics, client, start_server):
    server = start_server(topics.server_args(*BUILTIN)).wait_ready()
    for payload, _ in INVALID:
        client.send(payload, key=b"tombstone" if payload is None else None)
    client.send({"id": "after", "method": "noop"})
    assert client.reply("after")[0] == "after"
    log = server.log
    for offset, (_, reason) in enumerate(INVALID):
        line = next((line for line in log.splitlines()
                     if f"offset {offset}:" in line and "invalid payload from kafka" in line), None)
        assert line is not None, f"no warning for offset {offset}:\n{log}"
        assert "WARNING" in line and f"topic {topics.input} partition 0" in line
        assert reason in line
    assert "\\xff" not in log and "{not json" not in log  # never the payload itself
    # Nothing but the one reply: no reply is possible without an id.
    assert [value.get("id") for _, value in client.seen] == ["after"]


def test_non_jsonrpc_with_an_id_gets_invalid_request(topics, client, start_server):
    start_server(topics.server_args(*BUILTIN)).wait_ready()
    client.send({"id": 11, "hello": "world"})
    client.send({"id": 12, "method": "noop", "params": "nope"})
    key, reply = client.reply(11)
    assert key == "11" and reply["error"]["code"] == rpc.INVALID_REQUEST
    assert client.reply(12)[1]["error"]["code"] == rpc.INVALID_PARAMS
    client.send(NOOP)
    assert client.reply(1)[1]["result"] == {}


def test_stdio_and_kafka_at_once(topics, client, start_server):
    server = start_server(topics.server_args(*BUILTIN, "--stdio"), stdin=subprocess.PIPE)
    server.wait_ready()
    server.process.stdin.write(b'{"id":"s1","method":"noop"}\n')
    server.process.stdin.flush()
    assert json.loads(server.process.stdout.readline()) == {"jsonrpc": "2.0", "id": "s1",
                                                            "result": {}}
    client.send(NOOP)
    assert client.reply(1)[0] == "1"
    # stdin EOF ends the stdio connection only; Kafka keeps serving.
    server.process.stdin.close()
    server.wait_for_log("stdin closed")
    client.send({"id": 2, "method": "noop"})
    assert client.reply(2)[0] == "2"
    assert server.process.poll() is None
    assert server.stop() == 0
    assert all(not key.startswith("s") for key, _ in client.seen)  # stdio replies stay on stdio


def test_sigterm_delivers_commits_and_restart_does_not_answer_again(topics, client,
                                                                    start_server):
    args = topics.server_args(*BUILTIN, "--kafka-offset-reset", "earliest")
    server = start_server(args).wait_ready()
    client.send(NOOP)
    assert client.reply(1)[0] == "1"
    assert server.stop(signal.SIGTERM) == 0
    log = server.log
    for step in ("received SIGTERM", "flushing kafka producer", "committing kafka offsets",
                 "closing kafka consumer", "shutdown complete"):
        assert step in log, f"{step!r} not logged:\n{log}"
    # Same group, earliest reset: only an uncommitted offset would be read again.
    restarted = start_server(args).wait_ready()
    client.send({"id": 2, "method": "noop"})
    assert client.reply(2)[0] == "2"
    client.quiet(1.0)
    assert [value["id"] for _, value in client.seen] == [1, 2], client.seen
    assert restarted.stop() == 0


def test_ready_means_no_request_is_skipped_under_latest(topics, client, start_server):
    # Sent the moment the ready line appears: must be answered under offset reset "latest".
    for attempt in range(3):
        group = f"{topics.group}-{attempt}"
        server = start_server(topics.server_args(*BUILTIN, group=group)).wait_ready()
        client.send({"id": f"r{attempt}", "method": "noop"})
        assert client.reply(f"r{attempt}")[0] == f"r{attempt}"
        assert server.stop() == 0


def test_second_signal_exits_at_once_non_zero(tmp_path, start_server):
    # A backend that takes a minute keeps the first shutdown waiting for its reply.
    server = start_server(["--backend", "builtin", "--builtin-delay", "60",
                           "--shutdown-timeout", "60"], stdin=subprocess.PIPE)
    server.process.stdin.write(b'{"id":1,"method":"noop"}\n')
    server.process.stdin.flush()
    server.wait_for_log("serving on")  # its signal handlers are in place (a busy machine)
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_log("finishing queued messages")
    time.sleep(0.3)
    assert server.process.poll() is None, "the first signal must wait for the reply"
    started = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    server.process.wait(10)
    assert time.monotonic() - started < 5
    assert server.process.returncode not in (0, None)
    assert "second SIGINT" in server.log


def test_interop_with_librdkafka(topics, start_server):
    from confluent_kafka import Consumer, Producer
    start_server(topics.server_args(*BUILTIN)).wait_ready()
    producer = Producer({"bootstrap.servers": topics.bootstrap})
    producer.produce(topics.input, json.dumps(NOOP).encode())
    assert producer.flush(10) == 0
    consumer = Consumer({"bootstrap.servers": topics.bootstrap, "group.id": topics.group + "-rd",
                         "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
    consumer.subscribe([topics.output])
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            record = consumer.poll(0.2)
            if record is None or record.error():
                continue
            assert record.key() == b"1"
            assert json.loads(record.value()) == {"jsonrpc": "2.0", "id": 1, "result": {}}
            break
        else:
            raise AssertionError("librdkafka consumer got no reply")
    finally:
        consumer.close()


def test_kafka_rpc_script_smoke_test(topics, start_server):
    # The reference's section-5 smoke test, with scripts/kafka-rpc for the console tools.
    start_server(topics.server_args(*BUILTIN)).wait_ready()
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kafka-rpc"), "--bootstrap-server",
         topics.bootstrap, "--input-topic", topics.input, "--output-topic", topics.output,
         "--show-keys", "--timeout", "20"],
        input=json.dumps(NOOP).encode(), capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key, value = out.stdout.decode().strip().split("\t")
    assert key == "1" and json.loads(value) == {"jsonrpc": "2.0", "id": 1, "result": {}}
    missing = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kafka-rpc"), "--bootstrap-server",
         topics.bootstrap, "--input-topic", topics.input, "--output-topic", topics.output,
         "--timeout", "2", '{"id":"x","method":"noop"}'], capture_output=True, timeout=60)
    # Answered by the server: exit 0.  The missing-reply path is checked on a dead topic pair.
    assert missing.returncode == 0


def test_kafka_rpc_script_times_out_without_a_server(topics):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kafka-rpc"), "--bootstrap-server",
         topics.bootstrap, "--input-topic", topics.input, "--output-topic", topics.output,
         "--timeout", "2", json.dumps(NOOP)], capture_output=True, timeout=60)
    assert out.returncode == 1
    assert b"no reply within 2 s for id(s) 1" in out.stderr


def test_statistics_lines_and_topic(topics, client, start_server):
    """-X statistics.interval.ms: one INFO line of JSON counts, also on --stats-topic."""
    from harness import local_broker, read_topic
    stats_topic = topics.output + ".stats"
    local_broker.create_topics(topics.bootstrap, [stats_topic])
    server = start_server(topics.server_args(
        *BUILTIN, "-X", "statistics.interval.ms=300", "--stats-topic", stats_topic)).wait_ready()
    for n in range(3):
        client.send({"id": n, "method": "noop"})
    client.send(b"{not json")
    for n in range(3):
        client.reply(n)
    time.sleep(1.5)
    records = read_topic(topics.bootstrap, stats_topic, 1)
    assert records and records[0].key == b"codex-app-server", records
    last = json.loads(read_topic(topics.bootstrap, stats_topic, len(records))[-1].value)
    assert last["received"] == 4 and last["replied"] == 3 and last["invalid"] == 1, last
    assert last["queue"] == 0 and last["in_flight"] == 0 and last["paused"] is False, last
    assert last["unacknowledged"] == 0 and last["dead_lettered"] == 0, last
    assert last["partitions"] == [{"partition": 0, "position": 4, "committed": 4, "lag": 0}], last
    lines = [line for line in server.log.splitlines() if " INFO " in line and "stats: {" in line]
    assert lines and json.loads(lines[-1].split("stats: ", 1)[1])["received"] == 4, lines[-3:]
    assert "not json" not in server.log.split("stats: ")[-1]  # counts, never payloads
    assert server.stop() == 0


def test_statistics_settings_are_checked(start_server, topics):
    for extra, said in ((["-X", "statistics.interval.ms=soon"],
                         "statistics.interval.ms='soon': expected a whole number"),
                        (["-X", "statistics.interval.ms=-5"], "must not be negative"),
                        (["--stats-topic", "s"], "--stats-topic needs -X statistics.interval.ms"),
                        (["-X", "statistics.interval.ms=100", "--stats-topic", topics.input],
                         "--stats-topic must differ from the input, output and dead-letter")):
        server = start_server(topics.server_args(*BUILTIN, *extra))
        assert server.process.wait(10) == 2
        assert said in server.log, server.log


def test_statistics_show_the_lag_while_paused(topics, client, start_server):
    server = start_server(topics.server_args(
        *BUILTIN, "--builtin-delay", "0.2", "--queue-size", "2",
        "-X", "statistics.interval.ms=200", "-X", "max.poll.records=5")).wait_ready()
    for n in range(60):
        client.producer.send(topics.input, value=json.dumps({"id": n, "method": "noop"}).encode())
    client.producer.flush(10)

    def last_stats():
        lines = [line.split("stats: ", 1)[1] for line in server.log.splitlines()
                 if "stats: {" in line]
        return json.loads(lines[-1]) if lines else None
    def consistent(stats):  # paused, with the rest unread and counted as lag
        partitions = stats["partitions"] if stats else []
        return len(partitions) == 1 and stats["paused"] and partitions[0]["lag"] and \
            partitions[0]["position"] + partitions[0]["lag"] == 60 and \
            stats["received"] == partitions[0]["position"]
    deadline = time.monotonic() + 30
    while not consistent(last_stats()):
        assert time.monotonic() < deadline, (last_stats(), server.log[-3000:])
        time.sleep(0.1)
    assert server.stop() == 0
