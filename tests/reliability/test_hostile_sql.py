"""Hostile SQL end to end: huge statements and garbage through an attached engine.

The normalizer's own properties (never raises, deterministic, linear cost) are tested
in ``tests/test_fingerprint*.py``; here the same inputs go through a real engine with
the whole agent on, and what the application and the operator see is checked: the
same result or the same database error as without sqlprobe, bounded time, and labels,
span attributes and log fields cut to their limits.
"""

from __future__ import annotations

import gc
import random
import time
import tracemalloc
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe._core import _collector
from sqlprobe._sinks._otel import QUERY_TEXT_MAX
from sqlprobe._sinks._prometheus import INFO_STATEMENT_LIMIT
from sqlprobe._sinks._slowlog import STATEMENT_MAX_CHARS

from ..conftest import make_logger
from .conftest import samples_by

MB = 1024 * 1024


def _probe(engine: Engine, registry: CollectorRegistry, logs: LogCapture) -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    probe = sqlprobe.attach(
        engine,
        registry=registry,
        logger=make_logger(logs),
        tracer_provider=provider,
        slow_query_threshold=0,
    )
    return probe, exporter


def _timed(engine: Engine, statement: str) -> tuple[Any, float]:
    with engine.connect() as conn:
        start = time.perf_counter()
        value = conn.exec_driver_sql(statement).scalar()
        return value, time.perf_counter() - start


HUGE = {
    # A 10 MB string literal: the normalized text is short.
    "literal": "SELECT length('" + "x" * (10 * MB) + "')",
    # A 10 MB comment.
    "comment": "SELECT 7 /* " + "c" * (10 * MB) + " */",
    # A 10 MB quoted identifier: a name, so it stays in the normalized text.
    "identifier": 'SELECT 7 AS "' + "i" * (10 * MB) + '"',
}


@pytest.mark.parametrize("kind", sorted(HUGE))
def test_huge_statement_is_bounded_in_time_and_output(
    kind: str, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """A 10 MB statement costs sqlprobe bounded time; labels, spans and logs are cut."""
    statement = HUGE[kind]
    engine = create_engine("sqlite://")
    try:
        bare_value, bare_time = _timed(engine, statement)
        probe, exporter = _probe(engine, registry, logs)
        value, watched_time = _timed(engine, statement)
        again, _ = _timed(engine, statement)
        assert value == again == bare_value
        # The normalizer alone takes well under a second for 10 MB (tests/test_fingerprint*);
        # the whole agent (spans, slow log) on a loaded 2-core machine, under two.
        assert watched_time - bare_time < 2.0, (bare_time, watched_time)

        collector = probe.collector
        # Not cached: a huge text would stay alive for as long as the cache keeps it.
        assert collector.cache_size()[1] <= _collector.CACHE_MAX_STATEMENT * 4
        calls = samples_by(registry, "sqlprobe_statement_calls_total", "fingerprint")
        assert sorted(calls.values())[-1] == 2  # both runs, one shape
        text = generate_latest(registry).decode()
        assert len(text) < 64 * 1024
        for metric in registry.collect():
            for s in metric.samples:
                if s.name == "sqlprobe_statement_info":
                    assert len(s.labels["statement"]) <= INFO_STATEMENT_LIMIT
        slow = [e for e in logs.entries if e["event"] == "slow_query"]
        assert len(slow) == 2
        for event in slow:
            assert len(event["statement"]) <= STATEMENT_MAX_CHARS
            assert all(len(repr(v)) <= STATEMENT_MAX_CHARS + 2 for v in event.values())
        assert not [e for e in logs.entries if e["event"] == "internal_error"]
        spans = exporter.get_finished_spans()
        assert len(spans) == 2
        for span in spans:
            assert "xxxxxxxxxx" not in str(span.attributes)  # the literal's value
            assert span.attributes is not None
            assert len(str(span.attributes["db.query.text"])) <= QUERY_TEXT_MAX
        probe.detach()
    finally:
        engine.dispose()


GARBAGE = [
    "",
    " ",
    ";",
    "SELEC 1",
    "SELECT 'unterminated",
    'SELECT "unterminated',
    "SELECT 1 /* unterminated comment",
    "SELECT $$unterminated dollar",
    "SELECT $a$ x $b$",
    "SELECT " + "(" * 5000 + "1" + ")" * 4999,
    "SELECT " + "'" * 9999,
    "SELECT " + "\\" * 10000,
    "SELECT 1 \x00 FROM t",
    "SELECT '\x00'",
    "SELECT \u202e 1 \ufeff",
    "SELECT '😀' || '\u0301'",
    "SELECT %s %(x)s :name ? $1",
    "SELECT 1e999999999",
    "SELECT 0x",
    "SELECT 1 FROM t WHERE x IN (" + ",".join("1" for _ in range(100_000)),
    "INSERT INTO t VALUES " + "(1)," * 10000,
    "-- only a comment",
    "/* */ /* */",
    "\ud800",
    "SELECT 'a' FROM \x1b[31m red",
]


def _garbage(seed: int, n: int) -> list[str]:
    """Random SQL-ish strings: keywords, quotes, comment markers, placeholders, bytes."""
    rnd = random.Random(seed)
    atoms = [
        "SELECT", "FROM", "WHERE", "IN", "(", ")", "'", '"', "`", "$$", "$1", "?", "%s",
        ":x", "--", "/*", "*/", "\n", "\\", ",", "1", "1.5e3", "x'AB'", "E'", ";", "::",
        "VALUES", "SAVEPOINT", "é", "\x00", "\t", "WITH", "AS", "N'", "#",
    ]  # fmt: skip
    out = []
    for _ in range(n):
        parts = [rnd.choice(atoms) for _ in range(rnd.randint(1, 30))]
        if rnd.random() < 0.3:
            parts.append(bytes(rnd.randrange(256) for _ in range(20)).decode("latin-1"))
        out.append(" ".join(parts))
    return out


def _run_all(engine: Engine, statements: list[str]) -> list[Any]:
    """Each statement's scalar result, or its error as (class, driver class, message)."""
    out: list[Any] = []
    with engine.connect() as conn:
        for statement in statements:
            try:
                result = conn.exec_driver_sql(statement)
                out.append(("ok", result.fetchall() if result.returns_rows else result.rowcount))
                conn.commit()
            except Exception as exc:  # anything: it must be the same exception either way
                orig = getattr(exc, "orig", None)
                out.append((type(exc).__name__, type(orig).__name__, str(orig or exc)))
                conn.rollback()
    return out


def test_garbage_sql_raises_the_database_error_unchanged(
    db: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Statements the database rejects raise its error unchanged; sqlprobe fails nowhere."""
    statements = GARBAGE + _garbage(seed=20261125, n=150)
    bare = _run_all(db, statements)
    probe, exporter = _probe(db, registry, logs)
    try:
        watched = _run_all(db, statements)
        assert watched == bare
        assert samples_by(registry, "sqlprobe_internal_errors_total", "stage") == {}
        assert not [e for e in logs.entries if e["event"] == "internal_error"]
        failures = sum(1 for o in bare if o[0] != "ok")
        assert failures > len(statements) // 2
        counted = samples_by(registry, "sqlprobe_query_errors_total", "engine")
        # Statements the driver refuses before sending them (a NUL byte, a lone
        # surrogate) never reach the dialect and are not statements the database ran.
        assert failures - 10 <= counted[probe.name] <= failures
        for metric in registry.collect():
            for s in metric.samples:
                if s.name == "sqlprobe_statement_info":
                    assert len(s.labels["statement"]) <= INFO_STATEMENT_LIMIT
        for event in logs.entries:
            if event["event"] == "slow_query":
                assert len(event["statement"]) <= STATEMENT_MAX_CHARS
        assert exporter.get_finished_spans()
    finally:
        probe.detach()


def test_huge_distinct_statements_keep_no_large_text(
    registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Distinct 1 MB statements with the whole agent on leave no large text in sqlprobe."""
    engine = create_engine("sqlite://")
    probe, exporter = _probe(engine, registry, logs)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1").scalar()
            tracemalloc.start(25)
            try:
                for i in range(12):
                    name = f"{i}" + "n" * MB
                    assert conn.exec_driver_sql(f'SELECT 7 AS "{name}"').scalar() == 7
                    exporter.clear()
                gc.collect()
                snapshot = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
        mine = snapshot.filter_traces([tracemalloc.Filter(True, "*/sqlprobe/*", all_frames=True)])
        held = sum(stat.size for stat in mine.statistics("filename"))
        assert held < 2 * MB, f"sqlprobe holds {held} bytes after 12 distinct 1 MB statements"
    finally:
        probe.detach()
        engine.dispose()
