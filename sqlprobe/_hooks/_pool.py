"""Connection-pool and transaction hooks: what is measured per checkout and per transaction.

What is measured, and from which hook
-------------------------------------
Nothing here runs per statement: every hook fires per checkout, per new connection or
per transaction. In particular sqlprobe adds no ``ConnectionEvents`` listener
(``begin``, ``commit``, ``rollback``, ``engine_connect``, ``engine_disposed``): any of
them sets ``Engine._has_events`` and moves every statement onto SQLAlchemy's slower
dispatch path (about 2.2 µs per statement).

* **Checkout wait** (``sqlprobe_pool_checkout_wait_seconds``) and **timeouts**: SQLAlchemy
  has no "checkout requested" event, so the pool *instance*'s ``connect`` is wrapped
  (``Engine.raw_connection()``, which every ``engine.connect()`` and ``Session`` goes
  through, calls ``self.pool.connect()``). A checkout that fails because a new DBAPI
  connection could not be opened (the database refused or was unreachable) is counted
  in ``sqlprobe_pool_connect_errors_total{error}`` and re-raised unchanged; it is not a
  statement error. The wait is the whole call: queueing, opening
  a new connection when the pool makes one, and ``pool_pre_ping``: what the application
  waited. Only checkouts that got a connection are observed; one that raised
  SQLAlchemy's ``TimeoutError`` is counted once in
  ``sqlprobe_pool_checkout_timeouts_total`` instead and the error is re-raised unchanged.
* ``engine.dispose()`` replaces ``engine.pool`` by ``pool.recreate()``. Its only event,
  ``engine_disposed``, is a ConnectionEvents event (see above), so the pool instance's
  ``recreate`` is wrapped too: the new pool is wired before anything can check out
  from it. PoolEvents listeners registered through the engine are carried to the new
  pool by SQLAlchemy itself. Both wrappers are instance attributes, removed on undo
  (or made inert when something else has wrapped on top of them since). A pool the
  application assigns to ``engine.pool`` itself is not wrapped: its gauges are read,
  its waits and timeouts are not measured.
* **Use time**: from the ``connect`` wrapper handing the connection out to PoolEvents
  ``checkin``; a connection ``detach``-ed from the pool is not observed. There is no
  ``checkout`` listener on a QueuePool: any ``checkout`` listener moves every checkout
  onto SQLAlchemy's slower path (other pools have one, to learn their connections).
* **Connect time** and **connects**: the PoolEvents ``connect`` listener runs right after
  the DBAPI connection was made and configured; the record's ``last_connect_time`` is set
  just before SQLAlchemy calls the driver, so the difference is the time to open and
  set up a connection (the dialect's own first-connect initialization included).
* **Invalidations**: PoolEvents ``invalidate`` and ``soft_invalidate``, plus the
  connections a pool-wide invalidation made stale (a failed ``pool_pre_ping`` or a
  disconnect error invalidates every older connection; SQLAlchemy replaces those later
  with an ordinary ``close``). Each connection is counted once.
* **Idle/used gauges** are read from the pool's own state when Prometheus scrapes, so
  they cannot drift. ``QueuePool``/``AsyncAdaptedQueuePool``: ``checkedout()`` and
  ``checkedin()`` of the engine's current pool, less the slots that hold no connection
  (invalidated or detached, until their next checkout reopens one). Other pools: the
  connection records sqlprobe has seen (held weakly), each by its own ``in_use`` and
  ``dbapi_connection``; a connection opened before attach shows once it is checked
  out. Connections of a pool that ``dispose()`` replaced no longer count, even while
  still checked out: as SQLAlchemy documents, they no longer belong to the engine.
* **Max**: ``pool_size + max_overflow`` for a QueuePool (absent when ``max_overflow`` is
  -1 or ``pool_size`` is 0: no limit); 1 for ``StaticPool`` and ``AssertionPool`` (one
  connection, however many users share it); absent for ``NullPool`` (no limit) and
  ``SingletonThreadPool`` (one connection per thread, and its ``pool_size`` closes extra
  connections rather than limiting them).
* **Transactions** (``sqlprobe_transaction_duration_seconds{outcome}``): the engine's own
  dialect instance's ``do_begin``, ``do_commit`` and ``do_rollback`` are wrapped
  (instance attributes, restored on undo). ``Connection`` calls them once per root
  transaction on every SQLAlchemy 2.x (savepoints are part of their root transaction;
  two-phase transactions use other methods and are not observed). The begin time is kept
  on the pool's connection record under a private attribute name (as is the checkout
  time; the application's ``connection.info`` dictionary is never touched), so the
  pool's reset-on-return rollback of a connection with no begun transaction finds
  nothing and is ignored. A transaction ends as ``commit`` when
  the commit succeeded and as ``rollback`` otherwise: a rollback, a failed commit, or a
  connection invalidated while the transaction was open. In ``AUTOCOMMIT`` isolation
  SQLAlchemy still brackets work in begin/commit, and so is counted.

* **Hold attribution** (``pool_hold``/``pool_exhausted`` events, the idle histogram,
  the per-unit-of-work histograms, the peak gauge): the ``connect`` wrapper leaves a
  hold (``_core._hold``, a list) on the connection record. It keeps the code object and
  line of the first application frame (found with a per-code-object cache, see
  ``_frames.SourceFinder.locate``), the open :func:`sqlprobe.scope`, the wait, and the
  checkout time. The statement wrappers add each statement's duration, its end and its
  text to that hold (``_statement``: one dictionary lookup on the record they reach
  through the execution context, a few stores); the transaction wrappers add COMMIT and
  ROLLBACK time and note when a transaction begins and how much of it ran no
  statement. The check-in computes idle = use - statement time. The holds still out are
  kept in one set per engine (for the watchdog thread and the ``pool_exhausted`` list);
  its size after each checkout is the in-use count whose maximum the peak gauge shows.
* **Units of work**: the first checkout in a scope opens that scope's totals for this
  engine (statements, statement time, pool wait); each check-in adds its hold to them,
  and when the scope ends its totals become one observation of each
  ``sqlprobe_scope_*`` histogram under the scope's label (holds still out then are
  added as they stand).

The measurements go to a :class:`PoolSink` (the Prometheus series, the OTel metrics,
the multiprocess writer: whatever the probe wired), never to a metric directly; the
hold measurements go to a :class:`HoldSink` (the Prometheus series) and the events
to a :class:`HoldMonitor`. When the Prometheus series is the only sink
(:class:`BufferedSink`), the per-checkout values (wait, use, idle, commit and
rollback durations) are appended to its pending lists instead of handed over one
call, one lock and one bisection each; the series settles them into its histograms
before every scrape, and the hooks settle them whenever a list reaches
:data:`SETTLE_AT` values. A ROLLBACK or COMMIT with no transaction of the application's
open (the pool's reset-on-return, or a dialect's own on a connection it opened) is not
timed at all: neither a transaction nor statement time of the checkout; only its failure
counts, as a failed statement.

What a request costs here, in the order it happens: the checkout wrapper (the wait,
the frame walk, the hold), ``do_begin`` (one store on the record and the hold),
``do_commit`` (the hold's statement and idle-in-transaction time, the transaction's
duration), the reset-on-return ``do_rollback`` (a pass-through), and the check-in
(use and idle time, the unit of work, the thresholds): five calls of ours and no lock.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import AssertionPool, Pool, QueuePool, StaticPool

from .._core._frames import FRAMES_BY_MODULE_NAME, SourceFinder
from .._core._hold import (
    BEGUN,
    BEGUN_SECONDS,
    LAST,
    REPORTED,
    SECONDS,
    START,
    STATEMENTS,
    TXN_IDLE,
    UNIT,
    WAIT,
    Hold,
    UnitTotals,
)
from .._core._records import Contain
from .._core._scope import Scope, current_scope_getter
from ._shadow import shadow

__all__ = [
    "MAX_HOLDS",
    "SETTLE_AT",
    "BufferedSink",
    "HoldMonitor",
    "HoldSink",
    "PoolFanout",
    "PoolHooks",
    "PoolSink",
    "Snapshot",
    "keeps_connections",
]

#: Checkouts tracked at once per engine for the watchdog and the holders list (a pool
#: bigger than this, or connections leaked by the thousand, are still measured).
MAX_HOLDS = 10_000

#: ``(idle, used, max)`` connections of a pool now; ``max`` None when unbounded.
Snapshot = tuple[int, int, "int | None"]


class PoolSink(Protocol):
    """Receives each pool and transaction measurement of one engine.

    Called on the application's thread (or event loop), outside sqlprobe's locks; an
    exception is contained and counted as an internal error of stage ``pool``.
    """

    def checkout(self, seconds: float) -> None:
        """A checkout obtained a connection after waiting ``seconds``."""

    def checkin(self, seconds: float) -> None:
        """A connection went back to the pool after ``seconds`` checked out."""

    def connected(self, seconds: float) -> None:
        """A new DBAPI connection took ``seconds`` to open."""

    def connect_failed(self, error: str) -> None:
        """A new DBAPI connection could not be opened (``error``: the class name)."""

    def timeout(self) -> None:
        """A checkout gave up with SQLAlchemy's ``TimeoutError``."""

    def invalidated(self) -> None:
        """A connection was invalidated (counted once per connection)."""

    def transaction(self, outcome: str, seconds: float) -> None:
        """A transaction ended as ``commit`` or ``rollback`` after ``seconds``."""

    def statement_failed(self, operation: str, error: str) -> None:
        """A COMMIT or ROLLBACK failed in the driver (``error``: the class name)."""


class HoldSink(Protocol):
    """Receives the hold measurements of one engine (the Prometheus series)."""

    def idle(self, seconds: float) -> None:
        """A connection was checked in after ``seconds`` out with no statement running."""

    def unit(self, route: str, statements: int, seconds: float, wait: float, limit: int) -> None:
        """A unit of work ended: its statements, statement time and pool wait.

        ``limit`` is the most ``route`` labels to keep (further ones count as ``_other``).
        """


@runtime_checkable
class BufferedSink(Protocol):
    """A pool sink that takes its histogram values as appends to lists (the series).

    ``pending()`` gives the lists of checkout waits, use times, idle times, commit and
    rollback durations, or None when the sink wants each value at once; the hooks call
    ``settle()`` when a list reaches :data:`SETTLE_AT` values, and the sink settles them
    itself before it is read.
    """

    def pending(self) -> tuple[list[float], ...] | None: ...

    def settle(self) -> None: ...


class HoldMonitor(Protocol):
    """Writes the ``pool_hold`` and ``pool_exhausted`` events (see ``_analysis._holds``)."""

    hold_threshold: float
    idle_in_transaction_threshold: float
    wait_threshold: float

    def checked_in(self, hold: Hold, now: float, held: float, idle: float) -> None:
        """A checkout over a threshold ended (called only when one was crossed)."""

    def exhausted(self, waited: float, timed_out: bool) -> None:
        """A checkout waited ``waited`` seconds (and gave up when ``timed_out``)."""


def _limit(pool: Pool) -> int | None:
    if isinstance(pool, QueuePool):
        size = pool.size()
        overflow = getattr(pool, "_max_overflow", -1)
        if size <= 0 or not isinstance(overflow, int) or overflow < 0:
            return None
        return size + overflow
    if isinstance(pool, (StaticPool, AssertionPool)):
        return 1
    return None


def keeps_connections(pool: Pool) -> bool:
    """Whether a returned connection stays in the pool (a NullPool closes it)."""
    from sqlalchemy.pool import NullPool

    return not isinstance(pool, NullPool)


class PoolFanout:
    """A pool sink that hands each measurement to several, containing each failure."""

    def __init__(self, sinks: tuple[PoolSink, ...], contain: Contain) -> None:
        self.sinks = sinks
        self.contain = contain

    def _each(self, name: str, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, name)(*args)
            except Exception:
                self.contain("pool")

    def checkout(self, seconds: float) -> None:
        self._each("checkout", seconds)

    def checkin(self, seconds: float) -> None:
        self._each("checkin", seconds)

    def connected(self, seconds: float) -> None:
        self._each("connected", seconds)

    def connect_failed(self, error: str) -> None:
        self._each("connect_failed", error)

    def timeout(self) -> None:
        self._each("timeout")

    def invalidated(self) -> None:
        self._each("invalidated")

    def transaction(self, outcome: str, seconds: float) -> None:
        self._each("transaction", outcome, seconds)

    def statement_failed(self, operation: str, error: str) -> None:
        self._each("statement_failed", operation, error)


# The per-checkout and per-transaction paths write a hold's fields by literal index.
assert (START, UNIT, SECONDS, LAST, BEGUN, BEGUN_SECONDS, TXN_IDLE) == (0, 5, 6, 8, 10, 11, 12)

#: Values a pending list may hold before the hook that appends settles them.
SETTLE_AT = 256


def _nothing() -> None:
    return None


_serial = iter(range(1, 1 << 62))

#: Whether this SQLAlchemy's pools return connections through ``Pool._return_conn``
#: (2.0 and 2.1 do); without it the public ``checkin`` event is used.
_RETURN_CONN_HOOK = callable(getattr(Pool, "_return_conn", None))


class PoolHooks:
    """The pool and transaction hooks of one attached engine.

    :meth:`install` wires the engine and returns the undo; :meth:`snapshot` reads the
    idle, used and maximum connections of the engine's pool now (gauges are read, not
    counted, so they cannot drift).
    """

    def __init__(self, engine: Any, *, contain: Contain, error_name: Callable[..., str]) -> None:
        self._engine_ref = weakref.ref(engine)
        self._sink: Any = None
        self._contain = contain
        self._error_name = error_name
        self._dbapi_error = getattr(getattr(engine.dialect, "loaded_dbapi", None), "Error", None)
        self._lock = threading.Lock()
        serial = next(_serial)
        #: attribute names on a pool's connection record: checkout and begin times
        self._out = f"_sqlprobe_out_{serial}"
        self._txn = f"_sqlprobe_txn_{serial}"
        #: connection records seen (gauges of pools that keep no count of their own)
        self._records: weakref.WeakSet[Any] = weakref.WeakSet()
        #: record -> time.time() when it went back to its pool without a connection
        self._emptied: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        #: record -> its ``last_connect_time`` when its invalidation was counted
        self._counted: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._active = True
        self._undo: list[Callable[[], Any]] = []
        #: builds the ``_return_conn`` wrapper of a pool (None: the ``checkin`` event)
        self._checkin_hook: Callable[[Pool], Callable[[Any], None]] | None = None
        #: sqlprobe's own PoolEvents listeners (left out of :meth:`side_connection`)
        self._own: set[Callable[..., Any]] = set()
        #: id -> hold of the connections now checked out through the wrapper (holds
        #: are lists, so they are keyed by identity)
        self._holds: dict[int, Hold] = {}
        #: the most holds out at once since the last :meth:`take_peak`
        self._peak = [0]
        self._peak_ever = 0
        self._finder = SourceFinder()
        self._hold_sink: HoldSink | None = None
        self._monitor: HoldMonitor | None = None
        self._max_routes = 200
        #: the pool sink's pending lists (wait, use, idle, commit, rollback) when it
        #: takes values that way (see :class:`BufferedSink`), and its ``settle``
        self._pending: tuple[list[float], ...] | None = None
        self._settle: Callable[[], None] = _nothing

    @property
    def hold_key(self) -> str:
        """The connection-record attribute holding the :class:`Hold` of a checkout."""
        return self._out

    def holders(self) -> list[Hold]:
        """The holds of the connections checked out now (any order)."""
        while True:
            try:
                return list(self._holds.values())
            except RuntimeError:  # changed size while copied by another thread
                continue

    def take_peak(self) -> int:
        """The most connections out at once since the previous call; starts again."""
        peak = max(self._peak[0], len(self._holds))
        self._peak[0] = len(self._holds)
        if peak > self._peak_ever:
            self._peak_ever = peak
        return peak

    def peak(self) -> int:
        """The most connections out at once since attach."""
        return max(self._peak_ever, self._peak[0], len(self._holds))

    def after_fork(self) -> None:
        """In a forked child: the parent's other threads' checkouts will never return."""
        self._holds.clear()
        self._peak[0] = 0

    # -- gauges -------------------------------------------------------------------------

    def snapshot(self) -> Snapshot | None:
        """``(idle, used, max)`` of the engine's current pool; None once the engine is gone."""
        engine = self._engine_ref()
        if engine is None or not self._active:
            return None
        try:
            pool = engine.pool
            if isinstance(pool, QueuePool):
                with self._lock:
                    emptied = list(self._emptied.items())
                # checkedin() counts pool slots; a slot whose connection was invalidated
                # or detached holds none until its next checkout reopens one (its
                # ``last_connect_time`` then moves past the moment it was emptied).
                empty = sum(
                    1
                    for rec, when in emptied
                    if rec.dbapi_connection is None
                    and not rec.in_use
                    and rec.last_connect_time <= when
                    and getattr(rec, "_ConnectionRecord__pool", pool) is pool
                )
                idle = max(pool.checkedin() - empty, 0)
                return idle, max(pool.checkedout(), 0), _limit(pool)
            with self._lock:
                records = list(self._records)
            idle = used = 0
            for rec in records:
                if getattr(rec, "_ConnectionRecord__pool", pool) is not pool:
                    continue
                if rec.in_use:
                    used += 1
                elif rec.dbapi_connection is not None:
                    idle += 1
            return idle, used, _limit(pool)
        except Exception:
            self._contain("pool")
            return None

    def side_connection(self) -> Any:
        """A new DBAPI connection outside the pool, set up like the application's.

        Opened through the pool's own connection factory (URL, ``connect_args``,
        ``creator``, ``do_connect`` handlers), then handed to every ``connect`` event
        handler of the pool except sqlprobe's own: the dialect's set-up and the
        application's (``search_path``, session variables). For EXPLAIN and the index
        advisor, which must never take a connection from the application's pool. The
        caller closes it.
        """
        from sqlalchemy.pool.base import _ConnectionRecord

        engine = self._engine_ref()
        if engine is None:
            raise RuntimeError("the engine is gone")
        pool = engine.pool
        record = _ConnectionRecord(pool, connect=False)
        connection = pool._invoke_creator(record)
        try:
            for fn in pool.dispatch.connect:
                if fn not in self._own:
                    fn(connection, record)
        except BaseException:
            connection.close()
            raise
        return connection

    # -- wiring -------------------------------------------------------------------------

    def install(
        self,
        sink: PoolSink,
        holds: HoldSink | None = None,
        monitor: HoldMonitor | None = None,
        *,
        max_routes: int = 200,
    ) -> Callable[[], None]:
        """Wire the engine's pool, its PoolEvents and its dialect to ``sink``; return the undo.

        ``holds`` receives the idle and per-unit-of-work measurements, ``monitor`` the
        checkouts over its thresholds; either may be None (nothing of it is measured).
        """
        engine = self._engine_ref()
        assert engine is not None
        self._sink = sink
        self._hold_sink = holds
        self._monitor = monitor
        self._max_routes = max_routes
        if isinstance(sink, BufferedSink) and sink is holds:  # type: ignore[comparison-overlap]
            self._pending = sink.pending()
            self._settle = sink.settle
        listeners = self._listeners(engine)
        try:
            for target, name, fn in listeners:
                self._own.add(fn)
                event.listen(target, name, fn)
                self._undo.append(_remover(target, name, fn))
            self._wire_pool(engine.pool)
            self._wire_dialect(engine.dialect)
        except BaseException:
            self._uninstall()
            raise
        return self._uninstall

    def _uninstall(self) -> None:
        self._active = False
        undo, self._undo = self._undo, []
        for fn in reversed(undo):
            try:
                fn()
            except Exception:  # undo all it can
                continue

    def _count_invalidation(self, record: Any) -> None:
        with self._lock:
            self._counted[record] = record.last_connect_time
        self._sink.invalidated()

    def _listeners(self, engine: Any) -> list[tuple[Any, str, Callable[..., Any]]]:
        """The PoolEvents listeners to register on ``engine`` (carried over by dispose)."""
        sink = self._sink
        hooks = self
        contain = self._contain
        out_key = self._out
        txn_key = self._txn
        lock = self._lock
        records = self._records
        emptied = self._emptied
        # A QueuePool counts its connections itself; other pools need the records seen.
        track = not isinstance(engine.pool, QueuePool)

        def on_connect(dbapi_connection: Any, record: Any) -> None:
            try:
                elapsed = max(time.time() - record.last_connect_time, 0.0)
                with lock:
                    records.add(record)
                    emptied.pop(record, None)
                sink.connected(elapsed)
            except Exception:
                contain("pool")

        def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            try:
                with lock:
                    records.add(record)
            except Exception:
                contain("pool")

        checkin = sink.checkin
        held = self._holds
        hold_sink = self._hold_sink
        idle_sink = hold_sink.idle if hold_sink is not None else None
        monitor = self._monitor
        report = monitor.checked_in if monitor is not None else None
        hold_threshold = monitor.hold_threshold if monitor is not None else 0.0
        txn_threshold = monitor.idle_in_transaction_threshold if monitor is not None else 0.0
        # The Prometheus series alone (no OTel pool metrics): values are appended to its
        # pending lists (see EngineSeries.pending) rather than handed over one call each.
        pending = self._pending
        uses, idles = (pending[1], pending[2]) if pending is not None else ([], [])
        use_append, idle_append = uses.append, idles.append
        settle = self._settle
        buffered = pending is not None

        def make_checked_in(
            previous: Callable[[Any], None] | None,
            unbound: Callable[[Any, Any], None] | None,
            pool_ref: Callable[[], Any],
        ) -> Callable[[Any], None]:
            """The whole check-in in one function; with ``unbound``, it is also the
            pool's ``_return_conn`` and calls the one it replaced at its end."""

            def checked_in(record: Any) -> None:
                if hooks._active:
                    try:
                        state = record.__dict__
                        hold = state.pop(out_key, None)
                        # A transaction still open here ended without SQLAlchemy rolling
                        # it back through the dialect (e.g. an asyncio connection collected
                        # by the garbage collector): the database rolls it back.
                        if txn_key in state:
                            sink.transaction("rollback", perf_counter() - state.pop(txn_key))
                        if record.dbapi_connection is None:
                            with lock:
                                emptied[record] = time.time()
                        if hold is not None:
                            now = perf_counter()
                            use = now - hold[0]  # START
                            held.pop(id(hold), None)
                            idle = use - hold[6]  # SECONDS
                            if idle < 0.0:
                                idle = 0.0
                            unit = hold[5]  # UNIT
                            if unit is not None:
                                unit.statements += hold[STATEMENTS]
                                unit.seconds += hold[SECONDS]
                                unit.wait += hold[WAIT]
                                hold[UNIT] = None
                            if buffered:
                                use_append(use)
                                idle_append(idle)
                                if len(uses) >= SETTLE_AT:
                                    settle()
                            else:
                                checkin(use)
                                if idle_sink is not None:
                                    idle_sink(idle)
                            if (
                                report is not None
                                and (use >= hold_threshold or hold[12] >= txn_threshold)
                                and not hold[REPORTED]
                            ):  # hold[12]: TXN_IDLE
                                report(hold, now, use, idle)
                    except Exception:
                        contain("pool")
                if unbound is None:
                    return  # the checkin event's listener
                if previous is not None:
                    previous(record)
                else:
                    unbound(pool_ref(), record)

            return checked_in

        listener_checked_in = make_checked_in(None, None, lambda: None)

        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            listener_checked_in(record)

        if _RETURN_CONN_HOOK:
            # Check-ins are seen by wrapping the pool instance's ``_return_conn``, which
            # ``_ConnectionRecord.checkin`` calls right after the ``checkin`` event: the
            # same moment, without the event's dispatch (about 1 µs per checkout).
            def checkin_hook(pool: Pool) -> Callable[[Any], None]:
                return make_checked_in(
                    vars(pool).get("_return_conn"), type(pool)._return_conn, weakref.ref(pool)
                )

            self._checkin_hook = checkin_hook

        def on_detach(dbapi_connection: Any, record: Any) -> None:
            try:
                hold = record.__dict__.pop(out_key, None)
                if hold is not None:
                    held.pop(id(hold), None)
                with lock:
                    emptied[record] = time.time()
            except Exception:
                contain("pool")

        def on_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            try:
                self._count_invalidation(record)
                hold = record.__dict__.get(out_key)
                if hold is not None:
                    hold[BEGUN] = None  # the database rolled it back
                begun = record.__dict__.pop(txn_key, None)
                if begun is not None:
                    sink.transaction("rollback", perf_counter() - begun)
            except Exception:
                contain("pool")

        def on_soft_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            try:
                self._count_invalidation(record)
            except Exception:
                contain("pool")

        def on_close(dbapi_connection: Any, record: Any) -> None:
            # A connection older than its pool's last pool-wide invalidation was made
            # stale by it; SQLAlchemy closes it without an invalidate event.
            try:
                started = record.last_connect_time
                with lock:
                    if self._counted.get(record) == started:
                        return
                pool = getattr(record, "_ConnectionRecord__pool", None)
                if pool is not None and getattr(pool, "_invalidate_time", 0) > started:
                    self._count_invalidation(record)
            except Exception:
                contain("pool")

        # No checkout listener on a QueuePool: any checkout listener moves every checkout
        # onto SQLAlchemy's slower path (the checkout wrapper times the use instead).
        return [
            (engine, "connect", on_connect),
            *([(engine, "checkout", on_checkout)] if track else []),
            *([] if _RETURN_CONN_HOOK else [(engine, "checkin", on_checkin)]),
            (engine, "detach", on_detach),
            (engine, "invalidate", on_invalidate),
            (engine, "soft_invalidate", on_soft_invalidate),
            (engine, "close", on_close),
        ]

    def _open_unit(self, scope: Scope) -> UnitTotals | None:
        """The totals of ``scope`` for this engine, made at its first checkout here."""
        sink = self._hold_sink
        if sink is None:
            return None
        unit = scope.state[self] = UnitTotals()
        scope.label()  # a request's route template is readable now (inside the endpoint)
        contain = self._contain
        limit = self._max_routes
        hooks_ref = weakref.ref(self)

        def close(scope: Scope) -> None:
            hooks = hooks_ref()
            if hooks is None or not hooks._active:
                return
            try:
                # Checkouts of this unit still out: added as they stand now.
                for hold in hooks.holders():
                    if hold[UNIT] is unit:
                        unit.statements += hold[STATEMENTS]
                        unit.seconds += hold[SECONDS]
                        unit.wait += hold[WAIT]
                        hold[UNIT] = None
                sink.unit(scope.label(), unit.statements, unit.seconds, unit.wait, limit)
            except Exception:
                contain("pool")

        scope.on_exit(close)
        return unit

    def _wire_pool(self, pool: Pool) -> None:
        """Wrap ``pool.connect`` (checkout wait, timeouts) and ``pool.recreate`` (dispose).

        The wrappers hold the pool weakly: a pool that ``dispose()`` replaced must be
        free to go (with the connections returned to it later) as it would without us.
        """
        hooks = self
        sink = self._sink
        contain = self._contain
        out_key = self._out
        pool_ref = weakref.ref(pool)
        cls = type(pool)
        # Another wrapper already on the instance is called; else the class's method,
        # with the pool from the weak reference (a bound method would hold the pool).
        previous_connect = vars(pool).get("connect")
        previous_recreate = vars(pool).get("recreate")
        unbound_connect = cls.connect
        unbound_recreate = cls.recreate

        def original_connect() -> Any:
            if previous_connect is not None:
                return previous_connect()
            return unbound_connect(pool_ref())  # type: ignore[arg-type]

        def original_recreate() -> Any:
            if previous_recreate is not None:
                return previous_recreate()
            return unbound_recreate(pool_ref())  # type: ignore[arg-type]

        dbapi_error = self._dbapi_error
        error_name = self._error_name

        checkout = sink.checkout
        pending = self._pending
        waits = pending[0] if pending is not None else []
        wait_append = waits.append
        settle = self._settle
        buffered = pending is not None
        held = self._holds
        peak = self._peak
        locate = self._finder.locate
        locate_caller = self._finder.locate_caller
        by_module = FRAMES_BY_MODULE_NAME
        get_scope = current_scope_getter()
        getframe = sys._getframe
        open_unit = self._open_unit
        monitor = self._monitor
        exhausted = monitor.exhausted if monitor is not None else None
        wait_threshold = monitor.wait_threshold if monitor is not None else float("inf")

        def connect() -> Any:
            if not hooks._active:
                return original_connect()
            start = perf_counter()
            try:
                if previous_connect is not None:
                    connection = previous_connect()
                else:
                    connection = unbound_connect(pool_ref())  # type: ignore[arg-type]
            except sa_exc.TimeoutError:
                try:
                    sink.timeout()
                    if exhausted is not None:
                        exhausted(perf_counter() - start, True)
                except Exception:
                    contain("pool")
                raise
            except Exception as exc:
                if isinstance(dbapi_error, type) and isinstance(exc, dbapi_error):
                    try:
                        sink.connect_failed(error_name(exc))
                    except Exception:
                        contain("pool")
                raise
            now = perf_counter()
            try:
                # The use time runs from here to the check-in. A re-entrant checkout of
                # the same connection (SingletonThreadPool) keeps the first hold.
                state = connection._connection_record.__dict__
                wait = now - start
                if out_key not in state:
                    if wait >= wait_threshold and exhausted is not None:
                        exhausted(wait, False)
                    if by_module:  # Python 3.12+: see SourceFinder.locate_caller
                        code, lasti = locate_caller(1)  # the caller of pool.connect
                    else:
                        code, lasti = locate(getframe(1))
                    scope = get_scope()
                    unit = None
                    if scope is not None:
                        unit = scope.state.get(hooks)
                        if unit is None:
                            unit = open_unit(scope)
                    # A hold: see _core._hold.new_hold for the fields.
                    hold = state[out_key] = [
                        now, wait, code, lasti, scope, unit, 0.0, 0, 0.0, None, None, 0.0,
                        0.0, False,
                    ]  # fmt: skip
                    if len(held) < MAX_HOLDS:
                        held[id(hold)] = hold
                        n = len(held)
                        if n > peak[0]:
                            peak[0] = n
                if buffered:
                    wait_append(wait)
                    if len(waits) >= SETTLE_AT:
                        settle()
                else:
                    checkout(wait)
            except Exception:
                contain("pool")
            return connection

        def recreate() -> Pool:
            new: Pool = original_recreate()
            if hooks._active:
                try:
                    hooks._wire_pool(new)
                except Exception:
                    contain("pool")
            return new

        self._undo.append(shadow(pool, "connect", connect))
        self._undo.append(shadow(pool, "recreate", recreate))
        if self._checkin_hook is not None:
            self._undo.append(shadow(pool, "_return_conn", self._checkin_hook(pool)))

    def _wire_dialect(self, dialect: Any) -> None:
        """Wrap the dialect instance's do_begin/do_commit/do_rollback (transactions).

        Each wrapper calls the original first or last and keeps the begin time on the
        pool's connection record (on the connection itself once it is detached from the
        pool); a dialect's ad-hoc connection without either is not timed.
        """
        original_begin = dialect.do_begin
        original_commit = dialect.do_commit
        original_rollback = dialect.do_rollback
        key = self._txn
        hooks = self
        transaction = self._sink.transaction
        contain = self._contain
        sink = self._sink
        dbapi_error = self._dbapi_error
        error_name = self._error_name

        def failed(operation: str, exc: BaseException) -> None:
            # A COMMIT or ROLLBACK the driver could not run: a failed statement too.
            if isinstance(dbapi_error, type) and isinstance(exc, dbapi_error):
                try:
                    sink.statement_failed(operation, error_name(exc))
                except Exception:
                    contain("pool")

        out_key = self._out
        pending = self._pending
        buffered = pending is not None
        commits, rollbacks = (pending[3], pending[4]) if pending is not None else ([], [])
        commit_append, rollback_append = commits.append, rollbacks.append
        settle = self._settle

        def ended(state: dict[str, Any], start: float, end: float) -> None:
            # The COMMIT/ROLLBACK is statement time of the checkout; the transaction's
            # time without a statement running is its idle-in-transaction time. (The
            # successful paths below write the same inline: they run per transaction.)
            hold = state.get(out_key)
            if hold is None:
                return
            hold[SECONDS] += end - start
            hold[LAST] = end
            begun = hold[BEGUN]
            if begun is not None:
                hold[BEGUN] = None
                idle = (end - begun) - (hold[SECONDS] - hold[BEGUN_SECONDS])
                if idle > hold[TXN_IDLE]:
                    hold[TXN_IDLE] = idle

        def do_begin(connection: Any) -> None:
            start = perf_counter()
            original_begin(connection)
            if hooks._active:
                try:
                    # On the pool's record; a detached connection has none: on itself.
                    record = connection._connection_record
                    state = (connection if record is None else record).__dict__
                    state[key] = start
                    hold = state.get(out_key)
                    if hold is not None:
                        hold[10] = start  # BEGUN
                        hold[11] = hold[6]  # BEGUN_SECONDS = SECONDS
                except Exception:  # a dialect's ad-hoc connection: no timing
                    pass

        def do_commit(connection: Any) -> None:
            try:
                record = connection._connection_record
                state = (connection if record is None else record).__dict__
                begun = state.pop(key, None)
            except Exception:
                state = None
                begun = None
            if begun is None:
                # No transaction of the application's is open: the pool's
                # reset-on-return COMMIT (``pool_reset_on_return="commit"``), or a
                # dialect's own. As for such a ROLLBACK, only a failure counts.
                try:
                    original_commit(connection)
                except BaseException as exc:
                    failed("COMMIT", exc)
                    raise
                return
            start = perf_counter()
            try:
                original_commit(connection)
            except BaseException as exc:
                end = perf_counter()
                failed("COMMIT", exc)
                try:
                    ended(state, start, end)
                    transaction("rollback", end - begun)
                except Exception:
                    contain("pool")
                raise
            end = perf_counter()
            try:
                hold = state.get(out_key)
                if hold is not None:  # ended(), inline
                    seconds = hold[6] = hold[6] + (end - start)  # SECONDS
                    hold[8] = end  # LAST
                    txn_begun = hold[10]  # BEGUN
                    if txn_begun is not None:
                        hold[10] = None
                        idle = (end - txn_begun) - (seconds - hold[11])  # BEGUN_SECONDS
                        if idle > hold[12]:  # TXN_IDLE
                            hold[12] = idle
                if buffered:
                    commit_append(end - begun)
                    if len(commits) >= SETTLE_AT:
                        settle()
                else:
                    transaction("commit", end - begun)
            except Exception:
                contain("pool")

        def do_rollback(connection: Any) -> None:
            try:
                record = connection._connection_record
                state = (connection if record is None else record).__dict__
                begun = state.pop(key, None)
            except Exception:
                state = None
                begun = None
            if begun is None:
                # No transaction of the application's is open: the pool's
                # reset-on-return rollback after a COMMIT, or a dialect's own. Not a
                # transaction, nor the checkout's statement time; only a failure counts.
                try:
                    original_rollback(connection)
                except BaseException as exc:
                    failed("ROLLBACK", exc)
                    raise
                return
            start = perf_counter()
            try:
                original_rollback(connection)
            except BaseException as exc:
                failed("ROLLBACK", exc)
                raise
            finally:
                end = perf_counter()
                try:
                    ended(state, start, end)
                    if buffered:
                        rollback_append(end - begun)
                        if len(rollbacks) >= SETTLE_AT:
                            settle()
                    else:
                        transaction("rollback", end - begun)
                except Exception:
                    contain("pool")

        for name, fn in (
            ("do_begin", do_begin),
            ("do_commit", do_commit),
            ("do_rollback", do_rollback),
        ):
            self._undo.append(shadow(dialect, name, fn))


def _remover(target: Any, name: str, fn: Callable[..., Any]) -> Callable[[], None]:
    ref: Any
    try:
        ref = weakref.ref(target)
    except TypeError:
        ref = lambda: target  # noqa: E731

    def remove() -> None:
        obj = ref()
        if obj is not None and event.contains(obj, name, fn):
            event.remove(obj, name, fn)

    return remove
