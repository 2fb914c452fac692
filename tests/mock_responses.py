"""A loopback mock of the OpenAI Responses API (``POST /v1/responses``, SSE) for Codex.

Standard library only; the one mock in the test suite (Kafka and Codex are real)::

    with MockResponsesServer() as mock:       # 127.0.0.1, ephemeral port
        mock.add_text("Hello there!", n_deltas=3)
        mock.add_exec_command("echo 42")      # the model asks Codex to run a command
        mock.add_error(500)
        # point the provider's base_url at mock.base_url ("http://127.0.0.1:PORT/v1")
        mock.wait_for_requests(2, timeout=10)

Each ``POST .../responses`` takes the next scripted reply from a FIFO queue; an
empty queue answers HTTP 500 (configure ``request_max_retries = 0`` and
``stream_max_retries = 0`` so Codex does not retry).  Every POST is recorded.
"""

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

Event = Dict[str, Any]


class Recorded:
    """One request Codex made: its path, headers and parsed JSON body."""

    def __init__(self, path: str, headers: Dict[str, str], body: Any):
        self.path = path
        self.headers = headers
        self.body = body if isinstance(body, dict) else {}

    def input_items(self) -> List[Dict[str, Any]]:
        return [item for item in self.body.get("input") or [] if isinstance(item, dict)]

    def user_texts(self) -> List[str]:
        """Every ``input_text`` of a user message, in order."""
        return [part.get("text", "") for item in self.input_items()
                if item.get("type") == "message" and item.get("role") == "user"
                for part in item.get("content") or [] if part.get("type") == "input_text"]

    def function_call_outputs(self) -> List[str]:
        """The tool results (``function_call_output.output``) Codex sent back to the model."""
        outputs = [item.get("output") for item in self.input_items()
                   if item.get("type") == "function_call_output"]
        return [out if isinstance(out, str) else json.dumps(out) for out in outputs]


def split_text(text: str, n: int) -> List[str]:
    """``text`` in ``n`` non-empty consecutive pieces (fewer if the text is shorter)."""
    n = max(1, min(n, len(text)))
    bounds = [len(text) * i // n for i in range(n + 1)]
    return [text[bounds[i]:bounds[i + 1]] for i in range(n)]


def _response(resp_id: str, model: str, status: str, output: List[Any]) -> Dict[str, Any]:
    obj = {"id": resp_id, "object": "response", "created_at": int(time.time()),
           "status": status, "model": model, "output": output}
    if status == "completed":
        obj["usage"] = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": 15}
    return obj


def text_events(text: str, n_deltas: int, resp_id: str, msg_id: str, model: str) -> List[Event]:
    """The SSE events of one assistant message streamed as ``n_deltas`` text deltas."""
    part = {"type": "output_text", "text": text, "annotations": []}
    done = {"id": msg_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [part]}
    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    events: List[Event] = [
        {"type": "response.created", "response": _response(resp_id, model, "in_progress", [])},
        {"type": "response.output_item.added", "output_index": 0,
         "item": dict(done, status="in_progress", content=[])},
        dict(where, type="response.content_part.added", part=dict(part, text="")),
    ]
    events += [dict(where, type="response.output_text.delta", delta=piece)
               for piece in split_text(text, n_deltas)]
    events += [
        dict(where, type="response.output_text.done", text=text),
        dict(where, type="response.content_part.done", part=part),
        {"type": "response.output_item.done", "output_index": 0, "item": done},
        {"type": "response.completed",
         "response": _response(resp_id, model, "completed", [done])},
    ]
    return events


def function_call_events(name: str, arguments: Dict[str, Any], call_id: str, resp_id: str,
                         fc_id: str, model: str) -> List[Event]:
    """The SSE events of one ``function_call`` output item."""
    args = json.dumps(arguments)
    done = {"id": fc_id, "type": "function_call", "status": "completed", "name": name,
            "call_id": call_id, "arguments": args}
    return [
        {"type": "response.created", "response": _response(resp_id, model, "in_progress", [])},
        {"type": "response.output_item.added", "output_index": 0,
         "item": dict(done, status="in_progress", arguments="")},
        {"type": "response.function_call_arguments.delta", "item_id": fc_id, "output_index": 0,
         "delta": args},
        {"type": "response.function_call_arguments.done", "item_id": fc_id, "output_index": 0,
         "arguments": args},
        {"type": "response.output_item.done", "output_index": 0, "item": done},
        {"type": "response.completed", "response": _response(resp_id, model, "completed", [done])},
    ]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        pass  # quiet

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        owner: "MockResponsesServer" = self.server.owner  # type: ignore[attr-defined]
        owner._record(Recorded(self.path, dict(self.headers.items()), body))
        if not self.path.split("?")[0].rstrip("/").endswith("/responses"):
            return self._json(404, {"error": {"message": "not found"}})
        step, n = owner._next()
        if step is None:
            return self._json(500, {"error": {"message": "mock: nothing scripted",
                                              "type": "server_error"}})
        if step["kind"] == "error":
            return self._json(step["status"], {"error": {"message": step["message"],
                                                         "type": "server_error"}})
        if step["kind"] == "text":
            events = text_events(step["text"], step["n_deltas"], f"resp_mock_{n}",
                                 f"msg_mock_{n}", owner.model)
        else:
            events = function_call_events(step["name"], step["arguments"],
                                          step["call_id"] or f"call_mock_{n}", f"resp_mock_{n}",
                                          f"fc_mock_{n}", owner.model)
        self._head(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            for event in events:
                if step.get("delay") and event["type"] == "response.output_text.delta":
                    time.sleep(step["delay"])
                self.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self._head(status, {"Content-Type": "application/json", "Content-Length": str(len(data))})
        self.wfile.write(data)

    def _head(self, status: int, headers: Dict[str, str]) -> None:
        self.send_response(status)
        for name, value in dict(headers, Connection="close").items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True


class MockResponsesServer:
    """A threaded mock of ``POST /v1/responses`` on 127.0.0.1 (port 0: a free one)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, model: str = "mock-model"):
        self.host = host
        self.port = port
        self.model = model
        self.requests: List[Recorded] = []
        self._queue: List[Dict[str, Any]] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "MockResponsesServer":
        httpd = ThreadingHTTPServer((self.host, self.port), _Handler)
        httpd.daemon_threads = True
        httpd.owner = self  # type: ignore[attr-defined]
        self._httpd, self.port = httpd, httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="mock-responses", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None and self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> "MockResponsesServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # Scripting: each call queues the reply to one model request.

    def add_text(self, text: str, n_deltas: int = 3, delta_delay_s: float = 0.0) -> None:
        self._add({"kind": "text", "text": text, "n_deltas": n_deltas, "delay": delta_delay_s})

    def add_function_call(self, name: str, arguments: Dict[str, Any],
                          call_id: Optional[str] = None) -> None:
        self._add({"kind": "call", "name": name, "arguments": arguments, "call_id": call_id})

    def add_exec_command(self, cmd: str, call_id: Optional[str] = None,
                         yield_time_ms: int = 5000) -> None:
        """The model calls Codex's ``exec_command`` tool with the shell command ``cmd``."""
        self.add_function_call("exec_command", {"cmd": cmd, "login": False,
                                                "yield_time_ms": yield_time_ms}, call_id)

    def add_error(self, status: int = 500, message: str = "mock error") -> None:
        self._add({"kind": "error", "status": status, "message": message})

    # Inspection.

    def response_requests(self) -> List[Recorded]:
        with self._cond:
            return [r for r in self.requests if r.path.split("?")[0].rstrip("/")
                    .endswith("/responses")]

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> List[Recorded]:
        """At least ``n`` ``POST /responses`` requests, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = self.response_requests()
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {n} model requests, got {len(got)}")
                self._cond.wait(left)

    def _add(self, step: Dict[str, Any]) -> None:
        with self._cond:
            self._queue.append(step)

    def _next(self) -> Tuple[Optional[Dict[str, Any]], int]:
        """The next scripted step (None: nothing left) and a number for its ids."""
        with self._cond:
            return (self._queue.pop(0) if self._queue else None), next(self._ids)

    def _record(self, request: Recorded) -> None:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()
