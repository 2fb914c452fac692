"""Issue 9: nothing one record, line, flag, signal or child does may stop the service.

Every test drives the real server (a subprocess) over real pipes, a real broker or
a real child process.  The fuzz tests are seeded (``FUZZ_SEED``) and bounded in count
(``FUZZ_COUNT`` payloads on stdio, a third of that over Kafka); a failure prints the
seed that reproduces it.
"""

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from typing import Callable, List, Optional

import pytest

import kafka_transport as rpc
from harness import KafkaClient, ServerProcess, local_broker, peak_rss_mb, read_topic

BUILTIN = ["--backend", "builtin"]
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261124"))
FUZZ_COUNT = int(os.environ.get("FUZZ_COUNT", "30000"))
FUZZ_LIMIT = 1_000_000  # --max-message-bytes of the fuzzed servers: some inputs go past it


class StdioSession:
    """The server on pipes: a thread collects every stdout line (so the server never
    blocks on a full pipe), decoded as JSON; a line that is not JSON fails the test."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.lines: List[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.server.process.stdout:
            self.lines.append(line)

    def write(self, data: bytes) -> None:
        self.server.process.stdin.write(data)
        self.server.process.stdin.flush()

    def replies(self) -> List[dict]:
        return [json.loads(line) for line in list(self.lines)]

    def reply(self, msg_id, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for reply in self.replies():
                if reply.get("id") == msg_id and "method" not in reply:
                    return reply
            if self.server.process.poll() is not None:
                raise AssertionError(f"server exited ({self.server.process.returncode}) before "
                                     f"answering {msg_id!r}:\n{self.server.log[-3000:]}")
            time.sleep(0.02)
        raise AssertionError(f"no reply to {msg_id!r} within {timeout} s")

    def finish(self, timeout: float = 30.0) -> int:
        self.server.process.stdin.close()
        status = self.server.process.wait(timeout)
        self._reader.join(5)
        return status


@pytest.fixture
def stdio(start_server) -> Callable[..., StdioSession]:
    def start(*args: str) -> StdioSession:
        return StdioSession(start_server(list(args), stdin=subprocess.PIPE))
    return start


def assert_no_crash_in(log: str) -> None:
    """No thread died and nothing of ours raised (kafka-python may log its own close races)."""
    for sign in ("Exception in thread", "Fatal Python error", "internal error"):
        assert sign not in log, log[-4000:]
    for block in log.split("Traceback (most recent call last):")[1:]:
        frames = block.split("\n20")[0]  # up to the next log line
        assert "codex_app_server.py" not in frames and "kafka_transport.py" not in frames, \
            block[:3000]


# --- the defects, one by one (stdio) ----------------------------------------

def test_defect_lines_get_errors_and_the_next_request_is_answered(stdio):
    session = stdio(*BUILTIN)
    cases = [  # (line, error code, reply id)
        (b'{"id":1,"method":"noop","params":{"x":' + b"9" * 5000 + b'}}', rpc.PARSE_ERROR, 1),
        (b'{"id":"\\ud800","method":"noop"}', rpc.PARSE_ERROR, None),
        (b'{"id":3,"method":"noop","params":{"s":"\\ud800"}}', rpc.PARSE_ERROR, 3),
        (b'{"id":4,"method":"noop","params":{"x":NaN}}', rpc.PARSE_ERROR, 4),
        (b'{"id":5,"method":"noop","params":[Infinity]}', rpc.PARSE_ERROR, 5),
        (b'{"id":6,"method":"noop","params":' + b"[" * 200 + b"]" * 200 + b"}", rpc.PARSE_ERROR,
         6),
    ]
    for line, _, _ in cases:
        session.write(line + b"\n")
    session.write(b'{"id":"after","method":"noop"}\n')
    assert session.reply("after") == {"jsonrpc": "2.0", "id": "after", "result": {}}
    replies = session.replies()
    assert len(replies) == len(cases) + 1
    for reply, (_, code, msg_id) in zip(replies, cases):
        assert reply["error"]["code"] == code and reply["id"] == msg_id, reply
    assert session.finish() == 0
    assert_no_crash_in(session.server.log)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_with_stdin_open_stop_gracefully(stdio, sig):
    session = stdio(*BUILTIN)
    session.write(b'{"id":1,"method":"noop"}\n')
    session.reply(1)
    session.server.process.send_signal(sig)  # stdin stays open: the client is still there
    assert session.server.process.wait(15) == 0
    log = session.server.log
    assert f"received {signal.Signals(sig).name}" in log and "shutdown complete" in log, log
    assert_no_crash_in(log)


def test_sighup_stays_ignored_under_nohup(start_server):
    server = start_server(BUILTIN, stdin=subprocess.PIPE)
    server.wait_for_log("serving on stdio")
    server.process.send_signal(signal.SIGHUP)  # a control: without nohup, a graceful stop
    assert server.process.wait(15) == 0
    nohup = ServerProcess(BUILTIN, server.log_path.with_name("nohup.log"), stdin=subprocess.PIPE,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        nohup.wait_for_log("serving on stdio")
        nohup.process.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert nohup.process.poll() is None, nohup.log
    finally:
        assert nohup.stop() == 0


def test_closed_stdout_ends_the_stdio_connection(start_server):
    server = start_server(BUILTIN, stdin=subprocess.PIPE)
    server.process.stdin.write(b'{"id":1,"method":"noop"}\n')
    server.process.stdin.flush()
    assert json.loads(server.process.stdout.readline())["id"] == 1
    server.process.stdout.close()  # like `... | head -1`
    deadline = time.monotonic() + 15
    with pytest.raises(BrokenPipeError):  # the server stops reading and exits
        while time.monotonic() < deadline:
            server.process.stdin.write(b'{"id":2,"method":"noop"}\n')
            server.process.stdin.flush()
            time.sleep(0.05)
    assert server.process.wait(15) == 0
    log = server.log
    assert log.count("cannot write to stdout") == 1, log  # said once, not once a reply
    assert "stdout closed: shutting down" in log
    assert_no_crash_in(log)


def test_over_long_line_is_refused_without_holding_it(stdio):
    session = stdio(*BUILTIN)  # the default limit: 8 MiB
    session.write(b'{"id":"big","method":"noop","params":{"blob":"')
    chunk = b"x" * (1 << 20)
    for _ in range(200):  # 200 MiB on one line
        session.write(chunk)
    session.write(b'"}}\n{"id":"next","method":"noop"}\n')
    assert session.reply("next")["result"] == {}
    error = session.reply("big")["error"]
    assert error["code"] == rpc.INVALID_REQUEST
    assert "209715249 bytes is over the limit of 8388608 (--max-message-bytes)" in \
        error["message"], error
    assert peak_rss_mb(session.server.process.pid) < 100
    assert session.finish() == 0


def test_eof_answers_every_pipelined_request_even_with_shutdown_timeout_0(stdio):
    # About a second of work is still queued when EOF arrives.
    session = stdio(*BUILTIN, "--shutdown-timeout", "0", "--builtin-delay", "0.001")
    session.write(b"".join(b'{"id":%d,"method":"noop"}\n' % i for i in range(1000)))
    assert session.finish() == 0
    assert sorted(reply["id"] for reply in session.replies()) == list(range(1000))


def test_method_policy_over_stdio(stdio):
    session = stdio(*BUILTIN, "--allow-method", "*", "--deny-method", "no?p")
    session.write(b'{"id":1,"method":"noop"}\n{"method":"noop"}\n'
                  b'{"id":2,"method":"initialize","params":{}}\n')
    assert session.reply(1)["error"] == {"code": rpc.METHOD_NOT_FOUND,
                                         "message": "method not allowed by this server: noop"}
    assert "result" in session.reply(2)
    assert session.finish() == 0
    assert len(session.replies()) == 2
    assert session.server.log.count("WARNING") == 2


def test_systemd_hears_ready_watchdog_and_stopping(topics, start_server, tmp_path):
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(0.5)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")  # a ping each 0.2 s
    # With --stdio and stdin at /dev/null, as under systemd: stdio ends, the watchdog goes on.
    server = start_server(topics.server_args(*BUILTIN, "--stdio"), env=env)
    said: List[str] = []
    deadline = time.monotonic() + 30
    try:
        while said.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            try:
                said.extend(listener.recv(4096).decode().split("\n"))
            except socket.timeout:
                continue
            if "READY=1" in said and said.count("WATCHDOG=1") == 0:
                # Ready means the Kafka partitions are owned, not that the process exists.
                assert "kafka transport ready" in server.log, server.log
        server.process.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in said and time.monotonic() < deadline:
            try:
                said.extend(listener.recv(4096).decode().split("\n"))
            except socket.timeout:
                continue
    finally:
        listener.close()
    assert server.process.wait(30) == 0
    assert said[:2] == ["READY=1", "STATUS=serving on kafka and stdio"], said
    assert "stdin closed: the stdio connection ends, Kafka goes on" in server.log
    assert said.count("WATCHDOG=1") >= 3 and said[-2:] == ["STOPPING=1", "STATUS=shutting down"]
    assert said.index("STOPPING=1") > max(i for i, line in enumerate(said) if line == "WATCHDOG=1")


# --- a misbehaving Codex child -----------------------------------------------------

def test_a_child_that_floods_and_never_listens_fails_requests_quietly(stdio):
    """Not Codex: it floods stdout and stderr and never opens its socket.  Its output is
    rate-limited in the log, the request gets an error after the start timeout, the next
    one at once, and the server goes on."""
    session = stdio("--codex-command", "sh -c 'yes not-json-rpc & exec yes codex-noise >&2'",
                    "--shutdown-timeout", "5")
    session.write(b'{"id":1,"method":"initialize","params":{"clientInfo":{"name":"t"}}}\n')
    first = session.reply(1, timeout=40)
    session.write(b'{"id":2,"method":"noop"}\n')
    second = session.reply(2, timeout=2)
    for reply in (first, second):
        assert reply["error"]["code"] == rpc.INTERNAL_ERROR, reply
        assert "did not take a connection on its socket within 20 s" in \
            reply["error"]["message"], reply
    log = session.server.log
    assert len(log) < 100_000, len(log)
    assert "more like it not logged" in log, log[-2000:]
    assert session.finish() == 0
    assert_no_crash_in(session.server.log)


def test_a_child_that_ignores_stdin_does_not_outlive_a_killed_server(stdio):
    # This child never listens and never exits by itself: only the watcher stops it.
    session = stdio("--codex-command", "sh -c 'exec sleep 297'")
    session.write(b'{"id":1,"method":"noop"}\n')
    session.server.wait_for_log("started codex app-server")
    pid = int(session.server.log.rsplit("(pid ", 1)[1].split(")")[0])
    deadline = time.monotonic() + 5  # until sh has exec'd
    while open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:2] != [b"sleep", b"297"]:
        assert time.monotonic() < deadline, open(f"/proc/{pid}/cmdline", "rb").read()
        time.sleep(0.02)
    session.server.process.kill()
    session.server.process.wait()
    def gone() -> bool:  # (a zombie is gone: its new parent may be slow to reap it)
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True
    deadline = time.monotonic() + 5
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not gone():
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the child outlived the server by 5 s")


# --- Kafka: poison pills, the size cap ---------------------------------------------

POISON = [  # once each of these crashed the server, on every restart
    b'{"id":"p1","method":"noop","params":{"x":' + b"9" * 5000 + b"}}",
    b'{"id":"\\ud800","method":"noop"}',
    b'{"id":"p3","method":"noop","params":{"s":"\\udbff"}}',
]


def test_poison_records_never_crash_a_start_or_a_restart(topics, client, start_server):
    dead = topics.input + ".dlq"
    local_broker.create_topics(topics.bootstrap, [dead])
    for value in POISON:
        client.send(value)
    client.send({"id": "next", "method": "noop"})
    args = topics.server_args(*BUILTIN, "--kafka-offset-reset", "earliest",
                              "--kafka-dead-letter-topic", dead)
    first = start_server(args).wait_ready()
    assert client.reply("next")[1]["result"] == {}
    assert client.reply("p1")[1]["error"]["code"] == rpc.PARSE_ERROR
    assert client.reply("p3")[1]["error"]["code"] == rpc.PARSE_ERROR
    first.process.kill()
    first.process.wait()
    # A new group reads the topic from the start: the same records, again.
    second = start_server(topics.server_args(*BUILTIN, "--kafka-offset-reset", "earliest",
                                             "--kafka-dead-letter-topic", dead,
                                             group=topics.group + ".2")).wait_ready()
    client.send({"id": "after", "method": "noop"})
    assert client.reply("after")[1]["result"] == {}
    assert second.process.poll() is None
    for server in (first, second):
        assert server.log.count("invalid payload from kafka") == len(POISON), server.log
        assert_no_crash_in(server.log)
    assert second.stop() == 0


def test_record_over_the_size_cap_is_answered_and_dead_lettered(topics, client, start_server):
    dead = topics.input + ".dlq"
    local_broker.create_topics(topics.bootstrap, [dead])
    server = start_server(topics.server_args(*BUILTIN, "--max-message-bytes", "100000",
                                             "--kafka-dead-letter-topic", dead)).wait_ready()
    big = json.dumps({"id": "big", "method": "noop", "params": {"b": "x" * 300_000}}).encode()
    client.send(big)
    client.send({"id": "next", "method": "noop"})
    key, reply = client.reply("big")
    assert key == "big" and reply["error"]["code"] == rpc.INVALID_REQUEST
    assert "over the limit of 100000 (--max-message-bytes)" in reply["error"]["message"]
    assert client.reply("next")[1]["result"] == {}
    assert [letter.value for letter in read_topic(topics.bootstrap, dead, 1)] == [big]
    assert server.stop() == 0


# --- fuzzing ----------------------------------------------------------------------

SPECIAL = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 5000, b"-" + b"9" * 400,
           b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\ud83d\\ude00"', b"[" * 300 + b"]" * 300,
           b"{" * 50, b"null", b"true", b"{}", b"[]", b'""', b"0", b"-0", b"1.5e308",
           b'"\\u0000"', b'"\xff"', b"\xc3\x28", b'"' + b"s" * 100_000 + b'"']


def random_value(rng: random.Random, depth: int = 0) -> object:
    roll = rng.random()
    if depth > 3 or roll < 0.4:
        return rng.choice([None, True, False, rng.randint(-2 ** 70, 2 ** 70),
                           rng.random() * 10 ** rng.randint(-5, 300), "",
                           "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 20)))])
    if roll < 0.7:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["id", "method", "params", "result", "error", "x", "code", "message"]):
            random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def fuzz_payload(rng: random.Random) -> Optional[bytes]:
    """One hostile payload: random bytes, a mutated JSON-RPC message, or a special token."""
    kind = rng.random()
    if kind < 0.15:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if kind < 0.25:
        return rng.choice(SPECIAL)
    if kind < 0.27:
        return b'{"id":"huge","method":"noop","params":"' + b"h" * rng.randint(
            FUZZ_LIMIT - 100, FUZZ_LIMIT + 100_000) + b'"}'
    message = {"jsonrpc": rng.choice(["2.0", "2.0", "1.0", 2]),
               "id": rng.choice([rng.randint(-5, 10 ** 12), "s%d" % rng.randint(0, 99), None,
                                 1.5, [], {}, True]),
               "method": rng.choice(["noop", "initialize", "x/y", "", 7, None]),
               "params": random_value(rng)}
    for name in list(message):
        if rng.random() < 0.2:
            del message[name]
    if rng.random() < 0.1:
        message = {"id": rng.randint(0, 100), rng.choice(["result", "error"]):
                   random_value(rng)}
    data = bytearray(json.dumps(message).encode())
    for _ in range(rng.choice([0, 0, 1, 2, 5])):  # mutations
        what = rng.random()
        at = rng.randrange(len(data) + 1)
        if what < 0.3 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif what < 0.5:
            del data[at:at + rng.randint(1, 10)]
        elif what < 0.8:
            data[at:at] = rng.choice(SPECIAL)
        else:
            data = data[:at]
    return bytes(data)


def check_reply(line: bytes) -> None:
    """Whatever the input, every output line is one strict JSON-RPC message."""
    message = rpc.decode(line.rstrip(b"\n"))
    assert rpc.kind(message) in (rpc.RESPONSE, rpc.ERROR), message


def test_fuzz_stdio(stdio):
    rng = random.Random(FUZZ_SEED)
    session = stdio(*BUILTIN, "--max-message-bytes", str(FUZZ_LIMIT))
    sent = 0
    while sent < FUZZ_COUNT:
        payload = fuzz_payload(rng).replace(b"\n", b" ")
        session.write(payload + b"\n")
        sent += 1
    session.write(b'{"id":"fuzz-end","method":"noop"}\n')
    assert session.reply("fuzz-end", timeout=60)["result"] == {}, f"seed {FUZZ_SEED}"
    assert session.server.process.poll() is None, f"seed {FUZZ_SEED}"
    rss = peak_rss_mb(session.server.process.pid)
    assert session.finish() == 0, f"seed {FUZZ_SEED}"
    for line in session.lines:
        check_reply(line)
    assert rss < 200, f"seed {FUZZ_SEED}: peak RSS {rss:.0f} MB"
    assert_no_crash_in(session.server.log)
    assert sent > 100


def test_fuzz_kafka(topics, start_server):
    rng = random.Random(FUZZ_SEED + 1)
    client = KafkaClient(topics)
    client.producer.config["max_request_size"] = 4 * FUZZ_LIMIT
    dead = topics.input + ".dlq"
    local_broker.create_topics(topics.bootstrap, [dead])
    server = start_server(topics.server_args(*BUILTIN, "--max-message-bytes", str(FUZZ_LIMIT),
                                             "--kafka-dead-letter-topic", dead))
    server.wait_ready()
    sent = 0
    try:
        while sent < FUZZ_COUNT // 3:
            value = None if rng.random() < 0.03 else fuzz_payload(rng)
            key = rng.choice([None, b"", b"k", bytes(rng.randrange(256) for _ in range(8))])
            headers = rng.choice([None, [("h", b"\xff")], [("kafka_replyTopic", b"nope")],
                                  [("kafka_replyTopic", dead.encode())],  # the server's own
                                  [("reply_to", topics.input.encode())]])
            if value is None and key is None:
                key = b"tombstone"
            client.producer.send(topics.input, value=value, key=key, headers=headers)
            sent += 1
        client.producer.flush(30)
        client.send({"id": "fuzz-end", "method": "noop"})
        _, reply = client.reply("fuzz-end", timeout=60)
        assert reply["result"] == {}, f"seed {FUZZ_SEED + 1}"
        assert server.process.poll() is None, f"seed {FUZZ_SEED + 1}"
        replies = read_topic(topics.bootstrap, topics.output, len(client.seen), timeout=60)
        assert len(replies) >= len(client.seen)
        for record in replies:
            check_reply(record.value)
        # The dead-letter topic holds dead letters only, never a reply sent there.
        for record in read_topic(topics.bootstrap, dead, sent, timeout=10):
            assert "__connect.errors.topic" in dict(record.headers or ()), record
        rss = peak_rss_mb(server.process.pid)
        assert rss < 250, f"seed {FUZZ_SEED + 1}: peak RSS {rss:.0f} MB"
        assert server.stop() == 0
        assert_no_crash_in(server.log)
    finally:
        client.close()
    assert sent > 100
