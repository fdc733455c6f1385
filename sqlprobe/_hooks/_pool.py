"""Connection-pool and transaction metrics.

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
  through, calls ``self.pool.connect()``). The wait is the whole call: queueing, opening
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
  in the pooled connection's ``info`` dictionary under a private key (as is the checkout
  time), so the pool's reset-on-return rollback of a connection with no begun
  transaction finds nothing and is ignored. A transaction ends as ``commit`` when
  the commit succeeded and as ``rollback`` otherwise: a rollback, a failed commit, or a
  connection invalidated while the transaction was open. In ``AUTOCOMMIT`` isolation
  SQLAlchemy still brackets work in begin/commit, and so is counted.

Buckets: the probe's ``buckets`` when given; otherwise the default duration buckets
extended to 30, 60 and 300 s, because pool waits reach ``pool_timeout`` (30 s by
default) and connections are held for as long as a request or a job runs.

Several probes whose engines share an ``engine`` name on one registry share one set of
these series: counters and histograms add up, and so do the gauges (the maximum is
absent if any of the pools is unbounded).
"""

from __future__ import annotations

import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import AssertionPool, Pool, QueuePool, StaticPool

from .._config import DEFAULT_BUCKETS
from .._sinks._prometheus import EngineSeries, Families, Histogram

if TYPE_CHECKING:
    from .._core._collector import Collector
    from .._hooks._statement import Listener
    from .._probe import Probe

__all__ = ["POOL_BUCKETS", "PoolMetrics", "PoolObserver", "install"]

#: Buckets of the pool and transaction histograms unless the probe was given ``buckets``.
POOL_BUCKETS: tuple[float, ...] = (*DEFAULT_BUCKETS, 30.0, 60.0, 300.0)

OUTCOMES = ("commit", "rollback")


class PoolObserver(Protocol):
    """Receives each pool measurement of one probe, e.g. to emit OpenTelemetry metrics.

    Methods are called on the application's thread (or event loop), outside sqlprobe's
    locks; an exception is contained and counted as an internal error of stage ``pool``.
    """

    def wait(self, seconds: float) -> None:
        """A checkout obtained a connection after ``seconds``."""

    def use(self, seconds: float) -> None:
        """A connection went back to the pool after ``seconds`` checked out."""

    def create(self, seconds: float) -> None:
        """A new DBAPI connection took ``seconds`` to open."""

    def timeout(self) -> None:
        """A checkout gave up with SQLAlchemy's ``TimeoutError``."""

    # Optional (called when the observer has them): ``invalidate()`` for each counted
    # invalidation, ``transaction(outcome, seconds)`` for each finished transaction.


class _Shared:
    """The pool and transaction series of one ``EngineSeries`` (one engine label)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.lock = threading.Lock()
        self.bounds = bounds
        size = len(bounds) + 1
        self.wait = Histogram(size)
        self.use = Histogram(size)
        self.connect = Histogram(size)
        self.txn = {outcome: Histogram(size) for outcome in OUTCOMES}
        self.timeouts = 0
        self.connects = 0
        self.invalidations = 0
        self.members: list[PoolMetrics] = []

    def observe(self, hist: Histogram, seconds: float) -> None:
        i = bisect_left(self.bounds, seconds)
        with self.lock:
            hist.counts[i] += 1
            hist.total += seconds

    def collect(self, fams: Families, engine: str) -> None:
        bounds = self.bounds
        with self.lock:
            hists = [
                (name, hist.samples(bounds))
                for name, hist in (
                    ("sqlprobe_pool_checkout_wait_seconds", self.wait),
                    ("sqlprobe_pool_connection_use_seconds", self.use),
                    ("sqlprobe_pool_connect_seconds", self.connect),
                )
            ]
            txn = [(outcome, hist.samples(bounds)) for outcome, hist in self.txn.items()]
            counters = (self.timeouts, self.connects, self.invalidations)
            members = list(self.members)

        docs = {
            "sqlprobe_pool_checkout_wait_seconds": "Time spent waiting for a connection "
            "from the pool (successful checkouts).",
            "sqlprobe_pool_connection_use_seconds": "Time a connection stayed checked out.",
            "sqlprobe_pool_connect_seconds": "Time to open a new DBAPI connection.",
        }
        for name, (buckets, _count, total) in hists:
            fams.histogram(name, docs[name], ["engine"]).add_metric([engine], buckets, total)
        duration = fams.histogram(
            "sqlprobe_transaction_duration_seconds",
            "Begin to end of a transaction, by outcome.",
            ["engine", "outcome"],
        )
        for outcome, (buckets, _count, total) in txn:
            duration.add_metric([engine, outcome], buckets, total)
        for name, doc, value in zip(
            (
                "sqlprobe_pool_checkout_timeouts",
                "sqlprobe_pool_connects",
                "sqlprobe_pool_invalidations",
            ),
            (
                "Checkouts that gave up with the pool's TimeoutError.",
                "DBAPI connections opened.",
                "Connections invalidated (errors, failed pre-ping, soft invalidation).",
            ),
            counters,
            strict=True,
        ):
            fams.counter(name, doc, ["engine"]).add_metric([engine], value)

        idle = used = live = 0
        limit: int | None = 0
        for member in members:
            snap = member.snapshot_or_none()
            if snap is None:
                if member.engine_gone():
                    # An engine collected without detach(): its counts stay, it goes.
                    with self.lock:
                        if member in self.members:
                            self.members.remove(member)
                continue
            live += 1
            idle += snap[0]
            used += snap[1]
            limit = None if limit is None or snap[2] is None else limit + snap[2]
        gauge = fams.gauge(
            "sqlprobe_pool_connections", "Connections now in the pool.", ["engine", "state"]
        )
        gauge.add_metric([engine, "idle"], idle)
        gauge.add_metric([engine, "used"], used)
        if limit is not None and live:
            fams.gauge(
                "sqlprobe_pool_max_connections",
                "Most connections the pool opens at once (pool_size + max_overflow).",
                ["engine"],
            ).add_metric([engine], limit)


#: One ``_Shared`` per EngineSeries; guarded by ``_shared_lock``.
_shared: weakref.WeakKeyDictionary[EngineSeries, _Shared] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def _join(series: EngineSeries, bounds: tuple[float, ...], member: PoolMetrics) -> _Shared:
    with _shared_lock:
        shared = _shared.get(series)
        if shared is None:
            shared = _shared[series] = _Shared(bounds)
            with series.lock:
                series.parts.append(shared.collect)
        with shared.lock:
            shared.members.append(member)
        return shared


def _leave(series: EngineSeries, shared: _Shared, member: PoolMetrics) -> None:
    # The series (and its counters) stays while other probes use it; the gauges of this
    # member stop counting at once. When the last member leaves, the part goes too.
    with _shared_lock:
        with shared.lock:
            if member in shared.members:
                shared.members.remove(member)
            empty = not shared.members
        if empty and _shared.get(series) is shared:
            del _shared[series]
            with series.lock:
                if shared.collect in series.parts:
                    series.parts.remove(shared.collect)


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


class PoolMetrics:
    """Pool and transaction measurements of one attached engine; ``probe.pool``.

    :meth:`add_observer` registers a :class:`PoolObserver` that receives every
    measurement; :meth:`snapshot` reads the idle, used and maximum connections now.
    """

    def __init__(self, engine: Any, collector: Collector) -> None:
        self._engine_ref = weakref.ref(engine)
        self._collector = collector
        self._observers: tuple[PoolObserver, ...] = ()
        self._lock = threading.Lock()
        #: key of the checkout time in a pooled connection's ``info`` (unique per probe)
        self._out_key = object()
        #: connection records seen (gauges of pools that keep no count of their own)
        self._records: weakref.WeakSet[Any] = weakref.WeakSet()
        #: record -> time.time() when it went back to its pool without a connection
        self._emptied: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        #: record -> its ``last_connect_time`` when its invalidation was counted
        self._counted: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        #: key of the begin time in a pooled connection's ``info`` (unique per probe)
        self._txn_key = object()
        self._active = True
        self._shared: _Shared | None = None
        #: (target held weakly, restore) of every attribute sqlprobe shadowed
        self._restores: list[tuple[weakref.ref[Any], Callable[[], None]]] = []

    # -- public ---------------------------------------------------------------------

    def add_observer(self, observer: PoolObserver) -> None:
        """Send every later measurement to ``observer`` too."""
        with self._lock:
            self._observers = (*self._observers, observer)

    def remove_observer(self, observer: PoolObserver) -> None:
        """Stop sending measurements to ``observer`` (no error if it is not there)."""
        with self._lock:
            self._observers = tuple(o for o in self._observers if o is not observer)

    def snapshot(self) -> tuple[int, int, int | None]:
        """``(idle, used, max)`` connections of the engine's pool now; max None if unbounded."""
        snap = self.snapshot_or_none()
        return snap if snap is not None else (0, 0, None)

    # -- internals ------------------------------------------------------------------

    def engine_gone(self) -> bool:
        return self._engine_ref() is None

    def snapshot_or_none(self) -> tuple[int, int, int | None] | None:
        engine = self._engine_ref()
        if engine is None:
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
            self._collector.internal_error("pool")
            return None

    def _notify(self, name: str, *args: Any) -> None:
        for observer in self._observers:
            try:
                method = getattr(observer, name, None)
                if method is not None:  # ``invalidate``/``transaction`` are optional
                    method(*args)
            except Exception:
                self._collector.internal_error("pool")

    def _checked_out(self, connection: Any, start: float, now: float) -> None:
        seconds = now - start
        try:
            shared = self._shared
            assert shared is not None
            shared.observe(shared.wait, seconds)
            # The use time runs from here to the ``checkin`` event. A re-entrant checkout
            # of the same connection (SingletonThreadPool) keeps the first start.
            connection.info.setdefault(self._out_key, now)
        except Exception:
            self._collector.internal_error("pool")
        if self._observers:
            self._notify("wait", seconds)

    def _timed_out(self) -> None:
        try:
            shared = self._shared
            assert shared is not None
            with shared.lock:
                shared.timeouts += 1
        except Exception:
            self._collector.internal_error("pool")
        if self._observers:
            self._notify("timeout")

    def _count_invalidation(self, record: Any) -> None:
        shared = self._shared
        assert shared is not None
        with self._lock:
            self._counted[record] = record.last_connect_time
        with shared.lock:
            shared.invalidations += 1
        if self._observers:
            self._notify("invalidate")

    def _end_transaction(self, outcome: str, start: float) -> None:
        try:
            shared = self._shared
            assert shared is not None
            seconds = perf_counter() - start
            shared.observe(shared.txn[outcome], seconds)
        except Exception:
            self._collector.internal_error("pool")
            return
        if self._observers:
            self._notify("transaction", outcome, seconds)

    # -- PoolEvents listeners ---------------------------------------------------------

    def listeners(self, engine: Any) -> list[Listener]:
        """The PoolEvents listeners to register on ``engine`` (carried over by dispose)."""

        def on_connect(dbapi_connection: Any, record: Any) -> None:
            try:
                elapsed = max(time.time() - record.last_connect_time, 0.0)
                shared = self._shared
                assert shared is not None
                with self._lock:
                    self._records.add(record)
                    self._emptied.pop(record, None)
                i = bisect_left(shared.bounds, elapsed)
                with shared.lock:
                    shared.connects += 1
                    shared.connect.counts[i] += 1
                    shared.connect.total += elapsed
            except Exception:
                self._collector.internal_error("pool")
                return
            if self._observers:
                self._notify("create", elapsed)

        # The checkout time lives in the record's own ``info`` (a plain dict SQLAlchemy
        # keeps per pooled connection; the fairy's ``info`` is the same dict): cheaper
        # than a weak mapping, and gone with the connection.
        out_key = self._out_key
        txn_key = self._txn_key
        lock = self._lock
        records = self._records
        emptied = self._emptied
        # A QueuePool counts its connections itself; other pools need the records seen.
        track = not isinstance(engine.pool, QueuePool)

        def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            try:
                with lock:
                    records.add(record)
            except Exception:
                self._collector.internal_error("pool")

        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            try:
                info = record.info
                start = info.pop(out_key, None)
                # A transaction still open here ended without SQLAlchemy rolling it
                # back through the dialect (e.g. an asyncio connection collected by
                # the garbage collector): the database rolls it back.
                begun = info.pop(txn_key, None)
                if record.dbapi_connection is None:
                    with lock:
                        emptied[record] = time.time()
                if begun is not None:
                    self._end_transaction("rollback", begun)
                if start is None:
                    return
                elapsed = perf_counter() - start
                shared = self._shared
                assert shared is not None
                shared.observe(shared.use, elapsed)
            except Exception:
                self._collector.internal_error("pool")
                return
            if self._observers:
                self._notify("use", elapsed)

        def on_detach(dbapi_connection: Any, record: Any) -> None:
            try:
                record.info.pop(out_key, None)
                with lock:
                    emptied[record] = time.time()
            except Exception:
                self._collector.internal_error("pool")

        def on_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            try:
                self._count_invalidation(record)
                begun = record.info.pop(self._txn_key, None)
                if begun is not None:
                    self._end_transaction("rollback", begun)
            except Exception:
                self._collector.internal_error("pool")

        def on_soft_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            try:
                self._count_invalidation(record)
            except Exception:
                self._collector.internal_error("pool")

        def on_close(dbapi_connection: Any, record: Any) -> None:
            # A connection older than its pool's last pool-wide invalidation was made
            # stale by it; SQLAlchemy closes it without an invalidate event.
            try:
                started = record.last_connect_time
                with self._lock:
                    if self._counted.get(record) == started:
                        return
                pool = getattr(record, "_ConnectionRecord__pool", None)
                if pool is not None and getattr(pool, "_invalidate_time", 0) > started:
                    self._count_invalidation(record)
            except Exception:
                self._collector.internal_error("pool")

        # No checkout listener on a QueuePool: any checkout listener moves every checkout
        # onto SQLAlchemy's slower path (the checkout wrapper times the use instead).
        return [
            (engine, "connect", on_connect),
            *([(engine, "checkout", on_checkout)] if track else []),
            (engine, "checkin", on_checkin),
            (engine, "detach", on_detach),
            (engine, "invalidate", on_invalidate),
            (engine, "soft_invalidate", on_soft_invalidate),
            (engine, "close", on_close),
        ]

    # -- wrappers ---------------------------------------------------------------------

    def wire_pool(self, pool: Pool) -> None:
        """Wrap ``pool.connect`` (checkout wait, timeouts) and ``pool.recreate`` (dispose).

        The wrappers hold the pool weakly: a pool that ``dispose()`` replaced must be
        free to go (with the connections returned to it later) as it would without us.
        """
        metrics = self
        pool_ref = weakref.ref(pool)
        cls = type(pool)
        previous_connect = vars(pool).get("connect")
        previous_recreate = vars(pool).get("recreate")

        unbound_connect = cls.connect

        def connect() -> Any:
            if not metrics._active:
                if previous_connect is not None:
                    return previous_connect()
                return unbound_connect(pool_ref())  # type: ignore[arg-type]
            start = perf_counter()
            try:
                if previous_connect is not None:
                    connection = previous_connect()
                else:
                    connection = unbound_connect(pool_ref())  # type: ignore[arg-type]
            except sa_exc.TimeoutError:
                metrics._timed_out()
                raise
            metrics._checked_out(connection, start, perf_counter())
            return connection

        def recreate() -> Pool:
            if previous_recreate is not None:
                new: Pool = previous_recreate()
            else:
                new = cls.recreate(pool_ref())  # type: ignore[arg-type]
            if metrics._active:
                try:
                    metrics.wire_pool(new)
                except Exception:
                    metrics._collector.internal_error("pool")
            return new

        with self._lock:
            self._restores = [(r, fn) for r, fn in self._restores if r() is not None]
            self._restores.append((pool_ref, _shadow(pool, "connect", connect)))
            self._restores.append((pool_ref, _shadow(pool, "recreate", recreate)))

    def wire_dialect(self, dialect: Any) -> None:
        """Wrap the dialect instance's do_begin/do_commit/do_rollback (transactions)."""
        original_begin = dialect.do_begin
        original_commit = dialect.do_commit
        original_rollback = dialect.do_rollback
        key = self._txn_key
        metrics = self

        def pop_begun(dbapi_connection: Any) -> float | None:
            try:
                begun: float | None = dbapi_connection.info.pop(key, None)
                return begun
            except Exception:  # e.g. a dialect's ad-hoc connection without ``info``
                return None

        def do_begin(dbapi_connection: Any) -> None:
            start = perf_counter()
            original_begin(dbapi_connection)
            if metrics._active:
                try:  # noqa: SIM105 - contextlib.suppress costs ~0.5 µs per transaction
                    dbapi_connection.info[key] = start
                except Exception:  # a dialect's ad-hoc connection: no ``info``, no timing
                    pass

        def do_commit(dbapi_connection: Any) -> None:
            begun = pop_begun(dbapi_connection)
            try:
                original_commit(dbapi_connection)
            except BaseException:
                if begun is not None and metrics._active:
                    metrics._end_transaction("rollback", begun)
                raise
            if begun is not None and metrics._active:
                metrics._end_transaction("commit", begun)

        def do_rollback(dbapi_connection: Any) -> None:
            begun = pop_begun(dbapi_connection)
            try:
                original_rollback(dbapi_connection)
            finally:
                if begun is not None and metrics._active:
                    metrics._end_transaction("rollback", begun)

        ref = weakref.ref(dialect)
        with self._lock:
            for name, fn in (
                ("do_begin", do_begin),
                ("do_commit", do_commit),
                ("do_rollback", do_rollback),
            ):
                self._restores.append((ref, _shadow(dialect, name, fn)))

    def unwire(self) -> None:
        """Make every wrapper inert and restore the attributes they shadowed."""
        self._active = False
        self._observers = ()
        with self._lock:
            restores, self._restores = self._restores, []
        for _ref, restore in reversed(restores):
            try:
                restore()
            except Exception:  # undo all it can
                continue


def _shadow(target: Any, name: str, wrapper: Callable[..., Any]) -> Callable[[], None]:
    """Shadow ``target.name`` with ``wrapper``; return the function that restores it.

    If something else has replaced the attribute since, it may call our wrapper: the
    wrapper is then left in place (inert once the probe is inactive) rather than
    breaking that chain.
    """
    had = name in vars(target)
    previous = vars(target).get(name)
    setattr(target, name, wrapper)
    ref = weakref.ref(target)

    def restore() -> None:
        obj = ref()
        if obj is None or vars(obj).get(name) is not wrapper:
            return
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    return restore


def install(probe: Probe) -> Callable[[], None] | None:
    """Wire pool and transaction metrics into a newly attached probe; return its undo."""
    engine = probe.engine
    collector = probe.collector
    options = probe.options
    if engine is None or collector is None or options is None:
        return None
    sync = getattr(engine, "sync_engine", engine)
    bounds = POOL_BUCKETS if options.buckets == DEFAULT_BUCKETS else options.buckets
    metrics = PoolMetrics(sync, collector)
    series = collector.series
    metrics._shared = shared = _join(series, bounds, metrics)

    def uninstall() -> None:
        metrics.unwire()
        _leave(series, shared, metrics)

    try:
        for target, name, fn in metrics.listeners(sync):
            event.listen(target, name, fn)
            probe.add_listeners([(target, name, fn)])
        metrics.wire_pool(sync.pool)
        metrics.wire_dialect(sync.dialect)
    except BaseException:
        uninstall()
        raise
    probe.pool = metrics
    return uninstall
