"""sqlprobe's process-wide state, all of it, in one place.

* which engines are attached (so ``attach`` is idempotent per engine), and the probe
  of ``attach()`` without an engine;
* which Prometheus exporter is registered on which registry (one per registry, so
  several engines never produce duplicate metric families), and the one exporter of
  Prometheus multiprocess mode;
* the clean-ups of engines collected while attached (deferred to safe points);
* the listeners that want every N+1 detection or every newly attached probe
  (``sqlprobe.testing`` captures);
* how many probes need the ORM hook (it is added for the first, removed after the last);
* the objects to reset in a forked child and to flush at interpreter exit, behind one
  ``os.register_at_fork`` handler and one ``atexit`` handler, both registered the first
  time they are needed;
* the process's one watchdog thread (:data:`watchdog`), which looks at connections still
  checked out for the pool-hold events: started by the first :func:`watch`, stopped
  after the last :func:`unwatch` and at exit, started again in a forked child.

Nothing here is created at import time beyond empty containers; the containers are
reached only through attach, detach, scrapes and captures, which take :data:`lock`
(no statement ever does).
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from ._core._ticker import Ticker
from ._sinks._prometheus import PrometheusExporter

if TYPE_CHECKING:
    from ._core._records import Detection
    from ._probe import Probe

__all__ = [
    "add_attach_listener",
    "add_detection_listener",
    "at_exit",
    "attach_listeners",
    "defer",
    "detection_listeners",
    "exporter_for",
    "global_probe",
    "internal_engine",
    "lock",
    "on_fork",
    "probes",
    "release_orm_hook",
    "remove_attach_listener",
    "remove_detection_listener",
    "retain_orm_hook",
    "run_deferred",
    "unwatch",
    "watch",
    "watchdog",
]

#: Guards every structure in this module (attach and detach are rare; no hot path here).
lock = threading.RLock()

#: Attached engines (``Engine``, never ``AsyncEngine``: the sync engine is the key).
probes: weakref.WeakKeyDictionary[Any, Probe] = weakref.WeakKeyDictionary()

#: The probe of ``attach()`` without an engine, while attached (at most one).
global_probe: list[Probe] = []

#: True while sqlprobe creates an engine of its own (the index advisor's): ``attach()``
#: for all engines leaves that one alone.
internal_engine: ContextVar[bool] = ContextVar("sqlprobe_internal_engine", default=False)

# -- deferred clean-ups ---------------------------------------------------------------

#: Clean-ups of engines that were garbage-collected while attached. A weakref
#: callback runs wherever the garbage collector happens to run, possibly inside a
#: ``with lock:`` of the same thread; taking any lock there could deadlock, so the
#: callback only queues its clean-up (``deque.append`` takes no lock of ours) and the
#: queue is drained at safe points: attach, detach and every scrape.
_deferred: deque[Callable[[], None]] = deque()


def defer(fn: Callable[[], None]) -> None:
    """Queue a clean-up for the next safe point (callable from a weakref callback)."""
    _deferred.append(fn)


def run_deferred() -> None:
    """Run queued clean-ups; call with no sqlprobe lock held. Never raises."""
    while True:
        try:
            fn = _deferred.popleft()
        except IndexError:
            return
        try:
            fn()
        except Exception:  # a failed clean-up must not stop the others
            continue


# -- exporters ------------------------------------------------------------------------

#: registry id -> (registry, exporter); the registry is kept to make the id unambiguous.
_exporters: dict[int, tuple[CollectorRegistry, PrometheusExporter]] = {}
_multiprocess_exporter: list[PrometheusExporter] = []


def exporter_for(registry: CollectorRegistry) -> PrometheusExporter:
    """The exporter registered on ``registry``, registering one on first use.

    In prometheus_client's multiprocess mode there is one exporter per process,
    registered nowhere: its values go to the multiprocess files.
    """
    from ._sinks._multiprocess import MultiprocessExporter, multiprocess_active

    with lock:
        if multiprocess_active():
            if not _multiprocess_exporter:
                _multiprocess_exporter.append(MultiprocessExporter(run_deferred))
            return _multiprocess_exporter[0]
        found = _exporters.get(id(registry))
        if found is not None and found[0] is registry:
            return found[1]
        exporter = PrometheusExporter(run_deferred)
        registry.register(exporter)
        _exporters[id(registry)] = (registry, exporter)
        return exporter


# -- listeners of sqlprobe.testing ----------------------------------------------------

#: Called with every Detection of every probe; swapped whole, never mutated in place.
_detection_listeners: tuple[Callable[[Detection], None], ...] = ()
#: Called with every probe attached while registered (captures of "all engines").
_attach_listeners: tuple[Callable[[Probe], None], ...] = ()


def detection_listeners() -> tuple[Callable[[Detection], None], ...]:
    """The functions that want every N+1 detection (read when one is made)."""
    return _detection_listeners


def attach_listeners() -> tuple[Callable[[Probe], None], ...]:
    """The functions that want every newly attached probe."""
    return _attach_listeners


def add_detection_listener(fn: Callable[[Detection], None]) -> None:
    """Call ``fn`` with each detection of any probe until it is removed."""
    global _detection_listeners
    with lock:
        _detection_listeners = (*_detection_listeners, fn)


def remove_detection_listener(fn: Callable[[Detection], None]) -> None:
    """Stop calling ``fn`` (no error when it was not registered)."""
    global _detection_listeners
    with lock:
        # ``!=``, not ``is not``: a bound method is a new object at every attribute
        # access, so the one being removed is equal to, not identical with, the one added.
        _detection_listeners = tuple(f for f in _detection_listeners if f != fn)


def add_attach_listener(fn: Callable[[Probe], None]) -> None:
    """Call ``fn`` with each probe attached from now on until it is removed."""
    global _attach_listeners
    with lock:
        _attach_listeners = (*_attach_listeners, fn)


def remove_attach_listener(fn: Callable[[Probe], None]) -> None:
    """Stop calling ``fn`` on attach (no error when it was not registered)."""
    global _attach_listeners
    with lock:
        _attach_listeners = tuple(f for f in _attach_listeners if f != fn)


# -- the ORM hook ---------------------------------------------------------------------

_orm_users = 0


def retain_orm_hook() -> None:
    """One more probe needs the ORM hook (installed for the first)."""
    global _orm_users
    from ._hooks._orm import install_orm_hook

    with lock:
        if _orm_users == 0:
            install_orm_hook()
        _orm_users += 1


def release_orm_hook() -> None:
    """One probe less needs the ORM hook (removed after the last)."""
    global _orm_users
    from ._hooks._orm import remove_orm_hook

    with lock:
        _orm_users = max(_orm_users - 1, 0)
        if _orm_users == 0:
            remove_orm_hook()


# -- fork and exit --------------------------------------------------------------------

#: Objects with ``after_fork()`` (EXPLAIN workers: a forked child has the queue, not the
#: thread) and objects with ``at_exit()`` to flush at exit; held weakly.
_forkers: weakref.WeakSet[Any] = weakref.WeakSet()
_closers: weakref.WeakSet[Any] = weakref.WeakSet()
_registered: list[str] = []


def _after_fork() -> None:
    global lock
    lock = threading.RLock()  # a parent thread may have held it while forking
    for obj in list(_forkers):
        try:
            obj.after_fork()
        except Exception:
            continue


def _at_exit() -> None:
    for obj in list(_closers):
        try:
            obj.at_exit()
        except Exception:
            continue


def on_fork(obj: Any) -> None:
    """Call ``obj.after_fork()`` in every forked child while ``obj`` lives."""
    with lock:
        if "fork" not in _registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork)
            _registered.append("fork")
        _forkers.add(obj)


def at_exit(obj: Any) -> None:
    """Call ``obj.at_exit()`` at interpreter exit while ``obj`` lives."""
    with lock:
        if "exit" not in _registered:
            atexit.register(_at_exit)
            _registered.append("exit")
        _closers.add(obj)


# -- the watchdog ---------------------------------------------------------------------

#: The one thread per process that calls ``tick()`` of every pool-hold monitor.
watchdog = Ticker("sqlprobe-watchdog")


def watch(monitor: Any) -> None:
    """Have the watchdog call ``monitor.tick()`` every ``monitor.interval`` seconds."""
    on_fork(watchdog)
    at_exit(watchdog)
    watchdog.add(monitor)


def unwatch(monitor: Any) -> None:
    """Stop calling ``monitor``; the thread ends with the last one."""
    watchdog.remove(monitor)
