"""Who holds the pool's connections: ``pool_hold`` and ``pool_exhausted`` events.

The pool hooks (``_hooks._pool``) keep a :class:`~.._core._hold.Hold` per checkout;
this module turns the ones that matter into events, through the probe's logger:

``pool_hold`` (warning)
    A connection held longer than ``pool_hold_threshold`` (default 1 s), or whose
    transaction went longer than ``idle_in_transaction_threshold`` (default 0.5 s)
    without a statement running. Fields: ``engine``, ``source`` (the application line
    that checked the connection out, ``path.py:LINE in function``), ``route`` (the
    unit of work, :func:`sqlprobe.scope` or the request), ``held_ms``, ``idle_ms``,
    ``in_transaction``, ``statement`` (the last statement's normalized text, never its
    values), ``statements`` (how many ran), ``reason`` (``held`` or
    ``idle_in_transaction``), ``threshold_ms``, ``ongoing`` and ``suppressed``.

    Found two ways, with no thread per connection: at check-in (``ongoing`` false;
    ``idle_ms`` is the checkout's time without a statement, or for
    ``idle_in_transaction`` the most one transaction spent without one), and by the
    process's one watchdog thread (``_state``), which looks at the checkouts still out
    every :attr:`HoldMonitor.interval` seconds (``ongoing`` true; ``idle_ms`` is the
    time since the last statement ended; ``in_transaction`` whether one is open now).
    A checkout is reported once, by whichever sees it first.

``pool_exhausted`` (error)
    A checkout that gave up with the pool's ``TimeoutError`` (``timeout`` true) or got
    its connection after waiting ``pool_wait_threshold`` (default 1 s) or more. Fields:
    ``engine``, ``waited_ms``, ``timeout``, ``in_use`` and ``holders``: the checkouts
    out at that moment, most idle first, at most :data:`MAX_HOLDERS`, each with
    ``source``, ``route``, ``held_ms``, ``idle_ms``, ``in_transaction``, ``statement``.

Both are rate-limited like slow queries (:class:`~.._core._ratelimit.RateLimiter`):
``pool_hold`` per source line and route, ``pool_exhausted`` per engine; ``suppressed``
says how many were dropped since the last one of the key.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from .._core._fingerprint import analyze
from .._core._hold import (
    BEGUN,
    LAST,
    REPORTED,
    START,
    STATEMENT,
    STATEMENTS,
    TXN_IDLE,
    Hold,
    in_transaction,
    route,
    source,
)
from .._core._hold import idle as idle_of
from .._core._ratelimit import RateLimiter
from .._core._records import AttachContext

__all__ = ["MAX_HOLDERS", "STATEMENT_MAX_CHARS", "HoldMonitor", "pool_advice", "suggested_pool"]

#: Holders listed in one ``pool_exhausted`` event.
MAX_HOLDERS = 20
#: Characters of normalized statement text per hold in an event.
STATEMENT_MAX_CHARS = 500
#: ``pool_hold`` events per source and route, and per engine, per minute.
EVENTS_PER_SOURCE = 5
EVENTS_PER_ENGINE = 100
#: ``pool_exhausted`` events per engine per minute.
EXHAUSTED_PER_MINUTE = 5


def _shape(statement: str | None) -> str:
    if not statement:
        return ""
    text = analyze(statement).normalized
    if len(text) > STATEMENT_MAX_CHARS:
        text = text[: STATEMENT_MAX_CHARS - 3] + "..."
    return text


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class HoldMonitor:
    """The ``pool_hold`` / ``pool_exhausted`` events of one engine.

    ``holders()`` returns the holds out now (the pool hooks'); ``tick()`` is the
    watchdog's call. Thresholds are in seconds.
    """

    stage = "poolhold"

    def __init__(
        self,
        ctx: AttachContext,
        *,
        hold_threshold: float,
        idle_in_transaction_threshold: float,
        wait_threshold: float,
        holders: Callable[[], list[Hold]],
        clock: Callable[[], float] = perf_counter,
    ) -> None:
        self.engine = ctx.info.name
        self.logger = ctx.logger
        self.contain = ctx.contain
        self.hold_threshold = hold_threshold
        self.idle_in_transaction_threshold = idle_in_transaction_threshold
        self.wait_threshold = wait_threshold
        self.holders = holders
        self.clock = clock
        self.limiter = RateLimiter(EVENTS_PER_SOURCE, EVENTS_PER_ENGINE, 60.0, 1000)
        self.exhausted_limiter = RateLimiter(EXHAUSTED_PER_MINUTE, EXHAUSTED_PER_MINUTE, 60.0, 1)
        #: how often the watchdog should look: half the smaller threshold, 0.25-5 s
        self.interval = min(max(min(hold_threshold, idle_in_transaction_threshold) / 2, 0.25), 5.0)

    # -- pool_hold ------------------------------------------------------------------

    def checked_in(self, hold: Hold, now: float, held: float, idle: float) -> None:
        """A checkout that crossed a threshold was checked in (from the pool hooks)."""
        if hold[REPORTED]:
            return
        if hold[TXN_IDLE] >= self.idle_in_transaction_threshold:
            self._hold_event(hold, held, hold[TXN_IDLE], True, "idle_in_transaction", False)
        elif held >= self.hold_threshold:
            self._hold_event(hold, held, idle, False, "held", False)

    def tick(self) -> None:
        """The watchdog's look at the checkouts still out (on its thread)."""
        try:
            now = self.clock()
            for hold in self.holders():
                if hold[REPORTED]:
                    continue
                begun = hold[BEGUN]
                held = now - hold[START]
                if begun is not None:
                    idle = now - max(hold[LAST], begun)
                    if idle >= self.idle_in_transaction_threshold:
                        self._hold_event(hold, held, idle, True, "idle_in_transaction", True)
                        continue
                if held >= self.hold_threshold:
                    idle = idle_of(hold, now)
                    self._hold_event(hold, held, idle, begun is not None, "held", True)
        except Exception:
            self.contain(self.stage)

    def _hold_event(
        self, hold: Hold, held: float, idle: float, in_transaction: bool, reason: str, ongoing: bool
    ) -> None:
        hold[REPORTED] = True
        where = source(hold)
        unit = route(hold)
        suppressed = self.limiter.admit(f"{where}\x00{unit}")
        if suppressed is None:
            return
        threshold = (
            self.idle_in_transaction_threshold
            if reason == "idle_in_transaction"
            else self.hold_threshold
        )
        self.logger.warning(
            "pool_hold",
            engine=self.engine,
            source=where,
            route=unit,
            held_ms=_ms(held),
            idle_ms=_ms(max(idle, 0.0)),
            in_transaction=in_transaction,
            statement=_shape(hold[STATEMENT]),
            statements=hold[STATEMENTS],
            reason=reason,
            threshold_ms=_ms(threshold),
            ongoing=ongoing,
            suppressed=suppressed,
        )

    # -- pool_exhausted -------------------------------------------------------------

    def exhausted(self, waited: float, timed_out: bool) -> None:
        """A checkout waited ``waited`` seconds, or gave up (from the pool hooks)."""
        suppressed = self.exhausted_limiter.admit(self.engine)
        if suppressed is None:
            return
        now = self.clock()
        holds = self.holders()
        holds.sort(key=lambda h: idle_of(h, now), reverse=True)
        self.logger.error(
            "pool_exhausted",
            engine=self.engine,
            waited_ms=_ms(waited),
            timeout=timed_out,
            in_use=len(holds),
            holders=[self.describe(h, now) for h in holds[:MAX_HOLDERS]],
            suppressed=suppressed,
        )

    def describe(self, hold: Hold, now: float) -> dict[str, Any]:
        """One holder as listed in ``pool_exhausted``."""
        return {
            "source": source(hold),
            "route": route(hold),
            "held_ms": _ms(now - hold[START]),
            "idle_ms": _ms(idle_of(hold, now)),
            "in_transaction": in_transaction(hold),
            "statement": _shape(hold[STATEMENT]),
        }


# -- pool sizing ---------------------------------------------------------------------


def suggested_pool(peak: int) -> tuple[int, int]:
    """``(pool_size, max_overflow)`` for a workload that needed ``peak`` connections.

    A quarter of headroom (at least one connection) over the peak, and as much overflow
    again for bursts the measurement did not see: enough for the load that was measured,
    without reserving database connections nobody uses.
    """
    size = max(peak + max(1, -(-peak // 4)), 1)
    return size, size


def pool_advice(
    *,
    peak: int,
    pool_size: int | None,
    max_overflow: int | None,
    timeouts: int,
    mean_wait: float,
    processes: int = 1,
) -> str:
    """One paragraph of pool sizing advice from what was measured.

    ``peak`` is the most connections checked out at once, ``timeouts`` the checkouts
    that gave up, ``mean_wait`` the mean checkout wait in seconds; ``pool_size`` and
    ``max_overflow`` are the pool's settings (None for pools without them).
    """
    if pool_size is None or max_overflow is None or max_overflow < 0:
        return f"pool sizing: at most {peak} connection(s) in use at once (a pool without a limit)"
    limit = pool_size + max_overflow
    if timeouts:
        return (
            f"pool sizing: {timeouts} checkout(s) timed out with {peak} of {limit} connections in "
            "use: read the pool_exhausted events first (which code held the connections, "
            "and whether it was talking to the database) before making the pool bigger"
        )
    if peak >= limit or mean_wait >= 0.01:
        return (
            f"pool sizing: {peak} of {limit} connections in use at the peak, mean wait "
            f"{mean_wait * 1000:.1f} ms: the pool is the bottleneck; the pool_hold events "
            "and the idle share say whether connections are held while idle (fix the code) "
            "or busy on the database (raise pool_size)"
        )
    size, overflow = suggested_pool(peak)
    if size + overflow >= limit:
        return f"pool sizing: {peak} of {limit} connections in use at the peak: the size fits"
    fleet = ""
    if processes > 1:
        fleet = f" (over {processes} processes, {processes * limit} instead of " + (
            f"{processes * (size + overflow)})"
        )
    return (
        f"pool sizing: at most {peak} of {limit} connections (pool_size={pool_size}, "
        f"max_overflow={max_overflow}) were in use at once; pool_size={size}, "
        f"max_overflow={overflow} serves this workload with the same waits and caps the "
        f"process at {size + overflow} connections instead of {limit}{fleet}: when the "
        "database slows down, the extra connections pile onto it rather than queue in "
        "the application, where pool_exhausted names the code holding them"
    )
