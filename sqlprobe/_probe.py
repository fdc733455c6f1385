"""``attach``, ``Probe`` and ``detach``: the composition root.

This is the one module that knows every feature. At attach time it works out
everything that does not change per statement (the engine facts, the Prometheus
series, the collector and what it fans out to), builds each sink and analysis from
data (an :class:`~._core._records.AttachContext`, its own options, a containment
callback), wires them to the hooks, and keeps the undo of each. No sink or analysis
ever sees the probe; :meth:`Probe.detach` undoes exactly what attach did.

The wiring of one engine, in order::

    statement hooks -> collector -> trace step (spans, OTel metrics)
                                 -> metrics sink (the Prometheus series)
                                 -> unit step (N+1 detector -> series, log, captures)
                                 -> record sinks (slow-query log -> EXPLAIN; captures)
    pool hooks      -> pool sink (the series [+ OTel pool metrics])
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from sqlalchemy.engine import URL, Engine

from . import _state
from ._analysis._explain import Explainer
from ._analysis._holds import HoldMonitor
from ._analysis._nplusone import Detector
from ._config import Options, build_options, env_enabled
from ._core._collector import Collector
from ._core._contain import Containment
from ._core._errors import error_namer
from ._core._records import AttachContext, EngineInfo
from ._hooks._pool import PoolFanout, PoolHooks, keeps_connections
from ._hooks._statement import wrap_execution
from ._sinks import _otel, _sqlcommenter
from ._sinks._slowlog import SlowQueryLog

__all__ = ["EngineInfo", "Probe", "StatementStats", "attach", "engine_label"]


# Semantic-convention names of the database systems we know; the backend name otherwise.
_SYSTEM_NAMES = {
    "postgresql": "postgresql",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "sqlite": "sqlite",
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
}


def engine_label(url: URL) -> str:
    """``dialect://host:port/database`` of an engine URL, never with user or password.

    Never raises: an unusual URL object gives ``"unknown"`` rather than break the
    application's ``create_engine()``.
    """
    try:
        backend = url.get_backend_name()
        if backend == "sqlite":
            return f"sqlite:///{url.database or ':memory:'}"
        host = url.host or ""
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address
        port = f":{url.port}" if url.port else ""
        return f"{backend}://{host}{port}/{url.database or ''}"
    except Exception:
        return "unknown"


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


class _DefaultLogger:
    """The logger of a probe attached without ``logger=``.

    A library must not write to standard output. While the application has configured
    structlog, events go to ``structlog.get_logger("sqlprobe")`` (its processors, its
    output); otherwise through the standard library's ``logging`` logger ``sqlprobe``,
    so they follow the application's logging set-up (and reach standard error through
    logging's last-resort handler for warnings). The choice is made per event, so an
    application that configures logging after attach is followed.
    """

    def __init__(self) -> None:
        self._stdlib = logging.getLogger("sqlprobe")

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        # Imported here: structlog imports greenlet, which an application that only
        # imports SQLAlchemy must not find imported (SQLAlchemy's own tests check).
        import structlog

        if structlog.is_configured():
            getattr(structlog.get_logger("sqlprobe"), logging.getLevelName(level).lower())(
                event, **fields
            )
            return
        if self._stdlib.isEnabledFor(level):
            text = " ".join(f"{k}={v!r}" for k, v in fields.items())
            self._stdlib.log(
                level,
                "%s %s",
                event,
                text,
                extra={"sqlprobe_event": event, "sqlprobe_fields": fields},
            )

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)


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
        """Average execution time of the shape, in seconds."""
        return self.total_seconds / self.calls if self.calls else 0.0


class Probe:
    """The handle :func:`attach` returns; owns exactly what it registered.

    A probe made by ``attach()`` without an engine (``engine`` is None) watches every
    engine created afterwards; its :attr:`probes` lists the engines it attached that
    are still alive, and detaching it detaches them too.
    """

    def __init__(self, engine: Any, options: Options | None) -> None:
        self._engine_ref = weakref.ref(engine) if engine is not None else None
        self._options = options
        self._undo: list[Callable[[], Any]] = []
        self._children: weakref.WeakSet[Probe] = weakref.WeakSet()
        self._attached = False
        #: True for an engine's probe made by ``attach()`` without an engine
        self._implicit = False
        self.info: EngineInfo | None = None
        self.collector: Collector | None = None
        self._series: Any = None
        self._pool: PoolHooks | None = None

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
        """The live engines a global probe attached (empty for an engine's probe)."""
        return tuple(p for p in self._children if p.attached)

    @property
    def pool_peak(self) -> int:
        """The most connections of the engine's pool checked out at once since attach.

        What the pool needed; compare it with ``pool_size + max_overflow`` (see the pool
        sizing guide). 0 for the probe of ``attach()`` without an engine.
        """
        return self._pool.peak() if self._pool is not None else 0

    def statements(self) -> list[StatementStats]:
        """Totals per statement shape so far, largest total time first."""
        series = self._series
        if series is None:
            out: list[StatementStats] = []
            for child in self.probes:
                out.extend(child.statements())
            return sorted(out, key=lambda s: s.total_seconds, reverse=True)
        with series.lock:
            shapes = list(series.shapes.values())
            rows = [
                StatementStats(
                    s.fingerprint, s.operation, s.table, s.statement, s.calls, s.seconds, s.rows
                )
                for s in shapes
            ]
            other = list(series.other.values())
        if other and sum(s.calls for s in other):
            first = other[0]
            rows.append(
                StatementStats(
                    first.fingerprint, "OTHER", "", first.statement,
                    sum(s.calls for s in other), sum(s.seconds for s in other),
                    sum(s.rows for s in other),
                )
            )  # fmt: skip
        return sorted(rows, key=lambda s: s.total_seconds, reverse=True)

    def detach(self) -> None:
        """Remove everything this probe added; its series keep their totals.

        Safe to call more than once. Counters and histograms stay in the registry
        (attaching an engine again under the same name continues them), so nothing
        counted before the detach is lost before the next scrape.
        """
        _state.run_deferred()
        with _state.lock:
            if not self._attached:
                return
            self._attached = False
            for child in list(self._children):
                child.detach()
            self._children.clear()
            undo, self._undo = self._undo, []
            for fn in reversed(undo):
                try:
                    fn()
                except Exception:  # undo all it can
                    continue
            engine = self.engine
            sync = getattr(engine, "sync_engine", engine)
            if sync is not None and _state.probes.get(sync) is self:
                del _state.probes[sync]
            if _state.global_probe and _state.global_probe[0] is self:
                _state.global_probe.clear()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return f"<sqlprobe.Probe {self.name or '(all engines)'} {state}>"

    # -- wiring ---------------------------------------------------------------------

    def _attach_engine(self, sync: Engine) -> None:
        options = self._options
        assert options is not None
        info = self.info = _engine_info(sync, options.name)
        dialect = sync.dialect
        exporter = _state.exporter_for(options.registry)
        series = self._series = exporter.engine_series(
            info.name, options.buckets, options.max_fingerprints
        )
        logger = options.logger or _DefaultLogger()
        contain = Containment(info.name, exporter.internal_error, logger)
        ctx = AttachContext(info=info, dialect=dialect, contain=contain, logger=logger)
        error_name = error_namer(dialect)
        undo = self._undo
        self._attached = True
        released = threading.Lock()

        def release() -> None:
            if released.acquire(blocking=False):
                exporter.release(series)

        undo.append(release)
        try:
            pool = self._pool = PoolHooks(sync, contain=contain, error_name=error_name)
            otel = _otel.build(
                ctx,
                tracer_provider=options.tracer_provider,
                meter_provider=options.meter_provider,
                buckets=options.buckets,
                snapshot=pool.snapshot,
            )
            undo.append(otel.close)

            explainer = None
            if options.explain:
                database = sync.url.database or ""
                explainer = Explainer(
                    ctx,
                    connect=pool.side_connection,
                    capture_parameters=options.capture_parameters,
                    in_memory=database in ("", ":memory:") or "mode=memory" in str(sync.url),
                )
                _state.on_fork(explainer)
                _state.at_exit(explainer)
                undo.append(explainer.close)
            slowlog = SlowQueryLog(
                ctx,
                threshold=options.slow_query_threshold,
                capture_parameters=options.capture_parameters,
                explainer=explainer,
            )
            slow_sinks: tuple[Any, ...] = (slowlog,)
            if options.index_advice:
                advice = _index_advice(ctx, sync, pool, series, logger)
                undo.append(advice.close)
                _state.at_exit(advice)
                slow_sinks = (slowlog, advice)
                slowlog.advice_for = advice.known

            unit = None
            if options.n_plus_one_threshold > 0:
                detector = Detector(
                    ctx,
                    options.n_plus_one_threshold,
                    relationship_threshold=options.n_plus_one_relationship_threshold,
                    count=series.detected,
                    listeners=_state.detection_listeners,
                )
                unit = detector.on_statement
                _state.retain_orm_hook()
                undo.append(_once(_state.release_orm_hook))

            collector = self.collector = Collector(
                engine_name=info.name,
                metrics=series,
                contain=contain,
                error_name=error_name,
                slow_query_threshold=options.slow_query_threshold,
                trace=otel.trace,
                trace_gate=otel.gate,
                unit=unit,
                slow_sinks=slow_sinks,
            )
            comment = _sqlcommenter.build(
                options.sqlcommenter,
                driver=info.driver,
                dbapi=getattr(dialect, "loaded_dbapi", None),
                paramstyle=dialect.paramstyle,
                trace_context=_otel.trace_context_fn() if otel.trace is not None else None,
                on_error=contain,
            )
            undo.append(
                wrap_execution(
                    dialect,
                    collector,
                    rewrite=comment[0] if comment else None,
                    rewrite_no_params=comment[1] if comment else None,
                    hold_key=pool.hold_key,
                )
            )

            pool_sink: Any = (
                series if otel.pool is None else PoolFanout((series, otel.pool), contain)
            )
            series.add_pool(pool.snapshot, keeps_connections(sync.pool))
            undo.append(lambda: series.remove_pool(pool.snapshot))
            series.add_peak(pool.take_peak)
            undo.append(lambda: series.remove_peak(pool.take_peak))
            monitor = HoldMonitor(
                ctx,
                hold_threshold=options.pool_hold_threshold,
                idle_in_transaction_threshold=options.idle_in_transaction_threshold,
                wait_threshold=options.pool_wait_threshold,
                holders=pool.holders,
            )
            undo.append(pool.install(pool_sink, series, monitor, max_routes=options.max_routes))
            _state.on_fork(pool)
            _state.watch(monitor)
            undo.append(lambda: _state.unwatch(monitor))
        except BaseException:
            self.detach()
            raise
        # An engine dropped without detach() must not keep its share of process-wide
        # state (the ORM hook, the series reference); its totals stay, bounded. The
        # clean-up runs at the next safe point (see _state.defer).
        weakref.finalize(sync, _state.defer, self.detach)
        for listener in _state.attach_listeners():
            try:
                listener(self)
            except Exception:  # a capture must never break attach()
                continue

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
                _state.run_deferred()
                with _state.lock:
                    if (
                        probe._attached
                        and engine not in _state.probes
                        and not _state.internal_engine.get()
                    ):
                        child = Probe(engine, probe._options)
                        child._implicit = True
                        child._attach_engine(engine)
                        _state.probes[engine] = child
                        probe._children.add(child)
            except Exception:
                try:
                    options = probe._options
                    logger = (options.logger if options else None) or _DefaultLogger()
                    logger.error("internal_error", stage="attach", engine=engine_label(engine.url))
                except Exception:  # never break the application's create_engine()
                    pass

        Dialect.engine_created = classmethod(engine_created)  # type: ignore[method-assign,assignment]

        def restore() -> None:
            if Dialect.__dict__.get("engine_created") is not original:
                Dialect.engine_created = original  # type: ignore[method-assign]

        self._undo.append(restore)
        self._attached = True


def _index_advice(
    ctx: AttachContext, sync: Engine, pool: PoolHooks, series: Any, logger: Any
) -> Any:
    """The index advisor of one engine, fed by slow SELECTs, reporting to log and metrics.

    Its connections come from a private NullPool engine whose DBAPI connections are
    opened like the application's (:meth:`PoolHooks.side_connection`): never the
    application's pool, never attached by ``attach()`` for all engines. For an
    AsyncEngine that engine has the async dialect too: the advisor's worker drives it
    through SQLAlchemy's greenlet adapter on an event loop of its own (``is_async``).
    """
    try:
        from ._analysis._advisor import AdviceSink, IndexAdvisor
    except ImportError as exc:  # sqlglot is an optional extra
        raise ValueError(
            f"index_advice=True needs the advice extra: pip install 'sqlprobe[advice]' ({exc})"
        ) from None
    is_async = bool(getattr(sync.dialect, "is_async", False))
    side: list[Engine] = []

    def connect() -> Any:
        if not side:
            from sqlalchemy import create_engine
            from sqlalchemy.pool import NullPool

            token = _state.internal_engine.set(True)
            try:
                side.append(
                    create_engine(sync.url, creator=pool.side_connection, poolclass=NullPool)
                )
            finally:
                _state.internal_engine.reset(token)
        return side[0].connect()

    def close_side() -> None:
        for engine in side:
            engine.dispose()

    return AdviceSink(
        lambda on_advice: IndexAdvisor(
            connect,
            sync.dialect.name,
            on_advice=on_advice,
            contain=ctx.contain,
            is_async=is_async,
        ),
        engine=ctx.info.name,
        logger=logger,
        metric=series.advised,
        on_close=close_side,
    )


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = threading.Lock()

    def run() -> None:
        if done.acquire(blocking=False):
            fn()

    return run


def _differences(old: Options, new: Options) -> list[str]:
    return [
        field
        for field in Options.__dataclass_fields__
        if getattr(old, field) is not getattr(new, field)
        and getattr(old, field) != getattr(new, field)
    ]


def _check_same(existing: Probe, options: Options, what: str) -> Probe:
    old = existing.options
    if old is not None:
        differ = _differences(old, options)
        if differ:
            raise ValueError(
                f"{what} is already attached with other options ({', '.join(differ)}); "
                "detach() it first, or call attach() with the same options"
            )
    return existing


def _not_an_engine(engine: Any) -> TypeError:
    kind = type(engine).__name__
    hint = "pass an Engine (create_engine(url)) or an AsyncEngine (create_async_engine(url))"
    if isinstance(engine, (str, URL)):
        hint = f"pass create_engine({str(engine)!r}), not the URL itself"
    elif hasattr(engine, "get_bind"):
        hint = "pass the session's engine: session.get_bind() (or the engine it was made with)"
    elif hasattr(engine, "engine") and isinstance(getattr(engine, "engine", None), Engine):
        hint = "pass connection.engine"
    return TypeError(f"attach() takes a SQLAlchemy Engine or AsyncEngine, got {kind}: {hint}")


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
    n_plus_one_relationship_threshold: int = 2,
    max_fingerprints: int = 500,
    sqlcommenter: bool | str = False,
    explain: bool = False,
    index_advice: bool = False,
    buckets: Sequence[float] | None = None,
    pool_hold_threshold: float = 1.0,
    idle_in_transaction_threshold: float = 0.5,
    pool_wait_threshold: float = 1.0,
    max_routes: int = 200,
) -> Probe:
    """Attach sqlprobe to an engine and return the :class:`Probe` that owns it.

    ``engine`` is an ``Engine`` or ``AsyncEngine``; without one, every engine created
    afterwards is attached with these options. A second call for the same engine with
    the same options returns the existing probe (nothing is counted twice); with other
    options it raises ``ValueError`` naming them, unless the engine was attached by
    ``attach()`` without an engine: then the explicit call's options replace those.
    Options are validated here: a bad value raises ``ValueError`` saying which option
    and why.

    ``index_advice=True`` (needs the ``advice`` extra) analyses slow SELECT shapes on a
    worker thread and suggests the index that would serve each, proven against the
    planner where the database allows (see the index advice documentation).

    ``pool_hold_threshold`` (seconds, default 1), ``idle_in_transaction_threshold``
    (default 0.5) and ``pool_wait_threshold`` (default 1) decide when a ``pool_hold``
    or ``pool_exhausted`` event names the code holding the pool's connections;
    ``max_routes`` (default 200) bounds the ``route`` label of the per-unit-of-work
    histograms (further routes count as ``_other``).

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
        "n_plus_one_relationship_threshold": n_plus_one_relationship_threshold,
        "max_fingerprints": max_fingerprints,
        "sqlcommenter": sqlcommenter,
        "explain": explain,
        "index_advice": index_advice,
        "pool_hold_threshold": pool_hold_threshold,
        "idle_in_transaction_threshold": idle_in_transaction_threshold,
        "pool_wait_threshold": pool_wait_threshold,
        "max_routes": max_routes,
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
            raise _not_an_engine(engine)

    if not env_enabled():
        return Probe(engine, None)

    with _state.lock:
        if sync_engine is None:
            if _state.global_probe and _state.global_probe[0].attached:
                return _check_same(_state.global_probe[0], options, "attach() for all engines")
            probe = Probe(None, options)
            probe._attach_global()
            _state.global_probe[:] = [probe]
            return probe
        existing = _state.probes.get(sync_engine)
        if existing is not None and existing.attached:
            old = existing.options
            if not existing._implicit or old is None or not _differences(old, options):
                return _check_same(existing, options, "this engine")
            # The application's own attach() of one engine wins over attach() for all
            # engines (e.g. under ``sqlprobe run``): the blanket probe steps aside.
            existing.detach()
        probe = Probe(engine, options)
        probe._attach_engine(sync_engine)
        _state.probes[sync_engine] = probe
        return probe
