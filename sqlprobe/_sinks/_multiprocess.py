"""Prometheus multiprocess mode: gunicorn and other pre-fork servers.

Under a pre-fork server each worker process has its own memory, and a scrape reaches
one process at random: per-process accumulators read at scrape time would show one
worker's counts. prometheus_client's multiprocess mode solves that with one
memory-mapped file per process and metric type under ``PROMETHEUS_MULTIPROC_DIR``,
which ``MultiProcessCollector`` adds up at scrape time. sqlprobe follows it when it is
on (the environment variable is set *before* prometheus_client is imported, as that
mode requires): every series is then also written through prometheus_client's own
metric objects, whose values live in those files. Every family of the family table
exists in this mode too; scrape-time gauges cannot work across processes, so the pool
gauges are written on every pool event instead (``livesum``: the connections of live
workers add up).

What changes in this mode:

* each statement writes a few mmap values (about 1-2 µs more per statement than the
  default mode, which keeps plain in-process accumulators);
* exemplars are dropped (the files hold values only), as prometheus_client documents;
* ``sqlprobe_pool_peak_connections`` cannot be reset by a scrape the workers never see:
  each worker writes the most connections it had in use in the current and the previous
  minute (:data:`PEAK_WINDOW`), and the workers' values add up (``livesum``);
* the ``route`` labels of the per-unit-of-work histograms are bounded per process;
* sqlprobe registers nothing on a registry: serve the aggregate with
  ``sqlprobe.start_http_server()`` (it builds a ``MultiProcessCollector`` registry) or
  your own ``MultiProcessCollector``; and call
  ``prometheus_client.multiprocess.mark_process_dead(pid)`` from the server's
  ``child_exit`` hook so that a dead worker's ``livesum`` gauges disappear
  (see the multiprocess documentation for a gunicorn configuration).

Counters, the histograms and ``sqlprobe_statement_info`` (``max``) keep the values of
workers that have exited, so totals never go backwards when a worker is recycled.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from ._families import BY_NAME, buckets_for
from ._prometheus import OTHER, EngineSeries, OpStats, PrometheusExporter, ShapeStats

__all__ = ["PEAK_WINDOW", "MultiprocessExporter", "multiprocess_active"]

#: Seconds of one peak window in multiprocess mode (the gauge covers two).
PEAK_WINDOW = 60.0


def multiprocess_active() -> bool:
    """Whether prometheus_client writes its values to multiprocess files in this process."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return False
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


class _Metrics:
    """prometheus_client metric objects of this process, made from the family table.

    Created with ``registry=None``: their values go to the files, and the scraping
    process reads them through ``MultiProcessCollector``. One object per name (and per
    bucket layout for histograms): two objects of one name would overwrite each other's
    file entries.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: dict[tuple[str, tuple[float, ...]], Any] = {}

    def get(self, name: str, buckets: tuple[float, ...] = ()) -> Any:
        spec = BY_NAME[name]
        bounds = buckets_for(spec, buckets) if spec.kind == "histogram" else ()
        key = (name, bounds)
        with self._lock:
            metric = self._made.get(key)
            if metric is None:
                labels = list(spec.labels)
                if spec.kind == "counter":
                    metric = Counter(name, spec.help, labels, registry=None)
                elif spec.kind == "gauge":
                    metric = Gauge(
                        name,
                        spec.help,
                        labels,
                        multiprocess_mode=spec.multiprocess_mode or "livesum",
                        registry=None,
                    )
                else:
                    metric = Histogram(name, spec.help, labels, buckets=bounds, registry=None)
                self._made[key] = metric
            return metric


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
    """An engine's series written through prometheus_client's multiprocess values too.

    The in-process accumulators of the base class are kept: they serve
    :meth:`sqlprobe.Probe.statements` (this process's view) and cost little.
    """

    metrics: _Metrics

    def __init__(self, name: str, buckets: tuple[float, ...], max_fingerprints: int) -> None:
        super().__init__(name, buckets, max_fingerprints)
        m, engine = self.metrics, name
        self.mp_wait = m.get("sqlprobe_pool_checkout_wait_seconds", buckets).labels(engine)
        self.mp_use = m.get("sqlprobe_pool_connection_use_seconds", buckets).labels(engine)
        self.mp_connect = m.get("sqlprobe_pool_connect_seconds", buckets).labels(engine)
        txn = m.get("sqlprobe_transaction_duration_seconds", buckets)
        self.mp_txn = {o: txn.labels(engine, o) for o in ("commit", "rollback")}
        self.mp_timeouts = m.get("sqlprobe_pool_checkout_timeouts").labels(engine)
        self.mp_connects = m.get("sqlprobe_pool_connects").labels(engine)
        self.mp_invalidations = m.get("sqlprobe_pool_invalidations").labels(engine)
        connections = m.get("sqlprobe_pool_connections")
        self.mp_idle = connections.labels(engine, "idle")
        self.mp_used = connections.labels(engine, "used")
        self.mp_max = m.get("sqlprobe_pool_max_connections").labels(engine)
        for counter in (self.mp_timeouts, self.mp_connects, self.mp_invalidations):
            counter.inc(0)
        self.mp_idle_hist = m.get("sqlprobe_pool_connection_idle_seconds", buckets).labels(engine)
        self.mp_peak = m.get("sqlprobe_pool_peak_connections").labels(engine)
        #: (window start, peak in it, peak of the previous window)
        self._peak_window = [time.monotonic(), 0, 0]

    def pending(self) -> None:
        """None: each pool value is written to the files (and the gauges) at once."""
        return None

    def _new_shape(
        self, fingerprint: str, operation: str, table: str, text: str, op: OpStats
    ) -> ShapeStats:
        stats = _MPShapeStats(fingerprint, operation, table, text, op)
        m, engine = self.metrics, self.name
        stats.mp_calls = m.get("sqlprobe_statement_calls").labels(engine, fingerprint)
        stats.mp_seconds = m.get("sqlprobe_statement_seconds").labels(engine, fingerprint)
        stats.mp_rows = m.get("sqlprobe_statement_rows").labels(engine, fingerprint)
        m.get("sqlprobe_statement_info").labels(
            engine, fingerprint, operation, table, stats.statement
        ).set(1)
        return stats

    def _new_op(self, operation: str) -> OpStats:
        op = _MPOpStats(operation, self.bounds)
        m = self.metrics
        op.mp_hist = m.get("sqlprobe_query_duration_seconds", self.bounds).labels(
            self.name, operation
        )
        op.mp_slow = m.get("sqlprobe_slow_queries").labels(self.name, operation)
        op.mp_slow.inc(0)
        return op

    def _overflow(self, op: OpStats) -> ShapeStats:
        stats = _MPShapeStats(OTHER, op.name, "", "(shapes beyond max_fingerprints)", op)
        m, engine = self.metrics, self.name
        stats.mp_calls = m.get("sqlprobe_statement_calls").labels(engine, OTHER)
        stats.mp_seconds = m.get("sqlprobe_statement_seconds").labels(engine, OTHER)
        stats.mp_rows = m.get("sqlprobe_statement_rows").labels(engine, OTHER)
        return stats

    def observe(self, stats: ShapeStats, elapsed: float, rows: int, span: Any) -> None:
        super().observe(stats, elapsed, rows, None)
        stats.mp_calls.inc()  # type: ignore[attr-defined]
        stats.mp_seconds.inc(elapsed)  # type: ignore[attr-defined]
        if rows > 0:
            stats.mp_rows.inc(rows)  # type: ignore[attr-defined]
        stats.op.mp_hist.observe(elapsed)  # type: ignore[attr-defined]

    def observe_slow(self, stats: ShapeStats) -> None:
        super().observe_slow(stats)
        stats.op.mp_slow.inc()  # type: ignore[attr-defined]

    def observe_error(self, stats: ShapeStats, error: str) -> None:
        super().observe_error(stats, error)
        if error not in self.error_classes:
            error = OTHER
        self.metrics.get("sqlprobe_query_errors").labels(self.name, stats.operation, error).inc()

    def detected(self, fingerprint: str, relationship: str) -> None:
        super().detected(fingerprint, relationship)
        with self.lock:
            fingerprint = fingerprint if fingerprint in self.shapes else OTHER
            key = (fingerprint, relationship)
            if key not in self.n_plus_one:
                key = (OTHER, "")
        self.metrics.get("sqlprobe_n_plus_one").labels(self.name, *key).inc()

    def advised(self, table: str, columns: str, proven: bool) -> None:
        super().advised(table, columns, proven)
        key = (table, columns, "true" if proven else "false")
        if key in self.advice:
            self.metrics.get("sqlprobe_index_advice_info").labels(self.name, *key).set(1)

    # -- pool: written per event, gauges refreshed from the pools' own state --------

    def _gauges(self, returning: bool = False) -> None:
        idle, used, limit, _live = self.pool_snapshot()
        if returning and used > 0:
            # The checkin event fires before the pool takes the connection back: count
            # it as returned already (a NullPool closes it instead of keeping it).
            used -= 1
            if all(keeps for _source, keeps in self.pools):
                idle += 1
        self.mp_idle.set(idle)
        self.mp_used.set(used)
        if limit is not None:
            self.mp_max.set(limit)
        window = self._peak_window
        now = time.monotonic()
        if now - window[0] >= PEAK_WINDOW:
            window[:] = [now, 0, window[1] if now - window[0] < 2 * PEAK_WINDOW else 0]
        in_use = used + (1 if returning else 0)
        if in_use > window[1]:
            window[1] = in_use
        self.mp_peak.set(max(window[1], window[2]))

    def idle(self, seconds: float) -> None:
        super().idle(seconds)
        self.mp_idle_hist.observe(seconds)

    def unit(self, route: str, statements: int, seconds: float, wait: float, limit: int) -> None:
        super().unit(route, statements, seconds, wait, limit)
        with self.lock:
            label = route if route in self.units else OTHER
        m = self.metrics
        m.get("sqlprobe_scope_statements").labels(self.name, label).observe(statements)
        m.get("sqlprobe_scope_db_seconds", self.bounds).labels(self.name, label).observe(seconds)
        m.get("sqlprobe_scope_pool_wait_seconds", self.bounds).labels(self.name, label).observe(
            wait
        )

    def add_pool(self, source: Any, keeps: bool) -> None:
        super().add_pool(source, keeps)
        self._gauges()

    def checkout(self, seconds: float) -> None:
        super().checkout(seconds)
        self.mp_wait.observe(seconds)
        self._gauges()

    def checkin(self, seconds: float) -> None:
        super().checkin(seconds)
        self.mp_use.observe(seconds)
        self._gauges(returning=True)

    def connected(self, seconds: float) -> None:
        super().connected(seconds)
        self.mp_connect.observe(seconds)
        self.mp_connects.inc()

    def connect_failed(self, error: str) -> None:
        super().connect_failed(error)
        if error not in self.error_classes:
            error = OTHER
        self.metrics.get("sqlprobe_pool_connect_errors").labels(self.name, error).inc()

    def timeout(self) -> None:
        super().timeout()
        self.mp_timeouts.inc()

    def invalidated(self) -> None:
        super().invalidated()
        self.mp_invalidations.inc()
        self._gauges()

    def transaction(self, outcome: str, seconds: float) -> None:
        super().transaction(outcome, seconds)
        self.mp_txn[outcome].observe(seconds)


class MultiprocessExporter(PrometheusExporter):
    """The process-wide exporter of multiprocess mode; never registered on a registry."""

    def __init__(self, before_collect: Callable[[], None] | None = None) -> None:
        super().__init__(before_collect)
        metrics = self.metrics = _Metrics()

        class Series(MultiprocessSeries):
            pass

        Series.metrics = metrics
        self.series_class = Series

    def internal_error(self, stage: str) -> None:
        super().internal_error(stage)
        self.metrics.get("sqlprobe_internal_errors").labels(stage).inc()
