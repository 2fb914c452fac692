"""codex-app-server: the Codex app-server JSON-RPC protocol over stdio and Apache Kafka.

Run ``python codex_app_server.py --help``.  Stdio needs only the standard
library; the Kafka transport (``kafka_transport.py``, next to this file) needs
kafka-python, imported only when a Kafka flag is given.

Shape, after CPython's socketserver: each transport runs a blocking loop in its
own thread and pushes (transport, message, done, route) into one queue; the
``Processor`` hands each message to that transport's backend; backend output
goes straight back to the transport with the route it came with.  A shutdown
Event stops intake, the processor drains, backends finish, then transports
flush, commit and close.

Sections: command line; server (``Server``, ``SystemdNotifier``, ``Processor``,
``MethodPolicy``); stdio
(``StdioTransport``, ``LineReader``); backends (``BuiltinBackend``,
``CodexBackend`` and its ``CodexChild``).
"""

import argparse
import collections
import fnmatch
import itertools
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
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import kafka_transport as rpc

__version__ = "0.1.0"

log = logging.getLogger("codex_app_server")

Message = Dict[str, Any]
# A client's request, its transport acknowledgement, and the route its reply takes.
Pending = Tuple[Message, rpc.Done, rpc.Route]

# Flags that are Kafka client properties: the top layer over file, environment and -X.
KAFKA_PROPERTY_FLAGS = {"kafka_bootstrap_servers": "bootstrap.servers",
                        "kafka_group_id": "group.id", "kafka_client_id": "client.id",
                        "kafka_offset_reset": "auto.offset.reset"}
KAFKA_FLAGS = tuple(KAFKA_PROPERTY_FLAGS) + (
    "kafka_input_topic", "kafka_output_topic", "kafka_property", "kafka_config",
    "kafka_connect_timeout", "kafka_max_message_bytes", "kafka_dead_letter_topic",
    "kafka_reply_topic_pattern")
DEFAULT_CODEX_COMMAND = "codex app-server"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # Kafka's default record limit is 1 MiB
CODEX_LINE_LIMIT = 64 * 1024 * 1024  # Codex's replies (a thread's history, a file) can be big


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: parse flags, serve until shutdown, return the exit status."""
    parser = build_parser()
    args = parse_args(parser, argv)
    configure_logging(args.log_level, secrets=[
        value for key, value in getattr(args, "kafka_properties", {}).items()
        if key in rpc.SECRET_PROPERTIES])
    backend_factory = backend_factory_for(args, parser)
    policy = MethodPolicy(args.allow_method or (), args.deny_method or ()) \
        if args.allow_method or args.deny_method else None
    server = Server(backend_factory, shutdown_timeout=args.shutdown_timeout,
                    queue_size=args.queue_size, max_message_bytes=args.max_message_bytes,
                    policy=policy)
    if args.kafka:
        server.add_kafka(args)
    if args.stdio:
        server.add_stdio()
    server.install_signal_handlers()
    return server.serve_forever()


# --- command line ----------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codex-app-server",
        description="Carry the Codex app-server JSON-RPC protocol over stdio and Apache Kafka "
                    "topics. Without Kafka flags, serve stdio only.")
    kafka = parser.add_argument_group(
        "Kafka", "Any Kafka flag enables the Kafka transport; the bootstrap servers, both topics "
                 "and the group id are then required.")
    kafka.add_argument("--kafka-bootstrap-servers", metavar="HOST:PORT[,...]", type=_servers,
                       help="comma-separated broker list")
    kafka.add_argument("--kafka-input-topic", metavar="TOPIC", type=_topic,
                       help="topic carrying inbound JSON-RPC messages")
    kafka.add_argument("--kafka-output-topic", metavar="TOPIC", type=_topic,
                       help="topic for outbound responses and notifications")
    kafka.add_argument("--kafka-group-id", metavar="GROUP", type=_nonempty,
                       help="consumer group of this server")
    kafka.add_argument("--kafka-client-id", metavar="ID", type=_nonempty,
                       help="client id of consumer and producer (default: codex-app-server)")
    kafka.add_argument("--kafka-offset-reset", choices=("latest", "earliest"),
                       help="where a group without committed offsets starts (default: latest)")
    kafka.add_argument("--kafka-max-message-bytes", metavar="BYTES", type=_message_bytes,
                       help="largest record the server produces; a larger reply becomes a "
                            "JSON-RPC error (default: 1048576)")
    kafka.add_argument("--kafka-dead-letter-topic", metavar="TOPIC", type=_topic,
                       help="send every unusable input record here, unchanged, with headers "
                            "naming its origin and the reason")
    kafka.add_argument("--kafka-reply-topic-pattern", metavar="REGEX", type=_pattern,
                       help="reply topics a request may name in its reply-topic header "
                            "(kafka_replyTopic, REPLY_TOPIC, reply_to) must match this whole; "
                            "others get a JSON-RPC error on the output topic (default: any)")
    kafka.add_argument("--kafka-config", metavar="FILE",
                       help="librdkafka/Java properties file (key=value) of client properties; "
                            "the environment, -X and flags take precedence")
    kafka.add_argument("--kafka-connect-timeout", metavar="SECONDS", type=_seconds,
                       help="how long start-up may take to find a TLS or SASL failure that "
                            "retrying cannot fix, before exiting 3 (default: 30)")
    kafka.add_argument("-X", "--kafka-property", metavar="KEY=VALUE", action="append",
                       type=_property,
                       help="librdkafka/Java client property, e.g. session.timeout.ms=10000 "
                            "(repeatable)")
    parser.add_argument("--stdio", action="store_true",
                        help="keep the stdio transport on alongside Kafka (default with no Kafka "
                             "flag)")
    parser.add_argument("--backend", choices=("codex", "builtin"), default="codex",
                        help="what answers: a 'codex app-server' child per connection, or the "
                             "built-in initialize/noop backend for smoke tests (default: codex)")
    parser.add_argument("--codex-command", metavar="COMMAND",
                        help="command line of the Codex child (default: $CODEX_APP_SERVER_COMMAND "
                             f"or '{DEFAULT_CODEX_COMMAND}')")
    parser.add_argument("--builtin-delay", metavar="SECONDS", type=_seconds, default=0.0,
                        help="builtin backend: wait this long before each reply, to load-test "
                             "a transport against a slow backend (default: 0)")
    parser.add_argument("--max-message-bytes", metavar="BYTES", type=_message_bytes,
                        default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="largest message the server reads: a longer stdin line or Kafka "
                             "record is answered with a JSON-RPC error and skipped without "
                             f"being held in memory (default: {DEFAULT_MAX_MESSAGE_BYTES})")
    parser.add_argument("--allow-method", metavar="PATTERN", action="append", type=_glob,
                        help="take only the client methods matching one of these shell-style "
                             "patterns, e.g. 'thread/*' (repeatable; default: every method)")
    parser.add_argument("--deny-method", metavar="PATTERN", action="append", type=_glob,
                        help="refuse the client methods matching this shell-style pattern, e.g. "
                             "'account/*' (repeatable; wins over --allow-method): a request "
                             "gets -32601, a notification is dropped")
    parser.add_argument("--queue-size", metavar="N", type=_positive_int, default=1000,
                        help="messages the processor queue holds; when full, Kafka partitions "
                             "are paused and stdin is not read (default: 1000)")
    parser.add_argument("--shutdown-timeout", metavar="SECONDS", type=_seconds, default=30.0,
                        help="how long shutdown waits for in-flight work (default: 30)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level on stderr (default: INFO)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_args(parser: argparse.ArgumentParser,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and cross-check flags; usage errors exit 2 through ``parser.error``."""
    args = parser.parse_args(argv)
    args.kafka = any(getattr(args, name) is not None for name in KAFKA_FLAGS)
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
                       if getattr(args, flag) is not None})
    properties.setdefault("client.id", "codex-app-server")
    properties.setdefault("auto.offset.reset", "latest")
    missing = [flag for flag, present in (
        ("--kafka-bootstrap-servers", "bootstrap.servers" in properties),
        ("--kafka-input-topic", args.kafka_input_topic), ("--kafka-output-topic",
                                                          args.kafka_output_topic),
        ("--kafka-group-id", "group.id" in properties)) if not present]
    if missing:
        parser.error("the Kafka transport also needs: " + ", ".join(missing))
    if args.kafka_input_topic == args.kafka_output_topic:
        parser.error("--kafka-input-topic and --kafka-output-topic must differ "
                     "(the server would consume its own replies)")
    try:
        properties["bootstrap.servers"] = _servers(properties["bootstrap.servers"])
    except argparse.ArgumentTypeError as exc:
        parser.error(f"bootstrap servers: {exc}")
    args.kafka_inferred = rpc.infer_security(properties)
    try:
        rpc.client_config(properties)
    except ValueError as exc:
        parser.error(f"Kafka client properties: {exc}")
    args.kafka_properties = properties
    args.kafka_connect_timeout = 30.0 if args.kafka_connect_timeout is None \
        else args.kafka_connect_timeout
    args.kafka_max_message_bytes = args.kafka_max_message_bytes or 1024 * 1024
    if args.kafka_dead_letter_topic and args.kafka_dead_letter_topic in (
            args.kafka_input_topic, args.kafka_output_topic):
        parser.error("--kafka-dead-letter-topic must differ from the input and output topics")
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

    def __init__(self, backend_factory: "BackendFactory", shutdown_timeout: float = 30.0,
                 queue_size: int = 1000,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 policy: Optional["MethodPolicy"] = None):
        self.shutdown_event = threading.Event()
        self.shutdown_timeout = shutdown_timeout
        self.max_message_bytes = max_message_bytes
        self.processor = Processor(backend_factory, queue_size, policy)
        self.transports: List[Any] = []
        self._signals = 0
        self._signalled = 0  # the first signal's number
        self._failed = 0  # the exit status a failed transport asks for

    def add_kafka(self, args: argparse.Namespace) -> None:
        if args.kafka_inferred:
            log.info("inferred %s from the TLS/SASL settings", ", ".join(args.kafka_inferred))
        log.info("kafka settings: %s", rpc.redacted(args.kafka_properties))
        transport = rpc.KafkaTransport(
            args.kafka_input_topic, args.kafka_output_topic, self.processor,
            args.kafka_properties, max_message_bytes=args.kafka_max_message_bytes,
            dead_letter_topic=args.kafka_dead_letter_topic,
            connect_timeout=args.kafka_connect_timeout,
            max_input_bytes=self.max_message_bytes,
            reply_topic_pattern=args.kafka_reply_topic_pattern)
        self.transports.append(transport)

    def add_stdio(self) -> None:
        self.transports.append(StdioTransport(self.processor.submit, self._stdio_closed,
                                              self.max_message_bytes,
                                              answer=self.processor.answer))

    def install_signal_handlers(self) -> None:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGHUP under nohup
                signal.signal(signum, self._on_signal)

    def serve_forever(self) -> int:
        """Run until a signal (or the end of stdio in stdio-only mode), then shut down in order."""
        threads = []
        for transport in self.transports:
            self.processor.register(transport)
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
        # A timed wait keeps the main thread responsive to signals on every platform.
        # The signal handler only sets a number: Event.set() there could deadlock against
        # this very thread inside Event.wait(), which holds the Event's lock.
        while not (self.shutdown_event.is_set() or self._signalled):
            if not ready and all(transport.ready.is_set() for transport in self.transports
                                 if hasattr(transport, "ready")):
                ready = True
                systemd.notify("READY=1", f"STATUS=serving on {names}")
            # (The stdio loop ending is no fault: stdin closes, Kafka goes on.)
            if ready and all(thread.is_alive() for thread in threads
                             if thread.name != "stdio-transport"):
                systemd.watchdog()
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
        self.processor.close_backends(deadline)
        for transport in self.transports:
            transport.close(timeout=max(1.0, deadline - time.monotonic()))
        log.info("shutdown complete")
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals > 1:
            # The operator insists: no more waiting.
            sys.stderr.write(f"codex-app-server: second {signal.Signals(signum).name}, "
                             "exiting now\n")
            os._exit(128 + signum)
        self._signalled = signum

    def _stdio_closed(self, why: str) -> None:
        if len(self.transports) == 1:
            log.info("%s: shutting down", why)
            self.shutdown_event.set()
        else:
            log.info("%s: the stdio connection ends, Kafka goes on", why)
            self.processor.close_backend(self.transports[-1], time.monotonic() +
                                         self.shutdown_timeout)


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


class Processor:
    """One bounded queue of (transport, message, done); each message to its transport's backend.

    ``done`` is the transport's acknowledgement: a request's backend passes it
    along with the reply; for anything else it runs once the backend has it.
    The processor takes everything queued at once, so a burst crosses threads
    in one hand-off rather than one per message.  Nothing one message does can
    end its thread: a failure becomes that request's ``-32603`` error.
    """

    def __init__(self, backend_factory: "BackendFactory", queue_size: int = 1000,
                 policy: Optional["MethodPolicy"] = None):
        self._factory = backend_factory
        self._policy = policy
        self._refused_log = rpc.LogThrottle()
        self._items: Deque[Tuple[Any, Message, rpc.Done, rpc.Route]] = collections.deque()
        self._changed = threading.Condition()
        self._capacity = queue_size
        self._low_water = max(1, queue_size // 2)
        self._stopping = False
        self._backends: Dict[Any, Backend] = {}

    def register(self, transport: Any) -> None:
        self._backends[transport] = self._factory(transport)

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
        if self._policy is not None and "method" in message \
                and not self._policy.allows(message["method"]):
            method = message["method"][:200]
            self._refused_log.warning(log, "refused a %s of method %r (id %r): not allowed by "
                                      "--allow-method/--deny-method", kind, method,
                                      message.get("id"))
            if kind == rpc.REQUEST:
                self._call(transport.send, rpc.error_response(
                    message["id"], rpc.METHOD_NOT_FOUND,
                    f"method not allowed by this server: {method}"), done, route)
            else:
                self._call(done)
            return
        try:
            self._backends[transport].handle(message, done, route)
        except Exception:
            log.exception("internal error handling a %s (method %s, id %r)", kind,
                          message.get("method"), message.get("id"))
            if kind == rpc.REQUEST:
                self._call(transport.send, rpc.error_response(
                    message["id"], rpc.INTERNAL_ERROR, "internal error in codex-app-server "
                    "(see its log)"), done, route)
                return
        if kind != rpc.REQUEST:
            self._call(done)

    @staticmethod
    def _call(function: Callable[..., None], *args: Any) -> None:
        try:
            function(*args)
        except Exception:  # the processor thread must outlive any one message
            log.exception("internal error answering a message")

    def stop(self, deadline: float) -> None:
        """Finish what is queued, then return from serve_forever; backends stop waiting
        for room at ``deadline``."""
        for backend in self._backends.values():
            backend.stopping(deadline)
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def close_backend(self, transport: Any, deadline: float) -> None:
        backend = self._backends.get(transport)
        if backend is not None:
            backend.close(deadline)

    def close_backends(self, deadline: float) -> None:
        for backend in self._backends.values():
            backend.close(deadline)


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

    def __init__(self, submit: Callable[[Any, Message], None], on_close: Callable[[str], None],
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, stdin_fd: int = 0,
                 stdout_fd: int = 1, answer: Optional[Callable[[Any, Message], None]] = None):
        self._submit = submit
        self._answer = answer or submit
        self._on_close = on_close
        self.max_message_bytes = max_message_bytes
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._write_lock = threading.Lock()
        self._shutdown = threading.Event()
        self._ended = threading.Event()
        self._stdout_gone = False
        self._invalid_log = rpc.LogThrottle()

    def serve_forever(self) -> None:
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

class Backend:
    """What answers one connection's messages.  Replies go to ``transport.send``."""

    def __init__(self, transport: Any):
        self.transport = transport

    def handle(self, message: Message, done: rpc.Done, route: rpc.Route) -> None:
        """Take one message.  For a request, pass ``done`` and ``route`` to
        ``transport.send`` with the reply; for anything else the processor calls ``done``."""
        raise NotImplementedError

    def stopping(self, deadline: float) -> None:
        """Shutdown has begun: stop waiting for room by ``deadline``."""

    def close(self, deadline: float) -> None:
        """Finish in-flight work by ``deadline`` (time.monotonic()), then release resources."""


BackendFactory = Callable[[Any], Backend]


class BuiltinBackend(Backend):
    """Answers ``initialize`` and ``noop`` in-process: transport smoke tests without Codex."""

    def __init__(self, transport: Any, delay: float = 0.0):
        super().__init__(transport)
        self.delay = delay

    def handle(self, message: Message, done: rpc.Done = rpc.nothing,
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
            else:
                self.transport.send(rpc.error_response(message["id"], rpc.METHOD_NOT_FOUND,
                                                       f"Method not found: {method}"), done, route)
                return
            self.transport.send({"jsonrpc": "2.0", "id": message["id"], "result": result}, done,
                                route)
        elif kind in (rpc.RESPONSE, rpc.ERROR):
            log.debug("builtin backend: ignoring a client %s for id %r", kind, message.get("id"))


class CodexBackend(Backend):
    """Drives ``codex app-server`` children for one connection, one at a time.

    Every client of a connection shares the child, so request ids are rewritten
    to ids unique in this server and restored on the reply; the first
    ``initialize`` result is kept and answers later ones (and is replayed to a
    restarted child).  Codex's own requests to the client (approvals) get ids
    unique for the server's life too, so a late answer meant for a dead child's
    request can never answer a successor's request that reused Codex's id.
    When a child dies, its clients hear it: pending requests fail, its pending
    requests to them are withdrawn, and its running turns end as failed.
    """

    def __init__(self, transport: Any, argv: Sequence[str], max_in_flight: int = 1000,
                 line_limit: int = CODEX_LINE_LIMIT):
        super().__init__(transport)
        self._argv = list(argv)
        self._max_in_flight = max_in_flight
        self._line_limit = line_limit
        self._lock = threading.Condition()
        self._child: Optional[CodexChild] = None
        self._next_id = 1
        self._init_params: Optional[Any] = None
        self._init_result: Optional[Any] = None
        self._init_waiting: List[Pending] = []  # initialize requests waiting for the first one
        self._asked: Dict[int, Tuple[CodexChild, Any]] = {}  # unanswered: our id -> Codex's
        self._stop_deadline = float("inf")
        self._closed = False

    def handle(self, message: Message, done: rpc.Done = rpc.nothing,
               route: rpc.Route = rpc.DEFAULT_ROUTE) -> None:
        kind = rpc.kind(message)
        if kind == rpc.REQUEST and message["method"] == "initialize" and self._answer_initialize(
                message, done, route):
            return
        if kind in (rpc.RESPONSE, rpc.ERROR):
            self._answer_codex(message)
            return
        for attempt in (1, 2):
            child = self._running_child(message, done, route)
            if child is None:
                return
            if kind != rpc.REQUEST:
                child.write(rpc.encode(message))
                return
            with self._lock:
                # Backpressure: a slow Codex holds the processor, so the queue fills and
                # the transports stop reading, instead of requests piling up here.
                while len(child.pending) >= self._max_in_flight and child.alive() \
                        and not self._closed and time.monotonic() < self._stop_deadline:
                    self._lock.wait(min(1.0, max(0.01, self._stop_deadline - time.monotonic())))
                if len(child.pending) >= self._max_in_flight and child.alive():
                    break  # shutting down with Codex still full: answer, do not wait on
                our_id = self._new_id()
            data = rpc.encode(dict(message, id=our_id))  # before it is pending: may raise
            with self._lock:
                child.pending[our_id] = (message, done, route)
                if message["method"] == "initialize":
                    self._init_params = message.get("params", {})
            if child.write(data):
                return
            # Never delivered: the child is dying.  Unless its exit has answered the request
            # already, take it back and try a fresh child once.
            with self._lock:
                if child.pending.pop(our_id, None) is None:
                    return
            child.wait(5.0)
        with self._lock:
            waiting = []
            if message["method"] == "initialize" and self._init_result is None:
                self._init_params = None  # the next initialize goes to Codex again
                waiting, self._init_waiting = self._init_waiting, []
        reason = "codex-app-server is shutting down" if self._closed or \
            time.monotonic() >= self._stop_deadline else \
            "codex app-server is not available: it exited before it could take the request"
        for request, request_done, request_route in [(message, done, route)] + waiting:
            self.transport.send(rpc.error_response(request["id"], rpc.INTERNAL_ERROR, reason),
                                request_done, request_route)

    def stopping(self, deadline: float) -> None:
        with self._lock:
            self._stop_deadline = deadline
            self._lock.notify_all()

    def close(self, deadline: float) -> None:
        with self._lock:
            self._closed = True
            child = self._child
            while child and child.pending and time.monotonic() < deadline:
                self._lock.wait(max(0.0, min(0.5, deadline - time.monotonic())))
            if child and child.pending:
                log.warning("shutdown timeout: %d requests to codex still unanswered",
                            len(child.pending))
        if child is not None:
            child.stop(deadline)
            child.exited.wait(5.0)  # so what it still owed is answered before we go on

    # Requests and replies --------------------------------------------------

    def _answer_codex(self, answer: Message) -> None:
        """A client's answer to one of Codex's requests goes to the child that asked."""
        with self._lock:
            asked = self._asked.pop(answer["id"], None)  # a second answer finds nothing
        if asked is not None and asked[0].alive():
            asked[0].write(rpc.encode(dict(answer, id=asked[1])))
            return
        log.warning("dropping a client answer to codex request %r, which no running codex "
                    "app-server is waiting for (answered already, withdrawn, or its codex "
                    "app-server exited)", answer["id"])

    def _new_id(self) -> int:
        our_id = self._next_id
        self._next_id += 1
        return our_id

    def _answer_initialize(self, request: Message, done: rpc.Done, route: rpc.Route) -> bool:
        """Answer a repeated ``initialize`` ourselves; False sends it on to Codex."""
        with self._lock:
            if self._init_result is not None:
                result = self._init_result
            elif self._init_params is not None:
                self._init_waiting.append((request, done, route))
                return True
            else:
                return False
        self.transport.send({"id": request["id"], "result": result}, done, route)
        return True

    def _from_child(self, child: "CodexChild", message: Message) -> None:
        if "method" in message:
            if "id" in message:  # Codex's own request to the client
                message = self._ask_client(child, message)
            else:
                message = self._notified(child, message)
            if message is not None:
                self.transport.send(message)
            return
        with self._lock:
            pending = child.pending.pop(message["id"], None)
            self._lock.notify_all()
        if pending is None:
            log.warning("codex answered id %r, which no client asked", message["id"])
            return
        request, done, route = pending
        waiting = self._initialized(message) if request["method"] == "initialize" else []
        if request.get("id") is not None:  # None: our own replayed initialize
            self.transport.send(dict(message, id=request["id"]), done, route)
        for other, other_done, other_route in waiting:
            self.transport.send(dict(message, id=other["id"]), other_done, other_route)

    def _ask_client(self, child: "CodexChild", request: Message) -> Message:
        """Codex's request goes out under an id no other request of this server has had."""
        outward = next(_SERVER_REQUEST_IDS)
        params = request.get("params")
        thread_id = params.get("threadId") if isinstance(params, dict) else None
        with self._lock:
            self._asked[outward] = (child, request["id"])
            child.asked[request["id"]] = (outward, thread_id)
        return dict(request, id=outward)

    def _notified(self, child: "CodexChild", notification: Message) -> Optional[Message]:
        """Track what a child's death must end; rewrite the request ids notifications name."""
        method, params = notification["method"], notification.get("params")
        if not isinstance(params, dict):
            return notification
        if method == "turn/started" or method == "turn/completed":
            turn = params.get("turn")
            if isinstance(turn, dict) and isinstance(turn.get("id"), str):
                with self._lock:
                    if method == "turn/started":
                        child.turns[turn["id"]] = (params.get("threadId"), turn)
                    else:
                        child.turns.pop(turn["id"], None)
        elif method == "serverRequest/resolved":
            with self._lock:
                asked = child.asked.pop(params.get("requestId"), None)
                if asked is None:  # never relayed: its id means nothing to the clients
                    log.debug("dropping serverRequest/resolved for unknown codex request %r",
                              params.get("requestId"))
                    return None
                self._asked.pop(asked[0], None)  # resolved: an answer now would be stale
            return dict(notification, params=dict(params, requestId=asked[0]))
        return notification

    def _initialized(self, reply: Message) -> List[Pending]:
        with self._lock:
            waiting, self._init_waiting = self._init_waiting, []
            if "result" in reply:
                self._init_result = reply["result"]
            elif self._init_result is None:
                self._init_params = None  # failed: the next initialize goes to Codex again
        return waiting

    # Children ------------------------------------------------------------

    def _running_child(self, message: Message, done: rpc.Done,
                       route: rpc.Route) -> Optional["CodexChild"]:
        with self._lock:
            if self._child is not None and self._child.alive():
                return self._child
            closed = self._closed
        if closed:  # shutting down: no new child that nothing would stop
            if rpc.kind(message) == rpc.REQUEST:
                self.transport.send(rpc.error_response(
                    message["id"], rpc.INTERNAL_ERROR, "codex-app-server is shutting down"),
                    done, route)
            return None
        try:
            child = CodexChild(self._argv, self._from_child, self._child_exited,
                               line_limit=self._line_limit)
        except OSError as exc:
            log.error("cannot start codex app-server (%s): %s", " ".join(self._argv), exc)
            if rpc.kind(message) == rpc.REQUEST:
                self.transport.send(rpc.error_response(
                    message["id"], rpc.INTERNAL_ERROR, f"cannot start codex app-server: {exc}"),
                    done, route)
            return None
        log.info("started codex app-server for %s (pid %d)", self.transport.name, child.pid)
        with self._lock:
            self._child = child
            replay = self._init_params if self._init_result is not None else None
            if replay is not None:
                our_id = self._new_id()
                child.pending[our_id] = ({"method": "initialize"}, rpc.nothing, rpc.DEFAULT_ROUTE)
        if replay is not None:
            # A restarted child must be initialized before it takes other requests.
            child.write(rpc.encode({"id": our_id, "method": "initialize", "params": replay}))
        return child

    def _child_exited(self, child: "CodexChild", status: int) -> None:
        with self._lock:
            if self._child is child:
                self._child = None
            orphans, child.pending = list(child.pending.values()), {}
            if any(request["method"] == "initialize" for request, _, _ in orphans):
                orphans += self._init_waiting
                self._init_waiting = []
                if self._init_result is None:
                    self._init_params = None
            withdrawn, child.asked = list(child.asked.values()), {}
            for outward, _ in withdrawn:
                self._asked.pop(outward, None)
            turns, child.turns = child.turns, {}
            self._lock.notify_all()
        how = f"signal {-status}" if status < 0 else f"status {status}"
        if child.stopped_because:
            how = f"{how} (stopped by codex-app-server: {child.stopped_because})"
        if orphans or turns:
            log.error("codex app-server (pid %d) exited with %s; failing %d pending requests "
                      "and %d running turns", child.pid, how, len(orphans), len(turns))
        else:
            log.info("codex app-server (pid %d) exited with %s", child.pid, how)
        message = f"codex app-server exited with {how}"
        # What Codex itself sends when a turn fails, so clients need no special case:
        # its open requests withdrawn first, then `error` and a failed `turn/completed`.
        for outward, thread_id in withdrawn:
            if isinstance(thread_id, str):  # the notification names a thread
                self.transport.send({"method": "serverRequest/resolved", "params": {
                    "threadId": thread_id, "requestId": outward}})
        now = time.time()
        for turn_id, (thread_id, turn) in turns.items():
            error = {"message": message, "codexErrorInfo": "other", "additionalDetails": None,
                     "misalignment": None}
            self.transport.send({"method": "error", "params": {
                "error": error, "willRetry": False, "threadId": thread_id, "turnId": turn_id}})
            started = turn.get("startedAt")
            self.transport.send({"method": "turn/completed", "params": {
                "threadId": thread_id, "turn": dict(
                    turn, items=[], itemsView="notLoaded", status="failed", error=error,
                    completedAt=int(now),
                    durationMs=int((now - started) * 1000) if _is_number(started) else None)}})
        for request, done, route in orphans:
            if request.get("id") is not None:
                self.transport.send(rpc.error_response(
                    request["id"], rpc.INTERNAL_ERROR, f"{message} before answering"), done,
                    route)


# Ids of Codex's requests as the clients see them, never reused, also across restarts: they
# start at the boot time in microseconds (a late answer from before a restart finds nothing),
# and stay below 2**53 for clients that read numbers as doubles.
_SERVER_REQUEST_IDS = itertools.count(int(time.time() * 1_000_000))


class CodexChild:
    """One ``codex app-server`` process and the requests it owes answers to.

    Reader threads relay its stdout lines to ``on_message(child, message)`` and its
    stderr to the log (rate-limited); ``on_exit(child, status)`` runs once stdout has
    ended.  A child that writes ``BAD_LINE_LIMIT`` lines in a row that are not
    JSON-RPC is stopped: it is not speaking the protocol, and its clients get an
    error instead of waiting forever.  The child leads a process group of its own
    (the npm ``codex`` is a launcher with the real binary as its child): stopping
    it stops all of it, and a Ctrl-C at the terminal reaches only the server, which
    stops it gracefully.
    """

    BAD_LINE_LIMIT = 100

    def __init__(self, argv: Sequence[str], on_message: Callable[["CodexChild", Message], None],
                 on_exit: Callable[["CodexChild", int], None], line_limit: int = CODEX_LINE_LIMIT):
        env = {name: value for name, value in os.environ.items()
               if name not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}  # ours alone
        env.setdefault("NO_COLOR", "1")  # Codex colours its stderr log even into a pipe
        self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env,
                                         start_new_session=True)
        self.pid = self._process.pid
        self._watch = self._start_watcher()
        self.pending: Dict[int, Pending] = {}  # our id -> the client's request
        # Codex's ids of its unresolved requests to clients -> (the clients' id, thread id)
        self.asked: Dict[Any, Tuple[int, Any]] = {}
        self.turns: Dict[str, Tuple[Any, Message]] = {}  # running turn id -> (thread id, turn)
        self.stopped_because: Optional[str] = None  # why the server stopped it, if it did
        self._line_limit = line_limit
        self._on_message = on_message
        self._on_exit = on_exit
        self._write_lock = threading.Lock()
        self.exited = threading.Event()  # set once on_exit has run
        threading.Thread(target=self._read_stdout, daemon=True,
                         name=f"codex-{self.pid}-stdout").start()
        threading.Thread(target=self._read_stderr, daemon=True,
                         name=f"codex-{self.pid}-stderr").start()

    def alive(self) -> bool:
        return self._process.poll() is None

    def _start_watcher(self) -> Optional[int]:
        """A tiny process that stops the child's whole process group once this server is
        gone, however it went (kill -9 included): it waits for the end of a pipe only this
        server holds.  Portable (sh, cat, kill), unlike Linux's parent-death signal."""
        try:
            read_end, write_end = os.pipe()
        except OSError as exc:
            log.warning("cannot watch codex app-server (pid %d): %s", self.pid, exc)
            return None
        try:
            subprocess.Popen(["sh", "-c", _WATCHER, "codex-app-server-watch", str(self.pid)],
                             stdin=read_end, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
            return write_end
        except OSError as exc:
            log.warning("cannot start the watcher of codex app-server (pid %d): %s; it may "
                        "outlive a server that is killed", self.pid, exc)
            os.close(write_end)
            return None
        finally:
            os.close(read_end)

    def _end_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            os.close(watch)  # the watcher stops what is left of the group, then exits

    def write(self, data: bytes) -> bool:
        """One encoded message as a line to the child's stdin; False when it cannot take it
        (it is gone)."""
        try:
            with self._write_lock:
                _write_all(self._process.stdin.fileno(), data + b"\n")
            return True
        except (OSError, ValueError) as exc:  # ValueError: stdin already closed
            log.warning("cannot write to codex app-server (pid %d): %s", self.pid, exc)
            return False

    def wait(self, timeout: float) -> None:
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, deadline: float) -> None:
        """Close stdin (Codex exits on EOF); terminate it when the deadline passes."""
        self._close_stdin(deadline)
        try:
            self._process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("codex app-server (pid %d) did not exit: terminating it", self.pid)
            self._signal(signal.SIGTERM)
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._process.wait()

    def _close_stdin(self, deadline: float) -> None:
        # Under the write lock: a descriptor closed while another thread writes to it
        # may be reused by then.  A writer blocked on a full pipe holds the lock: then
        # the child is not reading, and stopping it ends that write.
        if not self._write_lock.acquire(timeout=max(0.1, deadline - time.monotonic())):
            self._signal(signal.SIGKILL)
            self._write_lock.acquire()
        try:
            self._process.stdin.close()
        except OSError:
            pass
        finally:
            self._write_lock.release()

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)  # the launcher and the binary it started
        except OSError:
            try:
                self._process.send_signal(signum)
            except OSError:
                pass

    def _read_stdout(self) -> None:
        bad = 0  # in a row
        throttle = rpc.LogThrottle()
        for line, size, head in LineReader(self._process.stdout.fileno(), self._line_limit):
            if self.stopped_because:
                continue  # drain what it wrote until the pipe closes
            if line is not None and not line.strip():
                continue
            try:
                if line is None:
                    raise rpc.oversized(head, size, self._line_limit,
                                        "the limit for a line from codex app-server")
                # Codex's own nesting limit is deeper than the one for clients.
                message = rpc.decode(line.strip(), max_depth=None)
            except Exception as exc:
                reason = exc.reason if isinstance(exc, rpc.InvalidMessage) else repr(exc)
                throttle.warning(log, "skipping a line from codex app-server (pid %d) that "
                                 "cannot be relayed (%d bytes): %s", self.pid,
                                 size or len(line), reason)
                self._unrelayable(head if line is None else line, line is not None, reason)
                bad += 1
                if bad >= self.BAD_LINE_LIMIT:
                    self._stop_now(f"it wrote {bad} lines in a row that are not JSON-RPC")
                continue
            bad = 0
            self._deliver(message)
        try:
            status = self._process.wait()
            self._end_watch()
            self._on_exit(self, status)
        finally:
            self.exited.set()

    def _deliver(self, message: Message) -> None:
        try:
            self._on_message(self, message)
        except Exception:  # this thread must live on to report the child's exit
            log.exception("internal error relaying a message from codex app-server")

    def _unrelayable(self, data: bytes, complete: bool, reason: str) -> None:
        """Whoever waits on a line that cannot be relayed hears so, instead of nothing."""
        what, msg_id = rpc.peek(data, complete)
        if msg_id is None:
            return
        text = f"could not be relayed: {reason}"
        if what == rpc.RESPONSE:  # the client's request gets an error as its reply
            self._deliver(rpc.error_response(msg_id, rpc.INTERNAL_ERROR,
                                             f"codex app-server's reply {text}"))
        elif what == rpc.REQUEST:  # Codex's request to the client fails at once
            self.write(rpc.encode(rpc.error_response(msg_id, rpc.INTERNAL_ERROR,
                                                     f"the request {text}")))

    def _stop_now(self, why: str) -> None:
        self.stopped_because = why
        log.error("stopping codex app-server (pid %d): %s", self.pid, why)
        self._signal(signal.SIGKILL)

    def _read_stderr(self) -> None:
        throttle = rpc.LogThrottle(burst=200)
        for line, size, _ in LineReader(self._process.stderr.fileno(), 64 * 1024):
            text = _ANSI.sub("", line.decode("utf-8", "replace")).rstrip() if line is not None \
                else f"(a line of {size} bytes)"
            if text:
                throttle.warning(log, "codex[%d]: %s", self.pid, text)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The watcher (sh): wait until the server's pipe ends, then stop the group of $1: TERM, and
# KILL two seconds later for whatever is still there (a launcher's child, say).
# POSIX "kill -s SIG -- -PGID" (dash takes no "-TERM --"); busybox wants it without "--".
_WATCHER = ('cat >/dev/null; { kill -s TERM -- "-$1" || kill -s TERM "-$1"; } 2>/dev/null '
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


def backend_factory_for(args: argparse.Namespace,
                        parser: argparse.ArgumentParser) -> BackendFactory:
    if args.backend == "builtin":
        return lambda transport: BuiltinBackend(transport, args.builtin_delay)
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
    line_limit = max(args.max_message_bytes, CODEX_LINE_LIMIT)
    return lambda transport: CodexBackend(transport, argv, max_in_flight=args.queue_size,
                                          line_limit=line_limit)


if __name__ == "__main__":
    sys.exit(main())
