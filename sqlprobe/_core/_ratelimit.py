"""The one rate limiter behind every rate-limited event (slow queries, N+1, ...)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Fixed-window limiter per key plus a cap over all keys, with suppressed counts.

    :meth:`admit` returns None when the event must be dropped, else the number of
    events of that key dropped since the last admitted one (then reset to 0). At most
    ``per_key`` events per key and ``total`` events over all keys pass in each
    ``interval``-second window; the per-key table keeps at most ``max_keys`` keys,
    evicting the least recently seen (with its unreported count). ``clock`` is
    injectable for tests. Thread-safe; only events (never plain statements) reach it.
    """

    def __init__(
        self,
        per_key: int = 5,
        total: int = 100,
        interval: float = 60.0,
        max_keys: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_key = per_key
        self.total = total
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        # key -> [window start, events in window, suppressed since last event]
        self._keys: OrderedDict[str, list[float]] = OrderedDict()
        self._window = -float("inf")
        self._count = 0
        self._lock = threading.Lock()

    def admit(self, key: str) -> int | None:
        """Let one event of ``key`` through (its suppressed count) or drop it (None)."""
        with self._lock:
            now = self.clock()
            state = self._keys.get(key)
            if state is None:
                while len(self._keys) >= self.max_keys:
                    self._keys.popitem(last=False)
                state = self._keys[key] = [now, 0, 0]
            else:
                self._keys.move_to_end(key)
                if now - state[0] >= self.interval:
                    state[0] = now
                    state[1] = 0
            if now - self._window >= self.interval:
                self._window = now
                self._count = 0
            if state[1] >= self.per_key or self._count >= self.total:
                state[2] += 1
                return None
            state[1] += 1
            self._count += 1
            suppressed = int(state[2])
            state[2] = 0
            return suppressed

    def __len__(self) -> int:
        return len(self._keys)
