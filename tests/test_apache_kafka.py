"""Issue 21, first part: the reference's own smoke test (section 5) with Kafka's own tools,
on Apache Kafka itself: kafka-console-producer publishes the request, the reply is read
back, and kafka-consumer-groups shows the server's group caught up (section 4, item 5).
Collected only with TEST_BROKER=apache-kafka (scripts/test runs it so); the tools come from
the same Maven-fetched jars as the broker."""

import json
import os
import subprocess
import time
from typing import Any, List, Tuple

import pytest

from harness import KafkaClient, Topics, local_broker

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


def sasl_server(broker, topics, start_server, how: str, mechanism: str, password: str,
                tmp_path: Any = None, user: str = local_broker.SASL_USER, *extra: str) -> Any:
    """The server on the broker's SASL listener, its login given ``how``: by -X, a
    properties file, or the reference's environment variables."""
    args = topics.server_args(*BUILTIN, *extra)
    args[args.index("--kafka-bootstrap-servers") + 1] = broker.sasl_bootstrap
    settings = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": mechanism,
                "sasl.username": user, "sasl.password": password}
    env = dict(os.environ)
    if how == "-X":
        for key, value in settings.items():
            args += ["-X", f"{key}={value}"]
    elif how == "properties file":
        path = tmp_path / "client.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        args += ["--kafka-config", str(path)]
    else:  # the reference's environment variables; the protocol is inferred
        env.update(KAFKA_SASL_MECHANISM=mechanism, KAFKA_SASL_USERNAME=user,
                   KAFKA_SASL_PASSWORD=password)
    return start_server(args, env=env)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("how", ["-X", "properties file", "environment"])
def test_a_sasl_login_succeeds_and_its_password_is_never_shown(broker, topics, start_server,
                                                               tmp_path, mechanism, how):
    server = sasl_server(broker, topics, start_server, how, mechanism,
                         local_broker.SASL_PASSWORD, tmp_path).wait_ready()
    assert_answered(topics, "sasl")
    assert server.stop() == 0
    assert local_broker.SASL_PASSWORD not in server.log and "sasl.password=***" in server.log


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_a_wrong_sasl_password_is_exit_3_naming_the_cause(broker, topics, start_server,
                                                          tmp_path, mechanism):
    wrong = "not-" + local_broker.SASL_PASSWORD
    server = sasl_server(broker, topics, start_server, "-X", mechanism, wrong, tmp_path)
    assert server.process.wait(60) == 3, server.log
    assert f"SASL {mechanism} login as 'alice' failed" in server.log, server.log
    assert wrong not in server.log and local_broker.SASL_PASSWORD not in server.log


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
    assert f"--allow-principal User:bob --operation Read" in server.log
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
