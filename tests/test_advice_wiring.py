"""attach(index_advice=True): slow SELECTs reach the advisor; its advice reaches users."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
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
