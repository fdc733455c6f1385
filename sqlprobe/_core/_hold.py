"""One checkout of a pooled connection, as the pool hooks and the hold monitor see it.

A *hold* is made when the pool hands a connection out and lives on the pool's
connection record until the check-in. It keeps what is needed to say, later, *who*
holds the connection and *what it does with it*:

* where it was checked out: the code object and instruction offset of the first
  application frame (the line and names are looked up only when an event is written:
  :func:`source`), and the unit of work (:func:`sqlprobe.scope`, the request) open at
  that moment;
* how long it waited for the pool, and when it was handed out (``perf_counter``);
* statement time accumulated while it is out (the statement hooks add each statement's
  duration, COMMIT and ROLLBACK included), the statement count, the end of the last
  statement and that statement's text (the raw text is kept as a reference only, never
  exported: the events show its normalized form);
* the open transaction, if any (its begin time and the statement time at its begin),
  and the most time any of its transactions spent without a statement running.

Why a list and not an object: a hold is made at every checkout and written at every
statement, and a list literal costs a fifth of a Python ``__init__`` (measured: about
0.08 against 0.4 µs), while an item update by constant index is as cheap as a slot
update. The indices below name the fields; :func:`new_hold` documents their order, and
everything that is not the hot path reads them through the helpers of this module.

Nothing here takes a lock: a hold is written by the thread (or task) that holds the
connection, and read by the watchdog thread, which only reads.
"""

from __future__ import annotations

import os
from types import CodeType
from typing import Any

__all__ = [
    "BEGUN",
    "BEGUN_SECONDS",
    "CODE",
    "LAST",
    "LASTI",
    "REPORTED",
    "SCOPE",
    "SECONDS",
    "START",
    "STATEMENT",
    "STATEMENTS",
    "TXN_IDLE",
    "UNIT",
    "WAIT",
    "Hold",
    "UnitTotals",
    "describe_code",
    "idle",
    "in_transaction",
    "line_of",
    "new_hold",
    "route",
    "source",
]

#: A hold: see :func:`new_hold` for its fields.
Hold = list[Any]

(
    START,  # perf_counter when the connection was handed out
    WAIT,  # seconds the checkout waited for the pool
    CODE,  # code object of the application frame that checked out (or None)
    LASTI,  # instruction offset in that code object
    SCOPE,  # the innermost open scope at checkout (or None)
    UNIT,  # that scope's UnitTotals for this engine; None once added to them
    SECONDS,  # statement time so far
    STATEMENTS,  # statements so far
    LAST,  # perf_counter at the end of the last statement (0.0: none yet)
    STATEMENT,  # raw text of the last statement (never exported as is) or None
    BEGUN,  # perf_counter at the begin of the open transaction, or None
    BEGUN_SECONDS,  # SECONDS when that transaction began
    TXN_IDLE,  # the most time one transaction spent with no statement running
    REPORTED,  # a pool_hold event was written for it already
) = range(14)


def new_hold(
    start: float, wait: float, code: CodeType | None, lasti: int, scope: Any, unit: Any
) -> Hold:
    """A new hold (the pool hooks write the same literal inline)."""
    return [start, wait, code, lasti, scope, unit, 0.0, 0, 0.0, None, None, 0.0, 0.0, False]


class UnitTotals:
    """What the checkouts of one unit of work added up to, per engine (see ``_pool``)."""

    __slots__ = ("seconds", "statements", "wait")

    def __init__(self) -> None:
        self.statements = 0
        self.seconds = 0.0
        self.wait = 0.0


def line_of(code: CodeType | None, lasti: int) -> int:
    """The source line of the instruction at byte offset ``lasti`` of ``code``.

    What ``frame.f_lineno`` would have said, computed only when an event is written:
    reading ``f_lineno`` at every checkout decodes the line table each time.
    """
    if code is None:
        return 0
    for begin, end, line in code.co_lines():
        if begin <= lasti < end:
            return line or code.co_firstlineno
    return code.co_firstlineno


def describe_code(code: CodeType | None, line: int) -> str:
    """``path.py:LINE in function`` (relative to the cwd when under it), or ``""``."""
    if code is None:
        return ""
    filename = code.co_filename
    if not filename.startswith("<"):
        try:
            cwd = os.getcwd() + os.sep
        except OSError:
            cwd = ""
        if cwd and filename.startswith(cwd):
            filename = filename[len(cwd) :]
    return f"{filename}:{line} in {code.co_name}"


def source(hold: Hold) -> str:
    """Where the connection was checked out: ``path.py:LINE in function``, or ``""``."""
    code = hold[CODE]
    return describe_code(code, line_of(code, hold[LASTI])) if code is not None else ""


def route(hold: Hold) -> str:
    """The unit of work it was checked out in (the scope's label), or ``""``."""
    scope = hold[SCOPE]
    if scope is None:
        return ""
    try:
        return str(scope.label())
    except Exception:
        return ""


def idle(hold: Hold, now: float) -> float:
    """Seconds since the last statement ended (or since the checkout)."""
    last: float = max(hold[LAST], hold[START])
    return max(now - last, 0.0)


def in_transaction(hold: Hold) -> bool:
    """Whether a transaction is open on the connection now."""
    return hold[BEGUN] is not None
