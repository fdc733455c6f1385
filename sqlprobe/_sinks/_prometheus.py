"""Prometheus export: per-engine accumulators and one scrape-time Collector per registry.

Why not prometheus_client's ``Counter``/``Histogram`` objects on the statement path:
each ``labels()`` call takes a lock and each ``inc``/``observe`` takes another, which
costs about 0.3-0.7 µs apiece; a statement updates four series, so the naive design
alone would eat the whole per-statement budget. Instead every engine keeps plain
accumulators that one uncontended lock guards (one acquisition per statement, exact
under threads), and a ``Collector`` turns them into metric families when Prometheus
scrapes. That is the extension point prometheus_client documents for exactly this.

Probes whose engines share a name on the same registry share one ``EngineSeries``:
their counts add up under one ``engine`` label instead of producing duplicate series.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from time import time
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

__all__ = [
    "INFO_STATEMENT_LIMIT",
    "MAX_ERROR_CLASSES",
    "OTHER",
    "EngineSeries",
    "Families",
    "Histogram",
    "PrometheusExporter",
    "ShapeStats",
]

#: The fingerprint label of every shape beyond ``max_fingerprints``.
OTHER = "_other"
#: ``sqlprobe_statement_info{statement=...}`` carries at most this many characters.
INFO_STATEMENT_LIMIT = 200
#: Distinct ``error`` label values per engine before further classes become ``_other``.
MAX_ERROR_CLASSES = 50
#: Operations whose slow-query counters exist from attach on, so alerts see 0, not nothing.
PRESET_OPERATIONS = ("SELECT", "INSERT", "UPDATE", "DELETE")


class Histogram:
    """Bucket counts (not cumulative) and a sum; ``exemplars`` hold one per bucket or None.

    An exemplar slot holds either a prometheus_client ``Exemplar`` or, as the statement
    path stores it, a raw ``(span_context, value, timestamp)`` tuple: formatting the
    trace and span ids as hex is left to the scrape, which sees only the last exemplar
    of each bucket.
    """

    __slots__ = ("counts", "exemplars", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0.0
        self.exemplars: list[Any] | None = None

    def samples(self, bounds: tuple[float, ...]) -> tuple[list[tuple[Any, ...]], int, float]:
        """Cumulative ``(le, count[, exemplar])`` buckets, the count and the sum."""
        buckets: list[tuple[Any, ...]] = []
        acc = 0
        exemplars = self.exemplars
        for i, count in enumerate(self.counts):
            acc += count
            le = _format_le(bounds[i]) if i < len(bounds) else "+Inf"
            if exemplars is not None and exemplars[i] is not None:
                buckets.append((le, acc, _exemplar(exemplars[i])))
            else:
                buckets.append((le, acc))
        return buckets, acc, self.total


def _exemplar(raw: Any) -> Exemplar:
    if isinstance(raw, Exemplar):
        return raw
    ctx, value, timestamp = raw
    labels = {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
    return Exemplar(labels, value, timestamp)


def _format_le(bound: float) -> str:
    return repr(float(bound))


class ShapeStats:
    """Counters of one statement shape (or of the ``_other`` overflow) on one engine."""

    __slots__ = ("calls", "fingerprint", "operation", "rows", "seconds", "statement", "table")

    def __init__(self, fingerprint: str, operation: str, table: str, statement: str) -> None:
        self.fingerprint = fingerprint
        self.operation = operation
        self.table = table
        self.statement = statement[:INFO_STATEMENT_LIMIT]
        self.calls = 0
        self.seconds = 0.0
        self.rows = 0


class OpStats:
    """Per-operation series of one engine: the duration histogram and the slow counter."""

    __slots__ = ("hist", "slow")

    def __init__(self, size: int) -> None:
        self.hist = Histogram(size)
        self.slow = 0


class Families:
    """Metric families built during one scrape, created on first use and shared by engines."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def counter(self, name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = CounterMetricFamily(name, doc, labels=labels)
        return fam  # type: ignore[return-value]

    def gauge(self, name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = GaugeMetricFamily(name, doc, labels=labels)
        return fam  # type: ignore[return-value]

    def histogram(self, name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = HistogramMetricFamily(name, doc, labels=labels)
        return fam  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class EngineSeries:
    """All exported state of one ``engine`` label on one registry.

    The statement path calls :meth:`observe` (one lock acquisition); everything else
    (new shapes, errors, scrapes) is rare and may take the same lock.
    """

    def __init__(self, name: str, buckets: tuple[float, ...], max_fingerprints: int) -> None:
        self.name = name
        self.bounds = buckets
        self.max_fingerprints = max_fingerprints
        self.lock = threading.Lock()
        # The statement path takes the lock by hand: ``with`` costs about 75 ns more.
        self._acquire = self.lock.acquire
        self._release = self.lock.release
        self.shapes: dict[str, ShapeStats] = {}
        self.other = self._new_shape(OTHER, "OTHER", "", "(shapes beyond max_fingerprints)")
        self.ops: dict[str, OpStats] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.error_classes: set[str] = set()
        self.refs = 0
        #: Other parts of sqlprobe (pool, N+1, transactions) add their series here.
        self.parts: list[Callable[[Families, str], None]] = []
        for op in PRESET_OPERATIONS:
            self.ops[op] = self._new_op(op)

    def _new_shape(self, fingerprint: str, operation: str, table: str, text: str) -> ShapeStats:
        """Make the stats of a new shape (multiprocess mode adds its own series here)."""
        return ShapeStats(fingerprint, operation, table, text)

    def _new_op(self, operation: str) -> OpStats:
        """Make the per-operation series of a new operation."""
        return OpStats(len(self.bounds) + 1)

    # -- statement path -------------------------------------------------------------

    def observe(
        self, stats: ShapeStats, op: OpStats, elapsed: float, rows: int, span: Any = None
    ) -> None:
        """Count one statement execution of ``elapsed`` seconds that reported ``rows``.

        ``span`` (an OpenTelemetry SpanContext, or None) becomes the exemplar of the
        duration bucket the observation falls in, so a latency panel links to the trace
        of a recent statement in each bucket. Exemplars are shown only in OpenMetrics
        exposition, and prometheus_client's multiprocess mode drops them (its files
        hold values only): under gunicorn workers there are no exemplars.
        """
        i = bisect_left(self.bounds, elapsed)
        self._acquire()
        try:
            stats.calls += 1
            stats.seconds += elapsed
            if rows > 0:
                stats.rows += rows
            hist = op.hist
            hist.counts[i] += 1
            hist.total += elapsed
            if span is not None:
                exemplars = hist.exemplars
                if exemplars is None:
                    exemplars = hist.exemplars = [None] * len(hist.counts)
                exemplars[i] = (span, elapsed, time())
        finally:
            self._release()

    def observe_slow(self, op: OpStats) -> None:
        """Count one statement over the slow-query threshold."""
        with self.lock:
            op.slow += 1

    # -- rare paths -------------------------------------------------------------------

    def shape(self, fingerprint: str, operation: str, table: str, statement: str) -> ShapeStats:
        """The stats of a shape, created if there is room, else the ``_other`` overflow."""
        stats = self.shapes.get(fingerprint)
        if stats is not None:
            return stats
        with self.lock:
            stats = self.shapes.get(fingerprint)
            if stats is None:
                if len(self.shapes) >= self.max_fingerprints:
                    return self.other
                stats = self.shapes[fingerprint] = self._new_shape(
                    fingerprint, operation, table, statement
                )
            return stats

    def op(self, operation: str) -> OpStats:
        """The per-operation series (operations are a fixed, small set)."""
        stats = self.ops.get(operation)
        if stats is None:
            with self.lock:
                stats = self.ops.get(operation)
                if stats is None:
                    stats = self.ops[operation] = self._new_op(operation)
        return stats

    def observe_error(self, operation: str, error: str) -> None:
        """Count one failed statement by operation and exception class name."""
        with self.lock:
            if error not in self.error_classes:
                if len(self.error_classes) >= MAX_ERROR_CLASSES:
                    error = OTHER
                else:
                    self.error_classes.add(error)
            key = (operation, error)
            self.errors[key] = self.errors.get(key, 0) + 1

    def collect_into(self, fams: Families) -> None:
        """Add this engine's samples to the scrape's families."""
        engine = self.name
        bounds = self.bounds
        with self.lock:
            shapes = list(self.shapes.values())
            if self.other.calls:
                shapes.append(self.other)
            snapshot = [
                (s.fingerprint, s.operation, s.table, s.statement, s.calls, s.seconds, s.rows)
                for s in shapes
            ]
            hists = [(op, s.hist.samples(bounds), s.slow) for op, s in self.ops.items()]
            errors = list(self.errors.items())

        duration = fams.histogram(
            "sqlprobe_query_duration_seconds",
            "Time of each statement's execution.",
            ["engine", "operation"],
        )
        slow = fams.counter(
            "sqlprobe_slow_queries",
            "Statements over the slow-query threshold.",
            ["engine", "operation"],
        )
        for op, (buckets, _count, total), slow_count in hists:
            if _count or op in PRESET_OPERATIONS:
                duration.add_metric([engine, op], buckets, total)
            slow.add_metric([engine, op], slow_count)

        calls = fams.counter(
            "sqlprobe_statement_calls", "Executions per statement shape.", ["engine", "fingerprint"]
        )
        seconds = fams.counter(
            "sqlprobe_statement_seconds",
            "Total execution time per statement shape.",
            ["engine", "fingerprint"],
        )
        rows = fams.counter(
            "sqlprobe_statement_rows",
            "Rows the driver reported per statement shape (rowcount >= 0).",
            ["engine", "fingerprint"],
        )
        info = fams.gauge(
            "sqlprobe_statement_info",
            "The normalized text of a statement shape, to join on by fingerprint.",
            ["engine", "fingerprint", "operation", "table", "statement"],
        )
        for fp, operation, table, text, n, secs, nrows in snapshot:
            calls.add_metric([engine, fp], n)
            seconds.add_metric([engine, fp], secs)
            rows.add_metric([engine, fp], nrows)
            info.add_metric([engine, fp, operation, table, text], 1)

        errs = fams.counter(
            "sqlprobe_query_errors",
            "Failed statements by exception class name.",
            ["engine", "operation", "error"],
        )
        for (operation, error), n in errors:
            errs.add_metric([engine, operation, error], n)

        for part in list(self.parts):
            part(fams, engine)


class PrometheusExporter(Collector):
    """The one sqlprobe collector on a registry: every attached engine's series."""

    #: What an engine's series is made of (multiprocess mode writes through files).
    series_class: type[EngineSeries] = EngineSeries

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engines: dict[str, EngineSeries] = {}
        self.internal_errors: dict[str, int] = {}
        self.registered = False

    def engine_series(
        self, name: str, buckets: tuple[float, ...], max_fingerprints: int
    ) -> EngineSeries:
        """Get or create the series of an engine name; counts a reference."""
        with self.lock:
            series = self.engines.get(name)
            if series is None:
                series = self.engines[name] = self.series_class(name, buckets, max_fingerprints)
            elif series.bounds != buckets:
                raise ValueError(
                    f"engine name {name!r} is already attached on this registry with other "
                    "buckets; give this engine another name= or the same buckets"
                )
            series.refs += 1
            return series

    def release(self, series: EngineSeries) -> bool:
        """Drop a reference; returns True when no engine is left on this exporter."""
        with self.lock:
            series.refs -= 1
            if series.refs <= 0 and self.engines.get(series.name) is series:
                del self.engines[series.name]
            return not self.engines

    def internal_error(self, stage: str) -> None:
        """Count one contained failure inside sqlprobe."""
        with self.lock:
            self.internal_errors[stage] = self.internal_errors.get(stage, 0) + 1

    def collect(self) -> Iterable[Metric]:
        from .. import _state

        _state.run_deferred()
        fams = Families()
        with self.lock:
            engines = list(self.engines.values())
            internal = list(self.internal_errors.items())
        for series in engines:
            series.collect_into(fams)
        errors = fams.counter(
            "sqlprobe_internal_errors",
            "Failures inside sqlprobe that were contained.",
            ["stage"],
        )
        for stage, n in internal:
            errors.add_metric([stage], n)
        return list(fams)

    def describe(self) -> Iterable[Metric]:
        # Registering must not run a scrape (the registry calls collect() when a
        # collector has no describe()); the names are fixed, so say them up front.
        return [
            HistogramMetricFamily("sqlprobe_query_duration_seconds", ""),
            CounterMetricFamily("sqlprobe_slow_queries", ""),
            CounterMetricFamily("sqlprobe_statement_calls", ""),
            CounterMetricFamily("sqlprobe_statement_seconds", ""),
            CounterMetricFamily("sqlprobe_statement_rows", ""),
            GaugeMetricFamily("sqlprobe_statement_info", ""),
            CounterMetricFamily("sqlprobe_query_errors", ""),
            CounterMetricFamily("sqlprobe_internal_errors", ""),
        ]
