"""Behaviours that deliberate one-line bugs used to survive: each pinned by a test."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

import sqlprobe
from sqlprobe._core._ratelimit import RateLimiter
from sqlprobe._core._records import EngineInfo
from sqlprobe._sinks._prometheus import EngineSeries, ShapeStats

from .conftest import sample

BOUNDS = (0.001, 0.01, 0.1)


def _series() -> EngineSeries:
    return EngineSeries("pins", BOUNDS, 10)


def _stats(series: EngineSeries) -> ShapeStats:
    from sqlprobe._core._fingerprint import analyze

    return series.prepare(analyze("SELECT 1"))


@pytest.mark.parametrize(
    ("value", "bucket"),
    [(0.0005, 0), (0.001, 0), (0.0010001, 1), (0.05, 2), (0.1, 2), (0.2, 3), (99.0, 3)],
)
def test_observation_lands_in_its_bucket(value: float, bucket: int) -> None:
    """A duration lands in the first bucket whose upper bound is >= it (le is inclusive)."""
    series = _series()
    stats = _stats(series)
    series.observe(stats, value, -1, None)
    counts = stats.op.hist.counts
    assert counts == [1 if i == bucket else 0 for i in range(len(BOUNDS) + 1)]
    buckets, count, total = stats.op.hist.samples()
    assert count == 1 and total == value
    cumulative = [b[1] for b in buckets]
    assert cumulative == [0] * bucket + [1] * (len(BOUNDS) + 1 - bucket)


def test_exemplar_sits_on_the_bucket_of_its_observation(
    sqlite_engine: Engine, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """The trace exemplar is attached to the bucket the statement's duration fell in."""
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    sqlprobe.attach(
        sqlite_engine, registry=registry, tracer_provider=provider, buckets=[1e-9, 1e-8, 10.0]
    )
    tracer = provider.get_tracer("pins")
    with tracer.start_as_current_span("request"), sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    body = openmetrics(registry).decode()
    lines = [
        ln for ln in body.splitlines()
        if ln.startswith("sqlprobe_query_duration_seconds_bucket") and 'operation="SELECT"' in ln
    ]  # fmt: skip
    with_exemplar = [ln for ln in lines if "trace_id" in ln]
    assert len(with_exemplar) == 1, lines
    assert 'le="10.0"' in with_exemplar[0]


def test_suppressed_count_resets_after_it_is_reported() -> None:
    """The suppressed count is reported once with the next admitted event, then is 0."""
    now = [0.0]
    limiter = RateLimiter(per_key=1, total=100, interval=10.0, clock=lambda: now[0])
    assert limiter.admit("k") == 0
    assert limiter.admit("k") is None
    assert limiter.admit("k") is None
    now[0] = 10.0
    assert limiter.admit("k") == 2
    now[0] = 20.0
    assert limiter.admit("k") == 0


def test_use_time_excludes_the_checkout_wait(
    tmp_path: Any, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A checkout that waited 0.3 s for a connection and held it 0.05 s uses 0.05 s."""
    engine = create_engine(
        f"sqlite:///{tmp_path / 'pin.db'}", poolclass=QueuePool, pool_size=1, max_overflow=0
    )
    probe = sqlprobe.attach(engine, registry=registry, name="pin")
    holder = engine.connect()
    released = threading.Event()

    def release() -> None:
        time.sleep(0.3)
        holder.close()
        released.set()

    threading.Thread(target=release).start()
    conn = engine.connect()  # waits about 0.3 s
    assert released.is_set()
    time.sleep(0.05)
    conn.close()
    wait = sample(registry, "sqlprobe_pool_checkout_wait_seconds_sum", engine="pin")
    use = sample(registry, "sqlprobe_pool_connection_use_seconds_sum", engine="pin")
    uses = sample(registry, "sqlprobe_pool_connection_use_seconds_count", engine="pin")
    assert wait >= 0.28
    assert uses == 2
    # The holder's ~0.3 s plus the waiter's ~0.05 s; the wait is not in it.
    assert 0.33 <= use < 0.33 + 0.2, use
    probe.detach()
    engine.dispose()


@pytest.fixture
def switch_often() -> Iterator[None]:
    """Threads switch every microsecond: an unlocked read-modify-write loses updates."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_counts_stay_exact_when_threads_switch_constantly(switch_often: None) -> None:
    """Eight threads updating one series lose no increment while switching constantly.

    Under CPython's GIL an unlocked ``+=`` survives this too; that the lock is what keeps
    the counts exact is pinned by ``test_every_update_happens_under_the_series_lock``.
    """
    series = _series()
    stats = _stats(series)
    n = 20_000

    def work() -> None:
        for _ in range(n):
            series.observe(stats, 0.002, 1, None)
            series.checkout(0.002)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.calls == 8 * n
    assert stats.rows == 8 * n
    assert sum(stats.op.hist.counts) == 8 * n
    assert sum(series.wait.counts) == 8 * n


class _LockedList(list[Any]):
    """A bucket-count list that fails when it is written without the series lock."""

    lock: Any = None

    def __setitem__(self, index: Any, value: Any) -> None:
        assert self.lock.locked(), "a bucket count was updated outside the series lock"
        super().__setitem__(index, value)


class _GuardedStats(ShapeStats):
    """Shape counters that fail when they are written without the series lock."""

    __slots__ = ("_calls", "_lock", "_rows", "_seconds")

    def _check(self) -> None:
        lock = getattr(self, "_lock", None)
        assert lock is None or lock.locked(), "a counter was updated outside the series lock"

    def _get(name: str) -> Any:  # type: ignore[misc]
        return property(
            lambda self: getattr(self, name),
            lambda self, value: (self._check(), setattr(self, name, value)),
        )

    calls = _get("_calls")
    rows = _get("_rows")
    seconds = _get("_seconds")


class _GuardedSeries(EngineSeries):
    def _new_shape(self, fingerprint: str, operation: str, table: str, text: str, op: Any) -> Any:
        stats = _GuardedStats(fingerprint, operation, table, text, op)
        stats._lock = self.lock
        return stats


def test_every_update_happens_under_the_series_lock() -> None:
    """Counters and buckets are written only while the lock is held (exact without a GIL)."""
    series = _GuardedSeries("pins", BOUNDS, 10)
    stats = _stats(series)
    for hist in (stats.op.hist, series.wait, series.use):
        counts = _LockedList(hist.counts)
        counts.lock = series.lock
        hist.counts = counts
    series.observe(stats, 0.002, 3, None)
    series.checkout(0.002)
    series.checkin(0.002)
    assert (stats.calls, stats.rows) == (1, 3)
    assert sum(series.wait.counts) == sum(series.use.counts) == 1
    # The guard works: a write outside the lock fails.
    with pytest.raises(AssertionError, match="outside the series lock"):
        stats.calls += 1


def test_engine_info_has_no_credentials(registry: CollectorRegistry) -> None:
    """The engine label never carries the user or the password."""
    engine = create_engine("postgresql+psycopg://alice:s3cret@db.example:6543/shop")
    probe = sqlprobe.attach(engine, registry=registry)
    try:
        info = probe.info
        assert isinstance(info, EngineInfo)
        assert info.name == "postgresql://db.example:6543/shop"
        assert "s3cret" not in repr(info) and "alice" not in repr(info)
    finally:
        probe.detach()


def test_internal_error_event_names_the_class_and_the_place_only() -> None:
    """A contained failure logs its stage, engine, class and file:line, once per minute."""
    from structlog.testing import LogCapture

    from sqlprobe._core._contain import Containment

    from .conftest import make_logger

    logs = LogCapture()
    counted: list[str] = []
    now = [0.0]
    contain = Containment("pins", counted.append, make_logger(logs))
    contain.limiter.clock = lambda: now[0]

    def fail() -> None:
        raise KeyError("secret-value")

    for _ in range(3):
        try:
            fail()
        except KeyError:
            contain("stage-a")
    now[0] = 61.0
    try:
        fail()
    except KeyError:
        contain("stage-a")
    assert counted == ["stage-a"] * 4
    events = [e for e in logs.entries if e["event"] == "internal_error"]
    assert len(events) == 2
    line = fail.__code__.co_firstlineno + 1
    assert events[0] == {
        "event": "internal_error",
        "level": "error",
        "log_level": "error",
        "stage": "stage-a",
        "engine": "pins",
        "error": "KeyError",
        "where": f"test_pins.py:{line} in fail",
    }
    assert "secret-value" not in repr(events)


def test_rate_limiter_keeps_at_most_max_keys_evicting_the_least_recent() -> None:
    """Beyond max_keys the key seen least recently is forgotten (with its count)."""
    limiter = RateLimiter(per_key=1, total=10_000, interval=60.0, max_keys=3, clock=lambda: 0.0)
    for key in "abc":
        assert limiter.admit(key) == 0
    assert limiter.admit("a") is None  # a is now the most recent
    assert limiter.admit("d") == 0  # evicts b
    assert len(limiter) == 3
    assert limiter.admit("b") == 0  # forgotten, so admitted again (evicts c)
    assert limiter.admit("a") is None  # still remembered
    assert RateLimiter().max_keys == 1000


def test_pool_values_wait_in_bounded_lists_and_settle_exactly(
    tmp_path: Any, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """Checkout, use, idle and commit values are appended, kept bounded, and all exported."""
    from sqlprobe._hooks._pool import SETTLE_AT

    engine = create_engine(f"sqlite:///{tmp_path / 'settle.db'}", poolclass=QueuePool)
    probe = sqlprobe.attach(engine, registry=registry, name="settle")
    series = probe._series
    pending = series.pending()
    assert pending is not None
    n = 3 * SETTLE_AT + 7
    for _ in range(n):
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        assert all(len(values) < SETTLE_AT for values in pending)
    # Some values are still pending now; a scrape counts them all.
    assert any(pending)
    for family in (
        "sqlprobe_pool_checkout_wait_seconds",
        "sqlprobe_pool_connection_use_seconds",
        "sqlprobe_pool_connection_idle_seconds",
    ):
        assert sample(registry, f"{family}_count", engine="settle") == n, family
    commits = sample(
        registry, "sqlprobe_transaction_duration_seconds_count", engine="settle", outcome="commit"
    )
    assert commits == n
    assert not any(pending)
    probe.detach()
    engine.dispose()


def test_reset_rollback_after_commit_is_not_a_transaction(
    tmp_path: Any, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """The pool's rollback-on-return after a COMMIT counts no rollback transaction."""
    engine = create_engine(f"sqlite:///{tmp_path / 'reset.db'}", poolclass=QueuePool)
    probe = sqlprobe.attach(engine, registry=registry, name="reset")
    for _ in range(3):
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.rollback()

    def count(outcome: str) -> float:
        return sample(
            registry, "sqlprobe_transaction_duration_seconds_count", engine="reset", outcome=outcome
        )

    assert (count("commit"), count("rollback")) == (3, 1)
    probe.detach()
    engine.dispose()


def test_settling_writes_buckets_only_under_the_series_lock() -> None:
    """Pending pool values reach their buckets only while the series lock is held."""
    series = _GuardedSeries("pins", BOUNDS, 10)
    for hist in (series.wait, series.use, series.idle_hist, *series.txn.values()):
        counts = _LockedList(hist.counts)
        counts.lock = series.lock
        hist.counts = counts
    pending = series.pending()
    assert pending is not None
    for values in pending:
        values.extend([0.0005, 0.05, 0.2])
    series.settle()
    for hist in (series.wait, series.use, series.idle_hist, *series.txn.values()):
        assert list(hist.counts) == [1, 0, 1, 1]
        assert hist.total == pytest.approx(0.2505)
    assert not any(pending)


def test_pending_values_stay_exact_when_threads_switch_constantly(switch_often: None) -> None:
    """Values appended by eight threads while another settles are each counted once."""
    series = _series()
    pending = series.pending()
    assert pending is not None
    waits = pending[0]
    n = 20_000
    stop = threading.Event()

    def settler() -> None:
        while not stop.is_set():
            series.settle()

    def work() -> None:
        for _ in range(n):
            waits.append(0.002)

    background = threading.Thread(target=settler)
    background.start()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    background.join()
    series.settle()
    assert sum(series.wait.counts) == 8 * n
    assert series.wait.total == pytest.approx(8 * n * 0.002)
