"""One low-frequency thread that calls ``tick()`` on whatever watches it.

The pool-hold watchdog (``_analysis._holds``) needs to look at connections that are
still checked out, without a thread or a timer per connection. A :class:`Ticker` is
that one thread per process: it sleeps for the smallest ``interval`` of its watchers,
calls each watcher's ``tick()``, and stops when the last watcher is removed. The
process's only instance lives in ``_state`` (which also restarts it in a forked child
and stops it at interpreter exit).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

__all__ = ["Ticker"]


class Ticker:
    """A daemon thread calling ``tick()`` of each watcher (held weakly) periodically."""

    def __init__(self, name: str, default_interval: float = 1.0) -> None:
        self.name = name
        self.default_interval = default_interval
        self._lock = threading.Lock()
        self._watchers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def add(self, watcher: Any) -> None:
        """Call ``watcher.tick()`` from now on (starts the thread if needed)."""
        with self._lock:
            self._watchers.add(watcher)
            self._start()

    def remove(self, watcher: Any) -> None:
        """Stop calling ``watcher``; the thread ends after the last one."""
        with self._lock:
            self._watchers.discard(watcher)
            if not self._watchers:
                self._halt()

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        thread = threading.Thread(target=self._run, args=(self._stop,), name=self.name, daemon=True)
        self._thread = thread
        thread.start()

    def _halt(self) -> None:
        self._stop.set()
        self._thread = None

    def _interval(self) -> float:
        intervals = [getattr(w, "interval", self.default_interval) for w in list(self._watchers)]
        return min(intervals, default=self.default_interval)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval()):
            for watcher in list(self._watchers):
                if stop.is_set():
                    return
                try:
                    watcher.tick()
                except Exception:  # a watcher contains its own failures; never die
                    continue

    def at_exit(self) -> None:
        """Stop the thread (interpreter exit)."""
        with self._lock:
            self._halt()

    def after_fork(self) -> None:
        """In a forked child: the parent's thread is gone; start one if anyone watches."""
        self._lock = threading.Lock()
        self._thread = None
        self._stop = threading.Event()
        if len(self._watchers):
            with self._lock:
                self._start()
