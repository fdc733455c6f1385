"""Records in, sinks out: the per-engine collector behind the statement hooks.

The execution hooks (``_hooks._statement``) hand every statement the driver ran to
:meth:`Collector.observe` or :meth:`Collector.failed`. The collector resolves the
statement text to its shape through a bounded cache and fans the measurement out, in
this order, to what was wired at attach:

1. the **trace step** (spans, exemplar lookup, OTel metrics), which returns the span
   context to link to the statement, or None; it is called only for statements that
   start at or after its *gate* (``trace_gate[0]``, which the step moves: in ambient
   mode it looks at the active span once per interval, so the statements between
   cost it no call);
2. the **metrics sink** (Prometheus), through a handle it prepared once per shape, so
   a statement costs it one locked update and no lookup;
3. the **unit step** (N+1 counting), with the shape, the text, the execution context
   and the parameters;
4. **record sinks**: a :class:`~._records.StatementRecord` is built only when one will
   read it: for every statement when a test capture is open, and for statements at or
   over the slow-query threshold (the slow-query log, EXPLAIN).

None of these knows any other, and none knows the probe. Every failure inside one of
them is contained (:class:`~._contain.Containment`): counted in
``sqlprobe_internal_errors_total{stage}``, logged at most once per stage per minute,
never raised into the application.

Rows: ``sqlprobe_statement_rows_total`` counts the driver's ``cursor.rowcount`` for
UPDATE, DELETE and MERGE statements that return no rows, where SQLAlchemy reads it
too; the value read is handed to SQLAlchemy's execution context, so the driver is
asked once, as without sqlprobe. SELECT and INSERT row counts are never read
(SQLAlchemy avoids ``cursor.rowcount`` there on purpose: it can be costly).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from ._fingerprint import Shape, analyze
from ._records import Contain, StatementRecord

__all__ = [
    "CACHE_MAX_CHARS",
    "CACHE_MAX_ENTRIES",
    "CACHE_MAX_STATEMENT",
    "ROW_OPERATIONS",
    "Collector",
    "MetricsSink",
    "RecordSink",
    "TraceStep",
    "UnitStep",
]

#: Bounds of the text -> shape cache: entries, and the characters of statement text it
#: may keep alive. Statements longer than ``CACHE_MAX_STATEMENT`` are never cached: a
#: repeated multi-megabyte statement is rare and would pin its text in memory.
CACHE_MAX_ENTRIES = 4096
CACHE_MAX_CHARS = 4 * 1024 * 1024
CACHE_MAX_STATEMENT = 16 * 1024

#: Operations whose row count is read (see the module docstring).
ROW_OPERATIONS = frozenset({"UPDATE", "DELETE", "MERGE"})


class MetricsSink(Protocol):
    """The per-statement counters of one engine (the Prometheus sink implements it)."""

    def prepare(self, shape: Shape) -> Any:
        """A handle for a new shape, kept in the text cache (called once per text)."""

    def observe(self, handle: Any, elapsed: float, rows: int, span: Any) -> None:
        """One execution of ``elapsed`` seconds; ``rows`` < 0 when not known."""

    def observe_slow(self, handle: Any) -> None:
        """One execution at or over the slow-query threshold."""

    def observe_error(self, handle: Any, error: str) -> None:
        """One failed execution, by the class name the application receives."""


class RecordSink(Protocol):
    """Something that reads statement records; ``stage`` names it in internal errors."""

    stage: str

    def on_statement(self, record: StatementRecord) -> None: ...


#: ``(shape, start, elapsed, batch_size, context, error) -> span context or None``.
TraceStep = Callable[[Shape, float, float, int, Any, "BaseException | None"], Any]
#: ``(shape, statement, context, parameters)``: per-unit-of-work counting (N+1).
UnitStep = Callable[[Shape, str, Any, Any], None]
#: A cache entry: the shape, the metrics sink's handle, whether rows are read.
Entry = tuple[Shape, Any, bool]


class Collector:
    """The per-engine collector; one per attached engine."""

    def __init__(
        self,
        *,
        engine_name: str,
        metrics: MetricsSink,
        contain: Contain,
        error_name: Callable[[BaseException], str],
        slow_query_threshold: float,
        trace: TraceStep | None = None,
        unit: UnitStep | None = None,
        slow_sinks: tuple[RecordSink, ...] = (),
        trace_gate: list[float] | None = None,
    ) -> None:
        self.engine_name = engine_name
        self.metrics = metrics
        self.contain = contain
        self.error_name = error_name
        self.threshold = slow_query_threshold
        self.trace = trace
        #: ``trace`` runs for a statement that starts at or after ``trace_gate[0]``
        #: (the trace step moves it; None: for every statement)
        self.trace_gate = trace_gate if trace_gate is not None else [float("-inf")]
        self.unit = unit
        self.slow_sinks = slow_sinks
        #: Sinks that read every statement (test captures); swapped whole, never locked.
        self.sinks: tuple[RecordSink, ...] = ()
        self._cache: dict[str, Entry] = {}
        self._cache_chars = 0
        self._cache_lock = threading.Lock()
        #: ``observe(statement, start, end, cursor, context, parameters, batch_size)``.
        self.observe = self._make_observe()

    # -- record sinks -------------------------------------------------------------------

    def add_sink(self, sink: RecordSink) -> None:
        """Send a record of every statement to ``sink`` from now on."""
        self.sinks = (*self.sinks, sink)

    def remove_sink(self, sink: RecordSink) -> None:
        """Stop sending records to ``sink`` (no error if it is not there)."""
        self.sinks = tuple(s for s in self.sinks if s is not sink)

    # -- statement path -----------------------------------------------------------------

    def _make_observe(self) -> Callable[[str, float, float, Any, Any, Any, int], None]:
        """Build :meth:`observe`: one closure over everything fixed at attach."""
        cache_get = self._cache.get
        miss = self._miss
        metrics = self.metrics
        record_stats = metrics.observe
        trace = self.trace
        gate = self.trace_gate
        unit = self.unit
        threshold = self.threshold
        contain = self.contain
        dispatch = self._dispatch
        collector = self

        def observe(
            statement: str,
            start: float,
            end: float,
            cursor: Any,
            context: Any,
            parameters: Any,
            batch_size: int,
        ) -> None:
            """Account for a statement that succeeded; never raises."""
            try:
                entry = cache_get(statement)
                if entry is None:
                    entry = miss(statement)
                shape = entry[0]
                elapsed = end - start
                rows = -1
                if entry[2] and cursor.description is None:
                    rows = cursor.rowcount
                    if type(rows) is not int:
                        rows = -1
                    elif getattr(context, "_rowcount", 0) is None:
                        context._rowcount = rows
                span = None
                if trace is not None and start >= gate[0]:
                    span = trace(shape, start, elapsed, batch_size, context, None)
                record_stats(entry[1], elapsed, rows, span)
                if unit is not None:
                    try:
                        unit(shape, statement, context, parameters)
                    except Exception:
                        contain("nplusone")
                if elapsed >= threshold:
                    metrics.observe_slow(entry[1])
                    sinks = collector.slow_sinks + collector.sinks
                else:
                    sinks = collector.sinks
                if sinks:
                    dispatch(
                        sinks, shape, statement, start, elapsed, rows, batch_size,
                        parameters, context, None, span,
                    )  # fmt: skip
            except Exception:
                contain("collector")

        return observe

    def failed(
        self,
        statement: str,
        start: float,
        end: float,
        context: Any,
        parameters: Any,
        batch_size: int,
        error: BaseException,
    ) -> None:
        """Account for a statement whose execution raised; never raises.

        The statement counts as a call and its time as execution time (the database
        did the work), and as an error of the class the application receives.
        """
        try:
            entry = self._cache.get(statement)
            if entry is None:
                entry = self._miss(statement)
            shape = entry[0]
            elapsed = end - start
            span = None
            if self.trace is not None:
                span = self.trace(shape, start, elapsed, batch_size, context, error)
            metrics = self.metrics
            metrics.observe_error(entry[1], self.error_name(error))
            metrics.observe(entry[1], elapsed, -1, span)
            sinks = self.sinks
            if elapsed >= self.threshold:
                metrics.observe_slow(entry[1])
                sinks = self.slow_sinks + sinks
            if sinks:
                self._dispatch(
                    sinks, shape, statement, start, elapsed, -1, batch_size,
                    parameters, context, error, span,
                )  # fmt: skip
        except Exception:
            self.contain("collector")

    def _dispatch(
        self,
        sinks: tuple[RecordSink, ...],
        shape: Shape,
        statement: str,
        start: float,
        elapsed: float,
        rows: int,
        batch_size: int,
        parameters: Any,
        context: Any,
        error: BaseException | None,
        span: Any,
    ) -> None:
        record = StatementRecord(
            self.engine_name, statement, shape, start, elapsed, rows, batch_size,
            parameters, context, error, span,
        )  # fmt: skip
        for sink in sinks:
            try:
                sink.on_statement(record)
            except Exception:
                self.contain(sink.stage)

    def _miss(self, statement: str) -> Entry:
        if not isinstance(statement, str):
            statement = str(statement)
        shape = analyze(statement)
        entry: Entry = (shape, self.metrics.prepare(shape), shape.operation in ROW_OPERATIONS)
        size = len(statement)
        if size <= CACHE_MAX_STATEMENT:
            with self._cache_lock:
                cache = self._cache
                if statement not in cache:
                    # Evict oldest first (dicts keep insertion order): cheap, bounded,
                    # and good enough for a cache whose hot keys are re-added at once.
                    while cache and (
                        len(cache) >= CACHE_MAX_ENTRIES
                        or self._cache_chars + size > CACHE_MAX_CHARS
                    ):
                        old = next(iter(cache))
                        del cache[old]
                        self._cache_chars -= len(old)
                    cache[statement] = entry
                    self._cache_chars += size
        return entry

    def cache_size(self) -> tuple[int, int]:
        """Entries and characters in the text cache (for tests and diagnostics)."""
        return len(self._cache), self._cache_chars
