"""Cardinality attack: a flood of distinct statement shapes stays bounded.

An application that builds SQL by string formatting (or an attacker who controls part of
a statement) can send every statement with a new shape. With the whole agent on
(metrics, pool, spans, slow-query log with a zero threshold, N+1), the text cache, the
exported series and the process's memory must stop growing once the bounds are
reached; shapes beyond ``max_fingerprints`` are counted under ``fingerprint="_other"``,
and every statement is still counted once.

The default run sends 50,000 shapes; ``-m soak`` sends 1,000,000 (the RSS growth is
printed and documented in docs/reliability.md; the target is at most 50 MB).
"""

from __future__ import annotations

import os
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine

import sqlprobe
from sqlprobe._core import _collector
from sqlprobe._sinks._slowlog import MAX_TRACKED_FINGERPRINTS

from .conftest import CountingLogger, NullExporter, rss_bytes, samples_by, series_count

MAX_FINGERPRINTS = 500
MB = 1024 * 1024


def _attack(registry: CollectorRegistry, shapes: int) -> dict[str, float]:
    engine = create_engine("sqlite://")
    exporter = NullExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    logger = CountingLogger()
    probe = sqlprobe.attach(
        engine,
        registry=registry,
        logger=logger,
        tracer_provider=provider,
        slow_query_threshold=0,
        max_fingerprints=MAX_FINGERPRINTS,
    )
    collector = probe.collector
    assert collector is not None
    warm = max(shapes // 10, 20_000)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 0").scalar()
            rss_start = rss_bytes()
            started = time.perf_counter()
            for i in range(shapes):
                if i == warm:
                    rss_warm = rss_bytes()  # every bound reached by now
                # A new column alias each time: a new normalized text, a new shape.
                conn.exec_driver_sql(f"SELECT 1 AS c{i}").scalar()
            elapsed = time.perf_counter() - started
            rss_end = rss_bytes()
            conn.rollback()

        entries, chars = collector.cache_size()
        assert entries <= _collector.CACHE_MAX_ENTRIES
        assert chars <= _collector.CACHE_MAX_CHARS
        calls = samples_by(registry, "sqlprobe_statement_calls_total", "fingerprint")
        assert len(calls) <= MAX_FINGERPRINTS + 1
        assert sum(calls.values()) == shapes + 1  # nothing lost, nothing double-counted
        assert calls["_other"] == shapes + 1 - (len(calls) - 1)
        assert series_count(registry, "sqlprobe_statement_info") <= MAX_FINGERPRINTS + 1
        exposition = generate_latest(registry)
        assert len(exposition) < 512 * 1024
        slow_log = next(s for s in collector.slow_sinks if s.stage == "slowlog")
        assert len(slow_log.limiter) <= MAX_TRACKED_FINGERPRINTS
        assert exporter.spans == shapes + 1
        assert logger.counts.get("internal_error", 0) == 0
        probe.detach()
        return {
            "shapes": shapes,
            "seconds": elapsed,
            "rss_total_mb": (rss_end - rss_start) / MB,
            "rss_after_warm_mb": (rss_end - rss_warm) / MB,
            "exposition_kb": len(exposition) / 1024,
        }
    finally:
        probe.detach()
        engine.dispose()


def test_distinct_shapes_stay_bounded(registry: CollectorRegistry) -> None:
    """50,000 distinct shapes: bounded cache, series and memory; overflow in _other."""
    figures = _attack(registry, int(os.environ.get("SQLPROBE_CARDINALITY_SHAPES", "50000")))
    print("cardinality", figures)
    assert figures["rss_after_warm_mb"] < 8, figures
    assert figures["rss_total_mb"] < 30, figures


@pytest.mark.soak
def test_a_million_distinct_shapes_stay_bounded(registry: CollectorRegistry) -> None:
    """1,000,000 distinct shapes: RSS grows at most 50 MB; overflow in _other."""
    figures = _attack(registry, 1_000_000)
    print("cardinality", figures)
    assert figures["rss_total_mb"] <= 50, figures
    assert figures["rss_after_warm_mb"] < 8, figures
