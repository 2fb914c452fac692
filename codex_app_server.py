"""codex-app-server: the Codex app-server JSON-RPC protocol over stdio and Apache Kafka.

Run ``python codex_app_server.py --help``.  Stdio needs only the standard
library; the Kafka transport (``kafka_transport.py``, next to this file) needs
kafka-python, imported only when a Kafka flag is given.

Shape, after CPython's socketserver: each transport runs a blocking loop in its
own thread and pushes (transport, message) into one queue; the ``Processor``
hands each message to that transport's backend; backend output goes straight
back to the transport.  A shutdown Event stops intake, the processor drains,
backends finish, then transports flush, commit and close.
"""

import argparse
import collections
import logging
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import kafka_transport as rpc

__version__ = "0.1.0"

log = logging.getLogger("codex_app_server")

Message = Dict[str, Any]
Pending = Tuple[Message, rpc.Done]  # a client's request and its transport acknowledgement

# Flags that are Kafka client properties: the top layer over file, environment and -X.
KAFKA_PROPERTY_FLAGS = {"kafka_bootstrap_servers": "bootstrap.servers",
                        "kafka_group_id": "group.id", "kafka_client_id": "client.id",
                        "kafka_offset_reset": "auto.offset.reset"}
KAFKA_FLAGS = tuple(KAFKA_PROPERTY_FLAGS) + (
    "kafka_input_topic", "kafka_output_topic", "kafka_property", "kafka_config",
    "kafka_connect_timeout", "kafka_max_message_bytes", "kafka_dead_letter_topic")
DEFAULT_CODEX_COMMAND = "codex app-server"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: parse flags, serve until shutdown, return the exit status."""
    parser = build_parser()
    args = parse_args(parser, argv)
    configure_logging(args.log_level, secrets=[
        value for key, value in getattr(args, "kafka_properties", {}).items()
        if key in rpc.SECRET_PROPERTIES])
    backend_factory = backend_factory_for(args, parser)
    server = Server(backend_factory, shutdown_timeout=args.shutdown_timeout,
                    queue_size=args.queue_size)
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
    kafka.add_argument("--kafka-max-message-bytes", metavar="BYTES", type=_positive_int,
                       help="largest record the server produces; a larger reply becomes a "
                            "JSON-RPC error (default: 1048576)")
    kafka.add_argument("--kafka-dead-letter-topic", metavar="TOPIC", type=_topic,
                       help="send every unusable input record here, unchanged, with headers "
                            "naming its origin and the reason")
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
        if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:,\[\]]+):\d{1,5}", entry):
            raise argparse.ArgumentTypeError(f"{entry!r} is not HOST:PORT")
    return ",".join(entries)


def _topic(text: str) -> str:
    _nonempty(text)
    if text in (".", "..") or len(text) > 249 or not re.fullmatch(r"[A-Za-z0-9._-]+", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a legal Kafka topic name (letters, digits, '.', '_', '-'; "
            "at most 249)")
    return text


def _property(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text.split('=')[0]!r}")
    return key.strip(), value


def _number(convert: Callable[[str], Any], minimum: float, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


_seconds = _number(float, 0, "a number of seconds")
_positive_int = _number(int, 1, "a whole number")


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

class Server:
    """Owns the transports, the processor and the shutdown sequence."""

    def __init__(self, backend_factory: "BackendFactory", shutdown_timeout: float = 30.0,
                 queue_size: int = 1000):
        self.shutdown_event = threading.Event()
        self.shutdown_timeout = shutdown_timeout
        self.processor = Processor(backend_factory, queue_size)
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
            connect_timeout=args.kafka_connect_timeout)
        self.transports.append(transport)

    def add_stdio(self) -> None:
        self.transports.append(StdioTransport(self.processor.submit, self._stdio_closed))

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def serve_forever(self) -> int:
        """Run until a signal (or stdin EOF in stdio-only mode), then shut down in order."""
        for transport in self.transports:
            self.processor.register(transport)
            threading.Thread(target=self._serve_transport, args=(transport,),
                             name=f"{transport.name}-transport", daemon=True).start()
        processor_thread = threading.Thread(target=self.processor.serve_forever,
                                            name="processor", daemon=True)
        processor_thread.start()
        log.info("codex-app-server %s serving on %s", __version__,
                 " and ".join(t.name for t in self.transports))
        # A timed wait keeps the main thread responsive to signals on every platform.
        # The signal handler only sets a number: Event.set() there could deadlock against
        # this very thread inside Event.wait(), which holds the Event's lock.
        while not (self.shutdown_event.is_set() or self._signalled):
            time.sleep(0.2)
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
        self.processor.stop()
        processor_thread.join(max(0.0, deadline - time.monotonic()))
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

    def _stdio_closed(self) -> None:
        if len(self.transports) == 1:
            log.info("stdin closed: shutting down")
            self.shutdown_event.set()
        else:
            log.info("stdin closed: the stdio connection ends, Kafka goes on")
            self.processor.close_backend(self.transports[-1], time.monotonic() +
                                         self.shutdown_timeout)


class Processor:
    """One bounded queue of (transport, message, done); each message to its transport's backend.

    ``done`` is the transport's acknowledgement: a request's backend passes it
    along with the reply; for anything else it runs once the backend has it.
    The processor takes everything queued at once, so a burst crosses threads
    in one hand-off rather than one per message.
    """

    def __init__(self, backend_factory: "BackendFactory", queue_size: int = 1000):
        self._factory = backend_factory
        self._items: Deque[Tuple[Any, Message, rpc.Done]] = collections.deque()
        self._changed = threading.Condition()
        self._capacity = queue_size
        self._low_water = max(1, queue_size // 2)
        self._stopping = False
        self._backends: Dict[Any, Backend] = {}

    def register(self, transport: Any) -> None:
        self._backends[transport] = self._factory(transport)

    def submit(self, transport: Any, message: Message, done: rpc.Done = rpc.nothing) -> None:
        """Queue one validated message, waiting for room (stdio's backpressure)."""
        with self._changed:
            while len(self._items) >= self._capacity:
                self._changed.wait()
            self._items.append((transport, message, done))
            self._changed.notify_all()

    def offer(self, transport: Any, items: Sequence[Tuple[Message, rpc.Done]]) -> int:
        """Queue as many (message, done) pairs as there is room for; return how many.
        Kafka pauses its partitions when not all were taken."""
        with self._changed:
            taken = items[:max(0, self._capacity - len(self._items))]
            if taken:
                self._items.extend((transport, message, done) for message, done in taken)
                self._changed.notify_all()
        return len(taken)

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
            for transport, message, done in batch:
                self._handle(transport, message, done)

    def _handle(self, transport: Any, message: Message, done: rpc.Done) -> None:
        kind = rpc.kind(message)
        try:
            self._backends[transport].handle(message, done)
        except Exception:
            log.exception("backend failed on a %s message", kind)
            if kind == rpc.REQUEST:
                transport.send(rpc.error_response(message["id"], rpc.INTERNAL_ERROR,
                                                  "internal error in codex-app-server"), done)
                return
        if kind != rpc.REQUEST:
            try:
                done()
            except Exception:  # the processor thread must outlive any one message
                log.exception("acknowledging a %s message failed", kind)

    def stop(self) -> None:
        """Finish what is queued, then return from serve_forever."""
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


# --- stdio ------------------------------------------------------------------

class StdioTransport:
    """JSON-RPC lines on stdin -> submit; replies as single lines on stdout."""

    name = "stdio"

    def __init__(self, submit: Callable[[Any, Message], None], on_eof: Callable[[], None],
                 stdin: Any = None, stdout: Any = None):
        self._submit = submit
        self._on_eof = on_eof
        self._stdin = stdin if stdin is not None else sys.stdin.buffer
        self._stdout = stdout if stdout is not None else sys.stdout.buffer
        self._write_lock = threading.Lock()
        self._shutdown = threading.Event()

    def serve_forever(self) -> None:
        line_number = 0
        for line in iter(self._stdin.readline, b""):
            if self._shutdown.is_set():
                return
            line_number += 1
            if not line.strip():
                continue
            try:
                message = rpc.decode(line.strip())
            except rpc.InvalidMessage as exc:
                log.warning("invalid payload from stdin: line %d: %s", line_number, exc.reason)
                self.send(rpc.error_response(exc.id, exc.code, exc.reason))
                continue
            self._submit(self, message)
        if not self._shutdown.is_set():
            self._on_eof()

    def send(self, message: Message, done: rpc.Done = rpc.nothing) -> None:
        data = rpc.encode(message) + b"\n"
        with self._write_lock:
            try:
                self._stdout.write(data)
                self._stdout.flush()
            except (BrokenPipeError, ValueError, OSError) as exc:
                log.warning("failed to write to stdout: %s", exc)
        done()

    def shutdown(self) -> None:
        self._shutdown.set()

    def close(self, timeout: float = 0.0) -> None:
        self._shutdown.set()


# --- backends ---------------------------------------------------------------

class Backend:
    """What answers one connection's messages.  Replies go to ``transport.send``."""

    def __init__(self, transport: Any):
        self.transport = transport

    def handle(self, message: Message, done: rpc.Done) -> None:
        """Take one message.  For a request, pass ``done`` to ``transport.send`` with the
        reply; for anything else the processor calls it."""
        raise NotImplementedError

    def close(self, deadline: float) -> None:
        """Finish in-flight work by ``deadline`` (time.monotonic()), then release resources."""


BackendFactory = Callable[[Any], Backend]


class BuiltinBackend(Backend):
    """Answers ``initialize`` and ``noop`` in-process: transport smoke tests without Codex."""

    def __init__(self, transport: Any, delay: float = 0.0):
        super().__init__(transport)
        self.delay = delay

    def handle(self, message: Message, done: rpc.Done = rpc.nothing) -> None:
        kind = rpc.kind(message)
        if kind == rpc.REQUEST:
            if self.delay:
                time.sleep(self.delay)
            method = message["method"]
            if method == "initialize":
                self._reply(message, done, {"userAgent": f"codex-app-server/{__version__} (python)",
                                      "platformFamily": "windows" if os.name == "nt" else "unix",
                                      "platformOs": _platform_os()})
            elif method == "noop":
                self._reply(message, done, {})
            else:
                self.transport.send(rpc.error_response(message["id"], rpc.METHOD_NOT_FOUND,
                                                       f"Method not found: {method}"), done)
        elif kind in (rpc.RESPONSE, rpc.ERROR):
            log.debug("builtin backend: ignoring a client %s for id %r", kind, message.get("id"))

    def _reply(self, request: Message, done: rpc.Done, result: Any) -> None:
        self.transport.send({"jsonrpc": "2.0", "id": request["id"], "result": result}, done)


class CodexBackend(Backend):
    """Drives ``codex app-server`` children for one connection, one at a time.

    Every client of a connection shares the child, so request ids are rewritten
    to ids unique in this server and restored on the reply; the first
    ``initialize`` result is kept and answers later ones (and is replayed to a
    restarted child).  Codex's own requests to the client (approvals) and the
    client's answers pass through unchanged: their ids are Codex's.
    """

    def __init__(self, transport: Any, argv: Sequence[str], max_in_flight: int = 1000):
        super().__init__(transport)
        self._argv = list(argv)
        self._max_in_flight = max_in_flight
        self._lock = threading.Condition()
        self._child: Optional[CodexChild] = None
        self._next_id = 1
        self._init_params: Optional[Any] = None
        self._init_result: Optional[Any] = None
        self._init_waiting: List[Pending] = []  # initialize requests waiting for the first one
        self._closed = False

    def handle(self, message: Message, done: rpc.Done = rpc.nothing) -> None:
        kind = rpc.kind(message)
        if kind == rpc.REQUEST and message["method"] == "initialize" and self._answer_initialize(
                message, done):
            return
        if kind in (rpc.RESPONSE, rpc.ERROR):
            self._answer_codex(message)
            return
        for attempt in (1, 2):
            child = self._running_child(message, done)
            if child is None:
                return
            if kind != rpc.REQUEST:
                child.write(message)
                return
            with self._lock:
                # Backpressure: a slow Codex holds the processor, so the queue fills and
                # the transports stop reading, instead of requests piling up here.
                while len(child.pending) >= self._max_in_flight and child.alive() \
                        and not self._closed:
                    self._lock.wait(1.0)
                our_id = self._new_id()
                child.pending[our_id] = (message, done)
                if message["method"] == "initialize":
                    self._init_params = message.get("params", {})
            if child.write(dict(message, id=our_id)):
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
        for request, request_done in [(message, done)] + waiting:
            self.transport.send(rpc.error_response(
                request["id"], rpc.INTERNAL_ERROR, "codex app-server is not available: it "
                "exited before it could take the request"), request_done)

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

    # Requests and replies --------------------------------------------------

    def _answer_codex(self, answer: Message) -> None:
        """A client's answer to one of Codex's requests goes to the child that asked."""
        with self._lock:
            child = self._child
        if child is not None and child.alive() and child.answered(answer["id"]):
            child.write(answer)
            return
        # Codex ids restart at 0 in every child: an answer meant for a dead child must not
        # reach its successor as the answer to another request.
        log.warning("dropping a client answer to codex request %r, which no running codex "
                    "app-server asked (it may have been restarted)", answer["id"])

    def _new_id(self) -> int:
        our_id = self._next_id
        self._next_id += 1
        return our_id

    def _answer_initialize(self, request: Message, done: rpc.Done) -> bool:
        """Answer a repeated ``initialize`` ourselves; False sends it on to Codex."""
        with self._lock:
            if self._init_result is not None:
                result = self._init_result
            elif self._init_params is not None:
                self._init_waiting.append((request, done))
                return True
            else:
                return False
        self.transport.send({"id": request["id"], "result": result}, done)
        return True

    def _from_child(self, child: "CodexChild", message: Message) -> None:
        if "method" in message:  # a notification, or Codex's own request to the client
            if "id" in message:
                child.asked.add(message["id"])
            self.transport.send(message)
            return
        with self._lock:
            pending = child.pending.pop(message["id"], None)
            self._lock.notify_all()
        if pending is None:
            log.warning("codex answered id %r, which no client asked", message["id"])
            return
        request, done = pending
        waiting = self._initialized(message) if request["method"] == "initialize" else []
        if request.get("id") is not None:  # None: our own replayed initialize
            self.transport.send(dict(message, id=request["id"]), done)
        for other, other_done in waiting:
            self.transport.send(dict(message, id=other["id"]), other_done)

    def _initialized(self, reply: Message) -> List[Pending]:
        with self._lock:
            waiting, self._init_waiting = self._init_waiting, []
            if "result" in reply:
                self._init_result = reply["result"]
            elif self._init_result is None:
                self._init_params = None  # failed: the next initialize goes to Codex again
        return waiting

    # Children ------------------------------------------------------------

    def _running_child(self, message: Message, done: rpc.Done) -> Optional["CodexChild"]:
        with self._lock:
            if self._child is not None and self._child.alive():
                return self._child
            closed = self._closed
        if closed:  # shutting down: no new child that nothing would stop
            if rpc.kind(message) == rpc.REQUEST:
                self.transport.send(rpc.error_response(
                    message["id"], rpc.INTERNAL_ERROR, "codex-app-server is shutting down"),
                    done)
            return None
        try:
            child = CodexChild(self._argv, self._from_child, self._child_exited)
        except OSError as exc:
            log.error("cannot start codex app-server (%s): %s", " ".join(self._argv), exc)
            if rpc.kind(message) == rpc.REQUEST:
                self.transport.send(rpc.error_response(
                    message["id"], rpc.INTERNAL_ERROR, f"cannot start codex app-server: {exc}"),
                    done)
            return None
        log.info("started codex app-server for %s (pid %d)", self.transport.name, child.pid)
        with self._lock:
            self._child = child
            replay = self._init_params if self._init_result is not None else None
            if replay is not None:
                our_id = self._new_id()
                child.pending[our_id] = ({"method": "initialize"}, rpc.nothing)
        if replay is not None:
            # A restarted child must be initialized before it takes other requests.
            child.write({"id": our_id, "method": "initialize", "params": replay})
        return child

    def _child_exited(self, child: "CodexChild", status: int) -> None:
        with self._lock:
            if self._child is child:
                self._child = None
            orphans, child.pending = list(child.pending.values()), {}
            if any(request["method"] == "initialize" for request, _ in orphans):
                orphans += self._init_waiting
                self._init_waiting = []
                if self._init_result is None:
                    self._init_params = None
            self._lock.notify_all()
        how = f"signal {-status}" if status < 0 else f"status {status}"
        if orphans:
            log.error("codex app-server (pid %d) exited with %s; failing %d pending requests",
                      child.pid, how, len(orphans))
        else:
            log.info("codex app-server (pid %d) exited with %s", child.pid, how)
        for request, done in orphans:
            if request.get("id") is not None:
                self.transport.send(rpc.error_response(
                    request["id"], rpc.INTERNAL_ERROR,
                    f"codex app-server exited with {how} before answering"), done)


class CodexChild:
    """One ``codex app-server`` process and the requests it owes answers to.

    Reader threads relay its stdout lines to ``on_message(child, message)`` and its
    stderr to the log; ``on_exit(child, status)`` runs once stdout has ended.
    """

    def __init__(self, argv: Sequence[str], on_message: Callable[["CodexChild", Message], None],
                 on_exit: Callable[["CodexChild", int], None]):
        env = dict(os.environ)
        env.setdefault("NO_COLOR", "1")  # Codex colours its stderr log even into a pipe
        self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env)
        self.pid = self._process.pid
        self.pending: Dict[int, Pending] = {}  # our id -> the client's request
        self.asked: set = set()  # ids of Codex's own requests still waiting for the client
        self._on_message = on_message
        self._on_exit = on_exit
        threading.Thread(target=self._read_stdout, daemon=True,
                         name=f"codex-{self.pid}-stdout").start()
        threading.Thread(target=self._read_stderr, daemon=True,
                         name=f"codex-{self.pid}-stderr").start()

    def alive(self) -> bool:
        return self._process.poll() is None

    def answered(self, request_id: Any) -> bool:
        """Whether a client answer to ``request_id`` is one this child is waiting for."""
        try:
            self.asked.remove(request_id)
            return True
        except KeyError:
            return False

    def write(self, message: Message) -> bool:
        """One line to the child's stdin; False when it cannot take it (it is gone)."""
        try:
            self._process.stdin.write(rpc.encode(message) + b"\n")
            self._process.stdin.flush()
            return True
        except (OSError, ValueError) as exc:
            log.warning("cannot write to codex app-server (pid %d): %s", self.pid, exc)
            return False

    def wait(self, timeout: float) -> None:
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, deadline: float) -> None:
        """Close stdin (Codex exits on EOF); terminate it when the deadline passes."""
        try:
            self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("codex app-server (pid %d) did not exit: terminating it", self.pid)
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _read_stdout(self) -> None:
        for line in iter(self._process.stdout.readline, b""):
            if not line.strip():
                continue
            try:
                message = rpc.decode(line.strip())
            except rpc.InvalidMessage as exc:
                log.warning("skipping a line from codex app-server that is not JSON-RPC (%d "
                            "bytes): %s", len(line), exc.reason)
                continue
            self._on_message(self, message)
        self._on_exit(self, self._process.wait())

    def _read_stderr(self) -> None:
        for line in iter(self._process.stderr.readline, b""):
            text = _ANSI.sub("", line.decode("utf-8", "replace")).rstrip()
            if text:
                log.warning("codex[%d]: %s", self.pid, text)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


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
    return lambda transport: CodexBackend(transport, argv, max_in_flight=args.queue_size)


if __name__ == "__main__":
    sys.exit(main())
