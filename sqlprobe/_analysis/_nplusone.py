"""N+1 detection: repeat counting per unit of work, ORM relationship naming.

What is counted
---------------
Within one unit of work, the same SELECT shape (fingerprint) executed
``n_plus_one_threshold`` times or more is one N+1 detection, reported exactly once per
unit of work and shape: ``sqlprobe_n_plus_one_total{engine, fingerprint, relationship}``
goes up by one and an ``n_plus_one`` warning is logged (fields in DESIGN.md). The event
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

Per unit of work at most :data:`MAX_SHAPES_PER_UNIT` shapes are counted (later new
shapes are ignored), so a long scope that runs many distinct statements stays bounded.

The statement path
------------------
The detector is the collector's ``per_statement`` callback: for a statement that is not
a SELECT it returns after one attribute comparison; for a SELECT it does a ContextVar
read, two attribute reads on the connection, one dictionary lookup and one store.
Everything else (the relationship, the source line, the log event, the counter)
happens only at the moment of detection.
Counting is not locked: two threads sharing one scope may lose an increment, which can
delay a detection by one statement but never reports one twice per scope and shape
(the report happens when the count *equals* the threshold, and counts only grow).

Relationship naming
-------------------
SQLAlchemy's ORM tells its ``do_orm_execute`` session event which statements are
relationship loads (``ORMExecuteState.is_relationship_load``) and along which path
(``loader_strategy_path``: ``User -> User.orders``). While any probe has N+1 detection
on, sqlprobe listens for that event on the ``Session`` class (so every Session,
including the one inside each ``AsyncSession``, is seen) and marks relationship loads
with an execution option holding that path; the execution context of the statement
carries the option down to the hook, where the detector reads it only when it reports.
The listener is registered once for all probes and removed when the last one detaches.
Eager batch loads (``selectinload``/``subqueryload``, no ``lazy_loaded_from``) are
marked too, as eager, and never reported: a large ``selectinload`` that runs its IN
batches five times is the fix, not the problem.

The suggestion is ``selectinload(User.orders)`` for a collection and
``joinedload(Order.user)`` for a many-to-one; a repeated SELECT that is not a
relationship load gets an empty ``relationship`` and a generic suggestion.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .. import _state
from .._core._frames import SourceFinder
from .._core._scope import current_scope_getter
from .._sinks._prometheus import OTHER, EngineSeries, Families
from .._sinks._slowlog import RateLimiter

if TYPE_CHECKING:
    from .._core._collector import Entry
    from .._probe import Probe

__all__ = ["MAX_SHAPES_PER_UNIT", "Detection", "install"]

#: Shapes counted per unit of work (scope or transaction) per engine.
MAX_SHAPES_PER_UNIT = 256
#: ``(fingerprint, relationship)`` label pairs per engine before further pairs are
#: counted under ``fingerprint="_other", relationship=""``.
MAX_SERIES = 1000
#: Characters of normalized statement text in the ``n_plus_one`` event.
STATEMENT_MAX_CHARS = 2000
#: The execution option that carries the loader path from the ORM to the hook.
OPTION = "_sqlprobe_relationship"
#: The attribute of a ``Connection`` holding its current transaction's counts.
SLOT = "_sqlprobe_n_plus_one"
#: The scope name reported when no ``sqlprobe.scope`` is open.
TRANSACTION_SCOPE = "transaction"
GENERIC_SUGGESTION = "load the rows in one query (an IN list or a join) instead of one per item"


@dataclass(frozen=True, slots=True)
class Detection:
    """One N+1 detection, as logged and as ``sqlprobe.testing`` records it."""

    engine: str
    fingerprint: str
    statement: str
    count: int
    scope: str
    relationship: str
    source: str
    suggestion: str


# -- detection listeners (sqlprobe.testing) ------------------------------------------

#: Called with every Detection of every probe; swapped whole, never mutated in place.
_detection_listeners: tuple[Callable[[Detection], None], ...] = ()
#: Called with every probe attached while registered (captures of "all engines").
_attach_listeners: tuple[Callable[[Probe], None], ...] = ()
_listeners_lock = threading.Lock()


def add_detection_listener(fn: Callable[[Detection], None]) -> None:
    """Call ``fn`` with each detection of any probe until it is removed."""
    global _detection_listeners
    with _listeners_lock:
        _detection_listeners = (*_detection_listeners, fn)


def remove_detection_listener(fn: Callable[[Detection], None]) -> None:
    """Stop calling ``fn`` (no error when it was not registered)."""
    global _detection_listeners
    with _listeners_lock:
        # ``!=``, not ``is not``: a bound method is a new object at every attribute
        # access, so the one being removed is equal to, not identical with, the one added.
        _detection_listeners = tuple(f for f in _detection_listeners if f != fn)


def add_attach_listener(fn: Callable[[Probe], None]) -> None:
    """Call ``fn`` with each probe attached from now on until it is removed."""
    global _attach_listeners
    with _listeners_lock:
        _attach_listeners = (*_attach_listeners, fn)


def remove_attach_listener(fn: Callable[[Probe], None]) -> None:
    """Stop calling ``fn`` on attach (no error when it was not registered)."""
    global _attach_listeners
    with _listeners_lock:
        _attach_listeners = tuple(f for f in _attach_listeners if f != fn)


# -- the ORM hook: one listener on the Session class while any detector needs it ----

_orm_lock = threading.Lock()
_orm_users = 0


def _on_orm_execute(state: Any) -> None:
    try:
        if state.is_relationship_load:
            path = state.loader_strategy_path
            if path is not None:
                state.update_execution_options(
                    **{OPTION: (path, state.lazy_loaded_from is not None)}
                )
    except Exception:  # naming is best effort; never disturb the ORM
        pass


def _retain_orm_hook() -> None:
    global _orm_users
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    with _orm_lock:
        if _orm_users == 0 and not event.contains(Session, "do_orm_execute", _on_orm_execute):
            event.listen(Session, "do_orm_execute", _on_orm_execute)
        _orm_users += 1


def _release_orm_hook() -> None:
    global _orm_users
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    with _orm_lock:
        _orm_users -= 1
        if _orm_users <= 0:
            _orm_users = 0
            if event.contains(Session, "do_orm_execute", _on_orm_execute):
                event.remove(Session, "do_orm_execute", _on_orm_execute)


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


# -- the metric: shared by the probes that share an engine series --------------------


class _Counts:
    """``sqlprobe_n_plus_one_total`` samples of one engine series (bounded)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[tuple[str, str], int] = {}
        self.refs = 0

    def add(self, fingerprint: str, relationship: str) -> None:
        key = (fingerprint, relationship)
        with self.lock:
            if key not in self.values and len(self.values) >= MAX_SERIES:
                key = (OTHER, "")
            self.values[key] = self.values.get(key, 0) + 1

    def collect(self, fams: Families, engine: str) -> None:
        with self.lock:
            items = list(self.values.items())
        family = fams.counter(
            "sqlprobe_n_plus_one",
            "N+1 detections: a SELECT shape repeated n_plus_one_threshold times in one unit "
            "of work.",
            ["engine", "fingerprint", "relationship"],
        )
        for (fingerprint, relationship), n in items:
            family.add_metric([engine, fingerprint, relationship], n)


_series_counts: weakref.WeakKeyDictionary[EngineSeries, _Counts] = weakref.WeakKeyDictionary()


def _retain_counts(series: EngineSeries) -> _Counts:
    with _listeners_lock:
        counts = _series_counts.get(series)
        if counts is None:
            counts = _series_counts[series] = _Counts()
            with series.lock:
                series.parts.append(counts.collect)
        counts.refs += 1
        return counts


def _release_counts(series: EngineSeries, counts: _Counts) -> None:
    with _listeners_lock:
        counts.refs -= 1
        if counts.refs <= 0 and _series_counts.get(series) is counts:
            del _series_counts[series]
            with series.lock:
                if counts.collect in series.parts:
                    series.parts.remove(counts.collect)


# -- the detector -----------------------------------------------------------------------


class Detector:
    """The per-probe N+1 detector; :meth:`on_statement` is the collector's callback."""

    def __init__(self, probe: Probe, threshold: int, counts: _Counts) -> None:
        collector = probe.collector
        assert collector is not None
        self.engine = collector.engine_name
        self.logger = collector.logger
        self.threshold = threshold
        self.counts = counts
        self.finder = SourceFinder()
        # A busy endpoint with an N+1 detects it on every request: the counter counts
        # each detection, the log keeps a few per scope and shape per minute, like the
        # slow-query log, with the number left out in ``suppressed``.
        self.limiter = RateLimiter()
        self.on_statement = self._make_callback()

    def _make_callback(self) -> Callable[[Entry, Any], None]:
        threshold = self.threshold
        get_scope = current_scope_getter()
        report = self.report
        key = self
        ref = weakref.ref
        slot_name = SLOT

        def on_statement(entry: Entry, context: Any) -> None:
            shape = entry[0]
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
            n = counts.get(fingerprint, 0) + 1
            if n > threshold:
                return  # reported already; the count stops here
            if n == 1 and len(counts) >= MAX_SHAPES_PER_UNIT:
                return
            counts[fingerprint] = n
            if n == threshold:
                report(entry, context, scope, n)

        return on_statement

    def report(self, entry: Entry, context: Any, scope: Any, count: int) -> None:
        """Log, count and publish one detection (runs once per unit of work and shape)."""
        shape = entry[0]
        relationship = suggestion = ""
        options = getattr(context, "execution_options", None)
        marked = options.get(OPTION) if options is not None else None
        if marked is not None:
            path, lazy = marked
            if not lazy:
                return  # an eager loader's IN batches: the fix, not the problem
            relationship, suggestion = describe_path(path)
        detection = Detection(
            engine=self.engine,
            fingerprint=shape.fingerprint,
            statement=shape.normalized[:STATEMENT_MAX_CHARS],
            count=count,
            scope=scope.name if scope is not None else TRANSACTION_SCOPE,
            relationship=relationship,
            source=self.finder.source(sys._getframe(1)),
            suggestion=suggestion or GENERIC_SUGGESTION,
        )
        self.counts.add(entry[1].fingerprint, relationship)
        suppressed = self.limiter.admit(f"{detection.scope}\x00{detection.fingerprint}")
        if suppressed is not None:
            self.logger.warning("n_plus_one", **asdict(detection), suppressed=suppressed)
        for listener in _detection_listeners:
            try:
                listener(detection)
            except Exception:  # one broken capture must not starve the others
                continue


def install(probe: Probe) -> Callable[[], None] | None:
    """Start N+1 detection on a newly attached probe; return the undo function.

    With ``n_plus_one_threshold=0`` nothing is installed (no callback, no ORM hook).
    Captures of "all engines" (``sqlprobe.testing``) are told about the probe either way.
    """
    for listener in _attach_listeners:
        try:
            listener(probe)
        except Exception:  # a capture must never break attach()
            continue
    options = probe.options
    collector = probe.collector
    if options is None or collector is None or options.n_plus_one_threshold <= 0:
        return None
    series = collector.series
    counts = _retain_counts(series)
    detector = Detector(probe, options.n_plus_one_threshold, counts)
    _retain_orm_hook()
    collector.per_statement = detector.on_statement
    released = threading.Lock()

    def release_shared() -> None:
        if released.acquire(blocking=False):
            _release_orm_hook()
            _release_counts(series, counts)

    # An engine dropped without detach() must not keep the Session-class listener alive.
    engine = probe.engine
    finalizer = weakref.finalize(
        getattr(engine, "sync_engine", engine), _state.defer, release_shared
    )

    def undo() -> None:
        if collector.per_statement is detector.on_statement:
            collector.per_statement = None
        finalizer.detach()
        release_shared()

    return undo
