"""TLS through stunnel in front of a real broker, and the SASL failure path, for real.

Every test checks the server's stderr for the key password and the SASL password.
"""

import os
import signal
import time

import pytest

from harness import KafkaClient, Topics
from tls_fixtures import KEY_PASSWORD, sasl_broker, tls_broker

BUILTIN = ["--backend", "builtin"]
SASL_PASSWORD = "sasl-s3cret-pw"
NOOP = {"jsonrpc": "2.0", "id": 1, "method": "noop", "params": {}}


def server_env(**variables: str) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KAFKA_")}
    env.update(variables)
    return env


def assert_no_secrets(server) -> None:
    log = server.log
    assert KEY_PASSWORD not in log and SASL_PASSWORD not in log, "a secret reached the log"


def round_trip(broker, start_server, env, *extra, **client_settings) -> object:
    settings = broker.client_settings(**client_settings)
    settings.pop("bootstrap_servers")
    topics = Topics(broker.bootstrap, **settings)
    server = start_server(topics.server_args(*BUILTIN, *extra), env=env).wait_ready()
    client = KafkaClient(topics)
    try:
        client.send(NOOP)
        assert client.reply(1) == ("1", {"jsonrpc": "2.0", "id": 1, "result": {}})
    finally:
        client.close()
    assert server.stop() == 0
    assert_no_secrets(server)
    return server


def fails_with_exit_3(server, text: str, timeout: float) -> str:
    started = time.monotonic()
    try:
        status = server.process.wait(timeout + 15)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert status == 3, server.log
    assert time.monotonic() - started < timeout + 10
    errors = [line for line in server.log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, server.log
    assert text in errors[0] and "Unable to bootstrap" not in errors[0], errors[0]
    assert_no_secrets(server)
    return errors[0]


@pytest.fixture
def tls(tmp_path):
    with tls_broker(tmp_path / "tls") as broker:
        yield broker


@pytest.fixture
def mtls(tmp_path):
    with tls_broker(tmp_path / "mtls", verify=2) as broker:
        yield broker


def test_tls_configured_by_environment(tls, start_server):
    server = round_trip(tls, start_server, server_env(KAFKA_SSL_CA=tls.pki.ca_cert))
    assert "inferred security.protocol=SSL from the TLS/SASL settings" in server.log


def test_tls_configured_by_properties_file(tls, start_server, tmp_path):
    config = tmp_path / "client.properties"
    config.write_text(f"# as for kcat or the Rust server\nsecurity.protocol=SSL\n"
                      f"ssl.ca.location={tls.pki.ca_cert}\n")
    server = round_trip(tls, start_server, server_env(), "--kafka-config", str(config))
    assert f"ssl.ca.location={tls.pki.ca_cert}" in server.log  # the settings line


def test_mutual_tls_with_an_encrypted_key(mtls, start_server):
    env = server_env(KAFKA_SSL_CA=mtls.pki.ca_cert, KAFKA_SSL_CERT=mtls.pki.client_cert,
                     KAFKA_SSL_KEY=mtls.pki.client_key_encrypted,
                     KAFKA_SSL_KEY_PASSWORD=KEY_PASSWORD)
    server = round_trip(mtls, start_server, env, ssl_certfile=mtls.pki.client_cert,
                        ssl_keyfile=mtls.pki.client_key)
    assert "ssl.key.password=***" in server.log


def test_mutual_tls_without_a_client_certificate_exits_3(mtls, start_server):
    topics = Topics(mtls.bootstrap, create=False)
    server = start_server(topics.server_args(*BUILTIN, "--kafka-connect-timeout", "20"),
                          env=server_env(KAFKA_SSL_CA=mtls.pki.ca_cert))
    line = fails_with_exit_3(server, "refused the TLS handshake", 20)
    assert "client certificate" in line


def test_untrusted_ca_exits_3(tls, start_server):
    topics = Topics(tls.bootstrap, create=False)
    server = start_server(topics.server_args(*BUILTIN, "--kafka-connect-timeout", "20"),
                          env=server_env(KAFKA_SSL_CA=tls.pki.other_ca_cert))
    assert "is not trusted" in fails_with_exit_3(server, "certificate of", 20)


def test_wrong_key_password_exits_3(mtls, start_server):
    topics = Topics(mtls.bootstrap, create=False)
    env = server_env(KAFKA_SSL_CA=mtls.pki.ca_cert, KAFKA_SSL_CERT=mtls.pki.client_cert,
                     KAFKA_SSL_KEY=mtls.pki.client_key_encrypted,
                     KAFKA_SSL_KEY_PASSWORD=SASL_PASSWORD)  # a wrong one, and a secret
    server = start_server(topics.server_args(*BUILTIN), env=env)
    fails_with_exit_3(server, "does not decrypt the private key", 5)


def test_missing_key_password_exits_3_instead_of_prompting(mtls, start_server):
    topics = Topics(mtls.bootstrap, create=False)
    env = server_env(KAFKA_SSL_CA=mtls.pki.ca_cert, KAFKA_SSL_CERT=mtls.pki.client_cert,
                     KAFKA_SSL_KEY=mtls.pki.client_key_encrypted)
    server = start_server(topics.server_args(*BUILTIN), env=env)
    fails_with_exit_3(server, "is encrypted but no ssl.key.password", 5)


def test_missing_certificate_file_exits_3(tls, start_server, tmp_path):
    topics = Topics(tls.bootstrap, create=False)
    missing = str(tmp_path / "nowhere.pem")
    server = start_server(topics.server_args(*BUILTIN, "-X", f"ssl.certificate.location={missing}",
                                             "-X", f"ssl.key.location={tls.pki.client_key}"),
                          env=server_env(KAFKA_SSL_CA=tls.pki.ca_cert))
    fails_with_exit_3(server, f"ssl.certificate.location {missing} does not exist", 5)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_failed_sasl_login_exits_3(mechanism, tmp_path, start_server):
    # Tansu offers only SCRAM and stores no users: every login fails ("unknown-user").
    with sasl_broker(tmp_path / "sasl") as broker:
        topics = Topics(broker.bootstrap, create=False)
        env = server_env(KAFKA_SASL_USERNAME="alice", KAFKA_SASL_PASSWORD=SASL_PASSWORD,
                         KAFKA_SASL_MECHANISM=mechanism)
        server = start_server(topics.server_args(*BUILTIN, "--kafka-connect-timeout", "20"),
                              env=env)
        line = fails_with_exit_3(server, f"SASL {mechanism} login as 'alice' failed", 20)
        assert "security.protocol=SASL_PLAINTEXT" in server.log  # inferred
        assert "sasl.password=***" in server.log
        assert "rejected the credentials" in line


def test_refused_connection_with_tls_is_retried_not_fatal(tmp_path, start_server):
    from harness import local_broker
    from tls_fixtures import make_pki
    pki = make_pki(tmp_path / "pki")
    topics = Topics(f"127.0.0.1:{local_broker.free_port()}", create=False)
    server = start_server(topics.server_args(*BUILTIN, "--kafka-connect-timeout", "1"),
                          env=server_env(KAFKA_SSL_CA=pki.ca_cert))
    server.wait_for_log("cannot connect to kafka at", count=3, timeout=30)
    assert server.process.poll() is None, "a refused connection must not be fatal"
    assert server.stop(signal.SIGTERM) == 0
    assert " ERROR " not in server.log
