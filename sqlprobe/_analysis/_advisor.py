"""Index advice that proves itself: from a slow statement to the index that fixes it.

Two layers:

- `advise()` / `analyse()` (in `._advisor_core`): synchronous, on a connection the
  caller owns; the statement is parsed (sqlglot), each table's candidates are built from
  its equality, range, LIKE-prefix, join and ORDER BY columns, filtered against the
  existing indexes and the column statistics, and proven the way the database allows
  (hypopg costs on PostgreSQL, a plan switch on SQLite, EXPLAIN on MySQL/MariaDB).
- `IndexAdvisor` (here): the background worker the probe feeds with slow statements.
  It owns one thread and opens its own connections; the application's thread only
  calls `IndexAdvisor.submit`, which never blocks and never touches the database.

Bounds: the queue holds ``queue_size`` statements (a full queue drops and counts);
each fingerprint is analysed once (the set of seen fingerprints is capped at
``max_fingerprints``, oldest forgotten first); at most ``max_per_interval`` analyses run
per ``interval`` seconds (a statement over the budget is dropped, counted, and its
fingerprint forgotten so that a later occurrence is analysed); every statement the
advisor runs has a ``statement_timeout``; each analysis uses one connection from
``connect`` and closes it at the end. Nothing is ever written: a hypothetical index
lives in the advisor's session only, and the transaction is rolled back.

An asyncio engine (asyncpg, psycopg's async mode, aiosqlite, aiomysql...) is advised
with its own driver, the way the EXPLAIN worker does it: ``is_async=True`` makes the
worker thread run each analysis in SQLAlchemy's greenlet adapter on an event loop of
its own, so the synchronous `Connection` API drives the async driver. The statement is
replayed with the driver's own paramstyle (``$1`` for asyncpg) and the pool's
``connect`` handlers run on the advisor's connection as they run on the application's;
a synchronous counterpart driver would need neither to be installed nor to accept the
async driver's placeholders. The application's event loop is never used.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy.engine import Connection

from .._core._frames import SourceFinder
from .._core._records import StatementRecord
from ._advisor_core import Analysis, IndexAdvice, advise, analyse, validate_options
from ._advisor_schema import SchemaCache

__all__ = ["Analysis", "IndexAdvice", "IndexAdvisor", "SchemaCache", "advise", "analyse"]

_STOP = object()


class IndexAdvisor:
    """One engine's index advisor: a bounded queue, one lazy worker thread.

    Args:
        connect: returns a new SQLAlchemy `Connection` set up like the application's
            (same URL, connect arguments and pool ``connect`` handlers), used for one
            analysis and closed after it. Never the application's own connection.
        dialect_name: ``postgresql``, ``sqlite``, ``mysql`` or ``mariadb``.
        on_advice: called on the worker thread with each `IndexAdvice`.
        contain: called with a stage name (``index_advice`` for a failed analysis,
            ``index_advice_callback`` for a failing ``on_advice``) whenever the advisor
            swallows an exception of its own.
        min_improvement, min_rows, min_distinct, install_hypopg, registries: as for
            `analyse()`.
        statement_timeout: seconds each statement of an analysis may run.
        max_per_interval, interval: the rate limit, analyses per interval (seconds).
        queue_size: statements waiting for the worker.
        max_fingerprints: fingerprints remembered as already analysed.
        on_analysis: optional, called with every `Analysis` (advice and notes).
        is_async: the engine's driver is an asyncio one: each analysis runs through
            SQLAlchemy's greenlet adapter on the worker's own event loop.
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        dialect_name: str,
        *,
        on_advice: Callable[[IndexAdvice], None],
        contain: Callable[[str], None],
        min_improvement: float = 10.0,
        min_rows: int = 1000,
        min_distinct: int = 10,
        statement_timeout: float = 2.0,
        max_per_interval: int = 10,
        interval: float = 60.0,
        queue_size: int = 32,
        max_fingerprints: int = 1000,
        install_hypopg: bool = False,
        registries: Iterable[Any] | None = None,
        on_analysis: Callable[[Analysis], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        is_async: bool = False,
    ) -> None:
        validate_options(
            min_improvement=min_improvement,
            min_rows=min_rows,
            min_distinct=min_distinct,
            max_candidates=4,
            statement_timeout=statement_timeout,
        )
        if not callable(connect):
            raise ValueError("connect must be a callable returning a Connection")
        if dialect_name not in ("postgresql", "sqlite", "mysql", "mariadb"):
            raise ValueError(f"dialect_name {dialect_name!r} is not supported")
        if max_per_interval < 1:
            raise ValueError("max_per_interval must be at least 1")
        if not interval > 0:
            raise ValueError("interval must be positive (seconds)")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if max_fingerprints < 1:
            raise ValueError("max_fingerprints must be at least 1")
        self.connect = connect
        self.dialect_name = dialect_name
        self.on_advice = on_advice
        self.on_analysis = on_analysis
        self.contain = contain
        self.options: dict[str, Any] = {
            "dialect_name": dialect_name,
            "min_improvement": min_improvement,
            "min_rows": min_rows,
            "min_distinct": min_distinct,
            "statement_timeout": statement_timeout,
            "install_hypopg": install_hypopg,
            "registries": registries,
        }
        self.max_per_interval = max_per_interval
        self.interval = interval
        self.queue_size = queue_size
        self.max_fingerprints = max_fingerprints
        self.clock = clock
        self.is_async = is_async
        self.schema = SchemaCache()
        self.dropped = 0
        """Statements dropped because the queue was full."""
        self.rate_limited = 0
        """Statements dropped because the rate limit was spent."""
        self.analysed = 0
        self.failed = 0
        self._queue: queue.Queue[Any] = queue.Queue(queue_size)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._window = -float("inf")
        self._used = 0
        if hasattr(os, "register_at_fork"):
            reset = weakref.WeakMethod(self._after_fork)
            os.register_at_fork(after_in_child=lambda: (fn := reset()) and fn())

    def _after_fork(self) -> None:
        self._queue = queue.Queue(self.queue_size)
        self._lock = threading.Lock()
        self._thread = None

    # -- application thread -----------------------------------------------------------

    def submit(
        self, statement: str, parameters: Any, fingerprint: str, source: str | None = None
    ) -> bool:
        """Queue a statement for analysis; True if queued. Never blocks, never raises.

        False when the fingerprint was seen already, the advisor is closed, or the queue
        is full (counted in `dropped`; the fingerprint may be submitted again later).
        """
        with self._lock:
            if self._closed or fingerprint in self._seen:
                return False
            self._seen[fingerprint] = None
            while len(self._seen) > self.max_fingerprints:
                self._seen.popitem(last=False)
            if self._thread is None:
                try:
                    thread = threading.Thread(
                        target=self._run, name="sqlprobe-index-advisor", daemon=True
                    )
                    thread.start()
                except RuntimeError:
                    self._seen.pop(fingerprint, None)
                    return False
                self._thread = thread
        if isinstance(parameters, Mapping):
            parameters = dict(parameters)
        elif isinstance(parameters, list):
            parameters = tuple(parameters)
        try:
            self._queue.put_nowait((statement, parameters, fingerprint, source))
        except queue.Full:
            with self._lock:
                self.dropped += 1
                self._seen.pop(fingerprint, None)
            return False
        return True

    def wants(self, fingerprint: str) -> bool:
        """Whether `submit` would take this fingerprint now (not seen, not closed).

        A statement the rate limit or a full queue dropped is forgotten, so it is
        wanted again: its next occurrence is analysed.
        """
        return not self._closed and fingerprint not in self._seen

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker after the statement it is analysing; queued ones are dropped."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):  # the queue was just emptied
            self._queue.put_nowait(_STOP)
        limit = timeout if timeout is not None else float(self.options["statement_timeout"]) * 8
        thread.join(limit)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- worker thread ------------------------------------------------------------------

    def _allowed(self) -> bool:
        now = self.clock()
        if now - self._window >= self.interval:
            self._window = now
            self._used = 0
        if self._used >= self.max_per_interval:
            return False
        self._used += 1
        return True

    def _run(self) -> None:
        loop: Any = None
        try:
            while True:
                job = self._queue.get()
                if job is _STOP or self._closed:
                    return
                statement, parameters, fingerprint, source = job
                if not self._allowed():
                    with self._lock:
                        self.rate_limited += 1
                        self._seen.pop(fingerprint, None)
                    continue
                try:
                    if self.is_async:
                        import asyncio

                        from sqlalchemy.util import greenlet_spawn

                        if loop is None:
                            loop = asyncio.new_event_loop()
                        result = loop.run_until_complete(
                            greenlet_spawn(self._analyse, statement, parameters, source)
                        )
                    else:
                        result = self._analyse(statement, parameters, source)
                except Exception:
                    self.failed += 1
                    self.contain("index_advice")
                    continue
                self.analysed += 1
                try:
                    if self.on_analysis is not None:
                        self.on_analysis(result)
                    for advice in result.advice:
                        self.on_advice(advice)
                except Exception:
                    self.contain("index_advice_callback")
        finally:
            if loop is not None:
                loop.close()

    def _analyse(self, statement: str, parameters: Any, source: str | None) -> Analysis:
        connection = self.connect()
        try:
            return analyse(
                connection,
                statement,
                parameters,
                schema_cache=self.schema,
                source=source,
                **self.options,
            )
        finally:
            connection.close()


def _model_line(advice: IndexAdvice) -> str | None:
    """``Order.user_id: mapped_column(..., index=True)``, or the ``Index(...)`` to add.

    A single column's change names its attribute (``mapped_column(..., index=True)``
    alone does not say where); a composite ``Index(...)`` already names them.
    """
    if advice.model is None or advice.model_change is None:
        return advice.model_change or advice.model
    if advice.model_change.startswith("Index("):
        return advice.model_change
    return f"{advice.model}: {advice.model_change}"


#: Advice kept per engine for the ``slow_query`` events of its shape.
MAX_KNOWN_ADVICE = 1000


class AdviceSink:
    """The index advisor as a slow-only record sink: slow SELECTs in, advice out.

    Each new slow SELECT shape is handed to the :class:`IndexAdvisor` once (with the
    application line that ran it), again only if the advisor dropped it (a full queue,
    the rate limit); each suggestion the worker proves is logged as one
    ``index_advice`` warning, counted by ``metric(table, columns, proven)`` and kept
    (bounded) so later ``slow_query`` events of the shape carry it. Nothing here runs
    for a statement under the slow-query threshold.
    """

    stage = "index_advice"

    def __init__(
        self,
        make_advisor: Callable[[Callable[[IndexAdvice], None]], IndexAdvisor],
        *,
        engine: str,
        logger: Any,
        metric: Callable[[str, str, bool], None],
        on_close: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.logger = logger
        self.metric = metric
        self._on_close = on_close
        self._lock = threading.Lock()
        self._known: dict[str, dict[str, Any]] = {}
        self._finder = SourceFinder()
        self.advisor = make_advisor(self._on_advice)

    def on_statement(self, record: StatementRecord) -> None:
        shape = record.shape
        if shape.operation != "SELECT" or record.error is not None or record.batch_size:
            return
        fingerprint = shape.fingerprint
        # The advisor remembers what it took (bounded, oldest forgotten) and forgets
        # what it dropped: asking it keeps a dropped shape from being lost for good.
        if not self.advisor.wants(fingerprint):
            return
        source = self._finder.source(sys._getframe(1)) or None
        self.advisor.submit(record.statement, record.parameters, fingerprint, source)

    def _on_advice(self, advice: IndexAdvice) -> None:
        columns = ",".join(advice.columns)
        summary = {
            "table": advice.table,
            "columns": list(advice.columns),
            "ddl": advice.ddl,
            "model": advice.model,
            "proven": advice.proven,
        }
        with self._lock:
            if len(self._known) < MAX_KNOWN_ADVICE:
                self._known.setdefault(advice.fingerprint, summary)
        self.metric(advice.table, columns, advice.proven)
        self.logger.warning(
            "index_advice",
            engine=self.engine,
            fingerprint=advice.fingerprint,
            statement=advice.statement,
            table=advice.table,
            columns=list(advice.columns),
            ddl=advice.ddl,
            model=_model_line(advice),
            alembic=advice.alembic,
            cost_before=advice.cost_before,
            cost_after=advice.cost_after,
            proven=advice.proven,
            proof=advice.proof,
            source=advice.source or "",
        )

    def known(self, fingerprint: str) -> dict[str, Any] | None:
        """The advice found for a shape so far, for its ``slow_query`` events."""
        return self._known.get(fingerprint)

    def close(self) -> None:
        """Stop the worker (what it is analysing finishes) and release its engine."""
        try:
            self.advisor.close()
        finally:
            self._on_close()

    def at_exit(self) -> None:
        self.close()
