"""Records in, sinks out: the per-engine collector behind the hooks.

The hooks (``_hooks``) hand every executed statement to :meth:`Collector.observe`
or :meth:`Collector.failed`. The collector resolves the statement text to its shape
through a bounded cache, updates the Prometheus accumulators, and hands a
:class:`StatementRecord` to the sinks that asked for one. Sinks come in two kinds:

* ``sinks``: called for every statement (spans, N+1 counting, test captures);
* ``slow_sinks``: called only for statements at or over the slow-query threshold
  (the slow-query log, EXPLAIN).

A record is built only when some sink will read it, so an engine with metrics alone
allocates nothing per statement. Every failure inside a sink is contained here: it is
counted in ``sqlprobe_internal_errors_total{stage}``, logged at most once per stage
per minute, and never reaches the application.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .._core._fingerprint import Shape, analyze
from .._sinks._prometheus import EngineSeries, OpStats, PrometheusExporter, ShapeStats

__all__ = ["Collector", "Entry", "Sink", "StatementRecord"]

#: Bounds of the text -> shape cache: entries, and the characters of statement text it
#: may keep alive. Statements longer than ``CACHE_MAX_STATEMENT`` are never cached: a
#: repeated multi-megabyte statement is rare and would pin its text in memory.
CACHE_MAX_ENTRIES = 4096
CACHE_MAX_CHARS = 4 * 1024 * 1024
CACHE_MAX_STATEMENT = 16 * 1024

#: An ``internal_error`` event per stage at most this often (seconds).
INTERNAL_ERROR_LOG_INTERVAL = 60.0

#: A cache entry: the shape of a text, its per-shape counters, its per-operation series.
Entry = tuple[Shape, ShapeStats, OpStats]


class StatementRecord:
    """One executed statement, as sinks see it.

    ``statement`` is the raw text sent to the driver and ``parameters`` the raw
    parameters: sinks must not export either unless the user asked for parameters
    (``capture_parameters``); ``shape.normalized`` is the safe text.
    """

    __slots__ = (
        "batch_size",
        "context",
        "duration",
        "engine",
        "error",
        "parameters",
        "rows",
        "shape",
        "span",
        "start",
        "statement",
    )

    def __init__(
        self,
        engine: str,
        statement: str,
        shape: Shape,
        start: float,
        duration: float,
        rows: int,
        batch_size: int,
        parameters: Any,
        context: Any,
        error: BaseException | None,
    ) -> None:
        self.engine = engine
        self.statement = statement
        self.shape = shape
        self.start = start
        self.duration = duration
        self.rows = rows
        self.batch_size = batch_size
        self.parameters = parameters
        self.context = context
        self.error = error
        #: The span context (trace_id/span_id) of this statement's span when the OTel
        #: sink made one, or of the span active during execution; set before the
        #: slow-query sinks run.
        self.span: Any = None

    @property
    def fingerprint(self) -> str:
        return self.shape.fingerprint

    @property
    def operation(self) -> str:
        return self.shape.operation

    @property
    def table(self) -> str:
        return self.shape.table


class Sink(Protocol):
    """Something that wants statement records; ``stage`` names it in internal errors."""

    stage: str

    def on_statement(self, record: StatementRecord) -> None: ...


class Collector:
    """The per-engine collector; one per attached engine (probe)."""

    def __init__(
        self,
        *,
        engine_name: str,
        series: EngineSeries,
        exporter: PrometheusExporter,
        slow_query_threshold: float,
        logger: Any,
    ) -> None:
        self.engine_name = engine_name
        self.series = series
        self.exporter = exporter
        self.threshold = slow_query_threshold
        self.logger = logger
        self.sinks: tuple[Sink, ...] = ()
        #: A cheap per-statement callback that needs no record (N+1 counting): it gets
        #: the cache entry and the execution context of every successful statement.
        self.per_statement: Callable[[Entry, Any], None] | None = None
        self.slow_sinks: tuple[Sink, ...] = ()
        self._cache: dict[str, Entry] = {}
        self._cache_chars = 0
        self._cache_lock = threading.Lock()
        #: (statement, entry) of an uncacheable statement, from entry_before_observe()
        #: to the observe()/failed() call that follows it (matched by identity).
        self._handoff: tuple[str, Entry] | None = None
        self._last_logged: dict[str, float] = {}
        #: ``observe(statement, elapsed, cursor, start, context, parameters,
        #: batch_size, span=None)``: account for a statement that succeeded.
        self.observe = self._make_observe()

    # -- sinks ----------------------------------------------------------------------

    def add_sink(self, sink: Sink, *, slow_only: bool = False) -> None:
        """Register a sink; tuples are swapped whole so the statement path never locks."""
        if slow_only:
            self.slow_sinks = (*self.slow_sinks, sink)
        else:
            self.sinks = (*self.sinks, sink)

    def remove_sink(self, sink: Sink) -> None:
        """Unregister a sink (no error if it is not there)."""
        self.sinks = tuple(s for s in self.sinks if s is not sink)
        self.slow_sinks = tuple(s for s in self.slow_sinks if s is not sink)

    # -- statement path -------------------------------------------------------------

    def entry(self, statement: str) -> Entry:
        """The cached entry of a statement text (the shape is computed on a miss)."""
        entry = self._cache.get(statement)
        if entry is None:
            entry = self._miss(statement)
        return entry

    def entry_before_observe(self, statement: str) -> Entry:
        """:meth:`entry` for a hook that runs just before :meth:`observe` or :meth:`failed`
        of the same statement (the OTel hook): the entry of a statement too long to cache
        is handed on to that call instead of being computed twice."""
        entry = self._cache.get(statement)
        if entry is None:
            entry = self._miss(statement)
            if len(statement) > CACHE_MAX_STATEMENT:
                self._handoff = (statement, entry)
        return entry

    def _make_observe(self) -> Callable[..., None]:
        """Build :meth:`observe`: a closure over what never changes after attach.

        The hot path of every statement, so what is fixed (the cache, the series) is
        bound once; what may change while attached (sinks, the N+1 callback) is read
        from the collector on each call.
        """
        cache_get = self._cache.get
        miss = self._miss
        series = self.series
        record_stats = series.observe
        threshold = self.threshold
        internal_error = self.internal_error
        dispatch = self._dispatch
        collector = self

        def observe(
            statement: str,
            elapsed: float,
            cursor: Any,
            start: float,
            context: Any,
            parameters: Any,
            batch_size: int,
            span: Any = None,
        ) -> None:
            """Account for a statement that succeeded; never raises.

            ``span`` is the SpanContext the OTel hook linked to this statement
            (``_otel``): it becomes the duration histogram's exemplar and
            ``record.span``.
            """
            try:
                entry = cache_get(statement)
                if entry is None:
                    entry = miss(statement)
                rows = cursor.rowcount
                if type(rows) is not int:
                    rows = -1
                record_stats(entry[1], entry[2], elapsed, rows, span)
                sinks = collector.sinks
                if elapsed >= threshold:
                    series.observe_slow(entry[2])
                    sinks = collector.slow_sinks + sinks
                if sinks:
                    dispatch(
                        sinks,
                        entry,
                        statement,
                        start,
                        elapsed,
                        rows,
                        batch_size,
                        parameters,
                        context,
                        None,
                        span,
                    )
                per_statement = collector.per_statement
                if per_statement is not None:
                    try:
                        per_statement(entry, context)
                    except Exception:
                        internal_error("nplusone")
            except Exception:
                internal_error("collector")

        return observe

    def failed(
        self,
        statement: str,
        elapsed: float,
        start: float,
        context: Any,
        parameters: Any,
        batch_size: int,
        error: BaseException,
        span: Any = None,
    ) -> None:
        """Account for a statement whose execution raised; never raises.

        The statement counts as a call and its time as execution time (the database
        did the work); its error is counted by the ``handle_error`` hook, which sees
        the exception class the application receives.
        """
        try:
            entry = self._cache.get(statement)
            if entry is None:
                entry = self._miss(statement)
            self.series.observe(entry[1], entry[2], elapsed, -1, span)
            sinks = self.sinks + self.slow_sinks if elapsed >= self.threshold else self.sinks
            if elapsed >= self.threshold:
                self.series.observe_slow(entry[2])
            if sinks:
                self._dispatch(
                    sinks,
                    entry,
                    statement,
                    start,
                    elapsed,
                    -1,
                    batch_size,
                    parameters,
                    context,
                    error,
                    span,
                )
        except Exception:
            self.internal_error("collector")

    def error(self, statement: str | None, error_class: str) -> None:
        """Count a failed statement by operation and exception class; never raises."""
        try:
            operation = self.entry(statement)[0].operation if statement else "OTHER"
            self.series.observe_error(operation, error_class)
        except Exception:
            self.internal_error("collector")

    def _dispatch(
        self,
        sinks: Iterable[Sink],
        entry: Entry,
        statement: str,
        start: float,
        elapsed: float,
        rows: int,
        batch_size: int,
        parameters: Any,
        context: Any,
        error: BaseException | None,
        span: Any = None,
    ) -> None:
        record = StatementRecord(
            self.engine_name,
            statement,
            entry[0],
            start,
            elapsed,
            rows,
            batch_size,
            parameters,
            context,
            error,
        )
        record.span = span
        for sink in sinks:
            try:
                sink.on_statement(record)
            except Exception:
                self.internal_error(sink.stage)

    def _miss(self, statement: str) -> Entry:
        handoff = self._handoff
        if handoff is not None and handoff[0] is statement:
            self._handoff = None
            return handoff[1]
        if not isinstance(statement, str):
            statement = str(statement)
        shape = analyze(statement)
        series = self.series
        entry: Entry = (
            shape,
            series.shape(shape.fingerprint, shape.operation, shape.table, shape.normalized),
            series.op(shape.operation),
        )
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

    # -- containment ------------------------------------------------------------------

    def internal_error(self, stage: str) -> None:
        """Count a contained failure and log it at most once per stage per minute."""
        try:
            self.exporter.internal_error(stage)
            now = time.monotonic()
            last = self._last_logged.get(stage)
            if last is not None and now - last < INTERNAL_ERROR_LOG_INTERVAL:
                return
            self._last_logged[stage] = now
            # Only the class and where it was raised: a traceback renderer that shows
            # locals would otherwise put statement parameters into the log.
            exc = sys.exc_info()[1]
            where = ""
            tb = exc.__traceback__ if exc is not None else None
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None:
                code = tb.tb_frame.f_code
                where = f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name}"
            self.logger.error(
                "internal_error",
                stage=stage,
                engine=self.engine_name,
                error=type(exc).__name__ if exc is not None else "",
                where=where,
            )
        except Exception:
            pass
