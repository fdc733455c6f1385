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

Detach removes the wrappers; if something wrapped them since (so removing ours would
break its chain), ours are left in place as pass-throughs that measure nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from .._core._collector import Collector
from ._shadow import shadow

__all__ = ["Rewrite", "wrap_execution"]

#: sqlcommenter: the text to send for a statement text; never raises.
Rewrite = Callable[[str], str]


def _ignore_ok(*_args: Any) -> None:
    return None


def wrap_execution(
    dialect: Any,
    collector: Collector,
    *,
    rewrite: Rewrite | None = None,
    rewrite_no_params: Rewrite | None = None,
) -> Callable[[], None]:
    """Wrap ``dialect``'s execution methods to time statements; return the undo.

    ``rewrite`` (``rewrite_no_params`` for ``do_execute_no_params``, where a ``%`` needs
    no escaping) changes the text sent to the driver.
    """
    observe: Callable[..., None] = collector.observe
    failed: Callable[..., None] = collector.failed

    def timed(original: Callable[..., Any], batched: bool, rewrite: Rewrite | None) -> Any:
        def execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
            sent = statement if rewrite is None else rewrite(statement)
            batch = len(parameters) if batched else 0
            start = perf_counter()
            try:
                original(cursor, sent, parameters, context)
            except BaseException as exc:
                failed(statement, start, perf_counter(), context, parameters, batch, exc)
                raise
            observe(statement, start, perf_counter(), cursor, context, parameters, batch)

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
