"""Kafka transport and JSON-RPC envelopes for codex-app-server.

This module knows Kafka and the JSON-RPC 2.0 envelope, nothing of Codex.  It
imports kafka-python only when a ``KafkaTransport`` is built, so the envelope
functions work on a host without kafka-python (stdio-only use).

Public entry points, in reading order:

* ``decode`` / ``encode`` / ``kind`` / ``reply_key`` / ``error_response``:
  the JSON-RPC envelope, shared by every transport.
* ``client_config``: librdkafka/Java property names (``-X key=value``) mapped
  onto kafka-python's keyword arguments.
* ``KafkaTransport``: consumes the input topic into a caller's ``submit``
  callable and produces replies to the output topic.
"""

import json
import logging
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

log = logging.getLogger("kafka_transport")

# --- JSON-RPC envelopes ---------------------------------------------------

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

REQUEST = "request"
NOTIFICATION = "notification"
RESPONSE = "response"
ERROR = "error"

Message = Dict[str, Any]


class InvalidMessage(ValueError):
    """A payload that is not one usable JSON-RPC message.

    ``id`` is the request id when one could be recovered (so the sender can be
    answered), else None; ``code`` is the JSON-RPC error code to answer with.
    """

    def __init__(self, reason: str, code: int = INVALID_REQUEST, id: Any = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.id = id


def decode(data: bytes) -> Message:
    """Parse one payload into a validated JSON-RPC message, or raise InvalidMessage."""
    if not data:
        raise InvalidMessage("empty payload", PARSE_ERROR)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not UTF-8 ({exc.reason} at byte {exc.start})", PARSE_ERROR) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                             PARSE_ERROR) from None
    except RecursionError:
        # A hostile payload of deeply nested arrays must not take the thread down.
        raise InvalidMessage("invalid JSON (nested too deeply)", PARSE_ERROR) from None
    validate(value)
    return value


def validate(value: Any) -> None:
    """Raise InvalidMessage unless ``value`` is a JSON-RPC request, notification, response or error."""
    if not isinstance(value, dict):
        raise InvalidMessage(f"a JSON-RPC message must be an object, not {_json_type(value)}")
    has_id = "id" in value
    msg_id = value.get("id")
    id_ok = _valid_id(msg_id)
    answer_id = msg_id if has_id and id_ok and msg_id is not None else None
    if "jsonrpc" in value and value["jsonrpc"] != "2.0":
        raise InvalidMessage('"jsonrpc" must be "2.0"', id=answer_id)
    if has_id and not id_ok:
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
            raise InvalidMessage('a response must not carry both "result" and "error"', id=answer_id)
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
    """One compact UTF-8 JSON line body (no newline)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


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


def _valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or _is_int(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --- client configuration -------------------------------------------------

def _integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError("expected true or false")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return text
    return parse


def _acks(text: str) -> Any:
    if text in ("all", "-1"):
        return "all"
    if text in ("0", "1"):
        return int(text)
    raise ValueError("expected all, -1, 0 or 1")


def _offset_reset(text: str) -> str:
    aliases = {"earliest": "earliest", "smallest": "earliest", "beginning": "earliest",
               "latest": "latest", "largest": "latest", "end": "latest"}
    if text not in aliases:
        raise ValueError("expected earliest or latest")
    return aliases[text]


def _compression(text: str) -> Optional[str]:
    if text == "none":
        return None
    if text not in ("gzip", "snappy", "lz4", "zstd"):
        raise ValueError("expected none, gzip, snappy, lz4 or zstd")
    return text


CONSUMER, PRODUCER, BOTH = "consumer", "producer", "both"

# librdkafka / Java property name -> (which client, kafka-python argument, parser).
PROPERTIES: Dict[str, Tuple[str, str, Callable[[str], Any]]] = {
    "client.id": (BOTH, "client_id", str),
    "request.timeout.ms": (BOTH, "request_timeout_ms", _integer),
    "retry.backoff.ms": (BOTH, "retry_backoff_ms", _integer),
    "reconnect.backoff.ms": (BOTH, "reconnect_backoff_ms", _integer),
    "reconnect.backoff.max.ms": (BOTH, "reconnect_backoff_max_ms", _integer),
    "metadata.max.age.ms": (BOTH, "metadata_max_age_ms", _integer),
    "connections.max.idle.ms": (BOTH, "connections_max_idle_ms", _integer),
    "socket.send.buffer.bytes": (BOTH, "send_buffer_bytes", _integer),
    "socket.receive.buffer.bytes": (BOTH, "receive_buffer_bytes", _integer),
    "security.protocol": (BOTH, "security_protocol",
                          _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")),
    "ssl.ca.location": (BOTH, "ssl_cafile", str),
    "ssl.certificate.location": (BOTH, "ssl_certfile", str),
    "ssl.key.location": (BOTH, "ssl_keyfile", str),
    "ssl.key.password": (BOTH, "ssl_password", str),
    "ssl.endpoint.identification.algorithm": (BOTH, "ssl_check_hostname",
                                              lambda text: _choice("https", "none")(text) == "https"),
    "sasl.mechanism": (BOTH, "sasl_mechanism", _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")),
    "sasl.mechanisms": (BOTH, "sasl_mechanism", _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")),
    "sasl.username": (BOTH, "sasl_plain_username", str),
    "sasl.password": (BOTH, "sasl_plain_password", str),
    "session.timeout.ms": (CONSUMER, "session_timeout_ms", _integer),
    "heartbeat.interval.ms": (CONSUMER, "heartbeat_interval_ms", _integer),
    "max.poll.interval.ms": (CONSUMER, "max_poll_interval_ms", _integer),
    "fetch.wait.max.ms": (CONSUMER, "fetch_max_wait_ms", _integer),
    "fetch.max.wait.ms": (CONSUMER, "fetch_max_wait_ms", _integer),
    "fetch.min.bytes": (CONSUMER, "fetch_min_bytes", _integer),
    "fetch.max.bytes": (CONSUMER, "fetch_max_bytes", _integer),
    "max.partition.fetch.bytes": (CONSUMER, "max_partition_fetch_bytes", _integer),
    "max.poll.records": (CONSUMER, "max_poll_records", _integer),
    "auto.offset.reset": (CONSUMER, "auto_offset_reset", _offset_reset),
    "isolation.level": (CONSUMER, "isolation_level", _choice("read_uncommitted", "read_committed")),
    "check.crcs": (CONSUMER, "check_crcs", _boolean),
    "linger.ms": (PRODUCER, "linger_ms", _integer),
    "queue.buffering.max.ms": (PRODUCER, "linger_ms", _integer),
    "batch.size": (PRODUCER, "batch_size", _integer),
    "acks": (PRODUCER, "acks", _acks),
    "request.required.acks": (PRODUCER, "acks", _acks),
    "message.max.bytes": (PRODUCER, "max_request_size", _integer),
    "max.request.size": (PRODUCER, "max_request_size", _integer),
    "compression.type": (PRODUCER, "compression_type", _compression),
    "compression.codec": (PRODUCER, "compression_type", _compression),
    "retries": (PRODUCER, "retries", _integer),
    "message.send.max.retries": (PRODUCER, "retries", _integer),
    "max.in.flight.requests.per.connection": (PRODUCER, "max_in_flight_requests_per_connection",
                                              _integer),
    "delivery.timeout.ms": (PRODUCER, "delivery_timeout_ms", _integer),
    "message.timeout.ms": (PRODUCER, "delivery_timeout_ms", _integer),
}

# Properties the server owns: accepting them would silently break its guarantees.
RESERVED = {
    "bootstrap.servers": "use --kafka-bootstrap-servers",
    "group.id": "use --kafka-group-id",
    "enable.auto.commit": "the server commits offsets itself",
    "enable.auto.offset.store": "the server commits offsets itself",
}

SECRET_PROPERTIES = frozenset({"ssl.key.password", "sasl.password"})


def client_config(properties: Mapping[str, str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Map ``{property: text}`` onto (consumer kwargs, producer kwargs).

    Raises ValueError naming every unknown key or bad value, never a secret value.
    """
    consumer: Dict[str, Any] = {}
    producer: Dict[str, Any] = {}
    problems = []
    for key, text in properties.items():
        if key in RESERVED:
            problems.append(f"{key}: not settable here ({RESERVED[key]})")
            continue
        if key not in PROPERTIES:
            problems.append(f"{key}: unknown property")
            continue
        scope, argument, parse = PROPERTIES[key]
        try:
            value = parse(text)
        except ValueError as exc:
            shown = "***" if key in SECRET_PROPERTIES else repr(text)
            problems.append(f"{key}={shown}: {exc}")
            continue
        if scope in (CONSUMER, BOTH):
            consumer[argument] = value
        if scope in (PRODUCER, BOTH):
            producer[argument] = value
    if problems:
        raise ValueError("; ".join(problems))
    return consumer, producer


# --- the transport --------------------------------------------------------

Submit = Callable[["KafkaTransport", Message], None]


class KafkaTransport:
    """One Kafka connection: input topic -> ``submit``; ``send`` -> output topic.

    ``serve_forever`` runs the consumer loop in the calling thread (the only
    thread that touches the consumer, which is not thread-safe); ``send`` may be
    called from any thread.  ``shutdown`` stops intake; ``close`` flushes the
    producer, commits and closes the consumer.
    """

    name = "kafka"

    def __init__(self, bootstrap_servers: str, input_topic: str, output_topic: str,
                 group_id: str, submit: Submit, client_id: str = "codex-app-server",
                 offset_reset: str = "latest",
                 properties: Optional[Mapping[str, str]] = None,
                 poll_interval: float = 0.1):
        self.input_topic = input_topic
        self.output_topic = output_topic
        self._submit = submit
        self._poll_ms = int(poll_interval * 1000)
        consumer_extra, producer_extra = client_config(properties or {})
        common = {"bootstrap_servers": bootstrap_servers.split(","), "client_id": client_id}
        self._consumer_config = dict(common, group_id=group_id, enable_auto_commit=False,
                                     auto_offset_reset=offset_reset, **consumer_extra)
        self._producer_config = dict(common, **producer_extra)
        self._consumer: Any = None
        self._producer: Any = None
        self._shutdown = threading.Event()
        self._close_requested = threading.Event()
        self._closed = threading.Event()
        self._ready = False
        self._pending_commit: Dict[Any, int] = {}  # partition -> next offset to commit
        self.ready = threading.Event()

    # Public API --------------------------------------------------------

    def serve_forever(self) -> None:
        """Connect, then consume until ``shutdown``; finally commit and close on ``close``."""
        try:
            if not self._connect():
                return
            self._consume()
            # The consumer may only be closed from this thread: wait for close().
            self._close_requested.wait()
            self._close_consumer()
        finally:
            self._closed.set()

    def send(self, message: Message) -> None:
        """Produce one message to the output topic, keyed by its id (unkeyed without one)."""
        producer = self._producer
        key = reply_key(message)
        if producer is None:
            log.warning("failed to send kafka message (key %s): producer not connected", _shown(key))
            return
        try:
            future = producer.send(self.output_topic, value=encode(message), key=key)
        except Exception as exc:
            log.warning("failed to send kafka message (key %s): %s", _shown(key), exc)
            return
        future.add_errback(lambda exc: log.warning("failed to send kafka message (key %s): %s",
                                                   _shown(key), exc))

    def shutdown(self) -> None:
        """Stop taking new records; the loop returns within one poll interval."""
        self._shutdown.set()

    def close(self, timeout: float = 10.0) -> None:
        """Flush the producer, then commit what was taken and close the consumer."""
        self._shutdown.set()
        deadline = time.monotonic() + timeout
        if self._producer is not None:
            log.info("flushing kafka producer")
            try:
                self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:
                log.warning("failed to send kafka message: flush did not complete: %s", exc)
            self._producer.close(timeout=max(0.1, deadline - time.monotonic()))
        self._close_requested.set()
        self._closed.wait(max(0.1, deadline - time.monotonic()))

    # The consumer thread -----------------------------------------------

    def _connect(self) -> bool:
        kafka = _import_kafka()
        delay = 0.5
        while not self._shutdown.is_set():
            try:
                self._producer = kafka.KafkaProducer(**self._producer_config)
                self._consumer = kafka.KafkaConsumer(**self._consumer_config)
            except kafka.errors.KafkaError as exc:
                if self._producer is not None:
                    self._producer.close(timeout=0)
                    self._producer = None
                log.warning("cannot connect to kafka at %s (%s); retrying in %.1f s",
                            ",".join(self._consumer_config["bootstrap_servers"]), exc, delay)
                if self._shutdown.wait(delay):
                    break
                delay = min(delay * 2, 30.0)
                continue
            self._consumer.subscribe([self.input_topic], listener=_rebalance_listener(kafka, self))
            log.info("kafka consumer subscribed to %s as group %s", self.input_topic,
                     self._consumer_config["group_id"])
            return True
        return False

    def _consume(self) -> None:
        consumer = self._consumer
        while not self._shutdown.is_set():
            # Never sleep between polls: kafka-python completes group joins inside poll().
            batches = consumer.poll(timeout_ms=self._poll_ms)
            if not self._ready and consumer.assignment():
                self._announce_ready()
            for partition, records in batches.items():
                for record in records:
                    if self._shutdown.is_set():
                        break
                    self._take(record)
                    self._pending_commit[partition] = record.offset + 1
            if self._pending_commit:
                self._commit_async()

    def _take(self, record: Any) -> None:
        try:
            message = decode(record.value or b"")
        except InvalidMessage as exc:
            log.warning("invalid payload from kafka: topic %s partition %d offset %d: %s",
                        record.topic, record.partition, record.offset, exc.reason)
            if exc.id is not None:
                self.send(error_response(exc.id, exc.code, exc.reason))
            return
        self._submit(self, message)

    def _announce_ready(self) -> None:
        consumer = self._consumer
        # position() resolves the committed or reset offset now, so under "latest" a
        # record produced after the ready line is never skipped.
        positions = {tp: consumer.position(tp) for tp in consumer.assignment()}
        self._ready = True
        log.info("kafka transport ready: topic %s partitions %s", self.input_topic,
                 ", ".join(f"{tp.partition}@{offset}" for tp, offset in sorted(positions.items())))
        self.ready.set()

    def _commit_async(self) -> None:
        offsets = self._offsets(self._pending_commit)
        self._pending_commit = {}
        try:
            self._consumer.commit_async(offsets=offsets, callback=_on_commit)
        except Exception as exc:
            log.warning("kafka offset commit failed: %s", exc)

    def _commit_sync(self, offsets: Mapping[Any, int]) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=self._offsets(offsets))
        except Exception as exc:
            log.warning("kafka offset commit failed: %s", exc)

    def _close_consumer(self) -> None:
        log.info("committing kafka offsets")
        self._commit_sync(self._pending_commit)
        self._pending_commit = {}
        log.info("closing kafka consumer")
        self._consumer.close(autocommit=False)

    @staticmethod
    def _offsets(next_offsets: Mapping[Any, int]) -> Dict[Any, Any]:
        return {tp: _offset_and_metadata(offset) for tp, offset in next_offsets.items()}

    def _partitions_revoked(self, revoked: Any) -> None:
        # Commit what was taken from partitions that are about to move elsewhere.
        mine = {tp: off for tp, off in self._pending_commit.items() if tp in set(revoked)}
        self._commit_sync(mine)
        for tp in mine:
            self._pending_commit.pop(tp, None)
        self._ready = False
        self.ready.clear()


def _on_commit(offsets: Any, response: Any) -> None:
    if isinstance(response, Exception):
        log.warning("kafka offset commit failed: %s", response)


def _shown(key: Optional[bytes]) -> str:
    return "none" if key is None else key.decode("utf-8", "replace")


def _import_kafka() -> Any:
    try:
        import kafka
        import kafka.errors
    except ImportError:
        raise SystemExit("kafka-python is required for the Kafka transport: "
                         "pip install 'kafka-python>=3.0'") from None
    return kafka


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

    return RebalanceListener()
