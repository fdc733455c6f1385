"""attach(index_advice=True): slow SELECTs reach the advisor; its advice reaches users."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe import _state

from .conftest import PG_URL, _need, make_logger


def _wait(predicate: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.05)


def test_slow_select_gets_index_advice_in_log_metrics_and_later_events(
    registry: CollectorRegistry, unique: str
) -> None:
    """A slow SELECT on an unindexed column yields one index_advice event, the info metric
    and an index_advice field on the shape's later slow_query events."""
    _need(5432, "PostgreSQL")
    table = f"wire_{unique}"
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS hypopg"))
        conn.execute(text(f"CREATE TABLE {table} (id int PRIMARY KEY, k int, v text)"))
        conn.execute(
            text(f"INSERT INTO {table} SELECT g, g % 20000, 'x' FROM generate_series(1, 60000) g")
        )
        conn.execute(text(f"ANALYZE {table}"))
    logs = LogCapture()
    probe = sqlprobe.attach(
        engine, registry=registry, logger=make_logger(logs), index_advice=True,
        slow_query_threshold=0, name="wire",
    )  # fmt: skip
    try:
        query = text(f"SELECT v FROM {table} WHERE k = :k")
        with engine.connect() as conn:
            conn.execute(query, {"k": 7}).all()
        _wait(lambda: any(e["event"] == "index_advice" for e in logs.entries))
        (advice,) = [e for e in logs.entries if e["event"] == "index_advice"]
        assert advice["table"] == table and advice["columns"] == ["k"]
        assert advice["proven"] is True
        assert advice["ddl"].startswith("CREATE INDEX CONCURRENTLY")
        assert advice["cost_after"] < advice["cost_before"] / 10
        assert "test_advice_wiring.py:" in advice["source"]
        value = registry.get_sample_value(
            "sqlprobe_index_advice_info",
            {"engine": "wire", "table": table, "columns": "k", "proven": "true"},
        )
        assert value == 1.0
        with engine.connect() as conn:
            conn.execute(query, {"k": 8}).all()
        slow = [e for e in logs.entries if e["event"] == "slow_query" and table in e["statement"]]
        assert "index_advice" not in slow[0]
        assert slow[-1]["index_advice"]["columns"] == ["k"]
        # The advisor's own engine is not one of the application's.
        assert all(p.engine is not None for p in _state.probes.values())
    finally:
        probe.detach()
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))
        engine.dispose()


def test_sqlprobe_advise_is_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """`sqlprobe advise` reaches the advisor's CLI: its errors are one line, status 2."""
    from sqlprobe.cli import main

    assert main(["advise", "--url", "sqlite://"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sqlprobe advise: error:")


def _sqlite_table(path: Path) -> Engine:
    """A SQLite file with a 5000-row table ``parcels`` whose ``k`` has no index."""
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE parcels (id INTEGER PRIMARY KEY, k INTEGER, v TEXT)"))
        conn.execute(
            text(
                "INSERT INTO parcels (k, v) WITH RECURSIVE s(i) AS "
                "(SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 5000) SELECT i, 'x' FROM s"
            )
        )
    engine.dispose()  # every later connection is new: it runs the connect handlers
    return engine


def _advisor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sqlprobe-index-advisor"]


def test_fast_statements_never_reach_the_advisor(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    """Off: no advice sink at all. On: statements under the slow-query threshold (even one
    an index would fix, seen once) never reach it, start no worker and get no advice."""
    from sqlprobe._analysis._advisor import AdviceSink

    engine = _sqlite_table(tmp_path / "fast.db")
    before = len(_advisor_threads())
    logs = LogCapture()
    try:
        off = sqlprobe.attach(engine, registry=registry, name="off", slow_query_threshold=0)
        assert off.collector is not None
        sinks = off.collector.slow_sinks + off.collector.sinks
        assert not [s for s in sinks if isinstance(s, AdviceSink)]
        off.detach()
        probe = sqlprobe.attach(
            engine, registry=registry, logger=make_logger(logs), index_advice=True,
            slow_query_threshold=10.0, name="fast",
        )  # fmt: skip
        assert probe.collector is not None
        (sink,) = [s for s in probe.collector.slow_sinks if isinstance(s, AdviceSink)]
        assert sink not in probe.collector.sinks  # the per-statement sinks
        calls = []
        real = sink.on_statement
        sink.on_statement = lambda record: (calls.append(record), real(record))  # type: ignore[method-assign]
        with engine.connect() as conn:
            conn.execute(text("SELECT v FROM parcels WHERE k = :k"), {"k": 7}).all()
            for n in range(50):
                conn.execute(text("SELECT v FROM parcels WHERE id = :i"), {"i": n}).all()
        time.sleep(0.2)
        assert calls == []
        assert sink.advisor._thread is None and len(_advisor_threads()) == before
        assert not [e for e in logs.entries if e["event"] == "index_advice"]
        probe.detach()
    finally:
        engine.dispose()


def test_sync_advisor_connection_runs_the_pool_connect_handlers(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    """The advisor's connection has what the application's connect handler sets up (a SQL
    function the statement calls), so the statement is advised; nothing is contained."""
    engine = _sqlite_table(tmp_path / "handlers.db")

    @event.listens_for(engine, "connect")
    def _functions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("zone", 1, lambda v: "eu")

    logs = LogCapture()
    probe = sqlprobe.attach(
        engine, registry=registry, logger=make_logger(logs), index_advice=True,
        slow_query_threshold=0, name="handlers",
    )  # fmt: skip
    try:
        with engine.connect() as conn:
            sql = "SELECT v FROM parcels WHERE k = :k AND zone(v) = 'eu'"
            conn.execute(text(sql), {"k": 7}).all()
        _wait(lambda: any(e["event"] == "index_advice" for e in logs.entries))
        (advice,) = [e for e in logs.entries if e["event"] == "index_advice"]
        assert (advice["table"], advice["columns"], advice["proof"]) == ("parcels", ["k"], "plan")
        assert not [e for e in logs.entries if e["event"] == "internal_error"]
    finally:
        probe.detach()
        engine.dispose()
