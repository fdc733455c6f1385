"""Records in, sinks out: the per-engine collector behind the statement hooks.

The execution hooks (``_hooks._statement``) wrap the dialect's execution methods with
the functions :meth:`Collector.timed` builds: each times the driver call and accounts
for the statement in the same function (a failed one goes to :meth:`Collector.failed`).
The collector resolves the statement text to its shape through a bounded cache and fans
the measurement out, in this order, to what was wired at attach:

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
from time import perf_counter
from typing import Any, Protocol

from ._fingerprint import Shape, analyze
from ._hold import LAST, SECONDS, STATEMENT, STATEMENTS
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

    # -- record sinks -------------------------------------------------------------------

    def add_sink(self, sink: RecordSink) -> None:
        """Send a record of every statement to ``sink`` from now on."""
        self.sinks = (*self.sinks, sink)

    def remove_sink(self, sink: RecordSink) -> None:
        """Stop sending records to ``sink`` (no error if it is not there)."""
        self.sinks = tuple(s for s in self.sinks if s is not sink)

    # -- statement path -----------------------------------------------------------------

    def timed(
        self,
        original: Callable[..., Any],
        *,
        batched: bool,
        rewrite: Callable[[str], str] | None = None,
        hold_key: str = "",
        live: list[bool] | None = None,
    ) -> Callable[[Any, str, Any, Any], None]:
        """Build the timed ``execute(cursor, statement, parameters, context)`` hook.

        It calls ``original`` with the text ``rewrite`` returns (the collector keeps the
        original text), times exactly that call and accounts for the statement: one
        function per statement, where the accounting was a second call (the hook, then
        the collector). Everything fixed at attach is bound here; the body reads only
        closure variables. A failed statement goes to :meth:`failed` and the driver's
        exception is re-raised unchanged. With ``hold_key``, the statement is also
        added to the checkout's hold on the pool's connection record (see
        ``_hooks._statement``). While ``live[0]`` is False the hook only calls
        ``original`` (detached, but wrapped by someone since).
        """
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
        failed = self.failed
        collector = self
        key = hold_key
        on = live if live is not None else [True]
        clock = perf_counter

        def execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
            if not on[0]:
                original(cursor, statement, parameters, context)
                return
            sent = statement if rewrite is None else rewrite(statement)
            batch = len(parameters) if batched else 0
            start = clock()
            try:
                original(cursor, sent, parameters, context)
            except BaseException as exc:
                end = clock()
                failed(statement, start, end, context, parameters, batch, exc)
                add_failed_to_hold(context, key, statement, start, end)
                raise
            end = clock()
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
                    span = trace(shape, start, elapsed, batch, context, None)
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
                        sinks, shape, statement, start, elapsed, rows, batch,
                        parameters, context, None, span,
                    )  # fmt: skip
            except Exception:
                contain("collector")
            try:
                hold = context._dbapi_connection._connection_record.__dict__.get(key)
            except AttributeError:  # no context, or a connection detached from its pool
                return
            if hold is not None:  # see _hold: SECONDS, STATEMENTS, LAST, STATEMENT
                hold[6] += end - start
                hold[7] += 1
                hold[8] = end
                hold[9] = statement

        return execute

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


# The statement hook writes a hold's fields by literal index (no global lookups).
assert (SECONDS, STATEMENTS, LAST, STATEMENT) == (6, 7, 8, 9)


def add_failed_to_hold(context: Any, key: str, statement: str, start: float, end: float) -> None:
    """Add a failed statement to its checkout's hold (the database did the work)."""
    if not key:
        return
    try:
        hold = context._dbapi_connection._connection_record.__dict__.get(key)
    except Exception:
        return
    if hold is not None:
        hold[SECONDS] += end - start
        hold[STATEMENTS] += 1
        hold[LAST] = end
        hold[STATEMENT] = statement
