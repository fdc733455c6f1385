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

Each wrapper times exactly the driver call and accounts for the statement in the same
function: the collector builds it (``Collector.timed``), so that a statement costs one
call of ours there, not a hook that then calls the collector. What is fixed per engine
(the original method, the collector's sinks, the sqlcommenter's rewrite) is bound at
attach; the body reads only closure variables.
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
from typing import Any

from .._core._collector import Collector
from ._shadow import shadow

__all__ = ["Rewrite", "wrap_execution"]

#: sqlcommenter: the text to send for a statement text; never raises.
Rewrite = Callable[[str], str]


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
    hold on the connection record (empty: none is kept). The timed bodies are the
    collector's (:meth:`~.._core._collector.Collector.timed`): the statement is timed
    and accounted for in one function.
    """
    live = [True]
    timed = collector.timed
    do_execute = timed(
        dialect.do_execute, batched=False, rewrite=rewrite, hold_key=hold_key, live=live
    )
    do_executemany = timed(
        dialect.do_executemany, batched=True, rewrite=rewrite, hold_key=hold_key, live=live
    )
    no_params = dialect.do_execute_no_params
    execute_no_params = timed(
        lambda cursor, statement, _parameters, context: no_params(cursor, statement, context),
        batched=False,
        rewrite=rewrite_no_params,
        hold_key=hold_key,
        live=live,
    )

    def do_execute_no_params(cursor: Any, statement: str, context: Any) -> None:
        execute_no_params(cursor, statement, None, context)

    undos = [
        shadow(dialect, "do_execute", do_execute),
        shadow(dialect, "do_executemany", do_executemany),
        shadow(dialect, "do_execute_no_params", do_execute_no_params),
    ]

    def undo() -> None:
        if not all([u() for u in undos]):
            live[0] = False  # wrapped by someone since: pass through

    return undo
