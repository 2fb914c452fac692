"""Integration tests of the Codex backend: the real ``codex app-server`` child,
driven over a real Kafka broker (Tansu) and over stdio.

The one mock is the model: ``mock_responses.MockResponsesServer``, a loopback
OpenAI Responses API that Codex reaches through its ``mock`` model provider.
A missing Codex binary fails the tests (nothing skips).
"""

import os
import signal
import subprocess
import time
from typing import Any, Dict, List

import pytest

from harness import (
    CLIENT_INFO, CODEX_VERSION, WAIT, KafkaClient, StdioClient, alive, children, cmdline,
    descendants, initialize, kill_if, logged_codex_pids, notification, reapable, request,
    text_input, wait_until)

MOCK_TEXT = "Hello! How can I help you today?"


# --- helpers ---------------------------------------------------------------------

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
