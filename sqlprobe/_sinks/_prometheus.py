"""Prometheus export: per-engine accumulators and one scrape-time Collector per registry.

Why not prometheus_client's ``Counter``/``Histogram`` objects on the statement path:
each ``labels()`` call takes a lock and each ``inc``/``observe`` takes another, which
costs about 0.3-0.7 µs apiece; a statement updates four series, so the naive design
alone would eat the whole per-statement budget. Instead every engine keeps plain
accumulators that one uncontended lock guards (one acquisition per statement, exact
under threads), and a ``Collector`` turns them into metric families when Prometheus
scrapes. The families' names, labels and help texts come from ``_families``.

An :class:`EngineSeries` is what the collector and the pool hooks write to: it is the
collector's metrics sink (``prepare``/``observe``...), the pool hooks' pool sink
(``checkout``/``checkin``...) and the N+1 detector's counter (``detected``). Several
probes whose engines share an ``engine`` name on one registry share one series: their
counters and histograms add up, and so do their pool gauges (the maximum is absent if
any of the pools is unbounded).

Series outlive their engines: :meth:`PrometheusExporter.release` (detach, or an engine
collected by the garbage collector) keeps the totals, so nothing counted before is lost
before the next scrape, and an engine attached again under the same name continues
them. At most :data:`MAX_RETAINED_ENGINES` released names are kept per registry (the
oldest released goes first), so applications that make engines per tenant or per test
stay bounded.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import OrderedDict
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

from .._core._fingerprint import Shape
from ._families import BY_NAME, FAMILIES, buckets_for

__all__ = [
    "INFO_STATEMENT_LIMIT",
    "MAX_ERROR_CLASSES",
    "MAX_N_PLUS_ONE_SERIES",
    "MAX_RETAINED_ENGINES",
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
#: ``(fingerprint, relationship)`` label pairs of ``sqlprobe_n_plus_one_total`` per
#: engine before further pairs are counted under ``fingerprint="_other", relationship=""``.
MAX_N_PLUS_ONE_SERIES = 1000
#: Released (detached or collected) engine names whose totals a registry keeps.
MAX_RETAINED_ENGINES = 100
#: Operations whose per-operation series exist from attach on, so alerts see 0.
PRESET_OPERATIONS = ("SELECT", "INSERT", "UPDATE", "DELETE")
OUTCOMES = ("commit", "rollback")

#: A pool's ``(idle, used, max)`` now, or None once its engine is gone.
SnapshotSource = Callable[[], "tuple[int, int, int | None] | None"]


class Histogram:
    """Bucket counts (not cumulative) and a sum; ``exemplars`` hold one per bucket or None.

    An exemplar slot holds either a prometheus_client ``Exemplar`` or, as the statement
    path stores it, a raw ``(span_context, value, timestamp)`` tuple: formatting the
    trace and span ids as hex is left to the scrape, which sees only the last exemplar
    of each bucket.
    """

    __slots__ = ("bounds", "counts", "exemplars", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.exemplars: list[Any] | None = None

    def add(self, value: float) -> None:
        """Count one observation (the caller holds the series lock)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def samples(self) -> tuple[list[tuple[Any, ...]], int, float]:
        """Cumulative ``(le, count[, exemplar])`` buckets, the count and the sum."""
        buckets: list[tuple[Any, ...]] = []
        acc = 0
        exemplars = self.exemplars
        bounds = self.bounds
        for i, count in enumerate(self.counts):
            acc += count
            le = repr(float(bounds[i])) if i < len(bounds) else "+Inf"
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


class OpStats:
    """Per-operation series of one engine: the duration histogram and the slow counter."""

    __slots__ = ("hist", "name", "slow")

    def __init__(self, name: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.hist = Histogram(bounds)
        self.slow = 0


class ShapeStats:
    """Counters of one statement shape (or of one operation's ``_other`` overflow)."""

    __slots__ = ("calls", "fingerprint", "op", "operation", "rows", "seconds", "statement", "table")

    def __init__(
        self, fingerprint: str, operation: str, table: str, statement: str, op: OpStats
    ) -> None:
        self.fingerprint = fingerprint
        self.operation = operation
        self.table = table
        self.statement = statement[:INFO_STATEMENT_LIMIT]
        self.op = op
        self.calls = 0
        self.seconds = 0.0
        self.rows = 0


class Families:
    """Metric families built during one scrape, created on first use and shared by engines."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def get(self, name: str) -> Any:
        """The family ``name`` of this scrape (labels and help from the family table)."""
        fam = self._families.get(name)
        if fam is None:
            spec = BY_NAME[name]
            cls = {
                "counter": CounterMetricFamily,
                "gauge": GaugeMetricFamily,
                "histogram": HistogramMetricFamily,
            }[spec.kind]
            fam = self._families[name] = cls(name, spec.help, labels=list(spec.labels))
        return fam

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class EngineSeries:
    """All exported state of one ``engine`` label on one registry.

    The statement path calls :meth:`observe` (one lock acquisition); everything else
    (new shapes, errors, pool events, scrapes) is rarer and takes the same lock.
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
        #: operation -> the ``_other`` stats of that operation (summed at scrape)
        self.other: dict[str, ShapeStats] = {}
        self.ops: dict[str, OpStats] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.error_classes: set[str] = set()
        self.n_plus_one: dict[tuple[str, str], int] = {}
        #: (table, columns, proven) of the index advice found (bounded)
        self.advice: set[tuple[str, str, str]] = set()
        for op in PRESET_OPERATIONS:
            self.ops[op] = self._new_op(op)
        pool = buckets_for(BY_NAME["sqlprobe_pool_checkout_wait_seconds"], buckets)
        self.pool_bounds = pool
        self.wait = Histogram(pool)
        self.use = Histogram(pool)
        self.connect = Histogram(pool)
        self.txn = {outcome: Histogram(pool) for outcome in OUTCOMES}
        self.timeouts = 0
        self.connects = 0
        self.invalidations = 0
        self.connect_errors: dict[str, int] = {}
        #: pool gauge sources of the attached engines with this name, and whether
        #: each pool keeps returned connections (a NullPool closes them)
        self.pools: list[tuple[SnapshotSource, bool]] = []
        self.idle_hist = Histogram(pool)
        #: ``take_peak()`` of each attached pool of this name (read and reset per scrape)
        self.peaks: list[Callable[[], int]] = []
        #: route -> (statements, statement seconds, pool wait) histograms per unit of work
        self.units: dict[str, tuple[Histogram, Histogram, Histogram]] = {}
        #: Pool observations not yet in their histograms (see :meth:`pending`), each
        #: paired with the histogram it belongs to; appended to without the lock.
        self._pending: tuple[tuple[list[float], Histogram], ...] = (
            ([], self.wait),
            ([], self.use),
            ([], self.idle_hist),
            ([], self.txn["commit"]),
            ([], self.txn["rollback"]),
        )

    def _new_shape(
        self, fingerprint: str, operation: str, table: str, text: str, op: OpStats
    ) -> ShapeStats:
        """Make the stats of a new shape (multiprocess mode adds its own series here)."""
        return ShapeStats(fingerprint, operation, table, text, op)

    def _new_op(self, operation: str) -> OpStats:
        """Make the per-operation series of a new operation."""
        return OpStats(operation, self.bounds)

    def _overflow(self, op: OpStats) -> ShapeStats:
        """Make the ``_other`` stats of an operation's shapes beyond max_fingerprints."""
        return ShapeStats(OTHER, op.name, "", "(shapes beyond max_fingerprints)", op)

    # -- metrics sink: the statement path ---------------------------------------------

    def prepare(self, shape: Shape) -> ShapeStats:
        """The stats of a shape, created if there is room, else its operation's overflow."""
        fingerprint = shape.fingerprint
        stats = self.shapes.get(fingerprint)
        if stats is not None:
            return stats
        op = self.op(shape.operation)
        with self.lock:
            stats = self.shapes.get(fingerprint)
            if stats is not None:
                return stats
            if len(self.shapes) >= self.max_fingerprints:
                stats = self.other.get(op.name)
                if stats is None:
                    stats = self.other[op.name] = self._overflow(op)
                return stats
            stats = self.shapes[fingerprint] = self._new_shape(
                fingerprint, shape.operation, shape.table, shape.normalized, op
            )
            return stats

    def observe(self, stats: ShapeStats, elapsed: float, rows: int, span: Any) -> None:
        """Count one statement execution of ``elapsed`` seconds that reported ``rows``.

        ``span`` (an OpenTelemetry SpanContext, or None) becomes the exemplar of the
        duration bucket the observation falls in, so a latency panel links to the trace
        of a recent statement in each bucket. Exemplars are shown only in OpenMetrics
        exposition.
        """
        hist = stats.op.hist
        i = bisect_left(hist.bounds, elapsed)
        self._acquire()
        try:
            stats.calls += 1
            stats.seconds += elapsed
            if rows > 0:
                stats.rows += rows
            hist.counts[i] += 1
            hist.total += elapsed
            if span is not None:
                exemplars = hist.exemplars
                if exemplars is None:
                    exemplars = hist.exemplars = [None] * len(hist.counts)
                exemplars[i] = (span, elapsed, time())
        finally:
            self._release()

    def observe_slow(self, stats: ShapeStats) -> None:
        """Count one statement over the slow-query threshold."""
        with self.lock:
            stats.op.slow += 1

    def observe_error(self, stats: ShapeStats, error: str) -> None:
        """Count one failed statement by operation and exception class name."""
        with self.lock:
            error = self._error_label(error)
            key = (stats.operation, error)
            self.errors[key] = self.errors.get(key, 0) + 1

    def _error_label(self, error: str) -> str:
        if error not in self.error_classes:
            if len(self.error_classes) >= MAX_ERROR_CLASSES:
                return OTHER
            self.error_classes.add(error)
        return error

    def op(self, operation: str) -> OpStats:
        """The per-operation series (operations are a fixed, small set)."""
        stats = self.ops.get(operation)
        if stats is None:
            with self.lock:
                stats = self.ops.get(operation)
                if stats is None:
                    stats = self.ops[operation] = self._new_op(operation)
        return stats

    # -- N+1 --------------------------------------------------------------------------

    def detected(self, fingerprint: str, relationship: str) -> None:
        """Count one N+1 detection (the fingerprint label is the exported one)."""
        with self.lock:
            if fingerprint not in self.shapes:
                fingerprint = OTHER
            key = (fingerprint, relationship)
            if key not in self.n_plus_one and len(self.n_plus_one) >= MAX_N_PLUS_ONE_SERIES:
                key = (OTHER, "")
            self.n_plus_one[key] = self.n_plus_one.get(key, 0) + 1

    # -- index advice ---------------------------------------------------------------------

    def advised(self, table: str, columns: str, proven: bool) -> None:
        """Export one suggested index (at most ``max_fingerprints`` per engine)."""
        key = (table, columns, "true" if proven else "false")
        with self.lock:
            if key not in self.advice and len(self.advice) < self.max_fingerprints:
                self.advice.add(key)

    # -- pool sink ----------------------------------------------------------------------

    # checkout, checkin and transaction run once per checkout or transaction; each is
    # written out rather than calling a shared helper: a Python call is about a fifth of
    # what the update itself costs.

    def checkout(self, seconds: float) -> None:
        hist = self.wait
        i = bisect_left(hist.bounds, seconds)
        self._acquire()
        try:
            hist.counts[i] += 1
            hist.total += seconds
        finally:
            self._release()

    def checkin(self, seconds: float) -> None:
        hist = self.use
        i = bisect_left(hist.bounds, seconds)
        self._acquire()
        try:
            hist.counts[i] += 1
            hist.total += seconds
        finally:
            self._release()

    def connected(self, seconds: float) -> None:
        with self.lock:
            self.connects += 1
            self.connect.add(seconds)

    def connect_failed(self, error: str) -> None:
        with self.lock:
            error = self._error_label(error)
            self.connect_errors[error] = self.connect_errors.get(error, 0) + 1

    def timeout(self) -> None:
        with self.lock:
            self.timeouts += 1

    def invalidated(self) -> None:
        with self.lock:
            self.invalidations += 1

    def transaction(self, outcome: str, seconds: float) -> None:
        hist = self.txn[outcome]
        i = bisect_left(hist.bounds, seconds)
        self._acquire()
        try:
            hist.counts[i] += 1
            hist.total += seconds
        finally:
            self._release()

    def pending(self) -> tuple[list[float], ...] | None:
        """The lists of pending checkout waits, use, idle, commit and rollback times.

        The pool hooks run once or more per checkout, and a locked histogram update is
        a Python call, a lock acquisition and a bisection each: three to four of those
        per request were most of what the pool metrics cost. Instead the hooks append
        each value to its list (``list.append``: one C call, atomic without the lock)
        and the values are *settled* into their histograms in one pass, under the
        lock, before every scrape (:meth:`collect_into`) and whenever the hooks find a
        list long (:meth:`settle`), so the lists stay bounded. Nothing is lost and every
        count is exact; a value waits at most until the next scrape. None when values
        must be written as they come (the multiprocess series writes each to its files
        at once).
        """
        return tuple(values for values, _hist in self._pending)

    def settle(self) -> None:
        """Move every pending pool observation into its histogram (takes the lock)."""
        with self.lock:
            self._settle()

    def _settle(self) -> None:
        # Lock held. A value appended while this runs stays for the next settle:
        # ``del values[:n]`` removes exactly the values read, never a later append.
        for values, hist in self._pending:
            n = len(values)
            if n:
                taken = values[:n]
                del values[:n]
                bounds = hist.bounds
                counts = hist.counts
                total = hist.total
                for value in taken:
                    counts[bisect_left(bounds, value)] += 1
                    total += value
                hist.total = total

    def statement_failed(self, operation: str, error: str) -> None:
        """A COMMIT or ROLLBACK that failed in the driver, as a failed statement."""
        from .._core._fingerprint import analyze

        self.observe_error(self.prepare(analyze(operation)), error)

    # -- hold sink (idle time, units of work, peak) -----------------------------------

    def idle(self, seconds: float) -> None:
        """One check-in's time out of the pool with no statement running."""
        hist = self.idle_hist
        i = bisect_left(hist.bounds, seconds)
        with self.lock:
            hist.counts[i] += 1
            hist.total += seconds

    def _unit_hists(self, route: str, limit: int) -> tuple[Histogram, Histogram, Histogram]:
        """The histograms of a route, or of ``_other`` beyond ``limit`` routes (lock held)."""
        hists = self.units.get(route)
        if hists is None:
            if len(self.units) >= limit:
                route = OTHER
                hists = self.units.get(route)
            if hists is None:
                bounds = self.pool_bounds
                hists = self.units[route] = (
                    Histogram(buckets_for(BY_NAME["sqlprobe_scope_statements"], self.bounds)),
                    Histogram(bounds),
                    Histogram(bounds),
                )
        return hists

    def unit(self, route: str, statements: int, seconds: float, wait: float, limit: int) -> None:
        """One unit of work of ``route``: its statements, statement time and pool wait."""
        with self.lock:
            counts, db, waits = self._unit_hists(route, limit)
            counts.add(statements)
            db.add(seconds)
            waits.add(wait)

    def add_peak(self, take: Callable[[], int]) -> None:
        """Read (and reset) one more pool's peak in use at each scrape."""
        with self.lock:
            self.peaks.append(take)

    def remove_peak(self, take: Callable[[], int]) -> None:
        with self.lock:
            self.peaks = [t for t in self.peaks if t != take]

    def add_pool(self, source: SnapshotSource, keeps: bool) -> None:
        """Read the gauges of one more pool at each scrape."""
        with self.lock:
            self.pools.append((source, keeps))

    def remove_pool(self, source: SnapshotSource) -> None:
        """Stop reading a pool's gauges (its counters stay)."""
        with self.lock:
            self.pools = [(s, k) for s, k in self.pools if s != source]

    def pool_snapshot(self) -> tuple[int, int, int | None, int]:
        """``(idle, used, max, pools)`` summed over the live pools of this name."""
        with self.lock:
            sources = list(self.pools)
        idle = used = live = 0
        limit: int | None = 0
        for source, _keeps in sources:
            snap = source()
            if snap is None:
                continue
            live += 1
            idle += snap[0]
            used += snap[1]
            limit = None if limit is None or snap[2] is None else limit + snap[2]
        return idle, used, limit, live

    # -- scrape ---------------------------------------------------------------------------

    def collect_into(self, fams: Families) -> None:
        """Add this engine's samples to the scrape's families."""
        engine = self.name
        with self.lock:
            self._settle()
            shapes = list(self.shapes.values())
            other_calls = sum(s.calls for s in self.other.values())
            snapshot = [
                (s.fingerprint, s.operation, s.table, s.statement, s.calls, s.seconds, s.rows)
                for s in shapes
            ]
            if other_calls:
                snapshot.append((
                    OTHER, "OTHER", "", "(shapes beyond max_fingerprints)", other_calls,
                    sum(s.seconds for s in self.other.values()),
                    sum(s.rows for s in self.other.values()),
                ))  # fmt: skip
            hists = [(op, s.hist.samples(), s.slow) for op, s in self.ops.items()]
            errors = list(self.errors.items())
            n_plus_one = list(self.n_plus_one.items())
            advice = sorted(self.advice)
            pool_hists = [
                ("sqlprobe_pool_checkout_wait_seconds", self.wait.samples()),
                ("sqlprobe_pool_connection_use_seconds", self.use.samples()),
                ("sqlprobe_pool_connect_seconds", self.connect.samples()),
            ]
            txn = [(outcome, hist.samples()) for outcome, hist in self.txn.items()]
            counters = (
                ("sqlprobe_pool_checkout_timeouts", self.timeouts),
                ("sqlprobe_pool_connects", self.connects),
                ("sqlprobe_pool_invalidations", self.invalidations),
            )
            connect_errors = list(self.connect_errors.items())
            idle_samples = self.idle_hist.samples()
            units = [
                (route, tuple(h.samples() for h in hists)) for route, hists in self.units.items()
            ]
            peaks = list(self.peaks)

        duration = fams.get("sqlprobe_query_duration_seconds")
        slow = fams.get("sqlprobe_slow_queries")
        for op, (buckets, count, total), slow_count in hists:
            if count or op in PRESET_OPERATIONS:
                duration.add_metric([engine, op], buckets, total)
            slow.add_metric([engine, op], slow_count)

        calls = fams.get("sqlprobe_statement_calls")
        seconds = fams.get("sqlprobe_statement_seconds")
        rows = fams.get("sqlprobe_statement_rows")
        info = fams.get("sqlprobe_statement_info")
        for fp, operation, table, text, n, secs, nrows in snapshot:
            calls.add_metric([engine, fp], n)
            seconds.add_metric([engine, fp], secs)
            rows.add_metric([engine, fp], nrows)
            info.add_metric([engine, fp, operation, table, text], 1)

        errs = fams.get("sqlprobe_query_errors")
        for (operation, error), n in errors:
            errs.add_metric([engine, operation, error], n)
        family = fams.get("sqlprobe_n_plus_one")
        for (fingerprint, relationship), n in n_plus_one:
            family.add_metric([engine, fingerprint, relationship], n)

        family = fams.get("sqlprobe_index_advice_info")
        for table, columns, proven in advice:
            family.add_metric([engine, table, columns, proven], 1)

        for name, (buckets, _count, total) in pool_hists:
            fams.get(name).add_metric([engine], buckets, total)
        duration = fams.get("sqlprobe_transaction_duration_seconds")
        for outcome, (buckets, _count, total) in txn:
            duration.add_metric([engine, outcome], buckets, total)
        for name, value in counters:
            fams.get(name).add_metric([engine], value)
        family = fams.get("sqlprobe_pool_connect_errors")
        for error, n in connect_errors:
            family.add_metric([engine, error], n)

        buckets, _count, total = idle_samples
        fams.get("sqlprobe_pool_connection_idle_seconds").add_metric([engine], buckets, total)
        names = ("sqlprobe_scope_statements", "sqlprobe_scope_db_seconds",
                 "sqlprobe_scope_pool_wait_seconds")  # fmt: skip
        for route, samples in units:
            for name, (buckets, _count, total) in zip(names, samples, strict=True):
                fams.get(name).add_metric([engine, route], buckets, total)
        if peaks:
            fams.get("sqlprobe_pool_peak_connections").add_metric(
                [engine], sum(take() for take in peaks)
            )

        idle, used, limit, live = self.pool_snapshot()
        gauge = fams.get("sqlprobe_pool_connections")
        gauge.add_metric([engine, "idle"], idle)
        gauge.add_metric([engine, "used"], used)
        if limit is not None and live:
            fams.get("sqlprobe_pool_max_connections").add_metric([engine], limit)


class PrometheusExporter(Collector):
    """The one sqlprobe collector on a registry: every attached engine's series.

    ``before_collect`` runs at the start of each scrape (the composition root passes
    the deferred clean-ups of collected engines, see ``_state``).
    """

    #: What an engine's series is made of (multiprocess mode writes through files).
    series_class: type[EngineSeries] = EngineSeries

    def __init__(self, before_collect: Callable[[], None] | None = None) -> None:
        self.lock = threading.Lock()
        self.engines: dict[str, EngineSeries] = {}
        self.refs: dict[str, int] = {}
        #: released names, oldest first (bounded by MAX_RETAINED_ENGINES)
        self.retained: OrderedDict[str, None] = OrderedDict()
        self.internal_errors: dict[str, int] = {}
        self.before_collect = before_collect

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
            self.refs[name] = self.refs.get(name, 0) + 1
            self.retained.pop(name, None)
            return series

    def release(self, series: EngineSeries) -> None:
        """Drop a reference; an unreferenced series is retained (bounded), not dropped."""
        with self.lock:
            name = series.name
            if self.engines.get(name) is not series:
                return
            refs = self.refs.get(name, 0) - 1
            if refs > 0:
                self.refs[name] = refs
                return
            self.refs.pop(name, None)
            self.retained[name] = None
            while len(self.retained) > MAX_RETAINED_ENGINES:
                old, _ = self.retained.popitem(last=False)
                self.engines.pop(old, None)

    def internal_error(self, stage: str) -> None:
        """Count one contained failure inside sqlprobe."""
        with self.lock:
            self.internal_errors[stage] = self.internal_errors.get(stage, 0) + 1

    def collect(self) -> Iterable[Metric]:
        if self.before_collect is not None:
            self.before_collect()
        fams = Families()
        with self.lock:
            engines = list(self.engines.values())
            internal = list(self.internal_errors.items())
        for series in engines:
            series.collect_into(fams)
        errors = fams.get("sqlprobe_internal_errors")
        for stage, n in internal:
            errors.add_metric([stage], n)
        return list(fams)

    def describe(self) -> Iterable[Metric]:
        # Registering must not run a scrape (the registry calls collect() when a
        # collector has no describe()); every family is named up front, so a filtered
        # scrape (``/metrics?name[]=...``) finds each of them.
        return describe_families()


def describe_families() -> list[Metric]:
    """Empty metric families of the family table (``describe()`` of an exporter)."""
    cls = {
        "counter": CounterMetricFamily,
        "gauge": GaugeMetricFamily,
        "histogram": HistogramMetricFamily,
    }
    return [cls[f.kind](f.name, f.help) for f in FAMILIES]
