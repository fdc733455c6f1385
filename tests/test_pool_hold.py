"""Who holds the pool: fault injection on PostgreSQL (pool_hold, pool_exhausted, idle time).

Each test holds connections on purpose (sleeping, or waiting on a slow local HTTP
server, inside a transaction) under threads or asyncio, and checks that sqlprobe names
the line that checked the connection out and the unit of work it belongs to.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe import _state

from .conftest import PG_ASYNC_URL, PG_URL, _need, make_logger, sample

HERE = os.path.basename(__file__)


def next_line() -> int:
    """The line number after the caller's line (the checkout line it annotates)."""
    return sys._getframe(1).f_lineno + 1


def events(logs: LogCapture, name: str) -> list[dict[str, Any]]:
    return [e for e in logs.entries if e.get("event") == name]


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def pg(unique: str, detach_new_probes: None) -> Iterator[Any]:
    """A factory of PostgreSQL engines with pool options, disposed after the test."""
    _need(5432, "PostgreSQL")
    engines: list[Engine] = []

    def make(**kw: Any) -> Engine:
        kw.setdefault("connect_args", {"application_name": f"sqlprobe_hold_{unique}"})
        engine = create_engine(PG_URL, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def _getframemodulename(depth: int) -> str | None:
    """Python 3.12's ``sys._getframemodulename``, emulated with frame objects on 3.11."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return None  # as on 3.12: past the end of the stack
    name = frame.f_globals.get("__name__")
    return name if isinstance(name, str) else None


@pytest.fixture(params=["frame objects", "module names"])
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the checkout finds its application frame (by module name: Python 3.12+)."""
    from sqlprobe._core import _frames
    from sqlprobe._hooks import _pool

    by_module = request.param == "module names"
    if by_module and _frames._getframemodulename is None:
        monkeypatch.setattr(_frames, "_getframemodulename", _getframemodulename)
    monkeypatch.setattr(_pool, "FRAMES_BY_MODULE_NAME", by_module)
    return str(request.param)


@pytest.fixture
def slow_http() -> Iterator[str]:
    """A local HTTP server whose every answer takes 0.7 s (a slow dependency)."""

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(0.7)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_sleep_in_transaction_names_line_and_route(pg: Any, logs: LogCapture, walk: str) -> None:
    """A thread sleeping inside a transaction is named by file:line and scope in pool_hold."""
    engine = pg()
    sqlprobe.attach(engine, registry=CollectorRegistry(), logger=make_logger(logs))
    lines: list[int] = []

    def handler() -> None:
        with sqlprobe.scope("POST /orders"):
            lines.append(next_line())
            with engine.begin() as conn:
                conn.execute(text("SELECT 1"))
                time.sleep(0.8)
                conn.execute(text("SELECT 2"))

    worker = threading.Thread(target=handler)
    worker.start()
    worker.join()
    wait_for(lambda: events(logs, "pool_hold"))
    (event,) = events(logs, "pool_hold")
    assert event["source"].endswith(f"{HERE}:{lines[0]} in handler"), event
    assert event["route"] == "POST /orders"
    assert event["in_transaction"] is True
    assert event["reason"] == "idle_in_transaction"
    assert event["idle_ms"] >= 500
    assert event["statement"] == "SELECT ?"


def test_slow_http_call_in_transaction_is_named(pg: Any, logs: LogCapture, slow_http: str) -> None:
    """Awaiting a slow HTTP call inside a transaction is reported with line and route."""
    engine = pg()
    sqlprobe.attach(engine, registry=CollectorRegistry(), logger=make_logger(logs))
    with sqlprobe.scope("POST /checkout"):
        line = next_line()
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
            with urllib.request.urlopen(slow_http, timeout=5) as response:
                assert response.read() == b"ok"
    wait_for(lambda: events(logs, "pool_hold"))
    (event,) = events(logs, "pool_hold")
    assert f"{HERE}:{line} in test_slow_http_call_in_transaction_is_named" in event["source"]
    assert event["route"] == "POST /checkout"
    assert event["in_transaction"] is True
    assert event["held_ms"] >= 500  # the watchdog may see it while it waits


def test_held_without_transaction_is_reported_at_checkin(pg: Any, logs: LogCapture) -> None:
    """A connection held past pool_hold_threshold outside a transaction is reported."""
    engine = pg()
    sqlprobe.attach(
        engine, registry=CollectorRegistry(), logger=make_logger(logs), pool_hold_threshold=0.3
    )
    with sqlprobe.scope("nightly-report"):
        line = next_line()
        conn = engine.connect()
        conn.execute(text("SELECT 1"))
        conn.commit()
        time.sleep(0.5)
        conn.close()
    wait_for(lambda: events(logs, "pool_hold"))
    (event,) = events(logs, "pool_hold")
    assert f"{HERE}:{line} in" in event["source"]
    assert event["route"] == "nightly-report"
    assert event["reason"] == "held"
    assert event["held_ms"] >= 300
    assert event["in_transaction"] is False


def test_asyncio_engine_hold_is_named(
    unique: str, logs: LogCapture, detach_new_probes: None, walk: str
) -> None:
    """An AsyncEngine task awaiting inside a transaction is named by its line and scope."""
    _need(5432, "PostgreSQL")
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(PG_ASYNC_URL)
    sqlprobe.attach(engine, registry=CollectorRegistry(), logger=make_logger(logs))
    lines: list[int] = []

    async def handler() -> None:
        with sqlprobe.scope("GET /async"):
            lines.append(next_line())
            async with engine.begin() as conn:
                await conn.execute(text("SELECT 1"))
                await asyncio.sleep(0.8)
                await conn.execute(text("SELECT 2"))

    async def main() -> None:
        try:
            await asyncio.gather(handler(), asyncio.sleep(0.1))
        finally:
            await engine.dispose()

    asyncio.run(main())
    wait_for(lambda: events(logs, "pool_hold"))
    (event,) = events(logs, "pool_hold")
    assert event["source"].endswith(f"{HERE}:{lines[0]} in handler"), event
    assert event["route"] == "GET /async"
    assert event["in_transaction"] is True


def test_exhausted_pool_lists_exactly_the_two_holders(pg: Any, logs: LogCapture) -> None:
    """A checkout timeout gives one pool_exhausted event naming the two holders' lines."""
    engine = pg(pool_size=2, max_overflow=0, pool_timeout=0.5)
    sqlprobe.attach(engine, registry=CollectorRegistry(), logger=make_logger(logs))
    lines: dict[str, int] = {}
    holding = threading.Barrier(3)
    release = threading.Event()

    def holder_a() -> None:
        with sqlprobe.scope("GET /a"):
            lines["a"] = next_line()
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                holding.wait()
                release.wait(5)

    def holder_b() -> None:
        with sqlprobe.scope("GET /b"):
            lines["b"] = next_line()
            with engine.connect() as conn:
                conn.execute(text("SELECT 2"))
                holding.wait()
                release.wait(5)

    threads = [threading.Thread(target=holder_a), threading.Thread(target=holder_b)]
    for t in threads:
        t.start()
    holding.wait()
    with pytest.raises(sa_exc.TimeoutError):
        engine.connect()
    release.set()
    for t in threads:
        t.join()
    (event,) = events(logs, "pool_exhausted")
    assert event["timeout"] is True
    assert event["waited_ms"] >= 500
    holders = sorted(event["holders"], key=lambda h: h["route"])
    assert [h["route"] for h in holders] == ["GET /a", "GET /b"]
    assert holders[0]["source"].endswith(f"{HERE}:{lines['a']} in holder_a")
    assert holders[1]["source"].endswith(f"{HERE}:{lines['b']} in holder_b")
    assert all(h["in_transaction"] for h in holders)
    assert all(h["statement"] == "SELECT ?" for h in holders)


def test_idle_histogram_sum_matches_injected_idle(pg: Any, registry: CollectorRegistry) -> None:
    """The idle histogram's sum is the time injected between statements (within 10 %)."""
    engine = pg()
    probe = sqlprobe.attach(engine, registry=registry, pool_hold_threshold=10)
    with engine.connect() as conn:  # warm: the first connect's set-up is not idle time
        conn.execute(text("SELECT 1"))
    name = probe.name or ""
    before = sample(registry, "sqlprobe_pool_connection_idle_seconds_sum", engine=name)
    injected = 0.0
    for _ in range(4):
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_sleep(0.05)"))
            time.sleep(0.1)
            injected += 0.1
            conn.execute(text("SELECT 1"))
    idle = sample(registry, "sqlprobe_pool_connection_idle_seconds_sum", engine=name) - before
    assert abs(idle - injected) <= 0.1 * injected, (idle, injected)
    count = sample(registry, "sqlprobe_pool_connection_idle_seconds_count", engine=name)
    assert count == 5


def test_peak_connections_resets_at_scrape(pg: Any, registry: CollectorRegistry) -> None:
    """The peak gauge shows the most out at once since the previous scrape, then restarts."""
    engine = pg(pool_size=5)
    probe = sqlprobe.attach(engine, registry=registry)
    name = probe.name or ""
    conns = [engine.connect() for _ in range(3)]
    for c in conns:
        c.close()
    assert sample(registry, "sqlprobe_pool_peak_connections", engine=name) == 3
    held = engine.connect()
    assert sample(registry, "sqlprobe_pool_peak_connections", engine=name) == 1
    held.close()
    generate_latest(registry)
    assert sample(registry, "sqlprobe_pool_peak_connections", engine=name) == 0


def test_watchdog_stops_on_detach(pg: Any) -> None:
    """The watchdog watches a probe's monitor while attached and forgets it on detach."""
    engine = pg()
    probe = sqlprobe.attach(engine, registry=CollectorRegistry())
    assert _state.watchdog.running
    watched = len(_state.watchdog._watchers)
    probe.detach()
    assert len(_state.watchdog._watchers) == watched - 1
    if not _state.watchdog._watchers:
        wait_for(lambda: not _state.watchdog.running)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_watchdog_runs_again_in_a_forked_child(pg: Any, logs: LogCapture) -> None:
    """After fork the child has a watchdog thread that reports the child's own holds."""
    engine = pg(pool_size=2)
    sqlprobe.attach(
        engine, registry=CollectorRegistry(), logger=make_logger(logs), pool_hold_threshold=0.3
    )
    engine.dispose()  # the child must not share the parent's connections
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            ok = _state.watchdog.running
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                conn.commit()
                deadline = time.monotonic() + 3
                while not events(logs, "pool_hold") and time.monotonic() < deadline:
                    time.sleep(0.05)
                ok = ok and any(e["ongoing"] for e in events(logs, "pool_hold"))
            status = 0 if ok else 2
        finally:
            os.write(write, bytes([status]))
            os._exit(status)
    os.close(write)
    result = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert result == bytes([0])


def test_gunicorn_workers_name_the_holding_line(tmp_path: Any, unique: str) -> None:
    """Under gunicorn workers forked from a preloaded app, pool_hold names line and route."""
    _need(5432, "PostgreSQL")
    pytest.importorskip("gunicorn")
    import json
    import socket
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    app_file = root / "tests" / "pool_hold_app.py"
    line = next(
        i for i, text_line in enumerate(app_file.read_text().splitlines(), 1)
        if "# the checkout line" in text_line
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "holds.jsonl"
    env = {**os.environ, "SQLPROBE_TEST_HOLD_LOG": str(log), "SQLPROBE_TEST_PG_URL": PG_URL}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "-b", f"127.0.0.1:{port}",
         "--graceful-timeout", "2", "tests.pool_hold_app:application"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError("gunicorn did not start") from None
                time.sleep(0.1)

        def get(path: str) -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                assert r.read() == b"ok"

        clients = [threading.Thread(target=get, args=(f"/hold/{i}",)) for i in (17, 18, 19)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, timeout=10)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    found = [json.loads(x) for x in log.read_text().splitlines()]
    holds = [e for e in found if e["event"] == "pool_hold"]
    assert len(holds) == 3, found
    for event in holds:
        assert event["source"] == f"tests/pool_hold_app.py:{line} in app", event
        assert event["route"] == "GET /hold/{id}"
        assert event["in_transaction"] is True
        assert event["engine"] == "gunicorn"
    assert len({e["pid"] for e in holds}) >= 1


def _check_out(pool: Any) -> Any:
    return pool.connect()


def test_a_checkout_made_by_calling_the_pool_is_attributed_to_its_caller(
    tmp_path: Any, walk: str
) -> None:
    """``pool.connect()`` called by the application: the hold names the calling function."""
    from sqlprobe._core._hold import CODE
    from sqlprobe._hooks._pool import PoolHooks

    engine = create_engine(f"sqlite:///{tmp_path / 'caller.db'}")
    stages: list[str] = []
    hooks = PoolHooks(engine, contain=stages.append, error_name=lambda exc: "E")
    undo = hooks.install(_NoSink())  # type: ignore[arg-type]
    try:
        connection = _check_out(engine.pool)
        (hold,) = hooks.holders()
        assert hold[CODE] is _check_out.__code__
        connection.close()
        assert hooks.holders() == []
        assert stages == []
    finally:
        undo()
        engine.dispose()


class _NoSink:
    """A pool sink that takes every measurement and keeps none."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "pending":
            raise AttributeError(name)
        return lambda *args: None
