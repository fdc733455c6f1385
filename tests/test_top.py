"""`sqlprobe top`: parses a live /metrics endpoint and shows rates, top shapes, percentiles."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console
from sqlalchemy import text
from sqlalchemy.engine import Engine

import sqlprobe
from sqlprobe import _top

pytestmark = pytest.mark.smoke

SQLPROBE = [sys.executable, "-m", "sqlprobe.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for(url: str, needle: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if needle in r.read().decode():
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} never served {needle}")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    """A live `sqlprobe demo` serving /metrics; yields its URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [*SQLPROBE, "demo", "--port", str(port), "--duration", "60"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        _wait_for(url, "sqlprobe_statement_calls_total")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.5, 0.1), (0.75, 0.15), (0.95, 0.19), (0.99, 0.198), (1.0, 0.2)],
)
def test_quantile_interpolates_like_histogram_quantile(q: float, expected: float) -> None:
    """Quantiles interpolate linearly inside the bucket that holds the rank, as PromQL does."""
    buckets = {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}
    assert _top.quantile(q, buckets) == pytest.approx(expected)


def test_quantile_edge_cases() -> None:
    """No observations give None; ranks in the +Inf bucket give the highest finite bound."""
    assert _top.quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert _top.quantile(0.5, {}) is None
    assert _top.quantile(0.99, {0.1: 10.0, 0.2: 10.0, math.inf: 20.0}) == 0.2
    assert _top.quantile(0.5, {0.001: 4.0, math.inf: 4.0}) == pytest.approx(0.0005)


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("127.0.0.1:9464", "http://127.0.0.1:9464/metrics"),
        ("http://db-app:8000", "http://db-app:8000/metrics"),
        ("https://app/internal/metrics", "https://app/internal/metrics"),
    ],
)
def test_url_shorthands(raw: str, url: str) -> None:
    """HOST:PORT and a URL without a path are completed to the /metrics URL."""
    assert _top.normalize_url(raw) == url


def test_render_of_a_real_exposition(
    registry: CollectorRegistry, sqlite_engine: Engine, detach_new_probes: None
) -> None:
    """Two scrapes of a real registry give rates, the top shape's full text and percentiles."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, name="app")
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    first = _top.parse(generate_latest(registry).decode(), at=100.0)
    with sqlite_engine.connect() as conn:
        for _ in range(20):
            conn.execute(text("SELECT 2 AS two_the_number_of_a_long_statement"))
    second = _top.parse(generate_latest(registry).decode(), at=102.0)
    assert probe.attached
    console = Console(width=80, record=True, color_system=None)
    console.print(_top.render(second, first, "http://app/metrics", interval=2))
    out = console.export_text()
    assert "statements 10.0/s" in out  # 20 statements in 2 s
    assert "SELECT ? AS two_the_number_of_a_long_statement" in out
    assert "Latency by operation" in out and "SELECT" in out
    assert "last 2.0 s" in out


def test_top_once_against_a_live_demo(demo: str) -> None:
    """`sqlprobe top URL --once` shows a non-zero statement rate and the slow query on top."""
    proc = subprocess.run(
        # The demo's slow lookup runs every 25th iteration, 2.5-4 s apart on a busy
        # machine: a window of 6 s holds one.
        [*SQLPROBE, "top", demo, "--once", "--interval", "6"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rate = float(out.split("statements ", 1)[1].split("/s", 1)[0].replace(",", ""))
    assert rate > 0, out
    assert "SELECT sqlprobe_demo_shipments.id" in out, out
    assert "User.orders" in out  # the demo's N+1
    assert max(len(line) for line in out.splitlines()) <= 80


def test_top_once_against_a_dead_url_is_one_line() -> None:
    """--once against a URL nobody serves is one line on stderr naming it, exit status 1."""
    url = f"http://127.0.0.1:{_free_port()}/metrics"
    proc = subprocess.run(
        [*SQLPROBE, "top", url, "--once"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"sqlprobe top: error: cannot read {url}: Connection refused"
    ]


def test_top_rejects_bad_arguments() -> None:
    """A URL that is not http(s) or an interval under 0.1 s is one line, exit status 2."""
    for argv, needle in (
        (["ftp://host/metrics"], "argument URL: expected an http(s) URL or HOST:PORT"),
        (["--interval", "0"], "argument --interval: expected a number of seconds, 0.1 or more"),
        (["--limit", "0"], "argument --limit: expected a whole number of 1 or more"),
    ):
        proc = subprocess.run([*SQLPROBE, "top", *argv], capture_output=True, text=True)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr


def _tmux() -> str:
    tmux = shutil.which("tmux")
    if tmux is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is not installed (scripts/test.sh installs it)")
        pytest.skip("tmux is not installed (apt-get install tmux)")
    return tmux


@pytest.fixture
def tmux_session(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A private tmux server (its own socket) and a session name, killed afterwards."""
    tmux = _tmux()
    socket_path = str(tmp_path / "tmux.sock")
    yield tmux, socket_path
    subprocess.run([tmux, "-S", socket_path, "kill-server"], capture_output=True)


def _pane(tmux: str, sock: str) -> str:
    return subprocess.run(
        [tmux, "-S", sock, "capture-pane", "-p", "-t", "top"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _start(tmux: str, sock: str, args: list[str]) -> None:
    # `env -u`: readline, once loaded in this process, exports LINES/COLUMNS of the
    # pytest terminal into the C environment, which tmux would hand to the pane.
    command = " ".join(
        ["env", "-u", "LINES", "-u", "COLUMNS", sys.executable, "-m", "sqlprobe.cli", "top", *args]
    )
    subprocess.run(
        [tmux, "-S", sock, "new-session", "-d", "-s", "top", "-x", "100", "-y", "45", command],
        check=True,
    )


def test_top_live_under_tmux(demo: str, tmux_session: tuple[str, str]) -> None:
    """Live in a terminal, within 8 s, top shows a non-zero statement rate and the top shape
    (the demo's slow lookup, run every 25th iteration: 2.5-4 s apart on a busy machine)."""
    tmux, sock = tmux_session
    _start(tmux, sock, [demo, "--interval", "1"])
    # A capture can land in the middle of a redraw: look until one whole frame is seen.
    wanted = ("statements ", "/s ", "SELECT sqlprobe_demo_shipments.id", "Latency by operation")
    deadline = time.monotonic() + 8
    screen = ""
    while time.monotonic() < deadline:
        screen = _pane(tmux, sock)
        if all(w in screen for w in wanted):
            break
        time.sleep(0.1)
    assert all(w in screen for w in wanted), screen
    rate = float(screen.split("statements ", 1)[1].split("/s", 1)[0].replace(",", ""))
    assert rate > 0, screen


def test_top_live_keeps_retrying_a_dead_url(tmux_session: tuple[str, str]) -> None:
    """Against a dead URL, the live view says it cannot reach it and keeps retrying."""
    tmux, sock = tmux_session
    url = f"http://127.0.0.1:{_free_port()}/metrics"
    _start(tmux, sock, [url, "--interval", "0.5"])
    time.sleep(2.5)
    screen = _pane(tmux, sock)
    assert "cannot reach the endpoint: Connection refused" in screen, screen
    attempts = int(screen.split("(attempt ", 1)[1].split(")", 1)[0])
    assert attempts >= 3, screen
    # Still running: the session exists and the count goes on.
    time.sleep(1.0)
    later = int(_pane(tmux, sock).split("(attempt ", 1)[1].split(")", 1)[0])
    assert later > attempts
