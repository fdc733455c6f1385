"""What an adopter hits in the first week: sqlprobe composes with the application.

Each test pins one promise that a review or SQLAlchemy's own suite found broken: other
execution listeners run as without sqlprobe, ``cursor.rowcount`` is read only where
SQLAlchemy reads it, ``connection.info`` stays the application's, totals survive detach,
engines made and dropped leave nothing behind, EXPLAIN sees the application's session
set-up, events never go to standard output, and a second attach cannot silently drop
options.
"""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import SingletonThreadPool
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe import _state
from sqlprobe._sinks._prometheus import MAX_RETAINED_ENGINES

from .conftest import PG_URL, _need, make_logger, sample


def _calls(registry: CollectorRegistry, engine: str) -> float:
    total = 0.0
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "sqlprobe_statement_calls_total" and s.labels["engine"] == engine:
                total += s.value
    return total


@pytest.mark.parametrize("retval", [False, True])
def test_later_do_execute_listener_runs_for_every_statement(
    sqlite_engine: Engine, registry: CollectorRegistry, detach_new_probes: None, retval: bool
) -> None:
    """A do_execute listener added after attach sees every statement, as without sqlprobe."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, name="later")
    seen: list[str] = []

    def listener(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        seen.append(statement)
        if retval:
            cursor.execute("SELECT 42")  # the listener runs the statement itself
        return retval

    event.listen(sqlite_engine, "do_execute", listener)
    with sqlite_engine.connect() as conn:
        first = conn.execute(text("SELECT :x"), {"x": 1}).scalar()
        conn.execute(text("SELECT :x"), {"x": 2})
    assert seen == ["SELECT ?", "SELECT ?"]
    if retval:
        # It handled the statements: sqlprobe saw no driver call and counts none.
        assert first == 42
        assert _calls(registry, "later") == 0
    else:
        assert first == 1
        assert _calls(registry, "later") == 2
    probe.detach()
    event.remove(sqlite_engine, "do_execute", listener)


def test_listener_added_before_attach_still_runs(
    sqlite_engine: Engine, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A do_execute listener registered before attach runs first and is not displaced."""
    seen: list[str] = []
    event.listen(sqlite_engine, "do_execute", lambda *args: seen.append(args[1]))
    sqlprobe.attach(sqlite_engine, registry=registry, name="before")
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert seen == ["SELECT 1"]
    assert _calls(registry, "before") == 1


def test_detach_restores_the_dialect(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """Detach removes every wrapper from the dialect instance and the pool."""
    dialect, pool = sqlite_engine.dialect, sqlite_engine.pool
    wrapped = {"do_execute", "do_executemany", "do_execute_no_params", "do_begin",
               "do_commit", "do_rollback"}  # fmt: skip
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    assert wrapped <= set(vars(dialect))
    assert {"connect", "recreate"} <= set(vars(pool))
    probe.detach()
    assert not wrapped & set(vars(dialect))
    assert not {"connect", "recreate"} & set(vars(pool))


class _CountingCursor:
    """A DBAPI cursor proxy that counts reads of ``rowcount``."""

    def __init__(self, cursor: Any, counts: dict[str, int]) -> None:
        self._cursor = cursor
        self._counts = counts

    @property
    def rowcount(self) -> int:
        self._counts["rowcount"] += 1
        return int(self._cursor.rowcount)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _CountingConnection:
    def __init__(self, connection: Any, counts: dict[str, int]) -> None:
        self._connection = connection
        self._counts = counts

    def cursor(self, *args: Any) -> _CountingCursor:
        return _CountingCursor(self._connection.cursor(*args), self._counts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def _rowcount_reads(path: Path, registry: CollectorRegistry | None) -> list[int]:
    """Reads of cursor.rowcount after each step of a Core workload (cumulative)."""
    import sqlite3

    from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, update

    counts = {"rowcount": 0}
    engine = create_engine(
        "sqlite://", creator=lambda: _CountingConnection(sqlite3.connect(path), counts)
    )
    if registry is not None:
        sqlprobe.attach(engine, registry=registry, name="rows")
    table = Table("t", MetaData(), Column("id", Integer, primary_key=True), Column("v", String))
    table.metadata.create_all(engine)
    steps: list[int] = []
    counts["rowcount"] = 0
    with engine.begin() as conn:
        conn.execute(insert(table), [{"v": "a"}, {"v": "b"}, {"v": "c"}])
        steps.append(counts["rowcount"])
        assert conn.execute(select(table.c.v).order_by(table.c.v)).scalars().all() == [
            "a", "b", "c",
        ]  # fmt: skip
        steps.append(counts["rowcount"])
        assert conn.execute(update(table).values(v="d")).rowcount == 3
        steps.append(counts["rowcount"])
        conn.execute(text("UPDATE t SET v = 'e' WHERE id = 1"))
        steps.append(counts["rowcount"])
    return steps


def test_rowcount_is_read_exactly_as_often_as_without_sqlprobe(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """cursor.rowcount is read at the same steps, as often, attached as bare."""
    bare = _rowcount_reads(tmp_path / "bare.db", None)
    attached = _rowcount_reads(tmp_path / "attached.db", registry)
    assert attached == bare
    assert bare[1] == bare[0]  # a SELECT reads no rowcount
    rows = {
        (s.operation, s.statement[:30]): s.rows
        for p in _state.probes.values()
        if p.name == "rows"
        for s in p.statements()
        if s.operation in ("INSERT", "SELECT", "UPDATE")
    }
    assert sorted(rows.values()) == [0, 0, 1, 3], rows  # INSERT, SELECT: 0; the UPDATEs


def test_connection_info_stays_the_applications(
    sqlite_engine: Engine, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """sqlprobe keeps nothing in connection.info: it stays empty and JSON-serializable."""
    sqlprobe.attach(sqlite_engine, registry=registry)
    with sqlite_engine.begin() as conn:
        conn.execute(text("SELECT 1"))
        assert conn.info == {}
        json.dumps(conn.info)
    with sqlite_engine.connect() as conn:
        assert conn.info == {}


async def test_async_connection_info_stays_the_applications(
    registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """The same through an AsyncEngine (aiosqlite)."""
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("sqlite+aiosqlite://")
    sqlprobe.attach(engine, registry=registry)
    async with engine.begin() as conn:
        await conn.execute(text("SELECT 1"))
        assert conn.info == {}
        json.dumps(conn.info)
    await engine.dispose()


def test_totals_survive_detach_and_continue_on_reattach(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """After detach the registry still shows the totals; attaching again continues them."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, name="kept")
    with sqlite_engine.connect() as conn:
        for _ in range(3):
            conn.execute(text("SELECT 1"))
    probe.detach()
    assert _calls(registry, "kept") == 3
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))  # not counted: detached
    assert _calls(registry, "kept") == 3
    again = sqlprobe.attach(sqlite_engine, registry=registry, name="kept")
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert _calls(registry, "kept") == 4
    again.detach()


def test_totals_survive_garbage_collection(registry: CollectorRegistry) -> None:
    """An engine dropped while attached keeps its totals for the next scrape."""
    engine = create_engine("sqlite://")
    sqlprobe.attach(engine, registry=registry, name="dropped")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    del engine, conn
    gc.collect()
    assert _calls(registry, "dropped") == 1
    _state.run_deferred()
    assert _calls(registry, "dropped") == 1


def test_engines_made_and_dropped_leave_memory_flat(registry: CollectorRegistry) -> None:
    """4,000 engines under attach() leave no probe, listener or series per dead engine."""
    import tracemalloc

    probe = sqlprobe.attach(registry=registry)
    try:

        def churn(n: int, offset: int) -> None:
            for i in range(n):
                engine = create_engine(
                    f"sqlite:///file:tenant{offset + i}?mode=memory&uri=true",
                    poolclass=SingletonThreadPool,
                )
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                engine.dispose()
                del engine, conn

        churn(500, 0)
        gc.collect()
        _state.run_deferred()
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        churn(4_000, 1_000)
        gc.collect()
        _state.run_deferred()
        grown = tracemalloc.get_traced_memory()[0] - start
        tracemalloc.stop()
        assert len(probe.probes) <= 1
        assert len(_state.probes) <= 1
        exporter = _state.exporter_for(registry)
        assert len(exporter.engines) <= MAX_RETAINED_ENGINES + 1
        # Retained totals are bounded (100 names); 4,000 probes would be tens of MB.
        assert grown < 8 * 1024 * 1024, grown
    finally:
        probe.detach()


def test_second_attach_with_other_options_raises(
    sqlite_engine: Engine, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """The same options return the same probe; other options raise, naming them."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, slow_query_threshold=0.2)
    assert sqlprobe.attach(sqlite_engine, registry=registry, slow_query_threshold=0.2) is probe
    with pytest.raises(ValueError, match=r"registry.*slow_query_threshold"):
        sqlprobe.attach(sqlite_engine, registry=CollectorRegistry(), slow_query_threshold=1.0)


def test_events_never_go_to_standard_output(
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    detach_new_probes: None,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without logger= and without configured structlog, events go to logging 'sqlprobe'."""
    import structlog

    structlog.reset_defaults()
    assert not structlog.is_configured()
    sqlprobe.attach(sqlite_engine, registry=registry, slow_query_threshold=0)
    with caplog.at_level(logging.WARNING, logger="sqlprobe"), sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert capsys.readouterr().out == ""
    records = [r for r in caplog.records if r.name == "sqlprobe"]
    assert records, "no event reached the logging logger"
    record: Any = records[0]
    assert record.sqlprobe_event == "slow_query"
    assert record.sqlprobe_fields["statement"] == "SELECT ?"
    assert "slow_query" in record.getMessage()


def test_repeated_identical_statement_is_not_an_n_plus_one(
    sqlite_engine: Engine, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """The same statement with the same (or no) parameters is a repeat, not an N+1."""
    logs = LogCapture()
    sqlprobe.attach(sqlite_engine, registry=registry, logger=make_logger(logs), name="rep")
    with sqlprobe.scope("no-parameters"), sqlite_engine.connect() as conn:
        for _ in range(10):
            conn.execute(text("SELECT 1"))
    with sqlprobe.scope("same-parameters"), sqlite_engine.connect() as conn:
        for _ in range(10):
            conn.execute(text("SELECT :x"), {"x": 7})
    assert [e for e in logs.entries if e["event"] == "n_plus_one"] == []
    with sqlprobe.scope("per-item"), sqlite_engine.connect() as conn:
        for i in range(10):
            conn.execute(text("SELECT :x"), {"x": i})
    assert [e["scope"] for e in logs.entries if e["event"] == "n_plus_one"] == ["per-item"]


def test_suppressed_n_plus_one_walks_no_stack(
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    detach_new_probes: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A detection the rate limit drops is counted and costs no source lookup or event."""
    from sqlprobe._core._frames import SourceFinder

    looked: list[int] = []
    original = SourceFinder.source
    monkeypatch.setattr(
        SourceFinder, "source", lambda self, frame: looked.append(1) or original(self, frame)
    )
    logs = LogCapture()
    sqlprobe.attach(sqlite_engine, registry=registry, logger=make_logger(logs), name="sup")
    for _ in range(20):
        with sqlprobe.scope("busy"), sqlite_engine.connect() as conn:
            for i in range(5):
                conn.execute(text("SELECT :x"), {"x": i})
    events = [e for e in logs.entries if e["event"] == "n_plus_one"]
    assert len(events) == 5  # the rate limit: 5 per scope and shape per minute
    assert len(looked) == 5  # the 15 suppressed detections walked no stack
    counted = sum(
        s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "sqlprobe_n_plus_one_total" and s.labels["engine"] == "sup"
    )
    assert counted == 20


def test_explain_sees_the_applications_search_path(
    registry: CollectorRegistry, detach_new_probes: None, unique: str
) -> None:
    """EXPLAIN's connection runs the pool's connect handlers (search_path) first."""
    _need(5432, "PostgreSQL")
    schema = f"app_{unique}"
    engine = create_engine(PG_URL)

    @event.listens_for(engine, "connect")
    def set_path(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET search_path TO {schema}")
        cursor.close()
        dbapi_connection.commit()

    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f"CREATE TABLE {schema}.items (id int, v int)"))
    logs = LogCapture()
    probe = sqlprobe.attach(
        engine, registry=registry, logger=make_logger(logs), explain=True,
        slow_query_threshold=0,
    )  # fmt: skip
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT v FROM items WHERE id = :id"), {"id": 1})
        probe.detach()  # waits for the EXPLAIN worker
        plans = [e["plan"] for e in logs.entries if e["event"] == "slow_query"]
        plan = next(p for p in plans if "node" in p or "reason" in p)
        assert "reason" not in plan, plan
        assert plan["seq_scans"] == ["items"]
        # EXPLAIN's side connection is not one of the pool's: no connect was counted.
        assert sample(registry, "sqlprobe_pool_connects_total", engine=probe.name or "") == 0
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def test_batch_job_exiting_right_after_a_slow_statement_logs_it(tmp_path: Path) -> None:
    """With explain=True, a script that exits right after its slow statement logs the plan."""
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            import structlog
            from sqlalchemy import create_engine, text
            import sqlprobe

            def emit(logger, method, event):
                sys.stdout.write(json.dumps(event, default=str) + "\\n")
                sys.stdout.flush()
                raise structlog.DropEvent

            engine = create_engine("sqlite:///{tmp_path / "job.db"}")
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE IF NOT EXISTS t (id INTEGER, v INTEGER)"))
            sqlprobe.attach(engine, explain=True, slow_query_threshold=0,
                            logger=structlog.wrap_logger(None, processors=[emit]))
            with engine.connect() as conn:
                conn.execute(text("SELECT v FROM t WHERE id = :id"), {{"id": 1}})
            """
        )
    )
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        events = [json.loads(line) for line in out.stdout.splitlines()]
        selects = [e for e in events if e.get("operation") == "SELECT"]
        assert selects, out.stdout
        assert selects[-1]["plan"].get("seq_scans") == ["t"], selects[-1]["plan"]


def test_tracer_declares_the_schema_of_its_names(
    sqlite_engine: Engine, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """Spans declare a semantic-convention schema in which db.system.name is stable."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.semconv.schemas import Schemas

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sqlprobe.attach(sqlite_engine, registry=registry, tracer_provider=provider)
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None and "db.system.name" in span.attributes
    scope = span.instrumentation_scope
    assert scope is not None
    version = tuple(int(p) for p in scope.schema_url.rsplit("/", 1)[1].split("."))
    assert version >= (1, 33, 0)
    assert scope.schema_url in {s.value for s in Schemas}


def test_explicit_attach_replaces_the_blanket_probe(registry: CollectorRegistry) -> None:
    """An engine attached by attach() for all engines takes the application's own options."""
    blanket = sqlprobe.attach(registry=registry)
    try:
        engine = create_engine("sqlite://")
        implicit = blanket.probes[0]
        own = CollectorRegistry()
        explicit = sqlprobe.attach(engine, registry=own, name="own")
        assert explicit is not implicit and not implicit.attached
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert _calls(own, "own") == 1
        assert sqlprobe.attach(engine, registry=own, name="own") is explicit
        with pytest.raises(ValueError, match="name"):
            sqlprobe.attach(engine, registry=own, name="other")
        explicit.detach()
    finally:
        blanket.detach()
