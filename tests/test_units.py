"""Unit tests: CLI validation, JSON-RPC envelopes, keying, -X mapping, builtin backend, docs."""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import codex_app_server as app
import kafka_transport as rpc
from conftest import ROOT, SERVER

REQUIRED = {"--kafka-bootstrap-servers": "127.0.0.1:9092", "--kafka-input-topic": "in",
            "--kafka-output-topic": "out", "--kafka-group-id": "g"}


def parse(argv):
    return app.parse_args(app.build_parser(), argv)


def kafka_argv(**overrides):
    values = dict(REQUIRED, **overrides)
    argv = []
    for flag, value in values.items():
        if value is not None:
            argv += [flag, value]
    return argv


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# --- CLI ---------------------------------------------------------------------

def test_no_kafka_flag_means_stdio_only():
    args = parse([])
    assert args.stdio and not args.kafka
    assert args.backend == "codex"


def test_kafka_flags_without_stdio_turn_stdio_off():
    args = parse(kafka_argv())
    assert args.kafka and not args.stdio
    assert args.kafka_properties == {"bootstrap.servers": "127.0.0.1:9092", "group.id": "g",
                                     "client.id": "codex-app-server",
                                     "auto.offset.reset": "latest"}
    assert parse(kafka_argv() + ["--stdio"]).stdio


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_each_missing_required_flag_is_named(missing, capsys):
    err = usage_error(kafka_argv(**{missing: None}), capsys)
    assert "usage:" in err and missing in err
    for other in set(REQUIRED) - {missing}:
        assert other not in err.split("error:")[1]


def test_every_missing_flag_is_named_at_once(capsys):
    err = usage_error(["--kafka-client-id", "x"], capsys)
    assert all(flag in err.split("error:")[1] for flag in REQUIRED)


@pytest.mark.parametrize("flag", sorted(REQUIRED) + ["--kafka-client-id"])
def test_empty_values_are_refused(flag, capsys):
    err = usage_error(kafka_argv(**{flag: ""}), capsys)
    assert flag in err and ("empty" in err or "not" in err)


def test_same_input_and_output_topic_is_refused(capsys):
    err = usage_error(kafka_argv(**{"--kafka-output-topic": "in"}), capsys)
    assert "must differ" in err


def test_illegal_topic_and_server_are_refused(capsys):
    assert "legal Kafka topic" in usage_error(kafka_argv(**{"--kafka-input-topic": "a b"}), capsys)
    assert "HOST:PORT" in usage_error(kafka_argv(**{"--kafka-bootstrap-servers": "nohost"}),
                                      capsys)


@pytest.mark.parametrize("argv, said", [
    (["--shutdown-timeout", "inf"], "must be from 0 to 1000000"),
    (["--shutdown-timeout", "1e300"], "must be from 0 to 1000000"),
    (["--shutdown-timeout", "nan"], "must be from 0 to 1000000"),
    (["--shutdown-timeout", "-1"], "must be from 0 to 1000000"),
    (["--builtin-delay", "nan"], "must be from 0"),
    (["--builtin-delay", "soon"], "is not a number of seconds"),
    (["--queue-size", "0"], "must be from 1"),
    (["--queue-size", str(2 ** 40)], "must be from 1 to 2147483647"),
    (["--queue-size", "1e3"], "is not a whole number"),
    (["--max-message-bytes", "0"], "must be from 1 "),
    (["--max-message-bytes", str(2 ** 31)], "to 1073741824"),
    (kafka_argv(**{"--kafka-bootstrap-servers": "127.0.0.1:99999"}), "port must be from 1"),
    (kafka_argv(**{"--kafka-bootstrap-servers": "a:9092,127.0.0.1:0"}), "port must be from 1"),
    (kafka_argv(**{"--kafka-connect-timeout": "inf"}), "must be from 0"),
    (kafka_argv(**{"--kafka-max-message-bytes": "0"}), "must be from 1 "),
    (kafka_argv() + ["-X", "session.timeout.ms=99999999999"], "must be at most 2147483647"),
])
def test_numbers_must_be_finite_and_in_range(argv, said, capsys):
    err = usage_error(argv, capsys)
    assert said in err, err


def test_numbers_at_their_limits_are_taken():
    args = parse(["--shutdown-timeout", "0", "--queue-size", "2147483647",
                  "--max-message-bytes", "1"])
    assert (args.shutdown_timeout, args.queue_size, args.max_message_bytes) == (0, 2 ** 31 - 1,
                                                                             1)
    assert parse(kafka_argv(**{"--kafka-bootstrap-servers": "[::1]:65535,b:1"})).kafka


def test_kafka_property_maps_and_rejects(capsys):
    args = parse(kafka_argv() + ["-X", "session.timeout.ms=2000", "--kafka-property",
                                 "linger.ms=5"])
    assert args.kafka_properties["session.timeout.ms"] == "2000"
    assert args.kafka_properties["linger.ms"] == "5"
    err = usage_error(kafka_argv() + ["-X", "no.such.key=1", "-X", "fetch.wait.max.ms=soon"],
                      capsys)
    assert "no.such.key: unknown property" in err
    assert "fetch.wait.max.ms='soon': expected a whole number" in err
    assert "not settable" in usage_error(kafka_argv() + ["-X", "enable.auto.commit=true"], capsys)
    assert "KEY=VALUE" in usage_error(kafka_argv() + ["-X", "novalue"], capsys)


def test_a_kafka_property_alone_enables_kafka(capsys):
    err = usage_error(["-X", "linger.ms=1"], capsys)
    assert "--kafka-bootstrap-servers" in err


def test_version_flag():
    out = subprocess.run([sys.executable, SERVER, "--version"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == f"codex-app-server {app.__version__}"


def test_stdio_only_does_not_import_kafka():
    # The two files must work for stdio without kafka-python installed.
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'kafka' or name.startswith('kafka.'): raise ImportError(name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            f"sys.argv = ['x', '--backend', 'builtin']; sys.path.insert(0, {str(ROOT)!r})\n"
            "import codex_app_server; sys.exit(codex_app_server.main())\n")
    out = subprocess.run([sys.executable, "-c", code], input=b'{"id":1,"method":"noop"}\n',
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"jsonrpc": "2.0", "id": 1, "result": {}}


# --- envelopes -----------------------------------------------------------------

@pytest.mark.parametrize("message, kind", [
    ({"jsonrpc": "2.0", "id": 1, "method": "noop", "params": {}}, rpc.REQUEST),
    ({"id": "a", "method": "noop"}, rpc.REQUEST),
    ({"method": "initialized"}, rpc.NOTIFICATION),
    ({"id": 0, "result": {}}, rpc.RESPONSE),
    ({"id": 3, "error": {"code": -1, "message": "no"}}, rpc.ERROR),
])
def test_valid_messages_are_classified(message, kind):
    assert rpc.kind(rpc.decode(json.dumps(message).encode())) == kind


@pytest.mark.parametrize("payload, code, answer_id, reason", [
    (b"\xff\xfe", rpc.PARSE_ERROR, None, "not UTF-8"),
    (b"{nope", rpc.PARSE_ERROR, None, "invalid JSON"),
    (b"", rpc.PARSE_ERROR, None, "empty"),
    (b"[" * 10000 + b"]" * 10000, rpc.PARSE_ERROR, None, "nested deeper than 100"),
    # Issue 9's defects: what Python's json takes but JSON (and Codex) does not.
    (b'{"id":1,"method":"noop","params":{"x":' + b"9" * 5000 + b'}}', rpc.PARSE_ERROR, 1,
     "integer of 5000 digits"),
    (b'{"id":1,"method":"noop","params":{"x":-' + b"9" * 400 + b'}}', rpc.PARSE_ERROR, 1,
     "integer of 400 digits"),
    (b'{"id":' + b"9" * 5000 + b',"method":"noop"}', rpc.PARSE_ERROR, None, "5000 digits"),
    (b'{"id":2,"method":"noop","params":{"x":1e400}}', rpc.PARSE_ERROR, 2, "1e400"),
    (b'{"id":3,"method":"noop","params":{"x":NaN}}', rpc.PARSE_ERROR, 3, "NaN is not"),
    (b'{"id":3,"method":"noop","params":[Infinity]}', rpc.PARSE_ERROR, 3, "Infinity is not"),
    (b'{"id":NaN,"method":"noop"}', rpc.PARSE_ERROR, None, "NaN is not"),
    (b'{"id":"\\ud800","method":"noop"}', rpc.PARSE_ERROR, None, "lone UTF-16 surrogate"),
    (b'{"id":4,"method":"noop","params":{"\\udfff":1}}', rpc.PARSE_ERROR, 4, "surrogate"),
    (b'{"id":5,"method":"noop","params":' + b"[" * 100 + b"]" * 100 + b'}', rpc.PARSE_ERROR,
     5, "nested deeper than 100"),
    (b"42", rpc.INVALID_REQUEST, None, "must be an object"),
    (b"[1]", rpc.INVALID_REQUEST, None, "must be an object"),
    (b'{"id":5,"foo":1}', rpc.INVALID_REQUEST, 5, 'no "method"'),
    (b'{"id":5,"method":7}', rpc.INVALID_REQUEST, 5, '"method" must be a string'),
    (b'{"id":{},"method":"x"}', rpc.INVALID_REQUEST, None, '"id" must be'),
    (b'{"id":true,"method":"x"}', rpc.INVALID_REQUEST, None, '"id" must be'),
    (b'{"id":"q","method":"x","params":3}', rpc.INVALID_PARAMS, "q", '"params"'),
    (b'{"jsonrpc":"1.0","id":2,"method":"x"}', rpc.INVALID_REQUEST, 2, '"jsonrpc"'),
    (b'{"result":{}}', rpc.INVALID_REQUEST, None, 'needs an "id"'),
    (b'{"id":1,"error":"bad"}', rpc.INVALID_REQUEST, 1, '"error" must be'),
])
def test_invalid_payloads_say_why(payload, code, answer_id, reason):
    with pytest.raises(rpc.InvalidMessage) as info:
        rpc.decode(payload)
    assert info.value.code == code
    assert info.value.id == answer_id
    assert reason in info.value.reason


@pytest.mark.parametrize("message, key", [
    ({"id": 1, "result": {}}, b"1"),
    ({"id": -12, "error": {"code": 1, "message": "x"}}, b"-12"),
    ({"id": "req-\u00e9", "result": {}}, "req-\u00e9".encode()),
    ({"id": 0, "method": "item/commandExecution/requestApproval", "params": {}}, b"0"),
    ({"method": "thread/started", "params": {}}, None),
    ({"id": None, "error": {"code": -32700, "message": "x"}}, None),
])
def test_reply_keys(message, key):
    assert rpc.reply_key(message) == key


def test_encode_is_compact_utf8():
    assert rpc.encode({"id": 1, "result": {"t": "\u00e9"}}) == '{"id":1,"result":{"t":"\u00e9"}}'.encode()


@pytest.mark.parametrize("payload", [
    b'{"id":1,"method":"noop","params":{"x":' + b"9" * 308 + b'}}',  # still a double
    b'{"id":1,"method":"noop","params":{"x":1.5e308,"y":-0.0,"z":"\\ud83d\\ude00"}}',
    b'{"id":1,"method":"noop","params":' + b"[" * 99 + b"]" * 99 + b'}',  # 100 levels
])
def test_strict_json_still_takes_what_json_allows(payload):
    message = rpc.decode(payload)
    assert rpc.decode(rpc.encode(message)) == message


def deeply_nested(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("message", [
    {"id": 7, "result": float("nan")}, {"id": 7, "result": "\ud800"},
    {"id": 7, "result": object()}, {"id": 7, "result": deeply_nested(100_000)},
])
def test_encode_reply_never_raises(message):
    data = rpc.encode_reply(message)
    reply = json.loads(data)
    assert reply["id"] == 7
    assert reply["error"]["code"] == rpc.INTERNAL_ERROR and "could not encode" in \
        reply["error"]["message"]
    assert rpc.encode_reply({"method": "x", "params": {"y": "\ud800"}}) is None
    with pytest.raises(rpc.InvalidMessage):
        rpc.encode({"id": 1, "result": float("inf")})


@pytest.mark.parametrize("head, answer_id, answers", [
    (b'{"id":12,"method":"noop","params":{"blob":"', 12, None),
    (b' { "jsonrpc" : "2.0" , "method":"turn/start", "id" : "r-1" , "params"', "r-1", None),
    (b'{"method":"item/tool/call","id":3,"params":{', 3, None),  # Codex writes method first
    (b'{"id":5,"result":{"decision":"', None, 5),  # an answer: not to be answered itself
    (b'{"jsonrpc":"2.0","id":6,"error":{"code":1,', None, 6),
    (b'{"method":"x","params":{"id":5},"id":7}', None, None),  # an "id" inside params
    (b'{"params":{"x":1},"id":7}', None, None),
    (b'{"id":8}', None, None),
    (b'\xff\xfe garbage', None, None),
])
def test_oversized_names_the_limit_and_finds_a_leading_id(head, answer_id, answers):
    error = rpc.oversized(head, 10 ** 9, 8 * 1024 * 1024)
    assert error.code == rpc.INVALID_REQUEST
    assert (error.id, error.answers) == (answer_id, answers)
    assert "1000000000 bytes" in error.reason and "--max-message-bytes" in error.reason


def test_codex_output_may_nest_deeper_than_client_input():
    line = b'{"id":1,"result":' + b"[" * 110 + b"]" * 110 + b"}"
    with pytest.raises(rpc.InvalidMessage):
        rpc.decode(line)
    assert rpc.decode(line, max_depth=None)["id"] == 1
    assert rpc.peek(b'{"id":4,"result":[NaN]}') == (rpc.RESPONSE, 4)
    assert rpc.peek(b'{"method":"m","id":5,"params":[1e999]}') == (rpc.REQUEST, 5)


def test_line_reader_skips_over_long_lines_without_holding_them():
    read_fd, write_fd = os.pipe()
    data = b"a\n" + b"x" * 300000 + b"\n\nbb\n" + b"y" * 5000 + b"\ncc"
    writer = threading.Thread(target=lambda: (os.write(write_fd, data), os.close(write_fd)))
    writer.start()
    lines = list(app.LineReader(read_fd, limit=4096, chunk=1000))
    writer.join()
    os.close(read_fd)
    assert lines == [(b"a", 0, b""), (None, 300000, b"x" * 1024), (b"", 0, b""),
                     (b"bb", 0, b""), (None, 5000, b"y" * 1024), (b"cc", 0, b"")]


def test_log_throttle_holds_back_a_flood_and_counts_it():
    throttle = rpc.LogThrottle(burst=3, period=60)
    results = [throttle.allow() for _ in range(10)]
    assert results[:3] == [(True, 0)] * 3 and results[3:] == [(False, 0)] * 7
    throttle._window -= 61  # the next period
    assert throttle.allow() == (True, 7)


def test_client_config_maps_librdkafka_names():
    consumer, producer = rpc.client_config({
        "session.timeout.ms": "6000", "fetch.wait.max.ms": "10", "linger.ms": "5",
        "message.max.bytes": "2000000", "acks": "all", "client.id": "c",
        "compression.type": "gzip", "auto.offset.reset": "smallest"})
    assert consumer == {"session_timeout_ms": 6000, "fetch_max_wait_ms": 10, "client_id": "c",
                        "auto_offset_reset": "earliest"}
    assert producer == {"linger_ms": 5, "max_request_size": 2000000, "acks": "all",
                        "client_id": "c", "compression_type": "gzip"}


def test_client_config_hides_secret_values_in_errors():
    with pytest.raises(ValueError) as info:
        rpc.client_config({"sasl.mechanism": "hunter2-mech", "ssl.key.password": "x"})
    assert "hunter2-mech" in str(info.value)  # not a secret: shown
    with pytest.raises(ValueError) as info:
        rpc.client_config({"linger.ms": "-1"})
    assert "negative" in str(info.value)


def _refuses(key, value):
    try:
        rpc.client_config({key: value})
        return False
    except ValueError:
        return True


def test_every_property_maps_to_a_real_argument_or_is_refused_up_front(capsys):
    import kafka
    from kafka import KafkaConsumer, KafkaProducer
    try:
        rpc.check_supported(rpc.PROPERTIES)
        missing = []
    except ValueError as exc:
        missing = str(exc).split(":")[0].split(", ")
    for key, (scope, argument, _) in rpc.PROPERTIES.items():
        if key in missing:
            continue
        if scope in (rpc.CONSUMER, rpc.BOTH):
            assert argument in KafkaConsumer.DEFAULT_CONFIG, key
        if scope in (rpc.PRODUCER, rpc.BOTH):
            assert argument in KafkaProducer.DEFAULT_CONFIG, key
    if int(kafka.__version__.split(".")[0]) >= 3:
        assert missing == []  # kafka-python itself has them all
    else:
        assert missing  # kafka-python-ng 2.2 lacks isolation_level, say
    for key in missing:  # named at start-up (exit 2), not a crash when the consumer starts
        with pytest.raises(SystemExit) as exit_info:
            value = next(v for v in ("read_committed", "true", "1000", "x")
                         if not _refuses(key, v))
            parse(kafka_argv() + ["-X", f"{key}={value}"])
        assert exit_info.value.code == 2
        assert f"{key}: not supported by the installed kafka client" in capsys.readouterr().err


# --- builtin backend -----------------------------------------------------------

class Recorder:
    name = "test"
    store = None

    def __init__(self):
        self.sent = []

    def send(self, message, done=rpc.nothing, route=rpc.DEFAULT_ROUTE):
        self.sent.append(message)
        done()

    def owns(self, route):
        return True


class Exploding(app.Backend):
    """A backend with a bug: it raises on the method "boom"."""

    def handle(self, transport, message, done, route):
        if message.get("method") == "boom":
            raise RuntimeError("a bug")
        transport.send({"id": message["id"], "result": {}}, done, route)


def test_a_failing_message_becomes_its_own_error_and_the_next_is_handled(caplog):
    transport = Recorder()
    processor = app.Processor(Exploding())
    acknowledged = []
    for msg_id, method in ((1, "boom"), (2, "noop")):
        processor.submit(transport, {"id": msg_id, "method": method},
                         lambda msg_id=msg_id: acknowledged.append(msg_id))
    processor.submit(transport, {"method": "boom"}, lambda: acknowledged.append("note"))
    processor.stop(0)
    processor.serve_forever()  # returns once the queue is done: the thread did not die
    assert transport.sent[0]["id"] == 1
    assert transport.sent[0]["error"]["code"] == rpc.INTERNAL_ERROR
    assert transport.sent[1] == {"id": 2, "result": {}}
    assert acknowledged == [1, 2, "note"]  # each is acknowledged, so its offset commits
    assert "internal error handling a request (method boom, id 1)" in caplog.text
    assert "RuntimeError: a bug" in caplog.text  # with the traceback


@pytest.mark.parametrize("allow, deny, allowed, refused", [
    ([], ["account/*", "config/*"], ["thread/start", "accounts"],
     ["account/read", "account/login/start", "config/value/write"]),
    (["thread/*", "turn/*", "initialize"], [], ["thread/start", "turn/start", "initialize"],
     ["command/exec", "initialized", "thread"]),
    (["*"], ["command/exec"], ["thread/start"], ["command/exec"]),  # deny wins
    (["fs/read?ile"], [], ["fs/readFile", "fs/readfile"], ["fs/writeFile", "fs/readFiles"]),
    (["fs/readFile"], [], ["fs/readFile"], ["fs/readfile"]),  # case matters
])
def test_method_policy(allow, deny, allowed, refused):
    policy = app.MethodPolicy(allow, deny)
    assert all(policy.allows(method) for method in allowed)
    assert not any(policy.allows(method) for method in refused)
    assert all(policy.allows(method) for method in allowed)  # (the remembered verdicts)


def test_refused_methods_get_method_not_found_and_notifications_are_dropped(caplog):
    transport = Recorder()
    processor = app.Processor(app.BuiltinBackend(), policy=app.MethodPolicy(deny=["noop"]))
    acknowledged = []
    for message in ({"id": 1, "method": "noop"}, {"method": "noop"},
                    {"id": 2, "method": "initialize"}):
        processor.submit(transport, message, lambda m=message: acknowledged.append(m.get("id")))
    processor.stop(0)
    processor.serve_forever()
    refused, initialized = transport.sent
    assert refused["id"] == 1 and refused["error"]["code"] == rpc.METHOD_NOT_FOUND
    assert refused["error"]["message"] == "method not allowed by this server: noop"
    assert "result" in initialized
    assert acknowledged == [1, None, 2]  # all done: offsets commit past refused ones
    assert caplog.text.count("not allowed by --allow-method/--deny-method") == 2


@pytest.mark.parametrize("flag", ["--allow-method", "--deny-method"])
def test_method_patterns_must_be_patterns(flag, capsys):
    assert "not a method pattern" in usage_error([flag, "a b"], capsys)
    assert "not a method pattern" in usage_error([flag, ""], capsys)
    args = parse([flag, "account/*", flag, "config/*"])
    assert getattr(args, flag[2:].replace("-", "_")) == ["account/*", "config/*"]


def test_a_producer_kafka_python_gave_up_on_is_replaced():
    producer_side = rpc.OrderedProducer({}, "out", frozenset())

    class Manager:
        fatal = False

        def has_fatal_error(self):
            return self.fatal

    class Producer:
        _transaction_manager = Manager()

    producer = Producer()
    assert producer_side._why_fatal(Exception("UnknownError"), producer) is None
    producer._transaction_manager.fatal = True
    assert "kafka-python marked it failed (UnknownError)" in producer_side._why_fatal(
        Exception("UnknownError"), producer)
    # Any other error, when nothing has been acknowledged for a long time, also counts.
    producer._transaction_manager.fatal = False
    producer_side._failing_since = time.monotonic() - rpc.PRODUCER_STUCK_SECONDS - 1
    assert "no send acknowledged" in producer_side._why_fatal(Exception("x"), producer)


class FailedAtOnce:
    """A producer whose every send fails before its errback is added (kafka-python's
    send() can return such a future)."""

    class Future:
        def add_callback(self, callback):
            pass

        def add_errback(self, errback):
            errback(RuntimeError("failed at once"))

    def send(self, *args, **kwargs):
        return self.Future()


def test_a_retry_that_fails_at_once_stays_held_and_backoff_is_bounded(caplog):
    transport = rpc.KafkaTransport("in", "out", None, {"bootstrap.servers": "127.0.0.1:1",
                                                       "group.id": "g"})
    producer = transport.producer
    producer.client = FailedAtOnce()
    acknowledged = []
    transport.send({"id": 1, "result": {}}, lambda: acknowledged.append(1),
                   rpc.Route(partition=0))
    [held] = producer._held.values()
    send = held[0]
    for _ in range(3):
        send.due = 0.0
        producer.resend_due(replace=False)
        assert producer._held and list(producer._held.values())[0][0] is send  # not lost
    assert send.attempt == 4 and not acknowledged
    send.attempt = 5000  # hours of failing: the backoff stays 5 s, no OverflowError
    producer._failed(send, RuntimeError("again"))
    assert send.due <= time.monotonic() + 5.0


def test_builtin_backend_answers_and_acknowledges():
    transport = Recorder()
    backend = app.BuiltinBackend()
    acknowledged = []
    for msg_id, method in ((1, "initialize"), ("n", "noop"), (2, "thread/start")):
        backend.handle(transport, {"id": msg_id, "method": method, "params": {}},
                       lambda msg_id=msg_id: acknowledged.append(msg_id))
    backend.handle(transport, {"method": "initialized"}, rpc.nothing)
    backend.handle(transport, {"id": 9, "result": {}}, rpc.nothing)
    assert acknowledged == [1, "n", 2]  # each request's done travels with its reply
    init, noop, unknown = transport.sent
    assert init["id"] == 1
    assert init["result"]["userAgent"] == f"codex-app-server/{app.__version__} (python)"
    assert init["result"]["platformFamily"] == "unix"
    assert init["result"]["platformOs"] == "linux"
    assert noop == {"jsonrpc": "2.0", "id": "n", "result": {}}
    assert unknown["id"] == 2 and unknown["error"]["code"] == rpc.METHOD_NOT_FOUND
    payload = {"data": "x" * 100000, "n": [1, 2.5, None]}
    backend.handle(transport, {"id": 3, "method": "echo", "params": payload}, rpc.nothing)
    assert transport.sent[-1] == {"jsonrpc": "2.0", "id": 3, "result": payload}


# --- docs match the CLI ----------------------------------------------------------

def help_flags(*command):
    text = subprocess.run([sys.executable, SERVER, *command, "--help"], capture_output=True,
                          text=True, timeout=30).stdout
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+|-[A-Za-z])\b", text)) - {"-h"}


def test_every_proxy_flag_is_documented_in_its_table_and_no_other():
    doc = (ROOT / "docs" / "kafka.md").read_text()
    section = doc.split("`codex-app-server proxy`\n")[1].split("## 4.")[0]
    table = section.split("| Flag |")[1].split("\n\n")[0]
    flags = help_flags("proxy")
    assert {"--kafka-session", "--kafka-reply-topic", "--timeout", "-X"} <= flags
    first_cells = " ".join(row.split("|")[1] for row in table.splitlines()[2:])
    documented = set(re.findall(r"`(--[a-z][a-z0-9-]+|-X)\b", first_cells))
    assert flags - {"--kafka-property", "--version", "--help"} <= documented, flags - documented
    assert documented <= flags, documented - flags


def test_every_help_flag_is_documented_and_every_documented_flag_exists():
    doc = (ROOT / "docs" / "kafka.md").read_text()
    readme = (ROOT / "README.md").read_text()
    flags = help_flags()
    assert {"--kafka-bootstrap-servers", "-X", "--stdio", "--backend"} <= flags
    for flag in flags:
        assert re.search(rf"`{re.escape(flag)}\b", doc), f"{flag} missing from docs/kafka.md"
    # Flags in the CLI table and examples of the docs must exist (other tools' flags are
    # quoted in other sections and tagged by their command).
    table = doc.split("## 2.")[1].split("## 3.")[0]
    documented = set(re.findall(r"`(--[a-z][a-z0-9-]+|-X)\b", table))
    assert documented, "the CLI section lists no flags"
    assert documented <= flags | {"--help"}, documented - flags
    for flag in re.findall(r"codex-app-server[^\n`]*?((?:--[a-z][a-z0-9-]+))", readme):
        assert flag in flags, f"README uses unknown flag {flag}"


# --- configuration sources and secrets ---------------------------------------------

def test_precedence_flags_over_x_over_env_over_file(tmp_path, monkeypatch):
    config = tmp_path / "client.properties"
    config.write_text("# written for kcat\nbootstrap.servers=file:1\ngroup.id=file-group\n"
                      "linger.ms=1\nfetch.wait.max.ms=1\nsasl.username=file-user\n"
                      "security.protocol=PLAINTEXT\n! another comment\n\n")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "env-user")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    args = parse(["--kafka-config", str(config), "--kafka-input-topic", "in",
                  "--kafka-output-topic", "out", "-X", "linger.ms=7",
                  "-X", "sasl.username=x-user", "-X", "bootstrap.servers=x:2",
                  "--kafka-bootstrap-servers", "flag:3"])
    props = args.kafka_properties
    assert props["bootstrap.servers"] == "flag:3"  # flag > -X > file
    assert props["group.id"] == "file-group"  # only the file has it: stands in for the flag
    assert props["linger.ms"] == "7" and props["fetch.wait.max.ms"] == "1"
    assert props["sasl.username"] == "x-user"  # -X > env > file
    assert props["security.protocol"] == "SASL_PLAINTEXT"  # env > file


def test_config_file_errors_name_every_unknown_key(tmp_path, capsys):
    config = tmp_path / "bad.properties"
    config.write_text("no.such=1\nlinger.ms=5\nother.unknown=2\n")
    err = usage_error(kafka_argv() + ["--kafka-config", str(config)], capsys)
    assert "no.such: unknown property" in err and "other.unknown: unknown property" in err
    config.write_text("just a line\n")
    assert "line 1: expected key=value" in usage_error(
        kafka_argv() + ["--kafka-config", str(config)], capsys)
    assert "--kafka-config" in usage_error(
        kafka_argv() + ["--kafka-config", str(tmp_path / "missing")], capsys)


@pytest.mark.parametrize("env, expected", [
    ({"KAFKA_SSL_CA": "/ca.pem"}, {"security.protocol": "SSL"}),
    ({"KAFKA_SSL_CERT": "/c.pem", "KAFKA_SSL_KEY": "/k.pem"}, {"security.protocol": "SSL"}),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"},
     {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN"}),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p", "KAFKA_SSL_CA": "/ca.pem",
      "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"},
     {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SASL_USERNAME": "u"},
     {"security.protocol": "SSL"}),
])
def test_environment_and_inferred_security(env, expected, monkeypatch):
    for name in rpc.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    props = parse(kafka_argv()).kafka_properties
    for key, value in expected.items():
        assert props[key] == value
    assert rpc.environment_properties(env).keys() <= props.keys()


def test_every_sasl_and_ssl_setting_maps_to_kafka_python():
    consumer, producer = rpc.client_config({
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "alice", "sasl.password": "pw", "ssl.ca.location": "/ca",
        "ssl.certificate.location": "/cert", "ssl.key.location": "/key",
        "ssl.key.password": "kp", "ssl.endpoint.identification.algorithm": "none"})
    expected = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
                "sasl_plain_username": "alice", "sasl_plain_password": "pw",
                "ssl_cafile": "/ca", "ssl_certfile": "/cert", "ssl_keyfile": "/key",
                "ssl_password": "kp", "ssl_check_hostname": False}
    assert consumer == expected and producer == expected
    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        assert rpc.client_config({"sasl.mechanisms": mechanism})[0]["sasl_mechanism"] == mechanism
    with pytest.raises(ValueError):
        rpc.client_config({"sasl.mechanism": "GSSAPI"})


def test_secrets_are_redacted_in_settings_line_errors_and_logs(capsys, monkeypatch):
    assert rpc.redacted({"sasl.password": "hunter2", "ssl.key.password": "kp",
                         "sasl.username": "alice"}) == \
        "sasl.password=***, sasl.username=alice, ssl.key.password=***"
    err = usage_error(kafka_argv() + ["-X", "sasl.password=hunter2", "-X", "linger.ms=x"],
                      capsys)
    assert "hunter2" not in err
    # The log filter masks a secret whoever logs it (kafka-python at DEBUG included).
    import logging
    handler = logging.StreamHandler()
    handler.addFilter(app._Redact(["hunter2"]))
    record = logging.LogRecord("kafka.conn", logging.DEBUG, __file__, 1,
                               "auth with %s failed", ("hunter2",), None)
    handler.filter(record)
    assert record.getMessage() == "auth with *** failed"
    help_text = subprocess.run([sys.executable, SERVER, "--help"], capture_output=True, text=True,
                               env={"KAFKA_SASL_PASSWORD": "hunter2", "PATH": "/usr/bin"},
                               timeout=30).stdout
    assert "hunter2" not in help_text


def test_offset_tracker_commits_only_up_to_the_first_unfinished():
    tracker = rpc.OffsetTracker()
    done = dict(zip(range(10, 15), tracker.taken("p0", list(range(10, 15)))))
    assert tracker.commit_points() == {"p0": 10}  # nothing done yet
    done[11]()
    done[12]()
    assert tracker.commit_points() == {}  # 10 still open: the point has not moved
    done[10]()
    assert tracker.commit_points() == {"p0": 13}  # 10..12 done, in any order
    tracker.commit_failed({"p0": 13})
    assert tracker.commit_points() == {"p0": 13}  # a failed commit is asked again
    done[14]()
    done[13]()
    assert tracker.commit_points() == {"p0": 15}
    [late] = tracker.taken("p1", [0])
    tracker.forget(["p1"])
    late()  # done after a revoke: ignored, no error
    assert tracker.commit_points() == {}


def test_offset_tracker_ignores_done_from_before_a_revoke():
    # Eager rebalances revoke and hand back the same partition: records still queued at
    # the revoke are read again, and their old done() may run after the new ones exist.
    tracker = rpc.OffsetTracker()
    old = tracker.taken("p0", [5, 6])
    tracker.forget(["p0"])
    new = tracker.taken("p0", [5, 6])
    old[0]()
    old[1]()
    assert tracker.commit_points() == {"p0": 5}  # the old dones moved nothing
    new[0]()
    new[0]()  # twice: no error, no effect
    new[1]()
    assert tracker.commit_points() == {"p0": 7}


# --- the Codex backend's sessions, against a scripted Codex connection ------------
# (The real Codex is in test_codex.py and test_sessions.py; these drive the interleavings
# a real Codex cannot be made to produce on demand.)

class ScriptedWebSocket:
    """The websockets connection's surface the backend uses; ``answer(message)`` gives
    Codex's messages in reply to each one sent."""

    def __init__(self, answer):
        self.answer = answer
        self.sent = []
        self.incoming = __import__("queue").Queue()
        self.socket = self

    def send(self, data, text=None):
        message = json.loads(data)
        self.sent.append(message)
        for reply in self.answer(message):
            self.incoming.put(json.dumps(reply).encode())

    def recv(self, decode=None):
        data = self.incoming.get()
        if data is None:
            raise EOFError("closed")
        return data

    def shutdown(self, how):
        self.incoming.put(None)

    def close(self):
        self.incoming.put(None)


class ScriptedCodex:
    """CodexProcess's surface: every connect() a new scripted connection."""

    class Alive:
        def wait(self, timeout=None):
            raise subprocess.TimeoutExpired("codex", timeout)

    def __init__(self, answer):
        self.answer = answer
        self.users = 0
        self.starts = 1
        self.process = None  # (no process of its own)
        self.sockets = []

    def connect(self):
        self.sockets.append(ScriptedWebSocket(self.answer))
        return self.sockets[-1], self.Alive()

    def stop(self, deadline):
        pass


def wait_for(predicate, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_codex_overload_is_retried_not_passed_on():
    attempts = []

    def answer(message):
        if message.get("method") == "x":
            attempts.append(message["id"])
            if len(attempts) < 3:
                return [{"id": message["id"], "error": {"code": -32001,
                                                        "message": "Server overloaded"}}]
            return [{"id": message["id"], "result": {"ok": True}}]
        return []
    transport = Recorder()
    backend = app.CodexBackend(ScriptedCodex(answer), 10, 0)
    backend.handle(transport, {"id": 7, "method": "x", "params": {}})
    wait_for(lambda: transport.sent, "no reply")
    assert transport.sent == [{"id": 7, "result": {"ok": True}}]
    assert len(attempts) == 3 and len(set(attempts)) == 1, attempts


def test_codex_overload_holds_back_only_the_request_it_answers():
    """A "retry later" must not stop the session's reader: the reply to the next request
    reaches the client before the overloaded one is sent again."""
    events = []

    def answer(message):
        events.append(("codex got", message.get("method"), message["id"]))
        if message.get("method") == "a" and len([e for e in events if e[1] == "a"]) == 1:
            return [{"id": message["id"], "error": {"code": -32001, "message": "overloaded"}}]
        return [{"id": message["id"], "result": {}}]

    class Client(Recorder):
        def send(self, message, done=rpc.nothing, route=rpc.DEFAULT_ROUTE):
            events.append(("client got", message["id"]))
            super().send(message, done, route)
    transport = Client()
    backend = app.CodexBackend(ScriptedCodex(answer), 10, 0)
    backend.handle(transport, {"id": "A", "method": "a", "params": {}})
    backend.handle(transport, {"id": "B", "method": "b", "params": {}})
    wait_for(lambda: len(transport.sent) == 2, "no replies")
    retried = next(n for n, e in enumerate(events) if e[:2] == ("codex got", "a")
                   and n > events.index(next(e for e in events if e[1] == "a")))
    assert events.index(("client got", "B")) < retried, events
    assert backend.stats()["codex_overloaded"] == 1


def test_an_answered_request_outside_a_thread_leaves_the_session_idle():
    def answer(message):
        if message.get("method") == "ask":  # Codex asks the client, outside any thread
            return [{"id": 0, "method": "account/chatgptAuthTokens/refresh", "params": {}},
                    {"id": message["id"], "result": {}}]
        return []
    transport = Recorder()
    backend = app.CodexBackend(ScriptedCodex(answer), 10, 0)
    backend.handle(transport, {"id": 1, "method": "ask", "params": {}}, route=rpc.Route(b"s"))
    wait_for(lambda: len(transport.sent) == 2, "no request and reply")
    asked = next(m for m in transport.sent if "method" in m)
    session = backend.table.find(transport, b"s")
    assert not session.idle()  # Codex waits for the client's answer
    backend.handle(transport, {"id": asked["id"], "result": {"accessToken": "t"}},
                   route=rpc.Route(b"s"))
    assert session.idle()
    codex_side = backend.codex.sockets[0].sent[-1]
    assert codex_side == {"id": 0, "result": {"accessToken": "t"}}, codex_side


def test_an_approval_is_answered_only_by_the_session_it_was_asked_of(caplog):
    def answer(message):
        if message.get("method") == "ask":
            return [{"id": 0, "method": "item/commandExecution/requestApproval",
                     "params": {"threadId": "t"}}]
        return []
    transport, other = Recorder(), Recorder()
    backend = app.CodexBackend(ScriptedCodex(answer), 10, 0, shared_threads=True)  # (t: nobody's)
    backend.handle(transport, {"id": 1, "method": "ask", "params": {}}, route=rpc.Route(b"a"))
    wait_for(lambda: transport.sent, "no approval request")
    asked = transport.sent[0]["id"]
    for who, key in ((transport, b"b"), (other, b"a"), (transport, None)):
        backend.handle(who, {"id": asked, "result": {"decision": "accept"}},
                       route=rpc.Route(key))
    codex_side = backend.codex.sockets[0].sent
    assert [m for m in codex_side if "result" in m] == [], codex_side
    assert caplog.text.count("asked of another session") == 3
    backend.handle(transport, {"id": asked, "result": {"decision": "accept"}},
                   route=rpc.Route(b"a"))
    assert codex_side[-1] == {"id": 0, "result": {"decision": "accept"}}, codex_side


def test_server_requests_alone_one_record_found_by_either_id():
    """ServerRequests without a backend: the client's id is new to the server, an answer
    counts once and only from the session asked, and the request stays open (for idle())
    until Codex resolves one that names a thread."""
    requests, transport = app.ServerRequests(), Recorder()
    alice, bob = app.Session(transport, b"alice"), app.Session(transport, b"bob")
    named = requests.ask(alice, "conn-a", {"id": 0, "method": "approve",
                                          "params": {"threadId": "t"}})
    plain = requests.ask(alice, "conn-a", {"id": 1, "method": "approve", "params": {}})
    assert named["id"] != 0 and plain["id"] > named["id"]
    assert requests.answered(transport, b"bob", named["id"]) is None  # not bob's to answer
    asked = requests.answered(transport, b"alice", named["id"])
    assert (asked.connection, asked.codex_id) == ("conn-a", 0)
    assert requests.answered(transport, b"alice", named["id"]) is None  # once
    assert not alice.idle()  # the other one is unanswered
    assert alice.asked[0].answered  # its serverRequest/resolved is still to come
    assert requests.resolved(alice, 0) == named["id"] and 0 not in alice.asked
    assert requests.resolved(bob, 1) is None  # Codex's id means nothing in another session
    assert [a.id for a in requests.withdraw(alice)] == [plain["id"]]
    assert requests.answered(transport, b"alice", plain["id"]) is None and alice.idle()


def test_the_session_table_alone_admits_up_to_its_bound_closing_the_least_recently_used():
    table = app.SessionTable(threading.Condition(), 2, 0, 0, 10)
    transport = Recorder()
    first, second, third = (table.session_for(transport, rpc.Route(key), True)
                            for key in (b"1", b"2", b"3"))
    assert table.find(transport, b"2") is second and first.confined
    with table.lock:
        for session in (first, second):
            assert table.wait_to_admit(session) is None
            session.connection = f"connection of {session.key.decode()}"
        table.touch(first)  # second is now the least recently used
        second.calls[1] = "busy"
        assert table.wait_to_admit(third) == "connection of 1"  # (second is not idle)
        assert first.connection is None and table.stats()["sessions"] == 2
        fourth = table.session_for(transport, rpc.Route(b"4"), True)
        third.connection = "connection of 3"
        third.calls[1] = "busy"
        start = time.monotonic()
        assert table.wait_to_admit(fourth) is False  # every one busy: refused, after a wait
        assert time.monotonic() - start >= app.SESSION_WAIT * 0.9


def test_a_saved_session_state_round_trips_and_garbage_is_ignored(caplog):
    session = app.Session(None, b"k")
    session.init_params, session.init_result = {"clientInfo": {"name": "t"}}, {"userAgent": "u"}
    session.initialized = True
    session.threads = dict.fromkeys(["t1", "t2"])
    restored = app.Session(None, b"k")
    restored.restore(session.state())
    assert (restored.init_params, restored.init_result, restored.initialized,
            list(restored.threads)) == (session.init_params, session.init_result, True,
                                        ["t1", "t2"])
    own = []
    assert len(restored.replay(lambda method, params: own.append(method) or b"")) == 4
    assert own == ["initialize", "thread/resume", "thread/resume"]
    for garbage in (b"\xff", b"[]", b'{"threads": 5}', b"null", b'{"initialize": {}}'):
        fresh = app.Session(None, b"k")
        fresh.restore(garbage)
        assert fresh.init_result is None and fresh.threads == {}
    assert caplog.text.count("ignoring its saved state") == 5


def test_the_reaper_closes_idle_sessions_only_and_they_reopen_with_their_state():
    held = []

    def answer(message):
        if message.get("method") == "initialize":
            return [{"id": message["id"], "result": {"userAgent": "scripted"}}]
        if message.get("method") == "slow":
            held.append(message)  # answered later
            return []
        return [{"id": message["id"], "result": {}}]
    transport = Recorder()
    codex = ScriptedCodex(answer)
    backend = app.CodexBackend(codex, 10, 0.2)
    init = {"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "t"}}}
    for key in (b"busy", b"idle"):
        backend.handle(transport, dict(init), route=rpc.Route(key))
    backend.handle(transport, {"id": 2, "method": "slow", "params": {}}, route=rpc.Route(b"busy"))
    wait_for(lambda: backend.table.find(transport, b"idle").connection is None, "idle not closed")
    time.sleep(0.5)
    assert backend.table.find(transport, b"busy").connection is not None  # something in flight
    backend.handle(transport, {"id": 3, "method": "again", "params": {}}, route=rpc.Route(b"idle"))
    wait_for(lambda: len(codex.sockets) == 3 and len(codex.sockets[-1].sent) == 2,
             "the session not reopened")  # (by a connector thread of its own)
    reopened = codex.sockets[-1].sent
    assert [m.get("method") for m in reopened] == ["initialize", "again"], reopened
    assert reopened[0]["params"] == init["params"]
    wait_for(lambda: len(transport.sent) == 3, "no reply to the reopened session")
    assert transport.sent[-1] == {"id": 3, "result": {}}


def test_librdkafka_only_properties_are_ignored_with_a_reason_and_typos_refused(capsys,
                                                                               tmp_path):
    config = tmp_path / "kcat.properties"  # as written for the Rust server or kcat
    config.write_text("socket.keepalive.enable=true\napi.version.request=true\n"
                      "enable.partition.eof=false\nlog_level=6\ndebug=cgrp\n"
                      "statistics.interval.ms=60000\nsession.timeout.ms=10000\n")
    args = parse(kafka_argv() + ["--kafka-config", str(config)])
    assert args.stats_interval == 60.0
    ignored = dict(rpc.ignored_properties(args.kafka_properties))
    assert ignored == {"socket.keepalive.enable": "kafka-python has no such setting",
                       "api.version.request": "kafka-python has no such setting",
                       "enable.partition.eof": "kafka-python has no such setting",
                       "log_level": "the server's log level is --log-level",
                       "debug": "the server's log level is --log-level"}, ignored
    consumer, _ = rpc.client_config(args.kafka_properties)
    assert consumer["session_timeout_ms"] == 10000 and "debug" not in consumer
    with pytest.raises(SystemExit):
        parse(kafka_argv() + ["-X", "sesion.timeout.ms=1000"])
    assert "sesion.timeout.ms: unknown property (did you mean session.timeout.ms?)" in \
        capsys.readouterr().err
    assert {"socket.keepalive.enable", "queued.min.messages", "ssl.ca.pem",
            "partition.assignment.strategy"} <= rpc.LIBRDKAFKA_ONLY
    assert not rpc.LIBRDKAFKA_ONLY & (set(rpc.PROPERTIES) | set(rpc.RESERVED))


def test_librdkafka_secrets_aliases_and_tls_settings(capsys):
    shown = rpc.redacted({"sasl.oauthbearer.client.secret": "s3cr3t", "ssl.key.pem": "-----BEGIN",
                          "ssl.keystore.password": "hunter2", "linger.ms": "5"})
    assert "s3cr3t" not in shown and "BEGIN" not in shown and "hunter2" not in shown, shown
    assert "linger.ms=5" in shown
    args = parse(["--kafka-input-topic", "in", "--kafka-output-topic", "out",
                  "--kafka-group-id", "g", "-X", "metadata.broker.list=h:9092",
                  "-X", "fetch.message.max.bytes=2048"])
    consumer, producer = rpc.client_config(args.kafka_properties)
    assert consumer["bootstrap_servers"] == ["h:9092"]
    assert consumer["max_partition_fetch_bytes"] == 2048
    for setting in ("ssl.ca.pem=x", "enable.ssl.certificate.verification=false",
                    "transactional.id=t"):
        with pytest.raises(SystemExit):
            parse(kafka_argv() + ["-X", setting])
        err = capsys.readouterr().err
        assert setting.split("=")[0] in err and ("cannot honour" in err or "transactions" in err)


def test_server_request_ids_never_repeat_and_follow_the_clock(monkeypatch):
    """A burst of ids runs ahead of the clock, never back; a later run (another server,
    or this one restarted) starts at its own clock, past every id it could meet."""
    now = [1_700_000_000.0]
    monkeypatch.setattr(app.time, "time", lambda: now[0])
    ids = app.RequestIds()
    burst = [next(ids) for _ in range(1000)]  # faster than one a microsecond
    assert burst == list(range(burst[0], burst[0] + 1000))
    now[0] += 10.0
    later = next(ids)
    assert later == int(now[0] * 1_000_000) > burst[-1]
    assert later < 2 ** 53


def test_big_unacknowledged_replies_pause_the_input_until_half_are_acknowledged():
    """Replies held for a retry are bounded in bytes as well as in number: a few thousand
    big ones pause the input (kafka-python's producer buffers without a bound of its own)."""
    class Sink:
        def offer(self, transport, items):
            return len(items)

        def has_room(self):
            return True

    class Future:
        def __init__(self):
            self.callbacks = []

        def add_callback(self, callback):
            self.callbacks.append(callback)

        def add_errback(self, errback):
            pass

    class Producer:
        def __init__(self):
            self.futures = []

        def send(self, *args, **kwargs):
            self.futures.append(Future())
            return self.futures[-1]

        def partitions_for(self, topic):
            return {0}

    class Consumer:
        paused_now = ()

        def assignment(self):
            return {"in-0"}

        def pause(self, *partitions):
            self.paused_now = partitions

        def paused(self):
            return self.paused_now

        def resume(self, *partitions):
            self.paused_now = ()

    transport = rpc.KafkaTransport("in", "out", Sink(), {"bootstrap.servers": "127.0.0.1:1",
                                                         "group.id": "g"})
    transport.producer.client, consumer = Producer(), Consumer()
    reply = {"id": 1, "result": {"data": "x" * 100_000}}
    for _ in range(700):  # 70 MB, far below the 10,000 records bound
        transport.send(dict(reply), route=rpc.Route(b"s"))
    transport.intake.offer(consumer)
    assert transport.intake.paused and consumer.paused_now == ("in-0",)
    assert transport.stats()["unacknowledged_bytes"] > 64 * 1024 * 1024
    for future in transport.producer.client.futures[:400]:
        future.callbacks[0](None)  # acknowledged: 30 MB left
    transport.intake.offer(consumer)
    assert not transport.intake.paused


def test_a_confined_session_names_only_its_own_threads():
    session = app.Session(None, b"alice")
    session.confined = True
    mine, theirs = "01a23abe-abd5-7ee0-8345-d2034c84f338", "01a23abe-abd5-7ee0-8345-d2034c84f339"
    session.owned[mine] = None
    request = {"id": 1, "method": "thread/list", "params": {
        "includedThreadIds": [mine, theirs, mine.upper()], "parentThreadId": "not-a-uuid",
        "thread_id": theirs, "cwd": theirs}}
    sent, fakes = session.confine(request)
    params = sent["params"]
    assert params["includedThreadIds"][0] == mine and params["includedThreadIds"][2] == \
        mine.upper()
    assert set(fakes.values()) == {theirs, "not-a-uuid"} and len(fakes) == 3
    assert params["parentThreadId"] in fakes and params["thread_id"] in fakes
    assert params["cwd"] == theirs  # not a thread parameter
    assert request["params"]["thread_id"] == theirs  # the client's request is untouched
    call = app.Call(request, rpc.nothing, rpc.DEFAULT_ROUTE, 0.0)
    call.fakes = fakes
    fake = params["parentThreadId"]
    error = session.unconfine(call, {"id": 5, "error": {"code": -32600,
                                                         "message": f"not found: {fake}"}})
    assert error["error"]["message"] == "not found: not-a-uuid"
    listing = session.unconfine(call, {"id": 5, "result": {
        "data": [{"id": mine}, {"id": theirs}], "readStates": {mine: 1, theirs: 2}}})
    assert listing["result"] == {"data": [{"id": mine}], "readStates": {mine: 1}}
    assert isinstance(session.confine({"id": 2, "method": "thread/read",
                                       "params": [theirs]})[0], str)
    assert session.may_see({"thread": {"id": mine}}) and not session.may_see(
        {"threadId": theirs}) and session.may_see({"other": 1})
    shared = app.Session(None, b"bob")  # not confined: as upstream
    assert shared.confine(request) == (request, {})


ALICE_THREAD = "01a23abe-abd5-7ee0-8345-d2034c84f338"


def test_a_retried_request_keeps_the_thread_ids_it_was_confined_to():
    """Codex's "retry later", then the resend: still the fake id, never alice's."""
    seen = []

    def answer(message):
        if message.get("method") != "thread/read":
            return []
        seen.append(message["params"]["threadId"])
        if len(seen) == 1:
            return [{"id": message["id"], "error": {"code": -32001, "message": "overloaded"}}]
        return [{"id": message["id"], "error": {
            "code": -32600, "message": "thread not loaded: " + message["params"]["threadId"]}}]
    transport = Recorder()
    backend = app.CodexBackend(ScriptedCodex(answer), 10, 0)
    backend.handle(transport, {"id": 1, "method": "thread/read",
                               "params": {"threadId": ALICE_THREAD}}, route=rpc.Route(b"mallory"))
    wait_for(lambda: transport.sent, "no reply")
    assert len(seen) == 2 and ALICE_THREAD not in seen and seen[0] == seen[1], seen
    assert transport.sent == [{"id": 1, "error": {
        "code": -32600, "message": "thread not loaded: " + ALICE_THREAD}}]


def test_any_string_in_a_thread_parameter_comes_back_in_the_error_as_sent():
    def answer(message):
        if message.get("method") == "thread/read":
            return [{"id": message["id"], "error": {
                "code": -32600, "message": "thread not loaded: " + message["params"]["threadId"],
                "data": {"ids": [message["params"]["threadId"]]}}}]
        return []
    transport = Recorder()
    backend = app.CodexBackend(ScriptedCodex(answer), 10, 0)
    odd = 'a"b\\c\n{"x":1}'
    backend.handle(transport, {"id": 2, "method": "thread/read", "params": {"threadId": odd}},
                   route=rpc.Route(b"m"))
    wait_for(lambda: transport.sent, "no reply")
    assert transport.sent[0]["error"] == {"code": -32600, "message": "thread not loaded: " + odd,
                                          "data": {"ids": [odd]}}


def test_an_overloaded_request_of_a_new_connection_is_sent_again():
    """A resend due for a lost connection does not take the next connection's with it."""
    calls = []

    def answer(message):
        if message.get("method") == "x":
            calls.append(message["id"])
            if len(calls) <= 2:
                return [{"id": message["id"], "error": {"code": -32001, "message": "later"}}]
            return [{"id": message["id"], "result": {}}]
        return []
    transport = Recorder()
    codex = ScriptedCodex(answer)
    backend = app.CodexBackend(codex, 10, 0)
    backend.handle(transport, {"id": "A", "method": "x", "params": {}}, route=rpc.Route(b"s"))
    wait_for(lambda: len(calls) == 1, "A not sent")
    codex.sockets[0].close()  # connection 1 lost while A waits for its resend
    wait_for(lambda: transport.sent, "A not answered by the loss")
    backend.handle(transport, {"id": "B", "method": "x", "params": {}}, route=rpc.Route(b"s"))
    wait_for(lambda: any(m.get("id") == "B" for m in transport.sent), "B stranded")
    assert [m for m in transport.sent if m.get("id") == "B"] == [{"id": "B", "result": {}}]
    assert backend.stats()["in_flight"] == 0


class DeniedProducer:
    """A producer whose sends can fail once, and whose metadata of topic "rt" the ACLs can
    deny (kafka-python raises that at once, from send's metadata wait)."""

    class Future:
        def __init__(self, error=None):
            self.error, self.callbacks = error, []

        def add_callback(self, callback):
            self.callbacks.append(callback)

        def add_errback(self, errback):
            if self.error is not None:
                errback(self.error)

    def __init__(self):
        self.deny, self.fail_next, self.sent = False, None, []

    def partitions_for(self, topic):
        from kafka import errors
        if self.deny and topic == "rt":
            raise errors.TopicAuthorizationFailedError({"rt"})
        return {0, 1}

    def send(self, topic, **kwargs):
        future, self.fail_next = self.Future(self.fail_next), None
        self.sent.append((topic, kwargs["value"], future))
        return future


@pytest.mark.parametrize("message", [{"id": 7, "result": {}}, {"method": "n", "params": {}}])
def test_a_retry_the_acls_deny_is_settled_once(message):
    """A reply held for a retry whose reply topic the ACLs then deny becomes one error reply
    on the output topic; a notification is given up once; either way done runs once and
    nothing stays held."""
    from kafka import errors
    transport = rpc.KafkaTransport("in", "out", None, {"bootstrap.servers": "127.0.0.1:1",
                                                       "group.id": "g"})
    transport.producer._denied_errors = (errors.TopicAuthorizationFailedError,)
    producer = transport.producer.client = DeniedProducer()
    dones = []
    producer.fail_next = errors.KafkaTimeoutError("slow")
    transport.send(message, lambda: dones.append(1), rpc.Route(b"s", topic="rt"))
    producer.deny = True
    for _ in range(3):
        for lane in transport.producer._held.values():
            for held in lane:
                held.due = 0.0
        transport.producer.resend_due(replace=False)
    for topic, _, future in producer.sent[1:]:
        assert topic == "out"
        for callback in future.callbacks:
            callback(None)
    to_out = [value for topic, value, _ in producer.sent if topic == "out"]
    assert len(to_out) == (1 if "id" in message else 0), to_out
    assert dones == [1] and transport.producer.unacked == 0 and transport.producer._held == {}
