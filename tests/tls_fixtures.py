"""TLS and SASL brokers for the tests: stdlib only, usable from pytest or a script.

* ``make_pki(dir)``: with the openssl CLI, a test CA, a server certificate for
  127.0.0.1/localhost, a client certificate (plain key and the same key
  encrypted with ``KEY_PASSWORD``), and an unrelated second CA (with its own
  client certificate) for the "untrusted" cases.
* ``start_stunnel(...)``: stunnel in the foreground terminating TLS on one port
  and forwarding plaintext to another.  Tansu cannot take ``--cert`` and
  ``--key`` together, so TLS is put in front of it this way.
* ``tls_broker(workdir)``: Tansu on a raw port P advertising the stunnel port S,
  plus stunnel S -> P; yields a ``TlsBroker`` (``bootstrap`` = "127.0.0.1:S").
* ``sasl_broker(workdir)``: Tansu with ``--authentication``.  Tansu offers SCRAM
  only and has no way to store users, so every login fails ("unknown-user"):
  it is a broker on which SASL authentication *always fails*.

Every process started here is stopped by its PID; every wait is bounded.
A missing ``openssl`` or ``stunnel`` raises RuntimeError (an error, not a skip).
"""

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Union

from harness import local_broker

ROOT = Path(__file__).resolve().parent.parent
KEY_PASSWORD = "key-s3cret-pw"
HOST = "127.0.0.1"

PathLike = Union[str, "os.PathLike[str]"]

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


# --- tools -----------------------------------------------------------------------

def _binary(*names: str, package: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(f"{names[0]} is not installed (needed by the TLS tests): "
                       f"apt-get install {package}")


def stunnel_binary() -> str:
    """The stunnel executable, or RuntimeError telling how to install it."""
    return _binary("stunnel", "stunnel4", package="stunnel4")


def _openssl(*args: str, cwd: Path, env: Optional[Mapping[str, str]] = None) -> None:
    command = [_binary("openssl", package="openssl"), *args]
    result = subprocess.run(command, cwd=str(cwd), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, **(env or {})))
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({result.returncode}): "
                           f"{result.stderr.strip()}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: Optional[subprocess.Popen] = None,
                  what: str = "process") -> None:
    """Until 127.0.0.1:port accepts a TCP connection; RuntimeError on exit or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before "
                               f"listening on port {port}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"{what} did not accept connections on port {port} within {timeout} s")


def stop_pid(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    """``sig`` to the process by its PID, then SIGKILL if it outlives ``timeout``."""
    if process.poll() is None:
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout)


# --- certificates -------------------------------------------------------------------

class Pki:
    """Paths (as str) of everything ``make_pki`` wrote."""

    def __init__(self, directory: Path):
        d = directory
        self.dir = str(d)
        self.ca_cert = str(d / "ca.pem")
        self.ca_key = str(d / "ca.key")
        self.server_cert = str(d / "server.pem")      # SAN IP:127.0.0.1, DNS:localhost
        self.server_key = str(d / "server.key")
        self.client_cert = str(d / "client.pem")      # signed by ca_cert
        self.client_key = str(d / "client.key")       # unencrypted
        self.client_key_encrypted = str(d / "client-encrypted.key")  # KEY_PASSWORD
        self.key_password = KEY_PASSWORD
        self.other_ca_cert = str(d / "other-ca.pem")  # unrelated CA: trusts nothing here
        self.other_ca_key = str(d / "other-ca.key")
        self.other_client_cert = str(d / "other-client.pem")  # signed by other_ca_cert
        self.other_client_key = str(d / "other-client.key")

    def as_dict(self) -> Dict[str, str]:
        return dict(vars(self))

    def __repr__(self) -> str:
        return f"Pki({self.dir!r})"


def _new_key_and_csr(d: Path, name: str, cn: str) -> None:
    _openssl("req", "-new", "-config", "openssl.cnf", "-newkey", "ec",
             "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)


def _sign(d: Path, name: str, ca: str, extensions: str) -> None:
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", str(random.SystemRandom().getrandbits(63)), "-days", "3650",
             "-sha256", "-extfile", "openssl.cnf", "-extensions", extensions,
             "-out", f"{name}.pem", cwd=d)
    (d / f"{name}.csr").unlink()


def _new_ca(d: Path, name: str, cn: str) -> None:
    _openssl("req", "-x509", "-new", "-config", "openssl.cnf", "-extensions", "ca_ext",
             "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "3650", "-sha256",
             "-subj", f"/CN={cn}", cwd=d)


def make_pki(directory: PathLike) -> Pki:
    """Write a test PKI into ``directory`` (created if missing) and return its paths.

    EC P-256 keys, so the whole set takes a fraction of a second.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "openssl.cnf").write_text(_OPENSSL_CONFIG)
    _new_ca(d, "ca", "codex-app-server test CA")
    _new_key_and_csr(d, "server", "localhost")
    _sign(d, "server", "ca", "server_ext")
    _new_key_and_csr(d, "client", "codex-app-server test client")
    _sign(d, "client", "ca", "client_ext")
    # The password goes through the environment, not argv.
    _openssl("pkey", "-in", "client.key", "-out", "client-encrypted.key", "-aes256",
             "-passout", "env:TLS_FIXTURES_KEY_PASSWORD", cwd=d,
             env={"TLS_FIXTURES_KEY_PASSWORD": KEY_PASSWORD})
    _new_ca(d, "other-ca", "unrelated test CA")
    _new_key_and_csr(d, "other-client", "client of the unrelated CA")
    _sign(d, "other-client", "other-ca", "client_ext")
    return Pki(d)


# --- stunnel --------------------------------------------------------------------------

class _LoggedProcess:
    """A child process whose output goes to ``log_path``."""

    log_path: Path

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Stunnel(_LoggedProcess):
    """A running stunnel: TLS on ``accept_port`` -> plaintext to ``connect_port``."""

    def __init__(self, process: subprocess.Popen, accept_port: int, connect_port: int,
                 config_path: Path, log_path: Path):
        self.process = process
        self.pid = process.pid
        self.accept_port = accept_port
        self.connect_port = connect_port
        self.config_path = config_path
        self.log_path = log_path


    def stop(self) -> None:
        stop_pid(self.process, signal.SIGTERM)


def stunnel_config(accept_port: int, connect_port: int, cert: str, key: str,
                   ca: Optional[str] = None, verify: int = 0, log_path: str = "stunnel.log",
                   debug: int = 4, extra: Optional[Mapping[str, str]] = None) -> str:
    """The stunnel.conf text ``start_stunnel`` uses (see its docstring)."""
    lines = ["foreground = yes", "pid =", "syslog = no", f"debug = {debug}",
             f"output = {log_path}", "", "[kafka]", f"accept = {HOST}:{accept_port}",
             f"connect = {HOST}:{connect_port}", f"cert = {cert}", f"key = {key}"]
    if ca:
        lines.append(f"CAfile = {ca}")
    if verify:
        lines.append(f"verify = {verify}")
    for name, value in (extra or {}).items():
        lines.append(f"{name} = {value}")
    return "\n".join(lines) + "\n"


def start_stunnel(accept_port: int, connect_port: int, cert: PathLike, key: PathLike,
                  ca: Optional[PathLike] = None, verify: int = 0,
                  workdir: PathLike = ".", debug: int = 4,
                  extra: Optional[Mapping[str, str]] = None,
                  timeout: float = 10.0) -> Stunnel:
    """Run stunnel in the foreground (a child of ours) and wait until it listens.

    ``verify``: 0 asks no client certificate; 2 requires one signed by ``ca``
    (the server side of mutual TLS).  ``debug`` 4 = warnings; 7 shows every
    handshake.  ``extra``: more service options, e.g. ``{"sslVersionMax":
    "TLSv1.2"}``.  Its log (and anything it prints) goes to
    ``workdir/stunnel-<accept_port>.log``.
    """
    binary = stunnel_binary()
    if verify and not ca:
        raise ValueError("stunnel verify needs a CA file")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / f"stunnel-{accept_port}.log"
    config_path = work / f"stunnel-{accept_port}.conf"
    config_path.write_text(stunnel_config(accept_port, connect_port, os.path.abspath(cert),
                                          os.path.abspath(key),
                                          os.path.abspath(ca) if ca else None,
                                          verify, str(log_path.resolve()), debug, extra))
    with open(log_path, "ab") as output:
        process = subprocess.Popen([binary, str(config_path)], stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=output, cwd=str(work))
    stunnel = Stunnel(process, accept_port, connect_port, config_path, log_path)
    try:
        wait_for_port(accept_port, timeout, process, "stunnel")
    except RuntimeError as exc:
        stunnel.stop()
        raise RuntimeError(f"{exc}; its log:\n{stunnel.log}") from None
    return stunnel


# --- Tansu ------------------------------------------------------------------------------

class Tansu(_LoggedProcess):
    def __init__(self, process: subprocess.Popen, port: int, advertised_port: int,
                 log_path: Path):
        self.process = process
        self.pid = process.pid
        self.port = port
        self.advertised_port = advertised_port
        self.bootstrap = f"{HOST}:{port}"
        self.log_path = log_path


    def stop(self) -> None:
        local_broker.stop_process(self.pid)  # SIGINT, then SIGKILL
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass


def start_tansu(workdir: PathLike, port: int = 0, advertised_port: Optional[int] = None,
                authentication: bool = False, timeout: float = 10.0) -> Tansu:
    """Tansu (memory storage) on 127.0.0.1:port, its output in ``workdir/tansu-<port>.log``."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    advertised = advertised_port or port
    log_path = work / f"tansu-{port}.log"
    with open(log_path, "ab") as output:
        if not authentication:
            broker = local_broker.start_broker(port, advertised_port=advertised, log=output,
                                                 timeout=timeout)
            return Tansu(broker.process, port, advertised, log_path)
        process = subprocess.Popen(
            [local_broker.broker_binary(), "broker", "--listener-url", f"tcp://{HOST}:{port}",
             "--advertised-listener-url", f"tcp://{HOST}:{advertised}", "--authentication"],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output)
    tansu = Tansu(process, port, advertised, log_path)
    try:
        wait_for_port(port, timeout, process, "tansu")
    except RuntimeError:
        tansu.stop()
        raise
    return tansu


class TlsBroker:
    """What ``tls_broker`` yields."""

    def __init__(self, tansu: Tansu, stunnel: Stunnel, pki: Pki):
        self.tansu = tansu
        self.stunnel = stunnel
        self.pki = pki
        self.port = stunnel.accept_port          # TLS
        self.bootstrap = f"{HOST}:{self.port}"
        self.raw_port = tansu.port               # plaintext, straight to Tansu
        self.raw_bootstrap = tansu.bootstrap

    def client_settings(self, **more: Any) -> Dict[str, Any]:
        """kafka-python keyword arguments for a client trusting this broker's CA."""
        return dict(bootstrap_servers=self.bootstrap, security_protocol="SSL",
                    ssl_cafile=self.pki.ca_cert, **more)


@contextlib.contextmanager
def tls_broker(workdir: PathLike, verify: int = 0, pki: Optional[Pki] = None,
               authentication: bool = False,
               stunnel_extra: Optional[Mapping[str, str]] = None) -> Iterator[TlsBroker]:
    """Tansu on a raw port P advertising S, stunnel TLS S -> P; stops both on exit.

    ``verify=2`` makes stunnel demand a client certificate signed by the CA
    (mutual TLS).  ``pki`` reuses certificates (else ``make_pki(workdir/pki)``).
    ``authentication=True`` starts Tansu with ``--authentication`` (SASL_SSL,
    every login failing).
    """
    stunnel_binary()  # fail loudly before making or starting anything
    work = Path(workdir)
    pki = pki or make_pki(work / "pki")
    tls_port = free_port()
    tansu = start_tansu(work, advertised_port=tls_port, authentication=authentication)
    try:
        stunnel = start_stunnel(tls_port, tansu.port, pki.server_cert, pki.server_key,
                                ca=pki.ca_cert, verify=verify, workdir=work, extra=stunnel_extra)
    except BaseException:
        tansu.stop()
        raise
    try:
        yield TlsBroker(tansu, stunnel, pki)
    finally:
        stunnel.stop()
        tansu.stop()


@contextlib.contextmanager
def sasl_broker(workdir: Optional[PathLike] = None) -> Iterator[Tansu]:
    """Tansu with ``--authentication`` on a free port: every SASL login fails.

    Tansu offers SCRAM-SHA-256/512 only: a SCRAM login gets the server-final
    message ``e=unknown-user`` (with error code 0); a PLAIN SaslHandshake makes
    it close the connection; a client without SASL is disconnected at its
    first request after ApiVersions.  Its log goes to ``workdir`` (default: a
    new temporary directory).
    """
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="sasl-broker-")
    tansu = start_tansu(workdir, authentication=True)
    try:
        yield tansu
    finally:
        tansu.stop()
