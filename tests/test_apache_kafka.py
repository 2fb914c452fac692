"""On Apache Kafka itself (issue 21): the reference's own smoke test (section 5) with Kafka's
own tools (kafka-console-producer publishes the request, the reply is read back, and
kafka-consumer-groups shows the server's group caught up: section 4, item 5); SASL logins;
the ACLs of section 4, the session, dead-letter and stats topics' included; and bad input
from the broker side (a topic's max.message.bytes, a deleted output topic, a restart).
Collected only with TEST_BROKER=apache-kafka (scripts/test runs it so); the tools come from
the same Maven-fetched jars as the broker."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest

import kafka_transport as rpc
from harness import CLIENT_INFO, KafkaClient, Topics, codex_args, local_broker

BUILTIN = ["--backend", "builtin"]


def kafka_tool(main_class: str, *args: str, stdin: bytes = b"", timeout: float = 60.0) -> str:
    """One of Kafka's command-line tools (kafka-console-producer.sh and the like run these
    classes), its stdout."""
    result = subprocess.run(["java", "-Xmx256m", "-cp", local_broker.apache_kafka_classpath(),
                             main_class, *args], input=stdin, capture_output=True,
                            timeout=timeout)
    assert result.returncode == 0, (main_class, result.stderr.decode(errors="replace")[-2000:])
    return result.stdout.decode()


def test_the_references_smoke_test_with_kafka_console_producer(topics, start_server):
    server = start_server(topics.server_args(*BUILTIN)).wait_ready()
    client = KafkaClient(topics)
    try:
        kafka_tool("org.apache.kafka.tools.ConsoleProducer", "--bootstrap-server",
                   topics.bootstrap, "--topic", topics.input,
                   stdin=b'{"jsonrpc":"2.0","id":1,"method":"noop","params":{}}\n')
        key, reply = client.reply(1, timeout=30)
        assert (key, reply) == ("1", {"jsonrpc": "2.0", "id": 1, "result": {}})
        # kafka-consumer-groups: the group is at the end of the input topic, lag 0.
        deadline = time.monotonic() + 30
        while True:
            out = kafka_tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                             "--bootstrap-server", topics.bootstrap, "--describe", "--group",
                             topics.group)
            rows = [line.split() for line in out.splitlines() if topics.input in line]
            if rows and rows[0][3:6] == ["1", "1", "0"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert rows and rows[0][3:6] == ["1", "1", "0"], out  # CURRENT-OFFSET LOG-END LAG
    finally:
        client.close()
    assert server.stop() == 0


def test_kafka_console_consumer_reads_the_reply_keyed_by_id(topics, start_server):
    start_server(topics.server_args(*BUILTIN)).wait_ready()
    client = KafkaClient(topics)
    try:
        client.send({"jsonrpc": "2.0", "id": "smoke", "method": "noop", "params": {}})
        client.reply("smoke", timeout=30)
    finally:
        client.close()
    out = kafka_tool("org.apache.kafka.tools.consumer.ConsoleConsumer", "--bootstrap-server",
                     topics.bootstrap, "--topic", topics.output, "--from-beginning",
                     "--max-messages", "1", "--formatter-property", "print.key=true",
                     "--formatter-property", "key.separator=|", "--timeout-ms", "30000")
    key, value = out.strip().split("|", 1)
    assert key == "smoke" and json.loads(value)["result"] == {}, out


def assert_answered(topics: Any, msg_id: str) -> None:
    """A noop round trip through the server, from a client on the PLAINTEXT listener."""
    client = KafkaClient(topics)
    try:
        client.send({"jsonrpc": "2.0", "id": msg_id, "method": "noop", "params": {}})
        assert client.reply(msg_id, timeout=30)[1]["result"] == {}
    finally:
        client.close()


# The reference's environment variables for the settings these tests give (the protocol is
# inferred from them).
ENVIRONMENT = {"ssl.ca.location": "KAFKA_SSL_CA", "ssl.certificate.location": "KAFKA_SSL_CERT",
               "ssl.key.location": "KAFKA_SSL_KEY", "ssl.key.password": "KAFKA_SSL_KEY_PASSWORD",
               "sasl.mechanism": "KAFKA_SASL_MECHANISM", "sasl.username": "KAFKA_SASL_USERNAME",
               "sasl.password": "KAFKA_SASL_PASSWORD"}


def secure_server(topics, start_server, bootstrap: str, settings: Dict[str, str], how: str,
                  tmp_path: Any = None, *extra: str) -> Any:
    """The server on one of the broker's secured listeners, its client ``settings`` given
    ``how``: by -X, a properties file, or the reference's environment variables."""
    args = topics.server_args(*BUILTIN, *extra)
    args[args.index("--kafka-bootstrap-servers") + 1] = bootstrap
    env = {name: value for name, value in os.environ.items() if not name.startswith("KAFKA_")}
    if how == "-X":
        for key, value in settings.items():
            args += ["-X", f"{key}={value}"]
    elif how == "properties file":
        path = tmp_path / "client.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        args += ["--kafka-config", str(path)]
    else:
        env.update({ENVIRONMENT[key]: value for key, value in settings.items()
                    if key != "security.protocol"})
    return start_server(args, env=env)


def sasl_server(broker, topics, start_server, how: str, mechanism: str, password: str,
                tmp_path: Any = None, user: str = local_broker.SASL_USER, *extra: str,
                protocol: str = "SASL_PLAINTEXT") -> Any:
    """The server on the broker's SASL_PLAINTEXT (or SASL_SSL) listener as ``user``."""
    settings = {"security.protocol": protocol, "sasl.mechanism": mechanism,
                "sasl.username": user, "sasl.password": password}
    bootstrap = broker.sasl_bootstrap
    if protocol == "SASL_SSL":
        settings["ssl.ca.location"] = broker.pki.ca_cert
        bootstrap = broker.sasl_ssl_bootstrap
    return secure_server(topics, start_server, bootstrap, settings, how, tmp_path, *extra)


SECRETS = (local_broker.SASL_PASSWORD, "key-s3cret-pw")  # (tls_fixtures.KEY_PASSWORD)


def assert_no_secret(server: Any) -> None:
    assert not [secret for secret in SECRETS if secret in server.log], "a secret was shown"


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("how", ["-X", "properties file", "environment"])
def test_a_sasl_login_succeeds_and_its_password_is_never_shown(broker, topics, start_server,
                                                               tmp_path, mechanism, how,
                                                               protocol):
    server = sasl_server(broker, topics, start_server, how, mechanism,
                         local_broker.SASL_PASSWORD, tmp_path, protocol=protocol).wait_ready()
    assert_answered(topics, "sasl")
    assert server.stop() == 0
    assert_no_secret(server)
    assert "sasl.password=***" in server.log
    assert f"security.protocol={protocol}" in server.log  # given, or inferred


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_a_wrong_sasl_password_is_exit_3_naming_the_cause(broker, topics, start_server,
                                                          tmp_path, mechanism, protocol):
    wrong = "not-" + local_broker.SASL_PASSWORD
    server = sasl_server(broker, topics, start_server, "-X", mechanism, wrong, tmp_path,
                         protocol=protocol)
    assert server.process.wait(60) == 3, server.log
    assert f"SASL {mechanism} login as 'alice' failed" in server.log, server.log
    assert wrong not in server.log
    assert_no_secret(server)


# --- TLS straight to the broker's own listeners ------------------------------------------

@pytest.mark.parametrize("how", ["-X", "properties file", "environment"])
def test_tls_to_the_brokers_ssl_listener(broker, topics, start_server, tmp_path, how):
    settings = {"security.protocol": "SSL", "ssl.ca.location": broker.pki.ca_cert}
    server = secure_server(topics, start_server, broker.ssl_bootstrap, settings, how,
                           tmp_path).wait_ready()
    assert_answered(topics, "tls")
    assert server.stop() == 0
    assert "security.protocol=SSL" in server.log


def test_mutual_tls_with_an_encrypted_key(broker, topics, start_server):
    pki = broker.pki
    settings = {"ssl.ca.location": pki.ca_cert, "ssl.certificate.location": pki.client_cert,
                "ssl.key.location": pki.client_key_encrypted, "ssl.key.password": pki.key_password}
    server = secure_server(topics, start_server, broker.mtls_bootstrap, settings,
                           "environment").wait_ready()
    assert_answered(topics, "mtls")
    assert server.stop() == 0
    assert "ssl.key.password=***" in server.log
    assert_no_secret(server)


@pytest.mark.parametrize("case, settings, named", [
    ("no client certificate", {}, "client certificate"),
    ("a certificate of another CA", {"ssl.certificate.location": "other_client_cert",
                                     "ssl.key.location": "other_client_key"},
     "refused the TLS handshake")])
def test_mutual_tls_refused_is_exit_3(broker, topics, start_server, case, settings, named):
    pki = broker.pki
    settings = {key: getattr(pki, value) for key, value in settings.items()}
    settings.update({"security.protocol": "SSL", "ssl.ca.location": pki.ca_cert})
    server = secure_server(topics, start_server, broker.mtls_bootstrap, settings, "-X", None,
                           "--kafka-connect-timeout", "20")
    assert server.process.wait(60) == 3, server.log
    errors = [line for line in server.log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and named in errors[0], server.log


def test_a_broker_certificate_of_an_untrusted_ca_is_exit_3(broker, topics, start_server):
    settings = {"security.protocol": "SSL", "ssl.ca.location": broker.pki.other_ca_cert}
    server = secure_server(topics, start_server, broker.ssl_bootstrap, settings, "-X", None,
                           "--kafka-connect-timeout", "20")
    assert server.process.wait(60) == 3, server.log
    assert "is not trusted" in server.log, server.log


# --- ACLs: what section 4 of the reference tells operators to grant ---------------

def acls(bootstrap: str, grants: List[Tuple[str, str, str]], revoke: bool = False) -> None:
    """Grant (or revoke) User:bob each (operation, resource type, name)."""
    from kafka.admin import (ACL, ACLFilter, ACLOperation, ACLPermissionType,
                             ACLResourcePatternType, KafkaAdminClient, ResourcePattern,
                             ResourcePatternFilter, ResourceType)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        for operation, kind, name in grants:
            args = (f"User:{local_broker.ACL_USER}", "*", ACLOperation[operation],
                    ACLPermissionType.ALLOW)
            if revoke:
                admin.delete_acls([ACLFilter(*args, ResourcePatternFilter(
                    ResourceType[kind], name, ACLResourcePatternType.LITERAL))])
            else:
                admin.create_acls([ACL(*args, ResourcePattern(ResourceType[kind], name))])
    finally:
        admin.close()


def documented(topics: Any) -> List[Tuple[str, str, str]]:
    """The minimum docs/kafka.md, section 4, names for the server."""
    return [("READ", "TOPIC", topics.input), ("DESCRIBE", "TOPIC", topics.input),
            ("READ", "GROUP", topics.group), ("WRITE", "TOPIC", topics.output),
            ("DESCRIBE", "TOPIC", topics.output)]


def bob_server(broker, topics, start_server) -> Any:
    """The server as bob, who has only what ACLs grant."""
    return sasl_server(broker, topics, start_server, "-X", "PLAIN", local_broker.SASL_PASSWORD,
                       None, local_broker.ACL_USER, "--kafka-connect-timeout", "10")


def test_the_documented_acls_are_all_a_server_needs(broker, topics, start_server):
    acls(broker.bootstrap, documented(topics))
    server = bob_server(broker, topics, start_server).wait_ready(60)
    assert_answered(topics, "acl")
    assert server.stop() == 0


@pytest.mark.parametrize("missing, named", [
    (("READ", "GROUP"), "read group {group}"), (("READ", "TOPIC"), "read topic {input}")])
def test_a_missing_read_acl_is_exit_3_with_the_line_that_grants_it(
        broker, topics, start_server, missing, named):
    acls(broker.bootstrap, [grant for grant in documented(topics) if grant[:2] != missing
                            or grant[2] == topics.output])
    server = bob_server(broker, topics, start_server)
    assert server.process.wait(60) == 3, server.log
    what = named.format(group=topics.group, input=topics.input)
    assert f"the brokers' ACLs do not let this server {what}" in server.log, server.log
    kind = "--group " + topics.group if missing[1] == "GROUP" else "--topic " + topics.input
    assert "--allow-principal User:bob --operation Read" in server.log
    assert kind in server.log.split("grant it with:")[-1], server.log


def test_a_missing_write_acl_loses_nothing_and_replies_flow_once_granted(
        broker, topics, start_server):
    grants = documented(topics)
    acls(broker.bootstrap, [grant for grant in grants if grant[0] != "WRITE"])
    server = bob_server(broker, topics, start_server).wait_ready(60)
    client = KafkaClient(topics)
    try:
        for n in range(5):
            client.send({"jsonrpc": "2.0", "id": n, "method": "noop", "params": {}})
        server.wait_for_log(f"do not let this server write topic {topics.output}", timeout=30)
        assert client.quiet(2.0) == []
        acls(broker.bootstrap, [("WRITE", "TOPIC", topics.output)])
        for n in range(5):  # every one answered, once
            assert client.reply(n, timeout=60)[1]["result"] == {}
        assert sorted(v["id"] for _, v in client.seen) == list(range(5))
    finally:
        client.close()
    assert server.stop() == 0
    assert "dropping kafka message" not in server.log


def test_a_reply_topic_the_server_may_not_write_gets_an_error_on_the_output_topic(
        broker, topics, start_server):
    replies = topics.input + ".replies"
    local_broker.create_topics(broker.bootstrap, [replies])
    acls(broker.bootstrap, documented(topics) + [("DESCRIBE", "TOPIC", replies)])
    server = bob_server(broker, topics, start_server).wait_ready(60)
    client = KafkaClient(topics, every_session=True)
    try:
        client.producer.send(topics.input, key=b"s", value=json.dumps(
            {"id": "denied", "method": "noop"}).encode(), headers=[
            ("kafka_replyTopic", replies.encode()), ("kafka_correlationId", b"c-1")])
        client.send({"id": "other", "method": "noop"}, key=b"t")
        assert client.reply("other", timeout=30)[1]["result"] == {}  # others unaffected
        _, reply = client.reply("denied", timeout=30)
        assert reply["error"]["code"] == -32600, reply
        assert f"reply topic {replies} may not be written" in reply["error"]["message"]
        headers = client.headers[[v.get("id") for _, v in client.seen].index("denied")]
        assert ("kafka_correlationId", b"c-1") in headers, headers
    finally:
        client.close()
    assert server.stop() == 0


def test_an_input_topic_created_after_the_server_joined_is_read_at_once(broker, start_server):
    """The group assigns nothing of a topic the brokers did not know at the join; the server
    looks it up again rather than idling until its metadata's 5-minute renewal."""
    topics = Topics(broker.bootstrap, create=False)
    local_broker.create_topics(broker.bootstrap, [topics.output])
    server = start_server(topics.server_args(*BUILTIN, "-X", "allow.auto.create.topics=false"))
    server.wait_for_log("no partition of topic", timeout=60)
    local_broker.create_topics(broker.bootstrap, [topics.input])
    server.wait_ready(60)  # its partition assigned, its position resolved
    client = KafkaClient(topics)
    try:
        client.send({"jsonrpc": "2.0", "id": "late", "method": "noop", "params": {}})
        assert client.reply("late", timeout=60)[1]["result"] == {}
    finally:
        client.close()
    assert server.stop() == 0


class SlowMember:
    """A member of the server's group, on a topic of its own, that polls every few seconds:
    each rebalance waits for it, so the server's joins outlast its polls."""

    def __init__(self, bootstrap: str, group: str, every: float = 3.0):
        from kafka import KafkaConsumer
        self.topic = group + ".other"
        local_broker.create_topics(bootstrap, [self.topic])
        self.consumer = KafkaConsumer(self.topic, bootstrap_servers=bootstrap, group_id=group,
                                      enable_auto_commit=False, max_poll_interval_ms=60000)
        self.every = every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            self.consumer.poll(timeout_ms=100)
            self.stopped.wait(self.every)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(30)
        self.consumer.close()


def hog(stop: threading.Event) -> None:
    """Keep the interpreter busy until ``stop``."""
    while not stop.is_set():
        sum(range(1000))


def test_partitions_added_to_the_input_topic_are_taken_up_on_a_busy_machine(broker):
    """kafka-python 3.0 forgets a rebalance it started for new metadata when its JoinGroup is
    answered while no poll() is running (the join is not marked as needed, unlike the Java
    client's since KAFKA-9815): the transport would keep its old partitions, or none, for
    good. A member that makes each join wait, polls of 1 ms, and a thread that holds the
    interpreter in long slices (as a busy machine does: the network thread takes the answer
    late) put that moment between two polls."""
    from kafka.admin import KafkaAdminClient, NewPartitions
    topics = Topics(broker.bootstrap)
    transport = rpc.KafkaTransport(topics.input, topics.output, sink=None, poll_interval=0.001,
                                   properties={"bootstrap.servers": topics.bootstrap,
                                               "group.id": topics.group})
    thread = threading.Thread(target=transport.serve_forever, daemon=True)
    thread.start()
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    slow = None
    switch = sys.getswitchinterval()
    try:
        assert transport.ready.wait(60), "transport never became ready"
        slow = SlowMember(broker.bootstrap, topics.group)
        sys.setswitchinterval(0.02)
        threading.Thread(target=hog, args=(slow.stopped,), daemon=True).start()
        admin.create_partitions({topics.input: NewPartitions(total_count=3)})
        deadline = time.monotonic() + 60
        while len(transport._assigned) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert transport._assigned == {0, 1, 2}
    finally:
        sys.setswitchinterval(switch)
        admin.close()
        if slow is not None:
            slow.close()
        transport.close(timeout=10)
        thread.join(10)


# --- compaction of the session topic, for real ---------------------------------------------

def compacted_topic(bootstrap: str, name: str) -> None:
    """A session topic the log cleaner compacts within a second or so of each write (with the
    broker's log.cleaner.backoff.ms=500 of tests/harness.py)."""
    local_broker.create_topics(bootstrap, [name], configs={
        "cleanup.policy": "compact", "segment.ms": "100", "min.cleanable.dirty.ratio": "0.01",
        "min.compaction.lag.ms": "0"})


def written_and_kept(bootstrap: str, topic: str) -> Tuple[int, int]:
    """(records ever written to partition 0 of ``topic``: its end offset, records it holds)."""
    from kafka import KafkaConsumer, TopicPartition
    partition = TopicPartition(topic, 0)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.assign([partition])
        end = consumer.end_offsets([partition])[partition]
        consumer.seek_to_beginning()
        kept, deadline = 0, time.monotonic() + 30
        while consumer.position(partition) < end and time.monotonic() < deadline:
            kept += sum(len(batch) for batch in consumer.poll(timeout_ms=200).values())
        return end, kept
    finally:
        consumer.close()


def test_a_compacted_session_topic_restores_every_sessions_latest_state(
        codex_server, broker, mock_model):
    from harness import initialize, notification, request, text_input
    topics = Topics(broker.bootstrap)
    store = topics.output + ".sessions"
    compacted_topic(broker.bootstrap, store)
    extra = ("--kafka-session-topic", store)
    server = codex_server(topics, *extra)
    clients = {name: KafkaClient(topics, name.encode()) for name in ("ann", "ben", "cid")}
    threads: Dict[str, List[str]] = {name: [] for name in clients}
    try:
        for name, client in clients.items():
            initialize(client, "init")
        for round_ in range(6):  # each new thread rewrites the session's state
            for name, client in clients.items():
                thread = request(client, f"start-{round_}", "thread/start", {})["thread"]["id"]
                threads[name].append(thread)
                mock_model.add_text(f"Turn {round_}.", n_deltas=1)  # (a thread is kept by
                request(client, f"turn-{round_}", "turn/start",    # Codex from its first turn)
                        {"threadId": thread, "input": text_input("hi")})
                notification(client, "turn/completed", threadId=thread)
        deadline = time.monotonic() + 60
        written, kept = written_and_kept(broker.bootstrap, store)
        while kept >= written and time.monotonic() < deadline:  # until the cleaner has run
            time.sleep(1)
            written, kept = written_and_kept(broker.bootstrap, store)
        assert written >= 3 * 7 and kept < written, (written, kept)
        server.stop(signal.SIGKILL)
        codex_server(topics, *extra)
        for name, client in clients.items():  # no new initialize; every thread still its own
            for n, thread in enumerate(threads[name]):
                read = request(client, f"read-{n}", "thread/read",
                               {"threadId": thread, "includeTurns": True})
                assert read["thread"]["id"] == thread, read
    finally:
        for client in clients.values():
            client.close()


# --- bad input from the broker side ---------------------------------------------------------

def read_replies(bootstrap: str, topic: str, want: int, timeout: float) -> List[Dict[str, Any]]:
    """The replies on ``topic`` (partition 0, from its start), once ``want`` distinct ids came
    (or at ``timeout``)."""
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=500)
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    replies: List[Dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len({reply.get("id") for reply in replies}) < want \
                and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                replies.extend(json.loads(record.value) for record in records)
    finally:
        consumer.close()
    return replies


def produce(bootstrap: str, topic: str, messages: List[Dict[str, Any]]) -> None:
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for message in messages:
            producer.send(topic, key=b"faults", value=json.dumps(message).encode())
        producer.flush(60)
    finally:
        producer.close(10)


def test_a_reply_over_the_topics_max_message_bytes_is_its_error_and_the_rest_flow(
        broker, start_server):
    topics = Topics(broker.bootstrap, create=False)
    local_broker.create_topics(broker.bootstrap, [topics.input])
    local_broker.create_topics(broker.bootstrap, [topics.output],
                               configs={"max.message.bytes": "2000"})
    server = start_server(topics.server_args(*BUILTIN)).wait_ready()
    assert "takes records up to 2000 bytes (max.message.bytes)" in server.log
    produce(broker.bootstrap, topics.input, [
        {"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"big": "x" * 5000}},
        {"jsonrpc": "2.0", "id": 2, "method": "noop", "params": {}}])
    replies = {reply["id"]: reply for reply in read_replies(broker.bootstrap, topics.output, 2,
                                                            timeout=30)}
    assert f"max.message.bytes of topic {topics.output}" in replies[1]["error"]["message"]
    assert replies[2]["result"] == {}
    assert server.stop() == 0, server.log


@pytest.fixture(scope="module")
def strict_broker():
    """An Apache Kafka of this module's own that creates no topic on demand."""
    started = local_broker.start_apache_kafka(0, settings={"auto.create.topics.enable": "false"})
    yield started
    local_broker.stop_broker(started)


def test_a_deleted_output_topic_holds_replies_until_it_is_back(strict_broker, start_server):
    from kafka.admin import KafkaAdminClient
    topics = Topics(strict_broker.bootstrap)
    server = start_server(topics.server_args(*BUILTIN)).wait_ready()
    admin = KafkaAdminClient(bootstrap_servers=strict_broker.bootstrap)
    try:
        admin.delete_topics([topics.output])
        time.sleep(2)
        produce(strict_broker.bootstrap, topics.input, [
            {"jsonrpc": "2.0", "id": "held", "method": "noop", "params": {}}])
        server.wait_for_log(f"to {topics.output}", timeout=60)  # the WARNING naming it
        assert server.process.poll() is None
        local_broker.create_topics(strict_broker.bootstrap, [topics.output])
        replies = read_replies(strict_broker.bootstrap, topics.output, 1, timeout=60)
        assert [reply["id"] for reply in replies][:1] == ["held"], server.log[-3000:]
    finally:
        admin.close()
    assert server.stop() == 0, server.log


def test_a_broker_restart_mid_stream_loses_nothing(strict_broker, start_server):
    topics = Topics(strict_broker.bootstrap)
    server = start_server(topics.server_args(*BUILTIN)).wait_ready()
    produce(strict_broker.bootstrap, topics.input, [
        {"jsonrpc": "2.0", "id": n, "method": "noop", "params": {}} for n in range(100)])
    local_broker.restart_apache_kafka(strict_broker)  # data on disk: the topics stay
    produce(strict_broker.bootstrap, topics.input, [
        {"jsonrpc": "2.0", "id": n, "method": "noop", "params": {}} for n in range(100, 200)])
    replies = read_replies(strict_broker.bootstrap, topics.output, 200, timeout=120)
    assert {reply["id"] for reply in replies} == set(range(200)), server.log[-3000:]
    assert server.process.poll() is None
    assert server.stop() == 0, server.log


# --- ACLs of the session, dead-letter and statistics topics ---------------------------------




def own_topic_grants(store: str, dead: str, stats: str) -> List[Any]:
    """What docs/kafka.md, section 4, adds for the session, dead-letter and stats topics."""
    return [(operation, "TOPIC", store) for operation in
            ("READ", "WRITE", "DESCRIBE", "DESCRIBE_CONFIGS")] + \
        [(operation, "TOPIC", topic) for topic in (dead, stats) for operation in
         ("WRITE", "DESCRIBE")]


def own_topics(broker: Any, topics: Topics) -> List[str]:
    store, dead, stats = (topics.input + suffix for suffix in (".sessions", ".dead", ".stats"))
    local_broker.create_topics(broker.bootstrap, [store], configs={"cleanup.policy": "compact"})
    local_broker.create_topics(broker.bootstrap, [dead, stats])
    return [store, dead, stats]


def bob_with_own_topics(broker, topics, start_server, codex_bin, codex_env, store, dead,
                        stats) -> Any:
    """The Codex backend as bob (the session topic keeps its sessions), with all three."""
    args = codex_args(codex_bin) + topics.server_args(
        "--kafka-connect-timeout", "10", "--kafka-session-topic", store,
        "--kafka-dead-letter-topic", dead, "--stats-topic", stats,
        "-X", "statistics.interval.ms=1000", "-X", "security.protocol=SASL_PLAINTEXT",
        "-X", "sasl.mechanism=PLAIN", "-X", f"sasl.username={local_broker.ACL_USER}",
        "-X", f"sasl.password={local_broker.SASL_PASSWORD}")
    args[args.index("--kafka-bootstrap-servers") + 1] = broker.sasl_bootstrap
    return start_server(args, env=codex_env)


def test_the_documented_acls_cover_the_session_dead_letter_and_stats_topics(
        broker, start_server, codex_bin, codex_env):
    topics = Topics(broker.bootstrap)
    store, dead, stats = own_topics(broker, topics)
    acls(broker.bootstrap, documented(topics) + own_topic_grants(store, dead, stats))
    server = bob_with_own_topics(broker, topics, start_server, codex_bin, codex_env, store,
                                 dead, stats)
    server.wait_ready(60)
    produce(broker.bootstrap, topics.input, [{"jsonrpc": "2.0", "id": "init", "method":
                                              "initialize", "params": {"clientInfo": CLIENT_INFO}}])
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    producer.send(topics.input, key=b"faults", value=b"not json")
    producer.flush(30)
    producer.close(10)
    replies = read_replies(broker.bootstrap, topics.output, 1, timeout=60)
    assert "result" in replies[0] and replies[0]["id"] == "init", replies
    assert read_replies_raw(broker.bootstrap, store, 1, 30)  # its session's state, saved
    assert read_replies_raw(broker.bootstrap, dead, 1, 30) == [b"not json"]
    assert read_replies_raw(broker.bootstrap, stats, 1, 30)  # statistics records too
    assert "ACLs do not let" not in server.log and "cannot send statistics" not in server.log
    assert server.stop() == 0, server.log


@pytest.mark.parametrize("missing", ["READ", "DESCRIBE_CONFIGS"])
def test_each_missing_acl_of_the_session_topic_is_named_with_its_grant(
        broker, start_server, codex_bin, codex_env, missing):
    """No Read: exit 3 with the line that grants it.  No DescribeConfigs: the brokers hide
    its cleanup.policy, and the WARNING says which grant shows it."""
    topics = Topics(broker.bootstrap)
    store, dead, stats = own_topics(broker, topics)
    # A saved state to read (an empty topic is read to its end without a fetch).
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    producer.send(store, key=b"earlier", value=b'{"threads": []}').get(30)
    producer.close(10)
    acls(broker.bootstrap, documented(topics) + [
        grant for grant in own_topic_grants(store, dead, stats)
        if grant[0] != missing or grant[2] != store])
    server = bob_with_own_topics(broker, topics, start_server, codex_bin, codex_env, store,
                                 dead, stats)
    if missing == "READ":
        assert server.process.wait(60) == 3, server.log
        assert f"do not let this server read session topic {store}" in server.log
        assert f"--operation Read --operation Write --operation Describe --operation " \
               f"DescribeConfigs --topic {store}" in server.log, server.log
    else:
        server.wait_ready(60)
        assert f"do not report the cleanup.policy of session topic {store}" in server.log
        assert f"User:bob --operation DescribeConfigs --topic {store}" in server.log
        assert server.stop() == 0, server.log


def read_replies_raw(bootstrap: str, topic: str, want: int, timeout: float) -> List[bytes]:
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    values: List[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(values) < want and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                values.extend(record.value for record in records)
    finally:
        consumer.close()
    return values
