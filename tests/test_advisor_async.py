"""attach(AsyncEngine, index_advice=True): the advisor drives the async driver itself.

Each test's application connection gets its set-up from a pool ``connect`` handler (a
``search_path`` on PostgreSQL, a SQL function on SQLite) that the statement cannot run
without, so advice proves the advisor's own connection ran the application's handlers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, event, text
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import LogCapture

import sqlprobe

from .conftest import PG_URL, _need, make_logger

PG_ASYNC = {
    "asyncpg": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    "psycopg_async": "postgresql+psycopg_async://postgres@127.0.0.1:5432/test",
}


async def _advice(logs: LogCapture, seconds: float = 30.0) -> dict[str, Any]:
    """The one index_advice event, waited for without blocking the event loop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [e for e in logs.entries if e["event"] == "index_advice"]
        if found:
            (advice,) = found
            return advice
        await asyncio.sleep(0.05)
    pytest.fail(f"no index_advice in {[e['event'] for e in logs.entries]}")


def _run_connect_handler(engine: Any, sql: str) -> None:
    """A pool ``connect`` handler running ``sql`` on each new connection (committed)."""

    @event.listens_for(engine.sync_engine, "connect")
    def _setup(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(sql)
        cursor.close()
        dbapi_connection.commit()


@pytest.mark.postgres
@pytest.mark.parametrize("driver", sorted(PG_ASYNC))
async def test_async_postgresql_advice_is_proven_with_hypopg(
    driver: str, registry: CollectorRegistry, unique: str
) -> None:
    """On asyncpg and psycopg's async mode, a slow SELECT gets hypopg-proven advice from a
    connection that ran the application's connect handler (its search_path)."""
    _need(5432, "PostgreSQL")
    pytest.importorskip(driver.split("_")[0])
    schema, table = f"advasync_{unique}", f"parcels_{unique}"
    setup = create_engine(PG_URL)
    with setup.begin() as conn:
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS hypopg"))
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f"CREATE TABLE {schema}.{table} (id int PRIMARY KEY, k int, v text)"))
        conn.execute(
            text(
                f"INSERT INTO {schema}.{table} "
                "SELECT g, g % 20000, 'x' FROM generate_series(1, 60000) g"
            )
        )
        conn.execute(text(f"ANALYZE {schema}.{table}"))
    engine = create_async_engine(PG_ASYNC[driver])
    # The table is only found through this search_path: the advisor must run the handler.
    _run_connect_handler(engine, f"SET search_path TO {schema}, public")
    logs = LogCapture()
    probe = sqlprobe.attach(
        engine, registry=registry, logger=make_logger(logs), index_advice=True,
        slow_query_threshold=0, name="advasync",
    )  # fmt: skip
    try:
        async with engine.connect() as conn:
            (await conn.execute(text(f"SELECT v FROM {table} WHERE k = :k"), {"k": 7})).all()
        advice = await _advice(logs)
        assert advice["table"] == table and advice["columns"] == ["k"]
        assert advice["proven"] is True and advice["proof"] == "hypopg"
        assert advice["cost_after"] < advice["cost_before"] / 10
        assert advice["ddl"] == f"CREATE INDEX CONCURRENTLY ix_{table}_k ON {table} (k)"
        assert "test_advisor_async.py:" in advice["source"]
        value = registry.get_sample_value(
            "sqlprobe_index_advice_info",
            {"engine": "advasync", "table": table, "columns": "k", "proven": "true"},
        )
        assert value == 1.0
        assert not [e for e in logs.entries if e["event"] == "internal_error"]
    finally:
        probe.detach()
        await engine.dispose()
        with setup.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        setup.dispose()


async def test_aiosqlite_advice_from_the_plan(
    tmp_path: Path, registry: CollectorRegistry, unique: str
) -> None:
    """On aiosqlite, a slow SELECT gets plan-proven advice (its time limit set through
    aiosqlite), from a connection that has the application's SQL function."""
    pytest.importorskip("aiosqlite")
    path = tmp_path / f"advasync_{unique}.db"
    setup = create_engine(f"sqlite:///{path}")
    with setup.begin() as conn:
        conn.execute(text("CREATE TABLE parcels (id INTEGER PRIMARY KEY, k INTEGER, v TEXT)"))
        conn.execute(
            text(
                "INSERT INTO parcels (k, v) WITH RECURSIVE s(i) AS "
                "(SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 5000) "
                "SELECT i, 'x' || i FROM s"
            )
        )
    setup.dispose()
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

    # Without this function the statement cannot even be planned.
    @event.listens_for(engine.sync_engine, "connect")
    def _functions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("zone", 1, lambda v: "eu")

    logs = LogCapture()
    probe = sqlprobe.attach(
        engine, registry=registry, logger=make_logger(logs), index_advice=True,
        slow_query_threshold=0, name="advlite",
    )  # fmt: skip
    try:
        async with engine.connect() as conn:
            sql = "SELECT v FROM parcels WHERE k = :k AND zone(v) = 'eu'"
            (await conn.execute(text(sql), {"k": 7})).all()
        advice = await _advice(logs)
        assert advice["table"] == "parcels" and advice["columns"] == ["k"]
        assert advice["proven"] is True and advice["proof"] == "plan"
        assert advice["ddl"] == "CREATE INDEX ix_parcels_k ON parcels (k)"
        assert advice["cost_before"] is None and advice["cost_after"] is None
        assert (
            registry.get_sample_value(
                "sqlprobe_index_advice_info",
                {"engine": "advlite", "table": "parcels", "columns": "k", "proven": "true"},
            )
            == 1.0
        )
        assert not [e for e in logs.entries if e["event"] == "internal_error"]
    finally:
        probe.detach()
        await engine.dispose()
