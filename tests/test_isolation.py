"""Issue 19: a client cannot reach another session's threads or the server's own topics.
Real broker; real Codex (mock model) for the threads, the builtin backend for the routes."""

import json
import subprocess

import kafka_transport as rpc
from harness import (
    CLIENT_INFO, WAIT, KafkaClient, StdioClient, Topics, assert_refused_like_a_missing_thread,
    initialize, local_broker, notification, read_topic, request, text_input)


def test_the_servers_own_topics_are_never_reply_topics(broker, codex_server):
    """Not even when --kafka-reply-topic-pattern allows them: a reply keyed by a client's
    chosen id in the session topic would replace that session's saved state for good."""
    topics = Topics(broker.bootstrap)
    store, dead, stats = (topics.input + suffix for suffix in (".sessions", ".dlq", ".stats"))
    local_broker.create_topics(broker.bootstrap, [dead, stats])
    local_broker.create_topics(broker.bootstrap, [store], configs={"cleanup.policy": "compact"})
    server = codex_server(topics, "--kafka-session-topic", store, "--kafka-dead-letter-topic",
                          dead, "--stats-topic", stats, "-X", "statistics.interval.ms=600000",
                          "--kafka-reply-topic-pattern", ".*")
    client = KafkaClient(topics, every_session=True)
    try:
        named = {"alice": store, "dead": dead, "stats": stats, "input": topics.input,
                 "internal": "__consumer_offsets"}
        for msg_id, topic in named.items():
            client.producer.send(topics.input, key=b"mallory", value=json.dumps(
                {"id": msg_id, "method": "noop"}).encode(), headers=[
                ("kafka_replyTopic", topic.encode()), ("kafka_correlationId", msg_id.encode())])
        initialize(client, "after")  # (also saves the default session's state)
        for msg_id, topic in named.items():
            _, reply = client.reply(msg_id)
            assert reply["error"]["code"] == rpc.INVALID_REQUEST, reply
            assert f"reply topic {topic} is not allowed" in reply["error"]["message"], reply
            headers = client.headers[[v.get("id") for _, v in client.seen].index(msg_id)]
            assert ("kafka_correlationId", msg_id.encode()) in headers, headers
        saved = read_topic(broker.bootstrap, store, 2, timeout=3)
        assert [record.key for record in saved] == [b""], saved  # the default session's
        letters = read_topic(broker.bootstrap, dead, len(named), timeout=20)
        assert len(letters) == len(named)
        assert all("__connect.errors.exception.message" in dict(r.headers) for r in letters)
        assert all(json.loads(r.value).get("method") == "noop" for r in letters)  # no replies
        for record in read_topic(broker.bootstrap, stats, 5, timeout=2):
            assert "result" not in json.loads(record.value), record.value
        assert server.log.count("is not allowed: the server's own topics") >= len(named)
    finally:
        client.close()
    assert server.stop() == 0


def test_a_session_cannot_reach_another_sessions_thread(codex_server, topics, mock_model):
    codex_server(topics)
    alice, mallory = KafkaClient(topics, b"alice"), KafkaClient(topics, b"mallory")
    try:
        initialize(alice, 1)
        initialize(mallory, 1)
        thread = request(alice, 2, "thread/start", {})["thread"]["id"]
        mock_model.add_text("Alice's secret.", n_deltas=1)
        request(alice, 3, "turn/start", {"threadId": thread, "input": text_input("hello")})
        notification(alice, "turn/completed", threadId=thread)
        assert_refused_like_a_missing_thread(mallory, thread)
        # Other spellings Codex takes, and the same params by position.
        for n, spelling in enumerate((thread.upper(), "urn:uuid:" + thread,
                                      "{%s}" % thread, thread.replace("-", ""))):
            mallory.send({"id": f"spelling-{n}", "method": "thread/read",
                          "params": {"threadId": spelling}})
            reply = mallory.reply(f"spelling-{n}", WAIT)[1]
            assert "error" in reply and "thread" not in reply.get("result", {}), reply
        mallory.send({"id": "positional", "method": "thread/read", "params": [thread, True]})
        reply = mallory.reply("positional", WAIT)[1]
        assert "params must be an object" in reply["error"]["message"], reply
        assert request(alice, 4, "thread/read", {"threadId": "urn:uuid:" + thread}
                       )["thread"]["id"] == thread  # the owner may spell it as Codex takes
        for method in ("thread/list", "thread/loaded/list"):
            assert request(mallory, method, method, {})["data"] == [], method
        assert [t["id"] for t in request(alice, 5, "thread/list", {})["data"]] == [thread]
        assert request(alice, 6, "thread/loaded/list", {})["data"] == [thread]
        turns = request(alice, 7, "thread/read", {"threadId": thread, "includeTurns": True})
        assert "Alice's secret." in json.dumps(turns)
        assert "Alice's secret." not in json.dumps(mallory.seen)
        # Nothing of alice's thread reached mallory, not even its start.
        assert not [v for _, v in mallory.seen if "method" in v and thread in json.dumps(v)]
    finally:
        alice.close()
        mallory.close()


def test_one_thread_start_is_one_record_whatever_the_sessions(codex_server, topics):
    codex_server(topics)
    reader = KafkaClient(topics, every_session=True)
    try:
        for n in range(50):
            reader.producer.send(topics.input, key=f"s{n}".encode(), value=json.dumps(
                {"id": f"init-{n}", "method": "initialize",
                 "params": {"clientInfo": CLIENT_INFO}}).encode())
        reader.producer.flush(10)
        for n in range(50):
            reader.reply(f"init-{n}", 60)
        reader.send({"id": "start", "method": "thread/start", "params": {}}, key=b"s7")
        thread = reader.reply("start", WAIT)[1]["result"]["thread"]["id"]
        reader.quiet(3.0)
        started = [(dict(h).get(rpc.SESSION_HEADER), v) for h, (_, v) in
                   zip(reader.headers, reader.seen) if v.get("method") == "thread/started"]
        assert [(session, v["params"]["thread"]["id"]) for session, v in started] == \
            [(b"s7", thread)], started
    finally:
        reader.close()


def test_shared_threads_gives_every_session_every_thread(codex_server, topics, mock_model):
    codex_server(topics, "--shared-threads")
    alice, bob = KafkaClient(topics, b"alice"), KafkaClient(topics, b"bob")
    try:
        initialize(alice, 1)
        initialize(bob, 1)
        thread = request(alice, 2, "thread/start", {})["thread"]["id"]
        notification(bob, "thread/started")  # bob hears of it, as upstream
        assert thread in request(bob, 3, "thread/loaded/list", {})["data"]
        assert request(bob, 4, "thread/read", {"threadId": thread})["thread"]["id"] == thread
    finally:
        alice.close()
        bob.close()


def test_the_stdio_client_keeps_upstreams_view_of_every_thread(codex_server, topics,
                                                              mock_model):
    """Stdio is the local operator: it may read a Kafka session's thread, as with a plain
    codex app-server; the Kafka session may not read the operator's."""
    server = codex_server(topics, "--stdio", stdin=subprocess.PIPE)
    operator = StdioClient(server)
    alice = KafkaClient(topics, b"alice")
    try:
        initialize(alice, 1)
        thread = request(alice, 2, "thread/start", {})["thread"]["id"]
        operator.request(1, "initialize", {"clientInfo": CLIENT_INFO})
        assert operator.request(2, "thread/read", {"threadId": thread})["thread"]["id"] == thread
        own = operator.request(3, "thread/start", {})["thread"]["id"]
        alice.send({"id": 3, "method": "thread/read", "params": {"threadId": own}})
        assert "error" in alice.reply(3, WAIT)[1]
    finally:
        alice.close()
