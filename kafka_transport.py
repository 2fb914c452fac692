"""Kafka transport and JSON-RPC envelopes for codex-app-server.

This module knows Kafka and the JSON-RPC 2.0 envelope, nothing of Codex.  It imports
kafka-python only when a ``KafkaTransport`` connects, so the envelope functions work on a
host without kafka-python (stdio-only use).

Sections, in reading order (each one concern):

* JSON-RPC envelopes: ``decode`` (strict JSON) / ``encode`` / ``encode_reply`` / ``kind``
  / ``reply_key`` / ``error_response`` / ``oversized``, shared by every transport, and
  ``LogThrottle`` for their warnings.
* Routes: ``Route`` / ``parse_route``, where a message came from and where its answers go
  (the record key is the session; the request-reply headers of Spring, SmallRye, NestJS
  and FastStream name a reply topic, partition, correlation).
* Client configuration: ``client_config`` maps librdkafka/Java property names (and their
  ``ALIASES``) onto kafka-python's keyword arguments; the rest of librdkafka's names are
  known (``LIBRDKAFKA_ONLY``), so a typo is told from a setting to ignore.
* Security checks: TLS and SASL failures named up front (exit 3).
* The transport, in the order a record meets it:

  - what it is built on: ``Sink`` (the processor: where records go), ``SessionOwner``
    (the backend: told of rebalances), ``Done`` callbacks;
  - producing: ``OrderedProducer``, every record in its lane's order (a session's),
    retried until acknowledged, then its ``done``; the reply-topic cache;
  - the session store: ``SessionStore``, each session's state in a compacted topic;
  - intake: ``Intake``, each record decoded, checked or rejected (dead letter, error
    reply), queued for the sink; pause and resume;
  - connecting: ``BrokerConnection`` makes the producer and the consumer, retrying, with
    TLS and SASL failures named;
  - the consumer loop: ``KafkaTransport`` (connect, poll, hand over, commit, rebalance;
    ``serve_forever`` / ``shutdown`` / ``close``), and ``KafkaClientTransport``, the
    proxy's (one session's partition, no group); ``OffsetTracker``: what may commit.

A request's path: ``KafkaTransport._consume`` polls it -> ``OffsetTracker.taken`` gives
it a ``done`` -> ``Intake.take`` decodes it and makes its ``Route`` -> ``Intake.offer``
hands it to the sink (the processor) -> the backend answers with
``KafkaTransport.send(reply, done, route)`` -> ``OrderedProducer.send`` -> the brokers'
acknowledgement runs ``done`` -> ``OffsetTracker`` lets the offset commit ->
``KafkaTransport._commit``.
"""

import bisect
import collections
import difflib
import functools
import importlib.util
import json
import logging
import math
import os
import re
import socket
import ssl
import threading
import time
from typing import (Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Set,
                    Tuple, Union)

log = logging.getLogger("kafka_transport")

# --- JSON-RPC envelopes ---------------------------------------------------

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Codex's parser (serde_json) drops a line nested 128 levels deep without a reply: refuse
# deeper nesting here, with one.
MAX_DEPTH = 100

REQUEST, NOTIFICATION, RESPONSE, ERROR = "request", "notification", "response", "error"

Message = Dict[str, Any]


class InvalidMessage(ValueError):
    """A payload that is not one usable JSON-RPC message: ``id`` is the request id when one
    could be recovered (so the sender can be answered), else None; ``code`` the JSON-RPC
    error code to answer with; ``answers`` the id an unusable *response* answers (so
    whoever waits for it can be told), when ``oversized`` could recover one."""

    def __init__(self, reason: str, code: int = INVALID_REQUEST, id: Any = None,
                 answers: Any = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.id = id
        self.answers = answers


def decode(data: bytes, max_depth: Optional[int] = MAX_DEPTH) -> Message:
    """Parse one payload into a validated JSON-RPC message, or raise InvalidMessage.
    Strict: only what any JSON parser takes, so whatever is accepted can be encoded again
    and forwarded (NaN, Infinity, numbers beyond a double, lone surrogates and nesting
    deeper than ``max_depth`` are refused)."""
    if not data:
        raise InvalidMessage("empty payload", PARSE_ERROR)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not UTF-8 ({exc.reason} at byte {exc.start})", PARSE_ERROR) from None
    try:
        value = _STRICT.decode(text)
    except _Unsafe as exc:
        raise InvalidMessage(f"not strict JSON: {exc}", PARSE_ERROR,
                             id=_safe_id(_lenient(text))) from None
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                             PARSE_ERROR) from None
    except RecursionError:
        # A hostile payload of deeply nested arrays must not take the thread down.
        raise InvalidMessage("invalid JSON (nested too deeply to parse)" if max_depth is None
                             else f"invalid JSON (nested deeper than {max_depth} levels)",
                             PARSE_ERROR) from None
    except ValueError as exc:  # whatever else the parser refuses: still one bad message
        raise InvalidMessage(f"invalid JSON ({exc})", PARSE_ERROR) from None
    # Cheap guards first: most messages have few brackets and no \uD800-\uDFFF escape.
    if max_depth is not None and text.count("[") + text.count("{") > max_depth \
            and _depth(value, max_depth) > max_depth:
        raise InvalidMessage(f"invalid JSON (nested deeper than {max_depth} levels)",
                             PARSE_ERROR, id=_safe_id(value))
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) and not _encodable(value):
        raise InvalidMessage("not strict JSON: a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                             "without its pair) is not a character", PARSE_ERROR,
                             id=_safe_id(value))
    validate(value)
    return value


def oversized(head: bytes, size: int, limit: int,
              limit_name: str = "--max-message-bytes") -> InvalidMessage:
    """The error for a message of ``size`` bytes over ``limit``, of which only the first
    bytes (``head``) were kept: a request's id goes in ``id``, a response's in ``answers``."""
    what, msg_id = peek(head, complete=False)
    return InvalidMessage(f"message of {size} bytes is over the limit of {limit} ({limit_name})",
                          INVALID_REQUEST, id=msg_id if what == REQUEST else None,
                          answers=msg_id if what in (RESPONSE, ERROR) else None)


def peek(data: bytes, complete: bool = True) -> Tuple[Optional[str], Any]:
    """(REQUEST or RESPONSE or None, id) of a payload that ``decode`` refused, as far as it
    shows: a ``complete`` payload is read leniently; of a payload's first bytes only an id
    that stands before any nested value counts ({"method":"m","id":7,"params":...)."""
    if complete:
        value = _lenient(data.decode("utf-8", "replace"))
        msg_id = _safe_id(value)
        if msg_id is not None:
            return (REQUEST if "method" in value else RESPONSE), msg_id
    match = _LEADING_ID.match(data[:4096])
    if not match:
        return None, None
    before, raw, after = match.groups()
    msg_id = raw[1:-1].decode("utf-8", "replace") if raw[:1] == b'"' else int(raw)
    if b'"method"' in before or after in (b"method", b"params"):
        return REQUEST, msg_id
    if after in (b"result", b"error"):
        return RESPONSE, msg_id
    return None, None


def validate(value: Any) -> None:
    """InvalidMessage unless ``value`` is a JSON-RPC request, notification, response or error."""
    if not isinstance(value, dict):
        raise InvalidMessage(f"a JSON-RPC message must be an object, not {_json_type(value)}")
    has_id = "id" in value
    msg_id = value.get("id")
    answer_id = msg_id if isinstance(msg_id, str) or _is_int(msg_id) else None
    if "jsonrpc" in value and value["jsonrpc"] != "2.0":
        raise InvalidMessage('"jsonrpc" must be "2.0"', id=answer_id)
    if msg_id is not None and answer_id is None:
        raise InvalidMessage(f'"id" must be a string or an integer, not {_json_type(msg_id)}')
    if "method" in value:
        if not isinstance(value["method"], str):
            raise InvalidMessage(f'"method" must be a string, not {_json_type(value["method"])}',
                                 id=answer_id)
        if has_id and msg_id is None:
            raise InvalidMessage('a request "id" must not be null')
        if "params" in value and not isinstance(value["params"], (dict, list)):
            raise InvalidMessage(f'"params" must be an object or an array, not '
                                 f'{_json_type(value["params"])}', INVALID_PARAMS, id=answer_id)
        return
    if "result" in value or "error" in value:
        if not has_id:
            raise InvalidMessage('a response needs an "id"')
        if "result" in value and "error" in value:
            raise InvalidMessage('a response must not carry both "result" and "error"',
                                 id=answer_id)
        if "error" in value:
            error = value["error"]
            if not (isinstance(error, dict) and _is_int(error.get("code"))
                    and isinstance(error.get("message"), str)):
                raise InvalidMessage('"error" must be an object with an integer "code" and a '
                                     'string "message"', id=answer_id)
        return
    raise InvalidMessage('no "method", "result" or "error" member', id=answer_id)


def kind(message: Message) -> str:
    """REQUEST, NOTIFICATION, RESPONSE or ERROR for a message that passed ``validate``."""
    if "method" in message:
        return REQUEST if "id" in message else NOTIFICATION
    return ERROR if "error" in message else RESPONSE


def encode(message: Message) -> bytes:
    """One compact UTF-8 JSON line body (no newline); InvalidMessage if it is not JSON."""
    try:
        return json.dumps(message, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidMessage(f"cannot be encoded as JSON ({type(exc).__name__}: "
                             f"{str(exc)[:200]})", INTERNAL_ERROR) from None


def encode_reply(message: Message) -> Optional[bytes]:
    """``encode`` that cannot fail: an unencodable reply becomes an internal error for its
    id; an unencodable message without an id is None (logged, not sent)."""
    try:
        return encode(message)
    except InvalidMessage as exc:
        msg_id = _safe_id(message)
        log.error("cannot encode an outgoing %s (id %r): %s", "reply" if msg_id is not None
                  else "message", msg_id, exc.reason)
        if msg_id is None:
            return None
        return encode(error_response(msg_id, INTERNAL_ERROR,
                                     f"codex-app-server could not encode the reply: {exc.reason}"))


def reply_key(message: Message) -> Optional[bytes]:
    """The Kafka key for an outbound message: its id as text; None (unkeyed) without one."""
    msg_id = message.get("id")
    if msg_id is None:
        return None
    return (msg_id if isinstance(msg_id, str) else str(msg_id)).encode("utf-8")


def error_response(msg_id: Any, code: int, message: str, data: Any = None) -> Message:
    error: Dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": msg_id, "error": error}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
               str: "a string", list: "an array", dict: "an object"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "an object")


_DOUBLE_DIGITS = 309  # an integer of this many digits may be beyond the largest double
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# An id that stands before any nested value, {"jsonrpc":"2.0","method":"m","id":7,..., with
# what came before it and the name of the member after it.
_LEADING_ID = re.compile(rb'\s*\{\s*((?:"(?:jsonrpc|method)"\s*:\s*"[^"\\]{0,200}"\s*,\s*){0,2})'
                         rb'"id"\s*:\s*(-?\d{1,18}|"[^"\\]{0,256}")\s*(?:,\s*"([a-z]{1,10})"|\})')


class _Unsafe(ValueError):
    """Raised by the strict decoder's hooks: valid to Python's json, not to JSON."""


def _refuse_constant(name: str) -> Any:
    raise _Unsafe(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Unsafe(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is beyond "
                      "the range of a double")
    return value


def _bounded_int(text: str) -> int:
    if len(text) >= _DOUBLE_DIGITS and math.isinf(float(text)):
        raise _Unsafe(f"an integer of {len(text.lstrip('-'))} digits is beyond the range of "
                      "a double")
    return int(text)


_STRICT = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float,
                           parse_int=_bounded_int)
# Reads past what _STRICT refuses, only to find the id to answer (a float, NaN or an
# integer beyond a double is never one).
_LENIENT = json.JSONDecoder(parse_int=lambda text: None if len(text) >= _DOUBLE_DIGITS
                            else int(text))


def _lenient(text: str) -> Any:
    try:
        return _LENIENT.decode(text)
    except (ValueError, RecursionError):
        return None


def _safe_id(value: Any) -> Any:
    """The id of a parsed message if it can be echoed in a reply, else None."""
    msg_id = value.get("id") if isinstance(value, dict) else None
    if isinstance(msg_id, str):
        return msg_id if _encodable(msg_id) else None
    return msg_id if _is_int(msg_id) else None


def _encodable(value: Any) -> bool:
    try:
        encode(value)
        return True
    except InvalidMessage:
        return False


def _depth(value: Any, stop: int) -> int:
    """How deeply arrays and objects nest in ``value`` (an object alone is 1), without
    recursion; counting stops once past ``stop``."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, level = stack.pop()
        if level > deepest:
            deepest = level
            if deepest > stop:
                break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, level + 1) for child in children
                     if isinstance(child, (dict, list)))
    return deepest


class LogThrottle:
    """At most ``burst`` log lines per ``period`` seconds from one source of warnings, so
    a flood of bad input cannot flood the log; ``allow()`` says whether to log now and how
    many lines were held back since the last one logged."""

    def __init__(self, burst: int = 100, period: float = 10.0):
        self.burst = burst
        self.period = period
        self._window = -period
        self._count = 0
        self._held = 0
        self._lock = threading.Lock()  # its counts

    def allow(self) -> Tuple[bool, int]:
        with self._lock:
            now = time.monotonic()
            if now - self._window >= self.period:
                self._window, self._count = now, 0
            if self._count >= self.burst:
                self._held += 1
                return False, 0
            self._count += 1
            held, self._held = self._held, 0
            return True, held

    def warning(self, logger: logging.Logger, text: str, *args: Any,
                level: int = logging.WARNING) -> None:
        """``logger.log(level, text, *args)`` within the budget, with the count held back."""
        allowed, held = self.allow()
        if allowed:
            logger.log(level, text + (f" ({held} more like it not logged)" if held else ""),
                       *args)


# --- routes -----------------------------------------------------------------
# A message travels with its route: the transport makes it on input and honours it
# on output; everything in between passes it along unopened.

# The request-reply headers of the Kafka client libraries, by what they say.
CORRELATION_HEADERS = ("kafka_correlationId", "REPLY_CORRELATION_ID", "correlation_id")
REPLY_TOPIC_HEADERS = ("kafka_replyTopic", "REPLY_TOPIC", "reply_to")
REPLY_PARTITION_HEADERS = ("kafka_replyPartition", "REPLY_PARTITION")
SESSION_HEADER = "codex-session"
MAX_SESSION_KEY_BYTES = 1024
_ROUTING_HEADERS = frozenset(CORRELATION_HEADERS + REPLY_TOPIC_HEADERS + REPLY_PARTITION_HEADERS)


class Route:
    """Where a message came from and where what answers it goes: ``session`` is the
    client's record key (None: the default session); ``topic`` and ``partition`` the reply
    topic and partition it asked for (None: the output topic, and the session's partition
    there); ``correlation`` the headers to echo on the reply to this very message;
    ``source`` the input partition it came from (None: not from Kafka)."""

    __slots__ = ("session", "topic", "partition", "correlation", "source")

    def __init__(self, session: Optional[bytes] = None, topic: Optional[str] = None,
                 partition: Optional[int] = None,
                 correlation: Tuple[Tuple[str, bytes], ...] = (),
                 source: Optional[int] = None):
        self.session = session
        self.topic = topic
        self.partition = partition
        self.correlation = correlation
        self.source = source


DEFAULT_ROUTE = Route()


def parse_route(key: Optional[bytes], headers: Optional[Iterable[Tuple[str, bytes]]],
                allowed_topics: Optional["re.Pattern[str]"] = None) -> Route:
    """The route of a record with this key and these headers; InvalidMessage (without an
    id: the caller knows it) naming what is unusable."""
    if key is not None and not key:
        raise InvalidMessage("the record key (the session) is empty: leave it unset for the "
                             "default session")
    if key is not None and len(key) > MAX_SESSION_KEY_BYTES:
        raise InvalidMessage(f"the record key (the session) has {len(key)} bytes, more than "
                             f"{MAX_SESSION_KEY_BYTES}")
    if not headers:
        return Route(key)
    topic: Optional[str] = None
    partition: Optional[int] = None
    correlation: List[Tuple[str, bytes]] = []
    for name, value in headers:
        if name not in _ROUTING_HEADERS:
            continue
        value = value or b""
        if name in CORRELATION_HEADERS:
            correlation.append((name, value))
        elif name in REPLY_TOPIC_HEADERS and topic is None:
            topic = _reply_topic(name, value, allowed_topics)
        elif name in REPLY_PARTITION_HEADERS and partition is None:
            partition = _reply_partition(name, value)
    return Route(key, topic, partition, tuple(correlation))


def _reply_topic(name: str, value: bytes, allowed: Optional["re.Pattern[str]"]) -> str:
    topic = value.decode("ascii", "replace")  # (U+FFFD is no topic name character)
    if not _TOPIC_NAME.fullmatch(topic) or topic in (".", ".."):
        raise InvalidMessage(f"header {name}: {value[:100]!r} is not a Kafka topic name")
    if allowed is not None and not allowed.fullmatch(topic):
        raise InvalidMessage(f"header {name}: reply topic {topic!r} is not allowed here "
                             "(--kafka-reply-topic-pattern)")
    return topic


def _reply_partition(name: str, value: bytes) -> int:
    # Spring and SmallRye send a 4-byte big-endian int, NestJS decimal ASCII.
    if len(value) == 4 and not value.isdigit():
        partition = int.from_bytes(value, "big", signed=True)
    elif value.isdigit() and len(value) <= 10:
        partition = int(value)
    else:
        raise InvalidMessage(f"header {name}: {value[:20]!r} is neither a 4-byte big-endian "
                             "integer nor decimal digits")
    if not 0 <= partition <= INT32_MAX:
        raise InvalidMessage(f"header {name}: partition {partition} is out of range")
    return partition


_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


# --- client configuration -------------------------------------------------

INT32_MAX = 2 ** 31 - 1  # Kafka's and librdkafka's integer settings are 32-bit


def parse_integer(text: str) -> int:
    """A 32-bit whole number, not negative, as librdkafka takes it; ValueError why not."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 0:
        raise ValueError("must not be negative")
    if value > INT32_MAX:
        raise ValueError(f"must be at most {INT32_MAX}")
    return value


def _one_of(choices: Union[str, Mapping[str, Any]]) -> Callable[[str], Any]:
    """A parser accepting the keys of ``choices`` and returning their values (names in a
    string, space-separated, stand for themselves)."""
    if isinstance(choices, str):
        choices = {name: name for name in choices.split()}

    def parse(text: str) -> Any:
        if text not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return choices[text]
    return parse


_boolean = _one_of({"true": True, "false": False})

CONSUMER, PRODUCER, BOTH = "consumer", "producer", "both"

# librdkafka / Java property name -> (which client, kafka-python argument, parser).
PROPERTIES: Dict[str, Tuple[str, str, Callable[[str], Any]]] = {
    "bootstrap.servers": (BOTH, "bootstrap_servers", lambda text: text.split(",")),
    "group.id": (CONSUMER, "group_id", str),
    "client.id": (BOTH, "client_id", str),
    "request.timeout.ms": (BOTH, "request_timeout_ms", parse_integer),
    "retry.backoff.ms": (BOTH, "retry_backoff_ms", parse_integer),
    "reconnect.backoff.ms": (BOTH, "reconnect_backoff_ms", parse_integer),
    "reconnect.backoff.max.ms": (BOTH, "reconnect_backoff_max_ms", parse_integer),
    "metadata.max.age.ms": (BOTH, "metadata_max_age_ms", parse_integer),
    "connections.max.idle.ms": (BOTH, "connections_max_idle_ms", parse_integer),
    "socket.send.buffer.bytes": (BOTH, "send_buffer_bytes", parse_integer),
    "socket.receive.buffer.bytes": (BOTH, "receive_buffer_bytes", parse_integer),
    "security.protocol": (BOTH, "security_protocol",
                          _one_of("PLAINTEXT SSL SASL_PLAINTEXT SASL_SSL")),
    "ssl.ca.location": (BOTH, "ssl_cafile", str),
    "ssl.certificate.location": (BOTH, "ssl_certfile", str),
    "ssl.key.location": (BOTH, "ssl_keyfile", str),
    "ssl.key.password": (BOTH, "ssl_password", str),
    "ssl.endpoint.identification.algorithm": (BOTH, "ssl_check_hostname",
                                              _one_of({"https": True, "none": False})),
    "sasl.mechanism": (BOTH, "sasl_mechanism", _one_of("PLAIN SCRAM-SHA-256 SCRAM-SHA-512")),
    "sasl.username": (BOTH, "sasl_plain_username", str),
    "sasl.password": (BOTH, "sasl_plain_password", str),
    "session.timeout.ms": (CONSUMER, "session_timeout_ms", parse_integer),
    "heartbeat.interval.ms": (CONSUMER, "heartbeat_interval_ms", parse_integer),
    "max.poll.interval.ms": (CONSUMER, "max_poll_interval_ms", parse_integer),
    "fetch.wait.max.ms": (CONSUMER, "fetch_max_wait_ms", parse_integer),
    "fetch.min.bytes": (CONSUMER, "fetch_min_bytes", parse_integer),
    "fetch.max.bytes": (CONSUMER, "fetch_max_bytes", parse_integer),
    "max.partition.fetch.bytes": (CONSUMER, "max_partition_fetch_bytes", parse_integer),
    "max.poll.records": (CONSUMER, "max_poll_records", parse_integer),
    "auto.offset.reset": (CONSUMER, "auto_offset_reset", _one_of({
        "earliest": "earliest", "smallest": "earliest", "latest": "latest", "largest": "latest"})),
    "isolation.level": (CONSUMER, "isolation_level", _one_of("read_uncommitted read_committed")),
    "check.crcs": (CONSUMER, "check_crcs", _boolean),
    "linger.ms": (PRODUCER, "linger_ms", parse_integer),
    "batch.size": (PRODUCER, "batch_size", parse_integer),
    "acks": (PRODUCER, "acks", _one_of({"all": "all", "-1": "all", "0": 0, "1": 1})),
    "message.max.bytes": (PRODUCER, "max_request_size", parse_integer),
    "compression.type": (PRODUCER, "compression_type", _one_of({
        "none": None, "gzip": "gzip", "snappy": "snappy", "lz4": "lz4", "zstd": "zstd"})),
    "retries": (PRODUCER, "retries", parse_integer),
    "max.in.flight.requests.per.connection": (PRODUCER, "max_in_flight_requests_per_connection",
                                              parse_integer),
    "delivery.timeout.ms": (PRODUCER, "delivery_timeout_ms", parse_integer),
    "max.block.ms": (PRODUCER, "max_block_ms", parse_integer),
    "receive.message.max.bytes": (BOTH, "receive_message_max_bytes", parse_integer),
    "allow.auto.create.topics": (BOTH, "allow_auto_create_topics", _boolean),
    "client.dns.lookup": (BOTH, "client_dns_lookup", str),
    "client.rack": (CONSUMER, "client_rack", str),
    "group.instance.id": (CONSUMER, "group_instance_id", str),
    "enable.idempotence": (PRODUCER, "enable_idempotence", _boolean),
    "ssl.crl.location": (BOTH, "ssl_crlfile", str),  # applied in ssl_context()
    "ssl.cipher.suites": (BOTH, "ssl_ciphers", str),
}

# The other names of those properties (librdkafka's older ones, or Java's).
ALIASES = {
    "sasl.mechanisms": "sasl.mechanism", "fetch.max.wait.ms": "fetch.wait.max.ms",
    "queue.buffering.max.ms": "linger.ms", "request.required.acks": "acks",
    "max.request.size": "message.max.bytes", "compression.codec": "compression.type",
    "message.send.max.retries": "retries", "message.timeout.ms": "delivery.timeout.ms",
    "fetch.message.max.bytes": "max.partition.fetch.bytes",
}
PROPERTIES.update((alias, PROPERTIES[name]) for alias, name in ALIASES.items())

# Properties the server owns: accepting them would silently break its guarantees.
RESERVED = {
    "enable.auto.commit": "the server commits offsets itself",
    "enable.auto.offset.store": "the server commits offsets itself",
    "transactional.id": "the server does not produce in transactions",
    "transaction.timeout.ms": "the server does not produce in transactions",
}

# Every other property librdkafka documents (its CONFIGURATION.md): a properties file written
# for the Rust server or kcat carries them; kafka-python has no equivalent, so each is ignored
# with a WARNING (ignored_properties) rather than refused.  A name in no table is a typo.
LIBRDKAFKA_ONLY = frozenset("""
api.version.fallback.ms api.version.request api.version.request.timeout.ms auto.commit.enable
auto.commit.interval.ms background_event_cb batch.num.messages broker.address.family
broker.address.ttl broker.version.fallback builtin.features closesocket_cb compression.level
connect_cb consume.callback.max.messages consume_cb coordinator.query.interval.ms debug
default_topic_conf delivery.report.only.error dr_cb dr_msg_cb enable.gapless.guarantee
enable.metrics.push enable.partition.eof enable.random.seed enable.sasl.oauthbearer.unsecure.jwt
enable.ssl.certificate.verification enabled_events error_cb fetch.error.backoff.ms
fetch.queue.backoff.ms group.protocol group.protocol.type group.remote.assignor https.ca.location
https.ca.pem interceptors internal.termination.signal log.connection.close log.queue
log.thread.name log_cb log_level max.in.flight message.copy.max.bytes metadata.broker.list
metadata.recovery.rebootstrap.trigger.ms metadata.recovery.strategy msg_order_cmp
oauthbearer_token_refresh_cb offset.store.method offset.store.path offset.store.sync.interval.ms
offset_commit_cb opaque open_cb partition.assignment.strategy partitioner partitioner_cb
plugin.library.paths produce.offset.report queue.buffering.backpressure.threshold
queue.buffering.max.kbytes queue.buffering.max.messages queued.max.messages.kbytes
queued.min.messages queuing.strategy rebalance_cb reconnect.backoff.jitter.ms resolve_cb
retry.backoff.max.ms sasl.kerberos.keytab sasl.kerberos.kinit.cmd
sasl.kerberos.min.time.before.relogin sasl.kerberos.principal sasl.kerberos.service.name
sasl.oauthbearer.assertion.algorithm sasl.oauthbearer.assertion.claim.aud
sasl.oauthbearer.assertion.claim.exp.seconds sasl.oauthbearer.assertion.claim.iss
sasl.oauthbearer.assertion.claim.jti.include sasl.oauthbearer.assertion.claim.nbf.seconds
sasl.oauthbearer.assertion.claim.sub sasl.oauthbearer.assertion.file
sasl.oauthbearer.assertion.jwt.template.file sasl.oauthbearer.assertion.private.key.file
sasl.oauthbearer.assertion.private.key.passphrase sasl.oauthbearer.assertion.private.key.pem
sasl.oauthbearer.client.credentials.client.id sasl.oauthbearer.client.credentials.client.secret
sasl.oauthbearer.client.id sasl.oauthbearer.client.secret sasl.oauthbearer.config
sasl.oauthbearer.extensions sasl.oauthbearer.grant.type
sasl.oauthbearer.metadata.authentication.type sasl.oauthbearer.method sasl.oauthbearer.scope
sasl.oauthbearer.token.endpoint.url socket.blocking.max.ms socket.connection.setup.timeout.ms
socket.keepalive.enable socket.max.fails socket.nagle.disable socket.timeout.ms socket_cb
ssl.ca.certificate.stores ssl.ca.pem ssl.certificate.pem ssl.certificate.verify_cb ssl.curves.list
ssl.engine.id ssl.engine.location ssl.key.pem ssl.keystore.location ssl.keystore.password
ssl.providers ssl.sigalgs.list ssl_ca ssl_certificate ssl_engine_callback_data ssl_key stats_cb
sticky.partitioning.linger.ms throttle_cb topic.blacklist topic.metadata.propagation.max.ms
topic.metadata.refresh.fast.cnt topic.metadata.refresh.fast.interval.ms
topic.metadata.refresh.interval.ms topic.metadata.refresh.sparse
""".split())

_SECRET = re.compile(r"password|secret|pem$|passphrase|token|credential|jaas|sasl\.oauthbearer")


def is_secret(key: str) -> bool:
    """A property whose value must never be shown (librdkafka has many: keys, PEMs, tokens)."""
    return bool(_SECRET.search(key))


# The reference's environment variables, by the property each one sets.
ENVIRONMENT = {
    "KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "KAFKA_SSL_CA": "ssl.ca.location",
    "KAFKA_SSL_CERT": "ssl.certificate.location",
    "KAFKA_SSL_KEY": "ssl.key.location",
    "KAFKA_SSL_KEY_PASSWORD": "ssl.key.password",
    "KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "KAFKA_SASL_USERNAME": "sasl.username",
    "KAFKA_SASL_PASSWORD": "sasl.password",
}


def read_properties(path: str) -> Dict[str, str]:
    """A librdkafka/Java properties file: ``key=value`` lines, ``#`` or ``!`` comments."""
    properties = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line[0] in "#!":
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{path} line {number}: expected key=value")
            properties[key.strip()] = value.strip()
    return properties


def environment_properties(environ: Mapping[str, str]) -> Dict[str, str]:
    return {prop: environ[name] for name, prop in ENVIRONMENT.items() if environ.get(name)}


def infer_security(properties: Dict[str, str]) -> List[str]:
    """Fill in ``security.protocol`` (and a SASL mechanism) the settings imply; say what."""
    inferred = []
    tls = "ssl.ca.location" in properties or "ssl.certificate.location" in properties
    sasl = "sasl.username" in properties or "sasl.password" in properties
    if "security.protocol" not in properties and (tls or sasl):
        protocol = ("SASL_SSL" if "ssl.ca.location" in properties else "SASL_PLAINTEXT") \
            if sasl else "SSL"
        properties["security.protocol"] = protocol
        inferred.append(f"security.protocol={protocol}")
    if properties.get("security.protocol", "").startswith("SASL") and not (
            "sasl.mechanism" in properties or "sasl.mechanisms" in properties):
        properties["sasl.mechanism"] = "PLAIN"
        inferred.append("sasl.mechanism=PLAIN")
    return inferred


def redacted(properties: Mapping[str, Any]) -> str:
    """``key=value, …`` with every secret shown as ``***``."""
    return ", ".join(f"{key}={'***' if is_secret(key) else value}"
                     for key, value in sorted(properties.items()))


def client_config(properties: Mapping[str, str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(consumer kwargs, producer kwargs) for ``{property: text}``; ValueError naming every
    unknown key or bad value, never a secret value."""
    consumer: Dict[str, Any] = {}
    producer: Dict[str, Any] = {}
    problems = []
    for key, text in properties.items():
        if key in RESERVED:
            problems.append(f"{key}: not settable here ({RESERVED[key]})")
            continue
        if key in LIBRDKAFKA_ONLY:  # ignored (ignored_properties() says so), unless TLS/SASL
            if key.startswith(("ssl", "sasl", "enable.ssl")):
                problems.append(f"{key}: a TLS/SASL setting kafka-python cannot honour "
                                "(ignoring it could weaken the connection): remove it")
            continue
        if key not in PROPERTIES:
            close = difflib.get_close_matches(key, list(PROPERTIES) + sorted(LIBRDKAFKA_ONLY), 1)
            problems.append(f"{key}: unknown property" +
                            (f" (did you mean {close[0]}?)" if close else ""))
            continue
        scope, argument, parse = PROPERTIES[key]
        try:
            value = parse(text)
        except ValueError as exc:
            shown = "***" if is_secret(key) else repr(text)
            problems.append(f"{key}={shown}: {exc}")
            continue
        if scope in (CONSUMER, BOTH):
            consumer[argument] = value
        if scope in (PRODUCER, BOTH):
            producer[argument] = value
    if problems:
        raise ValueError("; ".join(problems))
    return consumer, producer


_WHY_IGNORED = {
    "partition.assignment.strategy": "kafka-python's own assignors are used",
    "partitioner": "the server picks each record's partition (the session rule)",
    "auto.commit.interval.ms": "the server commits offsets itself",
    "metadata.broker.list": "taken as bootstrap.servers",
}


def ignored_properties(properties: Iterable[str]) -> List[Tuple[str, str]]:
    """(name, why) of each librdkafka property that kafka-python cannot honour."""
    def why(key: str) -> str:
        if key.endswith("_cb") or key in ("opaque", "default_topic_conf", "plugin.library.paths"):
            return "a hook of librdkafka's C API"
        if key == "debug" or key.startswith("log"):
            return "the server's log level is --log-level"
        return _WHY_IGNORED.get(key, "kafka-python has no such setting")
    return [(key, why(key)) for key in properties if key in LIBRDKAFKA_ONLY]


def check_supported(properties: Iterable[str]) -> None:
    """ValueError naming the properties the installed kafka client has no argument for
    (kafka-python-ng, the archived fork, lacks a few that kafka-python has)."""
    kafka = _import_kafka()
    known = {CONSUMER: kafka.KafkaConsumer.DEFAULT_CONFIG,
             PRODUCER: kafka.KafkaProducer.DEFAULT_CONFIG}
    missing = [key for key in properties if key in PROPERTIES and any(
        PROPERTIES[key][1] not in known[side] for side in (CONSUMER, PRODUCER)
        if PROPERTIES[key][0] in (side, BOTH))]
    if missing:
        raise ValueError(f"{', '.join(missing)}: not supported by the installed kafka client "
                         f"({kafka.__name__} {kafka.__version__})")


# --- security checks --------------------------------------------------------
# kafka-python reports every TLS or SASL failure as a bare "Unable to bootstrap"
# after its timeout (and can hang, or prompt on the terminal for a key password):
# these checks name the cause at once.

class FatalKafkaError(Exception):
    """A Kafka setup failure that retrying cannot fix (the server exits 3)."""


def ssl_context(config: Mapping[str, Any]) -> Optional[ssl.SSLContext]:
    """The TLS context for kafka-python's ``ssl_context`` (every file and the key password
    loaded once, up front), or None without TLS."""
    if config.get("security_protocol") not in ("SSL", "SASL_SSL"):
        return None
    cafile, certfile, keyfile = (config.get(name) for name in
                                 ("ssl_cafile", "ssl_certfile", "ssl_keyfile"))
    for prop, path in (("ssl.ca.location", cafile), ("ssl.certificate.location", certfile),
                       ("ssl.key.location", keyfile)):
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise FatalKafkaError(f"{prop} {path} " + ("is not a readable file"
                                  if os.path.exists(path) else "does not exist"))
    if keyfile and not certfile:
        raise FatalKafkaError("ssl.key.location is set without ssl.certificate.location")
    try:
        context = ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        raise FatalKafkaError(f"ssl.ca.location {cafile} holds no usable PEM certificate "
                              f"({exc.reason})") from None
    context.check_hostname = config.get("ssl_check_hostname", True)
    try:
        if config.get("ssl_crlfile"):
            context.load_verify_locations(config["ssl_crlfile"])
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if config.get("ssl_ciphers"):
            context.set_ciphers(config["ssl_ciphers"])
    except (OSError, ssl.SSLError) as exc:
        raise FatalKafkaError(f"ssl.crl.location / ssl.cipher.suites: {exc}") from None
    if certfile:
        password = config.get("ssl_password")

        def ask() -> str:
            if password is None:
                raise FatalKafkaError(f"the private key {keyfile or certfile} is encrypted but "
                                      "no ssl.key.password (KAFKA_SSL_KEY_PASSWORD) is set")
            return password
        try:
            context.load_cert_chain(certfile, keyfile, password=ask)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise FatalKafkaError(f"the private key {keyfile} does not belong to the "
                                      f"certificate {certfile}") from None
            if password is not None:
                raise FatalKafkaError(f"ssl.key.password does not decrypt the private key "
                                      f"{keyfile or certfile} (wrong password?)") from None
            raise FatalKafkaError(f"cannot load the client certificate {certfile}: "
                                  f"{exc.reason or exc}") from None
    return context


def check_tls(servers: Iterable[str], context: ssl.SSLContext, has_cert: bool,
              timeout: float) -> None:
    """Handshake with each bootstrap server.  FatalKafkaError for what retrying cannot fix;
    OSError (retry) for a refused, reset or silent connection."""
    for server in servers:
        host, _, port = server.rpartition(":")
        host = host.strip("[]")
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            try:
                with context.wrap_socket(raw, server_hostname=host) as tls:
                    # TLS 1.3: a refused client certificate arrives as an alert after
                    # the handshake, so listen briefly.
                    tls.settimeout(0.5)
                    try:
                        tls.recv(1)
                    except socket.timeout:
                        pass
            except ssl.SSLCertVerificationError as exc:
                raise FatalKafkaError(f"the certificate of {server} is not trusted "
                                      f"({exc.verify_message}); check ssl.ca.location "
                                      "(KAFKA_SSL_CA)") from None
            except socket.timeout:
                raise OSError(f"{server} accepted the connection but sent no TLS handshake "
                              "reply (a PLAINTEXT listener?)") from None
            except ssl.SSLError as exc:
                reason = exc.reason or str(exc)
                if "ALERT" not in reason:
                    raise OSError(f"TLS with {server} failed: {reason}") from None
                hint = "" if has_cert else (" (the broker probably requires a client "
                                            "certificate: set ssl.certificate.location)")
                raise FatalKafkaError(f"{server} refused the TLS handshake: "
                                      f"{reason.lower().replace('_', ' ')}{hint}") from None


_SASL_FAILURE = re.compile(r"SaslAuthenticationFailed|Authentication failed|UnsupportedSasl"
                           r"|IllegalSaslState|Abort \('v'\)|Connection lost: 'v'")
_RETRYABLE = re.compile(r"refused|timed out|timeout|unreachable|no route|name or service|"
                        r"nodename|temporary failure", re.IGNORECASE)


class _ClientLog(logging.Handler):
    """Holds kafka-python's warnings during one connection attempt instead of printing
    them (a failed attempt logs them dozens of times); the first one is the cause."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []
        self._logger = logging.getLogger("kafka")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_ClientLog":
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc: Any) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = True

    def sasl_failure(self) -> Optional[str]:
        message = next((m for m in self.messages if _SASL_FAILURE.search(m)), None)
        if message and "'v'" in message:
            # kafka-python's KeyError('v'): the SCRAM answer had an error, not a signature.
            return "the broker rejected the credentials (its SCRAM answer carried an error)"
        return message

# --- the transport: what it is built on ----------------------------------------

PRODUCER_STUCK_SECONDS = 60.0  # failing this long with no acknowledgement: a new producer
REBALANCE_WAIT = 10.0  # seconds a rebalance waits for what is in flight to be answered

Done = Callable[[], None]


def nothing() -> None:
    """The ``done`` of a message that needs no acknowledgement."""


class Sink:
    """Where a transport hands what it reads (the processor)."""

    def offer(self, transport: Any, items: Sequence[Tuple[Message, Done, Route]]) -> int:
        """Take as many (message, done, route) as there is room for; return how many."""
        raise NotImplementedError

    def answer(self, transport: Any, message: Message, done: Done, route: Route) -> None:
        """Take a client's answer (a response or an error) at once, past any queue."""
        raise NotImplementedError

    def has_room(self) -> bool:
        """Below the low-water mark: a paused transport may resume."""
        return True


class SessionOwner:
    """Whoever keeps what is in flight per session (the backend): told of rebalances."""

    def settle(self, transport: Any, deadline: float) -> None:
        """A rebalance begins: answer what is in flight by ``deadline``."""

    def revoked(self, transport: Any, partitions: Set[int]) -> None:
        """These input partitions moved to another server: their sessions end here."""


# --- the transport: producing ----------------------------------------------------

class _Send:
    """One record to produce, with what to call once the broker has it."""

    __slots__ = ("topic", "key", "value", "headers", "done", "session", "partition", "lane",
                 "reply", "attempt", "due", "seq", "producer", "reply_id", "finished",
                 "replaced")

    def __init__(self, topic: str, key: Optional[bytes], value: bytes,
                 headers: Optional[List[Tuple[str, bytes]]], done: Done,
                 session: Optional[bytes] = None, partition: Optional[int] = None,
                 lane: Any = None, reply: bool = False):
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = headers
        self.done = done
        self.session = session
        self.partition = partition  # None: the session's (or, without a lane, the key's)
        self.lane = lane  # what it keeps its order within; None: kafka-python partitions it
        self.reply = reply  # answers a request (counted as replied once acknowledged)
        self.reply_id: Any = None  # the id of the request it answers (a reply's)
        self.finished = False  # acknowledged, or given up: done has run
        self.replaced = False  # now the error reply that stands for what could not go
        self.attempt = 0
        self.due = 0.0
        self.seq = 0
        self.producer: Any = None  # the client of the last attempt

    def __lt__(self, other: "_Send") -> bool:  # for bisect: send order
        return self.seq < other.seq


class OrderedProducer:
    """The producing side of a transport: each record kept in its lane's order (a
    session's records in one topic, or a named partition's), retried until the brokers
    acknowledge it, then its ``done``; a kafka-python producer beyond recovery replaced;
    what the brokers know of reply topics, cached.

    Sends come from any thread, acknowledgements from kafka-python's IO thread; retries and
    replacement run on the consumer thread only (``resend_due``).  ``_lock`` guards the
    lanes, the send order, the unacknowledged counts, ``counts`` and each send's
    ``finished``; nothing is called out (``done``, the client) while it is held."""

    def __init__(self, config: Dict[str, Any], output_topic: str, own_topics: frozenset):
        self.config = config
        self.output_topic = output_topic
        self._own_topics = own_topics  # a denied write there is retried, never given up
        self.client: Any = None  # kafka-python's KafkaProducer
        self._fatal_errors: Tuple[type, ...] = ()
        self._denied_errors: Tuple[type, ...] = ()  # the ACLs refuse a write
        self._too_large_errors: Tuple[type, ...] = ()  # the brokers' size limit refuses it
        self._permanent_errors: Tuple[type, ...] = ()
        self._broken: Optional[str] = None  # why the client must be replaced
        self._failing_since: Optional[float] = None  # no acknowledgement since then
        self._replace_after = 0.0  # no new client before then (the last attempt failed)
        self._lock = threading.Lock()  # lanes, send order, counts (see above)
        # Per lane (topic + session or named partition): failed sends, then those behind them.
        self._held: Dict[Any, List[_Send]] = {}
        self._seq = 0  # send order
        # reply topic -> (until when known, its partitions or why it has none)
        self._reply_topics: Dict[str, Tuple[float, Any]] = {}
        self._denied_log = LogThrottle(burst=10, period=30.0)
        self._stats_log = LogThrottle()
        self.unacked = 0  # sends not yet acknowledged, retries included
        self.unacked_bytes = 0  # their values' size
        self.counts = collections.Counter(replied=0, send_retries=0)  # since start

    def stats(self) -> Dict[str, int]:
        """What was replied and retried, and what is not acknowledged yet."""
        with self._lock:
            return dict(self.counts, unacknowledged=self.unacked,
                        unacknowledged_bytes=self.unacked_bytes)

    def open(self, kafka: Any) -> None:
        """Make the kafka-python producer (KafkaError when the brokers cannot be reached)."""
        errors = kafka.errors
        self._fatal_errors = tuple(getattr(errors, name) for name in (
            "UnknownProducerIdError", "OutOfOrderSequenceNumberError", "ProducerFencedError")
            if hasattr(errors, name))
        self._permanent_errors = (ValueError, TypeError) + tuple(
            getattr(errors, name) for name in (
                "MessageSizeTooLargeError", "RecordTooLargeError", "InvalidTopicError")
            if hasattr(errors, name))
        self._denied_errors = (errors.TopicAuthorizationFailedError,)
        self._too_large_errors = tuple(getattr(errors, name) for name in (
            "MessageSizeTooLargeError", "RecordTooLargeError") if hasattr(errors, name))
        self.client = kafka.KafkaProducer(**self.config)

    def discard(self) -> None:
        """Drop the client of a connection attempt that failed."""
        _close_producer(self.client, 0)
        self.client = None

    def send(self, send: _Send, first: bool = True) -> bool:
        """Hand ``send`` to the client; False when that failed at once (it is then held for
        a retry).  A first attempt whose lane holds earlier sends waits behind them."""
        if first:
            with self._lock:
                self.unacked += 1
                self.unacked_bytes += len(send.value or b"")
                send.seq = self._seq = self._seq + 1
                lane = self._held.get(send.lane)
                if lane:  # an earlier record of its session waits for a retry
                    bisect.insort(lane, send)
                    return True
        client = send.producer = self.client
        if client is None:
            self._failed(send, "not connected to kafka yet")
            return False
        try:
            partition = send.partition
            if partition is None and send.lane is not None:
                partition = _session_partition(client, send.topic, send.session)
            future = client.send(send.topic, value=send.value, key=send.key,
                                 headers=send.headers, partition=partition)
        except Exception as exc:
            self._failed(send, exc, at_once=True)
            return False
        future.add_callback(lambda metadata: self._acknowledged(send))
        future.add_errback(lambda error: self._failed(send, error))
        return True

    def publish(self, topic: str, value: bytes) -> None:
        """One record, keyed by the client id, not retried: dropped with a warning when it
        fails (statistics: the next one follows soon, and replies must not wait behind)."""
        def failed(error: Any) -> None:
            self._stats_log.warning(log, "cannot send statistics to %s: %s", topic, error)
        try:
            key = self.config.get("client_id", "codex-app-server").encode()
            self.client.send(topic, key=key, value=value).add_errback(failed)
        except Exception as exc:
            failed(exc)

    def reply_topic_problem(self, topic: str, partition: Optional[int]) -> str:
        """Why ``topic`` (``partition`` of it, when not None) cannot take records, or "".
        The first look at a topic may wait for its metadata (up to max.block.ms); what was
        found is kept a minute."""
        now = time.monotonic()
        until, known = self._reply_topics.get(topic, (0.0, ""))
        if until <= now:
            try:
                known = frozenset(self.client.partitions_for(topic) or ())
            except Exception as exc:
                known = f"is unknown to the brokers ({type(exc).__name__})"
            if len(self._reply_topics) > 10000:
                self._reply_topics.clear()
            self._reply_topics[topic] = (now + 60.0, known)
        if isinstance(known, str):
            return known
        if not known:
            return "has no partitions"
        if partition is not None and partition not in known:
            return f"has no partition {partition}"
        return ""

    def resend_due(self, replace: bool = True) -> None:
        """On the consumer thread: send again what failed and is due, in each lane's order
        (a bounded pass); first a new client when this one is beyond recovery."""
        if self._broken and replace and time.monotonic() >= self._replace_after:
            self._replace()
        now = time.monotonic()
        with self._lock:
            due = [lane for lane, sends in self._held.items() if sends[0].due <= now]
        budget = 100  # a bounded pass: the consumer must get back to poll()
        for lane in due:
            # One at a time from the front, the lane kept while it drains: a first attempt
            # arriving meanwhile still queues behind.  A send that fails again stops it.
            # (Only this thread takes from a lane, so a lane in _held is never empty.)
            while budget > 0:
                budget -= 1
                with self._lock:
                    send = self._held[lane][0]
                attempt = send.attempt
                handed = self.send(send, first=False)
                with self._lock:
                    sends = self._held[lane]
                    gone = send.finished or send.lane != lane  # given up, or now an error
                    if not gone and (not handed or send.attempt != attempt):
                        break  # failed again (its future may fail at once): stays first
                    # By identity: an earlier send may have been put in front meanwhile.
                    sends[:] = [held for held in sends if held is not send]
                    if not sends:
                        del self._held[lane]
                        break

    def flush(self, deadline: float) -> None:
        """Wait (up to ``deadline``) until every send is acknowledged, then close."""
        log.info("flushing kafka producer")
        while time.monotonic() < deadline:
            # No new client now: making one may take longer than the time left.
            self.resend_due(replace=False)
            if not self.unacked:
                break
            try:
                self.client.flush(timeout=0.2)
            except Exception:
                pass  # flush timing out only means sends are still in flight
        if self.unacked:
            log.warning("shutdown timeout: %d messages not acknowledged by kafka", self.unacked)
        _close_producer(self.client, 1)

    def _acknowledged(self, send: _Send) -> None:
        with self._lock:
            if send.finished:
                return  # (given up once already: its done has run)
            send.finished = True
            self.unacked -= 1
            self.unacked_bytes -= len(send.value or b"")
            self.counts["replied"] += send.reply
        if send.producer is self.client:
            self._failing_since = None
        send.done()

    def _failed(self, send: _Send, error: Any, at_once: bool = False) -> None:
        if isinstance(error, self._denied_errors) and not self._denied(send, error):
            return
        if isinstance(error, self._too_large_errors) and not at_once:
            # The brokers' refusal (not the client's own check): kafka-python 3.0.12 then
            # fails every later record of that partition the same way; a new client stops it.
            # (Which record of a refused batch was too large is not known: none is replaced
            # by an error, which could be false; the output topic's limit is checked first.)
            self._broken = self._broken or f"the brokers refused a record as too large ({error})"
        if isinstance(error, self._permanent_errors):
            # Sending it again cannot work: give it up, or its offset would never commit.
            self._give_up(send, error)
            return
        if send.producer is self.client and send.producer is not None:
            # (a send that raced a replacement says nothing about the new client)
            self._broken = self._broken or self._why_fatal(error, send.producer)
        send.attempt += 1
        delay = min(0.1 * 2 ** min(send.attempt, 6), 5.0)
        send.due = time.monotonic() + delay
        log.warning("failed to send kafka message (key %s) to %s: %s%s; retry %d in %.1f s",
                    _shown(send.key), send.topic, error, _missing_topic_hint(error, send.topic),
                    send.attempt, delay)
        with self._lock:
            self.counts["send_retries"] += 1
            # Its session's later records wait behind it, in their order.
            lane = self._held.setdefault(send.lane, [])
            if send not in lane:  # (a retry that failed again is still in it)
                bisect.insort(lane, send)

    def _give_up(self, send: _Send, error: Any) -> None:
        log.error("dropping kafka message (key %s) to %s: %s", _shown(send.key), send.topic,
                  error)
        send.reply = False  # not counted as replied
        self._acknowledged(send)

    def _denied(self, send: _Send, error: Any) -> bool:
        """The brokers' ACLs refuse the write: to the server's own topics it is retried, with
        an ERROR naming the grant (nothing is lost: its offset waits; True); a reply to a
        client's reply topic becomes an error reply to the output topic instead, in the
        session's place there (False); anything else is given up (False)."""
        if send.topic == self.output_topic or send.topic in self._own_topics:
            principal = self.config.get("sasl_plain_username") or "NAME"
            self._denied_log.warning(
                log, "the brokers' ACLs do not let this server write topic %s (%s): replies "
                "wait, and their requests stay uncommitted; grant it with: kafka-acls.sh "
                "--bootstrap-server HOST:PORT --add --allow-principal User:%s --operation "
                "Write --operation Describe --topic %s", send.topic, error, principal,
                send.topic, level=logging.ERROR)
            return True
        if not self._error_instead(send, INVALID_REQUEST, f"reply topic {send.topic} may not be "
                                   "written by this server (the brokers' ACLs)", error,
                                   self.output_topic):
            self._give_up(send, error)
        return False

    def _error_instead(self, send: _Send, code: int, text: str, error: Any,
                       topic: Optional[str] = None) -> bool:
        """A reply the brokers refuse becomes, once, an error reply to its request (to
        ``topic``, in the session's place there, when given), held for a send at once in
        its lane's order; False for anything else (nobody to tell)."""
        if not send.reply or send.reply_id is None or send.replaced:
            return False
        log.warning("session %s: %s: %s; an error reply goes in its place%s",
                    session_name(send.session), text, error, f" (to {topic})" if topic else "")
        value = encode(error_response(send.reply_id, code, text))
        with self._lock:
            self.unacked_bytes += len(value) - len(send.value)
            # (a new attempt: a retry pass that handed it over keeps it first in its lane)
            send.value, send.replaced, send.due = value, True, 0.0
            send.attempt += 1
            if topic is not None:
                send.topic, send.partition, send.lane = topic, None, (topic, send.session)
            lane = self._held.setdefault(send.lane, [])
            if send not in lane:
                bisect.insort(lane, send)
        return True

    def _why_fatal(self, error: Any, client: Any) -> Optional[str]:
        """Why ``client`` is beyond recovery, or None: a fatal error class, kafka-python's
        own fatal state, or failures with no acknowledgement for PRODUCER_STUCK_SECONDS."""
        if isinstance(error, self._fatal_errors):
            return f"fatal error {type(error).__name__}"
        try:
            if client._transaction_manager.has_fatal_error():
                return f"kafka-python marked it failed ({error})"
        except Exception:
            pass  # a kafka client without that mark (kafka-python 3 has it)
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since >= PRODUCER_STUCK_SECONDS:
            return f"no send acknowledged for {PRODUCER_STUCK_SECONDS:.0f} s ({error})"
        return None

    def _replace(self) -> None:
        # kafka-python never recovers a producer from e.g. UnknownProducerIdError.
        kafka = _import_kafka()
        log.warning("replacing the kafka producer: %s", self._broken)
        old = self.client
        try:
            self.client = kafka.KafkaProducer(**self.config)
        except kafka.errors.KafkaError as exc:
            log.warning("cannot create a new kafka producer: %s; trying again in 10 s", exc)
            self._replace_after = time.monotonic() + 10.0
            return
        self._broken = None
        # Counted from now: in a long outage, one new client a PRODUCER_STUCK_SECONDS.
        self._failing_since = time.monotonic()
        _close_producer(old, 0)


# --- the transport: the session store ------------------------------------------

class SessionStore:
    """Each session's state in a compacted topic, keyed by the session (the default session
    by the empty key): read to its end before the input is taken (at start and after every
    assignment), saved through the transport's producer, in order per session.

    ``_lock`` guards the states and what is saved while the topic is read; it is never held
    with another lock."""

    def __init__(self, topic: str, producer: OrderedProducer):
        self.topic = topic
        self._producer = producer
        self._states: Dict[bytes, bytes] = {}  # as read from it, and as saved since
        self._reader: Any = None  # a consumer of every partition, no group
        self.behind = True  # read it to its end before taking the next records
        self._saved_meanwhile: Optional[Set[bytes]] = None  # while it is read
        # Saves not acknowledged yet, per key: newer than what the topic holds.
        self._saving: "collections.Counter[bytes]" = collections.Counter()
        self._principal = "NAME"  # (for the kafka-acls.sh lines)
        self._denied_log = LogThrottle(burst=10, period=30.0)
        self._lock = threading.Lock()  # the states (see above)

    def load(self, session: Optional[bytes]) -> Optional[bytes]:
        """The state last saved for ``session`` (None: none)."""
        return self._states.get(session or b"")

    def save(self, session: Optional[bytes], state: bytes, done: Done = nothing) -> None:
        """Save ``session``'s state, at least once and in order; then ``done`` runs."""
        key = session or b""
        with self._lock:
            self._states[key] = state
            self._saving[key] += 1
            if self._saved_meanwhile is not None:
                self._saved_meanwhile.add(key)

        def saved() -> None:
            with self._lock:
                self._saving[key] -= 1
                if not self._saving[key]:
                    del self._saving[key]
            done()
        self._producer.send(_Send(self.topic, key, state, None, saved, key, None,
                                  (self.topic, key)))

    def open(self, kafka: Any, consumer_config: Dict[str, Any]) -> None:
        """The topic's reader; FatalKafkaError when the topic is missing or the brokers say
        it is not compacted (an old state would then be lost, or outlive its sessions), or
        it cannot be opened."""
        topic = self.topic
        self._principal = consumer_config.get("sasl_plain_username") or "NAME"
        try:
            policy = _topic_setting(kafka, topic, consumer_config, "cleanup.policy",
                missing=f"session topic {topic} does not exist (or the brokers' ACLs hide it: "
                        "this server needs Describe on it): create it with: kafka-topics.sh "
                        f"--bootstrap-server HOST:PORT --create --topic {topic} --config "
                        "cleanup.policy=compact")
            reader = dict(consumer_config)
            reader.pop("group_id", None)
            self._reader = kafka.KafkaConsumer(**reader)
            partitions = [kafka.TopicPartition(topic, partition) for partition in
                          sorted(self._reader.partitions_for_topic(topic) or ())]
        except kafka.errors.KafkaError as exc:
            grant = ""
            if isinstance(exc, kafka.errors.TopicAuthorizationFailedError):
                grant = (f" (the brokers' ACLs: grant it with: kafka-acls.sh --bootstrap-server "
                         f"HOST:PORT --add --allow-principal User:{self._principal} --operation "
                         "Read --operation Write --operation Describe --operation "
                         f"DescribeConfigs --topic {topic})")
            raise FatalKafkaError(f"cannot open session topic {topic}: {exc}{grant}") from None
        if policy is None:
            log.warning("the brokers do not report the cleanup.policy of session topic %s: "
                        "make sure it is compacted (cleanup.policy=compact); with ACLs, they "
                        "report it once this server may read its settings: kafka-acls.sh "
                        "--bootstrap-server HOST:PORT --add --allow-principal User:%s "
                        "--operation DescribeConfigs --topic %s", topic, self._principal, topic)
        elif "compact" not in policy:
            raise FatalKafkaError(f"session topic {topic} has cleanup.policy={policy}: it must "
                                  "be compacted (cleanup.policy=compact), or it loses the state "
                                  "of sessions as it deletes old records")
        self._reader.assign(partitions)
        self._reader.seek_to_beginning(*partitions)

    def read(self, denied_is_fatal: bool = False) -> bool:
        """Read the topic to its end as of now: every session's last saved state; False
        when it cannot be read (now).  What this server saves meanwhile is newer than what
        is read, so it is kept.  Refused by the brokers' ACLs: an ERROR naming the grant,
        or (``denied_is_fatal``, at start) FatalKafkaError."""
        reader, started = self._reader, time.monotonic()
        with self._lock:
            self._saved_meanwhile = set()
        read = 0
        try:
            ends = reader.end_offsets(list(reader.assignment()))
            while any(reader.position(tp) < end for tp, end in ends.items()):
                if time.monotonic() - started > 60:
                    raise TimeoutError("not read to its end within 60 s")
                for records in reader.poll(timeout_ms=100).values():
                    with self._lock:
                        for record in records:
                            if record.key is not None \
                                    and record.key not in self._saved_meanwhile \
                                    and record.key not in self._saving:
                                self._states[record.key] = record.value
                                read += 1
        except Exception as exc:  # the broker is away: records wait, and it is read again
            if type(exc).__name__ == "TopicAuthorizationFailedError":
                text = (f"the brokers' ACLs do not let this server read session topic "
                        f"{self.topic} ({exc}): grant it with: kafka-acls.sh "
                        f"--bootstrap-server HOST:PORT --add --allow-principal User:"
                        f"{self._principal} --operation Read --operation Write --operation "
                        f"Describe --operation DescribeConfigs --topic {self.topic}")
                if denied_is_fatal:
                    raise FatalKafkaError(text) from None
                self._denied_log.warning(log, "%s; the input waits", text, level=logging.ERROR)
                return False
            log.warning("session topic %s cannot be read (%s): the input waits", self.topic, exc)
            return False
        finally:
            with self._lock:
                self._saved_meanwhile = None
        self.behind = False
        log.info("session topic %s read (%d records, %.2f s)", self.topic, read,
                 time.monotonic() - started)
        return True

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close(autocommit=False)


# --- the transport: intake -------------------------------------------------------

class Intake:
    """The input side of a server's transport: each record decoded and checked (one that
    cannot be used is rejected: a dead letter, and an error reply when it was a request),
    a client's answer handed to the sink at once, requests queued in a backlog the sink
    takes from as it has room; the partitions paused while the backlog waits or too many
    sends are unacknowledged.  The consumer thread's alone: no lock."""

    def __init__(self, transport: "KafkaTransport", sink: Sink, producer: OrderedProducer,
                 max_input_bytes: int, reply_topic_pattern: Optional["re.Pattern[str]"],
                 own_topics: frozenset, dead_letter_topic: Optional[str]):
        self._transport = transport  # what error replies go through, and the sink is told of
        self._sink = sink
        self._producer = producer
        self.max_input_bytes = max_input_bytes
        self._reply_topic_pattern = reply_topic_pattern
        self._own_topics = own_topics
        self._dead_letter_topic = dead_letter_topic
        # Sends held until acknowledged (for a retry): past either bound, intake pauses.
        self.max_unacked = 10000
        self.max_unacked_bytes = 64 * 1024 * 1024
        self.backlog: Deque[Tuple[Any, Message, Done, Route]] = collections.deque()
        self.paused = False
        self.invalid_log = LogThrottle()
        self.counts = collections.Counter(received=0, invalid=0, dead_lettered=0)

    def take(self, partition: Any, record: Any, done: Done) -> None:
        """One record of ``partition``: queued, answered, or rejected."""
        value = record.value or b""
        message = None
        try:
            if len(value) > self.max_input_bytes:
                raise oversized(value[:1024], len(value), self.max_input_bytes)
            message = decode(value)
            if "method" not in message or "id" not in message:  # only a request is replied to
                route = _fallback_route(record.key, None)
            else:
                route = parse_route(record.key, record.headers, self._reply_topic_pattern)
                if route.topic is not None and (route.topic in self._own_topics
                                                or route.topic.startswith("__")):
                    raise InvalidMessage(f"reply topic {route.topic} is not allowed: the "
                                         "server's own topics (input, session, dead-letter, "
                                         "statistics) and internal topics never are")
            route.source = record.partition
        except InvalidMessage as exc:
            if message is not None and kind(message) == REQUEST:
                exc.id = message["id"]  # a usable message with an unusable route
            self.reject(record, exc, done)
            if exc.answers is not None:  # an answer to Codex: Codex hears it failed
                self._sink.answer(self._transport, error_response(exc.answers, exc.code,
                                                                  exc.reason),
                                  nothing, _fallback_route(record.key, None))
            return
        except Exception as exc:  # a poison pill must be passed, never retried forever
            log.exception("unexpected error reading kafka record: topic %s partition %d "
                          "offset %d", record.topic, record.partition, record.offset)
            self.reject(record, InvalidMessage(f"unreadable record ({type(exc).__name__})",
                                               PARSE_ERROR), done)
            return
        if "method" not in message:
            # A client's answer to Codex: Codex is waiting for it, maybe holding the very
            # requests the queue is full of, so it never waits behind them.
            self._sink.answer(self._transport, message, done, route)
            return
        self.backlog.append((partition, message, done, route))

    def reject(self, record: Any, error: InvalidMessage, done: Done) -> None:
        """A record that cannot be used: a WARNING, a dead letter (with Kafka Connect's
        error headers) and, for a request, its error reply on the output topic."""
        self.counts["invalid"] += 1
        self.invalid_log.warning(log, "invalid payload from kafka: topic %s partition %d "
                                 "offset %d: %s", record.topic, record.partition,
                                 record.offset, error.reason)
        if self._dead_letter_topic and error.id is not None:
            done = after(2, done)  # the record is done once both sends are acknowledged
        if self._dead_letter_topic:
            headers = [("__connect.errors.topic", record.topic.encode()),
                       ("__connect.errors.partition", str(record.partition).encode()),
                       ("__connect.errors.offset", str(record.offset).encode()),
                       ("__connect.errors.exception.class.name", b"InvalidMessage"),
                       ("__connect.errors.exception.message",
                        error.reason.encode("utf-8", "replace"))]
            # A record with neither key nor value cannot be produced as is: keep it, empty.
            value = record.value if record.value is not None or record.key is not None else b""
            self.counts["dead_lettered"] += 1
            self._producer.send(_Send(self._dead_letter_topic, record.key, value, headers, done))
        if error.id is not None:  # on the output topic: the record's reply topic may be why
            self._transport.send(error_response(error.id, error.code, error.reason), done,
                                 _fallback_route(record.key, record.headers))
        elif not self._dead_letter_topic:
            done()

    def offer(self, consumer: Any) -> None:
        """The backlog to the sink; the assigned partitions paused, or resumed, to match."""
        if self.backlog:
            taken = self._sink.offer(self._transport, [item[1:] for item in self.backlog])
            for _ in range(taken):
                self.backlog.popleft()
        assigned = consumer.assignment()
        # Replies the broker has not acknowledged are held too (a broker that takes
        # nothing must not make them pile up): they count against the same bound.
        unacked, unacked_bytes = self._producer.unacked, self._producer.unacked_bytes
        if (self.backlog or unacked >= self.max_unacked
                or unacked_bytes >= self.max_unacked_bytes) and not self.paused and assigned:
            log.info("%s: pausing %s", "processor queue full" if self.backlog else
                     f"{unacked} replies ({unacked_bytes} bytes) not yet acknowledged by kafka",
                     self._transport.input_topic)
            consumer.pause(*assigned)
            self.paused = True
        elif self.paused and not self.backlog and self._sink.has_room() \
                and unacked < self.max_unacked // 2 \
                and unacked_bytes < self.max_unacked_bytes // 2:
            log.info("processor queue has room: resuming %s", self._transport.input_topic)
            consumer.resume(*consumer.paused())
            self.paused = False

    def forget(self, moved: Set[int]) -> None:
        """Drop what is queued of the partitions that moved to another server."""
        self.backlog = collections.deque(item for item in self.backlog
                                         if item[0].partition not in moved)


# --- the transport: connecting ---------------------------------------------------

class BrokerConnection:
    """Makes a transport's two kafka-python clients, its producer and its consumer: in
    short attempts, each failure a WARNING and a retry (a server waits for its brokers; a
    client gives up after ``timeout``), TLS checked first and a failed SASL login named
    at once (``FatalKafkaError``: exit 3)."""

    def __init__(self, consumer_config: Dict[str, Any], producer: OrderedProducer,
                 timeout: float, waits_for_brokers: bool):
        self._config = consumer_config
        self._producer = producer
        self.timeout = timeout
        self.waits_for_brokers = waits_for_brokers
        self._denied_log = LogThrottle(burst=10, period=30.0)

    def open(self, kafka: Any, shutdown: threading.Event) -> Any:
        """The consumer, once the producer is made too; None when ``shutdown`` came first."""
        if importlib.util.find_spec("crc32c") is None:
            log.info("crc32c is not installed: kafka-python checksums each record in pure "
                     "Python, about 10 ms of CPU per 100 KB (pip install crc32c, or the "
                     "package's 'fast' extra, where the host can build or fetch it)")
        context = ssl_context(self._config)
        attempt_ms = int(min(5.0, max(1.0, self.timeout / 3)) * 1000)
        for config, client in ((self._producer.config, kafka.KafkaProducer),
                               (self._config, kafka.KafkaConsumer)):
            if context is not None:
                config["ssl_context"] = context
            if "bootstrap_timeout_ms" in client.DEFAULT_CONFIG:
                # Short attempts: the loop below retries, with a warning each time.
                config.setdefault("bootstrap_timeout_ms", attempt_ms)
        servers = self._config["bootstrap_servers"]
        deadline = time.monotonic() + self.timeout
        delay = 0.5
        attempt = 0
        while not shutdown.is_set():
            attempt += 1
            consumer, cause = self._attempt(kafka, context, attempt_ms)
            if consumer is not None:
                return consumer
            self._producer.discard()
            if (not self.waits_for_brokers or not _RETRYABLE.search(cause)) \
                    and time.monotonic() > deadline:
                raise FatalKafkaError(f"cannot connect to kafka at {','.join(servers)} within "
                                      f"--kafka-connect-timeout: {cause}")
            log.warning("cannot connect to kafka at %s (attempt %d: %s); retrying in %.1f s",
                        ",".join(servers), attempt, cause, delay)
            shutdown.wait(delay)
            delay = min(delay * 2, 30.0)
        return None

    def _attempt(self, kafka: Any, context: Any, attempt_ms: int) -> Tuple[Any, str]:
        """(the consumer, "") with the producer made too, or (None, why not now)."""
        with _ClientLog() as client_log:
            try:
                if context is not None:
                    check_tls(self._config["bootstrap_servers"], context,
                              "ssl_certfile" in self._config, timeout=attempt_ms / 1000)
                self._producer.open(kafka)
                return kafka.KafkaConsumer(**self._config), ""
            except (kafka.errors.KafkaError, OSError) as exc:
                cause = client_log.sasl_failure()
                if cause:
                    raise FatalKafkaError(
                        f"SASL {self._config.get('sasl_mechanism')} login as "
                        f"{self._config.get('sasl_plain_username')!r} failed: "
                        f"{cause}") from None
                return None, client_log.messages[0] if client_log.messages else str(exc)

    def not_authorized(self, error: Any, topic: str, starting: bool) -> None:
        """The brokers' ACLs refuse the consumer its group or its ``topic``: while
        ``starting``, exit 3 naming what is missing and the line that grants it; later (an
        ACL revoked), an ERROR each time, and it keeps trying."""
        errors = _import_kafka().errors
        group = isinstance(error, errors.GroupAuthorizationFailedError)
        what = f"--group {self._config['group_id']}" if group else f"--topic {topic}"
        principal = self._config.get("sasl_plain_username") or "NAME"
        text = (f"the brokers' ACLs do not let this server read {what[2:]} ({error}): grant "
                f"it with: kafka-acls.sh --bootstrap-server HOST:PORT --add --allow-principal "
                f"User:{principal} --operation Read{'' if group else ' --operation Describe'} "
                f"{what}")
        if starting:
            raise FatalKafkaError(text)
        self._denied_log.warning(log, "%s", text, level=logging.ERROR)


# --- the transport: the consumer loop ----------------------------------------------

class KafkaTransport:
    """One server's Kafka connection: the input topic -> ``sink``; ``send`` -> the output
    topic, or the reply topic a request names.

    After CPython's socketserver: ``serve_forever`` connects, then polls, hands over and
    commits until ``shutdown`` (from any thread); ``close`` waits for unacknowledged sends,
    commits and closes.  It runs in the calling thread, the only thread that touches the
    consumer (not thread-safe); ``send`` may be called from any thread.

    Delivery is at-least-once.  Every record is handed on with a ``done`` callback; its
    offset is committed only when it and every earlier record of its partition are done
    (``OffsetTracker``).  Whoever answers a request calls ``send(reply, done)``, and
    ``done`` runs when the brokers acknowledged the reply (``OrderedProducer``).  Records
    go to the sink through ``Intake`` (decoded, rejected, queued, paused); with a session
    topic, ``store`` (a ``SessionStore``) is read before them.  ``owner`` (the backend)
    hears of rebalances."""

    name = "kafka"
    waits_for_brokers = True  # unreachable brokers: warnings until they answer

    def __init__(self, input_topic: str, output_topic: str, sink: Sink,
                 properties: Mapping[str, str], max_message_bytes: int = 1024 * 1024,
                 dead_letter_topic: Optional[str] = None, connect_timeout: float = 30.0,
                 poll_interval: float = 0.1, max_input_bytes: int = 8 * 1024 * 1024,
                 reply_topic_pattern: Optional[str] = None, stats_topic: Optional[str] = None,
                 session_topic: Optional[str] = None, owner: Optional[SessionOwner] = None):
        """``stats_topic``: None without statistics, "" for statistics only logged."""
        self.input_topic = input_topic
        self.output_topic = output_topic
        self.stats_topic = stats_topic
        self.max_message_bytes = max_message_bytes
        self.connect_timeout = connect_timeout
        self._sink = sink
        self._owner = owner or SessionOwner()
        self._poll_ms = int(poll_interval * 1000)
        # Never a client's reply topic: a reply keyed by a client-chosen id in the session
        # topic would replace that session's state for good (compaction), say.
        own_topics = frozenset(topic for topic in (
            input_topic, session_topic, dead_letter_topic, stats_topic) if topic)
        consumer_config, producer_config = client_config(properties)
        self._consumer_config = dict(consumer_config, enable_auto_commit=False)
        # Room for the key, headers and record overhead on top of the largest value.
        # Batches of up to librdkafka's batch.size: at kafka-python's 16 KB, replies of ~10 KB
        # travel one per request and a busy server's acknowledgements fall behind.
        config = dict(acks="all", max_block_ms=10000,
                      max_request_size=max_message_bytes + 64 * 1024,
                      batch_size=min(1_000_000, max_message_bytes + 64 * 1024))
        config.update(producer_config)
        self.producer = OrderedProducer(config, output_topic, own_topics)
        self.store = SessionStore(session_topic, self.producer) if session_topic else None
        self.intake = Intake(self, sink, self.producer, max_input_bytes,
                             re.compile(reply_topic_pattern) if reply_topic_pattern is not None
                             else None, own_topics, dead_letter_topic)
        self._consumer: Any = None
        self._offsets = OffsetTracker()
        self._assigned: frozenset = frozenset()  # input partitions this server reads
        self._unroutable_log = LogThrottle()
        self._output_limit: Optional[int] = None  # the output topic's max.message.bytes
        self._connection = BrokerConnection(self._consumer_config, self.producer,
                                            connect_timeout, self.waits_for_brokers)
        self._shutdown = threading.Event()
        self._close_requested = threading.Event()
        self._close_deadline = 0.0
        self._closed = threading.Event()
        self.ready = threading.Event()  # set while the partitions and positions are known
        self._ready_since: Optional[float] = None  # first ready then (None: never yet)
        self._looked_up = 0.0  # when the input topic's metadata was last fetched again
        self._stats_topic_ok = False  # looked up once, when ready
        self._partitions: List[Dict[str, Any]] = []  # the consumer thread's last look
        self._looked = 0.0

    # Public API --------------------------------------------------------

    def serve_forever(self) -> None:
        """Connect, consume until ``shutdown``, then on ``close`` drain, commit and close."""
        try:
            if self._connect():
                self._consume()
            # Replies of what was taken are still coming: keep retrying until close().
            while not self._close_requested.wait(0.05):
                self.producer.resend_due()
            if self._consumer is not None:
                self._flush_and_close()
        finally:
            self._closed.set()

    def send(self, message: Message, done: Done = nothing, route: Route = DEFAULT_ROUTE) -> None:
        """Produce one message where its ``route`` says, keyed by its id (unkeyed without).

        The topic is the route's reply topic, else the output topic; the partition the
        route's, else the session's (murmur2 of its key, as Java and kafka-python pick it;
        0 for the default session), so a session's records keep their order.  A keyed
        session's records carry the ``codex-session`` header, a reply its request's
        correlation headers.  Retried until the broker acknowledges it (or the shutdown
        deadline), never overtaken by a later record of its session not yet handed to the
        producer; then ``done`` runs.  A reply over ``max_message_bytes`` becomes an error;
        so does one to a reply topic (or partition) the brokers do not have.
        """
        if (route.topic is not None or route.partition is not None) \
                and self.producer.client is not None:
            topic = route.topic or self.output_topic
            problem = self.producer.reply_topic_problem(topic, route.partition)
            if problem:
                self._unroutable_log.warning(log, "session %s: reply topic %s %s; the %s goes "
                                             "to %s as an error", session_name(route.session),
                                             topic, problem, kind(message), self.output_topic)
                if "method" in message or "id" not in message:
                    done()  # a notification or Codex's request: nobody to tell but the log
                    return
                message = error_response(message["id"], INVALID_REQUEST, f"reply topic "
                                         f"{topic} {problem}: the reply cannot go there")
                route = Route(route.session, correlation=route.correlation)
        self._produce(message, done, route, reply_key(message))

    def owns(self, route: Route) -> bool:
        """Whether the record ``route`` came with is still this server's to answer: after its
        partition moved to another server, that one reads it again."""
        return route.source is None or route.source in self._assigned

    def stats(self) -> Dict[str, Any]:
        """Counters, pause state, unacknowledged sends and, per input partition, position,
        committed offset and lag (behind the high watermark of the last fetch)."""
        return dict(self.intake.counts, **self.producer.stats(), paused=self.intake.paused,
                    partitions=self._partitions)

    def publish(self, value: bytes) -> None:
        """One statistics record to the stats topic (keyed by the client id), if it exists."""
        if self.producer.client is not None and self._stats_topic_ok:
            self.producer.publish(self.stats_topic, value)

    def shutdown(self) -> None:
        """Stop taking new records; the loop returns within one poll interval."""
        self._shutdown.set()

    def close(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) for unacknowledged sends, then commit and close."""
        self._shutdown.set()
        self._close_deadline = time.monotonic() + timeout
        self._close_requested.set()
        self._closed.wait(timeout + 5.0)

    # Producing ---------------------------------------------------------

    def _produce(self, message: Message, done: Done, route: Route, key: Optional[bytes],
                 headers: Sequence[Tuple[str, bytes]] = ()) -> None:
        reply = "method" not in message
        value = encode_reply(message)
        all_headers = [(SESSION_HEADER, route.session)] if route.session is not None else []
        if reply:  # only the reply itself answers the correlation
            all_headers.extend(route.correlation)
        all_headers.extend(headers)
        topic = route.topic or self.output_topic
        if value is not None and len(value) > self.max_message_bytes:
            value = self._too_large(message, key, len(value))
        elif value is not None and topic == self.output_topic and self._output_limit:
            # What the brokers would refuse (kafka-python then fails the partition's later
            # records too): a record's value, key, headers and batch overhead.
            size = len(value) + len(key or b"") + 100 + sum(
                len(name) + len(header) for name, header in all_headers)
            if size > self._output_limit:
                value = self._too_large(message, key, size, self._output_limit,
                                        f"max.message.bytes of topic {self.output_topic}")
        if value is None:
            done()
            return
        lane = (topic, route.session if route.partition is None else route.partition)
        record = _Send(topic, key, value, all_headers or None, done, route.session,
                       route.partition, lane, reply)
        record.reply_id = message.get("id") if reply else None
        self.producer.send(record)

    def _too_large(self, message: Message, key: Optional[bytes], size: int,
                   limit: Optional[int] = None,
                   name: str = "--kafka-max-message-bytes") -> Optional[bytes]:
        """What goes instead of a message over the limit (None: nothing)."""
        text = self._say_too_large("reply", key, size, limit, name)
        if key is None or "method" in message:
            return None
        return encode(error_response(message["id"], INTERNAL_ERROR, text))

    def _say_too_large(self, what: str, key: Optional[bytes], size: int,
                       limit: Optional[int] = None,
                       name: str = "--kafka-max-message-bytes") -> str:
        limit = self.max_message_bytes if limit is None else limit
        log.error("%s too large for kafka (key %s): %d bytes, %d over the limit of %d "
                  "(%s)", what, _shown(key), size, size - limit, limit, name)
        return f"{what} too large for Kafka: {size} bytes, {size - limit} bytes over the " \
               f"limit of {limit} ({name})"

    # Connecting --------------------------------------------------------

    def _connect(self) -> bool:
        kafka = _import_kafka()
        self._consumer = self._connection.open(kafka, self._shutdown)
        if self._consumer is None:
            return False  # shut down while waiting
        self._start_reading(kafka)
        return True

    def _start_reading(self, kafka: Any) -> None:
        """The session topic's reader, then the group's subscription."""
        # (Compressed, a batch is checked by its compressed size: no limit to check here.)
        if self.producer.config.get("compression_type") in (None, "none"):
            self._output_limit = self._look_up_limit(kafka)
        if self.store is not None:
            self.store.open(kafka, self._consumer_config)
        _mark_rejoins(self._consumer)
        self._consumer.subscribe([self.input_topic], listener=_rebalance_listener(kafka, self))
        log.info("kafka consumer subscribed to %s as group %s", self.input_topic,
                 self._consumer_config["group_id"])

    def _look_up_limit(self, kafka: Any) -> Optional[int]:
        """The output topic's max.message.bytes as the brokers report it (None: they do not,
        or the topic does not exist yet): larger replies become errors here."""
        try:
            limit = _topic_setting(kafka, self.output_topic, self._consumer_config,
                                   "max.message.bytes")
        except Exception as exc:  # not known: the brokers' own refusal is handled too
            log.debug("cannot read the settings of topic %s: %r", self.output_topic, exc)
            return None
        if limit is None or not limit.isdigit():
            return None
        log.info("topic %s takes records up to %s bytes (max.message.bytes): larger replies "
                 "become errors", self.output_topic, limit)
        return int(limit)

    # The consumer thread -----------------------------------------------

    def _consume(self) -> None:
        consumer = self._consumer
        errors = _import_kafka().errors
        while not self._shutdown.is_set():
            self.producer.resend_due()
            self.intake.offer(consumer)
            try:
                # Never sleep between polls: kafka-python completes group joins inside poll().
                batches = consumer.poll(timeout_ms=self._poll_ms)
            except (errors.GroupAuthorizationFailedError,
                    errors.TopicAuthorizationFailedError) as exc:
                self._connection.not_authorized(exc, self.input_topic, self._starting())
                self._shutdown.wait(0.5)
                continue
            except errors.KafkaError as exc:
                log.warning("kafka poll failed: %s", exc)
                self._shutdown.wait(0.5)
                continue
            except Exception:  # a client bug on one fetch must not end the service
                log.exception("kafka poll failed unexpectedly")
                self._shutdown.wait(0.5)
                continue
            if self.store is not None and self.store.behind \
                    and not self.store.read(denied_is_fatal=self._starting()):
                for partition, records in batches.items():  # taken after it is read
                    consumer.seek(partition, records[0].offset)
                self._shutdown.wait(1.0)
                continue
            assignment = consumer.assignment()
            if not self.ready.is_set() and assignment:
                self._announce_ready()
            elif not assignment and self.ready.is_set() \
                    and time.monotonic() - self._looked_up >= 2.0:
                self._look_up_input(consumer)
            if self.stats_topic is not None and time.monotonic() - self._looked >= 1.0:
                self._looked = time.monotonic()  # (the consumer allows this thread alone)
                self._partitions = self._offsets.look(consumer, self._partitions)
            for partition, records in batches.items():
                self.intake.counts["received"] += len(records)
                dones = self._offsets.taken(partition, [record.offset for record in records])
                for record, done in zip(records, dones):
                    self._take(partition, record, done)
            self.intake.offer(consumer)
            self._commit()

    def _take(self, partition: Any, record: Any, done: Done) -> None:
        self.intake.take(partition, record, done)

    def _starting(self) -> bool:
        """Not ready yet, or only just (within the connect timeout): an ACL missing now is
        a setting to fix, not one revoked (the first fetch may fail after the positions
        are read, which needs Describe only)."""
        return self._ready_since is None \
            or time.monotonic() - self._ready_since < self.connect_timeout

    def _look_up_input(self, consumer: Any) -> None:
        """The input topic's metadata, fetched again while the group gave this server none of
        it: a topic created just before the server joined is unknown to the assignment until
        the client's metadata is renewed (every 5 minutes by default), and a renewal that
        finds it makes the group rebalance."""
        self._looked_up = time.monotonic()
        try:
            consumer.partitions_for_topic(self.input_topic)
        except Exception as exc:  # the next look will do
            log.debug("cannot look up topic %s: %r", self.input_topic, exc)

    def _announce_ready(self) -> None:
        if self.stats_topic and not self._stats_topic_ok:  # once, on this thread: it may block
            try:
                self._stats_topic_ok = bool(self.producer.client.partitions_for(self.stats_topic))
            except Exception as exc:
                log.warning("stats topic %s is unknown to the brokers (%s): statistics are only "
                            "logged", self.stats_topic, exc)
        consumer = self._consumer
        # position() resolves the committed or reset offset now, so under "latest" a
        # record produced after the ready line is never skipped.
        positions = {tp: consumer.position(tp) for tp in consumer.assignment()}
        if self._ready_since is None:
            self._ready_since = time.monotonic()
        log.info("kafka transport ready: topic %s partitions %s", self.input_topic,
                 ", ".join(f"{tp.partition}@{offset}" for tp, offset in sorted(positions.items())))
        self.ready.set()

    def _commit(self, partitions: Optional[Iterable[Any]] = None, sync: bool = False,
                force: bool = False) -> None:
        if self._consumer_config.get("group_id") is not None:  # (a client's has none)
            self._offsets.commit(self._consumer, partitions, sync, force)

    def _flush_and_close(self) -> None:
        self.producer.flush(self._close_deadline)
        log.info("committing kafka offsets")
        self._commit(sync=True, force=True)
        log.info("closing kafka consumer")
        self._consumer.close(autocommit=False)
        if self.store is not None:
            self.store.close()

    # Rebalances (on the consumer thread, inside poll) --------------------

    def _partitions_revoked(self, revoked: Any) -> None:
        # Eager rebalancing takes every partition, then gives a set back (assigned).  What
        # is in flight is answered first (bounded), and what is done committed, so that a
        # partition that moves goes with its answers committed; the new owner reads the
        # rest again.  Asynchronously: kafka-python 3 runs listeners on its IO thread,
        # where a blocking commit is refused.
        self._owner.settle(self, time.monotonic() + REBALANCE_WAIT)
        self._commit(set(revoked), force=True)
        self.intake.paused = False
        self.ready.clear()

    def _partitions_assigned(self, assigned: Any) -> None:
        """The partitions taken and not given back moved to another server: their offsets,
        queued records and sessions are forgotten here.  Those kept go on where they were
        (kafka-python 3 keeps their position, kafka-python-ng would read them again)."""
        new = frozenset(tp.partition for tp in assigned)
        moved = self._assigned - new
        self._offsets.forget(tp for tp in self._offsets.partitions() if tp.partition in moved)
        self.intake.forget(moved)
        for tp in assigned:
            position = self._offsets.next_offset(tp)
            if position is not None:
                self._consumer.seek(tp, position)
        self._assigned = new
        if self.store is not None:
            self.store.behind = True
        if moved:  # their sessions end here
            self._owner.revoked(self, set(moved))


class KafkaClientTransport(KafkaTransport):
    """A client's connection to a server (the proxy's), as socketserver's ``UDPServer`` is
    a ``TCPServer``: it reads, without a group, the records of its ``session`` in the
    partition the session maps to, from the end, each to the sink at once; what it sends
    goes keyed by the session, naming ``reply_topic`` if given.  It gives up when the
    brokers cannot be reached within the connect timeout."""

    waits_for_brokers = False

    def __init__(self, input_topic: str, output_topic: str, sink: Sink,
                 properties: Mapping[str, str], session: str,
                 reply_topic: Optional[str] = None, **settings: Any):
        super().__init__(input_topic, output_topic, sink, properties, **settings)
        self.session = session.encode()
        self._reply_to = [("kafka_replyTopic", reply_topic.encode())] if reply_topic else []

    def send(self, message: Message, done: Done = nothing, route: Route = DEFAULT_ROUTE) -> None:
        """Produce one message keyed by the session, to the output topic (the server's
        input) in the session's partition; then ``done`` runs."""
        self._produce(message, done, Route(self.session), self.session, self._reply_to)

    def _too_large(self, message: Message, key: Optional[bytes], size: int,
                   limit: Optional[int] = None,
                   name: str = "--kafka-max-message-bytes") -> Optional[bytes]:
        if "method" not in message:
            return super()._too_large(message, key, size, limit, name)
        text = self._say_too_large("request", key, size, limit, name)
        if "id" in message:  # the client hears so
            self._sink.answer(self, error_response(message["id"], INVALID_REQUEST, text),
                              nothing, DEFAULT_ROUTE)
        return None

    def _start_reading(self, kafka: Any) -> None:
        """The session's partition, from the end, so that nothing sent after ``ready`` is
        missed."""
        partitions = self._consumer.partitions_for_topic(self.input_topic)
        if not partitions:
            raise FatalKafkaError(f"topic {self.input_topic} does not exist")
        partition = kafka.TopicPartition(self.input_topic,
                                         partition_of(self.session, len(partitions)))
        self._consumer.assign([partition])
        self._consumer.seek_to_end(partition)
        log.info("kafka consumer reading %s partition %d for session %s", self.input_topic,
                 partition.partition, session_name(self.session))

    def _take(self, partition: Any, record: Any, done: Done) -> None:
        """Only its session's records, each to the sink at once, so in the server's order.
        One that cannot be read is answered here: an error for the request it answers, or
        back to the server for Codex's request."""
        if (SESSION_HEADER, self.session) not in (record.headers or ()):
            done()  # another session's
            return
        value = record.value or b""
        limit = self.intake.max_input_bytes
        try:
            if len(value) > limit:
                raise oversized(value[:1024], len(value), limit)
            message = decode(value, max_depth=None)  # the server relays Codex's, as Codex's
        except InvalidMessage as exc:
            self.intake.counts["invalid"] += 1
            self.intake.invalid_log.warning(log, "invalid payload from kafka: topic %s "
                                            "partition %d offset %d: %s", record.topic,
                                            record.partition, record.offset, exc.reason)
            complete = len(value) <= limit
            what, msg_id = peek(value if complete else value[:4096], complete)
            if msg_id is not None and what == REQUEST:
                self.send(error_response(msg_id, exc.code, exc.reason))
            if msg_id is None or what != RESPONSE:
                done()
                return
            message = error_response(msg_id, INTERNAL_ERROR, f"the server's reply cannot be "
                                                             f"read: {exc.reason}")
        self._sink.answer(self, message, done, DEFAULT_ROUTE)


class OffsetTracker:
    """Per partition, which taken offsets are done; a partition commits up to (not
    including) its first offset that is not done.  ``_lock`` guards its tables (``done``
    comes from any thread); the consumer is used on the consumer thread only."""

    def __init__(self) -> None:
        self._last_commit = 0.0
        self._failed_log = LogThrottle(burst=5, period=10.0)
        self._lock = threading.Lock()  # the tables (see above)
        self._pending: Dict[Any, Deque[int]] = {}  # taken, not yet done, in offset order
        self._done: Dict[Any, Set[int]] = {}  # done out of order, still behind the first
        self._next: Dict[Any, int] = {}  # offset after the last one taken
        self._asked: Dict[Any, int] = {}  # last commit point handed out

    def taken(self, partition: Any, offsets: List[int]) -> List["functools.partial[None]"]:
        """Record offsets (ascending) as taken; each gets its ``done`` callable."""
        with self._lock:
            pending = self._pending.setdefault(partition, collections.deque())
            pending.extend(offsets)
            self._done.setdefault(partition, set())
            self._next[partition] = offsets[-1] + 1
        # Tied to this deque: a done() from before a revoke must not touch a later one.
        return [functools.partial(self._mark_done, partition, pending, offset)
                for offset in offsets]

    def _mark_done(self, partition: Any, pending: Deque[int], offset: int) -> None:
        with self._lock:
            if self._pending.get(partition) is not pending or not pending \
                    or offset < pending[0]:
                return  # revoked meanwhile (the new owner reads it again), or done before
            if pending[0] != offset:
                self._done[partition].add(offset)  # out of order: wait for the earlier ones
                return
            pending.popleft()
            done = self._done[partition]
            while pending and pending[0] in done:
                done.discard(pending.popleft())

    def partitions(self) -> List[Any]:
        with self._lock:
            return list(self._next)

    def next_offset(self, partition: Any) -> Optional[int]:
        """The offset after the last one taken (None: none taken since it came)."""
        return self._next.get(partition)

    def commit_points(self, partitions: Optional[Iterable[Any]] = None,
                      again: bool = False) -> Dict[Any, int]:
        """{partition: offset to commit} for partitions whose point moved since asked
        (``again``: every partition, since an asynchronous commit may have been lost)."""
        with self._lock:
            points = {}
            for partition in (self._next if partitions is None else partitions):
                if partition not in self._next:
                    continue
                pending = self._pending[partition]
                point = pending[0] if pending else self._next[partition]
                if again or self._asked.get(partition) != point:
                    points[partition] = self._asked[partition] = point
            return points

    def committed(self, partition: Any) -> Optional[int]:
        """The last commit point handed out (None: none since the partition came)."""
        return self._asked.get(partition)

    def commit_failed(self, points: Mapping[Any, int]) -> None:
        with self._lock:
            for partition, point in points.items():
                if self._asked.get(partition) == point:
                    del self._asked[partition]

    def forget(self, partitions: Iterable[Any]) -> None:
        with self._lock:
            for partition in partitions:
                for table in (self._pending, self._done, self._next, self._asked):
                    table.pop(partition, None)

    def commit(self, consumer: Any, partitions: Optional[Iterable[Any]] = None,
               sync: bool = False, force: bool = False) -> None:
        """Commit what moved (of ``partitions``; None: all), at most ten times a second
        unless ``force``d; ``sync`` blocks (at close) and commits every point again."""
        now = time.monotonic()
        if not (sync or force) and now - self._last_commit < 0.1:
            return
        self._last_commit = now
        points = self.commit_points(partitions, again=sync)
        if not points:
            return
        offsets = {tp: _offset_and_metadata(offset) for tp, offset in points.items()}
        try:
            if sync:
                consumer.commit(offsets=offsets)
            else:
                consumer.commit_async(offsets=offsets, callback=self._committed)
        except Exception as exc:
            self.commit_failed(points)
            self._failed_log.warning(log, "kafka offset commit failed: %s", exc)

    def _committed(self, offsets: Any, response: Any) -> None:
        if isinstance(response, Exception):
            self.commit_failed({tp: meta.offset for tp, meta in offsets.items()})
            self._failed_log.warning(log, "kafka offset commit failed: %s", response)

    def look(self, consumer: Any, last: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Per assigned partition: position, committed offset and lag (behind the high
        watermark of the last fetch); ``last`` when they cannot be read now."""
        looks = []
        try:
            for tp in sorted(consumer.assignment()):
                position, end = consumer.position(tp), consumer.highwater(tp)
                looks.append({"partition": tp.partition, "position": position,
                              "committed": self.committed(tp),
                              "lag": None if end is None or position is None else
                              end - position})
        except Exception as exc:  # a rebalance under way, say: the next look will do
            log.debug("statistics: cannot read the input positions: %r", exc)
            return last
        return looks


def _missing_topic_hint(error: Any, topic: str) -> str:
    """What a send failing for want of metadata most likely means."""
    if isinstance(error, LookupError) or "metadata" in str(error).lower():
        return f" (do the brokers have topic {topic}? Without auto.create.topics.enable " \
               "it must be created)"
    return ""


def _fallback_route(key: Optional[bytes], headers: Any) -> Route:
    """A record's session (the default one when its key is unusable) and its correlation
    headers, without the reply topic and partition: for an error about its route."""
    try:
        session = parse_route(key, None).session
    except InvalidMessage:
        session = None
    return Route(session, correlation=tuple((name, value or b"") for name, value in headers or ()
                                            if name in CORRELATION_HEADERS))


def _close_producer(producer: Any, timeout: float) -> None:
    """Close a producer; kafka-python raises when sends are still open, which is no reason
    to skip the commit and consumer close that follow."""
    if producer is None:
        return
    try:
        producer.close(timeout=timeout)
    except Exception as exc:
        log.warning("kafka producer closed with sends still open: %s", exc)


def _session_partition(producer: Any, topic: str, session: Optional[bytes]) -> int:
    """The partition of ``session`` in ``topic``: what Java's and kafka-python's default
    partitioner pick for its key, so a client can compute it; 0 for the default one."""
    if session is None:
        return 0
    partitions = producer.partitions_for(topic)  # kept fresh by kafka-python's metadata
    if not partitions:
        raise LookupError(f"no partitions known for {topic}")
    return partition_of(session, len(partitions))


@functools.lru_cache(maxsize=10000)  # a session sends many records; murmur2 is pure Python
def partition_of(key: bytes, partitions: int) -> int:
    """The partition of ``partitions`` that Java's and kafka-python's default partitioner
    pick for ``key`` (murmur2): where a client finds its session's records."""
    from kafka.partitioner.default import murmur2
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def after(count: int, done: Done) -> Done:
    """A ``done`` that runs ``done`` at its ``count``-th call (from whichever thread)."""
    lock = threading.Lock()  # the call count
    calls = [0]

    def one_done() -> None:
        with lock:
            calls[0] += 1
            last = calls[0] == count
        if last:
            done()
    return one_done


def session_name(session: Optional[bytes]) -> str:
    """A session (its record key) as logs show it: quoted, its first 64 bytes."""
    return "(default)" if session is None else repr(session[:64].decode("utf-8", "replace"))


def _shown(key: Optional[bytes]) -> str:
    """A record's key (a reply's is its request's id) as logs show it."""
    return "none" if key is None else key.decode("utf-8", "replace")


def _import_kafka() -> Any:
    try:
        import kafka
        import kafka.errors
    except ImportError:
        raise SystemExit("kafka-python is required for the Kafka transport: "
                         "pip install 'kafka-python>=3.0'") from None
    return kafka


def _topic_setting(kafka: Any, topic: str, config: Dict[str, Any], name: str,
                   missing: Optional[str] = None) -> Optional[str]:
    """The topic's setting ``name`` as the brokers report it (None: they do not, Tansu say,
    or the topic does not exist), asked with the admin settings of a client's ``config``;
    FatalKafkaError(``missing``) when it does not exist and ``missing`` says why that is
    fatal."""
    from kafka.admin import ConfigResource, ConfigResourceType
    admin = kafka.KafkaAdminClient(**{key: value for key, value in config.items()
                                      if key in kafka.KafkaAdminClient.DEFAULT_CONFIG})
    try:
        if topic not in admin.list_topics():
            if missing is not None:
                raise FatalKafkaError(missing)
            return None
        resource = [ConfigResource(ConfigResourceType.TOPIC, topic)]
        try:  # kafka-python 3 reports only the settings changed from the broker's default
            described = admin.describe_configs(resource, config_filter="all")
        except TypeError:
            described = admin.describe_configs(resource)
    finally:
        admin.close()
    if isinstance(described, dict):  # kafka-python 3: {"topic": {name: {setting: ...}}}
        value = described.get("topic", {}).get(topic, {}).get(name)
        value = value.get("value") if isinstance(value, dict) else value
        return None if value is None else str(value)
    for response in described or ():  # kafka-python-ng: the protocol's responses
        for resource_entry in getattr(response, "resources", ()):
            for entry in resource_entry[4]:
                if entry[0] == name:
                    return None if entry[1] is None else str(entry[1])
    return None


def _mark_rejoins(consumer: Any) -> None:
    """kafka-python 3.0 rejoins the group when the input topic's partitions change (or become
    known) without marking the join as needed: a JoinGroup answered while no poll() runs is
    then dropped, and the consumer keeps its old partitions, or none, for good (on a busy
    machine, one start in a few dozen). The Java client marks it (KAFKA-9815); so does this,
    until the join is taken up. kafka-python-ng completes joins in its callbacks: untouched."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_join_task"):
        return
    need_rejoin = coordinator.need_rejoin

    def need_rejoin_marked() -> bool:
        if need_rejoin():
            coordinator.request_rejoin()  # cleared once the join's assignment is taken
            return True
        return False
    coordinator.need_rejoin = need_rejoin_marked


def _offset_and_metadata(offset: int) -> Any:
    from kafka.structs import OffsetAndMetadata
    # kafka-python 3 has (offset, metadata, leader_epoch); kafka-python-ng (offset, metadata).
    extra = (-1,) * (len(OffsetAndMetadata._fields) - 2)
    return OffsetAndMetadata(offset, "", *extra)


def _rebalance_listener(kafka: Any, transport: KafkaTransport) -> Any:
    """A kafka-python ConsumerRebalanceListener (built here so the import stays lazy)."""

    class RebalanceListener(kafka.ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            transport._partitions_revoked(revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            log.info("kafka partitions assigned: %s",
                     ", ".join(f"{tp.topic}[{tp.partition}]" for tp in assigned) or "none")
            transport._partitions_assigned(assigned)
            if not assigned:  # joined, with nothing to read: as ready as it will be
                # (Not "ready" in the log: no position is resolved, so what is produced now
                # is not yet known to be read.)
                log.info("kafka transport: no partition of topic %s assigned (more servers in "
                         "the group than partitions, or the brokers did not know the topic "
                         "yet: its metadata is looked up again)", transport.input_topic)
                transport.ready.set()

    return RebalanceListener()
