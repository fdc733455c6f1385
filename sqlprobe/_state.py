"""sqlprobe's process-wide state, all of it, in one place.

* which engines are attached (so ``attach`` is idempotent per engine);
* which Prometheus exporter is registered on which registry (one per registry, so
  several engines never produce duplicate metric families);
* the ``attach()``-without-an-engine hook, while it is installed.

Nothing here is created at import time beyond empty containers; everything is reached
through ``attach``/``detach``, which take :data:`lock`.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from ._sinks._prometheus import PrometheusExporter

if TYPE_CHECKING:
    from ._probe import Probe

__all__ = ["defer", "exporter_for", "lock", "probes", "release_exporter", "run_deferred"]

#: Guards every structure in this module (attach and detach are rare; no hot path here).
lock = threading.RLock()

#: Attached engines (``Engine``, never ``AsyncEngine``: the sync engine is the key).
probes: weakref.WeakKeyDictionary[Any, Probe] = weakref.WeakKeyDictionary()

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


#: registry id -> (registry, exporter); the registry is kept to make the id unambiguous.
_exporters: dict[int, tuple[CollectorRegistry, PrometheusExporter]] = {}


_multiprocess_exporter: list[PrometheusExporter] = []


def exporter_for(registry: CollectorRegistry) -> PrometheusExporter:
    """The exporter registered on ``registry``, registering one on first use.

    In prometheus_client's multiprocess mode there is one exporter per process,
    registered nowhere: its values go to the multiprocess files (``_multiprocess``).
    """
    from ._sinks._multiprocess import MultiprocessExporter, multiprocess_active

    with lock:
        if multiprocess_active():
            if not _multiprocess_exporter:
                _multiprocess_exporter.append(MultiprocessExporter())
            return _multiprocess_exporter[0]
        found = _exporters.get(id(registry))
        if found is not None and found[0] is registry:
            return found[1]
        exporter = PrometheusExporter()
        registry.register(exporter)
        _exporters[id(registry)] = (registry, exporter)
        return exporter


def release_exporter(registry: CollectorRegistry, exporter: PrometheusExporter) -> None:
    """Unregister an exporter that no engine uses any more."""
    with lock:
        found = _exporters.get(id(registry))
        if found is not None and found[1] is exporter and not exporter.engines:
            del _exporters[id(registry)]
            registry.unregister(exporter)
