"""Pool metrics on real pools: contention, timeouts, invalidations, dispose, detach."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool, SingletonThreadPool, StaticPool

import sqlprobe

from .conftest import PG_URL, _need, sample, total

pytestmark = pytest.mark.smoke

WAIT = "sqlprobe_pool_checkout_wait_seconds"
USE = "sqlprobe_pool_connection_use_seconds"
CONNECT = "sqlprobe_pool_connect_seconds"
CONNS = "sqlprobe_pool_connections"
MAX = "sqlprobe_pool_max_connections"
TIMEOUTS = "sqlprobe_pool_checkout_timeouts_total"
CONNECTS = "sqlprobe_pool_connects_total"
INVALIDATIONS = "sqlprobe_pool_invalidations_total"
POOL_EVENTS = ("connect", "checkout", "checkin", "detach", "invalidate", "soft_invalidate", "close")


def gauges(registry: CollectorRegistry, engine: str) -> tuple[float, float]:
    """(idle, used) as scraped."""
    return (
        sample(registry, CONNS, engine=engine, state="idle"),
        sample(registry, CONNS, engine=engine, state="used"),
    )


@pytest.fixture
def pg_pool(unique: str) -> Iterator[Any]:
    """A factory of PostgreSQL engines with pool options, disposed after the test."""
    _need(5432, "PostgreSQL")
    engines: list[Engine] = []

    def make(**kw: Any) -> Engine:
        kw.setdefault("connect_args", {"application_name": f"sqlprobe_{unique}"})
        engine = create_engine(PG_URL, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def test_series_exported_at_zero_from_attach(pg_pool: Any, registry: CollectorRegistry) -> None:
    """Right after attach every pool and transaction series exists at 0 (max at its size)."""
    engine = pg_pool(pool_size=3, max_overflow=2)
    sqlprobe.attach(engine, registry=registry, name="pg")
    for name in (TIMEOUTS, CONNECTS, INVALIDATIONS, f"{WAIT}_count", f"{USE}_count"):
        assert registry.get_sample_value(name, {"engine": "pg"}) == 0.0, name
    assert registry.get_sample_value(f"{CONNECT}_count", {"engine": "pg"}) == 0.0
    for outcome in ("commit", "rollback"):
        labels = {"engine": "pg", "outcome": outcome}
        assert registry.get_sample_value("sqlprobe_transaction_duration_seconds_count", labels) == 0
    for state in ("idle", "used"):
        assert registry.get_sample_value(CONNS, {"engine": "pg", "state": state}) == 0.0
    assert registry.get_sample_value(MAX, {"engine": "pg"}) == 5.0


def test_wait_histogram_records_queueing(pg_pool: Any, registry: CollectorRegistry) -> None:
    """Six threads on two connections, 200 ms each: waits add up and `used` reads 2 meanwhile."""
    engine = pg_pool(pool_size=2, max_overflow=0)
    sqlprobe.attach(engine, registry=registry, name="pg")
    hold = 0.2
    start = threading.Barrier(7)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait()
            with engine.connect() as conn:
                conn.execute(text("select 1"))
                time.sleep(hold)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(hold / 2)
    during = gauges(registry, "pg")
    for t in threads:
        t.join()
    assert not errors
    assert during == (0.0, 2.0)
    assert sample(registry, f"{WAIT}_count", engine="pg") == 6
    # Two at a time: two wait ~0, two ~1 hold, two ~2 holds; the threads may reach the
    # pool a few milliseconds apart, which is all the slack allowed.
    assert sample(registry, f"{WAIT}_sum", engine="pg") >= 6 * hold - 0.05
    assert sample(registry, f"{USE}_count", engine="pg") == 6
    assert sample(registry, f"{USE}_sum", engine="pg") >= 6 * hold
    assert sample(registry, CONNECTS, engine="pg") == 2
    assert sample(registry, f"{CONNECT}_count", engine="pg") == 2
    assert gauges(registry, "pg") == (2.0, 0.0)
    assert sample(registry, MAX, engine="pg") == 2


def test_timeouts_counted_once_and_error_unchanged(
    pg_pool: Any, registry: CollectorRegistry
) -> None:
    """pool_timeout=0.5 against two connections held 2 s: each timeout counted once, same error."""
    engine = pg_pool(pool_size=2, max_overflow=0, pool_timeout=0.5)
    sqlprobe.attach(engine, registry=registry, name="pg")
    held = threading.Barrier(3)
    raised: list[BaseException] = []

    def holder() -> None:
        with engine.connect():
            held.wait()
            time.sleep(2.0)

    def requester() -> None:
        try:
            with engine.connect():
                pass
        except BaseException as exc:
            raised.append(exc)

    holders = [threading.Thread(target=holder) for _ in range(2)]
    for t in holders:
        t.start()
    held.wait()
    requesters = [threading.Thread(target=requester) for _ in range(3)]
    for t in requesters:
        t.start()
    for t in requesters:
        t.join()
    assert [type(e) for e in raised] == [sa_exc.TimeoutError] * 3
    assert all("QueuePool limit of size 2 overflow 0 reached" in str(e) for e in raised)
    assert sample(registry, TIMEOUTS, engine="pg") == 3
    assert sample(registry, f"{WAIT}_count", engine="pg") == 2  # the holders only
    for t in holders:
        t.join()
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    assert sample(registry, TIMEOUTS, engine="pg") == 3


def test_pre_ping_counts_terminated_backends(
    pg_pool: Any, registry: CollectorRegistry, unique: str
) -> None:
    """Backends killed while pooled: pre-ping invalidations counted, statements succeed."""
    engine = pg_pool(pool_size=2, max_overflow=0, pool_pre_ping=True)
    sqlprobe.attach(engine, registry=registry, name="pg")
    with engine.connect() as a, engine.connect() as b:
        a.execute(text("select 1"))
        b.execute(text("select 1"))
    assert gauges(registry, "pg") == (2.0, 0.0)

    killer = pg_pool(poolclass=NullPool, connect_args={})
    with killer.connect() as conn:
        killed = conn.execute(
            text(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                "where application_name = :name"
            ),
            {"name": f"sqlprobe_{unique}"},
        ).scalar()
    assert killed == 2

    for _ in range(3):
        with engine.connect() as conn:
            assert conn.execute(text("select 2")).scalar() == 2
    assert sample(registry, INVALIDATIONS, engine="pg") == 2
    assert sample(registry, CONNECTS, engine="pg") == 4
    assert gauges(registry, "pg") == (2.0, 0.0)
    with engine.connect():
        assert gauges(registry, "pg") == (1.0, 1.0)


def test_disconnect_during_use_counts_invalidation_and_rollback(
    pg_pool: Any, registry: CollectorRegistry, unique: str
) -> None:
    """A backend killed mid-transaction: one invalidation, the transaction ends as rollback."""
    engine = pg_pool(pool_size=2, max_overflow=0)
    sqlprobe.attach(engine, registry=registry, name="pg")
    killer = pg_pool(poolclass=NullPool, connect_args={})
    with engine.connect() as conn:
        pid = conn.execute(text("select pg_backend_pid()")).scalar()
        with killer.connect() as k:
            k.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(sa_exc.OperationalError):
            conn.execute(text("select 1"))
        # SQLAlchemy returns an invalidated connection's slot to the pool at once; the
        # slot holds no connection until its next checkout opens one.
        assert gauges(registry, "pg") == (0.0, 0.0)
    assert sample(registry, INVALIDATIONS, engine="pg") == 1
    labels = {"engine": "pg", "outcome": "rollback"}
    count = "sqlprobe_transaction_duration_seconds_count"
    assert registry.get_sample_value(count, labels) == 1
    with engine.connect() as conn:
        assert conn.execute(text("select 3")).scalar() == 3
    assert sample(registry, INVALIDATIONS, engine="pg") == 1
    assert gauges(registry, "pg") == (1.0, 0.0)


def test_soft_invalidation_counted_once(tmp_path: Any, registry: CollectorRegistry) -> None:
    """A soft invalidation counts once, not again when the pool recycles the connection."""
    engine = create_engine(f"sqlite:///{tmp_path}/soft.db")
    sqlprobe.attach(engine, registry=registry, name="lite")
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        conn.connection.invalidate(soft=True)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    assert sample(registry, INVALIDATIONS, engine="lite") == 1
    assert sample(registry, CONNECTS, engine="lite") == 2
    assert gauges(registry, "lite") == (1.0, 0.0)
    engine.dispose()


def test_gauges_after_dispose(pg_pool: Any, registry: CollectorRegistry) -> None:
    """dispose(): the new pool is measured, and connections of the old one no longer count."""
    engine = pg_pool(pool_size=2, max_overflow=1)
    sqlprobe.attach(engine, registry=registry, name="pg")
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    held = engine.connect()
    held.execute(text("select 1"))
    assert gauges(registry, "pg") == (0.0, 1.0)
    engine.dispose()
    assert gauges(registry, "pg") == (0.0, 0.0)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        assert gauges(registry, "pg") == (0.0, 1.0)
    held.close()  # goes back to the pool dispose() replaced
    assert gauges(registry, "pg") == (1.0, 0.0)
    assert sample(registry, f"{WAIT}_count", engine="pg") == 3
    assert sample(registry, f"{USE}_count", engine="pg") == 3
    engine.dispose()
    engine.dispose()
    with engine.connect():
        assert gauges(registry, "pg") == (0.0, 1.0)
    assert sample(registry, f"{WAIT}_count", engine="pg") == 4
    assert sample(registry, MAX, engine="pg") == 3


def _pool_listener_counts(engine: Engine) -> dict[str, int]:
    return {name: len(getattr(engine.pool.dispatch, name)) for name in POOL_EVENTS}


def test_detach_removes_every_listener_and_wrapper(
    pg_pool: Any, registry: CollectorRegistry
) -> None:
    """detach() after a dispose leaves no pool listener, pool wrapper or dialect wrapper."""
    engine = pg_pool()
    before = _pool_listener_counts(engine)
    first_pool = engine.pool
    probe = sqlprobe.attach(engine, registry=registry, name="pg")
    assert "connect" in vars(engine.pool)
    assert "do_begin" in vars(engine.dialect)
    engine.dispose()
    assert "connect" in vars(engine.pool) and "recreate" in vars(engine.pool)
    probe.detach()
    assert _pool_listener_counts(engine) == before
    for pool in (first_pool, engine.pool):
        assert "connect" not in vars(pool) and "recreate" not in vars(pool)
    for name in ("do_begin", "do_commit", "do_rollback"):
        assert name not in vars(engine.dialect)
    assert not engine._has_events
    with engine.begin() as conn:
        conn.execute(text("select 1"))
    # The series keeps its totals after detach; what ran detached is not counted.
    assert registry.get_sample_value(CONNECTS, {"engine": "pg"}) == 0
    assert sample(registry, f"{WAIT}_count", engine="pg") == 0
    again = sqlprobe.attach(engine, registry=registry, name="pg")
    with engine.begin() as conn:
        conn.execute(text("select 1"))
    assert sample(registry, f"{WAIT}_count", engine="pg") == 1
    assert (
        registry.get_sample_value(
            "sqlprobe_transaction_duration_seconds_count", {"engine": "pg", "outcome": "commit"}
        )
        == 1
    )
    again.detach()
    assert _pool_listener_counts(engine) == before
    assert "connect" not in vars(engine.pool) and "do_begin" not in vars(engine.dialect)


def test_no_connection_events_added(pg_pool: Any, registry: CollectorRegistry) -> None:
    """Pool metrics keep statements on SQLAlchemy's fast path (no ConnectionEvents listener)."""
    engine = pg_pool()
    sqlprobe.attach(engine, registry=registry)
    assert not engine._has_events
    for name in ("begin", "commit", "rollback", "engine_connect", "engine_disposed"):
        assert not getattr(engine.dispatch, name), name


def test_engines_sharing_a_name_add_up(pg_pool: Any, registry: CollectorRegistry) -> None:
    """Two engines under one name: gauges and max add up; detaching one leaves the other."""
    a = pg_pool(pool_size=2, max_overflow=0)
    b = pg_pool(pool_size=3, max_overflow=1)
    probe_a = sqlprobe.attach(a, registry=registry, name="shared")
    sqlprobe.attach(b, registry=registry, name="shared")
    assert sample(registry, MAX, engine="shared") == 6
    with a.connect(), b.connect(), b.connect():
        assert gauges(registry, "shared") == (0.0, 3.0)
    assert gauges(registry, "shared") == (3.0, 0.0)
    assert sample(registry, CONNECTS, engine="shared") == 3
    probe_a.detach()
    assert gauges(registry, "shared") == (2.0, 0.0)
    assert sample(registry, MAX, engine="shared") == 4
    assert sample(registry, CONNECTS, engine="shared") == 3
    with b.connect():
        assert gauges(registry, "shared") == (1.0, 1.0)
    assert sample(registry, f"{WAIT}_count", engine="shared") == 4


class Recorder:
    """A pool sink that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None]] = []

    def checkout(self, seconds: float) -> None:
        self.calls.append(("wait", seconds))

    def checkin(self, seconds: float) -> None:
        self.calls.append(("use", seconds))

    def connected(self, seconds: float) -> None:
        self.calls.append(("create", seconds))

    def connect_failed(self, error: str) -> None:
        self.calls.append(("connect_failed", None))

    def timeout(self) -> None:
        self.calls.append(("timeout", None))

    def invalidated(self) -> None:
        self.calls.append(("invalidated", None))

    def transaction(self, outcome: str, seconds: float) -> None:
        self.calls.append((outcome, seconds))


class Broken(Recorder):
    """A pool sink whose checkout and checkin raise."""

    def checkout(self, seconds: float) -> None:
        raise RuntimeError("sink bug")

    def checkin(self, seconds: float) -> None:
        raise RuntimeError("sink bug")


def test_pool_sinks_get_measurements_and_failures_are_contained(
    pg_pool: Any, registry: CollectorRegistry
) -> None:
    """Pool sinks see create/wait/timeout/use; a failing one is contained, the others still run."""
    from sqlprobe._core._contain import Containment
    from sqlprobe._core._errors import error_namer
    from sqlprobe._hooks._pool import PoolFanout, PoolHooks

    engine = pg_pool(pool_size=1, max_overflow=0, pool_timeout=0.05)
    stages: list[str] = []
    logged: list[dict[str, Any]] = []

    class Logger:
        def error(self, event: str, **fields: Any) -> None:
            logged.append({"event": event, **fields})

    contain = Containment("pg", stages.append, Logger())
    hooks = PoolHooks(engine, contain=contain, error_name=error_namer(engine.dialect))
    recorder, broken = Recorder(), Broken()
    undo = hooks.install(PoolFanout((broken, recorder), contain))
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        assert hooks.snapshot() == (0, 1, 1)
        with pytest.raises(sa_exc.TimeoutError):
            engine.connect()
    names = [name for name, _ in recorder.calls]
    assert names == ["create", "wait", "timeout", "rollback", "use"]
    assert all(v is None or v >= 0 for _, v in recorder.calls)
    assert stages == ["pool", "pool"]
    assert [e["event"] for e in logged] == ["internal_error"]  # once per stage per minute
    assert hooks.snapshot() == (1, 0, 1)
    undo()
    with engine.connect():
        pass
    assert len(recorder.calls) == 5
    assert "connect" not in vars(engine.pool) and "do_begin" not in vars(engine.dialect)


def test_probe_pool_gauges_follow_checkouts(pg_pool: Any, registry: CollectorRegistry) -> None:
    """An attached probe reads idle/used/max from the pool and counts the timeout once."""
    engine = pg_pool(pool_size=1, max_overflow=0, pool_timeout=0.05)
    sqlprobe.attach(engine, registry=registry, name="pg")
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        assert gauges(registry, "pg") == (0.0, 1.0)
        assert sample(registry, MAX, engine="pg") == 1
        with pytest.raises(sa_exc.TimeoutError):
            engine.connect()
    assert gauges(registry, "pg") == (1.0, 0.0)
    assert sample(registry, "sqlprobe_pool_checkout_timeouts_total", engine="pg") == 1
    assert sample(registry, f"{WAIT}_count", engine="pg") == 1


@pytest.mark.parametrize(
    ("poolclass", "limit"), [(NullPool, None), (StaticPool, 1.0), (SingletonThreadPool, None)]
)
def test_other_pool_classes(
    tmp_path: Any, registry: CollectorRegistry, poolclass: Any, limit: float | None
) -> None:
    """NullPool, StaticPool and SingletonThreadPool: sane gauges, max, counts on SQLite."""
    engine = create_engine(
        f"sqlite:///{tmp_path}/p.db",
        poolclass=poolclass,
        connect_args={"check_same_thread": False},
    )
    sqlprobe.attach(engine, registry=registry, name="lite")
    assert registry.get_sample_value(MAX, {"engine": "lite"}) == limit
    assert gauges(registry, "lite") == (0.0, 0.0)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        assert gauges(registry, "lite") == (0.0, 1.0)
    idle_after = 0.0 if poolclass is NullPool else 1.0
    assert gauges(registry, "lite") == (idle_after, 0.0)
    with engine.begin() as conn:
        conn.execute(text("select 1"))
    done = threading.Event()

    def other_thread() -> None:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert done.is_set()
    assert sample(registry, f"{WAIT}_count", engine="lite") == 3
    assert sample(registry, f"{USE}_count", engine="lite") == 3
    expected_connects = {NullPool: 3, StaticPool: 1, SingletonThreadPool: 2}[poolclass]
    assert sample(registry, CONNECTS, engine="lite") == expected_connects
    idle = {NullPool: 0.0, StaticPool: 1.0, SingletonThreadPool: 2.0}[poolclass]
    assert gauges(registry, "lite") == (idle, 0.0)
    labels = {"engine": "lite", "outcome": "commit"}
    assert registry.get_sample_value("sqlprobe_transaction_duration_seconds_count", labels) == 1
    engine.dispose()
    assert gauges(registry, "lite") == (0.0, 0.0)


def test_checkout_listener_failure_of_the_app_does_not_drift(
    pg_pool: Any, registry: CollectorRegistry
) -> None:
    """An application checkout listener that fails: the error is unchanged, gauges stay right."""
    engine = pg_pool(pool_size=2, max_overflow=0)
    sqlprobe.attach(engine, registry=registry, name="pg")
    calls = {"n": 0}

    def flaky(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("app listener")

    event.listen(engine, "checkout", flaky)
    with pytest.raises(ValueError, match="app listener"):
        engine.connect()
    assert gauges(registry, "pg") == (0.0, 0.0)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        assert gauges(registry, "pg") == (0.0, 1.0)
    assert gauges(registry, "pg") == (1.0, 0.0)
    event.remove(engine, "checkout", flaky)


def test_attach_to_a_warm_pool(pg_pool: Any, registry: CollectorRegistry) -> None:
    """Attached to an engine already in use: existing idle connections show at once."""
    engine = pg_pool(pool_size=2, max_overflow=0)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    sqlprobe.attach(engine, registry=registry, name="pg")
    assert gauges(registry, "pg") == (1.0, 0.0)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        assert gauges(registry, "pg") == (0.0, 1.0)
    assert sample(registry, f"{USE}_count", engine="pg") == 1
    assert sample(registry, CONNECTS, engine="pg") == 0


def test_collected_engine_leaves_the_shared_gauges(
    tmp_path: Any, registry: CollectorRegistry
) -> None:
    """An engine dropped without detach stops counting in gauges shared under its name."""
    keep = create_engine(f"sqlite:///{tmp_path}/a.db", pool_size=2, max_overflow=0)
    drop = create_engine(f"sqlite:///{tmp_path}/b.db", pool_size=3, max_overflow=0)
    sqlprobe.attach(keep, registry=registry, name="lite")
    sqlprobe.attach(drop, registry=registry, name="lite")
    with keep.connect(), drop.connect():
        pass
    assert gauges(registry, "lite") == (2.0, 0.0)
    assert sample(registry, MAX, engine="lite") == 5
    drop.dispose()
    del drop
    gc.collect()
    with keep.connect():
        assert gauges(registry, "lite") == (0.0, 1.0)
    assert sample(registry, MAX, engine="lite") == 2
    assert sample(registry, CONNECTS, engine="lite") == 2
    keep.dispose()


def test_attach_without_engine_measures_new_engines(
    tmp_path: Any, registry: CollectorRegistry
) -> None:
    """attach() with no engine: engines created afterwards get pool metrics too."""
    probe = sqlprobe.attach(registry=registry, name="lite")
    try:
        engine = create_engine(f"sqlite:///{tmp_path}/g.db")
        with engine.begin() as conn:
            conn.execute(text("select 1"))
        assert sample(registry, f"{WAIT}_count", engine="lite") == 1
        assert gauges(registry, "lite") == (1.0, 0.0)
        (child,) = probe.probes
        assert child.name == "lite"
        assert sample(registry, "sqlprobe_pool_max_connections", engine="lite") == 15
    finally:
        probe.detach()
    assert "connect" not in vars(engine.pool)
    engine.dispose()


def test_gauges_match_the_server_after_mixed_faults(
    pg_pool: Any, registry: CollectorRegistry, unique: str
) -> None:
    """Threads mixing commits, errors, invalidations and detaches: gauges match the server."""
    engine = pg_pool(pool_size=3, max_overflow=2, pool_timeout=5)
    sqlprobe.attach(engine, registry=registry, name="pg")
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(12):
                kind = (seed + i) % 5
                if kind == 0:
                    with engine.begin() as conn:
                        conn.execute(text("select 1"))
                elif kind == 1:
                    with pytest.raises(sa_exc.ProgrammingError), engine.begin() as conn:
                        conn.execute(text("select * from sp_missing_table"))
                elif kind == 2:
                    with engine.connect() as conn:
                        conn.execute(text("select 1"))
                        conn.invalidate()
                elif kind == 3:
                    with engine.connect() as conn:
                        conn.detach()
                        conn.execute(text("select 1"))
                else:
                    with engine.connect() as conn:
                        conn.execute(text("select pg_sleep(0.001)"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    observer = pg_pool(poolclass=NullPool, connect_args={})
    # A backend whose client closed the connection leaves pg_stat_activity a moment
    # later: read the server until it agrees or a few seconds have passed.
    deadline = time.monotonic() + 5
    while True:
        with observer.connect() as conn:
            on_server = conn.execute(
                text("select count(*) from pg_stat_activity where application_name = :n"),
                {"n": f"sqlprobe_{unique}"},
            ).scalar()
        if gauges(registry, "pg") == (float(on_server), 0.0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert gauges(registry, "pg") == (float(on_server), 0.0)
    assert 1 <= on_server <= 3
    txn = "sqlprobe_transaction_duration_seconds_count"
    commits = registry.get_sample_value(txn, {"engine": "pg", "outcome": "commit"})
    rollbacks = registry.get_sample_value(txn, {"engine": "pg", "outcome": "rollback"})
    per_kind = [sum(1 for n in range(6) for i in range(12) if (n + i) % 5 == k) for k in range(5)]
    assert commits == per_kind[0]
    # Errors, invalidations (the open transaction is lost), detached connections and
    # plain connect/close blocks (SQLAlchemy rolls back what was never committed).
    assert rollbacks == per_kind[1] + per_kind[2] + per_kind[3] + per_kind[4]
    assert sample(registry, INVALIDATIONS, engine="pg") == per_kind[2]


def test_buckets(tmp_path: Any) -> None:
    """Pool histograms use the probe's buckets when given, else the defaults up to 300 s."""
    default, custom = CollectorRegistry(), CollectorRegistry()
    engine = create_engine(f"sqlite:///{tmp_path}/k.db")
    other = create_engine(f"sqlite:///{tmp_path}/k2.db")
    sqlprobe.attach(engine, registry=default, name="lite")
    sqlprobe.attach(other, registry=custom, name="lite", buckets=[0.5, 1.0])
    for registry, bounds in ((default, ("0.0001", "10.0", "300.0")), (custom, ("0.5", "1.0"))):
        for name in (WAIT, USE, CONNECT):
            for le in (*bounds, "+Inf"):
                labels = {"engine": "lite", "le": le}
                assert registry.get_sample_value(f"{name}_bucket", labels) == 0.0, (name, le)
    assert custom.get_sample_value(f"{WAIT}_bucket", {"engine": "lite", "le": "10.0"}) is None
    engine.dispose()
    other.dispose()


@pytest.mark.parametrize(
    "url",
    ["sqlite:////nonexistent-sqlprobe-dir/x.db", "postgresql+psycopg://postgres@127.0.0.1:1/test"],
)
def test_refused_connection_is_a_connect_error_not_a_query_error(
    registry: CollectorRegistry, url: str
) -> None:
    """A checkout whose DBAPI connect fails counts in connect errors; no statement ran."""
    engine = create_engine(url)
    sqlprobe.attach(engine, registry=registry, name="down")
    try:
        for _ in range(2):
            with pytest.raises(sa_exc.OperationalError):
                engine.connect()
        labels = {"engine": "down", "error": "OperationalError"}
        assert registry.get_sample_value("sqlprobe_pool_connect_errors_total", labels) == 2
        assert total(registry, "sqlprobe_query_errors_total") == 0
        assert total(registry, "sqlprobe_statement_calls_total", engine="down") == 0
        assert sample(registry, f"{WAIT}_count", engine="down") == 0
        assert total(registry, "sqlprobe_internal_errors_total") == 0
    finally:
        engine.dispose()
