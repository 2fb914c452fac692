"""Spring for Apache Kafka's ``ReplyingKafkaTemplate``, the Java request-reply client,
through the server (builtin backend): each request gets its correlated reply on the reply
topic the template names, and on the reply partition when its reply container reads one.

The client is tests/spring/ReplyingClient.java, compiled with javac against spring-kafka,
which Maven fetches once into .spring-kafka/ (git-ignored).  It runs on the suite's broker:
Tansu, and Apache Kafka in scripts/test's Apache Kafka run.
"""

import json
import os
import subprocess
import uuid
from typing import Any, Dict, List, Tuple

import pytest

from harness import ROOT, Topics, local_broker

SPRING_KAFKA = "4.1.2"  # the newest spring-kafka 4.1.x Maven Central serves (pinned)
SPRING = ROOT / ".spring-kafka" / SPRING_KAFKA
SOURCE = ROOT / "tests" / "spring" / "ReplyingClient.java"


@pytest.fixture(scope="session")
def spring_client() -> List[str]:
    """The java command line of the compiled client (fetched and compiled on first use)."""
    libs, classes = SPRING / "libs", SPRING / "classes"
    if not (libs / ".complete").exists():
        fetched = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(ROOT / "tests" / "spring" / "pom.xml"),
             f"-Dspring-kafka.version={SPRING_KAFKA}", "dependency:copy-dependencies",
             f"-DoutputDirectory={libs}", "-Dmdep.includeScope=runtime"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
        assert fetched.returncode == 0, fetched.stdout.decode(errors="replace")[-3000:]
        (libs / ".complete").touch()
    compiled = classes / "ReplyingClient.class"
    if not compiled.exists() or compiled.stat().st_mtime < SOURCE.stat().st_mtime:
        classes.mkdir(parents=True, exist_ok=True)
        built = subprocess.run(["javac", "-cp", f"{libs}/*", "-d", str(classes), str(SOURCE)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        assert built.returncode == 0, built.stdout.decode(errors="replace")
    return ["java", "-Xmx256m", "-cp", f"{libs}/*{os.pathsep}{classes}", "ReplyingClient"]


def ask(client: List[str], topics: Topics, reply_topic: str, requests: List[Dict[str, Any]],
        *partition: str) -> List[Tuple[int, Dict[str, Any]]]:
    """Each request through the template; (partition, reply) per request, in order."""
    process = subprocess.Popen(
        client + [topics.bootstrap, topics.input, reply_topic, "spring-session", *partition],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = process.communicate("".join(json.dumps(request) + "\n"
                                             for request in requests).encode(), timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    lines = out.decode(errors="replace").splitlines()
    assert process.returncode == 0 and lines[:1] == ["READY"], lines[-40:]
    answers = []
    for line in lines[1:]:
        where, _, value = line.partition(" ")
        assert where != "ERROR", lines
        answers.append((int(where), json.loads(value)))
    return answers


REQUESTS = [{"jsonrpc": "2.0", "id": 1, "method": "noop", "params": {}},
            {"jsonrpc": "2.0", "id": "two", "method": "echo", "params": {"say": "spring"}},
            {"jsonrpc": "2.0", "id": 3, "method": "no/such/method", "params": {}}]


def check(answers: List[Tuple[int, Dict[str, Any]]], partition: int) -> None:
    assert [reply["id"] for _, reply in answers] == [1, "two", 3], answers
    assert answers[0][1]["result"] == {} and answers[1][1]["result"] == {"say": "spring"}
    assert answers[2][1]["error"]["code"] == -32601
    assert {where for where, _ in answers} == {partition}, answers


def test_replying_kafka_template_gets_each_reply_on_its_reply_topic(broker, start_server,
                                                                     spring_client):
    topics = Topics(broker.bootstrap)
    replies = f"spring-{uuid.uuid4().hex[:8]}.replies"
    local_broker.create_topics(broker.bootstrap, [replies])
    server = start_server(["--backend", "builtin"] + topics.server_args()).wait_ready()
    check(ask(spring_client, topics, replies, REQUESTS), 0)
    assert server.stop() == 0, server.log


def test_replying_kafka_template_gets_each_reply_on_its_reply_partition(broker, start_server,
                                                                         spring_client):
    topics = Topics(broker.bootstrap)
    replies = f"spring-{uuid.uuid4().hex[:8]}.replies"
    local_broker.create_topics(broker.bootstrap, [replies], partitions=3)
    server = start_server(["--backend", "builtin"] + topics.server_args()).wait_ready()
    check(ask(spring_client, topics, replies, REQUESTS, "2"), 2)
    assert server.stop() == 0, server.log
