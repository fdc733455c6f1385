"""explain=True: plans of slow SELECTs captured off-thread, on PostgreSQL, MariaDB and SQLite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe._analysis._explain import Explainer

from .test_slowlog import SENTINEL, sink_of, slow_events

pytestmark = pytest.mark.smoke


def wait_for(logs: LogCapture, marker: str, count: int = 1, timeout: float = 10.0) -> list[Any]:
    """The slow_query events whose statement contains ``marker``, once ``count`` arrived."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in slow_events(logs) if marker in e["statement"]]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def explainer_of(probe: sqlprobe.Probe) -> Explainer:
    explainer = sink_of(probe).explainer
    assert isinstance(explainer, Explainer)
    return explainer


@pytest.fixture
def pg_big(pg_engine: Engine, unique: str) -> Iterator[str]:
    """A 100k-row table without indexes on PostgreSQL, dropped afterwards."""
    name = f"big_{unique}"
    with pg_engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE {name} AS SELECT g AS id, md5(g::text) AS v "
                "FROM generate_series(1, 100000) AS g"
            )
        )
        conn.execute(text(f"ANALYZE {name}"))
    yield name
    with pg_engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {name}"))


@pytest.mark.postgres
def test_pg_seq_scan_plan_names_the_scan_and_table(
    pg_engine: Engine, pg_big: str, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """A slow SELECT scanning a 100k-row table gets a plan naming Seq Scan and the table."""
    probe = sqlprobe.attach(
        pg_engine, registry=registry, logger=logger, slow_query_threshold=0, explain=True
    )
    sql = f"SELECT count(*) FROM {pg_big} WHERE v LIKE :pattern OR id = :id"
    with pg_engine.connect() as conn:
        trans = conn.begin()
        conn.execute(text(f"INSERT INTO {pg_big} VALUES (-1, 'app-row')"))
        count = conn.execute(text(sql), {"pattern": "app-%", "id": -2}).scalar_one()
        (event,) = wait_for(logs, "count(*)")
        # The application's transaction and result are untouched by the EXPLAIN.
        assert count == 1
        assert conn.in_transaction() and trans.is_active
        assert conn.execute(text(f"SELECT count(*) FROM {pg_big} WHERE id = -1")).scalar() == 1
        trans.rollback()
        assert conn.execute(text(f"SELECT count(*) FROM {pg_big} WHERE id = -1")).scalar() == 0
    plan = event["plan"]
    assert pg_big in plan["seq_scans"]
    assert plan["node"] in ("Aggregate", "Finalize Aggregate")
    assert plan["cost"] > 1000 and plan["rows"] == 1
    assert plan["cached"] is False
    assert '"Seq Scan"' in repr(plan["full"]).replace("'", '"')
    # Values from the statement's parameters are scrubbed from the full plan by default.
    assert "app-" not in repr(plan["full"])
    # The EXPLAIN used a connection of its own: the application's pool only ever opened one.
    assert pg_engine.pool.checkedin() == 1
    explainer = explainer_of(probe)
    probe.detach()
    assert explainer.thread is not None and not explainer.thread.is_alive()


@pytest.mark.postgres
def test_pg_explain_failure_still_logs_with_reason(
    pg_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """When EXPLAIN fails on its connection (a temp table it cannot see) the event says why."""
    sqlprobe.attach(
        pg_engine, registry=registry, logger=logger, slow_query_threshold=0, explain=True
    )
    with pg_engine.connect() as conn:
        conn.execute(text("CREATE TEMP TABLE only_mine (v text)"))
        conn.execute(text(f"INSERT INTO only_mine VALUES ('{SENTINEL}')"))
        rows = conn.execute(text("SELECT v FROM only_mine WHERE v <> :x"), {"x": "y"}).all()
        assert rows == [(SENTINEL,)]
    (event,) = wait_for(logs, "FROM only_mine")
    assert event["plan"] == {"reason": "EXPLAIN failed: UndefinedTable (42P01)"}
    assert SENTINEL not in repr(logs.entries)


@pytest.mark.postgres
def test_pg_full_plan_keeps_values_only_with_capture_parameters(
    pg_engine: Engine, pg_big: str, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """With capture_parameters=True the full plan keeps the values the planner saw."""
    sqlprobe.attach(
        pg_engine,
        registry=registry,
        logger=logger,
        slow_query_threshold=0,
        explain=True,
        capture_parameters=True,
    )
    with pg_engine.connect() as conn:
        conn.execute(text(f"SELECT id FROM {pg_big} WHERE v = :v"), {"v": "needle"}).all()
    (event,) = wait_for(logs, "WHERE v =")
    assert "needle" in repr(event["plan"]["full"])
    assert event["plan"]["node"] == "Seq Scan" or pg_big in event["plan"]["seq_scans"]


def test_skip_reasons(
    tmp_path: Any, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """Statements that cannot be replayed safely are logged at once with the reason."""
    engine = create_engine(f"sqlite:///{tmp_path / 'skip.db'}")
    try:
        sqlprobe.attach(
            engine, registry=registry, logger=logger, slow_query_threshold=0, explain=True
        )
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (:x)"), [{"x": 1}, {"x": 2}])
        reasons = {e["statement"]: e["plan"] for e in slow_events(logs)}
        assert reasons["CREATE TABLE t (x INTEGER)"] == {"reason": "not a SELECT (CREATE)"}
        assert reasons["INSERT INTO t VALUES (?)"] == {"reason": "not a SELECT (INSERT)"}
    finally:
        engine.dispose()


def test_skip_reason_rules() -> None:
    """FOR UPDATE, INTO, several statements, side effects and odd parameters are skipped."""
    from sqlprobe._analysis._explain import skip_reason
    from sqlprobe._core._collector import StatementRecord
    from sqlprobe._core._fingerprint import analyze

    def reason(sql: str, params: Any = None, batch: int = 0) -> str | None:
        record = StatementRecord(
            "e", sql, analyze(sql), 0.0, 1.0, 1, batch, params, None, None, None
        )
        return skip_reason(record)

    assert reason("SELECT * FROM t WHERE id = %(id)s", {"id": 1}) is None
    assert reason("SELECT * FROM t FOR UPDATE") == "locking or SELECT INTO statement"
    assert reason("SELECT * FROM t FOR NO KEY UPDATE") == "locking or SELECT INTO statement"
    assert reason("SELECT * INTO copy FROM t") == "locking or SELECT INTO statement"
    assert reason("SELECT 1; DROP TABLE t") == "several statements"
    assert reason("SELECT nextval('s')") == "calls a function with side effects"
    assert reason("SELECT GET_LOCK('x', 1)") == "calls a function with side effects"
    assert reason("SELECT * FROM t WHERE id = ANY(%s)", ([1, 2],)) == (
        "parameters are not plain scalars"
    )
    assert reason("SELECT * FROM t WHERE id = ?", [(1,), (2,)], batch=2) == (
        "executemany is not explained"
    )
    assert reason("UPDATE t SET x = 1") == "not a SELECT (UPDATE)"


def test_in_memory_sqlite_is_not_explained(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """An in-memory SQLite database is invisible to another connection: the reason says so."""
    sqlprobe.attach(
        sqlite_engine, registry=registry, logger=logger, slow_query_threshold=0, explain=True
    )
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1 AS mem"))
    (event,) = wait_for(logs, "mem")
    assert event["plan"]["reason"].startswith("in-memory SQLite database")


def test_sqlite_plan_summary_and_cache(
    tmp_path: Any, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """SQLite: a full scan is named from EXPLAIN QUERY PLAN; an index search is not a scan."""
    engine = create_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT)"))
            conn.execute(
                text("INSERT INTO items (v) VALUES (:v)"), [{"v": str(i)} for i in range(50)]
            )
        probe = sqlprobe.attach(
            engine, registry=registry, logger=logger, slow_query_threshold=0, explain=True
        )
        with engine.connect() as conn:
            assert conn.execute(text("SELECT v FROM items WHERE v = :v"), {"v": "7"}).all() == [
                ("7",)
            ]
            first = wait_for(logs, "WHERE v =")
            conn.execute(text("SELECT v FROM items WHERE v = :v"), {"v": "8"}).all()
            conn.execute(text("SELECT v FROM items WHERE id = :id"), {"id": 3}).all()
        scans = wait_for(logs, "WHERE v =", count=2)
        (search,) = wait_for(logs, "WHERE id =")
        assert first[0]["plan"]["node"] == "SCAN items"
        assert first[0]["plan"]["seq_scans"] == ["items"]
        assert first[0]["plan"]["cost"] is None and first[0]["plan"]["cached"] is False
        assert scans[1]["plan"]["cached"] is True
        assert scans[1]["plan"]["seq_scans"] == ["items"]
        assert search["plan"]["seq_scans"] == []
        assert search["plan"]["node"].startswith("SEARCH items")
        probe.detach()
    finally:
        engine.dispose()


@pytest.mark.mariadb
def test_mariadb_plan_summary(
    mysql_engine: Engine, unique: str, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """MariaDB: EXPLAIN FORMAT=JSON gives access type ALL and the scanned table."""
    name = f"scan_{unique}"
    with mysql_engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {name} (id INT PRIMARY KEY, v VARCHAR(40))"))
        conn.execute(text(f"INSERT INTO {name} SELECT seq, md5(seq) FROM seq_1_to_2000"))
        conn.execute(text(f"ANALYZE TABLE {name}"))
    try:
        sqlprobe.attach(
            mysql_engine, registry=registry, logger=logger, slow_query_threshold=0, explain=True
        )
        with mysql_engine.connect() as conn:
            conn.execute(text(f"SELECT id FROM {name} WHERE v = :v"), {"v": SENTINEL}).all()
            conn.execute(text(f"SELECT v FROM {name} WHERE id = :id"), {"id": 5}).all()
        (scan,) = wait_for(logs, "WHERE v =")
        (lookup,) = wait_for(logs, "WHERE id =")
        assert scan["plan"]["node"] == "ALL"
        assert scan["plan"]["seq_scans"] == [name]
        assert scan["plan"]["rows"] and scan["plan"]["rows"] > 1000
        assert lookup["plan"]["node"] == "const"
        assert lookup["plan"]["seq_scans"] == []
        assert SENTINEL not in repr(logs.entries)
    finally:
        with mysql_engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {name}"))


@pytest.mark.postgres
async def test_asyncpg_plan_from_the_worker(
    async_pg_engine: Any, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """On asyncpg the worker replays the statement through the greenlet adapter and gets a plan."""
    probe = sqlprobe.attach(
        async_pg_engine, registry=registry, logger=logger, slow_query_threshold=0, explain=True
    )
    async with async_pg_engine.connect() as conn:
        result = await conn.execute(
            text("SELECT relname FROM pg_class WHERE relname = :n"), {"n": "pg_class"}
        )
        assert result.all() == [("pg_class",)]
    found: list[Any] = []
    for _ in range(500):
        found = [e for e in slow_events(logs) if "relname =" in e["statement"]]
        if found:
            break
        await asyncio.sleep(0.01)
    (event,) = found
    assert "node" in event["plan"], event["plan"]
    assert event["plan"]["seq_scans"] in ([], ["pg_class"])
    explainer = explainer_of(probe)
    probe.detach()
    assert explainer.thread is not None and not explainer.thread.is_alive()
