"""The statement hooks: the hot path every statement passes through.

Which hook, and why
-------------------
sqlprobe times each statement by wrapping the three execution methods of the engine's
own dialect *instance*: ``do_execute``, ``do_executemany`` and
``do_execute_no_params`` (instance attributes that shadow the dialect class's methods;
dialect overrides such as psycopg's or asyncpg's are what gets wrapped). SQLAlchemy's
``Connection`` calls exactly these for every statement, after running the
``DialectEvents`` listeners of the same names, and only when none of those listeners
returned True. So:

* listeners the application or another library registers on ``do_execute`` (before or
  after attach) run exactly as they would without sqlprobe; one that returns True
  (it executed the statement itself) suppresses the driver call, and sqlprobe counts
  nothing for that statement, because nothing was executed through the dialect;
* no event listener is added at all, so SQLAlchemy keeps its fast dispatch paths
  (a ``ConnectionEvents`` listener moves every statement onto a slower path, about
  2.2-4.4 µs; a ``DialectEvents`` listener costs its dispatch loop on every statement);
* a failed statement is seen in the wrapper itself, with the driver's exception; the
  collector names it by the class the application will receive.

Each wrapper times exactly the driver call and hands the statement to the collector.
What is fixed per engine (the original method, the collector's entry points, the
sqlcommenter's rewrite) is bound at attach; the body reads only closure variables.
The same body serves all three methods and all option sets; sqlcommenter, when on, is
a ``rewrite`` step applied to the text sent to the driver (the collector still sees
the original text, so commented variants never multiply cache entries or shapes).

With ``hold_key`` (the pool hooks' attribute on the connection record, see ``_pool``),
each wrapper also adds the statement to the checkout's hold: its duration, its end and
its text. The record is reached from the execution context the wrapper already has
(``context._dbapi_connection._connection_record``), so this is one dictionary lookup
and four list-item stores per statement, no call and no lock; a connection that has no hold
(checked out before attach, detached, a dialect's own cursor) is skipped.

Detach removes the wrappers; if something wrapped them since (so removing ours would
break its chain), ours are left in place as pass-throughs that measure nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from .._core._collector import Collector
from .._core._hold import LAST, SECONDS, STATEMENT, STATEMENTS
from ._shadow import shadow

__all__ = ["Rewrite", "wrap_execution"]

# The statement path writes a hold's fields by literal index (no global lookups).
assert (SECONDS, STATEMENTS, LAST, STATEMENT) == (6, 7, 8, 9)

#: sqlcommenter: the text to send for a statement text; never raises.
Rewrite = Callable[[str], str]


def _ignore_ok(*_args: Any) -> None:
    return None


def _held(context: Any, key: str, statement: str, start: float, end: float) -> None:
    """Add a failed statement to its checkout's hold (the database did the work)."""
    try:
        hold = context._dbapi_connection._connection_record.__dict__.get(key)
    except Exception:
        return
    if hold is not None:
        hold[SECONDS] += end - start
        hold[STATEMENTS] += 1
        hold[LAST] = end
        hold[STATEMENT] = statement


def wrap_execution(
    dialect: Any,
    collector: Collector,
    *,
    rewrite: Rewrite | None = None,
    rewrite_no_params: Rewrite | None = None,
    hold_key: str = "",
) -> Callable[[], None]:
    """Wrap ``dialect``'s execution methods to time statements; return the undo.

    ``rewrite`` (``rewrite_no_params`` for ``do_execute_no_params``, where a ``%`` needs
    no escaping) changes the text sent to the driver. ``hold_key`` names the checkout's
    hold on the connection record (empty: none is kept).
    """
    observe: Callable[..., None] = collector.observe
    failed: Callable[..., None] = collector.failed
    key = hold_key

    def timed(original: Callable[..., Any], batched: bool, rewrite: Rewrite | None) -> Any:
        def execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
            sent = statement if rewrite is None else rewrite(statement)
            batch = len(parameters) if batched else 0
            start = perf_counter()
            try:
                original(cursor, sent, parameters, context)
            except BaseException as exc:
                end = perf_counter()
                failed(statement, start, end, context, parameters, batch, exc)
                _held(context, key, statement, start, end)
                raise
            end = perf_counter()
            observe(statement, start, end, cursor, context, parameters, batch)
            try:
                hold = context._dbapi_connection._connection_record.__dict__.get(key)
            except AttributeError:  # no context, or a connection detached from its pool
                return
            if hold is not None:  # see _core._hold: SECONDS, STATEMENTS, LAST, STATEMENT
                hold[6] += end - start
                hold[7] += 1
                hold[8] = end
                hold[9] = statement

        return execute

    do_execute = timed(dialect.do_execute, False, rewrite)
    do_executemany = timed(dialect.do_executemany, True, rewrite)
    no_params = dialect.do_execute_no_params
    execute_no_params = timed(
        lambda cursor, statement, _parameters, context: no_params(cursor, statement, context),
        False,
        rewrite_no_params,
    )

    def do_execute_no_params(cursor: Any, statement: str, context: Any) -> None:
        execute_no_params(cursor, statement, None, context)

    undos = [
        shadow(dialect, "do_execute", do_execute),
        shadow(dialect, "do_executemany", do_executemany),
        shadow(dialect, "do_execute_no_params", do_execute_no_params),
    ]

    def undo() -> None:
        nonlocal observe, failed
        if not all([u() for u in undos]):
            observe = failed = _ignore_ok  # wrapped by someone since: pass through

    return undo
