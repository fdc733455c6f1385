"""One checkout of a pooled connection, as the pool hooks and the hold monitor see it.

A :class:`Hold` is made when the pool hands a connection out and lives on the pool's
connection record until the check-in. It keeps what is needed to say, later, *who*
holds the connection and *what it does with it*:

* where it was checked out: the code object and line of the first application frame
  (names are looked up only when an event is written: :meth:`Hold.source`), and the
  unit of work (:func:`sqlprobe.scope`, the request) open at that moment;
* how long it waited for the pool, and when it was handed out (``perf_counter``);
* statement time accumulated while it is out (the statement hooks add each statement's
  duration, COMMIT and ROLLBACK included), the statement count, the end of the last
  statement and that statement's text (the raw text is kept as a reference only, never
  exported: :meth:`Hold.statement_shape` gives its normalized form);
* the open transaction, if any (its begin time and the statement time at its begin),
  and the most time any of its transactions spent without a statement running.

Nothing here takes a lock: a hold is written by the thread (or task) that holds the
connection, and read by the watchdog thread, which only reads.
"""

from __future__ import annotations

import os
from types import CodeType
from typing import Any

__all__ = ["Hold", "UnitTotals", "describe_code"]


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


class UnitTotals:
    """What the checkouts of one unit of work added up to, per engine (see ``_pool``)."""

    __slots__ = ("seconds", "statements", "wait")

    def __init__(self) -> None:
        self.statements = 0
        self.seconds = 0.0
        self.wait = 0.0


class Hold:
    """One checkout of a pooled connection (see the module docstring)."""

    __slots__ = (
        "begun",
        "begun_seconds",
        "code",
        "last",
        "line",
        "reported",
        "scope",
        "seconds",
        "start",
        "statement",
        "statements",
        "txn_idle",
        "unit",
        "wait",
    )

    def __init__(
        self,
        start: float,
        wait: float,
        code: CodeType | None,
        line: int,
        scope: Any,
        unit: UnitTotals | None,
    ) -> None:
        self.start = start
        self.wait = wait
        self.code = code
        self.line = line
        #: the innermost open scope at checkout (or None)
        self.scope = scope
        #: the totals of that scope for this engine; None once folded in
        self.unit = unit
        self.seconds = 0.0
        self.statements = 0
        #: ``perf_counter`` at the end of the last statement (the checkout at first)
        self.last = start
        self.statement: str | None = None
        #: ``perf_counter`` at the begin of the open transaction, and the statement
        #: time accumulated then; None when no transaction is open
        self.begun: float | None = None
        self.begun_seconds = 0.0
        #: the most time one transaction of this checkout spent with no statement running
        self.txn_idle = 0.0
        #: a ``pool_hold`` event was written for this checkout already
        self.reported = False

    def source(self) -> str:
        """Where the connection was checked out: ``path.py:LINE in function``."""
        return describe_code(self.code, self.line)

    def route(self) -> str:
        """The unit of work it was checked out in (the scope's label), or ``""``."""
        scope = self.scope
        if scope is None:
            return ""
        try:
            return str(scope.label())
        except Exception:
            return ""

    def idle(self, now: float) -> float:
        """Seconds since the last statement ended (or since the checkout)."""
        return max(now - self.last, 0.0)

    def in_transaction(self) -> bool:
        """Whether a transaction is open on the connection now."""
        return self.begun is not None
