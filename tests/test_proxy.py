"""Issue 12: ``codex-app-server proxy`` lets any app-server client drive a remote Codex
through Kafka: here the official Python SDK (``openai-codex``), launched on the proxy
instead of a local ``codex app-server``.  Real broker, real server and Codex (mock
model), real SDK; and ``scripts/kafka-rpc`` as a session console."""

import json
import os
import pty
import queue
import select
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import pytest

from harness import ROOT, SERVER, WAIT, Topics, read_topic, text_input

KAFKA_RPC = ROOT / "scripts" / "kafka-rpc"


def proxy_argv(topics: Topics, *extra: str) -> List[str]:
    return [sys.executable, str(SERVER), "proxy", "--kafka-bootstrap-servers", topics.bootstrap,
            "--kafka-input-topic", topics.input, "--kafka-output-topic", topics.output,
            "-X", "fetch.wait.max.ms=10", *extra]


class ProxyProcess:
    """The proxy as a child: JSON lines in on stdin, out on stdout; stderr kept."""

    def __init__(self, argv: List[str]):
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        self.lines: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self.stderr = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, message: Any) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.process.stdin.write(data + b"\n")
        self.process.stdin.flush()

    def read(self, timeout: float = WAIT) -> Dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"stdout ended; stderr: {self.finish(1)[1]}"
        return json.loads(line)

    def rest(self) -> List[Dict[str, Any]]:
        """The lines not read yet, once stdout has ended."""
        lines = []
        while True:
            line = self.lines.get(timeout=5)
            if line is None:
                return lines
            lines.append(json.loads(line))

    def finish(self, timeout: float = 30.0) -> "tuple[int, str]":
        """Close stdin; (exit status, stderr)."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self.stderr += self.process.stderr.read()
        return self.process.returncode, self.stderr.decode("utf-8", "replace")


@pytest.fixture
def proxies():
    started: List[ProxyProcess] = []

    def start(argv: List[str]) -> ProxyProcess:
        started.append(ProxyProcess(argv))
        return started[-1]
    yield start
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.kill()
            proxy.process.wait()


@pytest.fixture
def sdk():
    try:
        import openai_codex
        from openai_codex.client import CodexClient
    except ImportError as exc:
        pytest.fail(f"the official SDK is missing ({exc}): scripts/test installs openai-codex",
                    pytrace=False)
    return openai_codex, CodexClient


def sdk_config(sdk, topics: Topics, workdir) -> Any:
    openai_codex, _ = sdk
    for name in ("OPENAI_API_KEY", "CODEX_API_KEY"):  # the SDK adds to os.environ only
        os.environ.pop(name, None)
    return openai_codex.CodexConfig(launch_args_override=tuple(proxy_argv(topics)),
                                    cwd=str(workdir), client_name="pytest")


def watchdog(client: Any, seconds: float) -> threading.Timer:
    """The SDK waits for ever: close it (failing its wait) if a step overruns."""
    timer = threading.Timer(seconds, client.close)
    timer.daemon = True
    timer.start()
    return timer


def test_official_sdk_runs_a_turn_through_the_proxy(codex_server, topics, mock_model, sdk,
                                                    tmp_path):
    codex_server(topics)
    mock_model.add_text("Hello through Kafka!", n_deltas=3)
    codex = sdk[0].Codex(sdk_config(sdk, topics, tmp_path))
    timer = watchdog(codex._client, 90)
    try:
        thread = codex.thread_start()
        result = thread.run("say hello")
    finally:
        timer.cancel()
        codex.close()
    assert result.status.value == "completed", result
    assert result.final_response == "Hello through Kafka!"


def test_official_sdk_comes_back_to_its_thread_with_the_same_session_only(
        codex_server, topics, mock_model, sdk, tmp_path):
    """The proxy's session is random per run: a client that comes back to its threads
    passes the same --kafka-session, and another session cannot resume them."""
    codex_server(topics)
    mock_model.add_text("First.", n_deltas=1)
    mock_model.add_text("Second.", n_deltas=1)

    def run(session: str, step: Any) -> Any:
        config = sdk_config(sdk, topics, tmp_path)
        config.launch_args_override = config.launch_args_override + (
            "--kafka-session", session)
        codex = sdk[0].Codex(config)
        timer = watchdog(codex._client, 90)
        try:
            return step(codex)
        finally:
            timer.cancel()
            codex.close()
    def start(codex: Any) -> str:
        thread = codex.thread_start()
        assert thread.run("hello").final_response == "First."  # (on disk from its first turn)
        return thread.id
    thread_id = run("alice", start)
    with pytest.raises(Exception) as refused:
        run("mallory", lambda codex: codex.thread_resume(thread_id))
    assert "no rollout found for thread id " + thread_id in str(refused.value), refused.value
    again = run("alice", lambda codex: codex.thread_resume(thread_id).run("once more"))
    assert again.final_response == "Second.", again


@pytest.mark.parametrize("decision, status", [("accept", "completed"), ("decline", "declined")])
def test_official_sdk_approval_handler_through_the_proxy(codex_server, topics, mock_model, sdk,
                                                         tmp_path, decision, status):
    codex_server(topics)
    mock_model.add_exec_command("echo 42")
    mock_model.add_text(f"You chose {decision}.", n_deltas=2)
    asked: List[str] = []

    def approval_handler(method: str, params: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        asked.append(method)
        return {"decision": decision} if method.endswith("requestApproval") else {}
    client = sdk[1](sdk_config(sdk, topics, tmp_path), approval_handler=approval_handler)
    client.start()
    timer = watchdog(client, 90)
    try:
        client.initialize()
        started = client.thread_start({"approvalPolicy": "untrusted", "cwd": str(tmp_path)})
        result = sdk[0].Thread(client, started.thread.id).run("run echo 42")
    finally:
        timer.cancel()
        client.close()
    assert asked == ["item/commandExecution/requestApproval"], asked
    assert result.final_response == f"You chose {decision}."
    commands = [item.root for item in result.items
                if type(item.root).__name__ == "CommandExecutionThreadItem"]
    assert [command.status.value for command in commands] == [status], commands


def test_two_proxies_same_ids_each_sees_only_its_own(broker, start_server, proxies):
    topics = Topics(broker.bootstrap, partitions=3)
    start_server(["--backend", "builtin"] + topics.server_args()).wait_ready()
    first, second = (proxies(proxy_argv(topics, "--kafka-session", name))
                     for name in ("first", "second"))
    for proxy, method in ((first, "noop"), (second, "no/such/method")):
        proxy.send({"jsonrpc": "2.0", "id": 1, "method": method, "params": {}})
    assert first.read() == {"jsonrpc": "2.0", "id": 1, "result": {}}
    assert second.read()["error"]["code"] == -32601
    for proxy in (first, second):
        proxy.send({"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {}})
        assert proxy.read()["id"] == 2
        status, stderr = proxy.finish()
        assert status == 0, stderr
        assert proxy.lines.get(timeout=1) is None  # nothing else, nobody else's


def test_a_restarted_proxy_is_not_handed_the_previous_runs_late_reply(broker, start_server,
                                                                       proxies):
    """Ids on the topic never repeat across runs: the first run's late reply (to its first
    request) is dropped by the second run, which gets its own reply to its own first one."""
    topics = Topics(broker.bootstrap)
    start_server(["--backend", "builtin", "--builtin-delay", "5"] + topics.server_args()
                 ).wait_ready()
    first = proxies(proxy_argv(topics, "--kafka-session", "same"))
    first.send({"jsonrpc": "2.0", "id": 1, "method": "noop", "params": {}})
    # On the topic, not answered yet (the proxy reads stdin once it reads Kafka: on a busy
    # machine that takes longer than any fixed wait).
    assert read_topic(topics.bootstrap, topics.input, 1, timeout=WAIT)
    first.process.terminate()
    assert first.read()["error"]["message"] == "codex-app-server proxy is shutting down"
    assert first.finish()[0] == 0
    second = proxies(proxy_argv(topics, "--kafka-session", "same"))
    second.send({"jsonrpc": "2.0", "id": 1, "method": "no/such/method", "params": {}})
    reply = second.read(timeout=30)
    assert reply["id"] == 1 and reply["error"]["code"] == -32601, reply
    status, stderr = second.finish()
    assert status == 0, stderr
    assert "dropping a reply to id" in stderr, stderr


def test_stdin_ending_right_after_requests_still_gets_their_replies(topics, start_server,
                                                                   proxies):
    start_server(["--backend", "builtin"] + topics.server_args()).wait_ready()
    proxy = proxies(proxy_argv(topics))
    for msg_id in (5, 5, "x"):  # a client may reuse an id: each request gets its reply
        proxy.send({"jsonrpc": "2.0", "id": msg_id, "method": "noop", "params": {}})
    status, stderr = proxy.finish()
    assert status == 0, stderr
    replies = proxy.rest()
    assert replies == [{"jsonrpc": "2.0", "id": msg_id, "result": {}} for msg_id in (5, 5, "x")]


def test_without_a_server_a_request_times_out_on_stdout_and_eof_exits_0(topics, proxies):
    proxy = proxies(proxy_argv(topics, "--timeout", "2"))
    started = time.monotonic()
    proxy.send({"jsonrpc": "2.0", "id": "a", "method": "initialize", "params": {}})
    reply = proxy.read(timeout=20)
    assert reply["id"] == "a" and reply["error"]["code"] == -32603, reply
    assert topics.output in reply["error"]["message"], reply
    assert "no reply within 2 s" in reply["error"]["message"], reply
    assert time.monotonic() - started >= 2
    proxy.send({"jsonrpc": "2.0", "id": "b", "method": "noop", "params": {}})
    status, stderr = proxy.finish()  # EOF with "b" in flight: its timeout, then exit 0
    assert status == 0, stderr
    lines = proxy.rest()
    assert [line["id"] for line in lines] == ["b"], lines


def test_garbage_on_stdin_gets_a_parse_error_and_the_next_line_is_served(
        topics, start_server, proxies):
    start_server(["--backend", "builtin"] + topics.server_args()).wait_ready()
    proxy = proxies(proxy_argv(topics))
    proxy.send(b"this is not json")
    error = proxy.read()
    assert error["id"] is None and error["error"]["code"] == -32700, error
    proxy.send({"jsonrpc": "2.0", "id": 7, "method": "noop", "params": {}})
    assert proxy.read() == {"jsonrpc": "2.0", "id": 7, "result": {}}
    assert proxy.finish()[0] == 0


def test_unreachable_broker_is_an_error_exit(proxies, tmp_path):
    topics = Topics("127.0.0.1:9", create=False)  # nothing listens on the discard port
    proxy = proxies(proxy_argv(topics, "--kafka-connect-timeout", "2"))
    status, stderr = proxy.finish(timeout=60)
    assert status == 3, stderr
    assert "ERROR" in stderr and "127.0.0.1:9" in stderr, stderr


def test_reply_topic_of_its_own(broker, start_server, proxies):
    topics = Topics(broker.bootstrap)
    mine = topics.output + ".mine"
    from harness import local_broker
    local_broker.create_topics(broker.bootstrap, [mine], partitions=2)
    start_server(["--backend", "builtin"] + topics.server_args()).wait_ready()
    proxy = proxies(proxy_argv(topics, "--kafka-reply-topic", mine))
    proxy.send({"jsonrpc": "2.0", "id": 1, "method": "noop", "params": {}})
    assert proxy.read() == {"jsonrpc": "2.0", "id": 1, "result": {}}
    assert proxy.finish()[0] == 0


# --- kafka-rpc, the session console --------------------------------------------------

def kafka_rpc(topics: Topics, *args: str) -> List[str]:
    return [sys.executable, str(KAFKA_RPC), "--bootstrap-server", topics.bootstrap,
            "--input-topic", topics.input, "--output-topic", topics.output, *args]


def start_thread(topics: Topics, session: str, policy: str = "never") -> str:
    out = subprocess.run(kafka_rpc(topics, "--session", session, json.dumps(
        {"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "t", "version": "1"}}}),
        json.dumps({"id": 2, "method": "thread/start", "params": {"approvalPolicy": policy}})),
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])["result"]["thread"]["id"]


def turn(thread_id: str, text: str) -> str:
    return json.dumps({"id": 3, "method": "turn/start", "params": {
        "threadId": thread_id, "input": text_input(text)}})


def test_kafka_rpc_follow_prints_the_deltas_in_order(codex_server, topics, mock_model):
    codex_server(topics)
    words = [f"w{n} " for n in range(12)]
    mock_model.add_text("".join(words), n_deltas=len(words))
    thread_id = start_thread(topics, "console")
    out = subprocess.run(kafka_rpc(topics, "--session", "console", "--follow", "--timeout", "60",
                                   turn(thread_id, "stream")),
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "".join(words).strip() in out.stdout, out.stdout
    assert out.stdout.rstrip().endswith("[turn/completed] status=completed"), out.stdout


def test_kafka_rpc_approve_decline(codex_server, topics, mock_model):
    codex_server(topics)
    mock_model.add_exec_command("echo 42")
    mock_model.add_text("You chose decline.", n_deltas=1)
    thread_id = start_thread(topics, "decider", policy="untrusted")
    out = subprocess.run(kafka_rpc(topics, "--session", "decider", "--follow", "--all",
                                   "--approve", "decline", "--timeout", "60",
                                   turn(thread_id, "run echo 42")),
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    completed = [json.loads(line) for line in out.stdout.splitlines()
                 if line.startswith("{") and '"item/completed"' in line]
    commands = [m["params"]["item"] for m in completed
                if m["params"]["item"]["type"] == "commandExecution"]
    assert [c["status"] for c in commands] == ["declined"], commands


def test_kafka_rpc_asks_on_a_terminal(codex_server, topics, mock_model):
    codex_server(topics)
    mock_model.add_exec_command("echo 42")
    mock_model.add_text("You chose accept.", n_deltas=1)
    thread_id = start_thread(topics, "human", policy="untrusted")
    main, child = pty.openpty()
    process = subprocess.Popen(kafka_rpc(topics, "--session", "human", "--follow", "--all",
                                         "--timeout", "60", turn(thread_id, "run echo 42")),
                               stdin=child, stdout=subprocess.PIPE, stderr=child)
    os.close(child)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"[a]ccept" not in seen and time.monotonic() < deadline:
            if select.select([main], [], [], 1.0)[0]:
                seen += os.read(main, 4096)
        assert b"echo 42" in seen, seen
        os.write(main, b"a\n")
        stdout, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main)
    assert process.returncode == 0
    completed = [json.loads(line) for line in stdout.decode().splitlines()
                 if line.startswith("{") and '"item/completed"' in line]
    commands = [m["params"]["item"] for m in completed
                if m["params"]["item"]["type"] == "commandExecution"]
    assert [c["status"] for c in commands] == ["completed"], commands
