"""Issue 11: sessions that survive restarts and move between servers: each session's state in
a compacted session topic, servers sharing a group.  Real broker, real Codex (mock model);
the servers of a test share one CODEX_HOME, as the docs require for threads to move."""

import signal
import time
from typing import Any, Dict, List, Tuple

import pytest

from harness import (
    CLIENT_INFO, KafkaClient, Topics, assert_refused_like_a_missing_thread, initialize,
    local_broker, notification, request, text_input)


def session_topics(broker: Any, partitions: int = 1) -> Tuple[Topics, str]:
    """Input and output topics of ``partitions`` each: a session's replies then go to the
    output partition numbered as its input one, so each is written by one server (Tansu 0.6
    gives concurrent producers of one partition the same offsets, and readers skip some)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    topics = Topics(broker.bootstrap, create=False)
    local_broker.create_topics(broker.bootstrap, [topics.input, topics.output],
                               partitions=partitions)
    store = topics.output + ".sessions"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:  # as the docs say: compacted
        admin.create_topics([NewTopic(store, 2, 1,
                                      topic_configs={"cleanup.policy": "compact"})])
    finally:
        admin.close()
    return topics, store


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "idle, then SIGKILL", "moved"])
def test_a_session_carries_on_without_a_new_initialize(codex_server, broker, mock_model, how):
    topics, store = session_topics(broker)
    extra = ("--kafka-session-topic", store, "--session-idle-timeout", "1")
    first = codex_server(topics, *extra)
    client = KafkaClient(topics, b"alice")
    try:
        initialize(client, 1)
        thread = request(client, 2, "thread/start", {})["thread"]["id"]
        mock_model.add_text("Hello.", n_deltas=1)  # (Codex saves a thread at its first turn)
        request(client, 3, "turn/start", {"threadId": thread, "input": text_input("hello")})
        notification(client, "turn/completed", threadId=thread)
        if how.startswith("idle"):
            first.wait_for_log("idle for 1 s")
        if how == "moved":  # a second server of the group takes the partition over
            second = codex_server(None, *topics.server_args(*extra))
            second.wait_for_log("kafka partitions assigned", timeout=30)
            first.stop(signal.SIGTERM)
        else:
            first.stop(getattr(signal, how.split()[-1]))
            codex_server(topics, *extra)
        mock_model.add_text("Still here.", n_deltas=2)
        turn = request(client, 10, "turn/start", {"threadId": thread,
                                                  "input": text_input("still there?")})
        assert turn["turn"]["status"] == "inProgress", turn
        done = notification(client, "turn/completed", threadId=thread)
        assert done["turn"]["status"] == "completed", done
        # Still alice's alone: its ownership came back with the session's state.
        mallory = KafkaClient(topics, b"mallory")
        try:
            initialize(mallory, 1)
            assert_refused_like_a_missing_thread(mallory, thread)
        finally:
            mallory.close()
    finally:
        client.close()


def test_two_servers_one_group_answer_everything_through_a_kill(codex_server, broker):
    topics, store = session_topics(broker, partitions=4)
    extra = ("--kafka-session-topic", store)
    servers = [codex_server(topics, *extra) for _ in range(2)]
    for server in servers:  # both in the group, each with partitions of its own
        server.wait_for_log("kafka partitions assigned: " + topics.input, timeout=30)
    time.sleep(1)
    sessions = [f"s{n}".encode() for n in range(40)]
    client = KafkaClient(topics, every_session=True, partition=[0, 1, 2, 3])
    try:
        for session in sessions:
            client.send({"id": 0, "method": "initialize", "params": {"clientInfo": CLIENT_INFO}},
                        key=session)
        for round_ in range(1, 6):
            for session in sessions:
                client.send({"id": round_, "method": "thread/loaded/list", "params": {}},
                            key=session)
            if round_ == 3:  # mid-stream: some of this round in flight there
                servers[0].stop(signal.SIGKILL)
            time.sleep(0.5)
        want = {(session.decode(), n) for session in sessions for n in range(6)}

        def answered() -> Dict[Tuple[str, int], List[Any]]:
            got: Dict[Tuple[str, int], List[Any]] = {}
            for (_, value), headers in zip(client.seen, client.headers):
                who = dict(headers).get("codex-session", b"").decode()
                if "id" in value and "method" not in value:
                    got.setdefault((who, value["id"]), []).append(value)
            return got
        deadline = time.monotonic() + 90
        while not want <= set(answered()) and time.monotonic() < deadline:
            client.poll()
        got = answered()
        assert want <= set(got), sorted(want - set(got))[:10]
        errors = [v for replies in got.values() for v in replies if "error" in v]
        assert errors == [], errors[:5]
        # The survivor took the dead server's partitions and restored its sessions.
        servers[1].wait_for_log("kafka partitions assigned: ", count=2)
        assert "Not initialized" not in servers[1].log
    finally:
        client.close()


def test_a_session_topic_that_does_not_exist_is_a_clear_start_up_error(codex_server, broker):
    topics = Topics(broker.bootstrap)
    server = codex_server(None, *topics.server_args("--kafka-session-topic", "no.such.topic"))
    assert server.process.wait(60) == 3, server.log
    assert "session topic no.such.topic does not exist" in server.log, server.log
    assert "cleanup.policy=compact" in server.log, server.log


def test_a_session_topic_that_is_not_compacted_is_refused(codex_server, broker):
    from kafka.admin import KafkaAdminClient, NewTopic
    topics = Topics(broker.bootstrap)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic(topics.output + ".plain", 1, 1,
                                      topic_configs={"cleanup.policy": "delete"})])
    finally:
        admin.close()
    server = codex_server(None, *topics.server_args("--kafka-session-topic",
                                                    topics.output + ".plain"))
    assert server.process.wait(60) == 3, server.log
    assert "has cleanup.policy=delete: it must be compacted (cleanup.policy=compact)" in \
        server.log, server.log


def test_a_rebalance_loses_nothing_of_the_partitions_a_server_keeps(broker, start_server):
    """A second server joins while the first has records queued (a slow backend): the first
    keeps half of the partitions and must still answer what it had taken of them."""
    topics = Topics(broker.bootstrap, create=False)
    local_broker.create_topics(broker.bootstrap, [topics.input, topics.output], partitions=4)
    slow = ["--backend", "builtin", "--builtin-delay", "0.02"]
    first = start_server(slow + topics.server_args()).wait_ready()
    client = KafkaClient(topics, every_session=True, partition=[0, 1, 2, 3])
    try:
        keys = [f"k{n}".encode() for n in range(40)]
        for n in range(400):
            client.send({"id": n, "method": "noop", "params": {}}, key=keys[n % 40])
        first.wait_for_log("kafka transport ready")
        start_server(slow + topics.server_args())  # joins: a rebalance mid-queue
        deadline = time.monotonic() + 90
        while len({v["id"] for _, v in client.seen}) < 400 and time.monotonic() < deadline:
            client.poll()
        answered = {v["id"] for _, v in client.seen if "result" in v}
        assert answered == set(range(400)), sorted(set(range(400)) - answered)[:10]
    finally:
        client.close()
