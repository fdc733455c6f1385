"""``attach``, ``Probe`` and ``detach``: the handle that owns what it registered.

A :class:`Probe` is created once per engine. At attach time it works out everything
that does not change per statement (the ``engine`` label, the server address for
spans, the Prometheus series, the collector and its sinks) and registers its
listeners; :meth:`Probe.detach` removes exactly those listeners and nothing else.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog
from sqlalchemy.engine import URL, Engine

from . import _state
from ._config import Options, build_options, env_enabled
from ._core._collector import Collector
from ._hooks._statement import Listener, install_statement_hooks, remove_listeners

__all__ = ["EngineInfo", "Probe", "StatementStats", "attach", "engine_label"]

#: A feature installer gets the new probe at attach time and returns a function that
#: undoes what it did (or None). Each feature module (pool metrics, spans, slow-query
#: log, N+1 detection) exposes one ``install``; the probe runs them in this order.
Installer = Callable[["Probe"], "Callable[[], None] | None"]


def _installers() -> tuple[Installer, ...]:
    from ._analysis import _nplusone
    from ._hooks import _pool
    from ._sinks import _multiprocess, _otel, _slowlog

    return (
        _pool.install,
        _multiprocess.install,
        _otel.install,
        _slowlog.install,
        _nplusone.install,
    )


# Semantic-convention names of the database systems we know; the backend name otherwise.
_SYSTEM_NAMES = {
    "postgresql": "postgresql",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "sqlite": "sqlite",
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
}


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What sqlprobe knows of an engine, computed once at attach (no credentials)."""

    name: str
    system: str
    driver: str
    host: str | None
    port: int | None
    database: str | None


def engine_label(url: URL) -> str:
    """``dialect://host:port/database`` of an engine URL, never with user or password."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        return f"sqlite:///{url.database or ':memory:'}"
    host = url.host or ""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    port = f":{url.port}" if url.port else ""
    return f"{backend}://{host}{port}/{url.database or ''}"


def _engine_info(engine: Engine, name: str | None) -> EngineInfo:
    url = engine.url
    backend = url.get_backend_name()
    system = _SYSTEM_NAMES.get(backend, backend)
    if backend == "mysql" and getattr(engine.dialect, "is_mariadb", False):
        system = "mariadb"
    return EngineInfo(
        name=name or engine_label(url),
        system=system,
        driver=engine.dialect.driver,
        host=url.host,
        port=url.port,
        database=url.database,
    )


class StatementStats(NamedTuple):
    """Totals of one statement shape on one engine, as :meth:`Probe.statements` returns."""

    fingerprint: str
    operation: str
    table: str
    statement: str
    calls: int
    total_seconds: float
    rows: int

    @property
    def mean_seconds(self) -> float:
        return self.total_seconds / self.calls if self.calls else 0.0


class Probe:
    """The handle :func:`attach` returns; owns exactly the listeners it registered.

    A probe made by ``attach()`` without an engine (``engine`` is None) watches every
    engine created afterwards; its :attr:`probes` lists the engines it attached, and
    detaching it detaches them too.
    """

    def __init__(self, engine: Any, options: Options | None) -> None:
        self._engine_ref = weakref.ref(engine) if engine is not None else None
        self._options = options
        self._listeners: list[Listener] = []
        self._undo: list[Callable[[], None]] = []
        self._children: list[Probe] = []
        self._lock = threading.Lock()
        self._attached = False
        self.info: EngineInfo | None = None
        self.collector: Collector | None = None
        #: Pool metrics and their observers (``_pool.PoolMetrics``); None for the global probe.
        self.pool: Any = None

    # -- public -------------------------------------------------------------------

    @property
    def engine(self) -> Any:
        """The engine (or AsyncEngine) this probe watches; None for the global probe."""
        return self._engine_ref() if self._engine_ref is not None else None

    @property
    def name(self) -> str | None:
        """The ``engine`` label of this probe's metrics."""
        return self.info.name if self.info is not None else None

    @property
    def attached(self) -> bool:
        """True until :meth:`detach` (always False when ``SQLPROBE_ENABLED=0``)."""
        return self._attached

    @property
    def options(self) -> Options | None:
        """The validated options (None when sqlprobe is disabled by the environment)."""
        return self._options

    @property
    def probes(self) -> Sequence[Probe]:
        """The engines a global probe attached (empty for an engine's probe)."""
        return tuple(self._children)

    def statements(self) -> list[StatementStats]:
        """Totals per statement shape so far, largest total time first."""
        collector = self.collector
        if collector is None:
            out: list[StatementStats] = []
            for child in self._children:
                out.extend(child.statements())
            return sorted(out, key=lambda s: s.total_seconds, reverse=True)
        series = collector.series
        with series.lock:
            shapes = list(series.shapes.values())
            if series.other.calls:
                shapes.append(series.other)
            rows = [
                StatementStats(
                    s.fingerprint, s.operation, s.table, s.statement, s.calls, s.seconds, s.rows
                )
                for s in shapes
            ]
        return sorted(rows, key=lambda s: s.total_seconds, reverse=True)

    def detach(self) -> None:
        """Remove every listener this probe added; safe to call more than once."""
        _state.run_deferred()
        with _state.lock:
            if not self._attached:
                return
            self._attached = False
            for child in self._children:
                child.detach()
            self._children.clear()
            remove_listeners(self._listeners)
            self._listeners.clear()
            for undo in reversed(self._undo):
                try:
                    undo()
                except Exception:
                    continue
            self._undo.clear()
            self._release()
            engine = self.engine
            sync = getattr(engine, "sync_engine", engine)
            if sync is not None and _state.probes.get(sync) is self:
                del _state.probes[sync]

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return f"<sqlprobe.Probe {self.name or '(all engines)'} {state}>"

    # -- internals ----------------------------------------------------------------

    def _attach_engine(self, sync_engine: Engine) -> None:
        options = self._options
        assert options is not None
        info = self.info = _engine_info(sync_engine, options.name)
        exporter = _state.exporter_for(options.registry)
        series = exporter.engine_series(info.name, options.buckets, options.max_fingerprints)
        logger = options.logger or structlog.get_logger("sqlprobe")

        def release() -> None:
            if exporter.release(series):
                _state.release_exporter(options.registry, exporter)

        self._release_fn: Callable[[], None] | None = release
        self.collector = Collector(
            engine_name=info.name,
            series=series,
            exporter=exporter,
            slow_query_threshold=options.slow_query_threshold,
            logger=logger,
        )
        self._attached = True
        try:
            self.add_listeners(install_statement_hooks(sync_engine, self.collector))
            for installer in _installers():
                undo = installer(self)
                if undo is not None:
                    self._undo.append(undo)
        except BaseException:
            self.detach()
            raise
        # An engine dropped without detach() must not leave its series behind (the
        # clean-up runs at the next safe point, see _state.defer).
        weakref.finalize(sync_engine, _state.defer, self._release)

    def add_listeners(self, listeners: list[Listener]) -> None:
        """Own listeners some installer registered; targets are held weakly."""
        for target, name, fn in listeners:
            try:
                held: Any = weakref.ref(target)
            except TypeError:
                held = target
            self._listeners.append((held, name, fn))

    def _release(self) -> None:
        fn = getattr(self, "_release_fn", None)
        self._release_fn = None
        if fn is not None:
            fn()

    def _attach_global(self) -> None:
        from sqlalchemy.engine.interfaces import Dialect

        probe = self
        original = Dialect.__dict__["engine_created"]

        # SQLAlchemy has no event for "an engine was created". Dialect.engine_created is
        # the documented hook create_engine() calls on every new engine, whatever name
        # the application imported create_engine under (patching create_engine itself
        # misses `from sqlalchemy import create_engine` done earlier). We wrap the base
        # class's classmethod and restore it on detach; dialects that override it
        # without calling super() are not seen (none of SQLAlchemy's own do).
        def engine_created(cls: type, engine: Engine) -> None:
            original.__func__(cls, engine)
            try:
                with _state.lock:
                    if probe._attached and engine not in _state.probes:
                        child = Probe(engine, probe._options)
                        child._attach_engine(engine)
                        _state.probes[engine] = child
                        probe._children.append(child)
            except Exception:
                structlog.get_logger("sqlprobe").error(
                    "internal_error", stage="attach", engine=engine_label(engine.url)
                )

        Dialect.engine_created = classmethod(engine_created)  # type: ignore[method-assign,assignment]

        def restore() -> None:
            if Dialect.__dict__.get("engine_created") is not original:
                Dialect.engine_created = original  # type: ignore[method-assign]

        self._undo.append(restore)
        self._attached = True


_global_probe: list[Probe] = []


def attach(
    engine: Any = None,
    *,
    name: str | None = None,
    registry: Any = None,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    logger: Any = None,
    slow_query_threshold: float | None = None,
    capture_parameters: bool | None = None,
    n_plus_one_threshold: int = 5,
    max_fingerprints: int = 500,
    sqlcommenter: bool | str = False,
    explain: bool = False,
    buckets: Sequence[float] | None = None,
) -> Probe:
    """Attach sqlprobe to an engine and return the :class:`Probe` that owns it.

    ``engine`` is an ``Engine`` or ``AsyncEngine``; without one, every engine created
    afterwards is attached with these options. A second call for the same engine
    returns the existing probe (nothing is counted twice). Options are validated here:
    a bad value raises ``ValueError`` saying which option and why.

    ``slow_query_threshold`` and ``capture_parameters`` default to the
    ``SQLPROBE_SLOW_QUERY_MS`` and ``SQLPROBE_CAPTURE_PARAMETERS`` environment
    variables, then to 0.1 s and False; ``SQLPROBE_ENABLED=0`` makes this a no-op that
    returns a detached probe.
    """
    kwargs: dict[str, Any] = {
        "name": name,
        "registry": registry,
        "tracer_provider": tracer_provider,
        "meter_provider": meter_provider,
        "logger": logger,
        "n_plus_one_threshold": n_plus_one_threshold,
        "max_fingerprints": max_fingerprints,
        "sqlcommenter": sqlcommenter,
        "explain": explain,
    }
    if slow_query_threshold is not None:
        kwargs["slow_query_threshold"] = slow_query_threshold
    if capture_parameters is not None:
        kwargs["capture_parameters"] = capture_parameters
    if buckets is not None:
        kwargs["buckets"] = buckets
    options = build_options(kwargs)
    _state.run_deferred()

    sync_engine: Engine | None = None
    if engine is not None:
        sync_engine = getattr(engine, "sync_engine", engine)
        if not isinstance(sync_engine, Engine):
            raise TypeError(
                f"attach() takes a SQLAlchemy Engine or AsyncEngine, got {type(engine).__name__}"
            )

    if not env_enabled():
        return Probe(engine, None)

    with _state.lock:
        if sync_engine is None:
            if _global_probe and _global_probe[0].attached:
                return _global_probe[0]
            probe = Probe(None, options)
            probe._attach_global()
            _global_probe[:] = [probe]
            return probe
        existing = _state.probes.get(sync_engine)
        if existing is not None and existing.attached:
            return existing
        probe = Probe(engine, options)
        probe._attach_engine(sync_engine)
        _state.probes[sync_engine] = probe
        return probe
