"""The harness of the tests and of scripts/bench: the server (or any program) as a child
process, the broker and its topics, a Kafka and a stdio client, the Codex configuration (the
mock model of mock_responses.py, nothing online), and the /proc readers both use.

A plain module: the tests import it by name (pytest puts tests/ on sys.path), scripts/bench
from tests/; pytest's fixtures stay in conftest.py.  Nothing here imports kafka-python at
import time, so the same module serves both venvs of scripts/test.
"""

import fcntl
import importlib.machinery
import importlib.util
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the two modules, also when not pip-installed
SERVER = str(ROOT / "codex_app_server.py")
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


# --- broker and topics ---------------------------------------------------------

def start_broker(kind: str = "tansu") -> Any:
    """A broker of its own on a free port of 127.0.0.1: Tansu, or Apache Kafka itself (its
    TLS listeners too, and a log cleaner that looks for work twice a second)."""
    if kind == "apache-kafka":
        return local_broker.start_apache_kafka(0, tls=True,
                                               settings={"log.cleaner.backoff.ms": "500"})
    if kind.startswith("apache-kafka-") and local_broker.zookeeper_mode(kind.split("-")[-1]):
        return local_broker.start_old_apache_kafka(kind.split("-")[-1])
    if kind != "tansu":
        raise ValueError(f"broker {kind!r}: tansu, apache-kafka, or apache-kafka-VERSION "
                         "for one before 3.3 (e.g. apache-kafka-2.8.2)")
    return local_broker.start_broker(0)


stop_broker = local_broker.stop_broker


class Topics:
    """Fresh input and output topics (``partitions`` each) and a fresh group name."""

    def __init__(self, bootstrap: str, create: bool = True, partitions: int = 1,
                 **client_settings: Any):
        self.bootstrap = bootstrap
        self.client_settings = client_settings
        self.partitions = partitions
        base = "t" + uuid.uuid4().hex[:10]
        self.input = base + ".in"
        self.output = base + ".out"
        self.group = base + ".group"
        if create:
            self.create()

    def create(self) -> None:
        local_broker.create_topics(self.bootstrap, [self.input, self.output],
                                   partitions=self.partitions, **self.client_settings)

    def server_args(self, *extra: str, group: Optional[str] = None,
                    tuning: Sequence[str] = TANSU_TUNING) -> List[str]:
        return ["--kafka-bootstrap-servers", self.bootstrap, "--kafka-input-topic", self.input,
                "--kafka-output-topic", self.output, "--kafka-group-id", group or self.group,
                *tuning, *extra]


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


# --- a child process -------------------------------------------------------------

class ServerProcess:
    """``args`` run by ``program`` (codex_app_server.py unless told; () when ``args`` is a
    whole command line) as a child; its stderr goes to a file that can be read meanwhile."""

    def __init__(self, args: List[str], log_path: Path, env: Optional[Dict[str, str]] = None,
                 stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.PIPE,
                 cwd: Path = ROOT, program: Sequence[str] = (sys.executable, SERVER),
                 **popen: Any):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen([*program, *args], stdin=stdin, stdout=stdout,
                                        stderr=self._log, env=env, cwd=str(cwd), **popen)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0, count: int = 1,
                     poll: float = 0.02) -> float:
        """The time.perf_counter() at which the log was seen to hold ``text`` ``count`` times
        (looked at every ``poll`` s: the bench times start-ups by it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.count(text) >= count:
                return time.perf_counter()
            if self.process.poll() is not None:
                raise AssertionError(f"server exited ({self.process.returncode}) before "
                                     f"logging {text!r}:\n{self.log}")
            time.sleep(poll)
        raise AssertionError(f"server did not log {text!r} within {timeout} s:\n{self.log}")

    def wait_ready(self, timeout: float = 30.0) -> "ServerProcess":
        self.wait_for_log("kafka transport ready", timeout)
        return self

    def stop(self, sig: Optional[int] = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (None: close its stdin, a stdio server's end of input) and wait;
        after ``timeout`` SIGKILL, and AssertionError."""
        if self.process.poll() is None:
            try:
                if sig is not None:
                    self.process.send_signal(sig)
                elif self.process.stdin is not None:
                    self.process.stdin.close()
            except OSError:
                pass  # (a pipe whose reader just died)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"server did not stop within {timeout} s:\n{self.log}")
        self._log.close()
        return self.process.returncode


# --- processes by PID (/proc) ------------------------------------------------------

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


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (OSError once it is gone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # (fields 14 and 15 of stat)


def status_kb(pid: int, field: str) -> Optional[int]:
    """A kB field of /proc/PID/status (VmRSS, VmHWM); None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb(pid: int) -> float:
    kb = status_kb(pid, "VmHWM")
    if kb is None:
        raise AssertionError(f"no VmHWM of pid {pid}")
    return kb / 1024


# --- clients -----------------------------------------------------------------------

Reply = Tuple[Optional[str], Any]  # (key, decoded value)


class KafkaClient:
    """Produces to the input topic as one session (the record key; None: the default
    session); reads that session's records of the output topic from its start."""

    producer_settings: Dict[str, Any] = {"acks": "all"}  # a test's send waits for the broker

    def __init__(self, topics: Topics, session: Optional[bytes] = None, partition: Any = 0,
                 topic: Optional[str] = None, every_session: bool = False,
                 fetch_wait_ms: int = 10):
        self.session = session
        self.every_session = every_session  # read the records of every session
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition
        self.topics = topics
        settings = dict(topics.client_settings, bootstrap_servers=topics.bootstrap)
        self.producer = KafkaProducer(**self.producer_settings, **settings)
        self.consumer = KafkaConsumer(enable_auto_commit=False, fetch_max_wait_ms=fetch_wait_ms,
                                      **settings)
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

    def records(self, timeout_ms: int = 50) -> Iterator[Tuple[Any, Any]]:
        """The new records of this session (or of every session), each with its value."""
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                if not self.every_session and \
                        dict(record.headers or []).get("codex-session") != self.session:
                    continue  # another session's
                yield record, json.loads(record.value)

    def poll(self) -> List[Reply]:
        new = []
        for record, value in self.records():
            key = record.key.decode() if record.key is not None else None
            new.append((key, value))
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


WAIT = 30.0  # seconds any single expected message from Codex may take


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
            self.received(line)
        self.received(None)

    def received(self, line: Optional[bytes]) -> None:
        """One stdout line, in the reader thread (None: stdout closed)."""
        self.lines.put(line)

    def send(self, message: Dict[str, Any]) -> None:
        self.write(json.dumps(message).encode() + b"\n")

    def write(self, data: bytes) -> None:
        self.server.process.stdin.write(data)
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


# --- Codex: where it is, its home, its configuration ---------------------------------

PINNED_CODEX = "0.169.0"  # what the whole suite runs against (scripts/test installs it)
NEWEST_CODEX = "0.171.0"  # scripts/test runs test_codex.py and test_protocol.py against it too
CODEX_VERSION = os.environ.get("TEST_CODEX_VERSION", PINNED_CODEX)


def codex_binary(version: str) -> Path:
    """Where scripts/test installs Codex ``version`` (npm; node_modules is git-ignored)."""
    prefix = ROOT if version == PINNED_CODEX else ROOT / ".codex-versions" / version
    return prefix / "node_modules" / "@openai" / "codex-linux-x64" / "vendor" / \
        "x86_64-unknown-linux-musl" / "bin" / "codex"


CODEX_BIN = codex_binary(CODEX_VERSION)
HOMES = ROOT / ".test-homes"  # CODEX_HOME dirs; outside /tmp on purpose, git-ignored

# The mock model of mock_responses.py, nothing online.
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


def make_codex_home(parent: Path, model_url: str) -> Path:
    """A fresh CODEX_HOME under ``parent`` (not under /tmp: Codex refuses to set up its
    helper binaries in a temporary directory), configured for the mock model at
    ``model_url``."""
    home = parent / uuid.uuid4().hex
    home.mkdir(parents=True)
    (home / "config.toml").write_text(CONFIG_TOML.format(base_url=model_url))
    return home


def remove_codex_home(home: Path) -> None:
    for _ in range(5):  # a Codex that just exited may still be removing its sqlite files
        shutil.rmtree(home, ignore_errors=True)
        if not home.exists():
            break
        time.sleep(0.1)
    try:
        home.parent.rmdir()  # only when no other home is left
    except OSError:
        pass


def codex_env(home: Path) -> Dict[str, str]:
    """This environment for a Codex whose home is ``home``: no key of a real account."""
    env = dict(os.environ)
    for name in ("OPENAI_API_KEY", "CODEX_API_KEY", "CODEX_APP_SERVER_COMMAND"):
        env.pop(name, None)
    env["CODEX_HOME"] = str(home)
    env["NO_COLOR"] = "1"
    return env


def codex_argv(codex_bin: str) -> List[str]:
    return [codex_bin, "app-server", "--strict-config"]


def codex_args(codex_bin: str) -> List[str]:
    """The server's arguments for the Codex backend."""
    return ["--backend", "codex", "--codex-command", " ".join(codex_argv(codex_bin))]


def logged_codex_pids(server: ServerProcess) -> List[int]:
    pids = []
    for line in server.log.splitlines():
        if "started codex app-server (pid " in line:
            pids.append(int(line.split("(pid ", 1)[1].split(")")[0]))
    return pids


# --- a Codex session over Kafka --------------------------------------------------------

CLIENT_INFO = {"name": "pytest", "version": "0.0.1"}


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


def comparable(error: Dict[str, Any], thread: str) -> str:
    return json.dumps(error).replace(thread, "THREAD")


def assert_refused_like_a_missing_thread(mallory: KafkaClient, thread: str) -> None:
    """Every request naming ``thread`` gets what a thread that does not exist gets."""
    missing = str(uuid.uuid4())
    calls = [("thread/read", {"includeTurns": True}), ("thread/resume", {}), ("thread/fork", {}),
             ("thread/name/set", {"name": "mine now"}), ("thread/archive", {}),
             ("thread/unarchive", {}), ("turn/start", {"input": text_input("hi")}),
             ("thread/turns/list", {}), ("review/start", {"target": {"type": "uncommittedChanges"}})]
    for n, (method, params) in enumerate(calls):
        errors = []
        for m, target in enumerate((thread, missing)):
            msg_id = f"{method}-{n}-{m}"
            mallory.send({"id": msg_id, "method": method, "params": dict(params,
                                                                         threadId=target)})
            _, reply = mallory.reply(msg_id, WAIT)
            assert "error" in reply, (method, reply)
            errors.append(comparable(reply["error"], target))
        assert errors[0] == errors[1], (method, errors)
