"""Shared fixtures: a real Tansu broker per session, fresh topics per test, the
server as a real subprocess, a kafka-python client on the two topics, and Codex with the
mock model.  What they are built of is in harness.py.

Nothing here skips: a missing broker or Codex is an error, so CI cannot pass
without running every test.
"""

import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

import harness
from harness import ROOT, SERVER  # noqa: F401 (tests/test_units.py imports them from here)
from harness import KafkaClient, ServerProcess, Topics
from mock_responses import MockResponsesServer

TEST_TIMEOUT = int(os.environ.get("TEST_TIMEOUT", "150"))


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
# their own, to pause or restart them, use Tansu), or an older Apache Kafka with
# TEST_BROKER=apache-kafka-VERSION (before 3.3: with ZooKeeper, PLAINTEXT only).
TEST_BROKER = os.environ.get("TEST_BROKER", "tansu")
# Tests only Apache Kafka can run (Tansu cannot describe groups): not collected on Tansu.
collect_ignore = ["test_apache_kafka.py"] if TEST_BROKER != "apache-kafka" else []


@pytest.fixture(scope="session")
def broker():
    try:
        started = harness.start_broker(TEST_BROKER)
    except ValueError as exc:
        pytest.fail(f"TEST_BROKER: {exc}", pytrace=False)
    yield started
    harness.stop_broker(started)


@pytest.fixture
def topics(broker) -> Topics:
    return Topics(broker.bootstrap)


# --- the server as a subprocess -----------------------------------------------

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


@pytest.fixture
def client(topics) -> KafkaClient:
    kafka_client = KafkaClient(topics)
    yield kafka_client
    kafka_client.close()


# --- Codex with the mock model ----------------------------------------------------

@pytest.fixture(scope="session")
def codex_bin() -> str:
    codex, version = harness.CODEX_BIN, harness.CODEX_VERSION
    install = f"run `npm install @openai/codex@{version}` in " \
              f"{codex.parents[6]} (scripts/test does)"
    if not codex.is_file() or not os.access(str(codex), os.X_OK):
        pytest.fail(f"Codex binary not found at {codex}: {install}", pytrace=False)
    try:
        found = subprocess.run([str(codex), "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot run {codex} --version ({exc}): {install}", pytrace=False)
    if found.returncode != 0:
        pytest.fail(f"{codex} --version failed: {found.stderr!r}: {install}", pytrace=False)
    if version not in found.stdout.decode(errors="replace"):
        pytest.fail(f"{codex} is {found.stdout!r}, not {version}: {install}", pytrace=False)
    return str(codex)


@pytest.fixture
def mock_model() -> Iterator[MockResponsesServer]:
    with MockResponsesServer() as mock:
        yield mock


@pytest.fixture
def codex_home(mock_model: MockResponsesServer) -> Iterator[Path]:
    home = harness.make_codex_home(harness.HOMES, mock_model.base_url)
    yield home
    harness.remove_codex_home(home)


@pytest.fixture
def codex_env(codex_home: Path) -> Dict[str, str]:
    return harness.codex_env(codex_home)


@pytest.fixture
def codex_server(start_server, codex_bin, codex_env) -> Iterator[Callable[..., ServerProcess]]:
    """Start the server with the Codex backend (over Kafka when given ``topics``).

    Afterwards: SIGTERM (a graceful stop closes Codex's stdin), then SIGKILL by
    PID any Codex child the server logged that is still alive.
    """
    started: List[ServerProcess] = []

    def start(topics: Optional[Topics] = None, *extra: str, **kwargs: Any) -> ServerProcess:
        args = harness.codex_args(codex_bin) + (topics.server_args(*extra) if topics
                                                else list(extra))
        server = start_server(args, env=codex_env, **kwargs)
        started.append(server)
        return server.wait_ready() if topics else server

    yield start
    for server in started:
        try:
            server.stop()
        except AssertionError:
            pass  # start_server's teardown kills it
        for pid in harness.logged_codex_pids(server):
            harness.kill_if(pid, codex_bin)
