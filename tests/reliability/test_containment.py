"""Contained failures: a broken sink never changes what the application sees.

Each part of sqlprobe that can fail (the Prometheus accumulators, the span path, the
logger, the N+1 detector, the EXPLAIN worker, a pool observer such as the OTel pool
metrics) is made to raise in turn, on a SQLite
file, the real PostgreSQL and the real MariaDB. The application's workload must return
the same results and raise the same errors as without sqlprobe; every failure is
counted in ``sqlprobe_internal_errors_total{stage}`` and logged at most once per stage
per minute; and a long run on the error paths leaves no memory behind.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe._analysis._nplusone import Detector
from sqlprobe._core._contain import INTERNAL_ERROR_LOG_INTERVAL
from sqlprobe._sinks._prometheus import EngineSeries

from ..conftest import make_logger
from .conftest import (
    Raiser,
    RaisingLogger,
    RaisingSpanProcessor,
    rss_bytes,
    run_workload,
    samples_by,
    stage_errors,
)

SINKS = ["prometheus", "spans", "logger", "nplusone", "explain", "pool"]


def _broken_probe(
    sink: str,
    engine: Engine,
    registry: CollectorRegistry,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[sqlprobe.Probe, dict[str, Callable[[], int]], RaisingLogger | None, Callable[[], None]]:
    """Attach with one part broken.

    Returns the probe, per stage a function giving its injected failures so far, the
    raising logger if it is the broken part, and a function that waits until every
    failure has happened (the EXPLAIN worker's queue is drained).
    """
    settle: Callable[[], None] = lambda: None  # noqa: E731
    logger: Any = make_logger(logs)
    raising_logger: RaisingLogger | None = None
    kwargs: dict[str, Any] = {}
    if sink == "spans":
        provider = TracerProvider()
        processor = RaisingSpanProcessor()
        provider.add_span_processor(processor)
        kwargs["tracer_provider"] = provider
    elif sink == "logger":
        logger = raising_logger = RaisingLogger()
        kwargs["slow_query_threshold"] = 0  # every statement produces a slow_query event
    elif sink == "explain":
        kwargs.update(explain=True, slow_query_threshold=0)
    raiser = Raiser()
    # The statement and pool paths bind what they call at attach: break it before.
    if sink == "prometheus":
        monkeypatch.setattr(EngineSeries, "observe", raiser)
    elif sink == "nplusone":
        original = Detector.report

        def broken(self: Detector, *args: Any) -> None:
            original(self, *args)
            raiser()

        monkeypatch.setattr(Detector, "report", broken)
    elif sink == "pool":
        # A pool sink that fails (as the OTel pool metrics could) on every value: the
        # series' pending lists, which the hooks append each checkout's values to.
        class Failing(list[float]):
            def append(self, value: float) -> None:
                raiser()

        monkeypatch.setattr(
            EngineSeries, "pending", lambda self: tuple(Failing() for _ in range(5))
        )
    probe = sqlprobe.attach(engine, registry=registry, logger=logger, **kwargs)
    collector = probe.collector
    assert collector is not None
    counts: dict[str, Callable[[], int]]
    if sink == "prometheus":
        counts = {"collector": lambda: raiser.calls}
    elif sink == "spans":
        counts = {"otel": lambda: processor.raiser.calls}
    elif sink == "logger":
        assert raising_logger is not None
        rl = raising_logger
        counts = {
            "slowlog": lambda: rl.count("slow_query"),
            "nplusone": lambda: rl.count("n_plus_one"),
        }
    elif sink == "nplusone":
        assert collector.unit is not None, "the N+1 detector is not installed"
        counts = {"nplusone": lambda: raiser.calls}
    elif sink == "pool":
        counts = {"pool": lambda: raiser.calls}
    else:
        explainers = [s.explainer for s in collector.slow_sinks if getattr(s, "explainer", None)]
        assert explainers, "EXPLAIN is not installed"
        monkeypatch.setattr(explainers[0], "_plan", raiser)
        counts = {"explain": lambda: raiser.calls}
        settle = explainers[0].close  # stops the worker once its queue is done
    return probe, counts, raising_logger, settle


@pytest.mark.smoke
@pytest.mark.parametrize("sink", SINKS)
def test_broken_sink_changes_nothing_for_the_application(
    sink: str,
    db: Engine,
    registry: CollectorRegistry,
    logs: LogCapture,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With one sink raising, results and errors are those without sqlprobe, failures counted."""
    name = f"sp_rel_{unique}"
    bare = run_workload(db, name)
    assert any(isinstance(o, tuple) and o[0] == "integrity" for o in bare), bare

    probe, counts, raising_logger, settle = _broken_probe(sink, db, registry, logs, monkeypatch)
    try:
        watched = run_workload(db, name)
        settle()
        _check_counted(registry, logs, probe, counts, raising_logger, len(bare))
    finally:
        probe.detach()
    assert watched == bare


def _check_counted(
    registry: CollectorRegistry,
    logs: LogCapture,
    probe: sqlprobe.Probe,
    counts: dict[str, Callable[[], int]],
    raising_logger: RaisingLogger | None,
    outcomes: int,
) -> None:
    for stage, failures in counts.items():
        n = failures()
        assert n > 0, f"no failure was injected at stage {stage}"
        assert stage_errors(registry, stage) == n, stage
        if raising_logger is not None:
            attempts = raising_logger.count("internal_error", stage=stage)
        else:
            attempts = sum(
                1 for e in logs.entries if e["event"] == "internal_error" and e["stage"] == stage
            )
        assert attempts == 1, f"internal_error logged {attempts} times for stage {stage}"
    if "collector" not in counts:
        # The rest of sqlprobe kept measuring: every statement of the workload was counted.
        calls = samples_by(registry, "sqlprobe_statement_calls_total", "engine")
        assert calls.get(probe.name or "", 0) >= outcomes
    # The workload's three failures; MariaDB's has_table() also runs a DESCRIBE that
    # fails for a missing table and that SQLAlchemy swallows (operation SHOW).
    errors = samples_by(registry, "sqlprobe_query_errors_total", "operation")
    assert sum(n for op, n in errors.items() if op != "SHOW") == 3, errors


def test_internal_error_is_logged_once_per_stage_per_minute(
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Repeated failures of one stage log one event a minute and count every failure."""
    monkeypatch.setattr(EngineSeries, "observe", Raiser())
    probe = sqlprobe.attach(sqlite_engine, registry=registry, logger=make_logger(logs))
    collector = probe.collector
    assert collector is not None
    try:
        with sqlite_engine.connect() as conn:
            for i in range(50):
                assert conn.execute(text("SELECT :i"), {"i": i}).scalar() == i
            events = [e for e in logs.entries if e["event"] == "internal_error"]
            assert len(events) == 1
            assert events[0]["stage"] == "collector"
            assert events[0]["error"] == "Boom"
            assert events[0]["log_level"] == "error"
            # A minute later the stage may log again.
            limiter = collector.contain.limiter  # type: ignore[attr-defined]
            later = time.monotonic() + INTERNAL_ERROR_LOG_INTERVAL + 1
            limiter.clock = lambda: later
            conn.execute(text("SELECT 1")).scalar()
            conn.execute(text("SELECT 2")).scalar()
        events = [e for e in logs.entries if e["event"] == "internal_error"]
        assert len(events) == 2
        assert stage_errors(registry, "collector") == 52
    finally:
        probe.detach()


def _error_path_run(engine: Engine, n: int) -> int:
    """``n`` statements (one in twenty failing) on one connection; returns the failures."""
    failures = 0
    with engine.connect() as conn:
        for i in range(n):
            if i % 20 == 19:
                try:
                    conn.exec_driver_sql("SELEC broken")
                except DBAPIError:
                    failures += 1
                    conn.rollback()
            elif i % 2:
                assert conn.execute(text("SELECT :i"), {"i": i}).scalar() == i
            else:
                conn.exec_driver_sql("SELECT 1").scalar()
    return failures


#: Statements of the memory test: 20,000 in the default run, 100,000 with -m soak.
ERROR_PATH_STATEMENTS = int(os.environ.get("SQLPROBE_ERROR_PATH_STATEMENTS", "20000"))


def _memory_flat_on_error_paths(
    sqlite_engine: Engine, registry: CollectorRegistry, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = TracerProvider()
    processor = RaisingSpanProcessor()
    provider.add_span_processor(processor)
    logger = RaisingLogger(remember=False)
    observe, detect = Raiser(), Raiser()
    monkeypatch.setattr(EngineSeries, "observe", observe)
    make_callback = Detector._make_callback

    def broken_callback(self: Detector) -> Any:
        real = make_callback(self)

        def on_statement(*args: Any) -> None:
            real(*args)
            detect()

        return on_statement

    monkeypatch.setattr(Detector, "_make_callback", broken_callback)
    probe = sqlprobe.attach(
        sqlite_engine,
        registry=registry,
        logger=logger,
        tracer_provider=provider,
        slow_query_threshold=0,
    )
    collector = probe.collector
    assert collector is not None
    try:
        _error_path_run(sqlite_engine, 3000)  # warm every cache first
        gc.collect()
        blocks, rss = sys.getallocatedblocks(), rss_bytes()
        failed = _error_path_run(sqlite_engine, n)
        gc.collect()
        kept, rss_growth = sys.getallocatedblocks() - blocks, rss_bytes() - rss
        print("error paths", {"statements": n, "blocks_kept": kept, "rss_growth": rss_growth})
        # Anything left behind per statement would add at least n allocated blocks.
        assert kept < 1000, f"{kept} memory blocks kept after {n} failing statements"
        assert rss_growth < 8 * 1024 * 1024, f"RSS grew by {rss_growth} bytes"
        assert failed == n // 20
        assert stage_errors(registry, "collector") == observe.calls
        assert stage_errors(registry, "nplusone") == detect.calls
        assert stage_errors(registry, "otel") == processor.raiser.calls
        assert observe.calls >= n + 3000
        assert logger.counts.get("internal_error", 0) <= 4
    finally:
        probe.detach()


def test_memory_is_flat_on_error_paths(
    sqlite_engine: Engine, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20,000 statements with every sink raising leave no per-statement state behind."""
    _memory_flat_on_error_paths(sqlite_engine, registry, ERROR_PATH_STATEMENTS, monkeypatch)


@pytest.mark.soak
def test_memory_is_flat_on_error_paths_long(
    sqlite_engine: Engine, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100,000 statements with every sink raising leave no per-statement state behind."""
    _memory_flat_on_error_paths(sqlite_engine, registry, 100_000, monkeypatch)
