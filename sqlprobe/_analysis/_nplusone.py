"""N+1 detection: repeat counting per unit of work, ORM relationship naming.

What is counted
---------------
Within one unit of work, the same SELECT shape (fingerprint) executed
``n_plus_one_threshold`` times or more with different values (parameters, or literals
written into the text) is one N+1 detection, reported exactly once per
unit of work and shape: ``sqlprobe_n_plus_one_total{engine, fingerprint, relationship}``
goes up by one and an ``n_plus_one`` warning is logged (fields in the logging docs). The event
is emitted when the count *reaches* the threshold, so ``count`` is the threshold and the
``source`` line is the loop that is doing it, while it is doing it.

Units of work
-------------
* The innermost open :func:`sqlprobe.scope` (the middleware opens one per request);
  its counts live in ``Scope.state`` and die with it.
* Otherwise each database transaction: the ``Transaction`` object the statement's
  ``Connection`` reports (``Connection.get_transaction()``), found from the execution
  context the hook already has. Its counts are kept on that ``Connection`` (one
  attribute holding the detector, a weak reference to the transaction and the counts),
  replaced when the connection's transaction changes: a Connection is used by one
  thread or task at a time, so this needs neither a lock nor a per-thread slot, and
  the counts go when the transaction ends (at the connection's next statement) or
  with the connection. Why not ``ConnectionEvents.begin/commit/rollback``: any
  ConnectionEvents listener moves every statement of the engine onto SQLAlchemy's
  slower dispatch path (about 2.2 µs each, see ``_hooks``); why not
  ``SessionEvents.after_begin``: Core users have transactions too.

A statement repeated with the same text and the same parameters as its first execution
in the unit (or with none at all, such as the same parameterless ``SELECT ... FROM
users`` five times) is a repeated query, not one query per item: it does not count.

Per unit of work at most :data:`MAX_SHAPES_PER_UNIT` shapes are counted (later new
shapes are ignored), so a long scope that runs many distinct statements stays bounded.

The statement path
------------------
The detector is the collector's unit step: for a statement that is not
a SELECT it returns after one attribute comparison; for a SELECT it does a ContextVar
read, two attribute reads on the connection, one dictionary lookup, a comparison of
the parameters and one store. Everything else (the relationship, the source line, the
log event, the counter) happens only at the moment of detection, and a detection the
rate limit drops costs one count and nothing more (no stack walk, no event) unless a
test capture is listening.
Counting is not locked: two threads sharing one scope may lose an increment, which can
delay a detection by one statement but never reports one twice per scope and shape
(the report happens when the count *equals* the threshold, and counts only grow).

Relationship naming
-------------------
The ORM hook (``_hooks._orm``) marks relationship loads with an execution option
holding the loader path; the detector reads it only when it reports. Eager batch loads
(``selectinload``/``subqueryload``, no ``lazy_loaded_from``) are marked too, as eager,
and never reported: a large ``selectinload`` that runs its IN batches five times is
the fix, not the problem.

The suggestion is ``selectinload(User.orders)`` for a collection and
``joinedload(Order.user)`` for a many-to-one; a repeated SELECT that is not a
relationship load gets an empty ``relationship`` and a generic suggestion.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .._core._fingerprint import Shape
from .._core._frames import SourceFinder
from .._core._ratelimit import RateLimiter
from .._core._records import RELATIONSHIP_OPTION, AttachContext, Detection
from .._core._scope import current_scope_getter

__all__ = ["GENERIC_SUGGESTION", "MAX_SHAPES_PER_UNIT", "Detector", "describe_path"]

#: Shapes counted per unit of work (scope or transaction) per engine.
MAX_SHAPES_PER_UNIT = 256
#: Characters of normalized statement text in the ``n_plus_one`` event.
STATEMENT_MAX_CHARS = 2000
#: The attribute of a ``Connection`` holding its current transaction's counts.
SLOT = "_sqlprobe_n_plus_one"
#: The scope name reported when no ``sqlprobe.scope`` is open.
TRANSACTION_SCOPE = "transaction"
GENERIC_SUGGESTION = "load the rows in one query (an IN list or a join) instead of one per item"


def describe_path(path: Any) -> tuple[str, str]:
    """``("User.orders", "selectinload(User.orders)")`` from an ORM loader path."""
    elements: Any = getattr(path, "path", ())
    if len(elements) < 2:
        return "", ""
    prop, entity = elements[-1], elements[-2]
    key = getattr(prop, "key", None)
    cls = getattr(entity, "class_", None)
    if not isinstance(key, str) or cls is None:
        return "", ""
    name = f"{cls.__name__}.{key}"
    loader = "selectinload" if getattr(prop, "uselist", True) else "joinedload"
    return name, f"{loader}({name})"


class Detector:
    """The per-engine N+1 detector; :attr:`on_statement` is the collector's unit step.

    ``count(fingerprint, relationship)`` counts every detection (the metrics sink);
    ``listeners()`` returns the functions that want every :class:`Detection` (test
    captures), each called with it.
    """

    def __init__(
        self,
        ctx: AttachContext,
        threshold: int,
        *,
        count: Callable[[str, str], None],
        listeners: Callable[[], tuple[Callable[[Detection], None], ...]],
    ) -> None:
        self.engine = ctx.info.name
        self.logger = ctx.logger
        self.contain = ctx.contain
        self.threshold = threshold
        self.count = count
        self.listeners = listeners
        self.finder = SourceFinder()
        # A busy endpoint with an N+1 detects it on every request: the counter counts
        # each detection, the log keeps a few per scope and shape per minute, like the
        # slow-query log, with the number left out in ``suppressed``.
        self.limiter = RateLimiter()
        self.on_statement = self._make_callback()

    def _make_callback(self) -> Callable[[Shape, str, Any, Any], None]:
        threshold = self.threshold
        get_scope = current_scope_getter()
        report = self.report
        key = self
        ref = weakref.ref
        slot_name = SLOT

        def on_statement(shape: Shape, statement: str, context: Any, parameters: Any) -> None:
            if shape.operation != "SELECT":
                return
            scope = get_scope()
            if scope is not None:
                state = scope.state
                counts = state.get(key)
                if counts is None:
                    counts = state[key] = {}
            else:
                try:
                    connection = context.root_connection
                except AttributeError:
                    return
                unit = connection.get_transaction() or connection
                slot = connection.__dict__.get(slot_name)
                if slot is not None and slot[1]() is unit and slot[0] is key:
                    counts = slot[2]
                else:
                    # A weak reference: the transaction holds the connection, so a
                    # strong one would make a reference cycle of every connection.
                    counts = {}
                    connection.__dict__[slot_name] = (key, ref(unit), counts)
            fingerprint = shape.fingerprint
            seen = counts.get(fingerprint)
            if seen is None:
                if len(counts) < MAX_SHAPES_PER_UNIT:
                    counts[fingerprint] = [1, parameters, statement]
                return
            n = seen[0]
            if n >= threshold or (parameters == seen[1] and statement == seen[2]):
                return  # reported already, or the same values again: not per item
            seen[0] = n = n + 1
            if n == threshold:
                report(shape, context, scope, n)

        return on_statement

    def report(self, shape: Shape, context: Any, scope: Any, count: int) -> None:
        """Count, log and publish one detection (runs once per unit of work and shape)."""
        relationship = suggestion = ""
        options = getattr(context, "execution_options", None)
        marked = options.get(RELATIONSHIP_OPTION) if options is not None else None
        if marked is not None:
            path, lazy = marked
            if not lazy:
                return  # an eager loader's IN batches: the fix, not the problem
            relationship, suggestion = describe_path(path)
        self.count(shape.fingerprint, relationship)
        scope_name = scope.name if scope is not None else TRANSACTION_SCOPE
        suppressed = self.limiter.admit(f"{scope_name}\x00{shape.fingerprint}")
        listeners = self.listeners()
        if suppressed is None and not listeners:
            return  # rate-limited and nobody listening: the count is all it costs
        detection = Detection(
            engine=self.engine,
            fingerprint=shape.fingerprint,
            statement=shape.normalized[:STATEMENT_MAX_CHARS],
            count=count,
            scope=scope_name,
            relationship=relationship,
            source=self.finder.source(sys._getframe(1)),
            suggestion=suggestion or GENERIC_SUGGESTION,
        )
        if suppressed is not None:
            self.logger.warning("n_plus_one", **asdict(detection), suppressed=suppressed)
        for listener in listeners:
            try:
                listener(detection)
            except Exception:  # one broken capture must not starve the others
                self.contain("capture")
