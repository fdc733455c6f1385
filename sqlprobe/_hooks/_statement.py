"""SQLAlchemy event wiring: the hot path.

Which hooks, and why
--------------------
Every statement passes through here, so the choice of hook is the largest cost
decision sqlprobe makes. Measured on the reference machine (SQLite in-memory primary
key select, about 12 µs bare):

* ``before_cursor_execute``/``after_cursor_execute`` (ConnectionEvents) add about
  4.4 µs: any ConnectionEvents listener sets ``engine._has_events`` and moves every
  statement onto SQLAlchemy's slower dispatch path (``begin``/``commit``/``rollback``
  listeners alone cost about 2.2 µs per statement for the same reason).
* ``do_execute``/``do_executemany``/``do_execute_no_params`` (DialectEvents) cost about
  0.5 µs: they only switch on the dialect's own small dispatch loop.
* ``handle_error`` (DialectEvents) costs nothing until a statement fails.

So sqlprobe listens on the three DialectEvents execution hooks and on ``handle_error``,
and on no ConnectionEvents at all. A ``do_execute`` listener that returns True tells
SQLAlchemy that the cursor call already happened; ours therefore calls the dialect's
own ``do_execute``/``do_executemany``/``do_execute_no_params`` (bound at attach time,
so dialect overrides such as psycopg's or asyncpg's are kept), times exactly that call
and returns True. Listeners registered before ours on the same hook still run first;
one of them that returns True itself hides the statement from sqlprobe (documented).

Everything per engine (the bound methods, the collector, its flags) is looked up here
once at attach time; the listener bodies only read local variables.

Two variants exist, chosen per engine at attach time: the metrics-only listeners of
:func:`install_statement_hooks`, and those of :func:`install_traced_hooks`, which
``_otel`` swaps in only when spans, exemplars, OTel metrics or sqlcommenter are on.
Without the opentelemetry package and sqlcommenter an engine runs no tracing code at all.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from time import perf_counter
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from .._core._collector import Collector

__all__ = [
    "CommentFn",
    "Listener",
    "TraceFn",
    "install_statement_hooks",
    "install_traced_hooks",
]

#: ``(target, event name, function)``: exactly what ``event.listen`` was given, so that
#: ``detach`` can hand the same triple to ``event.remove``.
Listener = tuple[Any, str, Callable[..., Any]]


def install_statement_hooks(engine: Engine, collector: Collector) -> list[Listener]:
    """Listen for statement execution and errors on ``engine``'s dialect."""
    dialect = engine.dialect
    do_execute = dialect.do_execute
    do_executemany = dialect.do_executemany
    do_execute_no_params = dialect.do_execute_no_params
    observe = collector.observe
    failed = collector.failed

    def on_do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        start = perf_counter()
        try:
            do_execute(cursor, statement, parameters, context)
        except BaseException as exc:
            failed(statement, perf_counter() - start, start, context, parameters, 0, exc)
            raise
        observe(statement, perf_counter() - start, cursor, start, context, parameters, 0)
        return True

    def on_do_executemany(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        batch = len(parameters) if hasattr(parameters, "__len__") else 0
        start = perf_counter()
        try:
            do_executemany(cursor, statement, parameters, context)
        except BaseException as exc:
            failed(statement, perf_counter() - start, start, context, parameters, batch, exc)
            raise
        observe(statement, perf_counter() - start, cursor, start, context, parameters, batch)
        return True

    def on_do_execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
        start = perf_counter()
        try:
            do_execute_no_params(cursor, statement, context)
        except BaseException as exc:
            failed(statement, perf_counter() - start, start, context, None, 0, exc)
            raise
        observe(statement, perf_counter() - start, cursor, start, context, None, 0)
        return True

    count_error = collector.error

    def on_handle_error(ctx: Any) -> None:
        # The class the application will receive (SQLAlchemy's wrapper when the
        # driver raised a DBAPI error), so the label matches what users catch.
        exc = ctx.sqlalchemy_exception
        if exc is None:
            exc = ctx.original_exception
        count_error(ctx.statement, type(exc).__name__)

    listeners: list[Listener] = [
        (engine, "do_execute", on_do_execute),
        (engine, "do_executemany", on_do_executemany),
        (engine, "do_execute_no_params", on_do_execute_no_params),
        (engine, "handle_error", on_handle_error),
    ]
    for target, name, fn in listeners:
        event.listen(target, name, fn)
    return listeners


#: The OTel hook of the traced variant (``_otel``): ``(statement, start, elapsed,
#: batch_size, context, error)`` -> the SpanContext to link (the statement's span, the
#: instrumentation's span or the active sampled span) or None. It never raises.
TraceFn = Callable[[str, float, float, int, Any, "BaseException | None"], Any]
#: sqlcommenter (``_sqlcommenter``): the text to send for a statement text; never raises.
CommentFn = Callable[[str], str]

_EXECUTE_HOOKS = ("do_execute", "do_executemany", "do_execute_no_params")


def install_traced_hooks(
    engine: Engine,
    collector: Collector,
    replaces: list[Listener],
    *,
    trace: TraceFn | None,
    comment: CommentFn | None,
    comment_no_params: CommentFn | None,
) -> list[Listener]:
    """Swap the metrics-only execution listeners for ones that also trace and/or comment.

    Chosen at attach time by ``_otel.install`` when spans, exemplars or sqlcommenter
    are on, so an engine without them keeps the plain listeners above. The execution
    listeners in ``replaces`` (the probe's own, from :func:`install_statement_hooks`)
    are removed from the engine; ``handle_error`` stays.

    ``trace`` runs after the driver call with the same clock readings the metrics
    use, and what it returns goes to the collector (exemplar, ``record.span``).
    ``comment`` rewrites the text sent to the driver (``comment_no_params`` for
    ``do_execute_no_params``, where a ``%`` needs no escaping); the collector and the
    fingerprint cache still see the original text, so commented variants never
    multiply cache entries or shapes.
    """
    for held, name, fn in replaces:
        target = held() if isinstance(held, weakref.ref) else held
        if name in _EXECUTE_HOOKS and target is not None and event.contains(target, name, fn):
            event.remove(target, name, fn)

    dialect = engine.dialect
    do_execute = dialect.do_execute
    do_executemany = dialect.do_executemany
    do_execute_no_params = dialect.do_execute_no_params
    observe = collector.observe
    failed = collector.failed

    def on_do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        sent = comment(statement) if comment is not None else statement
        start = perf_counter()
        try:
            do_execute(cursor, sent, parameters, context)
        except BaseException as exc:
            elapsed = perf_counter() - start
            span = trace(statement, start, elapsed, 0, context, exc) if trace else None
            failed(statement, elapsed, start, context, parameters, 0, exc, span)
            raise
        elapsed = perf_counter() - start
        span = trace(statement, start, elapsed, 0, context, None) if trace else None
        observe(statement, elapsed, cursor, start, context, parameters, 0, span)
        return True

    def on_do_executemany(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        batch = len(parameters) if hasattr(parameters, "__len__") else 0
        sent = comment(statement) if comment is not None else statement
        start = perf_counter()
        try:
            do_executemany(cursor, sent, parameters, context)
        except BaseException as exc:
            elapsed = perf_counter() - start
            span = trace(statement, start, elapsed, batch, context, exc) if trace else None
            failed(statement, elapsed, start, context, parameters, batch, exc, span)
            raise
        elapsed = perf_counter() - start
        span = trace(statement, start, elapsed, batch, context, None) if trace else None
        observe(statement, elapsed, cursor, start, context, parameters, batch, span)
        return True

    def on_do_execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
        sent = comment_no_params(statement) if comment_no_params is not None else statement
        start = perf_counter()
        try:
            do_execute_no_params(cursor, sent, context)
        except BaseException as exc:
            elapsed = perf_counter() - start
            span = trace(statement, start, elapsed, 0, context, exc) if trace else None
            failed(statement, elapsed, start, context, None, 0, exc, span)
            raise
        elapsed = perf_counter() - start
        span = trace(statement, start, elapsed, 0, context, None) if trace else None
        observe(statement, elapsed, cursor, start, context, None, 0, span)
        return True

    listeners: list[Listener] = [
        (engine, "do_execute", on_do_execute),
        (engine, "do_executemany", on_do_executemany),
        (engine, "do_execute_no_params", on_do_execute_no_params),
    ]
    for target, name, fn in listeners:
        event.listen(target, name, fn)
    return listeners


def remove_listeners(listeners: list[Listener]) -> None:
    """Remove listeners added by an ``install_*`` function; missing ones are ignored.

    A target may be held through a ``weakref.ref`` (a probe must not keep its engine
    alive); a target that is gone has taken its listeners with it.
    """
    for ref, name, fn in reversed(listeners):
        target = ref() if isinstance(ref, weakref.ref) else ref
        if target is not None and event.contains(target, name, fn):
            event.remove(target, name, fn)
