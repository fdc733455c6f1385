"""OpenTelemetry: statement spans, trace-linked exemplars, OTel metrics, sqlcommenter.

OpenTelemetry is optional (the ``otel`` extra). Nothing here imports it until an
engine is attached, and :func:`build` decides once per engine which *trace step* the
collector gets (the step runs after each statement, before the metrics, and returns
the span context to link to it; see ``_core._collector``):

* no ``opentelemetry`` package and no ``meter_provider``: no trace step at all; OTel
  costs nothing;
* an SDK ``TracerProvider`` (the ``tracer_provider`` option, else the global one):
  **spans mode**, one CLIENT span per statement;
* any other provider (the API's default proxy before an SDK is configured, a NoOp):
  **ambient mode**: no span of ours, only a look at the active span, at most once per
  ``AMBIENT_INTERVAL`` (10 ms) per engine, so that exemplars still link to traces
  made by someone else's SDK without paying the lookup on every statement; the
  official instrumentation's span (kept on the execution context) is found on every
  statement. If the global proxy later resolves to an SDK provider, the engine moves
  to spans mode by itself.

Spans are created *after* the statement, with explicit start and end times taken from
the same ``perf_counter`` readings as the Prometheus metrics (converted to epoch
nanoseconds with an offset computed at attach), so span and histogram agree exactly
and the driver call is not slowed by span bookkeeping. Since such a span is finished
the moment it exists, it is handed to the provider's span processors directly as a
``ReadableSpan`` wherever the provider's configuration makes that indistinguishable
from ``start_span`` + ``end`` (``_fastspan``: about 5 µs instead of 20). The parent is the context
active when the statement ran: the thread's, or the asyncio task's for an AsyncEngine
(SQLAlchemy's greenlets run in the task's context). When the parent span is valid but
not sampled no span is started at all; with no parent the SDK's sampler decides.

Span contents follow the stable database semantic conventions: name
``{operation} {table}`` (else the operation, else ``db.system.name``; a statement whose
operation is ``OTHER`` gets no ``db.operation.name``), kind CLIENT, and the attributes
``db.system.name``, ``db.namespace``, ``db.operation.name``, ``db.collection.name``,
``db.query.text`` (the *normalized* text, at most ``QUERY_TEXT_MAX`` characters: no
literal or parameter ever reaches a span),
``db.query.summary``, ``server.address``, ``server.port``, ``db.operation.batch.size``
(executemany of two or more rows), ``sqlprobe.fingerprint``. A failed statement's span
has status ERROR without a description and no exception event (driver messages quote
values, e.g. the duplicate key), ``error.type`` and, where the driver gives one,
``db.response.status_code`` (SQLSTATE from psycopg and asyncpg, the error number from
PyMySQL/MySQLdb, the extended result code from sqlite3).

``error.type`` is the class name the application receives, which is also the
``error`` label of ``sqlprobe_query_errors_total``: for a DBAPI error that is
SQLAlchemy's wrapper (``IntegrityError``, ``OperationalError``, ...), worked out the
way SQLAlchemy picks it (the first class in the driver exception's MRO whose name is a
``sqlalchemy.exc.DBAPIError`` subclass), because the span is finished before
SQLAlchemy's ``handle_error`` runs; any other exception keeps its own class name.

Living beside opentelemetry-instrumentation-sqlalchemy: that instrumentation starts
its span in ``before_cursor_execute`` and keeps it on the execution context (it is not
made current). When sqlprobe finds that span it creates none of its own: it adds
``sqlprobe.fingerprint`` and ``db.query.summary`` to it and uses its ids for
exemplars and slow-query records, so each statement has exactly one span.

Exemplars: whatever span is linked to a statement (ours, the instrumentation's, or
in ambient mode the active sampled span) becomes the ``trace_id``/``span_id``
exemplar of its ``sqlprobe_query_duration_seconds`` bucket, visible in OpenMetrics
exposition. prometheus_client's multiprocess mode drops exemplars.

OTel metrics (only with the ``meter_provider`` option; the global meter provider is
never used): ``db.client.operation.duration`` (seconds, with the probe's buckets as
advisory boundaries) and, when the pool feature is attached, the connection metrics
``db.client.connection.count`` (``db.client.connection.state`` idle/used),
``.max``, ``.wait_time``, ``.use_time``, ``.create_time`` and ``.timeouts``, fed by a
pool sink (:class:`PoolMetrics`) that the probe adds beside the Prometheus one.

The tracer and meter declare schema :data:`SCHEMA_URL`: the semantic-convention
version in which the database names emitted here (``db.system.name``,
``db.query.summary``, ``db.response.status_code``...) are stable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._core._errors import error_namer
from .._core._fingerprint import Shape
from .._core._records import AttachContext, EngineInfo
from ._fastspan import NEEDS_SDK, Emit, direct_emitter

__all__ = ["SCHEMA_URL", "OtelParts", "build", "trace_context_fn"]

#: Statement shapes whose span name and attributes are kept ready per engine.
ATTRIBUTE_CACHE_MAX = 1024
#: Shapes whose normalized text is longer are not kept (so the cache holds at most
#: about ATTRIBUTE_CACHE_MAX * CACHED_TEXT_MAX characters); they are rebuilt per span.
CACHED_TEXT_MAX = 2048
#: ``db.query.text`` carries at most this many characters of the normalized text: a
#: generated multi-megabyte statement must not become a multi-megabyte span (exporters
#: and backends reject those); the fingerprint still covers the whole text.
QUERY_TEXT_MAX = 4096
#: Without an SDK tracer provider, the active span is looked up (for exemplars) at most
#: this often per engine, in seconds.
AMBIENT_INTERVAL = 0.01
_ALWAYS = float("-inf")
#: Instrumentation scope of our spans and metrics.
SCOPE_NAME = "sqlprobe"
#: The semantic-convention schema of the names emitted (stable database conventions).
SCHEMA_URL = "https://opentelemetry.io/schemas/1.33.0"


@dataclass(frozen=True, slots=True)
class OtelParts:
    """What :func:`build` gives the composition root for one engine."""

    #: The collector's trace step, or None (no OTel package and no meter provider).
    trace: Any
    #: A pool sink writing the OTel connection metrics, or None.
    pool: Any
    #: Stops the OTel metrics' callbacks (detach).
    close: Callable[[], None]
    #: When the trace step is worth calling: ``start >= gate[0]`` (see
    #: :attr:`_Tracing.gate`); None: for every statement.
    gate: list[float] | None = None


def build(
    ctx: AttachContext,
    *,
    tracer_provider: Any,
    meter_provider: Any,
    buckets: tuple[float, ...],
    snapshot: Callable[[], Any] | None,
) -> OtelParts:
    """The trace step and OTel pool metrics of one engine, chosen once at attach.

    ``snapshot`` reads the pool's ``(idle, used, max)`` for the connection gauges.
    """
    try:
        from opentelemetry import trace as trace_api
    except ImportError:
        trace_api = None  # type: ignore[assignment]
    trace_fn = None
    gate = None
    if trace_api is not None:
        provider = tracer_provider or trace_api.get_tracer_provider()
        tracing = _Tracing(ctx, provider)
        trace_fn = tracing.trace
        gate = tracing.gate
    pool = None
    close: Callable[[], None] = _nothing
    if meter_provider is not None:
        metrics = _Metrics(ctx, meter_provider, buckets, snapshot)
        trace_fn = metrics.wrap(trace_fn)
        pool = metrics.pool
        close = metrics.close
        gate = None  # the OTel metrics record every statement
    return OtelParts(trace_fn, pool, close, gate)


def _nothing() -> None:
    return None


def trace_context_fn() -> Callable[[], tuple[str, str] | None]:
    """A function giving the W3C ``traceparent``/``tracestate`` of the current span."""
    from opentelemetry.trace import get_current_span

    def trace_context() -> tuple[str, str] | None:
        ctx = get_current_span().get_span_context()
        if not ctx.is_valid:
            return None
        traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
        return traceparent, ctx.trace_state.to_header() if ctx.trace_state else ""

    return trace_context


def _status_code(exc: BaseException) -> str | None:
    """SQLSTATE (psycopg, asyncpg), MySQL error number, or sqlite3's result code.

    MySQL and MariaDB report their own error number (``1062``), which the semantic
    conventions prefer over the coarse SQLSTATE class some drivers also expose.
    """
    for err in (exc, exc.__cause__):
        if err is None:
            continue
        args = getattr(err, "args", ())
        if (
            args
            and type(args[0]) is int
            and type(err).__module__.split(".")[0] in ("pymysql", "MySQLdb")
        ):
            return str(args[0])
        sqlstate = getattr(err, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate:
            return sqlstate
        code = getattr(err, "sqlite_errorcode", None)
        if isinstance(code, int):
            return str(code)
    return None


class _Tracing:
    """The per-engine span maker (or ambient span reader) behind ``trace``."""

    def __init__(self, ctx: AttachContext, provider: Any) -> None:
        from opentelemetry import trace as trace_api
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._api = trace_api
        self._client = SpanKind.CLIENT
        self._error = Status(StatusCode.ERROR)
        self._current_span = trace_api.get_current_span
        self._internal_error = ctx.contain
        info = ctx.info
        dialect = ctx.dialect
        self.error_type = error_namer(dialect)
        self._dialect = dialect
        self._system = info.system
        # A MariaDB server is known only once the dialect has connected; the first new
        # shape (always after the first connect) corrects the name then.
        self._check_mariadb = info.system == "mysql"
        self._constant = _constant_attributes(info)
        self._attrs: dict[str, tuple[str, dict[str, Any]]] = {}
        # perf_counter() seconds -> epoch nanoseconds, fixed for the probe's life.
        self._offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)
        self._proxy = False
        self._next_look = 0.0
        self._tracer: Any = None
        self._emit: Emit | None = None
        #: The collector calls :attr:`trace` only for statements that start at or after
        #: ``gate[0]``: always (minus infinity) when spans are made or the official
        #: instrumentation's span is on the statements; in ambient mode otherwise, only
        #: when the next look at the active span is due (a call per statement saved).
        self.gate = [_ALWAYS]
        if _is_sdk_provider(provider):
            self._set_tracer(provider)
        else:
            self._proxy = type(provider).__name__ == "ProxyTracerProvider"
            self.trace = self._ambient  # type: ignore[method-assign]
            self.gate[0] = 0.0

    # -- attach-time ------------------------------------------------------------------

    def _set_tracer(self, provider: Any) -> None:
        from .._core._version import __version__ as version

        self._tracer = provider.get_tracer(SCOPE_NAME, version, schema_url=SCHEMA_URL)
        self._emit = direct_emitter(self._tracer, QUERY_TEXT_MAX)
        self.trace = self._spans  # type: ignore[method-assign]
        self.gate[0] = _ALWAYS

    def shape_attributes(self, shape: Shape) -> tuple[str, dict[str, Any]]:
        """Span name and attributes of a statement's shape (cached per fingerprint)."""
        cached = self._attrs.get(shape.fingerprint)
        if cached is not None:
            return cached
        if self._check_mariadb and getattr(self._dialect, "is_mariadb", False):
            self._check_mariadb = False
            self._system = "mariadb"
            self._constant = {**self._constant, "db.system.name": "mariadb"}
        attrs = dict(self._constant)
        operation, table = shape.operation, shape.table
        summary = f"{operation} {table}" if table else operation
        if operation == "OTHER":
            name = self._system
        else:
            name = summary
            attrs["db.operation.name"] = operation
            attrs["db.query.summary"] = summary
        if table:
            attrs["db.collection.name"] = table
        normalized = shape.normalized
        attrs["db.query.text"] = normalized[:QUERY_TEXT_MAX]
        attrs["sqlprobe.fingerprint"] = shape.fingerprint
        result = (name, attrs)
        if len(self._attrs) < ATTRIBUTE_CACHE_MAX and len(normalized) <= CACHED_TEXT_MAX:
            self._attrs[shape.fingerprint] = result
        return result

    # -- statement path -----------------------------------------------------------------

    def trace(
        self,
        shape: Shape,
        start: float,
        elapsed: float,
        batch: int,
        context: Any,
        error: BaseException | None,
    ) -> Any:
        """Replaced in ``__init__`` by the spans or the ambient variant."""
        raise NotImplementedError

    def _enrich(self, theirs: Any, shape: Shape) -> Any:
        if not theirs.is_recording():
            return None
        theirs.set_attribute("sqlprobe.fingerprint", shape.fingerprint)
        table = shape.table
        if shape.operation != "OTHER":
            summary = f"{shape.operation} {table}" if table else shape.operation
            theirs.set_attribute("db.query.summary", summary)
        return theirs.get_span_context()

    def _spans(
        self,
        shape: Shape,
        start: float,
        elapsed: float,
        batch: int,
        context: Any,
        error: BaseException | None,
    ) -> Any:
        try:
            theirs = getattr(context, "_otel_span", None)
            if theirs is not None:
                return self._enrich(theirs, shape)
            parent: Any = self._current_span().get_span_context()
            if not parent.is_valid:
                parent = None
            elif not parent.trace_flags.sampled:
                return None
            name, attrs = self.shape_attributes(shape)
            if batch > 1 or error is not None:
                attrs = dict(attrs)
                if batch > 1:
                    attrs["db.operation.batch.size"] = batch
                if error is not None:
                    attrs["error.type"] = self.error_type(error)
                    code = _status_code(error)
                    if code is not None:
                        attrs["db.response.status_code"] = code
            offset = self._offset_ns
            start_ns = int(start * 1e9) + offset
            end_ns = int((start + elapsed) * 1e9) + offset
            emit = self._emit
            if emit is not None:
                ctx = emit(name, attrs, parent, start_ns, end_ns, error is not None)
                if ctx is not NEEDS_SDK:
                    return ctx if ctx is not None and ctx.trace_flags.sampled else None
                # A processor that looks at spans before they end was added: real
                # spans from now on (processors can be added, never removed).
                self._emit = None
            span = self._tracer.start_span(
                name, None, self._client, attrs, None, start_ns, False, False
            )
            if error is not None:
                span.set_status(self._error)
            span.end(end_ns)
            ctx = span.get_span_context()
            return ctx if ctx.trace_flags.sampled else None
        except Exception:
            self._internal_error("otel")
            return None

    def _ambient(
        self,
        shape: Shape,
        start: float,
        elapsed: float,
        batch: int,
        context: Any,
        error: BaseException | None,
    ) -> Any:
        if self._tracer is not None:  # the global provider became an SDK one
            return self._spans(shape, start, elapsed, batch, context, error)
        try:
            theirs = getattr(context, "_otel_span", None)
            if theirs is not None:
                # The official instrumentation runs on this engine: enrich its span of
                # every statement from now on (the gate stays open).
                self.gate[0] = _ALWAYS
                return self._enrich(theirs, shape)
            # Looking up the active span costs about a microsecond, more than the rest
            # of the metrics path; here it only feeds exemplars (one per bucket is
            # kept), so look at most once per AMBIENT_INTERVAL per engine.
            if start < self._next_look:
                return None
            self._next_look = start + AMBIENT_INTERVAL
            if self.gate[0] != _ALWAYS:
                self.gate[0] = self._next_look
            ctx = self._current_span().get_span_context()
            if not ctx.trace_flags.sampled:
                return None
            if self._proxy:
                # A sampled span exists, so some SDK is configured: if it is the global
                # provider we were proxying, start making spans from now on.
                self._proxy = False
                provider = self._api.get_tracer_provider()
                if _is_sdk_provider(provider):
                    self._set_tracer(provider)
                    return self._spans(shape, start, elapsed, batch, context, error)
            return ctx
        except Exception:
            self._internal_error("otel")
            return None


def _constant_attributes(info: EngineInfo) -> dict[str, Any]:
    """The attributes every span and measurement of an engine carries (built at attach)."""
    constant: dict[str, Any] = {"db.system.name": info.system}
    if info.database and info.system != "sqlite":
        constant["db.namespace"] = info.database
    if info.host:
        constant["server.address"] = info.host
        if info.port:
            constant["server.port"] = info.port
    return constant


def _is_sdk_provider(provider: Any) -> bool:
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return False
    return isinstance(provider, TracerProvider)


class _Metrics:
    """OTel metrics of one engine on the meter provider the user gave.

    The statement duration is recorded from the same readings as the Prometheus
    histogram, with attributes built once per statement shape (no fingerprint or query
    text: those would make the metric's cardinality unbounded). The pool metrics are
    fed by :attr:`pool` (a pool sink) and read from ``snapshot`` when the metric reader
    collects.
    """

    def __init__(
        self,
        ctx: AttachContext,
        meter_provider: Any,
        buckets: tuple[float, ...],
        snapshot: Callable[[], Any] | None,
    ) -> None:
        from .._core._version import __version__ as version

        self._internal_error = ctx.contain
        dialect = ctx.dialect
        self._error_type = error_namer(dialect)
        self._dialect = dialect
        self._closed = False
        meter = meter_provider.get_meter(SCOPE_NAME, version, schema_url=SCHEMA_URL)
        self._duration = _histogram(
            meter, "db.client.operation.duration", "Duration of database client operations.",
            buckets,
        )  # fmt: skip
        self._constant = _constant_attributes(ctx.info)
        self._check_mariadb = ctx.info.system == "mysql"
        self._attrs: dict[str, dict[str, Any]] = {}
        self.pool: Any = None
        if snapshot is not None:
            self.pool = self._pool_metrics(meter, ctx.info.name, buckets, snapshot)

    def _pool_metrics(
        self, meter: Any, pool_name: str, buckets: tuple[float, ...], snapshot: Callable[[], Any]
    ) -> Any:
        from opentelemetry.metrics import Observation

        attrs = {"db.client.connection.pool.name": pool_name}
        idle_attrs = {**attrs, "db.client.connection.state": "idle"}
        used_attrs = {**attrs, "db.client.connection.state": "used"}

        def count(_options: Any) -> list[Any]:
            snap = None if self._closed else snapshot()
            if snap is None:
                return []
            return [Observation(snap[0], idle_attrs), Observation(snap[1], used_attrs)]

        def limit(_options: Any) -> list[Any]:
            snap = None if self._closed else snapshot()
            if snap is None or snap[2] is None:
                return []
            return [Observation(snap[2], attrs)]

        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [count],
            unit="{connection}",
            description="The number of connections that are currently in the state "
            "described by the state attribute.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            [limit],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )
        wait = _histogram(
            meter,
            "db.client.connection.wait_time",
            "The time it took to obtain an open connection from the pool.",
            buckets,
        )
        use = _histogram(
            meter,
            "db.client.connection.use_time",
            "The time between borrowing a connection and returning it to the pool.",
            buckets,
        )
        create = _histogram(
            meter,
            "db.client.connection.create_time",
            "The time it took to create a new connection.",
            buckets,
        )
        timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )
        metrics = self

        class PoolMetrics:
            """The OTel connection metrics as a pool sink."""

            def checkout(self, seconds: float) -> None:
                if not metrics._closed:
                    wait.record(seconds, attrs)

            def checkin(self, seconds: float) -> None:
                if not metrics._closed:
                    use.record(seconds, attrs)

            def connected(self, seconds: float) -> None:
                if not metrics._closed:
                    create.record(seconds, attrs)

            def timeout(self) -> None:
                if not metrics._closed:
                    timeouts.add(1, attrs)

            def connect_failed(self, error: str) -> None:
                return None

            def invalidated(self) -> None:
                return None

            def transaction(self, outcome: str, seconds: float) -> None:
                return None

            def statement_failed(self, operation: str, error: str) -> None:
                return None

        return PoolMetrics()

    def attributes(self, shape: Shape) -> dict[str, Any]:
        """Metric attributes of a statement's shape (cached per fingerprint)."""
        cached = self._attrs.get(shape.fingerprint)
        if cached is not None:
            return cached
        if self._check_mariadb and getattr(self._dialect, "is_mariadb", False):
            self._check_mariadb = False
            self._constant = {**self._constant, "db.system.name": "mariadb"}
        attrs = dict(self._constant)
        if shape.operation != "OTHER":
            attrs["db.operation.name"] = shape.operation
        if shape.table:
            attrs["db.collection.name"] = shape.table
        if len(self._attrs) < ATTRIBUTE_CACHE_MAX:
            self._attrs[shape.fingerprint] = attrs
        return attrs

    def wrap(self, trace_fn: Any) -> Any:
        """A trace step that records the duration, then runs ``trace_fn`` if any."""
        record = self._duration.record
        attributes = self.attributes
        error_type = self._error_type
        internal_error = self._internal_error

        def metered(
            shape: Shape,
            start: float,
            elapsed: float,
            batch: int,
            context: Any,
            error: BaseException | None,
        ) -> Any:
            try:
                attrs = attributes(shape)
                if error is not None:
                    attrs = {**attrs, "error.type": error_type(error)}
                    code = _status_code(error)
                    if code is not None:
                        attrs["db.response.status_code"] = code
                record(elapsed, attrs)
            except Exception:
                internal_error("otel_metrics")
            if trace_fn is None:
                return None
            return trace_fn(shape, start, elapsed, batch, context, error)

        return metered

    def close(self) -> None:
        """Stop reporting: observable callbacks and the pool sink go quiet."""
        self._closed = True


def _histogram(meter: Any, name: str, description: str, buckets: tuple[float, ...]) -> Any:
    try:
        return meter.create_histogram(
            name,
            unit="s",
            description=description,
            explicit_bucket_boundaries_advisory=list(buckets),
        )
    except TypeError:  # opentelemetry-api before 1.23 has no advisory boundaries
        return meter.create_histogram(name, unit="s", description=description)
