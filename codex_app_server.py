"""codex-app-server: the Codex app-server JSON-RPC protocol over stdio and Apache Kafka.

Run ``python codex_app_server.py --help`` (``... proxy --help`` for the proxy).  Stdio
needs only the standard library; the Kafka transport (``kafka_transport.py``, next to
this file) needs kafka-python, imported only when a Kafka flag is given.

Shape, after CPython's socketserver: each transport runs a blocking loop in its own thread
(``serve_forever``; ``shutdown`` from another).  Kafka's and stdio's requests go into the
``Processor``'s one bounded queue (Kafka keeps what does not fit in its own backlog and
pauses); clients' answers to Codex's requests skip the queue (``Processor.answer``), since
Codex may hold the very requests that fill it until it has them.  The processor thread
hands each message to the server's one backend; the Codex backend passes it on to its
session's connection (opened by a connector thread of the session's own) and each
connection's reader thread sends what Codex answers straight back to the transport, with
the route the request came with.  A shutdown Event stops intake, the processor drains,
the backend finishes, then the transports flush, commit and close.

Sections, in reading order: command line (the server's flags, and the proxy's); server
(``Server`` with its statistics line, ``SystemdNotifier``, ``Processor``,
``MethodPolicy``); stdio (``StdioTransport``, ``LineReader``); backends:
``BuiltinBackend``, ``Proxy`` (stdio to a server through Kafka), and the Codex backend:
``CodexBackend`` (the routing of calls) with its collaborators ``SessionCloser``,
``OverloadRetry``, ``Connector``, ``SessionTable``, ``ServerRequests``; every client's
``Session``, its ``CodexConnection`` (a WebSocket), and the one ``CodexProcess`` (``codex
app-server --listen unix://``).

A Kafka request's path: ``Processor.serve_forever`` -> ``CodexBackend.handle`` (its
``Session`` from the ``SessionTable``) -> ``_offer`` -> ``deliver`` (a ``Call`` under an id
of the connection's) -> ``CodexConnection.send``; Codex's reply -> the connection's reader
-> ``CodexBackend.from_codex`` (the client's id back; the session's state saved when it
changed) -> ``transport.send(reply, done, route)``.
"""

import argparse
import collections
import fnmatch
import functools
import inspect
import itertools
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import kafka_transport as rpc

__version__ = "0.1.0"

log = logging.getLogger("codex_app_server")

Message = Dict[str, Any]

# Flags that are Kafka client properties: the top layer over file, environment and -X.
KAFKA_PROPERTY_FLAGS = {"kafka_bootstrap_servers": "bootstrap.servers",
                        "kafka_group_id": "group.id", "kafka_client_id": "client.id",
                        "kafka_offset_reset": "auto.offset.reset"}
KAFKA_FLAGS = tuple(KAFKA_PROPERTY_FLAGS) + (
    "kafka_input_topic", "kafka_output_topic", "kafka_property", "kafka_config",
    "kafka_connect_timeout", "kafka_max_message_bytes", "kafka_dead_letter_topic",
    "kafka_reply_topic_pattern", "stats_topic", "kafka_session_topic")
DEFAULT_CODEX_COMMAND = "codex app-server"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # Kafka's default record limit is 1 MiB
CODEX_LINE_LIMIT = 64 * 1024 * 1024  # Codex's replies (a thread's history, a file) can be big


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: parse flags, serve until shutdown, return the exit status.
    ``codex-app-server proxy ...`` runs the proxy (stdio to a server through Kafka)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    proxy = argv[:1] == ["proxy"]
    parser = build_parser(proxy)
    args = parse_args(parser, argv[1:] if proxy else argv)
    configure_logging(args.log_level, secrets=[
        value for key, value in getattr(args, "kafka_properties", {}).items()
        if rpc.is_secret(key)])
    if proxy:
        proxy_backend = Proxy(args.timeout, args.kafka_reply_topic or args.kafka_output_topic,
                              args.kafka_input_topic)
        server = Server(proxy_backend, shutdown_timeout=5.0,
                        max_message_bytes=args.max_message_bytes)
        proxy_backend.kafka = server.add_kafka(args)
        proxy_backend.stdio = server.add_stdio(after=proxy_backend.kafka.ready, proxy=True)
    else:
        policy = MethodPolicy(args.allow_method or (), args.deny_method or ()) \
            if args.allow_method or args.deny_method else None
        server = Server(backend_for(args, parser),
                        shutdown_timeout=args.shutdown_timeout, queue_size=args.queue_size,
                        max_message_bytes=args.max_message_bytes, policy=policy,
                        stats_interval=args.stats_interval)
        if args.kafka:
            server.add_kafka(args)
        if args.stdio:
            server.add_stdio()
    server.install_signal_handlers()
    return server.serve_forever()


# --- command line ----------------------------------------------------------

def build_parser(proxy: bool = False) -> argparse.ArgumentParser:
    """The server's flags, or with ``proxy`` those of ``codex-app-server proxy``: the same
    Kafka flags and property sources, so one properties file serves both ends."""
    if proxy:
        parser = argparse.ArgumentParser(
            prog="codex-app-server proxy",
            description="Speak the Codex app-server protocol on stdin/stdout, like 'codex "
                        "app-server', and carry it over Kafka to a codex-app-server: any Codex "
                        "client drives a remote Codex.")
        kafka = parser.add_argument_group("Kafka", "The bootstrap servers and both topics are "
                                                   "required; the topics are the server's.")
    else:
        parser = argparse.ArgumentParser(
            prog="codex-app-server",
            description="Carry the Codex app-server JSON-RPC protocol over stdio and Apache "
                        "Kafka topics. Without Kafka flags, serve stdio only. 'codex-app-server "
                        "proxy --help': the client side.")
        kafka = parser.add_argument_group(
            "Kafka", "Any Kafka flag enables the Kafka transport; the bootstrap servers, both "
                     "topics and the group id are then required.")
    kafka.add_argument("--kafka-bootstrap-servers", metavar="HOST:PORT[,...]", type=_servers,
                       help="comma-separated broker list")
    kafka.add_argument("--kafka-input-topic", metavar="TOPIC", type=_topic,
                       help="topic the server reads: where the requests go" if proxy else
                       "topic carrying inbound JSON-RPC messages")
    kafka.add_argument("--kafka-output-topic", metavar="TOPIC", type=_topic,
                       help="topic the server writes: where the replies are read" if proxy
                       else "topic for outbound responses and notifications")
    if proxy:
        kafka.add_argument("--kafka-session", metavar="ID", type=_session,
                           help="the session: the record key of everything sent, and the "
                                "codex-session header of everything read (default: a fresh "
                                "random id per run; a client that comes back to its threads "
                                "passes the same id each time: a thread is its session's)")
        kafka.add_argument("--kafka-reply-topic", metavar="TOPIC", type=_topic,
                           help="have the server reply on this topic (kafka_replyTopic "
                                "header) and read it instead of the output topic")
    else:
        kafka.add_argument("--kafka-group-id", metavar="GROUP", type=_nonempty,
                           help="consumer group of this server")
    kafka.add_argument("--kafka-client-id", metavar="ID", type=_nonempty,
                       help="client id of consumer and producer (default: codex-app-server%s)"
                            % ("-proxy" if proxy else ""))
    if not proxy:
        kafka.add_argument("--kafka-offset-reset", choices=("latest", "earliest"),
                           help="where a group without committed offsets starts "
                                "(default: latest)")
    kafka.add_argument("--kafka-max-message-bytes", metavar="BYTES", type=_message_bytes,
                       help="largest record produced; a larger %s becomes a JSON-RPC error "
                            "(default: 1048576)" % ("message" if proxy else "reply"))
    if not proxy:
        kafka.add_argument("--kafka-dead-letter-topic", metavar="TOPIC", type=_topic,
                           help="send every unusable input record here, unchanged, with "
                                "headers naming its origin and the reason")
        kafka.add_argument("--kafka-reply-topic-pattern", metavar="REGEX", type=_pattern,
                           help="reply topics a request may name in its reply-topic header "
                                "(kafka_replyTopic, REPLY_TOPIC, reply_to) must match this "
                                "whole; others get a JSON-RPC error on the output topic "
                                "(default: any)")
        kafka.add_argument("--kafka-session-topic", metavar="TOPIC", type=_topic,
                           help="compacted topic keeping each session's initialize and threads, "
                                "so a session carries on after a restart or on another server "
                                "of the group")
        kafka.add_argument("--stats-topic", metavar="TOPIC", type=_topic,
                           help="also produce each statistics line (-X "
                                "statistics.interval.ms) to this topic, keyed by the client id")
    kafka.add_argument("--kafka-config", metavar="FILE",
                       help="librdkafka/Java properties file (key=value) of client properties; "
                            "the environment, -X and flags take precedence")
    kafka.add_argument("--kafka-connect-timeout", metavar="SECONDS", type=_seconds,
                       help="how long %s (default: 30)" % (
                           "the broker may take to answer before the proxy exits 3" if proxy
                           else "start-up may take to find a TLS or SASL failure that "
                                "retrying cannot fix, before exiting 3"))
    kafka.add_argument("-X", "--kafka-property", metavar="KEY=VALUE", action="append",
                       type=_property,
                       help="librdkafka/Java client property, e.g. session.timeout.ms=10000 "
                            "(repeatable)")
    if proxy:
        parser.add_argument("--timeout", metavar="SECONDS", type=_positive_seconds,
                            default=120.0,
                            help="a request without a reply after this long is answered with "
                                 "a JSON-RPC error naming the topic waited on; at stdin's end, "
                                 "how long replies are awaited (default: 120)")
    else:
        _server_arguments(parser)
    parser.add_argument("--max-message-bytes", metavar="BYTES", type=_message_bytes,
                        default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="largest message read: a longer stdin line or Kafka record is "
                             "answered with a JSON-RPC error and skipped without being held "
                             f"in memory (default: {DEFAULT_MAX_MESSAGE_BYTES})")
    parser.add_argument("--log-level", default="WARNING" if proxy else "INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level on stderr (default: %s)" % (
                            "WARNING" if proxy else "INFO"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(proxy=proxy)
    return parser


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stdio", action="store_true",
                        help="keep the stdio transport on alongside Kafka (default with no Kafka "
                             "flag)")
    parser.add_argument("--backend", choices=("codex", "builtin"), default="codex",
                        help="what answers: one 'codex app-server' with a connection per "
                             "session, or the built-in initialize/noop/echo backend for smoke "
                             "tests (default: codex)")
    parser.add_argument("--codex-command", metavar="COMMAND",
                        help="command line of the Codex child (default: $CODEX_APP_SERVER_COMMAND "
                             f"or '{DEFAULT_CODEX_COMMAND}')")
    parser.add_argument("--max-sessions", metavar="N", type=_positive_int, default=1000,
                        help="sessions (Kafka record keys, and stdio) holding a connection to "
                             "Codex at once; the least recently used idle one is closed to make "
                             "room; with none idle for a second, a request gets -32001 "
                             "(default: 1000)")
    parser.add_argument("--shared-threads", action="store_true",
                        help="every session sees and may use every thread (for clients that "
                             "trust one another); default: a thread is the session's that "
                             "started or forked it")
    parser.add_argument("--session-idle-timeout", metavar="SECONDS", type=_seconds,
                        default=600.0,
                        help="close a session's connection to Codex after this long without "
                             "traffic and with nothing in flight; its next message reopens it "
                             "and replays its initialize (0: never; default: 600)")
    parser.add_argument("--request-timeout", metavar="SECONDS", type=_seconds, default=600.0,
                        help="a request Codex has not answered after this long gets a -32603 "
                             "error, so its offset commits (0: none; default: 600)")
    parser.add_argument("--builtin-delay", metavar="SECONDS", type=_seconds, default=0.0,
                        help="builtin backend: wait this long before each reply, to load-test "
                             "a transport against a slow backend (default: 0)")
    parser.add_argument("--allow-method", metavar="PATTERN", action="append", type=_glob,
                        help="take only the client methods matching one of these shell-style "
                             "patterns, e.g. 'thread/*' (repeatable; default: every method)")
    parser.add_argument("--deny-method", metavar="PATTERN", action="append", type=_glob,
                        help="refuse the client methods matching this shell-style pattern, e.g. "
                             "'account/*' (repeatable; wins over --allow-method): a request "
                             "gets -32601, a notification is dropped")
    parser.add_argument("--queue-size", metavar="N", type=_positive_int, default=1000,
                        help="messages the processor queue holds, and with the Codex backend "
                             "the requests in flight to Codex; when full, Kafka partitions are "
                             "paused and stdin is not read (default: 1000)")
    parser.add_argument("--shutdown-timeout", metavar="SECONDS", type=_seconds, default=30.0,
                        help="how long shutdown waits for in-flight work (default: 30)")


def parse_args(parser: argparse.ArgumentParser,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and cross-check flags; usage errors exit 2 through ``parser.error``."""
    args = parser.parse_args(argv)
    proxy = args.proxy
    args.kafka = proxy or any(getattr(args, name, None) is not None for name in KAFKA_FLAGS)
    args.stats_interval = 0.0
    if not args.kafka:
        args.stdio = True
        return args
    # Precedence: flags > -X > environment > properties file.
    try:
        properties = rpc.read_properties(args.kafka_config) if args.kafka_config else {}
    except (OSError, ValueError) as exc:
        parser.error(f"--kafka-config: {exc}")
    properties.update(rpc.environment_properties(os.environ))
    properties.update(args.kafka_property or [])
    properties.update({prop: getattr(args, flag) for flag, prop in KAFKA_PROPERTY_FLAGS.items()
                       if getattr(args, flag, None) is not None})
    if "metadata.broker.list" in properties:  # librdkafka's older name
        properties.setdefault("bootstrap.servers", properties["metadata.broker.list"])
    # The server's own statistics, as librdkafka's: not a kafka-python setting.
    interval = properties.pop("statistics.interval.ms", "0")
    try:
        args.stats_interval = 0.0 if proxy else rpc.parse_integer(interval) / 1000.0
    except ValueError as exc:
        parser.error(f"Kafka client properties: statistics.interval.ms={interval!r}: {exc}")
    if proxy:  # a reader of one partition, without a group: one file may serve both ends
        for key in ("group.id", "auto.offset.reset", "group.instance.id"):
            properties.pop(key, None)
        args.kafka_session = args.kafka_session or uuid.uuid4().hex
    elif args.stats_topic and not args.stats_interval:
        parser.error("--stats-topic needs -X statistics.interval.ms=N (N > 0)")
    elif args.stats_topic and args.stats_topic in (
            args.kafka_input_topic, args.kafka_output_topic, args.kafka_dead_letter_topic):
        parser.error("--stats-topic must differ from the input, output and dead-letter topics")
    properties.setdefault("client.id", "codex-app-server-proxy" if proxy else "codex-app-server")
    if not proxy:
        properties.setdefault("auto.offset.reset", "latest")
    missing = [flag for flag, present in (
        ("--kafka-bootstrap-servers", "bootstrap.servers" in properties),
        ("--kafka-input-topic", args.kafka_input_topic), ("--kafka-output-topic",
                                                          args.kafka_output_topic),
        ("--kafka-group-id", proxy or "group.id" in properties)) if not present]
    if missing:
        parser.error(("the proxy needs: " if proxy else "the Kafka transport also needs: ")
                     + ", ".join(missing))
    if args.kafka_input_topic == args.kafka_output_topic:
        parser.error("--kafka-input-topic and --kafka-output-topic must differ "
                     "(the server would consume its own replies)")
    if proxy and args.kafka_reply_topic == args.kafka_input_topic:
        parser.error("--kafka-reply-topic must differ from --kafka-input-topic")
    try:
        properties["bootstrap.servers"] = _servers(properties["bootstrap.servers"])
    except argparse.ArgumentTypeError as exc:
        parser.error(f"bootstrap servers: {exc}")
    args.kafka_inferred = rpc.infer_security(properties)
    try:
        rpc.client_config(properties)
        rpc.check_supported(properties)
    except ValueError as exc:
        parser.error(f"Kafka client properties: {exc}")
    args.kafka_properties = properties
    args.kafka_connect_timeout = 30.0 if args.kafka_connect_timeout is None \
        else args.kafka_connect_timeout
    args.kafka_max_message_bytes = args.kafka_max_message_bytes or 1024 * 1024
    if not proxy and args.kafka_dead_letter_topic and args.kafka_dead_letter_topic in (
            args.kafka_input_topic, args.kafka_output_topic):
        parser.error("--kafka-dead-letter-topic must differ from the input and output topics")
    if not proxy and args.kafka_session_topic and args.backend != "codex":
        parser.error("--kafka-session-topic keeps the sessions of --backend codex")
    if not proxy and args.kafka_session_topic and args.kafka_session_topic in (
            args.kafka_input_topic, args.kafka_output_topic, args.kafka_dead_letter_topic,
            args.stats_topic):
        parser.error("--kafka-session-topic must differ from the input, output, dead-letter "
                     "and stats topics")
    return args


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _servers(text: str) -> str:
    entries = [entry.strip() for entry in text.split(",")]
    for entry in entries:
        match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:,\[\]]+):(\d{1,5})", entry)
        if not match:
            raise argparse.ArgumentTypeError(f"{entry!r} is not HOST:PORT")
        if not 1 <= int(match.group(2)) <= 65535:
            raise argparse.ArgumentTypeError(f"{entry!r}: the port must be from 1 to 65535")
    return ",".join(entries)


def _topic(text: str) -> str:
    _nonempty(text)
    if text in (".", "..") or len(text) > 249 or not re.fullmatch(r"[A-Za-z0-9._-]+", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a legal Kafka topic name (letters, digits, '.', '_', '-'; "
            "at most 249)")
    return text


def _session(text: str) -> str:
    if not text or len(text.encode()) > rpc.MAX_SESSION_KEY_BYTES:
        raise argparse.ArgumentTypeError(f"must be 1 to {rpc.MAX_SESSION_KEY_BYTES} bytes")
    return text


def _glob(text: str) -> str:
    if not text or any(char.isspace() or not char.isprintable() for char in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a method pattern (a shell-style "
                                         "pattern without spaces, such as 'account/*')")
    return text


def _pattern(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {exc}") from None
    return text


def _property(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text.split('=')[0]!r}")
    return key.strip(), value


def _number(convert: Callable[[str], Any], minimum: float, maximum: float,
            what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not minimum <= value <= maximum:  # also false for NaN
            raise argparse.ArgumentTypeError(f"{text!r}: must be from {int(minimum)} to "
                                             f"{int(maximum)}")
        return value
    return parse


# Bounded so that every timer and Kafka setting built from them stays valid.
_seconds = _number(float, 0, 1e6, "a number of seconds")
_positive_seconds = _number(float, 0.001, 1e6, "a number of seconds")
_positive_int = _number(int, 1, rpc.INT32_MAX, "a whole number")
_message_bytes = _number(int, 1, 1024 ** 3, "a number of bytes")


def configure_logging(level: str, secrets: Sequence[str] = ()) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if secrets:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_Redact(secrets))
    # kafka-python narrates every connection at INFO; keep its warnings and errors.
    logging.getLogger("kafka").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


class _Redact(logging.Filter):
    """Last line of defence: no secret value reaches the log, whoever logs it."""

    def __init__(self, secrets: Sequence[str]):
        super().__init__()
        self._secrets = [secret for secret in secrets if secret]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(secret in text for secret in self._secrets):
            for secret in self._secrets:
                text = text.replace(secret, "***")
            record.msg, record.args = text, None
        return True


# --- server ---------------------------------------------------------------

# SIGHUP too: under a supervisor or a closing terminal it is an ordinary request to stop.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP")
                     if hasattr(signal, name))
HANDOFF_GRACE = 5.0  # seconds past the shutdown timeout for handing queued messages over


class Server:
    """Owns the transports, the processor and the shutdown sequence."""

    def __init__(self, backend: "Backend", shutdown_timeout: float = 30.0,
                 queue_size: int = 1000,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 policy: Optional["MethodPolicy"] = None, stats_interval: float = 0.0):
        self.shutdown_event = threading.Event()
        self.stats_interval = stats_interval
        self.shutdown_timeout = shutdown_timeout
        self.max_message_bytes = max_message_bytes
        self.processor = Processor(backend, queue_size, policy)
        self.transports: List[Any] = []
        self._signals = 0
        self._signalled = 0  # the first signal's number
        self._failed = 0  # the exit status a failed transport asks for

    def add_kafka(self, args: argparse.Namespace) -> "rpc.KafkaTransport":
        if args.kafka_inferred:
            log.info("inferred %s from the TLS/SASL settings", ", ".join(args.kafka_inferred))
        log.info("kafka settings: %s", rpc.redacted(args.kafka_properties))
        for key, why in rpc.ignored_properties(args.kafka_properties):
            log.warning("ignoring kafka property %s: %s", key, why)
        session = getattr(args, "kafka_session", None)
        reply_topic = getattr(args, "kafka_reply_topic", None)
        # The proxy reads what the server writes (or its own reply topic), and the reverse.
        reads, writes = (reply_topic or args.kafka_output_topic, args.kafka_input_topic) \
            if session else (args.kafka_input_topic, args.kafka_output_topic)
        settings = dict(max_message_bytes=args.kafka_max_message_bytes,
                        connect_timeout=args.kafka_connect_timeout,
                        max_input_bytes=self.max_message_bytes)
        if session:
            transport: rpc.KafkaTransport = rpc.KafkaClientTransport(
                reads, writes, self.processor, args.kafka_properties, session, reply_topic,
                **settings)
        else:
            transport = rpc.KafkaTransport(
                reads, writes, self.processor, args.kafka_properties,
                dead_letter_topic=args.kafka_dead_letter_topic,
                reply_topic_pattern=args.kafka_reply_topic_pattern,
                stats_topic=(args.stats_topic or "") if args.stats_interval else None,
                session_topic=args.kafka_session_topic, owner=self.processor.backend,
                **settings)
        self.transports.append(transport)
        return transport

    def add_stdio(self, after: Optional[threading.Event] = None,
                  proxy: bool = False) -> "StdioTransport":
        """Stdio, read once ``after`` is set.  The proxy's stdio takes each line at once,
        not through the queue (so replies owed are known at stdin's end), and its end ends
        the server (as it does when it is the only transport) once they are in."""
        self._stdio_ends_server = proxy
        stdio = StdioTransport(self.processor.answer if proxy else self.processor.submit,
                               self._stdio_closed, self.max_message_bytes,
                               answer=self.processor.answer, after=after)
        self.transports.append(stdio)
        return stdio

    def install_signal_handlers(self) -> None:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGHUP under nohup
                signal.signal(signum, self._on_signal)

    def serve_forever(self) -> int:
        """Run until a signal (or the end of stdio in stdio-only mode), then shut down in order."""
        threads = []
        for transport in self.transports:
            threads.append(threading.Thread(target=self._serve_transport, args=(transport,),
                                            name=f"{transport.name}-transport", daemon=True))
        processor_thread = threading.Thread(target=self.processor.serve_forever,
                                            name="processor", daemon=True)
        threads.append(processor_thread)
        for thread in threads:
            thread.start()
        names = " and ".join(t.name for t in self.transports)
        log.info("codex-app-server %s serving on %s", __version__, names)
        systemd = SystemdNotifier()
        ready = False
        next_stats = time.monotonic() + self.stats_interval
        # A timed wait keeps the main thread responsive to signals on every platform.
        # The signal handler only sets a number: Event.set() there could deadlock against
        # this very thread inside Event.wait(), which holds the Event's lock.
        while not (self.shutdown_event.is_set() or self._signalled):
            if not ready and all(transport.ready.is_set() for transport in self.transports):
                ready = True
                systemd.notify("READY=1", f"STATUS=serving on {names}")
            # (The stdio loop ending is no fault: stdin closes, Kafka goes on.)
            if ready and all(thread.is_alive() for thread in threads
                             if thread.name != "stdio-transport"):
                systemd.watchdog()
            if self.stats_interval and time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self.stats_interval
                self._report_stats()
            time.sleep(0.2)
        systemd.notify("STOPPING=1", "STATUS=shutting down")
        if self._signalled:
            log.info("received %s", signal.Signals(self._signalled).name)
            self.shutdown_event.set()
        status = self._shutdown(processor_thread)
        return self._failed or status

    def shutdown(self) -> None:
        self.shutdown_event.set()

    def _serve_transport(self, transport: Any) -> None:
        try:
            transport.serve_forever()
        except rpc.FatalKafkaError as exc:
            log.error("%s", exc)  # one line naming the cause: no traceback to wade through
            self._failed = 3
            self.shutdown_event.set()
        except BaseException:
            # A transport without its loop would accept nothing: stop rather than linger.
            log.exception("%s transport failed; shutting down", transport.name)
            self._failed = 1
            self.shutdown_event.set()

    def _shutdown(self, processor_thread: threading.Thread) -> int:
        deadline = time.monotonic() + self.shutdown_timeout
        log.info("shutting down: no new messages taken")
        for transport in self.transports:
            transport.shutdown()
        log.info("finishing queued messages")
        self.processor.stop(deadline)
        # Handing what is queued to the backend is quick (the builtin backend answers at
        # once, Codex's in-flight wait ends at the deadline): even with a timeout of 0
        # every queued message is handed over, not dropped.
        processor_thread.join(max(0.0, deadline - time.monotonic()) + HANDOFF_GRACE)
        if processor_thread.is_alive():
            log.warning("shutdown timeout: %d queued messages left unprocessed",
                        self.processor.queued())
        log.info("waiting for in-flight replies")
        self.processor.backend.close(deadline)
        for transport in self.transports:
            transport.close(timeout=max(1.0, deadline - time.monotonic()))
        log.info("shutdown complete")
        return 0

    def _report_stats(self) -> None:
        """One INFO line ``stats: {...}`` (and a record on the stats topic): what an operator
        needs without Kafka's tools.  Payload-free: counts only."""
        stats: Dict[str, Any] = dict(queue=self.processor.queued(), sessions=0, in_flight=0,
                                     codex_restarts=0, codex_overloaded=0)
        stats.update(self.processor.backend.stats())
        kafka = [transport for transport in self.transports
                 if isinstance(transport, rpc.KafkaTransport)]
        for transport in kafka:
            stats.update(transport.stats())
        line = json.dumps(stats, separators=(",", ":"), sort_keys=True)
        log.info("stats: %s", line)
        for transport in kafka:
            transport.publish(line.encode())

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals > 1:
            # The operator insists: no more waiting.
            sys.stderr.write(f"codex-app-server: second {signal.Signals(signum).name}, "
                             "exiting now\n")
            os._exit(128 + signum)
        self._signalled = signum

    def _stdio_closed(self, why: str) -> None:
        if len(self.transports) > 1:
            log.info("%s: the stdio connection ends%s", why,
                     "" if self._stdio_ends_server else ", Kafka goes on")
            self.processor.backend.end(self.transports[-1], time.monotonic() +
                                       self.shutdown_timeout)
            if not self._stdio_ends_server:
                return
        log.info("%s: shutting down", why)
        self.shutdown_event.set()


class SystemdNotifier:
    """sd_notify(3) without libsystemd: READY=1, STATUS=, STOPPING=1 and WATCHDOG=1 as
    datagrams to ``$NOTIFY_SOCKET`` (a path, or "@name" in the abstract namespace), the
    watchdog at half of ``$WATCHDOG_USEC``.  Without ``$NOTIFY_SOCKET``, nothing."""

    def __init__(self, environ: Optional[Dict[str, str]] = None):
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if path else None
        usec = environ.get("WATCHDOG_USEC", "")
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) else None
        self._next_watchdog = 0.0
        self._failed = False  # said once at WARNING

    def notify(self, *lines: str) -> None:
        if self._socket is not None:
            try:
                self._socket.sendto("\n".join(lines).encode(), self._address)
            except OSError as exc:
                (log.debug if self._failed else log.warning)(
                    "cannot notify systemd at %s: %s", self._address.lstrip("\0"), exc)
                self._failed = True

    def watchdog(self) -> None:
        """WATCHDOG=1, when due: the caller checks first that its loops are alive."""
        now = time.monotonic()
        if self.watchdog_interval is not None and now >= self._next_watchdog:
            self._next_watchdog = now + self.watchdog_interval
            self.notify("WATCHDOG=1")


class Processor(rpc.Sink):
    """One bounded queue of (transport, message, done, route), each message to the backend.

    ``done`` is the transport's acknowledgement: a request's backend passes it
    along with the reply; for anything else it runs once the backend has it.
    The processor takes everything queued at once, so a burst crosses threads
    in one hand-off rather than one per message.  Nothing one message does can
    end its thread: a failure becomes that request's ``-32603`` error.
    """

    def __init__(self, backend: "Backend", queue_size: int = 1000,
                 policy: Optional["MethodPolicy"] = None):
        self.backend = backend
        self._policy = policy
        self._refused_log = rpc.LogThrottle()
        self._items: Deque[Tuple[Any, Message, rpc.Done, rpc.Route]] = collections.deque()
        self._changed = threading.Condition()  # guards the queue; never held while handling
        self._capacity = queue_size
        self._low_water = max(1, queue_size // 2)
        self._stopping = False

    def submit(self, transport: Any, message: Message, done: rpc.Done = rpc.nothing,
               route: rpc.Route = rpc.DEFAULT_ROUTE) -> None:
        """Queue one validated message, waiting for room (stdio's backpressure)."""
        with self._changed:
            while len(self._items) >= self._capacity:
                self._changed.wait()
            self._items.append((transport, message, done, route))
            self._changed.notify_all()

    def offer(self, transport: Any,
              items: Sequence[Tuple[Message, rpc.Done, rpc.Route]]) -> int:
        """Queue as many (message, done, route) as there is room for; return how many.
        Kafka pauses its partitions when not all were taken."""
        with self._changed:
            taken = items[:max(0, self._capacity - len(self._items))]
            if taken:
                self._items.extend((transport,) + item for item in taken)
                self._changed.notify_all()
        return len(taken)

    def answer(self, transport: Any, message: Message, done: rpc.Done = rpc.nothing,
               route: rpc.Route = rpc.DEFAULT_ROUTE) -> None:
        """A client's answer to one of Codex's requests, handed to the backend at once on
        the caller's thread: Codex may be holding, until it has the answer, the very
        requests that fill the queue (a turn waiting for its approval)."""
        self._handle(transport, message, done, route)

    def has_room(self) -> bool:
        """Below the low-water mark: a paused transport may resume."""
        return len(self._items) < self._low_water

    def queued(self) -> int:
        return len(self._items)

    def serve_forever(self) -> None:
        while True:
            with self._changed:
                while not self._items and not self._stopping:
                    self._changed.wait()
                if not self._items:
                    return
                batch = list(self._items)
                self._items.clear()
                self._changed.notify_all()  # room again for a waiting stdio reader
            for transport, message, done, route in batch:
                self._handle(transport, message, done, route)

    def _handle(self, transport: Any, message: Message, done: rpc.Done,
                route: rpc.Route) -> None:
        kind = rpc.kind(message)
        if not transport.owns(route):  # its partition moved: the new owner reads it again
            log.debug("skipping a %s of a partition this server no longer reads", kind)
            self._guarded(done)
            return
        if self._policy is not None and "method" in message \
                and not self._policy.allows(message["method"]):
            method = message["method"][:200]
            self._refused_log.warning(log, "refused a %s of method %r (id %r): not allowed by "
                                      "--allow-method/--deny-method", kind, method,
                                      message.get("id"))
            if kind == rpc.REQUEST:
                self._guarded(transport.send, rpc.error_response(
                    message["id"], rpc.METHOD_NOT_FOUND,
                    f"method not allowed by this server: {method}"), done, route)
            else:
                self._guarded(done)
            return
        try:
            self.backend.handle(transport, message, done, route)
        except Exception:
            log.exception("internal error handling a %s (method %s, id %r)", kind,
                          message.get("method"), message.get("id"))
            if kind == rpc.REQUEST:
                self._guarded(transport.send, rpc.error_response(
                    message["id"], rpc.INTERNAL_ERROR, "internal error in codex-app-server "
                    "(see its log)"), done, route)
                return
        if kind != rpc.REQUEST:
            self._guarded(done)

    @staticmethod
    def _guarded(function: Callable[..., None], *args: Any) -> None:
        try:
            function(*args)
        except Exception:  # the processor thread must outlive any one message
            log.exception("internal error answering a message")

    def stop(self, deadline: float) -> None:
        """Finish what is queued, then return from serve_forever; backends stop waiting
        for room at ``deadline``."""
        self.backend.stopping(deadline)
        with self._changed:
            self._stopping = True
            self._changed.notify_all()


class MethodPolicy:
    """Which client methods the server takes: shell-style patterns, the deny list winning,
    and with an allow list only what it matches."""

    def __init__(self, allow: Sequence[str] = (), deny: Sequence[str] = ()):
        self.allow = list(allow)
        self.deny = list(deny)
        self._verdicts: Dict[str, bool] = {}  # a method is matched once

    def allows(self, method: str) -> bool:
        verdict = self._verdicts.get(method)
        if verdict is None:
            verdict = not any(fnmatch.fnmatchcase(method, pattern) for pattern in self.deny) \
                and (not self.allow or any(fnmatch.fnmatchcase(method, pattern)
                                           for pattern in self.allow))
            if len(self._verdicts) < 10000 and len(method) <= 256:  # clients choose names
                self._verdicts[method] = verdict
        return verdict


# --- stdio ------------------------------------------------------------------

class StdioTransport:
    """JSON-RPC lines on stdin -> submit; replies as single lines on stdout.

    The connection ends (``on_close(why)``) at stdin EOF or when stdout is gone:
    a client that cannot read its replies is served no further.
    """

    name = "stdio"
    store = None  # no session store: a stdio session lasts as long as its process

    def __init__(self, submit: Callable[[Any, Message], None], on_close: Callable[[str], None],
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, stdin_fd: int = 0,
                 stdout_fd: int = 1, answer: Optional[Callable[[Any, Message], None]] = None,
                 after: Optional[threading.Event] = None):
        self._submit = submit
        self._after = after
        self._answer = answer or submit
        self._on_close = on_close
        self.max_message_bytes = max_message_bytes
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._write_lock = threading.Lock()  # one line at a time on stdout
        self._shutdown = threading.Event()
        self._ended = threading.Event()
        self.ready = threading.Event()  # (at once: nothing to connect to)
        self.ready.set()
        self._stdout_gone = False
        self._invalid_log = rpc.LogThrottle()

    def serve_forever(self) -> None:
        while self._after is not None and not self._after.wait(0.1):
            if self._shutdown.is_set():
                return
        line_number = 0
        for line, size, head in LineReader(self._stdin_fd, self.max_message_bytes):
            if self._shutdown.is_set() or self._ended.is_set():
                return
            line_number += 1
            try:
                if line is None:
                    raise rpc.oversized(head, size, self.max_message_bytes)
                if not line.strip():
                    continue
                message = rpc.decode(line.strip())
            except rpc.InvalidMessage as exc:
                self._invalid_log.warning(log, "invalid payload from stdin: line %d: %s",
                                          line_number, exc.reason)
                if exc.answers is not None:  # an answer to Codex: Codex hears it failed
                    self._answer(self, rpc.error_response(exc.answers, exc.code, exc.reason))
                else:
                    self.send(rpc.error_response(exc.id, exc.code, exc.reason))
                continue
            except Exception:  # one line must not end the connection
                log.exception("internal error reading stdin line %d", line_number)
                self.send(rpc.error_response(None, rpc.INTERNAL_ERROR,
                                             "internal error in codex-app-server"))
                continue
            if "method" in message:
                self._submit(self, message)
            else:
                self._answer(self, message)
        if not self._shutdown.is_set():
            self._end("stdin closed")

    def send(self, message: Message, done: rpc.Done = rpc.nothing,
             route: rpc.Route = rpc.DEFAULT_ROUTE) -> None:
        data = rpc.encode_reply(message)
        if data is not None:
            with self._write_lock:
                try:
                    if not self._stdout_gone:
                        _write_all(self._stdout_fd, data + b"\n")
                except OSError as exc:
                    self._stdout_gone = True
                    log.warning("cannot write to stdout (%s): ending the stdio connection",
                                exc.strerror or exc)
                    # Elsewhere: the caller may be the processor, which closing must not hold.
                    threading.Thread(target=self._end, args=("stdout closed",),
                                     daemon=True).start()
        done()

    @property
    def writable(self) -> bool:
        return not self._stdout_gone

    def owns(self, route: rpc.Route) -> bool:
        return True

    def shutdown(self) -> None:
        self._shutdown.set()

    def close(self, timeout: float = 0.0) -> None:
        self._shutdown.set()

    def _end(self, why: str) -> None:
        with self._write_lock:  # stdin EOF and a broken stdout often come together
            if self._ended.is_set():
                return
            self._ended.set()
        self._on_close(why)


class LineReader:
    """Newline-delimited lines from a file descriptor, read with ``os.read``.

    Raw reads leave no io lock held by a blocked reader thread at interpreter exit.
    A line over ``limit`` bytes streams by uncollected and is yielded as
    (None, its size, its first bytes); a line within it as (line, 0, b"").
    """

    HEAD = 1024

    def __init__(self, fd: int, limit: int, chunk: int = 1 << 16):
        self.fd = fd
        self.limit = limit
        self.chunk = chunk

    def __iter__(self) -> Iterator[Tuple[Optional[bytes], int, bytes]]:
        partial = bytearray()  # the current line so far, while within the limit
        over = 0  # size so far of a current line that is over the limit
        head = b""
        while True:
            try:
                data = os.read(self.fd, self.chunk)
            except OSError as exc:
                log.warning("cannot read file descriptor %d: %s", self.fd, exc.strerror or exc)
                data = b""
            if not data:
                break
            start = 0
            while True:
                end = data.find(b"\n", start)
                piece = data[start:] if end < 0 else data[start:end]
                if over:
                    over += len(piece)
                elif len(partial) + len(piece) > self.limit:
                    head = bytes(partial[:self.HEAD]) + piece[:max(0, self.HEAD - len(partial))]
                    over = len(partial) + len(piece)
                    partial.clear()
                elif end >= 0 and not partial:
                    yield piece, 0, b""  # the common case: a whole line in one read
                    start = end + 1
                    continue
                else:
                    partial += piece
                if end < 0:
                    break
                if over:
                    yield None, over, head
                    over, head = 0, b""
                else:
                    yield bytes(partial), 0, b""
                    partial.clear()
                start = end + 1
        if over:
            yield None, over, head
        elif partial:
            yield bytes(partial), 0, b""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:  # a non-blocking descriptor inherited from the parent
            select.select([], [fd], [], 1.0)


# --- backends ---------------------------------------------------------------

class Backend(rpc.SessionOwner):
    """What answers the messages of every transport: replies go to ``transport.send``.
    As a Kafka transport's ``SessionOwner`` it hears of rebalances (``settle``,
    ``revoked``)."""

    def handle(self, transport: Any, message: Message, done: rpc.Done,
               route: rpc.Route) -> None:
        """Take one message.  For a request, pass ``done`` and ``route`` to
        ``transport.send`` with the reply; for anything else the processor calls ``done``."""
        raise NotImplementedError

    def stats(self) -> Dict[str, int]:
        """Counts for the statistics line."""
        return {}

    def stopping(self, deadline: float) -> None:
        """Shutdown has begun: stop waiting for room by ``deadline``."""

    def end(self, transport: Any, deadline: float) -> None:
        """``transport``'s client is gone (stdin closed): finish its work by ``deadline``."""

    def close(self, deadline: float) -> None:
        """Finish in-flight work by ``deadline`` (time.monotonic()), then release resources."""


class BuiltinBackend(Backend):
    """Answers ``initialize``, ``noop`` and ``echo`` (its params are the result) in-process:
    transport smoke tests without Codex, payloads of any size included."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def handle(self, transport: Any, message: Message, done: rpc.Done = rpc.nothing,
               route: rpc.Route = rpc.DEFAULT_ROUTE) -> None:
        kind = rpc.kind(message)
        if kind == rpc.REQUEST:
            if self.delay:
                time.sleep(self.delay)
            method = message["method"]
            if method == "initialize":
                result = {"userAgent": f"codex-app-server/{__version__} (python)",
                          "platformFamily": "windows" if os.name == "nt" else "unix",
                          "platformOs": _platform_os()}
            elif method == "noop":
                result = {}
            elif method == "echo":
                result = message.get("params", {})
            else:
                transport.send(rpc.error_response(message["id"], rpc.METHOD_NOT_FOUND,
                                                  f"Method not found: {method}"), done, route)
                return
            transport.send({"jsonrpc": "2.0", "id": message["id"], "result": result}, done,
                           route)
        elif kind in (rpc.RESPONSE, rpc.ERROR):
            log.debug("builtin backend: ignoring a client %s for id %r", kind, message.get("id"))


class Proxy(Backend):
    """The backend of ``codex-app-server proxy``: what one transport takes goes out on the
    other (stdin to Kafka, Kafka to stdout), on the reading thread, so in order.  Requests
    from stdin go out under ids of the proxy's own, restored on the reply: a client may
    reuse ids, and since they are unique to this run (a random prefix) a reply to an
    earlier run's request, late, is never taken for one of this run's.  One without a reply after ``timeout`` is answered with an error naming
    the topic its reply was awaited on, so a client never hangs on an absent or silent
    server; a reply that comes later is dropped with a WARNING."""

    def __init__(self, timeout: float, awaited: str, server_topic: str):
        self.timeout = timeout
        self.kafka: Any = None
        self.stdio: Any = None
        self._awaited, self._server_topic = awaited, server_topic
        self._run = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)
        self._waiting: Dict[str, Tuple[Any, float]] = {}  # ours -> (the client's id, deadline)
        self._changed = threading.Condition()  # guards _waiting
        self._dropped_log = rpc.LogThrottle()
        threading.Thread(target=self._expire, name="proxy-timeouts", daemon=True).start()

    def handle(self, transport: Any, message: Message, done: rpc.Done = rpc.nothing,
               route: rpc.Route = rpc.DEFAULT_ROUTE) -> None:
        kind = rpc.kind(message)
        if transport is self.stdio and kind == rpc.REQUEST:
            with self._changed:
                our_id = f"{self._run}-{next(self._ids)}"
                self._waiting[our_id] = (message["id"], time.monotonic() + self.timeout)
            message = dict(message, id=our_id)
        elif transport is self.kafka and kind in (rpc.RESPONSE, rpc.ERROR):
            with self._changed:
                waiting = self._waiting.pop(message["id"], None)
                self._changed.notify_all()
            if waiting is None:
                self._dropped_log.warning(log, "dropping a reply to id %r, which no request "
                                          "waits for (answered already, or timed out)",
                                          message["id"])
                return
            message = dict(message, id=waiting[0])
        # A request's done goes with it; for the rest the processor calls it.
        (self.stdio if transport is self.kafka else self.kafka).send(
            message, done if kind == rpc.REQUEST else rpc.nothing)

    def end(self, transport: Any, deadline: float) -> None:
        """Stdin's end: the replies still owed (or their timeout errors) first, while Kafka
        is still read; none when stdout is gone too."""
        deadline = time.monotonic() + self.timeout + 1.0
        with self._changed:
            while self._waiting and self.stdio.writable and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())

    def close(self, deadline: float) -> None:
        with self._changed:  # a signal: Kafka is no longer read, nothing more is coming
            left, self._waiting = list(self._waiting.values()), {}
        self._answer(left, "codex-app-server proxy is shutting down")

    def _expire(self) -> None:
        while True:
            time.sleep(max(0.05, min(1.0, self.timeout / 10)))
            now = time.monotonic()
            with self._changed:
                late = [ours for ours, (_, deadline) in self._waiting.items() if deadline <= now]
                late = [self._waiting.pop(ours) for ours in late]
                self._changed.notify_all()
            self._answer(late, f"no reply within {self.timeout:g} s on Kafka topic "
                               f"{self._awaited} (is a codex-app-server reading "
                               f"{self._server_topic}?)")

    def _answer(self, requests: List[Tuple[Any, float]], text: str) -> None:
        for msg_id, _ in requests:
            log.warning("request %r: %s", msg_id, text)
            self.stdio.send(rpc.error_response(msg_id, rpc.INTERNAL_ERROR, text))


class CodexBackend(Backend):
    """Every client's session, each with its own connection to the server's one Codex:
    the routing of calls between them.

    A session is one client of one transport: a Kafka record key (None: the default
    session), or stdio.  Its requests reach Codex under ids unique on its connection,
    restored on the reply.  Its ``initialize`` and the threads it loaded are replayed on
    a new connection (after Codex restarted, or the session was closed), so the client
    carries on.  What Codex sends a session unasked follows the reply topic and partition
    it last named.  A lost connection fails the session's pending requests, withdraws
    Codex's open requests to it and ends its running turns as failed.

    Its collaborators: ``SessionTable`` (the sessions, who may hold a connection, what is
    in flight, the reaper), ``Connector`` (a connection opened in a thread of its own),
    ``ServerRequests`` (Codex's requests to clients, under ids of the server's own).

    Locks: ``lock``, one Condition, guards every ``Session``, the ``SessionTable`` and the
    ``ServerRequests``; nothing waits on a transport, a connection or Codex while holding
    it.  ``Session.saving`` keeps one session's saves in order: taken before ``lock``
    (never while holding it), and held while the session store saves."""

    def __init__(self, codex: "CodexProcess", max_sessions: int = 1000,
                 idle_timeout: float = 600.0, request_timeout: float = 0.0,
                 max_in_flight: int = 1000, shared_threads: bool = False):
        self.codex = codex
        self.shared_threads = shared_threads
        self.lock = threading.Condition()  # every Session and both tables (see above)
        self.table = SessionTable(self.lock, max_sessions, idle_timeout, request_timeout,
                                  max_in_flight)
        self.requests = ServerRequests()
        self._connector = Connector(self)
        self._closer = SessionCloser(self)
        self._retry = OverloadRetry(self.lock)
        self._ended: List[Any] = []  # transports whose client is gone (stdin closed)

    def handle(self, transport: Any, message: Message, done: rpc.Done = rpc.nothing,
               route: rpc.Route = rpc.DEFAULT_ROUTE) -> None:
        kind = rpc.kind(message)
        if kind in (rpc.RESPONSE, rpc.ERROR):
            self._answer_codex(transport, route, message)
            return
        confined = not self.shared_threads and transport.name != "stdio"
        session = self.table.session_for(transport, route, confined)
        if kind == rpc.REQUEST and message["method"] == "initialize":
            # The same initialize again (a redelivered record) gets the saved result; one
            # with other parameters goes to Codex ("Already initialized").
            with self.lock:
                result = session.init_result if message.get("params") == session.init_params \
                    else None
                if result is None and session.connection is None and session.waiting is None:
                    session.init_params = session.init_result = None  # anew: nothing to replay
            if result is not None:
                transport.send({"id": message["id"], "result": result}, done, route)
                return
        self._offer(session, Waiting(message, done, route, self.table.deadline() if
                                     kind == rpc.REQUEST else float("inf")))

    def _offer(self, session: "Session", item: "Waiting") -> None:
        """``item`` to the session's connection, in order: straight on when the session has
        one, else behind what waits for the one its connector is opening (an opening
        Codex may take seconds: other sessions go on meanwhile)."""
        with self.lock:
            # Backpressure: a slow Codex holds the processor, so the queue fills and the
            # transports stop reading, instead of requests piling up here.
            self.table.wait_for_room(with_held=True)
            connection = session.connection
            connected = session.waiting is None and connection is not None \
                and not connection.lost
            ended = not connected and session.waiting is None and (
                self.table.closed or session.transport in self._ended or session.cut)
            if connected:
                self.table.touch(session)
                session.sending += 1  # not idle, not closed to make room, until it is sent
            elif not ended:
                ended = session.waiting is None and not self._connector.start(session)
                if not ended:
                    self.table.hold(session, item)
                    return
        if ended:
            self.refuse(session, item, (rpc.INTERNAL_ERROR, "codex-app-server is shutting "
                                                            "down"))
            return
        try:
            delivered = self.deliver(session, connection, item)
        finally:
            with self.lock:
                session.sending -= 1
        if not delivered:
            item.retried = True  # once, on a new connection
            self._offer(session, item)

    def deliver(self, session: "Session", connection: "CodexConnection",
                item: "Waiting") -> bool:
        """Send ``item`` on ``connection``; False when the connection did not take it (then
        lost: the caller tries a new one)."""
        message = item.message
        if rpc.kind(message) != rpc.REQUEST:
            if message["method"] == "initialized":
                with self.lock:
                    session.initialized = session.changed = True
            connection.send(rpc.encode(message))
            self._save(session)
            return True
        with self.lock:
            self.table.wait_for_room()
            our_id = session.new_id()
            outgoing, fakes = session.confine(message)
            code = rpc.INVALID_REQUEST
            if time.monotonic() >= item.deadline:  # waited for room that long: not sent
                code, outgoing = rpc.INTERNAL_ERROR, \
                    f"request timed out after {self.table.request_timeout:g} s"
        if isinstance(outgoing, str):  # not for this session, or too late: answered here
            session.transport.send(rpc.error_response(message["id"], code, outgoing),
                                   item.done, item.route)
            return True
        data = rpc.encode(dict(outgoing, id=our_id))  # before it is pending: may raise
        with self.lock:
            if session.connection is not connection:
                return False  # lost meanwhile
            self.table.touch(session)
            call = Call(message, item.done, item.route, item.deadline)
            call.fakes, call.sent = fakes, outgoing
            self.table.add_call(session, our_id, call)
            if message["method"] == "initialize" and session.init_result is None:
                session.init_params = message.get("params")
        if connection.send(data):  # outside the lock: a full socket may block it
            return True
        # Not delivered: unless its loss has answered it already, take it back.  Its reader
        # may be stuck relaying to a slow client: tell the loss from here.
        with self.lock:
            if self.table.pop_call(session, our_id) is None:
                return True
        self.connection_lost(connection, "it no longer takes messages")
        return False

    def refuse(self, session: "Session", item: "Waiting",
               failure: Tuple[Optional[int], str]) -> None:
        """A message that cannot reach Codex: a request is answered with ``failure`` (code,
        text), a notification dropped with a WARNING; neither when the code is None (its
        session moved: the new owner reads it again)."""
        code, text = failure
        if code is None:
            return
        if rpc.kind(item.message) == rpc.REQUEST:
            session.transport.send(rpc.error_response(item.message["id"], code, text),
                                   item.done, item.route)
        else:
            log.warning("session %s: dropping a %s notification: %s",
                        rpc.session_name(session.key), item.message["method"][:200], text)

    # What the server tells it ---------------------------------------------

    def stopping(self, deadline: float) -> None:
        with self.lock:
            self.table.stop_deadline = deadline
            self.lock.notify_all()

    def end(self, transport: Any, deadline: float) -> None:
        with self.lock:
            self._ended.append(transport)
        self._closer.close(lambda session: session.transport is transport, deadline)

    def settle(self, transport: Any, deadline: float) -> None:
        with self.lock:  # (turns go on: a partition that stays keeps its sessions)
            while any(session.calls or session.waiting for session in self.table.live()
                      if session.transport is transport and session.key is not None) \
                    and time.monotonic() < deadline:
                self.lock.wait(max(0.0, min(0.1, deadline - time.monotonic())))

    def revoked(self, transport: Any, partitions: Set[int]) -> None:
        """The sessions last heard from on these input partitions are another server's now
        (the default session stays: unkeyed records have no partition of their own): they
        are forgotten at once (their state is the session store's) and, in a thread of
        their own, running turns are interrupted and connections closed; what is left
        unanswered is not answered here, as the new owner reads it again."""
        with self.lock:
            moved = self.table.forget_moved(transport, partitions)
        if moved:
            threading.Thread(target=self._closer.close, args=(
                lambda session: session.moved, time.monotonic() + 2.0,
                "the session moved to another server", False), name="moved-sessions",
                daemon=True).start()

    def close(self, deadline: float) -> None:
        with self.lock:
            self.table.closed = True
        self._closer.close(lambda session: True, deadline, stop_codex=True)

    def stats(self) -> Dict[str, int]:
        with self.lock:
            return dict(self.table.stats(), codex_restarts=max(0, self.codex.starts - 1),
                        codex_overloaded=self._retry.count)

    # Requests and replies --------------------------------------------------

    def _save(self, session: "Session", done: rpc.Done = rpc.nothing) -> None:
        """The session's state to its transport's session store, when it changed, then
        ``done``; in order, as the saves of one session may come from two threads."""
        store = session.transport.store
        if not (session.changed and store is not None):
            done()
            return
        with session.saving:
            with self.lock:
                session.changed = False
                state = None if session.moved else session.state()
            if state is None or state == store.load(session.key):
                done()
            else:
                store.save(session.key, state, done)

    def own_request(self, session: "Session", method: str, params: Any) -> bytes:
        """Under the lock: a request of the server's own, encoded (no client waits on it)."""
        our_id = session.new_id()
        self.table.add_call(session, our_id, Call({"method": method, "params": params},
                                                  rpc.nothing, rpc.DEFAULT_ROUTE,
                                                  self.table.deadline()))
        return rpc.encode({"id": our_id, "method": method, "params": params})

    def _answer_codex(self, transport: Any, route: rpc.Route, answer: Message) -> None:
        """A client's answer to one of Codex's requests goes to the connection that asked,
        when it comes from the session that was asked."""
        with self.lock:
            asked = self.requests.answered(transport, route.session, answer["id"])
            if asked is not None:
                self.table.touch(asked.session)
        if asked is not None and asked.connection.send(rpc.encode(dict(answer,
                                                                      id=asked.codex_id))):
            return
        log.warning("dropping a client answer to codex request %r, which no connection to "
                    "codex is waiting for (answered already, withdrawn, its connection "
                    "closed, or asked of another session)", answer["id"])

    def from_codex(self, connection: "CodexConnection", message: Message) -> None:
        """What Codex sends on a session's connection (its reader thread): a reply to the
        client that asked, Codex's request or notification to the session's route."""
        session = connection.session
        call = retry = refused = None
        with self.lock:
            if session.connection is not connection:
                return  # closed or replaced: the session has heard of it
            if connection.process is self.codex.process:
                self.codex.last_heard = time.monotonic()  # alive (see CodexProcess.connect)
            if "id" in message:  # not a notification: some are broadcast to every session
                self.table.touch(session)
            if "method" in message and "id" in message and session.confined \
                    and not session.may_see(message.get("params") or {}):
                refused, message = message, None  # never relayed: not the session's thread
            elif "method" in message:
                message = self.requests.ask(session, connection, message) if "id" in message \
                    else session.notified(message, self.requests)
                route = session.route
            else:
                call, message = self._answered(session, message)
                retry = call is not None and _overloaded(call, message)
                if call is not None and not retry:
                    session.backoff = 0.0  # Codex takes requests again
                    self.table.pop_call(session, message["id"])
                    session.answered(call.request, message)
            wait_for_save = call is not None and not retry and session.changed
        if wait_for_save:
            # Its offset commits once the state it changed is saved too: after a crash, the
            # request is read again rather than the session found without it.
            call.done = rpc.after(2, call.done)
            self._save(session, call.done)
        else:
            self._save(session)
        if refused is not None:  # Codex hears at once that nobody here will answer it
            connection.send(rpc.encode(rpc.error_response(
                refused["id"], rpc.INVALID_REQUEST, "not this client's thread")))
        if retry:
            self._retry.later(session, connection, message["id"], call)
        elif message is None:
            return  # nothing the client should see
        elif "method" in message:
            session.transport.send(message, rpc.nothing, route)
        elif call is None:
            log.warning("session %s: codex answered id %r, which no client asked",
                        rpc.session_name(session.key), message.get("id"))
        elif call.request.get("id") is not None:  # None: a request of our own (a replay)
            reply = session.unconfine(call, message) if session.confined else message
            session.transport.send(dict(reply, id=call.request["id"]), call.done, call.route)

    def _answered(self, session: "Session", reply: Message) -> Tuple[Optional["Call"],
                                                                     Optional[Message]]:
        """Under the lock: the call Codex's ``reply`` answers (None: none), and the reply
        (None when the client was told already: its request timed out)."""
        late = session.late.pop(reply["id"], None)
        if late is not None:  # what it means still counts
            session.answered(late, reply)
            log.warning("session %s: dropping codex's late answer to %s (id %r), which "
                        "timed out", rpc.session_name(session.key), late["method"][:200],
                        late.get("id"))
            return None, None
        return session.calls.get(reply["id"]), reply

    def connection_lost(self, connection: "CodexConnection", why: str,
                        ending: Optional[str] = None, answer: bool = True) -> None:
        """Tell the session its connection is gone: its requests fail (unless not
        ``answer``), Codex's requests to it are withdrawn, its running turns fail.
        ``ending``: why, when the server ended it on purpose."""
        session = connection.session
        ending = ending or ("codex-app-server is shutting down" if self.table.closed else None)
        with self.lock:
            if session.connection is not connection:
                return  # closed on purpose, and idle then: nothing to tell
            self.table.detach(session)
            orphans = self.table.drop_calls(session)
            withdrawn = self.requests.withdraw(session)
            turns, session.turns = session.turns, {}
            session.overloaded, session.backoff = [], 0.0  # (answered below, as orphans)
            route = session.route
            self.lock.notify_all()
        exited = None if ending else _exit_reason(connection.process, wait=2.0)
        message = ending if ending else \
            f"codex app-server exited with {exited}" if exited else \
            f"the connection to codex app-server closed ({why})"
        (log.error if orphans or turns else log.info)(
            "session %s: %s; failing %d pending requests and %d running turns",
            rpc.session_name(session.key), message, len(orphans), len(turns))
        for notice in _failure_notices(message, withdrawn, turns):
            session.transport.send(notice, rpc.nothing, route)
        for call in orphans if answer else ():
            if call.request.get("id") is not None:
                session.transport.send(rpc.error_response(
                    call.request["id"], rpc.INTERNAL_ERROR, message if ending else
                    f"{message} before answering"), call.done, call.route)


class SessionCloser:
    """Ends sessions (at shutdown, when stdin closes, when their partition moves): their
    requests and turns may finish; near the deadline running turns are interrupted; then
    their connections close, and what is still owed is answered."""

    def __init__(self, backend: "CodexBackend"):
        self._backend = backend
        self._table = backend.table
        self._lock = backend.lock

    def close(self, which: Callable[["Session"], bool], deadline: float,
              why: str = "codex-app-server is shutting down", answer: bool = True,
              stop_codex: bool = False) -> None:
        """Let the sessions ``which`` says finish their requests and running turns; near the
        deadline interrupt the turns, which then complete as such (within a second at
        least); then close their connections, answering what is still owed with ``why``
        (when ``answer``)."""
        def busy(turns: bool = True) -> List[Session]:
            return [session for session in self._table.live() if which(session)
                    and (session.calls or session.waiting or turns and session.turns)]
        with self._lock:
            grace = min(HANDOFF_GRACE, max(0.0, deadline - time.monotonic()) / 4)
            while busy() and time.monotonic() < deadline - grace:
                self._lock.wait(max(0.0, min(0.1, deadline - grace - time.monotonic())))
            interrupt = self._backend.own_request
            interrupts = [(session.connection, interrupt(session, "turn/interrupt", {
                "threadId": thread_id, "turnId": turn_id}))
                for session in busy() for turn_id, (thread_id, _) in session.turns.items()]
        if interrupts:
            log.warning("shutdown timeout: interrupting %d running turns", len(interrupts))
        for connection, data in interrupts:
            connection.send(data)
        with self._lock:
            until = max(deadline, time.monotonic() + 1.0)
            while busy(turns=bool(interrupts)) and time.monotonic() < until:
                self._lock.wait(0.1)
            unanswered = sum(len(session.calls) for session in busy(turns=False))
            if unanswered:
                log.warning("shutdown timeout: %d requests to codex still unanswered",
                            unanswered)
            connections = [session.connection for session in self._table.admitted()
                           if which(session) and session.connection is not None]
            for session in self._table.connecting:
                session.cut |= which(session)  # what still waits is answered with ``why``
        if stop_codex:  # every connection ends with it, quickly
            self._backend.codex.stop(deadline)
        for connection in connections:
            self._backend.connection_lost(connection, "", ending=why, answer=answer)
            connection.close()
        for connection in connections:
            connection.ended.wait(max(0.1, deadline - time.monotonic()))
        with self._lock:  # connectors answer what waits on them, then end
            while any(which(session) for session in self._table.connecting) \
                    and time.monotonic() < deadline:
                self._lock.wait(max(0.01, min(0.1, deadline - time.monotonic())))


class OverloadRetry:
    """Codex's "retry later" (-32001) to a request: asked again, not passed on, up to 8
    times a request, after a per-session backoff.  Under the backend's lock."""

    def __init__(self, lock: threading.Condition):
        self._lock = lock
        self.count = 0  # Codex's "retry later" answers, since start

    def later(self, session: "Session", connection: "CodexConnection", our_id: int,
              call: "Call") -> None:
        """Codex said "retry later": the session's overloaded requests go again together
        after a backoff (doubling to 2 s while Codex keeps saying so).  Its reader goes on
        meanwhile (a sleep there would hold the replies to everything else it asked); the
        requests still count as in flight, which holds the transports back."""
        call.retries += 1
        with self._lock:
            self.count += 1
            session.overloaded.append((our_id, call, connection))
            if len(session.overloaded) > 1:
                return  # a resend is already due
            session.backoff = min(2.0, max(0.05, session.backoff * 2))
            delay = session.backoff
        timer = threading.Timer(delay, self._resend, (session,))
        timer.daemon = True
        timer.start()

    def _resend(self, session: "Session") -> None:
        """Every overloaded request of the session, again, as it was sent (its thread ids
        as ``confine`` made them), on the connection it was sent on if still the session's:
        one lost meanwhile has answered its requests."""
        with self._lock:
            due, session.overloaded = session.overloaded, []
            data = [(connection, rpc.encode(dict(call.sent, id=our_id)))
                    for our_id, call, connection in due
                    if session.connection is connection and session.calls.get(our_id) is call]
        for connection, item in data:
            connection.send(item)


class Connector:
    """A session's connection to Codex, opened in a thread of its own (an opening Codex may
    take seconds: other sessions go on meanwhile), its state replayed first; then what
    waited for it is handed on, in order, until nothing does (later messages then go
    straight on).  Nothing is left waiting when it ends, whatever fails."""

    def __init__(self, backend: CodexBackend):
        self._backend = backend
        self._table = backend.table
        self._lock = backend.lock

    def start(self, session: "Session") -> bool:
        """Under the lock: the session's connector thread; False when none can start."""
        try:  # (no state changed before the thread runs: it may not start)
            threading.Thread(target=self._run, args=(session,), daemon=True,
                             name=f"connect-{rpc.session_name(session.key)}").start()
        except RuntimeError as exc:
            log.error("session %s: cannot start its connector: %s",
                      rpc.session_name(session.key), exc)
            return False
        session.waiting = collections.deque()
        self._table.connecting.add(session)
        return True

    def _run(self, session: "Session") -> None:
        with self._lock:  # the processor sets these right after starting this thread
            while session.waiting is None:
                self._lock.wait(0.01)
        in_hand: List[Waiting] = []  # taken from what waits, not yet sent or refused
        try:
            self._drain(session, in_hand)
        except Exception:
            log.exception("internal error connecting session %s to codex",
                          rpc.session_name(session.key))
            with self._lock:
                left = in_hand + self._table.stop_holding(session)
                if session.connection is None:
                    self._table.release(session)  # (admitted, never connected)
                self._lock.notify_all()
            for item in left:
                self._backend.refuse(session, item, (rpc.INTERNAL_ERROR, "internal error in "
                                                     "codex-app-server (see its log)"))

    def _drain(self, session: "Session", in_hand: List["Waiting"]) -> None:
        connection, failure = self._open(session)
        while True:
            in_hand.clear()
            with self._lock:
                failure = _ending(session) or failure
                item = self._table.next_held(session)
                if item is None:
                    self._lock.notify_all()
                    return
                in_hand.append(item)
                self._lock.notify_all()
            if failure is not None:
                self._backend.refuse(session, item, failure)
            elif not self._backend.deliver(session, connection, item):
                if item.retried:
                    failure = (rpc.INTERNAL_ERROR, "codex app-server is not available: the "
                               "connection to it closed before it could take the request")
                    self._backend.refuse(session, item, failure)
                else:  # once more, on a new connection
                    item.retried = True
                    with self._lock:
                        self._table.hold(session, item, first=True)
                    in_hand.clear()
                    connection, failure = self._open(session)

    def _open(self, session: "Session") -> Tuple[Optional["CodexConnection"],
                                                 Optional[Tuple[Optional[int], str]]]:
        """(its new connection, None), its state replayed first; or (None, (code, text)):
        why it can have none."""
        lost = session.connection
        if lost is not None:  # its reader is telling the session, or stuck
            lost.ended.wait(1.0)
            self._backend.connection_lost(lost, "closed")
        with self._lock:
            failure = _ending(session)
            closing = None if failure is not None else self._table.wait_to_admit(session)
            if closing is False:
                failure = (SERVER_OVERLOADED, "server overloaded: every one of the "
                           f"{self._table.max_sessions} sessions (--max-sessions) is busy; "
                           "retry later")
        if failure is not None:
            return None, failure
        if closing is not None:
            closing.close()
        try:
            websocket, process = self._backend.codex.connect()
        except CodexUnavailable as exc:
            with self._lock:
                self._table.release(session)
            return None, (rpc.INTERNAL_ERROR, str(exc))
        connection = CodexConnection(websocket, process, session, self._backend.from_codex,
                                     self._backend.connection_lost)
        with self._lock:
            failure = _ending(session)  # while connecting
            if failure is not None:
                self._table.release(session)
            else:
                session.connection = connection
                replay = session.replay(functools.partial(self._backend.own_request, session))
        if failure is not None:
            connection.close()
            return None, failure
        connection.start()
        for data in replay:  # its state first: Codex takes a connection's messages in order
            connection.send(data)
        log.debug("session %s: connected to codex (%d messages replayed)",
                  rpc.session_name(session.key), len(replay))
        return connection, None


def _ending(session: "Session") -> Optional[Tuple[Optional[int], str]]:
    """Under the lock: why ``session`` may no longer reach Codex, or None.  Its code is
    None when what waits is not to be answered (the session moved)."""
    if session.moved:
        return None, "the session moved to another server"
    if session.cut:
        return rpc.INTERNAL_ERROR, "codex-app-server is shutting down"
    return None


class SessionTable:
    """Every client's ``Session``, by (transport, key), and which of them may hold a
    connection to Codex: at most ``max_sessions`` (admitted: holding one or opening one),
    the least recently used idle one closed to make room.  Closed sessions are kept for
    their state, the newest ``SESSION_MEMORY`` (clients choose keys).  It counts what is in
    flight to Codex and what waits for a connection (backpressure: ``wait_for_room``), and
    its reaper thread closes idle sessions and fails requests Codex has not answered in
    time.  The backend's ``lock`` guards it: its methods expect it held unless they say
    otherwise."""

    def __init__(self, lock: threading.Condition, max_sessions: int, idle_timeout: float,
                 request_timeout: float, max_in_flight: int):
        self.lock = lock
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_in_flight = max_in_flight
        self._sessions: "collections.OrderedDict[Tuple[Any, Optional[bytes]], Session]" = \
            collections.OrderedDict()  # least recently heard from first
        self._admitted: "collections.OrderedDict[Session, None]" = \
            collections.OrderedDict()  # least recently used first
        self.connecting: Set["Session"] = set()  # sessions whose connector runs
        self._in_flight = 0  # = the admitted sessions' calls: changed only with them, here
        self._held = 0  # = what the connecting sessions hold: changed only with it, here
        self._reaper: Optional[threading.Thread] = None
        self.stop_deadline = float("inf")  # shutdown's: nobody waits for room past it
        self.closed = False

    def session_for(self, transport: Any, route: rpc.Route, confined: bool) -> "Session":
        """(Takes the lock.)  The session of ``route`` on ``transport``, made (its state
        restored from the transport's store) if new; it follows ``route``."""
        key = (transport, route.session)
        with self.lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = Session(transport, route.session)
                session.confined = confined
                state = transport.store.load(route.session) if transport.store else None
                if state:  # saved by this server before a restart, or by another one
                    session.restore(state)
                self._forget_oldest()
            else:
                self._sessions.move_to_end(key)
            session.follow(route)
        return session

    def find(self, transport: Any, key: Optional[bytes]) -> Optional["Session"]:
        """The session of ``key`` on ``transport``, if there is one (for tests: a look
        without the lock)."""
        return self._sessions.get((transport, key))

    def _forget_oldest(self) -> None:
        # A closed session's state is small, but clients choose keys: keep the newest.
        excess = len(self._sessions) - max(SESSION_MEMORY, 2 * self.max_sessions)
        for old in list(itertools.islice(self._sessions, max(0, excess))):
            session = self._sessions[old]
            if session.connection is None and session.idle() \
                    and session not in self._admitted:  # (not connecting)
                del self._sessions[old]

    def forget_moved(self, transport: Any, partitions: Set[int]) -> List["Session"]:
        """The keyed sessions of ``transport`` last heard from on ``partitions``, forgotten
        and marked as moved (they save no more)."""
        moved = [session for (owner, key), session in self._sessions.items()
                 if owner is transport and key is not None and session.source in partitions]
        for session in moved:
            session.moved = True
            del self._sessions[session.transport, session.key]
        return moved

    def stats(self) -> Dict[str, int]:
        return {"sessions": len(self._admitted), "in_flight": self._in_flight}

    def live(self) -> List["Session"]:
        """The sessions holding a connection or opening one."""
        return list(self._admitted) + [session for session in self.connecting
                                       if session not in self._admitted]

    def admitted(self) -> List["Session"]:
        return list(self._admitted)

    # Admission ---------------------------------------------------------------

    def wait_to_admit(self, session: "Session") -> Any:
        """Admit ``session``, waiting a little for room (every session busy: one is often
        done within milliseconds, a burst of new clients each initializing); False when
        there is none, else the connection closed to make room (None: none), for the caller
        to close outside the lock."""
        wait_until = time.monotonic() + SESSION_WAIT
        closing = self._admit(session)
        while closing is False and time.monotonic() < wait_until and not self.closed:
            self.lock.wait(wait_until - time.monotonic())
            closing = self._admit(session)
        return closing

    def _admit(self, session: "Session") -> Any:
        if len(self._admitted) >= self.max_sessions:
            victim = next((other for other in self._admitted
                           if other.connection is not None and other.idle()), None)
            if victim is None:
                return False
            closing = self.detach(victim)
            log.info("session %s: connection to codex closed: least recently used, to make "
                     "room (--max-sessions)", rpc.session_name(victim.key))
        else:
            closing = None
        self._admitted[session] = None
        session.last_used = time.monotonic()
        if self._reaper is None and (self.idle_timeout or self.request_timeout):
            self._reaper = threading.Thread(target=self._reap, name="session-reaper",
                                            daemon=True)
            self._reaper.start()
        return closing

    def touch(self, session: "Session") -> None:
        session.last_used = time.monotonic()
        if session in self._admitted:
            self._admitted.move_to_end(session)

    def detach(self, session: "Session") -> Optional["CodexConnection"]:
        """Take the session's connection away (the caller closes it) and its place."""
        connection, session.connection = session.connection, None
        self._admitted.pop(session, None)
        return connection

    def release(self, session: "Session") -> None:
        """An admitted session that got no connection gives its place back."""
        self._admitted.pop(session, None)

    # What is in flight, and what waits -----------------------------------------

    def add_call(self, session: "Session", our_id: int, call: "Call") -> None:
        session.calls[our_id] = call
        self._in_flight += 1

    def pop_call(self, session: "Session", our_id: int) -> Optional["Call"]:
        call = session.calls.pop(our_id, None)
        if call is not None:
            self._in_flight -= 1
            self.lock.notify_all()
        return call

    def drop_calls(self, session: "Session") -> List["Call"]:
        """Every call of a session whose connection is lost (and what timed out)."""
        orphans, session.calls = list(session.calls.values()), {}
        session.late.clear()
        self._in_flight -= len(orphans)
        return orphans

    def hold(self, session: "Session", item: "Waiting", first: bool = False) -> None:
        """``item`` waits for the connection its connector is opening."""
        (session.waiting.appendleft if first else session.waiting.append)(item)
        self._held += 1

    def next_held(self, session: "Session") -> Optional["Waiting"]:
        """The first of what waits; None (and the connector done) when nothing does."""
        if not session.waiting:
            session.waiting = None
            self.connecting.discard(session)
            return None
        self._held -= 1
        return session.waiting.popleft()

    def stop_holding(self, session: "Session") -> List["Waiting"]:
        """Everything that waits, taken (its connector failed)."""
        left, session.waiting = list(session.waiting or ()), None
        self._held -= len(left)
        self.connecting.discard(session)
        return left

    def wait_for_room(self, with_held: bool = False) -> None:
        """Wait until fewer than ``max_in_flight`` are in flight (counting, ``with_held``,
        what waits for a connection, while any does), or shutdown's deadline."""
        with_held = with_held and self._held > 0
        while self._in_flight + (self._held if with_held else 0) >= self.max_in_flight \
                and not self.closed and time.monotonic() < self.stop_deadline:
            self.lock.wait(min(1.0, max(0.01, self.stop_deadline - time.monotonic())))
            with_held = with_held and self._held > 0

    def deadline(self) -> float:
        """When a request sent now times out (--request-timeout)."""
        return time.monotonic() + self.request_timeout if self.request_timeout \
            else float("inf")

    # The reaper ----------------------------------------------------------------

    def _reap(self) -> None:
        """Close idle sessions; fail the requests Codex has not answered in time."""
        tick = max(0.05, min(1.0, *(limit / 4 for limit in (self.idle_timeout,
                                                             self.request_timeout) if limit)))
        while True:
            time.sleep(tick)
            try:
                self._reap_once()
            except Exception:  # this thread must go on: timeouts and idle closing hang on it
                log.exception("internal error in the session reaper")

    def _reap_once(self) -> None:
        now = time.monotonic()
        with self.lock:  # decided and detached at once: nothing slips in between
            stale = [session for session in itertools.takewhile(
                lambda s: s.last_used < now - self.idle_timeout, self._admitted)
                if session.connection is not None and session.idle()] \
                if self.idle_timeout else []
            closing = [self.detach(session) for session in stale]
            expired = [(session, call) for session in self._admitted
                       for call in session.expired(now)] if self.request_timeout else []
            self._in_flight -= len(expired)
            waited = [(session, item) for session in self.connecting
                      for item in session.expired_waiting(now)]
            self._held -= len(waited)
            self.lock.notify_all()
        for session, connection in zip(stale, closing):
            log.info("session %s: connection to codex closed: idle for %g s "
                     "(--session-idle-timeout)", rpc.session_name(session.key),
                     self.idle_timeout)
            connection.close()
        for session, call in expired + waited:
            self._timed_out(session, call)

    def _timed_out(self, session: "Session", call: Any) -> None:
        request = call.request if isinstance(call, Call) else call.message
        msg_id = request.get("id")
        log.warning("session %s: %s request (id %r) timed out after %g s "
                    "(--request-timeout)%s", rpc.session_name(session.key),
                    request["method"][:200], msg_id, self.request_timeout,
                    "" if isinstance(call, Call) else
                    ", still waiting for its connection to codex")
        if msg_id is not None:
            session.transport.send(rpc.error_response(
                msg_id, rpc.INTERNAL_ERROR, "request timed out after "
                f"{self.request_timeout:g} s"), call.done, call.route)


class ServerRequests:
    """Codex's requests to clients (approvals): each goes out under an id no request of any
    run of any server has had (``RequestIds``), so a late answer never reaches a
    successor's request; only an answer from the session asked reaches the connection that
    asked, and only once.  One ``Asked`` per request, found by that id here and by Codex's
    id in its session's ``asked`` (kept by this class alone).  Under the backend's lock."""

    def __init__(self) -> None:
        self._by_id: Dict[int, Asked] = {}

    def ask(self, session: "Session", connection: "CodexConnection",
            request: Message) -> Message:
        """Codex's ``request`` as the client sees it."""
        params = request.get("params")
        asked = Asked(session, connection, request["id"], next(_SERVER_REQUEST_IDS),
                      params.get("threadId") if isinstance(params, dict) else None)
        self._by_id[asked.id] = session.asked[asked.codex_id] = asked
        return dict(request, id=asked.id)

    def answered(self, transport: Any, key: Optional[bytes], outward: Any) -> Optional["Asked"]:
        """The request a client's answer (to ``outward``) answers, when that client was
        asked; a second answer finds nothing."""
        asked = self._by_id.get(outward)
        if asked is None or (asked.session.transport, asked.session.key) != (transport, key):
            return None
        del self._by_id[outward]
        if asked.thread is not None:  # its serverRequest/resolved is still to come
            asked.answered = True
        elif asked.session.asked.get(asked.codex_id) is asked:  # (Codex may reuse an id)
            del asked.session.asked[asked.codex_id]
        return asked

    def resolved(self, session: "Session", codex_id: Any) -> Optional[int]:
        """Codex resolved its request ``codex_id`` (``serverRequest/resolved``): it is gone
        (an answer now would be stale); the id the client knows it by, None if never
        relayed."""
        asked = session.asked.pop(codex_id, None)
        if asked is None:
            return None
        self._by_id.pop(asked.id, None)
        return asked.id

    def withdraw(self, session: "Session") -> List["Asked"]:
        """Every request open on a session whose connection is lost."""
        withdrawn, session.asked = list(session.asked.values()), {}
        for asked in withdrawn:
            self._by_id.pop(asked.id, None)
        return withdrawn


SERVER_OVERLOADED = -32001  # Codex's own code for "retry later"
SESSION_MEMORY = 10000  # closed sessions whose state (initialize, threads) is kept
SESSION_WAIT = 1.0  # seconds a new session waits for an idle one to close, at --max-sessions
SESSION_THREADS = 1000  # threads a session resumes on a new connection, the newest
SESSION_OWNED = 10000  # threads a session owns (started or forked), the newest


class RequestIds:
    """Ids that no run of any server repeats: the wall clock in microseconds, or one more
    than the last id when they come faster.  So a late answer from before a restart finds
    nothing, and servers of one group (a session moves between them) do not issue the same
    id unless in the same microsecond.  Below 2**53 for clients that read numbers as
    doubles."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()  # the last id

    def __iter__(self) -> "RequestIds":
        return self

    def __next__(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, int(time.time() * 1_000_000))
            return self._last


# Ids of Codex's requests as the clients see them.
_SERVER_REQUEST_IDS = RequestIds()


class Call:
    """A request on its way through Codex: the client's request (``done`` and ``route`` for
    its reply; none for a request of the server's own), its deadline, the retries so far."""

    __slots__ = ("request", "done", "route", "deadline", "retries", "fakes", "sent")

    def __init__(self, request: Message, done: rpc.Done, route: rpc.Route, deadline: float):
        self.request, self.done, self.route = request, done, route
        self.deadline = deadline
        self.retries = 0
        self.fakes: Dict[str, str] = {}  # thread ids sent in place of another's -> theirs
        self.sent = request  # as sent to Codex (``confine``'s), without our id


class Waiting:
    """A client's message on its way to a connection being opened: ``deadline`` bounds the
    wait of a request (--request-timeout); ``retried`` once a connection failed to take it."""

    __slots__ = ("message", "done", "route", "deadline", "retried")

    def __init__(self, message: Message, done: rpc.Done, route: rpc.Route, deadline: float):
        self.message, self.done, self.route = message, done, route
        self.deadline = deadline
        self.retried = False


class Asked:
    """One of Codex's requests to a client: the session and connection it came on, Codex's
    id for it, the id the client knows it by, the thread it names (None: none), and
    whether the client answered it (Codex's ``serverRequest/resolved`` still to come)."""

    __slots__ = ("session", "connection", "codex_id", "id", "thread", "answered")

    def __init__(self, session: "Session", connection: Any, codex_id: Any, outward: int,
                 thread: Any):
        self.session, self.connection, self.codex_id = session, connection, codex_id
        self.id, self.thread = outward, thread
        self.answered = False


def _failure_notices(why: str, withdrawn: List[Asked],
                     turns: Dict[str, Tuple[Any, Message]]) -> List[Message]:
    """What Codex itself sends when a turn fails, so clients need no special case: its open
    requests withdrawn first, then ``error`` and a failed ``turn/completed`` per turn."""
    notices: List[Message] = [
        {"method": "serverRequest/resolved", "params": {"threadId": asked.thread,
                                                        "requestId": asked.id}}
        for asked in withdrawn if isinstance(asked.thread, str)]  # (it names a thread)
    now = time.time()
    for turn_id, (thread_id, turn) in turns.items():
        error = {"message": why, "codexErrorInfo": "other", "additionalDetails": None,
                 "misalignment": None}
        notices.append({"method": "error", "params": {
            "error": error, "willRetry": False, "threadId": thread_id, "turnId": turn_id}})
        started = turn.get("startedAt")
        notices.append({"method": "turn/completed", "params": {
            "threadId": thread_id, "turn": dict(
                turn, items=[], itemsView="notLoaded", status="failed", error=error,
                completedAt=int(now),
                durationMs=int((now - started) * 1000) if _is_number(started) else None)}})
    return notices


def _overloaded(call: Call, reply: Message) -> bool:
    """Codex's "retry later", not yet retried 8 times: asked again, not passed on."""
    error = reply.get("error")
    return isinstance(error, dict) and error.get("code") == SERVER_OVERLOADED \
        and call.retries < 8


class Session:
    """One client of Codex: its connection, what is open on it, and what a new connection
    must be told (``initialize``, ``initialized``, the threads it loaded).  The backend's
    lock guards it."""

    def __init__(self, transport: Any, key: Optional[bytes]):
        self.transport = transport  # where its replies go
        self.key = key
        self.route = rpc.Route(key)  # where what Codex sends unasked goes
        self.connection: Optional[CodexConnection] = None
        self.last_used = time.monotonic()
        self.init_params: Optional[Any] = None
        self.init_result: Optional[Any] = None
        self.initialized = False  # the client sent the `initialized` notification
        self.threads: Dict[str, None] = {}  # loaded threads, oldest first
        self.owned: Dict[str, None] = {}  # threads it started or forked, oldest first
        self.confined = False  # it may use only the threads it owns
        self.calls: Dict[int, Call] = {}  # our id -> a request Codex has not answered
        self.late: Dict[int, Message] = {}  # our id -> a request that timed out (the newest)
        # Codex's id of each of its unresolved requests to the client (ServerRequests' index)
        self.asked: Dict[Any, Asked] = {}
        self.turns: Dict[str, Tuple[Any, Message]] = {}  # running turn id -> (thread id, turn)
        self.source: Optional[int] = None  # the input partition it was last heard from
        self.changed = False  # its state may have changed since it was saved
        self.moved = False  # its partition moved to another server: it is closing
        self.cut = False  # its connection was closed for good: what waits is refused
        self.sending = 0  # messages handed straight to its connection, not yet sent
        # Codex said "retry later" to these: (our id, the call, the connection it was sent on)
        self.overloaded: List[Tuple[int, Call, Any]] = []
        self.backoff = 0.0  # seconds before they go again
        # While a connector opens its connection: what is to be sent on it, in order.
        self.waiting: Optional[Deque[Waiting]] = None
        self.saving = threading.Lock()  # its saves, in order (taken before the backend's)
        self._next_id = 1

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def expired(self, now: float) -> List[Call]:
        """Move the requests past their deadline from ``calls`` to ``late``."""
        out = [(our_id, call) for our_id, call in self.calls.items() if call.deadline <= now]
        if len(self.late) + len(out) > 1000:
            self.late.clear()  # only for a clearer warning: no need to keep all
        for our_id, call in out:
            del self.calls[our_id]
            self.late[our_id] = call.request
        return [call for _, call in out]

    def expired_waiting(self, now: float) -> List["Waiting"]:
        """Take the requests waiting for a connection past their deadline."""
        if not self.waiting or all(item.deadline > now for item in self.waiting):
            return []
        out = [item for item in self.waiting if item.deadline <= now]
        self.waiting = collections.deque(item for item in self.waiting if item.deadline > now)
        return out

    def idle(self) -> bool:
        """Nothing in flight: no request on its way or unanswered, no running turn, no
        open approval, no connector (it holds what it has not sent yet)."""
        return not (self.calls or self.turns or self.waiting is not None or self.sending
                    or any(not asked.answered for asked in self.asked.values()))

    def follow(self, route: rpc.Route) -> None:
        """A reply topic or partition the client names holds for what Codex sends unasked."""
        if route.source is not None:
            self.source = route.source
        if route.topic is not None:
            self.route = rpc.Route(self.key, route.topic, route.partition)
        elif route.partition is not None:
            self.route = rpc.Route(self.key, self.route.topic, route.partition)

    def state(self) -> bytes:
        """What the session store keeps: what a new connection is told (``replay``)."""
        return rpc.encode({"initialize": self.init_params, "result": self.init_result,
                           "initialized": self.initialized, "threads": list(self.threads),
                           "owned": list(self.owned)})

    def restore(self, state: bytes) -> None:
        """Take the state a server saved (``state``); a broken one is ignored."""
        try:
            saved = json.loads(state)
            rpc.encode(saved)  # what is replayed must be strict JSON
            threads, result, owned = saved["threads"], saved["result"], saved.get("owned", [])
            if not (isinstance(threads, list) and all(isinstance(t, str) for t in threads)
                    and isinstance(owned, list) and all(isinstance(t, str) for t in owned)
                    and isinstance(result, (dict, type(None)))
                    and isinstance(saved["initialize"], (dict, list, type(None)))):
                raise TypeError("not a saved session state")
            if result is not None:
                self.init_params, self.init_result = saved["initialize"], result
                self.initialized = saved["initialized"] is True
            self.threads = dict.fromkeys(threads[-SESSION_THREADS:])
            self.owned = dict.fromkeys(owned[-SESSION_OWNED:])
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            log.warning("session %s: ignoring its saved state: %r", rpc.session_name(self.key),
                        exc)

    def replay(self, own: Callable[[str, Any], bytes]) -> List[bytes]:
        """What a new connection is told before the client's next message; ``own(method,
        params)`` makes a request of the server's own."""
        if self.init_result is None:
            self.init_params = None  # unanswered, lost with the connection: none to replay
            return []
        out = [own("initialize", self.init_params)]
        if self.initialized:
            out.append(rpc.encode({"method": "initialized"}))
        if self.confined:  # (resumed under --shared-threads, or saved before owners were)
            self.threads = {thread: None for thread in self.threads if thread in self.owned}
        out.extend(own("thread/resume", {"threadId": thread}) for thread in self.threads)
        return out

    def answered(self, request: Message, reply: Message) -> None:
        """Learn from Codex's reply to ``request``."""
        method, result = request["method"], reply.get("result")
        self.changed |= method == "initialize" or method.startswith("thread/")
        if method == "initialize":
            if result is not None and request.get("id") is not None:
                self.init_result = result
            elif result is None and (self.init_result is None or request.get("id") is None):
                if request.get("id") is None:
                    log.warning("session %s: codex refused its replayed initialize: %s",
                                rpc.session_name(self.key), str(reply.get("error"))[:300])
                self.init_params = self.init_result = None  # the next one goes to Codex
        elif isinstance(result, dict) and method in ("thread/start", "thread/resume",
                                                     "thread/fork"):
            thread = result.get("thread")
            if isinstance(thread, dict) and isinstance(thread.get("id"), str):
                self.threads.pop(thread["id"], None)
                self.threads[thread["id"]] = None
                if len(self.threads) > SESSION_THREADS:
                    del self.threads[next(iter(self.threads))]
                if method != "thread/resume":  # a new thread: the session's own
                    self.owned[thread["id"]] = None
                    if len(self.owned) > SESSION_OWNED:
                        del self.owned[next(iter(self.owned))]
        elif result is None and method == "thread/resume" and request.get("id") is None:
            params = request.get("params") or {}
            self.threads.pop(params.get("threadId"), None)  # gone: resume it no more
            log.warning("session %s: could not resume thread %s on a new connection: %s",
                        rpc.session_name(self.key), params.get("threadId"),
                        str(reply.get("error"))[:300])
        elif result is not None and method in ("thread/unsubscribe", "thread/archive"):
            params = request.get("params")
            if isinstance(params, dict):
                self.threads.pop(params.get("threadId"), None)

    def notified(self, notification: Message,
                 requests: "ServerRequests") -> Optional[Message]:
        """Track what a lost connection must end; rewrite the request ids notifications name."""
        method, params = notification["method"], notification.get("params")
        if not isinstance(params, dict):
            return notification
        if method == "thread/started" and isinstance(params.get("thread"), dict):
            self.adopt(params["thread"])
        if self.confined and not self.may_see(params):
            if method == "serverRequest/resolved":  # (never relayed: nothing to tell)
                requests.resolved(self, params.get("requestId"))
            return None  # another session's thread (Codex tells every connection of some)
        if method == "turn/started" or method == "turn/completed":
            turn = params.get("turn")
            if isinstance(turn, dict) and isinstance(turn.get("id"), str):
                if method == "turn/started":
                    self.turns[turn["id"]] = (params.get("threadId"), turn)
                else:
                    self.turns.pop(turn["id"], None)
        elif method == "serverRequest/resolved":
            outward = requests.resolved(self, params.get("requestId"))
            if outward is None:  # never relayed: its id means nothing to the client
                return None
            return dict(notification, params=dict(params, requestId=outward))
        return notification



    def adopt(self, thread: Dict[str, Any]) -> None:
        """A thread Codex made within one of the session's own (a sub-agent's, or one
        attached to it) is the session's too."""
        parent = thread.get("parentThreadId") or thread.get("attachedToThreadId")
        if isinstance(parent, str) and parent in self.owned and isinstance(thread.get("id"), str) \
                and thread["id"] not in self.owned:
            self.owned[thread["id"]] = None
            self.changed = True

    def may_see(self, params: Any) -> bool:
        """Whether a notification with these params is this session's: one that names a
        thread (``threadId``, or ``thread.id`` as in ``thread/started``) names its own."""
        if not isinstance(params, dict):
            return True
        thread = params.get("threadId")
        if thread is None and isinstance(params.get("thread"), dict):
            thread = params["thread"].get("id")
        return not isinstance(thread, str) or thread in self.owned

    def confine(self, request: Message) -> Tuple[Any, Dict[str, str]]:
        """The request to send for this session: every thread id its params name that is
        not its own (``threadId``, ``…ThreadId``, ``…ThreadIds``, ``threads``; any string that is
        not one of its threads) replaced by a fresh id no thread has, so Codex gives the
        error it gives for a thread that does not exist (no oracle of which ids exist);
        (that request, {fresh id: the client's}).  A str instead: why the request is refused
        outright (params by position, which would name a thread by no name)."""
        params = request.get("params")
        if not self.confined or params is None:
            return request, {}
        method = request["method"]
        if not isinstance(params, dict):  # (Codex takes a struct's fields by position too)
            return f"{method}: params must be an object for this session, its members by " \
                   "name (the server runs without --shared-threads)", {}
        if method in CONFINED_REFUSED:
            return f"{method} is not available to this session: {CONFINED_REFUSED[method]} " \
                   "(the server runs without --shared-threads)", {}
        if method in ("thread/resume", "thread/fork") and params.get("path") is not None:
            return f"{method} by path is not available to this session: name the thread by " \
                   "its threadId (the server runs without --shared-threads)", {}
        fakes: Dict[str, str] = {}

        def own(value: Any) -> Any:
            if isinstance(value, list):
                return [own(item) for item in value]
            if not isinstance(value, str) or _canonical_uuid(value) in self.owned:
                return value  # its own (in any spelling Codex takes), or no id at all
            fake = str(uuid.uuid4())
            fakes[fake] = value
            return fake
        named = {key: own(value) for key, value in params.items() if _THREAD_KEY.search(key)}
        if not fakes:
            return request, {}
        return dict(request, params=dict(params, **named)), fakes

    def unconfine(self, call: "Call", reply: Message) -> Message:
        """Codex's reply as this session may see it: the client's thread ids back in an
        error, and in a listing only the threads it owns."""
        if "error" in reply and call.fakes:
            return dict(reply, error=_replaced(reply["error"], call.fakes))
        where = THREAD_LISTS.get(call.request["method"])
        result = reply.get("result")
        if where is None or not isinstance(result, dict) or not isinstance(
                result.get("data"), list):
            return reply

        def thread_of(item: Any) -> Any:
            for key in where:
                item = item.get(key) if isinstance(item, dict) else None
            return item
        result = dict(result, data=[item for item in result["data"]
                                    if thread_of(item) in self.owned])
        if isinstance(result.get("readStates"), dict):
            result["readStates"] = {thread: state for thread, state
                                    in result["readStates"].items() if thread in self.owned}
        return dict(reply, result=result)


# What confined sessions' listings show: the path to each item's thread id (none: the item
# is the id).
THREAD_LISTS: Dict[str, Tuple[str, ...]] = {
    "thread/list": ("id",), "thread/loaded/list": (), "thread/search": ("thread", "id"),
    "thread/attachmentOwner/list": ("threadId",)}
# What confined sessions may not call at all, and why.
CONFINED_REFUSED = {
    "thread/search/stream": "its partial results name every session's threads; use "
                            "thread/search"}
_THREAD_KEY = re.compile(r"thread(_?ids?|s)$", re.IGNORECASE)  # (project/import: threads)


def _replaced(value: Any, fakes: Dict[str, str]) -> Any:
    """``value`` with each fake id in its strings put back as the client's own."""
    if isinstance(value, str):
        for fake, original in fakes.items():
            value = value.replace(fake, original)
        return value
    if isinstance(value, list):
        return [_replaced(item, fakes) for item in value]
    if isinstance(value, dict):
        return {key: _replaced(item, fakes) for key, item in value.items()}
    return value


def _canonical_uuid(text: str) -> Optional[str]:
    """The one spelling of a UUID that Codex writes (it also takes upper case, no hyphens,
    braces, a urn:uuid: prefix); None for a string that is none."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


class CodexUnavailable(Exception):
    """Codex cannot take a connection; the message says why."""


class CodexConnection:
    """One session's WebSocket to Codex.  A reader thread relays each message Codex sends
    to ``on_message(connection, message)``, and the connection's end, once, to
    ``on_end(connection, why)``."""

    def __init__(self, websocket: Any, process: subprocess.Popen, session: Session,
                 on_message: Callable[["CodexConnection", Message], None],
                 on_end: Callable[["CodexConnection", str], None]):
        self.session = session
        self.process = process  # the Codex it connects to
        self.lost = False  # its end is being told
        self.ended = threading.Event()  # told
        self._websocket = websocket
        self._name = name = rpc.session_name(session.key)
        self._on_message = on_message
        self._on_end = on_end
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"codex-session-{name}")

    def start(self) -> None:
        """Start relaying (once the session holds it: what Codex sends is the session's)."""
        self._reader.start()

    def send(self, data: bytes) -> bool:
        """One encoded message as one text frame; False when the connection is gone."""
        try:
            self._websocket.send(data, text=True)
            return True
        except Exception as exc:  # closed, or the socket failed: the reader tells the rest
            log.debug("session %s: cannot send to codex: %r", self._name, exc)
            return False

    def close(self) -> None:
        """At once, without the closing handshake a busy Codex could hold up: Codex takes
        the end of the socket as the client gone."""
        try:
            self._websocket.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # gone already
        try:
            self._websocket.close()
        except Exception as exc:
            log.debug("session %s: closing the connection to codex: %r", self._name, exc)

    def _read(self) -> None:
        throttle = rpc.LogThrottle()
        why = "closed"
        try:
            while True:
                data = self._websocket.recv(decode=False)
                try:
                    # Codex's own nesting limit is deeper than the one for clients.
                    message = rpc.decode(data, max_depth=None)
                except rpc.InvalidMessage as exc:
                    throttle.warning(log, "session %s: skipping a message from codex that "
                                     "cannot be relayed (%d bytes): %s", self._name, len(data),
                                     exc.reason)
                    self._unrelayable(data, exc.reason)
                    continue
                try:
                    self._on_message(self, message)
                except Exception:  # this thread must live on to tell the connection's end
                    log.exception("internal error relaying a message from codex")
        except Exception as exc:  # websockets' ConnectionClosed, or the socket failing
            why = str(exc) or exc.__class__.__name__  # websockets names a close's code
        finally:
            self.lost = True
            try:
                self._on_end(self, why)
            finally:
                self.ended.set()

    def _unrelayable(self, data: bytes, reason: str) -> None:
        """Whoever waits on a message that cannot be relayed hears so, instead of nothing."""
        what, msg_id = rpc.peek(data, True)
        text = f"could not be relayed: {reason}"
        if what == rpc.RESPONSE and msg_id is not None:  # the client gets an error reply
            self._on_message(self, rpc.error_response(msg_id, rpc.INTERNAL_ERROR,
                                                      f"codex app-server's reply {text}"))
        elif what == rpc.REQUEST and msg_id is not None:  # Codex's request fails at once
            self.send(rpc.encode(rpc.error_response(msg_id, rpc.INTERNAL_ERROR,
                                                    f"the request {text}")))


class CodexProcess:
    """The server's one ``codex app-server --listen unix://SOCKET``, started at the first
    connection and again after it exits, its socket in a directory only this user can
    read.  A watcher process stops its process group once this server is gone, however
    it went (kill -9 included).  Its stdout and stderr go to the log, rate-limited."""

    START_TIMEOUT = 20.0  # to listen: the npm launcher on a cold cache takes a second or two
    RETRY_AFTER = 10.0  # after a failed start, requests fail at once for this long

    def __init__(self, argv: Sequence[str], max_size: int = CODEX_LINE_LIMIT):
        self.argv = list(argv)
        self.max_size = max_size
        self.starts = 0
        self.last_heard = 0.0  # when the running Codex last sent a session anything
        self._lock = threading.Lock()  # the process and its state; held while it starts
        self._process: Optional[subprocess.Popen] = None
        self._socket = ""
        self._ended: Optional[threading.Thread] = None  # tidies up after the process
        self._stopping = False
        self._failure, self._failed_until = "", 0.0

    @property
    def process(self) -> Optional[subprocess.Popen]:
        """The Codex process running now (or last), None before the first start."""
        return self._process

    def connect(self) -> Tuple[Any, subprocess.Popen]:
        """A new WebSocket connection to Codex (started when it is not running), and the
        process; CodexUnavailable naming why there is none, within START_TIMEOUT whatever
        Codex does (a Codex that takes the socket but never answers the handshake too)."""
        from websockets.sync.client import unix_connect
        direct = {"legacy": True} if "legacy" in inspect.signature(unix_connect).parameters \
            else {}  # websockets 16 and later: connect outside a ``with`` block
        deadline = time.monotonic() + self.START_TIMEOUT
        restarted = False
        while True:
            with self._lock:
                if self._stopping:
                    raise CodexUnavailable("codex-app-server is shutting down")
                if time.monotonic() < self._failed_until:  # no start attempt per request
                    raise CodexUnavailable(self._failure)
                if self._process is None or self._process.poll() is not None:
                    # (a Codex on its way out when this began: one restart, same deadline)
                    if restarted:
                        self._fail(f"codex app-server exited with "
                                   f"{_how(self._process.returncode)} before it took a "
                                   "connection")
                    self._start()
                    restarted = self._process is not None
                process, path = self._process, self._socket
            try:
                return unix_connect(path, max_size=self.max_size, ping_interval=None,
                                    close_timeout=1, compression=None, open_timeout=max(
                                        0.05, deadline - time.monotonic()), **direct), process
            except Exception as exc:  # not listening yet (OSError), a refused handshake
                if process.poll() is None and time.monotonic() >= deadline:
                    why = f"codex app-server did not take a connection on its socket within " \
                          f"{self.START_TIMEOUT:g} s ({exc or type(exc).__name__})"
                    if time.monotonic() - self.last_heard < self.START_TIMEOUT:
                        # Slow, not wedged: it answers other sessions (a burst of new ones,
                        # say), whose turns a kill would end.
                        log.warning("%s; it answers other sessions, so it goes on", why)
                        raise CodexUnavailable(why)
                    self._signal(process, signal.SIGKILL)
                    with self._lock:
                        self._fail(f"{why}; stopped it")
                if process.poll() is None:
                    time.sleep(0.02)

    def _fail(self, failure: str) -> None:
        """Under the lock: Codex cannot be had; requests fail at once for RETRY_AFTER."""
        if time.monotonic() >= self._failed_until:  # (sessions connecting at once: one line)
            log.error("%s", failure)
        self._failure = failure
        self._failed_until = time.monotonic() + self.RETRY_AFTER
        raise CodexUnavailable(failure)

    def stop(self, deadline: float) -> None:
        """SIGTERM to its process group; SIGKILL when it has not gone by the deadline."""
        with self._lock:
            self._stopping = True
            process, ended = self._process, self._ended
        if process is not None and process.poll() is None:
            self._signal(process, signal.SIGTERM)
            try:
                process.wait(max(0.5, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("codex app-server (pid %d) did not exit: killing it", process.pid)
                self._signal(process, signal.SIGKILL)
                process.wait()
        if ended is not None:
            ended.join(5.0)

    def _start(self) -> None:
        env = {name: value for name, value in os.environ.items()
               if name not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}  # ours alone
        env.setdefault("NO_COLOR", "1")  # Codex colours its stderr log even into a pipe
        directory = tempfile.mkdtemp(prefix="codex-app-server-")  # mode 0700
        path = os.path.join(directory, "codex.sock")
        try:
            process = subprocess.Popen(self.argv + ["--listen", "unix://" + path],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            log.error("cannot start codex app-server (%s): %s", " ".join(self.argv), exc)
            raise CodexUnavailable(f"cannot start codex app-server: {exc}") from None
        log.info("started codex app-server (pid %d) listening in %s", process.pid, directory)
        self.starts += 1
        self.last_heard = 0.0
        self._process, self._socket = process, path
        watch = self._start_watcher(process.pid, directory)
        for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr")):
            threading.Thread(target=self._log_output, args=(process, stream), daemon=True,
                             name=f"codex-{process.pid}-{name}").start()
        self._ended = threading.Thread(target=self._tidy, args=(process, watch, directory),
                                       daemon=True, name=f"codex-{process.pid}-wait")
        self._ended.start()

    @staticmethod
    def _start_watcher(pid: int, directory: str) -> Optional[int]:
        """A tiny process that stops Codex's process group once this server is gone: it
        waits for the end of a pipe only this server holds.  Portable (sh, cat, kill),
        unlike Linux's parent-death signal."""
        read_end = write_end = None
        try:
            read_end, write_end = os.pipe()
            subprocess.Popen(["sh", "-c", _WATCHER, "codex-app-server-watch", str(pid),
                              directory],
                             stdin=read_end, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
            return write_end
        except OSError as exc:
            log.warning("cannot start the watcher of codex app-server (pid %d): %s; it may "
                        "outlive a server that is killed", pid, exc)
            if write_end is not None:
                os.close(write_end)
            return None
        finally:
            if read_end is not None:
                os.close(read_end)

    def _tidy(self, process: subprocess.Popen, watch: Optional[int], directory: str) -> None:
        """Once it has exited (the launcher, that is): end its watcher, which stops what is
        left of its group, and remove its directory."""
        status = process.wait()
        if watch is not None:
            os.close(watch)  # the watcher stops what is left of the group, then exits
        shutil.rmtree(directory, ignore_errors=True)
        (log.info if self._stopping else log.error)("codex app-server (pid %d) exited with %s",
                                                    process.pid, _how(status))

    @staticmethod
    def _log_output(process: subprocess.Popen, stream: Any) -> None:
        throttle = rpc.LogThrottle(burst=200)
        for line, size, _ in LineReader(stream.fileno(), 64 * 1024):
            text = _ANSI.sub("", line.decode("utf-8", "replace")).rstrip() if line is not None \
                else f"(a line of {size} bytes)"
            if text:
                throttle.warning(log, "codex[%d]: %s", process.pid, text)

    @staticmethod
    def _signal(process: subprocess.Popen, signum: int) -> None:
        try:
            os.killpg(process.pid, signum)  # the launcher and the binary it started
        except OSError:
            try:
                process.send_signal(signum)
            except OSError:
                pass


def _exit_reason(process: subprocess.Popen, wait: float) -> Optional[str]:
    """How ``process`` exited ("status 1", "signal 9"), waiting up to ``wait`` seconds for it
    to go; None while it runs."""
    try:
        return _how(process.wait(wait))
    except subprocess.TimeoutExpired:
        return None


def _how(status: int) -> str:
    return f"signal {-status}" if status < 0 else f"status {status}"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The watcher (sh): wait until the server's pipe ends, remove Codex's directory $2, then stop
# the group of $1: TERM, and KILL two seconds later for whatever is still there (a launcher's
# child, say).
# POSIX "kill -s SIG -- -PGID" (dash takes no "-TERM --"); busybox wants it without "--".
_WATCHER = ('cat >/dev/null; rm -rf "$2"; { kill -s TERM -- "-$1" || kill -s TERM "-$1"; } 2>/dev/null '
            '|| exit 0; sleep 2; { kill -s KILL -- "-$1" || kill -s KILL "-$1"; } 2>/dev/null; '
            'exit 0')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _platform_os() -> str:
    for prefix, name in (("linux", "linux"), ("darwin", "macos"), ("win", "windows"),
                         ("openbsd", "openbsd"), ("freebsd", "freebsd"), ("netbsd", "netbsd")):
        if sys.platform.startswith(prefix):
            return name
    return sys.platform


def backend_for(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Backend:
    if args.backend == "builtin":
        return BuiltinBackend(args.builtin_delay)
    command = args.codex_command or os.environ.get("CODEX_APP_SERVER_COMMAND") \
        or DEFAULT_CODEX_COMMAND
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        parser.error(f"--codex-command: {exc}")
    if not argv or shutil.which(argv[0]) is None:
        parser.error(f"Codex not found: cannot run {command!r}. Install Codex with "
                     "'npm install -g @openai/codex', or point --codex-command (or "
                     "$CODEX_APP_SERVER_COMMAND) at 'codex app-server', or use "
                     "--backend builtin for transport smoke tests.")
    return CodexBackend(CodexProcess(argv, max_size=max(args.max_message_bytes,
                                                        CODEX_LINE_LIMIT)),
                        args.max_sessions, args.session_idle_timeout, args.request_timeout,
                        max_in_flight=args.queue_size, shared_threads=args.shared_threads)


if __name__ == "__main__":
    sys.exit(main())
