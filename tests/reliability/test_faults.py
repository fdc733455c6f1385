"""Database faults on the real PostgreSQL: killed backends and a server restart.

Every scenario runs two engines side by side, one without sqlprobe and one with the
whole agent attached, through the same fault at the same moment, so that the errors
the application sees can be compared class for class. sqlprobe must not change how an
application recovers, must count the errors by class (and the invalidated connections
in the pool metrics), and must keep reporting afterwards.

The restart test restarts the shared PostgreSQL cluster (it needs root and
``pg_ctlcluster``); set ``SQLPROBE_TEST_NO_RESTART=1`` to skip it where other work
uses the same server. It always waits until the server accepts connections again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from structlog.testing import LogCapture

import sqlprobe

from ..conftest import PG_URL, _need, make_logger, sample
from .conftest import samples_by

pytestmark = pytest.mark.postgres

DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
DEADLINE = 60.0


def _engine(app: str) -> Engine:
    return create_engine(
        PG_URL,
        pool_size=2,
        max_overflow=2,
        pool_timeout=DEADLINE,
        connect_args={"application_name": app, "connect_timeout": 5},
    )


def terminate(*apps: str) -> int:
    """Terminate every backend of these application names from a separate connection."""
    with psycopg.connect(DSN, autocommit=True) as admin:
        pids = [
            row[0]
            for row in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = ANY(%s)"
                " AND pid <> pg_backend_pid()",
                (list(apps),),
            )
        ]
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # Wait until they are gone, so the next statement surely meets a dead socket.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            ).fetchone()
            if row is None or row[0] == 0:
                break
            time.sleep(0.01)
    return len(pids)


def wait_until_accepting(timeout: float = DEADLINE) -> None:
    """Block until PostgreSQL accepts a connection and answers a query."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(DSN, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def arms(unique: str) -> Iterator[tuple[Engine, Engine]]:
    """A bare engine and one to watch, each with its own application_name."""
    _need(5432, "PostgreSQL")
    bare, watched = _engine(f"sp_bare_{unique}"), _engine(f"sp_watch_{unique}")
    yield bare, watched
    bare.dispose()
    watched.dispose()


def _attach(engine: Engine, registry: CollectorRegistry, logs: LogCapture) -> sqlprobe.Probe:
    return sqlprobe.attach(engine, registry=registry, name="watched", logger=make_logger(logs))


def _outcome(fn: Any) -> Any:
    try:
        return ("ok", fn())
    except DBAPIError as exc:
        return (type(exc).__name__, type(exc.orig).__name__, exc.connection_invalidated)


def _killed_connection_scenario(engine: Engine, app: str) -> list[Any]:
    out: list[Any] = []
    with engine.connect() as conn:
        out.append(_outcome(lambda: conn.execute(text("SELECT 1")).scalar()))
        out.append(("killed", terminate(app)))
        out.append(_outcome(lambda: conn.execute(text("SELECT 2")).scalar()))
        conn.rollback()
        out.append(_outcome(lambda: conn.execute(text("SELECT 3")).scalar()))
    with engine.connect() as conn:
        out.append(_outcome(lambda: conn.execute(text("SELECT 4")).scalar()))
    return out


def test_terminated_backend_recovers_as_without_sqlprobe(
    arms: tuple[Engine, Engine], registry: CollectorRegistry, logs: LogCapture, unique: str
) -> None:
    """A killed backend fails one statement, as without sqlprobe; counted, then recovered."""
    bare, watched = arms
    expected = _killed_connection_scenario(bare, f"sp_bare_{unique}")
    assert expected[2][0] == "OperationalError" and expected[2][2] is True, expected
    probe = _attach(watched, registry, logs)
    try:
        got = _killed_connection_scenario(watched, f"sp_watch_{unique}")
        assert got == expected
        errors = samples_by(registry, "sqlprobe_query_errors_total", "error")
        assert errors == {"OperationalError": 1.0}
        assert sample(registry, "sqlprobe_pool_invalidations_total", engine="watched") >= 1
        assert sample(registry, "sqlprobe_pool_connects_total", engine="watched") >= 2
        calls = samples_by(registry, "sqlprobe_statement_calls_total", "engine")
        assert calls["watched"] >= 4
        assert samples_by(registry, "sqlprobe_internal_errors_total", "stage") == {}
    finally:
        probe.detach()


@dataclass
class Load:
    """Worker threads running statements in a loop on one engine until told to stop."""

    engine: Engine
    threads: int = 4
    stop: threading.Event = field(default_factory=threading.Event)
    statements: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    unexpected: list[BaseException] = field(default_factory=list)
    last_ok: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.last_ok = [0.0] * self.threads
        self.workers = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(self.threads)
        ]
        for t in self.workers:
            t.start()

    def _run(self, n: int) -> None:
        while not self.stop.is_set():
            try:
                with self.engine.connect() as conn:
                    for i in range(5):
                        assert conn.execute(text("SELECT :i"), {"i": i}).scalar() == i
                        with self.lock:
                            self.statements += 1
                        self.last_ok[n] = time.monotonic()
            except DBAPIError as exc:
                with self.lock:
                    name = type(exc).__name__
                    self.errors[name] = self.errors.get(name, 0) + 1
                time.sleep(0.02)
            except BaseException as exc:
                self.unexpected.append(exc)
                return

    def finish(self) -> None:
        self.stop.set()
        for t in self.workers:
            t.join(DEADLINE)
        assert not [t for t in self.workers if t.is_alive()], "a worker never returned"
        assert not self.unexpected, self.unexpected


def _check_after_fault(
    bare: Load, watched: Load, registry: CollectorRegistry, fault_end: float
) -> None:
    print("fault errors", {"bare": bare.errors, "watched": watched.errors})
    assert watched.errors, "the fault reached no statement"
    assert set(watched.errors) == set(bare.errors), (bare.errors, watched.errors)
    for load in (bare, watched):
        assert all(t > fault_end for t in load.last_ok), "a worker did not recover"
    counted = samples_by(registry, "sqlprobe_query_errors_total", "error")
    # A checkout whose new connection failed ran no statement: it is a connect error.
    for name, n in samples_by(registry, "sqlprobe_pool_connect_errors_total", "error").items():
        counted[name] = counted.get(name, 0) + n
    # Every error the application saw was counted under its class.
    for name, n in watched.errors.items():
        assert counted.get(name, 0) >= n, (counted, watched.errors)
    assert sample(registry, "sqlprobe_pool_invalidations_total", engine="watched") >= 1
    assert samples_by(registry, "sqlprobe_internal_errors_total", "stage") == {}
    # Still reporting: the calls counter keeps moving after the fault.
    before = samples_by(registry, "sqlprobe_statement_calls_total", "engine")["watched"]
    with watched.engine.connect() as conn:
        conn.execute(text("SELECT 42")).scalar()
    after = samples_by(registry, "sqlprobe_statement_calls_total", "engine")["watched"]
    assert after == before + 1
    assert b"sqlprobe_pool_connects_total" in generate_latest(registry)


def test_backends_terminated_under_load(
    arms: tuple[Engine, Engine], registry: CollectorRegistry, logs: LogCapture, unique: str
) -> None:
    """Backends killed repeatedly under load: same error classes as without sqlprobe."""
    bare_engine, watched_engine = arms
    probe = _attach(watched_engine, registry, logs)
    bare, watched = Load(bare_engine), Load(watched_engine)
    try:
        bare.start()
        watched.start()
        time.sleep(0.3)
        for _ in range(5):
            terminate(f"sp_bare_{unique}", f"sp_watch_{unique}")
            time.sleep(0.2)
        fault_end = time.monotonic()
        time.sleep(0.5)
        bare.finish()
        watched.finish()
        _check_after_fault(bare, watched, registry, fault_end)
        counted = samples_by(registry, "sqlprobe_query_errors_total", "error")
        assert counted == {k: float(v) for k, v in watched.errors.items()}
        assert sample(registry, "sqlprobe_pool_connects_total", engine="watched") > 4
    finally:
        bare.stop.set()
        watched.stop.set()
        probe.detach()


def _can_restart() -> str | None:
    if os.environ.get("SQLPROBE_TEST_NO_RESTART"):
        return "SQLPROBE_TEST_NO_RESTART is set"
    if os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None:
        return "restarting PostgreSQL needs root and pg_ctlcluster"
    if not os.path.isdir("/etc/postgresql") or not os.listdir("/etc/postgresql"):
        return "no PostgreSQL cluster in /etc/postgresql"
    return None


def test_server_restart_under_load(
    arms: tuple[Engine, Engine], registry: CollectorRegistry, logs: LogCapture
) -> None:
    """A PostgreSQL restart under load: same error classes, recovery, counts, reporting."""
    reason = _can_restart()
    if reason:
        pytest.skip(reason)
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    bare_engine, watched_engine = arms
    probe = _attach(watched_engine, registry, logs)
    bare, watched = Load(bare_engine), Load(watched_engine)
    try:
        bare.start()
        watched.start()
        time.sleep(0.3)
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
            check=True,
            timeout=DEADLINE,
            capture_output=True,
        )
        wait_until_accepting()
        fault_end = time.monotonic()
        time.sleep(1.0)
        bare.finish()
        watched.finish()
        _check_after_fault(bare, watched, registry, fault_end)
        assert sample(registry, "sqlprobe_pool_connects_total", engine="watched") > 2
    finally:
        bare.stop.set()
        watched.stop.set()
        wait_until_accepting()
        probe.detach()
