"""Issue 10, the Codex half: a session per record key, each with its own connection to
the server's one ``codex app-server --listen``; its records in one partition, in order,
following the reply topic it names; limits on open sessions; a restarted Codex or a
closed connection replays the session's state.  Real broker, real Codex, mock model."""

import json
import os
import signal
import subprocess
import time

from harness import (
    CLIENT_INFO, WAIT, KafkaClient, StdioClient, Topics, initialize, local_broker,
    logged_codex_pids, notification, request, text_input)
from kafka_transport import partition_of


def test_a_turn_streams_in_order_into_its_partition_across_a_broker_pause(
        codex_server, mock_model):
    broker = local_broker.start_broker(0)
    try:
        topics = Topics(broker.bootstrap, create=False)
        local_broker.create_topics(broker.bootstrap, [topics.input])
        local_broker.create_topics(broker.bootstrap, [topics.output], partitions=3)
        codex_server(topics)
        words = [f"w{n} " for n in range(40)]
        mock_model.add_text("".join(words), n_deltas=len(words), delta_delay_s=0.1)
        session = b"alice"
        client = KafkaClient(topics, session, partition=partition_of(session, 3))
        try:
            initialize(client, 1)
            thread = request(client, 2, "thread/start", {})["thread"]["id"]
            request(client, 3, "turn/start", {"threadId": thread,
                                              "input": text_input("stream")})
            client.wait_for(lambda k, v: v.get("method") == "item/agentMessage/delta", WAIT)
            os.kill(broker.process.pid, signal.SIGSTOP)  # mid-turn, for 3 s
            try:
                time.sleep(3)
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)
            done = notification(client, "turn/completed", timeout=60, threadId=thread)
            assert done["turn"]["status"] == "completed", done
            deltas = [v["params"]["delta"] for _, v in client.seen
                      if v.get("method") == "item/agentMessage/delta"]
            assert "".join(deltas) == "".join(words) and len(deltas) == len(words), deltas
            # Nothing of the session anywhere else.
            for other in {0, 1, 2} - {partition_of(session, 3)}:
                stray = KafkaClient(topics, session, partition=other)
                assert stray.quiet(1.0) == [], other
                stray.close()
        finally:
            client.close()
    finally:
        local_broker.stop_broker(broker)


def test_notifications_follow_the_reply_topic_the_session_names(codex_server, broker):
    topics = Topics(broker.bootstrap)
    replies = topics.output + ".replies"
    local_broker.create_topics(broker.bootstrap, [replies])
    codex_server(topics)
    session = b"bob"
    client = KafkaClient(topics, session, topic=replies)
    on_output = KafkaClient(topics, session)
    try:
        client.producer.send(topics.input, key=session, headers=[("reply_to", replies.encode())],
                             value=b'{"id":1,"method":"initialize","params":{"clientInfo":'
                                   b'{"name":"pytest","version":"1"}}}').get(10)
        assert "result" in client.reply(1, WAIT)[1]
        # A later request that names no reply topic is answered on the output topic (the
        # headers hold per request), but what Codex sends unasked still goes to the reply topic.
        on_output.send({"id": 2, "method": "thread/start", "params": {}})
        thread = on_output.reply(2, WAIT)[1]["result"]["thread"]["id"]
        started = notification(client, "thread/started")
        assert started["thread"]["id"] == thread, started
        assert [v for _, v in on_output.seen if "method" in v] == [], on_output.seen
    finally:
        client.close()
        on_output.close()


def test_idle_sessions_close_and_reopen_with_their_state(codex_server, topics, client,
                                                        mock_model):
    server = codex_server(topics, "--session-idle-timeout", "1")
    initialize(client, 1)
    thread = request(client, 2, "thread/start", {})["thread"]["id"]
    mock_model.add_text("first", n_deltas=1)
    request(client, 3, "turn/start", {"threadId": thread, "input": text_input("one")})
    notification(client, "turn/completed", threadId=thread)
    server.wait_for_log("idle for 1 s (--session-idle-timeout)", timeout=WAIT)
    # No new initialize: the server replays it, and resumes the thread.
    mock_model.add_text("second", n_deltas=1)
    assert request(client, 4, "command/exec", {"command": ["echo", "back"]})["stdout"] == \
        "back\n"
    request(client, 5, "turn/start", {"threadId": thread, "input": text_input("two")})
    done = client.wait_for(lambda k, v: v.get("method") == "turn/completed" and
                           v["params"]["turn"]["items"] and
                           v["params"]["turn"]["items"][-1].get("text") == "second", WAIT)
    assert done[1]["params"]["turn"]["status"] == "completed", done
    assert "could not resume" not in server.log, server.log


def test_max_sessions_closes_the_least_recently_used_then_refuses(codex_server, topics):
    server = codex_server(topics, "--max-sessions", "2")
    a, b, c = (KafkaClient(topics, name) for name in (b"a", b"b", b"c"))
    try:
        for n, session in enumerate((a, b, c)):
            initialize(session, n)  # c's makes room by closing a, the least recently used
        server.wait_for_log("session 'a': connection to codex closed: least recently used")
        sleep = {"command": ["sleep", "4"], "timeoutMs": 20000}
        b.send({"id": 10, "method": "command/exec", "params": sleep})
        c.send({"id": 10, "method": "command/exec", "params": sleep})
        time.sleep(1.0)
        # b and c are busy: a cannot reopen.
        a.send({"id": 11, "method": "command/exec", "params": {"command": ["true"]}})
        refused = a.reply(11, WAIT)[1]
        assert refused["error"]["code"] == -32001, refused
        assert "--max-sessions" in refused["error"]["message"], refused
        for session in (b, c):
            assert session.reply(10, WAIT)[1]["result"]["exitCode"] == 0
        # Once they are idle again, a reopens, initialize replayed.
        assert request(a, 12, "command/exec", {"command": ["echo", "a"]})["stdout"] == "a\n"
    finally:
        for session in (a, b, c):
            session.close()


def test_codex_killed_mid_turn_then_the_sessions_carry_on(codex_server, topics, client,
                                                           mock_model):
    """Pending requests fail naming the exit; each session re-initializes itself and
    resumes its threads on the new Codex, so a new turn on the old thread works."""
    server = codex_server(topics)
    other = KafkaClient(topics, b"other")
    try:
        initialize(client, 1)
        initialize(other, 1)
        thread = request(client, 2, "thread/start", {})["thread"]["id"]
        mock_model.add_text("before", n_deltas=1)
        request(client, 3, "turn/start", {"threadId": thread, "input": text_input("one")})
        notification(client, "turn/completed", threadId=thread)
        other.send({"id": 2, "method": "command/exec",
                    "params": {"command": ["sleep", "30"], "timeoutMs": 60000}})
        time.sleep(1.0)
        os.kill(logged_codex_pids(server)[-1], signal.SIGKILL)
        failed = other.reply(2, WAIT)[1]
        assert failed["error"]["code"] == -32603, failed
        assert "signal 9" in failed["error"]["message"], failed

        mock_model.add_text("after", n_deltas=1)
        request(client, 4, "turn/start", {"threadId": thread, "input": text_input("two")})
        done = client.wait_for(lambda k, v: v.get("method") == "turn/completed" and
                               v["params"]["turn"]["id"] != "" and v["params"]["turn"]
                               ["items"] and v["params"]["turn"]["items"][-1].get("text")
                               == "after", WAIT)
        assert done[1]["params"]["turn"]["status"] == "completed", done
        assert request(other, 3, "command/exec", {"command": ["echo", "ok"]})["stdout"] == \
            "ok\n"
        assert len(logged_codex_pids(server)) == 2, server.log
    finally:
        other.close()


def test_shutdown_answers_what_codex_still_owes(codex_server):
    """SIGTERM with a request Codex will not answer in time: the client gets an error
    naming the shutdown, not silence (stdio is a session like any other)."""
    server = codex_server(None, "--shutdown-timeout", "1", stdin=subprocess.PIPE)
    stdio = StdioClient(server)
    stdio.request(1, "initialize", {"clientInfo": CLIENT_INFO})
    stdio.send({"id": 2, "method": "command/exec",
                "params": {"command": ["sleep", "30"], "timeoutMs": 60000}})
    time.sleep(1.0)
    server.process.send_signal(signal.SIGTERM)
    reply = stdio.wait_for(lambda m: m.get("id") == 2)
    assert reply["error"]["code"] == -32603, reply
    assert "shutting down" in reply["error"]["message"], reply
    assert server.process.wait(WAIT) == 0, server.log


# --- issue 13: request deadlines, shutdown drains turns -----------------------------

def test_a_request_codex_does_not_answer_in_time_gets_an_error(codex_server, topics, client):
    server = codex_server(topics, "--request-timeout", "1")
    initialize(client, 1)
    client.send({"id": 2, "method": "command/exec",
                 "params": {"command": ["sleep", "3"], "timeoutMs": 20000}})
    reply = client.reply(2, WAIT)[1]
    assert reply["error"] == {"code": -32603, "message": "request timed out after 1 s"}, reply
    assert "command/exec request (id 2) timed out after 1 s (--request-timeout)" in server.log
    server.wait_for_log("dropping codex's late answer to command/exec (id 2)", timeout=WAIT)
    assert [v for _, v in client.seen if v.get("id") == 2] == [reply]  # not answered twice
    assert request(client, 3, "command/exec", {"command": ["echo", "on"]})["stdout"] == "on\n"
    # Its offset was committed with the error: a restart does not take it again.
    assert server.stop() == 0
    codex_server(topics, "--request-timeout", "1")
    client.quiet(3.0)
    assert [v for _, v in client.seen if v.get("id") == 2] == [reply], client.seen[-5:]


def start_turn(client: KafkaClient, mock_model, deltas: int, delay: float) -> str:
    mock_model.add_text("".join(f"d{n} " for n in range(deltas)), n_deltas=deltas,
                        delta_delay_s=delay)
    initialize(client, 1)
    thread = request(client, 2, "thread/start", {})["thread"]["id"]
    request(client, 3, "turn/start", {"threadId": thread, "input": text_input("go")})
    client.wait_for(lambda k, v: v.get("method") == "item/agentMessage/delta", WAIT)
    return thread


def test_sigterm_lets_a_running_turn_finish(codex_server, topics, client, mock_model):
    server = codex_server(topics)
    thread = start_turn(client, mock_model, deltas=15, delay=0.2)
    server.process.send_signal(signal.SIGTERM)
    done = notification(client, "turn/completed", threadId=thread)
    assert done["turn"]["status"] == "completed", done
    assert server.process.wait(WAIT) == 0, server.log


def test_a_turn_past_the_shutdown_timeout_is_interrupted(codex_server, topics, client,
                                                         mock_model):
    server = codex_server(topics, "--shutdown-timeout", "1")
    thread = start_turn(client, mock_model, deltas=100, delay=0.2)
    server.process.send_signal(signal.SIGTERM)
    done = notification(client, "turn/completed", threadId=thread)
    assert done["turn"]["status"] == "interrupted", done
    assert server.process.wait(WAIT) == 0, server.log
    assert "interrupting 1 running turns" in server.log


def test_a_burst_of_new_sessions_waits_for_room_instead_of_being_refused(codex_server, topics):
    """At --max-sessions, each new client is busy only for its initialize: the next one
    waits for it (up to a second) rather than getting -32001."""
    codex_server(topics, "--max-sessions", "3")
    reader = KafkaClient(topics, every_session=True)
    try:
        for n in range(30):
            reader.producer.send(topics.input, key=f"burst-{n}".encode(), value=json.dumps(
                {"id": n, "method": "initialize", "params": {"clientInfo": CLIENT_INFO}}
            ).encode())
        reader.producer.flush(10)
        replies = {}
        deadline = time.monotonic() + 60
        while len(replies) < 30 and time.monotonic() < deadline:
            for _, value in reader.poll():
                if "method" not in value:
                    replies[value["id"]] = value
        assert sorted(replies) == list(range(30)), sorted(replies)
        refused = [reply for reply in replies.values() if "error" in reply]
        assert refused == [], refused[:3]
    finally:
        reader.close()


def test_stdin_ending_while_its_session_connects_leaves_kafka_serving(codex_server, topics):
    """Kafka and stdio: stdin's one request is still connecting to Codex (its first start)
    when stdin ends; the stdio session ends with it, and nothing else does."""
    server = codex_server(topics, "--stdio", stdin=subprocess.PIPE)
    server.process.stdin.write(json.dumps({"id": 1, "method": "initialize", "params": {
        "clientInfo": CLIENT_INFO}}).encode() + b"\n")
    server.process.stdin.close()
    server.wait_for_log("stdin closed")
    client = KafkaClient(topics)
    try:
        initialize(client, 2)  # Kafka goes on
    finally:
        client.close()
    assert server.process.poll() is None and "transport failed" not in server.log, server.log
    assert server.stop() == 0, server.log


def test_a_hung_connect_holds_no_other_session(codex_server, topics):
    """Codex stopped (SIGSTOP): a new session's connection attempt hangs in the WebSocket
    handshake.  An initialized session's request goes on meanwhile, and both clients hear
    of --request-timeout; the attempt itself gives up within its 20 s."""
    server = codex_server(topics, "--request-timeout", "3")
    alice = KafkaClient(topics, b"alice")
    bob = KafkaClient(topics, b"bob")
    codex_pid = None
    try:
        initialize(alice, 1)
        codex_pid = logged_codex_pids(server)[-1]
        os.kill(codex_pid, signal.SIGSTOP)
        bob.send({"id": 1, "method": "initialize", "params": {"clientInfo": CLIENT_INFO}})
        sent = time.monotonic()
        alice.send({"id": 2, "method": "model/list", "params": {}})
        timed_out = {"code": -32603, "message": "request timed out after 3 s"}
        assert alice.reply(2, WAIT)[1]["error"] == timed_out
        assert bob.reply(1, WAIT)[1]["error"] == timed_out
        server.wait_for_log("did not take a connection on its socket within 20 s",
                            timeout=max(1.0, sent + 28 - time.monotonic()))
        assert "still waiting for its connection to codex" in server.log, server.log
    finally:
        if codex_pid is not None:
            try:
                os.kill(codex_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        alice.close()
        bob.close()
