"""start_http_server(): loopback by default, real HTTP and TLS clients, exposition parses back."""

from __future__ import annotations

import errno
import logging
import re
import shutil
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import Engine

import sqlprobe

pytestmark = pytest.mark.smoke


def _get(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        body: bytes = response.read()
    return body.decode()


def test_binds_loopback_by_default(registry: CollectorRegistry, sqlite_engine: Engine) -> None:
    """The server binds 127.0.0.1 unless told otherwise, and serves sqlprobe's metrics."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    server = sqlprobe.start_http_server(port=0, registry=registry)
    try:
        assert server.addr == "127.0.0.1"
        body = _get(server.url)
        families = {f.name: f for f in text_string_to_metric_families(body)}
        calls = families["sqlprobe_statement_calls"]
        assert sum(s.value for s in calls.samples if s.name.endswith("_total")) == 1
    finally:
        server.close()
        probe.detach()


def test_env_sets_address_and_port(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLPROBE_METRICS_ADDR and SQLPROBE_METRICS_PORT replace the defaults."""
    monkeypatch.setenv("SQLPROBE_METRICS_ADDR", "127.0.0.2")
    monkeypatch.setenv("SQLPROBE_METRICS_PORT", "0")
    server = sqlprobe.start_http_server(registry=registry)
    try:
        assert server.addr == "127.0.0.2"
        assert server.port > 0
        _get(server.url)
    finally:
        server.close()


def test_bad_port_is_refused() -> None:
    """A port outside 0-65535 raises ValueError before anything binds."""
    with pytest.raises(ValueError, match="port must be an integer"):
        sqlprobe.start_http_server(port=70000)
    with pytest.raises(ValueError, match="certfile and keyfile"):
        sqlprobe.start_http_server(port=0, certfile="/nonexistent.pem")
    with pytest.raises(ValueError, match="addr must be a host name or IP address, got ''"):
        sqlprobe.start_http_server(port=0, addr="")


def test_busy_port_names_address_and_port(registry: CollectorRegistry) -> None:
    """A port in use raises an OSError naming the address and port, the original as cause."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError) as raised:
            sqlprobe.start_http_server(port=port, registry=registry)
    message = str(raised.value)
    assert message == (
        f"cannot serve /metrics on 127.0.0.1:{port}: port {port} is already in use "
        "(choose another port, or 0 for a free one)"
    )
    assert raised.value.errno == errno.EADDRINUSE
    assert isinstance(raised.value.__cause__, OSError)
    assert raised.value.__cause__.errno == errno.EADDRINUSE


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("nosuch.invalid", "address 'nosuch.invalid' does not resolve"),
        ("192.0.2.1", "address '192.0.2.1' is not an address of this machine"),
        ("a..b", "address 'a..b' is not a valid host name"),
    ],
)
def test_bad_address_names_it(addr: str, reason: str, registry: CollectorRegistry) -> None:
    """An address that does not resolve or is not this machine's is named in the error."""
    with pytest.raises(OSError) as raised:
        sqlprobe.start_http_server(port=0, addr=addr, registry=registry)
    assert str(raised.value).startswith(f"cannot serve /metrics on {addr}:0: {reason}")
    assert raised.value.__cause__ is not None


def test_missing_tls_file_is_named(registry: CollectorRegistry, tmp_path: Path) -> None:
    """A certificate file that cannot be loaded is named, and no socket is left bound."""
    missing = tmp_path / "missing.pem"
    with pytest.raises(
        OSError, match=re.escape(f"cannot load the TLS certificate certfile={str(missing)!r}")
    ):
        sqlprobe.start_http_server(
            port=0, registry=registry, certfile=str(missing), keyfile=str(missing)
        )
    cert, key = _self_signed(tmp_path)
    with pytest.raises(OSError, match="cannot load the client CA client_cafile="):
        sqlprobe.start_http_server(
            port=0,
            registry=registry,
            certfile=str(cert),
            keyfile=str(key),
            client_cafile=str(missing),
        )


def test_bad_port_variable_falls_back(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed SQLPROBE_METRICS_PORT warns and the default port is used, not a crash."""
    from sqlprobe import _config

    _config._forget_warnings()
    monkeypatch.setenv("SQLPROBE_METRICS_PORT", "abc")
    with socket.socket() as probe:
        free = probe.connect_ex(("127.0.0.1", 9464)) != 0
    with caplog.at_level(logging.WARNING, logger="sqlprobe"):
        if free:
            server = sqlprobe.start_http_server(registry=registry)
            try:
                assert server.port == 9464
            finally:
                server.close()
        else:  # someone serves 9464 already: the error must still name the default port
            with pytest.raises(OSError, match=re.escape("127.0.0.1:9464")):
                sqlprobe.start_http_server(registry=registry)
    assert any("SQLPROBE_METRICS_PORT='abc'" in r.getMessage() for r in caplog.records)
    _config._forget_warnings()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_is_passed_through(registry: CollectorRegistry, tmp_path: Path) -> None:
    """certfile/keyfile serve /metrics over TLS to a verifying client; plain HTTP fails."""
    cert, key = _self_signed(tmp_path)
    server = sqlprobe.start_http_server(
        port=0, registry=registry, certfile=str(cert), keyfile=str(key)
    )
    try:
        assert server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        _get(server.url, context)
        with pytest.raises(Exception):  # noqa: B017 - any failure of plain HTTP will do
            _get(server.url.replace("https://", "http://"))
    finally:
        server.close()


def test_client_certificates_required(registry: CollectorRegistry, tmp_path: Path) -> None:
    """client_auth_required refuses a client without a certificate and serves one with it."""
    cert, key = _self_signed(tmp_path)
    server = sqlprobe.start_http_server(
        port=0,
        registry=registry,
        certfile=str(cert),
        keyfile=str(key),
        client_cafile=str(cert),
        client_auth_required=True,
    )
    try:
        anonymous = ssl.create_default_context(cafile=str(cert))
        with pytest.raises(Exception):  # noqa: B017 - the handshake or the read fails
            _get(server.url, anonymous)
        with_cert = ssl.create_default_context(cafile=str(cert))
        with_cert.load_cert_chain(str(cert), str(key))
        _get(server.url, with_cert)
    finally:
        server.close()


def test_awkward_label_values_round_trip(
    registry: CollectorRegistry, sqlite_engine: Engine
) -> None:
    """Quotes, backslashes, newlines and non-ASCII text in labels survive exposition and parsing."""
    name = 'odd "engine" \\ with\nnewline – ünïcødé'
    probe = sqlprobe.attach(sqlite_engine, registry=registry, name=name)
    with sqlite_engine.connect() as conn:
        conn.execute(text('SELECT \'it\'\'s\' AS "weird ""col""", 1 AS ünï'))
    from prometheus_client import generate_latest

    body = generate_latest(registry).decode()
    probe.detach()
    engines = {
        s.labels.get("engine")
        for f in text_string_to_metric_families(body)
        for s in f.samples
        if "engine" in s.labels
    }
    assert engines == {name}
    statements = [
        s.labels["statement"]
        for f in text_string_to_metric_families(body)
        for s in f.samples
        if s.name == "sqlprobe_statement_info"
    ]
    assert len(statements) == 1
    assert '"weird ""col"""' in statements[0]
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=body.encode(), capture_output=True
        )
        # promtool lints (e.g. naming advice) go to stdout with exit 3; a parse error is 1.
        assert check.returncode in (0, 3), check.stderr.decode() + check.stdout.decode()
        assert b"error while linting" not in check.stderr
