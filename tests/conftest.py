"""Shared fixtures: a real Tansu broker per session, fresh topics per test, the
server as a real subprocess, and a kafka-python client on the two topics.

Nothing here skips: a missing broker or Codex is an error, so CI cannot pass
without running every test.
"""

import importlib.machinery
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the two modules, also when not pip-installed
SERVER = str(ROOT / "codex_app_server.py")
TEST_TIMEOUT = int(os.environ.get("TEST_TIMEOUT", "150"))
# Tansu holds a group join for half the session timeout: tune it down (tests only).
TANSU_TUNING = ["-X", "session.timeout.ms=2000", "-X", "heartbeat.interval.ms=500",
                "-X", "fetch.wait.max.ms=10"]


def load_script(name: str) -> Any:
    """Import an extension-less script from scripts/ as a module."""
    path = str(ROOT / "scripts" / name)
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


local_broker = load_script("local-broker")


# --- every test bounded in time; no skips --------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    def expire(signum, frame):
        raise TimeoutError(f"test exceeded {TEST_TIMEOUT} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == 0:
        reporter.write_line(f"FAILED: {len(skipped)} tests were skipped; this project allows none",
                            red=True)
        session.exitstatus = 1


# --- broker and topics ---------------------------------------------------------

# The broker of the integration tests: Tansu (default), or Apache Kafka itself with
# TEST_BROKER=apache-kafka (scripts/test runs a subset on it; tests that start brokers of
# their own, to pause or restart them, use Tansu).
TEST_BROKER = os.environ.get("TEST_BROKER", "tansu")
# Tests only Apache Kafka can run (Tansu cannot describe groups): not collected on Tansu.
collect_ignore = ["test_apache_kafka.py"] if TEST_BROKER != "apache-kafka" else []


@pytest.fixture(scope="session")
def broker():
    if TEST_BROKER not in ("tansu", "apache-kafka"):
        pytest.fail(f"TEST_BROKER={TEST_BROKER!r}: tansu or apache-kafka", pytrace=False)
    started = local_broker.start_apache_kafka(0) if TEST_BROKER == "apache-kafka" \
        else local_broker.start_broker(0)
    yield started
    local_broker.stop_broker(started)


class Topics:
    def __init__(self, bootstrap: str, create: bool = True, **client_settings: Any):
        self.bootstrap = bootstrap
        self.client_settings = client_settings
        base = "t" + uuid.uuid4().hex[:10]
        self.input = base + ".in"
        self.output = base + ".out"
        self.group = base + ".group"
        if create:
            self.create()

    def create(self) -> None:
        local_broker.create_topics(self.bootstrap, [self.input, self.output],
                                   **self.client_settings)

    def server_args(self, *extra: str, group: Optional[str] = None) -> List[str]:
        return ["--kafka-bootstrap-servers", self.bootstrap, "--kafka-input-topic", self.input,
                "--kafka-output-topic", self.output, "--kafka-group-id", group or self.group,
                *TANSU_TUNING, *extra]


@pytest.fixture
def topics(broker) -> Topics:
    return Topics(broker.bootstrap)


# --- the server as a subprocess -----------------------------------------------

class ServerProcess:
    """codex_app_server.py as a child; stderr goes to a file the test can read."""

    def __init__(self, args: List[str], log_path: Path, env: Optional[Dict[str, str]] = None,
                 stdin: Any = subprocess.DEVNULL, preexec_fn: Any = None):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, SERVER, *args], stdin=stdin,
                                        stdout=subprocess.PIPE, stderr=self._log,
                                        env=env, cwd=str(ROOT), preexec_fn=preexec_fn)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.count(text) >= count:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"server exited ({self.process.returncode}) before "
                                     f"logging {text!r}:\n{self.log}")
            time.sleep(0.02)
        raise AssertionError(f"server did not log {text!r} within {timeout} s:\n{self.log}")

    def wait_ready(self, timeout: float = 30.0) -> "ServerProcess":
        self.wait_for_log("kafka transport ready", timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"server did not stop within {timeout} s:\n{self.log}")
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_server(tmp_path) -> Callable[..., ServerProcess]:
    started: List[ServerProcess] = []

    def start(args: List[str], **kwargs: Any) -> ServerProcess:
        server = ServerProcess(args, tmp_path / f"server-{len(started)}.log", **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 20.0,
               partition: int = 0) -> List[Any]:
    """The records of one partition from its start, once ``count`` are there (or at
    ``timeout``, with what there is)."""
    return read_partitions(bootstrap, topic, [partition], count, timeout)[partition]


def read_partitions(bootstrap: str, topic: str, partitions: List[int], count: int,
                    timeout: float = 20.0) -> Dict[int, List[Any]]:
    """{partition: its records from the start}, once ``count`` are there in all."""
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    consumer.assign([TopicPartition(topic, partition) for partition in partitions])
    consumer.seek_to_beginning()
    found: Dict[int, List[Any]] = {partition: [] for partition in partitions}
    deadline = time.monotonic() + timeout
    while sum(map(len, found.values())) < count and time.monotonic() < deadline:
        for tp, batch in consumer.poll(timeout_ms=200).items():
            found[tp.partition].extend(batch)
    consumer.close()
    return found


# --- a Kafka client on the server's topics -------------------------------------

Reply = Tuple[Optional[str], Any]  # (key, decoded value)


class KafkaClient:
    """Produces to the input topic as one session (the record key; None: the default
    session); reads that session's records of the output topic from its start."""

    def __init__(self, topics: Topics, session: Optional[bytes] = None, partition: Any = 0,
                 topic: Optional[str] = None, every_session: bool = False):
        self.session = session
        self.every_session = every_session  # read the records of every session
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition
        self.topics = topics
        settings = dict(topics.client_settings, bootstrap_servers=topics.bootstrap)
        self.producer = KafkaProducer(acks="all", **settings)
        self.consumer = KafkaConsumer(enable_auto_commit=False, fetch_max_wait_ms=10, **settings)
        # (a list: those partitions, as with a topic that several servers write to)
        self.consumer.assign([TopicPartition(topic or topics.output, number) for number in
                              (partition if isinstance(partition, list) else [partition])])
        self.consumer.seek_to_beginning()
        self.seen: List[Reply] = []
        self.headers: List[List[Tuple[str, bytes]]] = []  # of each record in seen

    def send(self, message: Any, key: Optional[bytes] = None) -> None:
        value = message if isinstance(message, (bytes, type(None))) else \
            json.dumps(message).encode()
        self.producer.send(self.topics.input, value=value, key=key or self.session
                           ).get(timeout=10)

    def poll(self) -> List[Reply]:
        new = []
        for records in self.consumer.poll(timeout_ms=50).values():
            for record in records:
                if dict(record.headers or []).get("codex-session") != self.session \
                        and not self.every_session:
                    continue  # another session's
                key = record.key.decode() if record.key is not None else None
                new.append((key, json.loads(record.value)))
                self.headers.append(list(record.headers or []))
        self.seen.extend(new)
        return new

    def wait_for(self, predicate: Callable[[Optional[str], Any], bool],
                 timeout: float = 20.0) -> Reply:
        """First message (already seen or new) matching predicate(key, value)."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for key, value in self.seen[checked:]:
                if predicate(key, value):
                    return key, value
            checked = len(self.seen)
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching message within {timeout} s; seen: "
                                     f"{self.seen[-20:]}")
            self.poll()

    def reply(self, msg_id: Any, timeout: float = 20.0) -> Reply:
        """The response or error whose id is msg_id."""
        return self.wait_for(lambda key, value: isinstance(value, dict) and "method" not in value
                             and value.get("id") == msg_id, timeout)

    def quiet(self, seconds: float) -> List[Reply]:
        """Everything that arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        new: List[Reply] = []
        while time.monotonic() < deadline:
            new.extend(self.poll())
        return new

    def close(self) -> None:
        self.producer.close()
        self.consumer.close()


@pytest.fixture
def client(topics) -> KafkaClient:
    kafka_client = KafkaClient(topics)
    yield kafka_client
    kafka_client.close()
