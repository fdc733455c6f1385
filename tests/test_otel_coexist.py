"""Living beside opentelemetry-instrumentation-sqlalchemy: one span per statement, enriched."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from sqlalchemy import text
from sqlalchemy.engine import Engine

import sqlprobe
from sqlprobe._core._collector import StatementRecord

pytestmark = pytest.mark.smoke

THEIRS = "opentelemetry.instrumentation.sqlalchemy"


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    yield tp, exporter
    tp.shutdown()


class _Keep:
    stage = "test"

    def __init__(self) -> None:
        self.records: list[StatementRecord] = []

    def on_statement(self, record: StatementRecord) -> None:
        self.records.append(record)


def _instrument(engine: Engine, tp: TracerProvider, **kwargs: Any) -> SQLAlchemyInstrumentor:
    instrumentor = SQLAlchemyInstrumentor()
    # SQLAlchemy 2.1 is outside the instrumentation's declared range.
    instrumentor.instrument(engine=engine, tracer_provider=tp, skip_dep_check=True, **kwargs)
    return instrumentor


@pytest.mark.parametrize("order", ["instrument_first", "attach_first"])
def test_one_span_per_statement_with_official_instrumentation(
    pg_engine: Engine,
    registry: CollectorRegistry,
    provider: tuple[TracerProvider, InMemorySpanExporter],
    order: str,
) -> None:
    """With the official instrumentation each statement has exactly one span: theirs, enriched."""
    tp, exporter = provider
    with pg_engine.connect():
        pass  # dialect initialization statements are not part of this test
    probe = None
    instrumentor = None
    try:
        if order == "attach_first":
            probe = sqlprobe.attach(
                pg_engine, registry=registry, tracer_provider=tp, slow_query_threshold=0
            )
            instrumentor = _instrument(pg_engine, tp)
        else:
            instrumentor = _instrument(pg_engine, tp)
            probe = sqlprobe.attach(
                pg_engine, registry=registry, tracer_provider=tp, slow_query_threshold=0
            )
        keep = _Keep()
        assert probe.collector is not None
        probe.collector.add_sink(keep)  # every statement is slow here (threshold 0)
        with tp.get_tracer("tests").start_as_current_span("request"), pg_engine.connect() as conn:
            for i in range(3):
                conn.execute(text("SELECT :i"), {"i": i})
        # Their "connect" span wraps engine.connect(), not a statement.
        spans = [s for s in exporter.get_finished_spans() if s.name not in ("request", "connect")]
        assert len(spans) == 3
        assert {s.instrumentation_scope.name for s in spans if s.instrumentation_scope} == {THEIRS}
        fingerprints = {s.fingerprint for s in probe.statements()}
        for span in spans:
            attrs = span.attributes or {}
            assert attrs["sqlprobe.fingerprint"] in fingerprints
            assert attrs["db.query.summary"] == "SELECT"
        # Slow-query records and exemplars carry the instrumentation's span ids.
        assert [r.span for r in keep.records] == [s.get_span_context() for s in spans]
        exposition = generate_latest(registry).decode()
        last = spans[-1].get_span_context()
        assert last is not None
        assert f'span_id="{last.span_id:016x}"' in exposition
    finally:
        if instrumentor is not None:
            instrumentor.uninstrument()
        if probe is not None:
            probe.detach()


def test_their_comment_left_alone(
    pg_engine: Engine,
    registry: CollectorRegistry,
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """With both commenters on, the instrumentation's comment is sent and sqlprobe adds none."""
    tp, _exporter = provider
    instrumentor = _instrument(pg_engine, tp, enable_commenter=True)
    probe = sqlprobe.attach(pg_engine, registry=registry, tracer_provider=tp, sqlcommenter=True)
    try:
        with tp.get_tracer("tests").start_as_current_span("request"), pg_engine.connect() as conn:
            sent = conn.execute(
                text("SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            ).scalar_one()
        assert sent.count("/*") == 1
        assert "traceparent=" in sent
        assert "framework='sqlalchemy" in sent
    finally:
        instrumentor.uninstrument()
        probe.detach()
