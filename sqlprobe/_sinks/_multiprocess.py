"""Prometheus multiprocess mode: gunicorn and other pre-fork servers.

Under a pre-fork server each worker process has its own memory, and a scrape reaches
one process at random: per-process accumulators read at scrape time would show one
worker's counts. prometheus_client's multiprocess mode solves that with one
memory-mapped file per process and metric type under ``PROMETHEUS_MULTIPROC_DIR``,
which ``MultiProcessCollector`` adds up at scrape time. sqlprobe follows it when it is
on (the environment variable is set *before* prometheus_client is imported, as that
mode requires): every series is then written through prometheus_client's own metric
objects, whose values live in those files, instead of sqlprobe's in-process
accumulators. Scrape-time collectors cannot work across processes, so the pool
gauges are written on every change instead (``livesum``: the connections of live
workers add up).

What changes in this mode:

* each statement writes a few mmap values (about 1-2 µs more per statement than the
  default mode, which keeps plain in-process accumulators);
* exemplars are dropped (the files hold values only), as prometheus_client documents;
* sqlprobe registers nothing on a registry: serve the aggregate with
  ``sqlprobe.start_http_server()`` (it builds a ``MultiProcessCollector`` registry) or
  your own ``MultiProcessCollector``; and call
  ``prometheus_client.multiprocess.mark_process_dead(pid)`` from the server's
  ``child_exit`` hook so that a dead worker's ``livesum`` gauges disappear
  (see docs/multiprocess.md for a gunicorn configuration).

Counters, the histograms and ``sqlprobe_statement_info`` (``max``) keep the values of
workers that have exited, so totals never go backwards when a worker is recycled.
"""

from __future__ import annotations

import os
import threading
from typing import Any, ClassVar

from prometheus_client import Counter, Gauge, Histogram

from .._sinks._prometheus import (
    OTHER,
    EngineSeries,
    OpStats,
    PrometheusExporter,
    ShapeStats,
)

__all__ = ["MultiprocessExporter", "multiprocess_active"]


def multiprocess_active() -> bool:
    """Whether prometheus_client writes its values to multiprocess files in this process."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return False
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


class _Families:
    """prometheus_client metric objects, one set per process and bucket layout.

    Created with ``registry=None``: in multiprocess mode their values go to the files,
    and the scraping process reads them through ``MultiProcessCollector``.
    """

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _by_buckets: ClassVar[dict[tuple[float, ...], _Families]] = {}
    _shared: ClassVar[dict[str, Any]] = {}

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.duration = Histogram(
            "sqlprobe_query_duration_seconds",
            "Time of each statement's execution.",
            ["engine", "operation"],
            buckets=buckets,
            registry=None,
        )
        shared = _Families._shared
        if not shared:
            shared["calls"] = Counter(
                "sqlprobe_statement_calls",
                "Executions per statement shape.",
                ["engine", "fingerprint"],
                registry=None,
            )
            shared["seconds"] = Counter(
                "sqlprobe_statement_seconds",
                "Total execution time per statement shape.",
                ["engine", "fingerprint"],
                registry=None,
            )
            shared["rows"] = Counter(
                "sqlprobe_statement_rows",
                "Rows the driver reported per statement shape (rowcount >= 0).",
                ["engine", "fingerprint"],
                registry=None,
            )
            shared["info"] = Gauge(
                "sqlprobe_statement_info",
                "The normalized text of a statement shape, to join on by fingerprint.",
                ["engine", "fingerprint", "operation", "table", "statement"],
                multiprocess_mode="max",
                registry=None,
            )
            shared["errors"] = Counter(
                "sqlprobe_query_errors",
                "Failed statements by exception class name.",
                ["engine", "operation", "error"],
                registry=None,
            )
            shared["slow"] = Counter(
                "sqlprobe_slow_queries",
                "Statements over the slow-query threshold.",
                ["engine", "operation"],
                registry=None,
            )
            shared["internal"] = Counter(
                "sqlprobe_internal_errors",
                "Failures inside sqlprobe that were contained.",
                ["stage"],
                registry=None,
            )
        self.calls = shared["calls"]
        self.seconds = shared["seconds"]
        self.rows = shared["rows"]
        self.info = shared["info"]
        self.errors = shared["errors"]
        self.slow = shared["slow"]
        self.internal = shared["internal"]

    @classmethod
    def get(cls, buckets: tuple[float, ...]) -> _Families:
        with cls._lock:
            found = cls._by_buckets.get(buckets)
            if found is None:
                found = cls._by_buckets[buckets] = cls(buckets)
            return found


class _MPShapeStats(ShapeStats):
    __slots__ = ("mp_calls", "mp_rows", "mp_seconds")
    mp_calls: Any
    mp_rows: Any
    mp_seconds: Any


class _MPOpStats(OpStats):
    __slots__ = ("mp_hist", "mp_slow")
    mp_hist: Any
    mp_slow: Any


class MultiprocessSeries(EngineSeries):
    """An engine's series written through prometheus_client's multiprocess values.

    The in-process accumulators of the base class are kept as well: they serve
    :meth:`sqlprobe.Probe.statements` (this process's view) and cost little.
    """

    def __init__(self, name: str, buckets: tuple[float, ...], max_fingerprints: int) -> None:
        self.fams = _Families.get(buckets)
        super().__init__(name, buckets, max_fingerprints)

    def _new_shape(self, fingerprint: str, operation: str, table: str, text: str) -> ShapeStats:
        stats = _MPShapeStats(fingerprint, operation, table, text)
        fams, engine = self.fams, self.name
        stats.mp_calls = fams.calls.labels(engine, fingerprint)
        stats.mp_seconds = fams.seconds.labels(engine, fingerprint)
        stats.mp_rows = fams.rows.labels(engine, fingerprint)
        if fingerprint != OTHER:
            fams.info.labels(engine, fingerprint, operation, table, stats.statement).set(1)
        return stats

    def _new_op(self, operation: str) -> OpStats:
        op = _MPOpStats(len(self.bounds) + 1)
        op.mp_hist = self.fams.duration.labels(self.name, operation)
        op.mp_slow = self.fams.slow.labels(self.name, operation)
        op.mp_slow.inc(0)
        return op

    def observe(
        self, stats: ShapeStats, op: OpStats, elapsed: float, rows: int, span: Any = None
    ) -> None:
        super().observe(stats, op, elapsed, rows)
        stats.mp_calls.inc()  # type: ignore[attr-defined]
        stats.mp_seconds.inc(elapsed)  # type: ignore[attr-defined]
        if rows > 0:
            stats.mp_rows.inc(rows)  # type: ignore[attr-defined]
        op.mp_hist.observe(elapsed)  # type: ignore[attr-defined]

    def observe_slow(self, op: OpStats) -> None:
        super().observe_slow(op)
        op.mp_slow.inc()  # type: ignore[attr-defined]

    def observe_error(self, operation: str, error: str) -> None:
        super().observe_error(operation, error)
        if error not in self.error_classes:
            error = OTHER
        self.fams.errors.labels(self.name, operation, error).inc()


class MultiprocessExporter(PrometheusExporter):
    """The process-wide exporter of multiprocess mode; never registered on a registry."""

    series_class = MultiprocessSeries

    def internal_error(self, stage: str) -> None:
        super().internal_error(stage)
        counter = _Families._shared.get("internal")
        if counter is not None:
            counter.labels(stage).inc()


class _PoolWriter:
    """Writes one probe's pool and transaction measurements to multiprocess files.

    The scrape-time pool collector cannot see other processes, so in this mode every
    measurement is also written as it happens, and the idle/used gauges are set from
    the pool's own state after each event (``livesum``: live workers add up).
    """

    def __init__(self, probe: Any, buckets: tuple[float, ...]) -> None:
        engine = probe.name
        self.pool = probe.pool
        fam = _pool_families(buckets)
        self.wait_h = fam["wait"].labels(engine)
        self.use_h = fam["use"].labels(engine)
        self.connect_h = fam["connect"].labels(engine)
        self.txn = {o: fam["txn"].labels(engine, o) for o in ("commit", "rollback")}
        self.timeouts = fam["timeouts"].labels(engine)
        self.connects = fam["connects"].labels(engine)
        self.invalidations = fam["invalidations"].labels(engine)
        self.idle = fam["connections"].labels(engine, "idle")
        self.used = fam["connections"].labels(engine, "used")
        self.max = fam["max"].labels(engine)
        from sqlalchemy.pool import NullPool

        engine_obj = probe.engine
        pool = getattr(engine_obj, "sync_engine", engine_obj).pool
        self.keeps = not isinstance(pool, NullPool)
        for counter in (self.timeouts, self.connects, self.invalidations):
            counter.inc(0)
        self.gauges()

    def gauges(self, returning: bool = False) -> None:
        idle, used, limit = self.pool.snapshot()
        if returning and used > 0:
            # The checkin event fires before the pool takes the connection back: count
            # it as returned already (a NullPool closes it instead of keeping it).
            used -= 1
            if self.keeps:
                idle += 1
        self.idle.set(idle)
        self.used.set(used)
        if limit is not None:
            self.max.set(limit)

    def wait(self, seconds: float) -> None:
        self.wait_h.observe(seconds)
        self.gauges()

    def use(self, seconds: float) -> None:
        self.use_h.observe(seconds)
        self.gauges(returning=True)

    def create(self, seconds: float) -> None:
        self.connect_h.observe(seconds)
        self.connects.inc()

    def timeout(self) -> None:
        self.timeouts.inc()

    def invalidate(self) -> None:
        self.invalidations.inc()
        self.gauges()

    def transaction(self, outcome: str, seconds: float) -> None:
        self.txn[outcome].observe(seconds)


_pool_fams: dict[tuple[float, ...], dict[str, Any]] = {}
_pool_lock = threading.Lock()


def _pool_families(buckets: tuple[float, ...]) -> dict[str, Any]:
    with _pool_lock:
        found = _pool_fams.get(buckets)
        if found is not None:
            return found
        shared = next(iter(_pool_fams.values()), None)

        def hist(name: str, doc: str, labels: list[str]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=None)

        fam = {
            "wait": hist(
                "sqlprobe_pool_checkout_wait_seconds",
                "Time spent waiting for a connection from the pool.",
                ["engine"],
            ),
            "use": hist(
                "sqlprobe_pool_connection_use_seconds",
                "Time a connection stayed checked out.",
                ["engine"],
            ),
            "connect": hist(
                "sqlprobe_pool_connect_seconds",
                "Time to open a new DBAPI connection.",
                ["engine"],
            ),
            "txn": hist(
                "sqlprobe_transaction_duration_seconds",
                "Begin to end of a transaction.",
                ["engine", "outcome"],
            ),
        }
        if shared is None:
            fam["timeouts"] = Counter(
                "sqlprobe_pool_checkout_timeouts",
                "Checkouts that gave up (pool TimeoutError).",
                ["engine"],
                registry=None,
            )
            fam["connects"] = Counter(
                "sqlprobe_pool_connects", "DBAPI connections opened.", ["engine"], registry=None
            )
            fam["invalidations"] = Counter(
                "sqlprobe_pool_invalidations",
                "Connections invalidated (errors, failed pre-ping, soft).",
                ["engine"],
                registry=None,
            )
            fam["connections"] = Gauge(
                "sqlprobe_pool_connections",
                "Connections now in the pool, by state.",
                ["engine", "state"],
                multiprocess_mode="livesum",
                registry=None,
            )
            fam["max"] = Gauge(
                "sqlprobe_pool_max_connections",
                "pool_size + max_overflow of the engine's pool.",
                ["engine"],
                multiprocess_mode="livesum",
                registry=None,
            )
        else:
            for key in ("timeouts", "connects", "invalidations", "connections", "max"):
                fam[key] = shared[key]
        _pool_fams[buckets] = fam
        return fam


def install(probe: Any) -> Any:
    """In multiprocess mode, write the probe's pool measurements to the shared files."""
    if probe.pool is None or not isinstance(
        getattr(probe.collector, "series", None), MultiprocessSeries
    ):
        return None
    from .._config import DEFAULT_BUCKETS
    from .._hooks._pool import POOL_BUCKETS

    buckets = probe.options.buckets
    writer = _PoolWriter(probe, POOL_BUCKETS if buckets == DEFAULT_BUCKETS else buckets)
    probe.pool.add_observer(writer)
    return lambda: probe.pool.remove_observer(writer)
