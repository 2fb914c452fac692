"""Integration tests of the Codex backend: the real ``codex app-server`` child,
driven over a real Kafka broker (Tansu) and over stdio.

The one mock is the model: ``mock_responses.MockResponsesServer``, a loopback
OpenAI Responses API that Codex reaches through its ``mock`` model provider.
A missing Codex binary fails the tests (nothing skips).
"""

import fcntl
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import termios
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from conftest import ROOT, KafkaClient, ServerProcess, Topics
from mock_responses import MockResponsesServer

PINNED_CODEX = "0.169.0"  # what the whole suite runs against (scripts/test installs it)
NEWEST_CODEX = "0.171.0"  # scripts/test runs this file and test_protocol.py against it too
CODEX_VERSION = os.environ.get("TEST_CODEX_VERSION", PINNED_CODEX)


def codex_binary(version: str) -> Path:
    """Where scripts/test installs Codex ``version`` (npm; node_modules is git-ignored)."""
    prefix = ROOT if version == PINNED_CODEX else ROOT / ".codex-versions" / version
    return prefix / "node_modules" / "@openai" / "codex-linux-x64" / "vendor" / \
        "x86_64-unknown-linux-musl" / "bin" / "codex"


CODEX_BIN = codex_binary(CODEX_VERSION)
HOMES = ROOT / ".test-homes"  # CODEX_HOME dirs; outside /tmp on purpose, git-ignored
CLIENT_INFO = {"name": "pytest", "version": "0.0.1"}
MOCK_TEXT = "Hello! How can I help you today?"
WAIT = 30.0  # seconds any single expected message may take

CONFIG_TOML = """\
model = "mock-model"
model_provider = "mock"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false
web_search = "disabled"
chatgpt_base_url = "http://127.0.0.1:9/backend-api/"
[features]
plugins = false
apps = false
remote_plugin = false
shell_snapshot = false
image_generation = false
goals = false
[agents]
enabled = false
[analytics]
enabled = false
[model_providers.mock]
name = "mock"
base_url = "{base_url}"
wire_api = "responses"
requires_openai_auth = false
supports_websockets = false
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 20000
"""


# --- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="session")
def codex_bin() -> str:
    install = f"run `npm install @openai/codex@{CODEX_VERSION}` in " \
              f"{CODEX_BIN.parents[6]} (scripts/test does)"
    if not CODEX_BIN.is_file() or not os.access(str(CODEX_BIN), os.X_OK):
        pytest.fail(f"Codex binary not found at {CODEX_BIN}: {install}", pytrace=False)
    try:
        version = subprocess.run([str(CODEX_BIN), "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot run {CODEX_BIN} --version ({exc}): {install}", pytrace=False)
    if version.returncode != 0:
        pytest.fail(f"{CODEX_BIN} --version failed: {version.stderr!r}: {install}", pytrace=False)
    if CODEX_VERSION not in version.stdout.decode(errors="replace"):
        pytest.fail(f"{CODEX_BIN} is {version.stdout!r}, not {CODEX_VERSION}: {install}",
                    pytrace=False)
    return str(CODEX_BIN)


@pytest.fixture
def mock_model() -> Iterator[MockResponsesServer]:
    with MockResponsesServer() as mock:
        yield mock


@pytest.fixture
def codex_home(mock_model: MockResponsesServer) -> Iterator[Path]:
    home = HOMES / uuid.uuid4().hex
    home.mkdir(parents=True)
    (home / "config.toml").write_text(CONFIG_TOML.format(base_url=mock_model.base_url))
    yield home
    for _ in range(5):  # a Codex that just exited may still be removing its sqlite files
        shutil.rmtree(home, ignore_errors=True)
        if not home.exists():
            break
        time.sleep(0.1)
    try:
        HOMES.rmdir()  # only when no other test's home is left
    except OSError:
        pass


@pytest.fixture
def codex_env(codex_home: Path) -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("OPENAI_API_KEY", "CODEX_API_KEY", "CODEX_APP_SERVER_COMMAND"):
        env.pop(name, None)
    env["CODEX_HOME"] = str(codex_home)
    env["NO_COLOR"] = "1"
    return env


def codex_args(codex_bin: str) -> List[str]:
    return ["--backend", "codex", "--codex-command", f"{codex_bin} app-server --strict-config"]


@pytest.fixture
def codex_server(start_server, codex_bin, codex_env) -> Iterator[Callable[..., ServerProcess]]:
    """Start the server with the Codex backend (over Kafka when given ``topics``).

    Afterwards: SIGTERM (a graceful stop closes Codex's stdin), then SIGKILL by
    PID any Codex child the server logged that is still alive.
    """
    started: List[ServerProcess] = []

    def start(topics: Optional[Topics] = None, *extra: str, **kwargs: Any) -> ServerProcess:
        args = codex_args(codex_bin) + (topics.server_args(*extra) if topics else list(extra))
        server = start_server(args, env=codex_env, **kwargs)
        started.append(server)
        return server.wait_ready() if topics else server

    yield start
    for server in started:
        try:
            server.stop()
        except AssertionError:
            pass  # start_server's teardown kills it
        for pid in logged_codex_pids(server):
            kill_if(pid, codex_bin)


# --- helpers ---------------------------------------------------------------------

def logged_codex_pids(server: ServerProcess) -> List[int]:
    pids = []
    for line in server.log.splitlines():
        if "started codex app-server (pid " in line:
            pids.append(int(line.split("(pid ", 1)[1].split(")")[0]))
    return pids


def cmdline(pid: int) -> List[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def children(pid: int) -> List[int]:
    found: List[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def descendants(pid: int) -> List[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def state(pid: int) -> Optional[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    return state(pid) not in (None, "Z")


def reapable(pid: int) -> bool:
    """Dead for good: a zombie (or gone) whose every thread has exited, its pipes closed."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    return state(pid) in (None, "Z") and threads in ([], [str(pid)])


def kill_if(pid: int, marker: str) -> None:
    """SIGKILL ``pid`` if it is alive and still runs something containing ``marker``."""
    if alive(pid) and any(marker in part for part in cmdline(pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def text_input(text: str) -> List[Dict[str, Any]]:
    return [{"type": "text", "text": text}]


def request(client: KafkaClient, msg_id: Any, method: str, params: Any,
            timeout: float = WAIT) -> Any:
    """Send a request; return the result of its reply, which must be keyed by its id."""
    client.send({"id": msg_id, "method": method, "params": params})
    key, reply = client.reply(msg_id, timeout)
    assert key == str(msg_id), (key, reply)
    assert "error" not in reply, reply
    return reply["result"]


def initialize(client: KafkaClient, msg_id: Any = 0) -> Dict[str, Any]:
    result = request(client, msg_id, "initialize", {"clientInfo": CLIENT_INFO})
    assert result["userAgent"].startswith(f"pytest/{CODEX_VERSION}"), result
    return result


def notification(client: KafkaClient, method: str, timeout: float = WAIT,
                 **params: Any) -> Dict[str, Any]:
    """The first notification ``method`` whose params contain ``params``; it must be unkeyed."""
    key, value = client.wait_for(
        lambda k, v: isinstance(v, dict) and v.get("method") == method and "id" not in v
        and all(v.get("params", {}).get(name) == want for name, want in params.items()),
        timeout)
    assert key is None, (key, value)
    return value["params"]


def completed_items(messages: List[Dict[str, Any]], turn_id: str,
                    item_type: str) -> List[Dict[str, Any]]:
    return [m["params"]["item"] for m in messages if m.get("method") == "item/completed"
            and m["params"].get("turnId") == turn_id and m["params"]["item"]["type"] == item_type]


def assert_keyed_by_id(client: KafkaClient) -> None:
    """The output topic's contract: replies and Codex's requests keyed by id, the rest unkeyed."""
    client.quiet(0.2)
    assert client.seen, "nothing arrived on the output topic"
    for key, value in client.seen:
        want = None if value.get("id") is None else str(value["id"])
        assert key == want, (key, value)


def kafka_messages(client: KafkaClient) -> List[Dict[str, Any]]:
    return [value for _, value in client.seen]


# --- Kafka ---------------------------------------------------------------------

def test_each_session_has_its_own_initialize(codex_server, topics, client, codex_home):
    server = codex_server(topics)
    result = initialize(client, 101)
    assert result["platformOs"] == "linux", result
    assert result["platformFamily"] == "unix", result
    assert result["codexHome"] == str(codex_home), result  # Codex got our environment
    # The same initialize again (a redelivered record, say): the saved result.
    assert initialize(client, 102) == result

    second = KafkaClient(topics, session=b"second")
    try:
        result = request(second, "second-init", "initialize",
                         {"clientInfo": {"name": "other", "version": "9.9"}})
        # Its own clientInfo (Codex takes the prefix from its first client, as upstream does).
        assert result["userAgent"].endswith("(other; 9.9)"), result
        assert_keyed_by_id(second)
    finally:
        second.close()
    everyone = KafkaClient(topics, every_session=True)
    try:
        everyone.wait_for(lambda k, v: v.get("id") == "second-init", WAIT)
        for (_, value), headers in zip(everyone.seen, everyone.headers):
            session = dict(headers).get("codex-session")
            if value.get("id") == "second-init":
                assert session == b"second", headers
            elif value.get("id") in (101, 102):
                assert session is None, headers  # the default session: no header
    finally:
        everyone.close()
    assert server.log.count("started codex app-server") == 1, server.log
    assert_keyed_by_id(client)


def test_command_exec(codex_server, topics, client):
    codex_server(topics)
    initialize(client, 101)
    result = request(client, 102, "command/exec", {"command": ["echo", "hi"]})
    assert result["stdout"] == "hi\n", result
    assert result["exitCode"] == 0, result
    assert_keyed_by_id(client)


def test_thread_start_reply_and_unkeyed_notification(codex_server, topics, client):
    codex_server(topics)
    initialize(client, 101)
    result = request(client, 102, "thread/start", {})
    thread = result["thread"]
    assert thread["id"], result
    assert (thread["model"], thread["modelProvider"]) == ("mock-model", "mock"), thread
    started = notification(client, "thread/started")
    assert started["thread"]["id"] == thread["id"], started
    assert_keyed_by_id(client)


def test_turn_streams_agent_message(codex_server, topics, client, mock_model):
    codex_server(topics)
    mock_model.add_text(MOCK_TEXT, n_deltas=4)
    initialize(client, 101)
    thread_id = request(client, 102, "thread/start", {})["thread"]["id"]
    turn = request(client, 103, "turn/start", {"threadId": thread_id,
                                               "input": text_input("say hello")})["turn"]
    done = notification(client, "turn/completed", threadId=thread_id)
    assert done["turn"]["id"] == turn["id"], done
    assert done["turn"]["status"] == "completed", done

    messages = kafka_messages(client)
    deltas = [m["params"]["delta"] for m in messages if m.get("method") ==
              "item/agentMessage/delta" and m["params"]["turnId"] == turn["id"]]
    assert len(deltas) == 4, deltas
    assert "".join(deltas) == MOCK_TEXT
    methods = [m.get("method") for m in messages]
    last_delta = max(i for i, method in enumerate(methods) if method == "item/agentMessage/delta")
    assert last_delta < methods.index("turn/completed"), methods  # Kafka kept Codex's order
    agent = completed_items(messages, turn["id"], "agentMessage")
    assert [item["text"] for item in agent] == [MOCK_TEXT], agent
    model_request = mock_model.wait_for_requests(1)[0]
    assert model_request.user_texts()[-1] == "say hello"
    assert_keyed_by_id(client)


@pytest.mark.parametrize("decision, status, output, told_model", [
    ("accept", "completed", "42\n", "42"),
    ("decline", "declined", None, "rejected"),
])
def test_command_approval(codex_server, topics, client, mock_model, decision, status, output,
                          told_model):
    codex_server(topics)
    mock_model.add_exec_command("echo 42")
    mock_model.add_text(f"You chose {decision}.", n_deltas=2)
    initialize(client, 101)
    started = request(client, 102, "thread/start", {"approvalPolicy": "untrusted"})
    assert started["approvalPolicy"] == "untrusted", started
    thread_id = started["thread"]["id"]
    turn = request(client, 103, "turn/start", {"threadId": thread_id,
                                               "input": text_input("run echo 42")})["turn"]

    key, ask = client.wait_for(lambda k, v: v.get("method") ==
                               "item/commandExecution/requestApproval" and "id" in v, WAIT)
    assert isinstance(ask["id"], int) and key == str(ask["id"]), (key, ask)
    assert ask["params"]["threadId"] == thread_id, ask
    assert "echo 42" in ask["params"]["command"], ask
    client.send({"id": ask["id"], "result": {"decision": decision}})

    resolved = notification(client, "serverRequest/resolved", threadId=thread_id)
    assert resolved["requestId"] == ask["id"], resolved
    done = notification(client, "turn/completed", threadId=thread_id)
    assert done["turn"]["status"] == "completed", done
    messages = kafka_messages(client)
    command = completed_items(messages, turn["id"], "commandExecution")
    assert len(command) == 1, command
    assert command[0]["status"] == status, command
    # (A login shell on a busy host may add "pyenv: cannot rehash ..." first.)
    shown = "".join(line for line in (command[0]["aggregatedOutput"] or "").splitlines(True)
                    if not line.startswith("pyenv: ")) if output else command[0]["aggregatedOutput"]
    assert shown == output, command
    agent = completed_items(messages, turn["id"], "agentMessage")
    assert [item["text"] for item in agent] == [f"You chose {decision}."], agent
    follow_up = mock_model.wait_for_requests(2)[1]
    assert any(told_model in text for text in follow_up.function_call_outputs()), \
        follow_up.function_call_outputs()
    assert_keyed_by_id(client)


def test_an_approval_answer_does_not_wait_behind_a_full_queue(codex_server, topics, client,
                                                                mock_model):
    """With --queue-size 2 and two slow commands in flight, the processor waits for room;
    the answer to a turn's approval must still reach Codex at once (issue 10)."""
    codex_server(topics, "--queue-size", "2")
    mock_model.add_exec_command("echo 42")
    mock_model.add_text("Done.", n_deltas=1)
    initialize(client, 101)
    thread_id = request(client, 102, "thread/start", {"approvalPolicy": "untrusted"})[
        "thread"]["id"]
    request(client, 103, "turn/start", {"threadId": thread_id, "input": text_input("run it")})
    _, ask = client.wait_for(lambda k, v: v.get("method") ==
                             "item/commandExecution/requestApproval" and "id" in v, WAIT)
    for msg_id in (104, 105, 106, 107):  # two in flight, two more fill the queue
        client.send({"id": msg_id, "method": "command/exec",
                     "params": {"command": ["sleep", "8"], "timeoutMs": 60000}})
    time.sleep(1.0)
    answered_at = time.monotonic()
    client.send({"id": ask["id"], "result": {"decision": "accept"}})
    done = notification(client, "turn/completed", threadId=thread_id)
    took = time.monotonic() - answered_at
    assert done["turn"]["status"] == "completed", done
    assert took < 6, f"the answer waited {took:.1f} s behind the queue"
    for msg_id in (104, 105, 106, 107):
        assert client.reply(msg_id, timeout=40)[1]["result"]["exitCode"] == 0


BROADCAST = ("thread/started", "thread/status/changed")


def test_two_sessions_same_request_ids(codex_server, topics, client, mock_model):
    """Each session gets only its own replies, its own initialize, its own turn and its own
    approval requests, although both use the same request ids."""
    codex_server(topics)
    other = KafkaClient(topics, session=b"other")
    try:
        for session, name in ((client, "pytest"), (other, "other")):
            session.send({"id": 1, "method": "initialize",
                          "params": {"clientInfo": {"name": name, "version": "1"}}})
        for session, name in ((client, "pytest"), (other, "other")):
            reply = session.reply(1, WAIT)[1]
            assert reply["result"]["userAgent"].endswith(f"({name}; 1)"), reply
        client.send({"id": 2, "method": "command/exec", "params": {"command": ["echo", "a"]}})
        other.send({"id": 2, "method": "command/exec", "params": {"command": ["echo", "b"]}})
        assert client.reply(2, WAIT)[1]["result"]["stdout"] == "a\n"
        assert other.reply(2, WAIT)[1]["result"]["stdout"] == "b\n"

        # A turn in each session, the first one asking for an approval.
        mock_model.add_exec_command("echo approved")
        mock_model.add_text("Ran it.", n_deltas=2)
        mock_model.add_text("Hello other.", n_deltas=3)
        threads = {}
        for session, policy in ((client, "untrusted"), (other, "never")):
            threads[session] = request(session, 3, "thread/start", {
                "approvalPolicy": policy})["thread"]["id"]
        # One after the other: the mock model answers in order.
        request(client, 4, "turn/start", {"threadId": threads[client],
                                          "input": text_input("run echo approved")})
        _, ask = client.wait_for(lambda k, v: v.get("method") ==
                                 "item/commandExecution/requestApproval", WAIT)
        client.send({"id": ask["id"], "result": {"decision": "accept"}})
        done = notification(client, "turn/completed", threadId=threads[client])
        assert done["turn"]["status"] == "completed", done
        request(other, 4, "turn/start", {"threadId": threads[other],
                                         "input": text_input("say hello")})
        done = notification(other, "turn/completed", threadId=threads[other])
        assert done["turn"]["status"] == "completed", done
        other.quiet(0.5)
        for session, stranger in ((client, other), (other, client)):
            seen = kafka_messages(session)
            assert [m for m in seen if m.get("id") in (1, 2, 3, 4)
                    and "method" not in m and "error" in m] == [], seen
            # Upstream tells every connection of a thread's start and status, nothing more.
            assert not any(isinstance(m.get("params"), dict) and m["params"].get("threadId")
                           == threads[stranger] and m.get("method") not in BROADCAST
                           for m in seen), seen
        assert not any(m.get("method") == "item/commandExecution/requestApproval"
                       for m in kafka_messages(other))
        deltas = "".join(m["params"]["delta"] for m in kafka_messages(other)
                         if m.get("method") == "item/agentMessage/delta")
        assert deltas == "Hello other.", deltas
        assert_keyed_by_id(other)
    finally:
        other.close()
    assert_keyed_by_id(client)


def test_codex_killed_fails_pending_then_restarts(codex_server, topics, client, codex_bin):
    server = codex_server(topics)
    initialize(client, 101)
    codex_pids = [pid for pid in children(server.process.pid) if cmdline(pid)[:1] == [codex_bin]]
    assert len(codex_pids) == 1, (codex_pids, children(server.process.pid))
    codex_pid = codex_pids[0]
    assert logged_codex_pids(server) == [codex_pid], server.log
    leftovers: Dict[int, str] = {}  # Codex's descendants: pid -> program, for cleanup
    try:
        client.send({"id": 102, "method": "command/exec",
                     "params": {"command": ["sleep", "37"], "timeoutMs": 60000}})
        # The request is pending inside Codex once its sleep runs.
        wait_until(lambda: [pid for pid in descendants(codex_pid)
                            if cmdline(pid)[:2] == ["sleep", "37"]],
                   WAIT, "codex did not start `sleep 37`")
        leftovers = {pid: cmdline(pid)[0] for pid in descendants(codex_pid) if cmdline(pid)}
        os.kill(codex_pid, signal.SIGKILL)
        killed_at = time.monotonic()

        key, reply = client.reply(102, WAIT)
        assert key == "102", (key, reply)
        assert reply["error"]["code"] == -32603, reply
        assert "exited" in reply["error"]["message"], reply
        assert "signal 9" in reply["error"]["message"], reply
        assert time.monotonic() - killed_at < 20, "the error waited for the orphaned sleep"

        result = request(client, 103, "command/exec", {"command": ["echo", "after"]})
        assert result == {"exitCode": 0, "stdout": "after\n", "stderr": ""}, result
        pids = logged_codex_pids(server)
        assert len(pids) == 2 and pids[1] != codex_pid, server.log
        # A later initialize is answered from the first result, not "Already initialized".
        again = request(client, 104, "initialize", {"clientInfo": CLIENT_INFO})
        assert again["userAgent"].startswith(f"pytest/{CODEX_VERSION}"), again
        # A late answer to the dead child's request 0 must not reach the new child, whose
        # own ids restart at 0.
        client.send({"id": 0, "result": {"decision": "accept"}})
        server.wait_for_log("dropping a client answer to codex request 0", timeout=WAIT)
        assert request(client, 105, "command/exec", {"command": ["echo", "still"]})["stdout"] \
            == "still\n"
    finally:
        for pid, program in leftovers.items():
            kill_if(pid, program)
    assert_keyed_by_id(client)


def test_child_death_mid_turn_ends_the_turn_and_voids_a_stale_approval(
        codex_server, topics, client, mock_model, codex_bin):
    """Issue 9 items 10 and 11: a turn whose Codex dies is reported failed, its pending
    approval is withdrawn, and a late answer to it cannot approve the next child's request
    (which Codex numbers from 0 again)."""
    server = codex_server(topics)
    mock_model.add_exec_command("echo first")
    initialize(client, 101)
    thread_id = request(client, 102, "thread/start", {"approvalPolicy": "untrusted"})[
        "thread"]["id"]
    turn = request(client, 103, "turn/start", {"threadId": thread_id,
                                               "input": text_input("run echo first")})["turn"]
    _, first_ask = client.wait_for(lambda k, v: v.get("method") ==
                                   "item/commandExecution/requestApproval" and "id" in v, WAIT)
    codex_pid = logged_codex_pids(server)[-1]
    os.kill(codex_pid, signal.SIGKILL)

    withdrawn = notification(client, "serverRequest/resolved", threadId=thread_id)
    assert withdrawn["requestId"] == first_ask["id"], withdrawn
    error = notification(client, "error", threadId=thread_id)
    assert error["turnId"] == turn["id"] and error["willRetry"] is False, error
    assert "signal 9" in error["error"]["message"], error
    failed = notification(client, "turn/completed", threadId=thread_id)
    assert failed["turn"]["id"] == turn["id"] and failed["turn"]["status"] == "failed", failed
    assert "signal 9" in failed["turn"]["error"]["message"], failed

    # The next child asks again, under a new id; the stale "accept" must not reach it.
    mock_model.add_exec_command("echo second")
    mock_model.add_text("Declined, as asked.", n_deltas=1)
    thread_id = request(client, 104, "thread/start", {"approvalPolicy": "untrusted"})[
        "thread"]["id"]
    second_turn = request(client, 105, "turn/start", {
        "threadId": thread_id, "input": text_input("run echo second")})["turn"]
    _, second_ask = client.wait_for(
        lambda k, v: v.get("method") == "item/commandExecution/requestApproval" and "id" in v
        and v["params"]["threadId"] == thread_id, WAIT)
    assert second_ask["id"] != first_ask["id"], (first_ask, second_ask)
    client.send({"id": first_ask["id"], "result": {"decision": "accept"}})
    server.wait_for_log(f"dropping a client answer to codex request {first_ask['id']}",
                        timeout=WAIT)
    client.send({"id": second_ask["id"], "result": {"decision": "decline"}})
    done = notification(client, "turn/completed", threadId=thread_id)
    assert done["turn"]["status"] == "completed", done
    command = completed_items(kafka_messages(client), second_turn["id"], "commandExecution")
    assert [item["status"] for item in command] == ["declined"], command
    assert_keyed_by_id(client)


def test_reply_too_large_for_kafka_becomes_an_error(codex_server, topics, client):
    codex_server(topics)  # default --kafka-max-message-bytes: 1 MiB
    initialize(client, 101)
    big = 1_200_000
    client.send({"id": 102, "method": "command/exec", "params": {
        "command": ["sh", "-c", f"head -c {big} /dev/zero | tr '\\0' a"],
        "disableOutputCap": True}})
    key, reply = client.reply(102, WAIT)  # not silence: the client learns why
    assert key == "102", (key, reply)
    assert reply["error"]["code"] == -32603, reply
    assert "too large" in reply["error"]["message"], reply
    result = request(client, 103, "command/exec", {"command": ["echo", "small"]})
    assert result["stdout"] == "small\n", result
    assert_keyed_by_id(client)


# --- stdio ---------------------------------------------------------------------

class StdioClient:
    """Lines to the server's stdin; its stdout read by a thread into a queue."""

    def __init__(self, server: ServerProcess, read: bool = True):
        self.server = server
        self.lines: "queue.Queue[Any]" = queue.Queue()
        self.seen: List[Dict[str, Any]] = []
        if read:
            self.start_reading()

    def start_reading(self) -> None:
        threading.Thread(target=self._read, daemon=True, name="stdio-reader").start()

    def unread_bytes(self) -> int:
        """What the server wrote to stdout that nobody has read yet."""
        count = fcntl.ioctl(self.server.process.stdout.fileno(), termios.FIONREAD, b"\0" * 4)
        return struct.unpack("i", count)[0]

    def _read(self) -> None:
        for line in iter(self.server.process.stdout.readline, b""):
            self.lines.put(line)
        self.lines.put(None)

    def send(self, message: Dict[str, Any]) -> None:
        self.server.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.server.process.stdin.flush()

    def wait_for(self, predicate: Callable[[Dict[str, Any]], bool],
                 timeout: float = WAIT) -> Dict[str, Any]:
        for message in self.seen:
            if predicate(message):
                return message
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching line within {timeout} s; seen: "
                                     f"{self.seen[-20:]}\n{self.server.log}") from None
            assert line is not None, f"server stdout closed; seen: {self.seen[-20:]}"
            message = json.loads(line)  # every stdout line is one JSON message
            self.seen.append(message)
            if predicate(message):
                return message

    def request(self, msg_id: Any, method: str, params: Any) -> Any:
        self.send({"id": msg_id, "method": method, "params": params})
        reply = self.wait_for(lambda m: "method" not in m and m.get("id") == msg_id)
        assert "error" not in reply, reply
        return reply["result"]


def test_turn_over_stdio(codex_server, mock_model):
    server = codex_server(stdin=subprocess.PIPE)
    stdio = StdioClient(server)
    mock_model.add_text(MOCK_TEXT, n_deltas=3)
    init = stdio.request(11, "initialize", {"clientInfo": CLIENT_INFO})
    assert init["userAgent"].startswith(f"pytest/{CODEX_VERSION}"), init
    thread_id = stdio.request("thread", "thread/start", {})["thread"]["id"]
    turn = stdio.request(13, "turn/start", {"threadId": thread_id,
                                            "input": text_input("say hello")})["turn"]
    done = stdio.wait_for(lambda m: m.get("method") == "turn/completed"
                          and m["params"]["threadId"] == thread_id)
    assert done["params"]["turn"]["id"] == turn["id"], done
    assert done["params"]["turn"]["status"] == "completed", done
    deltas = [m["params"]["delta"] for m in stdio.seen
              if m.get("method") == "item/agentMessage/delta"]
    assert "".join(deltas) == MOCK_TEXT, deltas
    agent = completed_items(stdio.seen, turn["id"], "agentMessage")
    assert [item["text"] for item in agent] == [MOCK_TEXT], agent

    server.process.stdin.close()  # stdio only: EOF shuts the server down
    assert server.process.wait(WAIT) == 0, server.log
    codex_pid = logged_codex_pids(server)[0]
    wait_until(lambda: not alive(codex_pid), 10, "codex child outlived the server")


def test_request_after_crash_is_not_failed_by_the_dead_child(codex_server, codex_bin):
    """Codex dies while the server is still relaying its last output (a slow reader of
    stdout); a request sent after the restart must go to, and be answered by, the
    new child, not failed in the name of the dead one."""
    server = codex_server(stdin=subprocess.PIPE)
    stdio = StdioClient(server, read=False)  # nobody reads stdout for now
    stdio.send({"id": 21, "method": "initialize", "params": {"clientInfo": CLIENT_INFO}})
    big = 300_000  # far more than a pipe holds: relaying this reply blocks
    stdio.send({"id": 22, "method": "command/exec", "params": {
        "command": ["sh", "-c", f"head -c {big} /dev/zero | tr '\\0' a"],
        "disableOutputCap": True}})
    wait_until(lambda: stdio.unread_bytes() >= 60_000, WAIT, "the server did not fill stdout")
    old_pid = logged_codex_pids(server)[0]
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: reapable(old_pid), WAIT, f"codex {old_pid} did not die")
    stdio.send({"id": 23, "method": "command/exec", "params": {"command": ["echo", "after"]}})
    server.wait_for_log("started codex app-server", count=2, timeout=WAIT)

    stdio.start_reading()
    two = stdio.wait_for(lambda m: "method" not in m and m.get("id") == 22)
    assert two.get("result", {}).get("stdout") == "a" * big, str(two)[:300]
    three = stdio.wait_for(lambda m: "method" not in m and m.get("id") == 23)
    assert three == {"id": 23, "result": {"exitCode": 0, "stdout": "after\n", "stderr": ""}}, \
        (three, server.log)
    server.process.stdin.close()
    assert server.process.wait(WAIT) == 0, server.log


def test_server_killed_leaves_no_codex_behind(codex_server, codex_bin):
    """kill -9 of the server: Codex and the commands it runs are gone within 5 s."""
    server = codex_server(stdin=subprocess.PIPE)
    stdio = StdioClient(server)
    stdio.request(31, "initialize", {"clientInfo": CLIENT_INFO})
    stdio.send({"id": 32, "method": "command/exec",
                "params": {"command": ["sleep", "53"], "timeoutMs": 60000}})
    codex_pid = logged_codex_pids(server)[0]
    sleeper = wait_until(lambda: [pid for pid in descendants(codex_pid)
                                  if cmdline(pid)[:2] == ["sleep", "53"]],
                         WAIT, "codex did not start `sleep 53`")[0]
    try:
        server.process.kill()
        server.process.wait()
        wait_until(lambda: not alive(codex_pid) and not alive(sleeper), 5,
                   "codex (or its command) outlived the server")
    finally:
        kill_if(codex_pid, "codex")
        kill_if(sleeper, "sleep")


def test_codex_not_found(start_server, codex_env, topics):
    server = start_server(["--backend", "codex", "--codex-command", "/nonexistent/codex app-server",
                           *topics.server_args()], env=codex_env)
    assert server.process.wait(WAIT) == 2, server.log
    assert "npm install -g @openai/codex" in server.log, server.log
    assert "/nonexistent/codex" in server.log, server.log
    assert server.process.stdout.read() == b""
