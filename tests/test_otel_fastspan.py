"""The direct span path: same spans as the SDK's own, and the SDK path wherever it must be."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, exc, text

import sqlprobe
from sqlprobe._sinks import _otel

pytestmark = pytest.mark.smoke


def _run_workload(engine: Engine) -> None:
    """A DDL statement, a successful SELECT, an executemany and a failing statement."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS fs (id INTEGER PRIMARY KEY, v TEXT)"))
    with engine.connect() as conn:
        conn.execute(text("SELECT v FROM fs WHERE id = 1"))
        conn.execute(text("INSERT INTO fs (v) VALUES (:v)"), [{"v": "a"}, {"v": "b"}])
        with pytest.raises(exc.OperationalError):
            conn.execute(text("SELECT nope FROM fs"))
        conn.rollback()


def _spans_from(
    engine: Engine, registry: CollectorRegistry, provider: TracerProvider, parent: bool
) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    probe = sqlprobe.attach(engine, registry=registry, tracer_provider=provider)
    try:
        if parent:
            with provider.get_tracer("tests").start_as_current_span("request"):
                _run_workload(engine)
        else:
            _run_workload(engine)
    finally:
        probe.detach()
    return [
        s
        for s in exporter.get_finished_spans()
        if s.instrumentation_scope is not None and s.instrumentation_scope.name == "sqlprobe"
    ]


def _comparable(spans: Sequence[ReadableSpan]) -> list[bytes]:
    """OTLP encodings with ids and times (which differ run to run) cleared."""
    request = encode_spans(spans)
    out = []
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
                assert len(span.trace_id) == 16 and len(span.span_id) == 8
                span.trace_id = span.span_id = span.parent_span_id = b""
                span.start_time_unix_nano = span.end_time_unix_nano = 0
                wrapped = type(request)()
                rs = wrapped.resource_spans.add()
                rs.resource.CopyFrom(resource_spans.resource)
                ss = rs.scope_spans.add()
                ss.scope.CopyFrom(scope_spans.scope)
                ss.schema_url = scope_spans.schema_url
                ss.spans.append(span)
                out.append(wrapped.SerializeToString(deterministic=True))
    return out


@pytest.fixture
def emitters(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The direct emitters (None: the SDK path) chosen by probes attached in the test."""
    made: list[Any] = []
    real = _otel.direct_emitter

    def spy(tracer: Any, length: int) -> Any:
        made.append(real(tracer, length))
        return made[-1]

    monkeypatch.setattr(_otel, "direct_emitter", spy)
    return made


def test_plain_sdk_provider_takes_the_direct_path(
    sqlite_engine: Engine, registry: CollectorRegistry, emitters: list[Any]
) -> None:
    """With the installed SDK and plain processors, spans skip start_span (the fast path)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=provider)
    probe.detach()
    assert len(emitters) == 1 and emitters[0] is not None


@pytest.mark.parametrize("parent", [True, False], ids=["parent", "root"])
def test_direct_spans_equal_sdk_spans_on_the_wire(
    parent: bool,
    make_sqlite_engine: Any,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Direct spans and start_span spans of the same statements encode to identical OTLP."""
    direct = _spans_from(make_sqlite_engine(), registry, TracerProvider(), parent)
    monkeypatch.setattr(_otel, "direct_emitter", lambda tracer, length: None)
    sdk = _spans_from(make_sqlite_engine(), CollectorRegistry(), TracerProvider(), parent)
    assert [s.name for s in direct] == [s.name for s in sdk]
    assert len(direct) == 4  # CREATE, SELECT, INSERT (one executemany), failing SELECT
    assert _comparable(direct) == _comparable(sdk)
    for d, s in zip(direct, sdk, strict=True):
        assert dict(d.attributes or {}) == dict(s.attributes or {})
        assert d.status.status_code == s.status.status_code
        assert d.status.description == s.status.description
        assert d.context.trace_flags == s.context.trace_flags
        assert (d.parent is None) == (s.parent is None) == (not parent)
        assert d.kind == s.kind == SpanKind.CLIENT
        assert d.events == s.events == ()
        assert d.links == s.links == ()
        assert d.dropped_attributes == s.dropped_attributes == 0
        assert d.resource == s.resource


class StartWatcher(SpanProcessor):
    """A processor that changes spans as they start (needs real SDK spans)."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        span.set_attribute("seen.on_start", True)


@pytest.mark.parametrize("when", ["before", "after"])
def test_processor_watching_span_start_gets_real_spans(
    when: str, sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """A processor with on_start sees every span start, even if added after attach."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    if when == "before":
        provider.add_span_processor(StartWatcher())
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=provider)
    try:
        with sqlite_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            if when == "after":
                provider.add_span_processor(StartWatcher())
            conn.execute(text("SELECT 2"))
    finally:
        probe.detach()
    seen = [(s.attributes or {}).get("seen.on_start") for s in exporter.get_finished_spans()]
    assert seen == ([True, True] if when == "before" else [None, True])


def test_span_limits_are_honoured(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """Span limits that would cut an attribute apply to sqlprobe's spans as to any span."""
    provider = TracerProvider(span_limits=SpanLimits(max_span_attribute_length=12))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=provider)
    try:
        with sqlite_engine.connect() as conn:
            conn.execute(text("SELECT 1 AS a_rather_long_column_name"))
    finally:
        probe.detach()
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["db.query.text"] == "SELECT ? AS "


class Recorder(SpanProcessor):
    """Keeps every ended span, sampled or not (SimpleSpanProcessor drops unsampled ones)."""

    def __init__(self) -> None:
        self.ended: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


class Tagging(Sampler):
    """Samples (or only records), adding an attribute and a trace-state entry."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.seen_kinds: list[SpanKind | None] = []

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        self.seen_kinds.append(kind)
        attrs = dict(attributes or {})
        attrs["sampler.tag"] = "yes"
        return SamplingResult(self.decision, attrs, TraceState([("vendor", "v1")]))

    def get_description(self) -> str:
        return "Tagging"


@pytest.mark.parametrize("decision", [Decision.RECORD_AND_SAMPLE, Decision.RECORD_ONLY])
def test_sampler_result_is_applied(
    decision: Decision, sqlite_engine: Engine, registry: CollectorRegistry, emitters: list[Any]
) -> None:
    """The sampler's attributes, trace state and record-only decision reach the span."""
    sampler = Tagging(decision)
    provider = TracerProvider(sampler=sampler)
    recorder = Recorder()
    provider.add_span_processor(recorder)
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=provider)
    try:
        assert emitters[-1] is not None
        with sqlite_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        probe.detach()
    (span,) = recorder.ended
    assert sampler.seen_kinds == [SpanKind.CLIENT]
    assert span.attributes is not None
    assert span.attributes["sampler.tag"] == "yes"
    assert span.attributes["db.operation.name"] == "SELECT"
    assert span.context.trace_state.get("vendor") == "v1"
    assert span.context.trace_flags.sampled is (decision is Decision.RECORD_AND_SAMPLE)


def test_disabled_tracer_makes_no_span(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """A tracer switched off by the provider's tracer configurator makes no span."""
    from opentelemetry.sdk.trace import _TracerConfig

    provider = TracerProvider()
    recorder = Recorder()
    provider.add_span_processor(recorder)
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=provider)
    try:
        with sqlite_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            provider._set_tracer_configurator(
                tracer_configurator=lambda scope: _TracerConfig(is_enabled=False)
            )
            conn.execute(text("SELECT 2"))
    finally:
        probe.detach()
    assert [s.attributes["db.query.text"] for s in recorder.ended if s.attributes] == ["SELECT ?"]


@pytest.fixture
def make_sqlite_engine() -> Iterator[Any]:
    """Fresh in-memory SQLite engines, disposed after the test."""
    from sqlalchemy import create_engine

    engines: list[Engine] = []

    def make() -> Engine:
        engine = create_engine("sqlite://")
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


class EndingWatcher(SpanProcessor):
    """A processor that looks at spans as they end (the SDK's OnEnding hook)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def _on_ending(self, span: Span) -> None:
        self.seen.append(span.name)


def test_processor_watching_span_ending_gets_real_spans(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """A processor with an on-ending hook is called for every span, as the SDK calls it."""
    provider = TracerProvider()
    watcher = EndingWatcher()
    provider.add_span_processor(watcher)
    probe = sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=provider)
    try:
        with sqlite_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        probe.detach()
    assert watcher.seen == ["SELECT"]
