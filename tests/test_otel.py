"""Statement spans: names, attributes, errors, batches, parents, sampling, timing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from sqlalchemy import exc, text
from sqlalchemy.engine import Engine
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe._core._collector import StatementRecord

from .conftest import make_logger, sample, total

pytestmark = pytest.mark.smoke


class Tracing:
    """A fresh SDK tracer provider whose finished spans land in memory."""

    def __init__(self, sampler: Any = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def spans(self, scope: str = "sqlprobe") -> list[ReadableSpan]:
        return [
            s
            for s in self.exporter.get_finished_spans()
            if s.instrumentation_scope is not None and s.instrumentation_scope.name == scope
        ]


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    t = Tracing()
    yield t
    t.provider.shutdown()


SERVER = {"sqlite": None, "postgresql": ("127.0.0.1", 5432), "mariadb": ("127.0.0.1", 3306)}


def _system(engine: Engine) -> str:
    with engine.connect():
        pass  # MariaDB is told apart from MySQL once connected
    if getattr(engine.dialect, "is_mariadb", False):
        return "mariadb"
    return engine.dialect.name


def test_one_span_per_statement(
    any_engine: Engine, registry: CollectorRegistry, tracing: Tracing, unique: str
) -> None:
    """Each statement gives one CLIENT span named `{operation} {table}` with semconv attributes."""
    table = f"otel_users_{unique}"
    probe = sqlprobe.attach(any_engine, registry=registry, tracer_provider=tracing.provider)
    system = _system(any_engine)
    try:
        with tracing.tracer.start_as_current_span("request") as parent, any_engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(50))"))
            conn.execute(text(f"INSERT INTO {table} (id, name) VALUES (1, 'a')"))
            conn.execute(text(f"SELECT name FROM {table} WHERE id = :id"), {"id": 1}).all()
        spans = [s for s in tracing.spans() if s.name.endswith(table)]
        assert [s.name for s in spans] == [
            f"CREATE {table}",
            f"INSERT {table}",
            f"SELECT {table}",
        ]
        select = spans[2]
        assert select.kind is SpanKind.CLIENT
        assert select.parent is not None
        assert select.parent.span_id == parent.get_span_context().span_id
        attrs = dict(select.attributes or {})
        fingerprint = attrs.pop("sqlprobe.fingerprint")
        assert isinstance(fingerprint, str) and len(fingerprint) == 16
        expected: dict[str, Any] = {
            "db.system.name": system,
            "db.operation.name": "SELECT",
            "db.collection.name": table,
            "db.query.summary": f"SELECT {table}",
            "db.query.text": f"SELECT name FROM {table} WHERE id = ?",
        }
        server = SERVER["sqlite" if system == "sqlite" else system]
        if server is not None:
            expected["db.namespace"] = "test"
            expected["server.address"], expected["server.port"] = server
        assert attrs == expected
        assert fingerprint in {s.fingerprint for s in probe.statements()}
    finally:
        with any_engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        probe.detach()


def test_no_literal_or_parameter_in_spans(
    any_engine: Engine, registry: CollectorRegistry, tracing: Tracing, unique: str
) -> None:
    """Parameter values and literals (sentinels) are in no span name, attribute, event, status."""
    table = f"otel_secret_{unique}"
    probe = sqlprobe.attach(any_engine, registry=registry, tracer_provider=tracing.provider)
    try:
        with tracing.tracer.start_as_current_span("request"):
            with any_engine.begin() as conn:
                conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, s VARCHAR(50))"))
                conn.execute(
                    text(f"INSERT INTO {table} VALUES (:i, :s)"), {"i": 1, "s": "SENTINEL_P1"}
                )
                conn.execute(text(f"INSERT INTO {table} VALUES (2, 'SENTINEL_L1')"))
                conn.execute(
                    text(f"INSERT INTO {table} VALUES (:i, :s)"),
                    [{"i": 3, "s": "SENTINEL_P2"}, {"i": 4, "s": "SENTINEL_P3"}],
                )
                conn.execute(text(f"SELECT s FROM {table} WHERE s = 'SENTINEL_L2'")).all()
                conn.exec_driver_sql(f"SELECT s FROM {table} WHERE id = 424242").all()
            with pytest.raises(exc.IntegrityError), any_engine.begin() as conn:
                conn.execute(text(f"INSERT INTO {table} VALUES (1, 'SENTINEL_L3')"))
        spans = tracing.spans()
        assert len(spans) >= 7
        dumped = repr(
            [
                (s.name, dict(s.attributes or {}), s.events, s.status.description, s.links)
                for s in spans
            ]
        )
        assert "SENTINEL" not in dumped
        assert "424242" not in dumped
        assert any(s.status.status_code is StatusCode.ERROR for s in spans)
    finally:
        with any_engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        probe.detach()


STATUS = {"sqlite": "1555", "postgresql": "23505", "mariadb": "1062"}


def test_error_span(
    any_engine: Engine, registry: CollectorRegistry, tracing: Tracing, unique: str
) -> None:
    """A failed statement's span has status ERROR, the app's error class and the SQLSTATE/errno."""
    table = f"otel_err_{unique}"
    probe = sqlprobe.attach(any_engine, registry=registry, tracer_provider=tracing.provider)
    system = _system(any_engine)
    try:
        with any_engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)"))
            conn.execute(text(f"INSERT INTO {table} VALUES (1)"))
        with (
            tracing.tracer.start_as_current_span("request"),
            pytest.raises(Exception) as caught,
            any_engine.begin() as conn,
        ):
            conn.execute(text(f"INSERT INTO {table} VALUES (:i)"), {"i": 1})
        failed = [s for s in tracing.spans() if s.status.status_code is StatusCode.ERROR]
        assert len(failed) == 1
        attrs = failed[0].attributes or {}
        assert caught.type.__name__ == "IntegrityError"
        assert attrs["error.type"] == "IntegrityError"
        assert attrs["db.response.status_code"] == STATUS[system]
        assert failed[0].name == f"INSERT {table}"
        assert not failed[0].events
        # The same class name as the Prometheus error label.
        assert (
            sample(
                registry,
                "sqlprobe_query_errors_total",
                engine=probe.name or "",
                operation="INSERT",
                error="IntegrityError",
            )
            == 1
        )
    finally:
        with any_engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        probe.detach()


def test_executemany_batch_size(
    any_engine: Engine, registry: CollectorRegistry, tracing: Tracing, unique: str
) -> None:
    """An executemany span carries db.operation.batch.size; a single execute does not."""
    table = f"otel_many_{unique}"
    probe = sqlprobe.attach(any_engine, registry=registry, tracer_provider=tracing.provider)
    try:
        with any_engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, n INTEGER)"))
        tracing.exporter.clear()
        with tracing.tracer.start_as_current_span("request"), any_engine.begin() as conn:
            # An UPDATE goes through cursor.executemany() on every driver.
            conn.execute(
                text(f"INSERT INTO {table} (id, n) VALUES (:i, 0)"),
                [{"i": i} for i in range(5)],
            )
            conn.execute(
                text(f"UPDATE {table} SET n = :n WHERE id = :i"),
                [{"i": i, "n": i} for i in range(3)],
            )
            conn.execute(text(f"UPDATE {table} SET n = 9 WHERE id = :i"), {"i": 4})
        updates = [s for s in tracing.spans() if s.name == f"UPDATE {table}"]
        assert len(updates) == 2
        assert updates[0].attributes is not None
        assert updates[0].attributes["db.operation.batch.size"] == 3
        assert "db.operation.batch.size" not in (updates[1].attributes or {})
    finally:
        with any_engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        probe.detach()


async def test_asyncio_tasks_parented(
    async_pg_engine: Any, registry: CollectorRegistry, tracing: Tracing
) -> None:
    """Statements of concurrent asyncio tasks on an AsyncEngine are children of each task's span."""
    probe = sqlprobe.attach(async_pg_engine, registry=registry, tracer_provider=tracing.provider)
    parents: dict[int, int] = {}

    async def task(n: int) -> None:
        with tracing.tracer.start_as_current_span(f"task-{n}") as span:
            parents[n] = span.get_span_context().span_id
            async with async_pg_engine.connect() as conn:
                for _ in range(3):
                    await conn.execute(text(f"SELECT {n}, pg_sleep(0.005)"))
                    await asyncio.sleep(0)

    try:
        await asyncio.gather(*(task(n) for n in range(4)))
        spans = [
            s
            for s in tracing.spans()
            if (s.attributes or {}).get("db.query.text") == "SELECT ?, pg_sleep(?)"
        ]
        assert len(spans) == 12
        by_parent: dict[int, int] = {}
        for s in spans:
            assert s.parent is not None
            by_parent[s.parent.span_id] = by_parent.get(s.parent.span_id, 0) + 1
        assert by_parent == {span_id: 3 for span_id in parents.values()}
    finally:
        probe.detach()


def test_threads_parented(pg_engine: Engine, registry: CollectorRegistry, tracing: Tracing) -> None:
    """Statements on several threads are children of each thread's own active span."""
    probe = sqlprobe.attach(pg_engine, registry=registry, tracer_provider=tracing.provider)
    parents: dict[int, int] = {}
    barrier = threading.Barrier(3)

    def work(n: int) -> None:
        with tracing.tracer.start_as_current_span(f"thread-{n}") as span:
            parents[n] = span.get_span_context().span_id
            barrier.wait()
            with pg_engine.connect() as conn:
                for _ in range(3):
                    conn.execute(text("SELECT 1"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        spans = [
            s for s in tracing.spans() if (s.attributes or {}).get("db.query.text") == "SELECT ?"
        ]
        assert sorted(s.parent.span_id for s in spans if s.parent) == sorted(
            list(parents.values()) * 3
        )
    finally:
        probe.detach()


def test_unsampled_parent_makes_no_span(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """Under a parent that is not sampled no span is made and no exemplar is recorded."""
    tracing = Tracing(sampler=ParentBased(ALWAYS_OFF))
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=tracing.provider)
    try:
        with tracing.tracer.start_as_current_span("request") as parent:
            assert not parent.get_span_context().trace_flags.sampled
            with sqlite_engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        assert tracing.exporter.get_finished_spans() == ()
        assert b"trace_id" not in generate_latest(registry)
    finally:
        probe.detach()


def test_span_times_match_metrics(
    sqlite_engine: Engine, registry: CollectorRegistry, tracing: Tracing
) -> None:
    """A span's duration is the duration the histogram observed, from the same clock readings."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=tracing.provider)
    try:
        with (
            tracing.tracer.start_as_current_span("request") as parent,
            sqlite_engine.connect() as conn,
        ):
            conn.execute(text("SELECT 1"))
        (span,) = tracing.spans()
        assert span.start_time is not None and span.end_time is not None
        observed = sample(
            registry,
            "sqlprobe_query_duration_seconds_sum",
            engine=probe.name or "",
            operation="SELECT",
        )
        assert observed > 0
        assert abs((span.end_time - span.start_time) / 1e9 - observed) < 2e-6
        assert isinstance(parent, ReadableSpan)
        assert parent.start_time is not None and parent.end_time is not None
        assert parent.start_time <= span.start_time <= span.end_time <= parent.end_time
    finally:
        probe.detach()


class _Keep:
    stage = "test"

    def __init__(self) -> None:
        self.records: list[StatementRecord] = []

    def on_statement(self, record: StatementRecord) -> None:
        self.records.append(record)


def test_record_span_set_before_slow_sinks(
    sqlite_engine: Engine, registry: CollectorRegistry, tracing: Tracing, logs: LogCapture
) -> None:
    """Record sinks see record.span (the statement's own span); so does the slow-query log."""
    probe = sqlprobe.attach(
        sqlite_engine,
        registry=registry,
        tracer_provider=tracing.provider,
        slow_query_threshold=0,
        logger=make_logger(logs),
    )
    keep = _Keep()
    assert probe.collector is not None
    probe.collector.add_sink(keep)
    try:
        with tracing.tracer.start_as_current_span("request"), sqlite_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        (span,) = tracing.spans()
        (record,) = keep.records
        assert record.span == span.get_span_context()
        # The slow-query log (a slow sink) links the statement's span, not the request's.
        (event,) = [e for e in logs.entries if e["event"] == "slow_query"]
        assert event["span_id"] == format(span.get_span_context().span_id, "016x")
        assert event["trace_id"] == format(span.get_span_context().trace_id, "032x")
    finally:
        probe.detach()


def test_exemplars_match_spans(
    sqlite_engine: Engine, registry: CollectorRegistry, tracing: Tracing
) -> None:
    """OpenMetrics exposition carries trace_id/span_id exemplars of the exported spans."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=tracing.provider)
    try:
        with tracing.tracer.start_as_current_span("request"), sqlite_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        (span,) = tracing.spans()
        ctx = span.get_span_context()
        assert ctx is not None
        exposition = generate_latest(registry).decode()
        bucket_lines = [
            line
            for line in exposition.splitlines()
            if line.startswith("sqlprobe_query_duration_seconds_bucket") and "# {" in line
        ]
        assert len(bucket_lines) == 1
        assert 'operation="SELECT"' in bucket_lines[0]
        assert f'trace_id="{ctx.trace_id:032x}"' in bucket_lines[0]
        assert f'span_id="{ctx.span_id:016x}"' in bucket_lines[0]
    finally:
        probe.detach()


def test_noop_provider_makes_no_span_but_links_active_span(
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    tracing: Tracing,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a non-SDK provider no span is made, yet a sampled active span becomes the exemplar."""
    from sqlprobe._sinks import _otel

    monkeypatch.setattr(_otel, "AMBIENT_INTERVAL", 0.0)
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=NoOpTracerProvider())
    try:
        with sqlite_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            assert b"trace_id" not in generate_latest(registry)
            with tracing.tracer.start_as_current_span("request") as parent:
                conn.execute(text("SELECT 2"))
        assert [s.name for s in tracing.exporter.get_finished_spans()] == ["request"]
        assert f"{parent.get_span_context().trace_id:032x}".encode() in generate_latest(registry)
    finally:
        probe.detach()


def test_ambient_lookups_are_throttled(
    sqlite_engine: Engine, registry: CollectorRegistry, tracing: Tracing
) -> None:
    """Without an SDK provider the active span is looked up at most once per interval."""
    from sqlprobe._sinks import _otel

    probe = sqlprobe.attach(
        sqlite_engine,
        registry=registry,
        tracer_provider=NoOpTracerProvider(),
        n_plus_one_threshold=0,
    )
    seen: list[object] = []
    collector = probe.collector
    assert collector is not None

    class Spy:
        stage = "spy"

        def on_statement(self, record: Any) -> None:
            seen.append(record.span)

    collector.add_sink(Spy())
    try:
        with sqlite_engine.connect() as conn, tracing.tracer.start_as_current_span("request"):
            for _ in range(50):
                conn.execute(text("SELECT 1"))
            time.sleep(_otel.AMBIENT_INTERVAL * 2)
            conn.execute(text("SELECT 1"))
    finally:
        probe.detach()
    linked = [s for s in seen if s is not None]
    assert 2 <= len(linked) < 50
    assert seen[-1] is not None


def test_root_statement_follows_sampler(
    sqlite_engine: Engine, registry: CollectorRegistry, tracing: Tracing
) -> None:
    """Without an active span the SDK's sampler decides: the default samples a root span."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=tracing.provider)
    try:
        assert not trace.get_current_span().get_span_context().is_valid
        with sqlite_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        (span,) = tracing.spans()
        assert span.parent is None
    finally:
        probe.detach()


def test_detach_stops_spans(
    sqlite_engine: Engine, registry: CollectorRegistry, tracing: Tracing
) -> None:
    """After detach() statements make no span and the engine still works."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=tracing.provider)
    probe.detach()
    with sqlite_engine.connect() as conn:
        assert conn.execute(text("SELECT 7")).scalar() == 7
    assert tracing.exporter.get_finished_spans() == ()
    for name in ("do_execute", "do_executemany", "do_execute_no_params"):
        assert len(getattr(sqlite_engine.dialect.dispatch, name)) == 0


def test_failing_tracer_is_contained(
    sqlite_engine: Engine, registry: CollectorRegistry, tracing: Tracing
) -> None:
    """A tracer that raises counts as an internal error; the statement and metrics are untouched."""

    from opentelemetry.sdk.trace.sampling import Sampler

    class Broken(Sampler):
        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

        def get_description(self) -> str:
            return "broken"

    probe = sqlprobe.attach(
        sqlite_engine, registry=registry, tracer_provider=TracerProvider(sampler=Broken())
    )
    try:
        with sqlite_engine.connect() as conn:
            assert conn.execute(text("SELECT 5")).scalar() == 5
        assert sample(registry, "sqlprobe_internal_errors_total", stage="otel") == 1
        assert (
            sample(
                registry,
                "sqlprobe_query_duration_seconds_count",
                engine=probe.name or "",
                operation="SELECT",
            )
            == 1
        )
    finally:
        probe.detach()


LATE_GLOBAL = """
import time
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
import sqlprobe

engine = create_engine("sqlite://")
sqlprobe.attach(engine, registry=CollectorRegistry(), n_plus_one_threshold=0)
with engine.connect() as conn:
    conn.execute(text("SELECT 1"))  # no SDK yet: no span
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
time.sleep(0.05)  # past sqlprobe._sinks._otel.AMBIENT_INTERVAL since the last look
with trace.get_tracer("app").start_as_current_span("request"):
    with engine.connect() as conn:
        conn.execute(text("SELECT 2"))
        conn.execute(text("SELECT 3"))
print(sorted(s.name for s in exporter.get_finished_spans()))
"""


def test_global_provider_configured_after_attach() -> None:
    """Attached before the app sets its global SDK provider, an engine starts making spans then."""
    # A child process: the test process never configures OpenTelemetry globally.
    out = subprocess.run(
        [sys.executable, "-c", LATE_GLOBAL], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "['SELECT', 'SELECT', 'request']"


def test_ambient_step_is_called_only_when_a_look_is_due(
    sqlite_engine: Engine, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an SDK, statements between two looks at the active span call no trace step."""
    from sqlprobe._sinks import _otel

    calls: list[float] = []
    original = _otel._Tracing._ambient

    def counting(self: Any, shape: Any, start: float, *args: Any) -> Any:
        calls.append(start)
        return original(self, shape, start, *args)

    monkeypatch.setattr(_otel._Tracing, "_ambient", counting)
    monkeypatch.setattr(_otel, "AMBIENT_INTERVAL", 3600.0)
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=NoOpTracerProvider())
    with sqlite_engine.connect() as conn:
        for _ in range(50):
            conn.execute(text("SELECT 1"))
    probe.detach()
    assert len(calls) == 1
    assert total(registry, "sqlprobe_statement_calls_total", engine=probe.name) >= 50
