"""The slow_query event: fields, source location, trace ids, redaction, rate limiting."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from sqlalchemy import bindparam, create_engine, text
from sqlalchemy.engine import Engine
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe._core._fingerprint import analyze
from sqlprobe._core._frames import SourceFinder
from sqlprobe._sinks._slowlog import (
    EVENTS_PER_ENGINE,
    EVENTS_PER_FINGERPRINT,
    PARAMETER_MAX_CHARS,
    RATE_INTERVAL,
    STATEMENT_MAX_CHARS,
    RateLimiter,
    SlowQueryLog,
)

pytestmark = pytest.mark.smoke

FIELDS = {
    "engine",
    "operation",
    "table",
    "fingerprint",
    "statement",
    "duration_ms",
    "threshold_ms",
    "rows",
    "source",
    "suppressed",
}


def here(file: str = __file__) -> str:
    """A test file's path as ``source`` shows it (relative to the cwd when under it)."""
    path = os.path.abspath(file)
    cwd = os.getcwd() + os.sep
    return path[len(cwd) :] if path.startswith(cwd) else path


def line_after() -> int:
    """The line number of the caller's next line."""
    return sys._getframe(1).f_lineno + 1


def slow_events(logs: LogCapture) -> list[dict[str, Any]]:
    return [e for e in logs.entries if e["event"] == "slow_query"]


def sink_of(probe: sqlprobe.Probe) -> SlowQueryLog:
    assert probe.collector is not None
    return next(s for s in probe.collector.slow_sinks if isinstance(s, SlowQueryLog))


@pytest.mark.postgres
def test_pg_sleep_statements_give_one_complete_event_each(
    pg_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """Each pg_sleep(0.2) statement over 0.1 s logs one slow_query with every field right."""
    probe = sqlprobe.attach(pg_engine, registry=registry, logger=logger, slow_query_threshold=0.1)
    sql = "SELECT pg_sleep(0.2), relname FROM pg_class WHERE relname = :name LIMIT 1"
    lines = []
    with pg_engine.connect() as conn:
        for _ in range(2):
            lines.append(line_after())
            conn.execute(text(sql), {"name": "pg_class"}).all()
        for _ in range(5):
            conn.execute(text("SELECT 1")).all()
    probe.detach()

    events = slow_events(logs)
    assert len(events) == 2
    stmt = events[0]["statement"]
    shape = analyze(stmt)
    for event, line in zip(events, lines, strict=True):
        assert set(event) == FIELDS | {"event", "level", "log_level"}
        assert event["level"] == "warning"
        assert event["engine"] == "postgresql://127.0.0.1:5432/test"
        assert event["operation"] == "SELECT"
        assert event["table"] == "pg_class"
        assert event["fingerprint"] == shape.fingerprint
        assert event["statement"] == shape.normalized
        assert "pg_class'" not in event["statement"] and "?" in event["statement"]
        assert 200.0 <= event["duration_ms"] < 1000.0
        assert event["threshold_ms"] == 100.0
        assert event["rows"] is None  # a SELECT's rowcount is not read
        assert (
            event["source"]
            == f"{here()}:{line} in test_pg_sleep_statements_give_one_complete_event_each"
        )
        assert event["suppressed"] == 0


def test_fast_statements_never_reach_the_sink(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """Below the threshold nothing of the slow-query log runs: no event, no rate state."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, logger=logger)
    sink = sink_of(probe)
    assert probe.collector is not None and sink not in probe.collector.sinks
    with sqlite_engine.connect() as conn:
        for i in range(200):
            conn.execute(text("SELECT :i"), {"i": i})
    assert slow_events(logs) == []
    assert len(sink.limiter) == 0
    probe.detach()
    # Detached, not even a statement over the threshold reaches the sink.
    assert "do_execute" not in vars(sqlite_engine.dialect)
    with sqlite_engine.connect() as conn:
        conn.connection.driver_connection.create_function("nap", 1, time.sleep)
        conn.execute(text("SELECT nap(0.15)"))
    assert slow_events(logs) == []
    assert len(sink.limiter) == 0


def test_failed_slow_statement_names_its_error(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """A failed statement over the threshold is logged with its exception class."""
    sqlprobe.attach(sqlite_engine, registry=registry, logger=logger, slow_query_threshold=0)
    with sqlite_engine.connect() as conn, pytest.raises(Exception, match="no such table"):
        conn.execute(text("SELECT * FROM missing_table WHERE v = 'x'"))
    (event,) = [e for e in slow_events(logs) if e["table"] == "missing_table"]
    assert event["error"] == "OperationalError"
    assert event["rows"] is None
    assert event["statement"] == "SELECT * FROM missing_table WHERE v = ?"


def test_trace_and_span_ids_of_the_active_span(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """With a span active the event carries its trace_id and span_id in hex; without, neither."""
    sqlprobe.attach(sqlite_engine, registry=registry, logger=logger, slow_query_threshold=0)
    tracer = TracerProvider().get_tracer("test")
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        with tracer.start_as_current_span("request") as span:
            conn.execute(text("SELECT 2 AS traced"))
    untraced, traced = (e for e in slow_events(logs) if e["operation"] == "SELECT")
    ctx = span.get_span_context()
    assert traced["trace_id"] == f"{ctx.trace_id:032x}"
    assert traced["span_id"] == f"{ctx.span_id:016x}"
    assert "trace_id" not in untraced and "span_id" not in untraced


def test_long_statements_are_truncated(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """The statement text is cut to STATEMENT_MAX_CHARS characters."""
    sqlprobe.attach(sqlite_engine, registry=registry, logger=logger, slow_query_threshold=0)
    columns = ", ".join(f"{i} AS column_number_{i}" for i in range(300))
    with sqlite_engine.connect() as conn:
        conn.execute(text(f"SELECT {columns}"))
    (event,) = slow_events(logs)
    assert len(event["statement"]) == STATEMENT_MAX_CHARS
    assert event["statement"].endswith("...")


SENTINEL = "SENTINEL-7f3a"


def _run_secret_statements(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE accounts (name TEXT, password TEXT, note TEXT)"))
        conn.execute(
            text("INSERT INTO accounts VALUES (:name, :password, :note)"),
            [{"name": f"u{i}", "password": SENTINEL, "note": SENTINEL} for i in range(3)],
        )
        conn.execute(text(f"SELECT * FROM accounts WHERE note = '{SENTINEL}'"))
        conn.execute(
            text("SELECT * FROM accounts WHERE password = :pw AND note = :n"),
            {"pw": SENTINEL, "n": SENTINEL},
        )
        conn.exec_driver_sql("SELECT * FROM accounts WHERE note = ?", (SENTINEL,))
        with pytest.raises(Exception, match="no such column"):
            conn.execute(text(f"SELECT nope FROM accounts WHERE note = '{SENTINEL}'"))


def test_secrets_never_appear_by_default(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """Sentinel values in literals and parameters appear in no event with the defaults."""
    sqlprobe.attach(sqlite_engine, registry=registry, logger=logger, slow_query_threshold=0)
    _run_secret_statements(sqlite_engine)
    assert len(slow_events(logs)) >= 6
    assert all("parameters" not in e for e in logs.entries)
    assert SENTINEL not in repr(logs.entries)


def test_capture_parameters_redacts_sensitive_keys(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """capture_parameters=True logs parameters with sensitive names redacted, values truncated."""
    sqlprobe.attach(
        sqlite_engine,
        registry=registry,
        logger=logger,
        slow_query_threshold=0,
        capture_parameters=True,
    )
    long_value = "x" * (PARAMETER_MAX_CHARS + 50)
    with sqlite_engine.connect() as conn:
        stmt = text("SELECT :name, :api_key, :Auth_Token, :note").bindparams(
            bindparam("name"), bindparam("api_key"), bindparam("Auth_Token"), bindparam("note")
        )
        conn.execute(
            stmt, {"name": "ann", "api_key": SENTINEL, "Auth_Token": SENTINEL, "note": long_value}
        )
        conn.exec_driver_sql("SELECT ?, ?", (SENTINEL, 2))
        conn.exec_driver_sql("SELECT ? AS plain, ?", ("visible", 2))
        conn.execute(text("CREATE TABLE creds (user_password TEXT, k INTEGER)"))
        conn.execute(
            text("INSERT INTO creds VALUES (:user_password, :k)"),
            [{"user_password": SENTINEL, "k": i} for i in range(8)],
        )
    events = slow_events(logs)
    named = events[0]
    assert named["statement"] == "SELECT ?, ?, ?, ?"
    # SQLite is positional (qmark): positions keep their order, names come from the compiled
    # statement.
    assert named["parameters"] == [
        "ann",
        "[REDACTED]",
        "[REDACTED]",
        f"{'x' * PARAMETER_MAX_CHARS}...(+50 chars)",
    ]
    raw = [e["parameters"] for e in events if e["statement"] == "SELECT ?, ?"]
    assert raw == [[SENTINEL, 2]]  # no names, no sensitive word: the user asked for parameters
    batch = next(e for e in events if e["operation"] == "INSERT")
    assert batch["parameters"][:5] == [["[REDACTED]", i] for i in range(5)]
    assert batch["parameters"][5] == "...+3 more rows"
    assert SENTINEL not in repr([e for e in events if e["statement"] != "SELECT ?, ?"])


@pytest.mark.mariadb
def test_capture_parameters_named_paramstyle(
    mysql_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """Named (pyformat) parameters keep their keys; sensitive ones are redacted."""
    sqlprobe.attach(
        mysql_engine,
        registry=registry,
        logger=logger,
        slow_query_threshold=0,
        capture_parameters=True,
    )
    with mysql_engine.connect() as conn:
        conn.execute(
            text("SELECT :user_name, :PassWord, :client_secret"),
            {"user_name": "bo", "PassWord": SENTINEL, "client_secret": SENTINEL},
        )
        conn.execute(text("CREATE TEMPORARY TABLE logins (user_name TEXT, api_key TEXT)"))
        conn.execute(
            text("INSERT INTO logins VALUES (:user_name, :api_key)"),
            [{"user_name": f"u{i}", "api_key": SENTINEL} for i in range(2)],
        )
    (event,) = [e for e in slow_events(logs) if e["statement"].startswith("SELECT ?")]
    assert event["parameters"] == {
        "user_name": "bo",
        "PassWord": "[REDACTED]",
        "client_secret": "[REDACTED]",
    }
    (batch,) = [e for e in slow_events(logs) if e["operation"] == "INSERT"]
    assert batch["parameters"] == [
        {"user_name": "u0", "api_key": "[REDACTED]"},
        {"user_name": "u1", "api_key": "[REDACTED]"},
    ]
    assert SENTINEL not in repr(logs.entries)


def test_burst_is_rate_limited_and_suppressed_counts_add_up(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """1,000 slow statements of one shape give the per-fingerprint cap; the rest are counted."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, logger=logger, slow_query_threshold=0)
    limiter = sink_of(probe).limiter
    with sqlite_engine.connect() as conn:
        for i in range(1000):
            conn.exec_driver_sql(f"SELECT {i} AS burst")
        events = [e for e in slow_events(logs) if "burst" in e["statement"]]
        assert len(events) == EVENTS_PER_FINGERPRINT
        base = time.monotonic()
        limiter.clock = lambda: base + RATE_INTERVAL + 1
        conn.exec_driver_sql("SELECT 1000 AS burst")
    events = [e for e in slow_events(logs) if "burst" in e["statement"]]
    assert len(events) == EVENTS_PER_FINGERPRINT + 1
    assert sum(e["suppressed"] for e in events) + len(events) == 1001
    assert events[-1]["suppressed"] == 1000 - EVENTS_PER_FINGERPRINT


def test_rate_limiter_global_cap_and_bounded_table() -> None:
    """The engine-wide cap holds across fingerprints and the fingerprint table stays bounded."""
    now = [0.0]
    limiter = RateLimiter(max_keys=50, clock=lambda: now[0])
    admitted = sum(limiter.admit(f"fp{i}") is not None for i in range(EVENTS_PER_ENGINE * 3))
    assert admitted == EVENTS_PER_ENGINE
    assert len(limiter) == 50
    now[0] += RATE_INTERVAL
    assert limiter.admit(f"fp{EVENTS_PER_ENGINE * 3 - 1}") == 1  # its dropped event is reported


def test_source_skips_library_frames() -> None:
    """Frames of the stdlib, SQLAlchemy and sqlprobe are library frames; this test's is not."""
    import copy

    import sqlalchemy.engine.base as sa_base

    import sqlprobe._probe as own

    finder = SourceFinder()
    assert not finder.is_library(sys._getframe())
    seen: list[tuple[str, bool, str]] = []

    class Grab:
        def __deepcopy__(self, memo: Any) -> Grab:
            caller = sys._getframe(1)  # copy.deepcopy's frame: the stdlib calls us
            seen.append((caller.f_code.co_name, finder.is_library(caller), finder.source(caller)))
            return self

    line = line_after()
    copy.deepcopy(Grab())
    assert seen == [("deepcopy", True, f"{here()}:{line} in test_source_skips_library_frames")]
    for module in (sa_base, own):
        assert module.__file__ is not None
        assert finder._decide(module.__file__, "") is True


def test_works_on_a_file_database_other_engine(
    tmp_path: Any, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """Two engines log under their own engine names."""
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        sqlprobe.attach(
            engine, registry=registry, logger=logger, slow_query_threshold=0, name="files"
        )
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert {e["engine"] for e in slow_events(logs)} == {"files"}
    finally:
        engine.dispose()


def test_span_ids_are_the_statements_own_span(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """With sqlprobe's tracing on, span_id is the statement's span, inside the active trace."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sqlprobe.attach(
        sqlite_engine,
        registry=registry,
        logger=logger,
        slow_query_threshold=0,
        tracer_provider=provider,
    )
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request") as root, sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 3 AS spanned"))
    (event,) = [e for e in slow_events(logs) if "spanned" in e["statement"]]
    (db_span,) = [s for s in exporter.get_finished_spans() if s.name != "request"]
    assert event["span_id"] == f"{db_span.context.span_id:016x}"
    assert event["trace_id"] == f"{root.get_span_context().trace_id:032x}"
    assert event["span_id"] != f"{root.get_span_context().span_id:016x}"
