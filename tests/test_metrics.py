"""The statement metrics on real databases: counts, shapes, rows, errors, threads, leaks."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

import sqlprobe

from .conftest import sample, total

pytestmark = pytest.mark.smoke

CALLS = "sqlprobe_statement_calls_total"


def _table(unique: str) -> tuple[MetaData, Table]:
    metadata = MetaData()
    table = Table(
        f"sp_items_{unique}",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(64), unique=True),
        Column("qty", Integer),
    )
    return metadata, table


def _fingerprints(registry: CollectorRegistry) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == CALLS:
                out[s.labels["fingerprint"]] = s.value
    return out


def _info(registry: CollectorRegistry) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "sqlprobe_statement_info":
                out[s.labels["fingerprint"]] = dict(s.labels)
    return out


def test_shapes_rows_and_info_on_each_database(
    any_engine: Engine, registry: CollectorRegistry, unique: str
) -> None:
    """Literal, parameter and IN-list variants share a shape; rows and info are right."""
    metadata, items = _table(unique)
    metadata.create_all(any_engine)
    try:
        probe = sqlprobe.attach(any_engine, registry=registry)
        with any_engine.begin() as conn:
            conn.execute(insert(items), [{"name": f"n{i}", "qty": i} for i in range(10)])
            for ids in ([1], [1, 2, 3], list(range(1, 9))):
                conn.execute(select(items).where(items.c.id.in_(ids))).all()
            for qty in (1, 2, 3):
                conn.execute(text(f"UPDATE {items.name} SET qty = {qty} WHERE id = {qty}"))
        info = _info(registry)
        calls = _fingerprints(registry)
        selects = [fp for fp, lab in info.items() if lab["operation"] == "SELECT"]
        updates = [fp for fp, lab in info.items() if lab["operation"] == "UPDATE"]
        assert len(selects) == 1, info
        assert calls[selects[0]] == 3
        assert len(updates) == 1, info
        assert calls[updates[0]] == 3
        assert info[updates[0]]["table"] == items.name
        assert "1" not in info[updates[0]]["statement"].split("=")[1]
        rows = sample(
            registry,
            "sqlprobe_statement_rows_total",
            engine=probe.name or "",
            fingerprint=updates[0],
        )
        assert rows == 3
        probe.detach()
    finally:
        metadata.drop_all(any_engine)


def test_failing_statement_raises_same_exception(
    any_engine: Engine, registry: CollectorRegistry, unique: str
) -> None:
    """A failing statement raises the same exception as without sqlprobe, counted once by class."""
    metadata, items = _table(unique)
    metadata.create_all(any_engine)
    try:
        with any_engine.begin() as conn:
            conn.execute(insert(items).values(name="dup", qty=1))

        def fail() -> BaseException:
            with any_engine.connect() as conn:
                with pytest.raises(IntegrityError) as info:
                    conn.execute(insert(items).values(name="dup", qty=2))
                conn.rollback()
            return info.value

        bare = fail()
        probe = sqlprobe.attach(any_engine, registry=registry)
        watched = fail()
        assert type(watched) is type(bare)
        assert type(watched.orig) is type(bare.orig)  # type: ignore[attr-defined]
        assert str(watched.orig) == str(bare.orig)  # type: ignore[attr-defined]
        errors = total(
            registry, "sqlprobe_query_errors_total", operation="INSERT", error="IntegrityError"
        )
        assert errors == 1
        assert total(registry, "sqlprobe_query_errors_total") == 1
        probe.detach()
    finally:
        metadata.drop_all(any_engine)


def test_syntax_error_is_counted_by_class(any_engine: Engine, registry: CollectorRegistry) -> None:
    """A statement the database rejects is counted under the class the application receives."""
    probe = sqlprobe.attach(any_engine, registry=registry)
    with any_engine.connect() as conn, pytest.raises((OperationalError, ProgrammingError)) as info:
        conn.execute(text("SELECT * FROM sqlprobe_no_such_table"))
    expected = type(info.value).__name__
    assert total(registry, "sqlprobe_query_errors_total", error=expected) == 1
    probe.detach()


def test_executemany_counts_one_call(
    any_engine: Engine, registry: CollectorRegistry, unique: str
) -> None:
    """An executemany (or insertmanyvalues batch) counts as executions, never per row twice."""
    metadata, items = _table(unique)
    metadata.create_all(any_engine)
    try:
        probe = sqlprobe.attach(any_engine, registry=registry)
        with any_engine.begin() as conn:
            conn.execute(
                text(f"UPDATE {items.name} SET qty = :q WHERE id = :i"),
                [{"q": i, "i": i} for i in range(50)],
            )
        info = _info(registry)
        update = [fp for fp, lab in info.items() if lab["operation"] == "UPDATE"]
        assert len(update) == 1
        assert _fingerprints(registry)[update[0]] == 1
        probe.detach()
    finally:
        metadata.drop_all(any_engine)


def test_threads_lose_no_count(pg_engine: Engine, registry: CollectorRegistry) -> None:
    """N statements from 8 threads at once give exactly N calls and N histogram observations."""
    engine = create_engine(pg_engine.url, pool_size=8, max_overflow=0)
    with engine.connect():
        pass  # first connect: SQLAlchemy 2.0 runs its dialect set-up queries here
    probe = sqlprobe.attach(engine, registry=registry)
    per_thread = 250
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            barrier.wait()
            with engine.connect() as conn:
                for i in range(per_thread):
                    conn.execute(text(f"SELECT {n} + :i"), {"i": i})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    n = 8 * per_thread
    assert total(registry, CALLS) == n
    assert total(registry, "sqlprobe_query_duration_seconds_count", operation="SELECT") == n
    assert total(registry, "sqlprobe_query_duration_seconds_bucket", le="+Inf") == n
    probe.detach()
    engine.dispose()


def test_sqlite_threads_lose_no_count(registry: CollectorRegistry, tmp_path: Any) -> None:
    """Eight threads on one SQLite file engine: the calls counter is exact."""
    engine = create_engine(f"sqlite:///{tmp_path / 'threads.db'}")
    probe = sqlprobe.attach(engine, registry=registry)
    per_thread = 500

    def work() -> None:
        with engine.connect() as conn:
            for i in range(per_thread):
                conn.execute(text("SELECT :i"), {"i": i})

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert total(registry, CALLS) == 8 * per_thread
    probe.detach()


async def test_asyncpg_counts_and_errors(async_pg_engine: Any, registry: CollectorRegistry) -> None:
    """An AsyncEngine on asyncpg is counted like a sync one, errors included."""
    from sqlalchemy.exc import DBAPIError

    async with async_pg_engine.connect():
        pass  # first connect: SQLAlchemy 2.0 runs its dialect set-up queries here
    probe = sqlprobe.attach(async_pg_engine, registry=registry)
    async with async_pg_engine.connect() as conn:
        for i in range(5):
            await conn.execute(text("SELECT CAST(:i AS INTEGER)"), {"i": i})
        with pytest.raises(DBAPIError) as info:
            await conn.execute(text("SELECT * FROM sqlprobe_missing_async"))
    assert total(registry, CALLS) == 6
    assert total(registry, "sqlprobe_query_errors_total", error=type(info.value).__name__) == 1
    probe.detach()


def test_orm_session_is_counted(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """ORM sessions go through the same hooks (no ConnectionEvents needed)."""
    from sqlprobe._scenario import Base, User, seed

    Base.metadata.create_all(sqlite_engine)
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    with Session(sqlite_engine) as session:
        seed(session, users=5, orders_per_user=1, articles_per_user=0)
        assert len(session.scalars(select(User)).all()) == 5
    assert total(registry, CALLS) >= 3
    assert total(registry, "sqlprobe_query_duration_seconds_count", operation="INSERT") >= 1
    probe.detach()


def test_max_fingerprints_overflow_goes_to_other(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """Beyond max_fingerprints shapes, statements count under fingerprint="_other"."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, max_fingerprints=5)
    with sqlite_engine.connect() as conn:
        for i in range(20):
            conn.execute(text(f"SELECT 1 AS col_{i}"))
    calls = _fingerprints(registry)
    probe.detach()
    assert len(calls) == 6
    assert calls["_other"] == 15
    assert sum(calls.values()) == 20


def test_sentinels_never_reach_metrics(pg_engine: Engine, registry: CollectorRegistry) -> None:
    """Parameter values, SQL literals and the URL password never appear in /metrics."""
    url = pg_engine.url.set(password="pw-SENTINEL-3141")
    engine = create_engine(url)
    probe = sqlprobe.attach(engine, registry=registry)
    with engine.connect() as conn:
        conn.execute(text("SELECT :secret"), {"secret": "param-SENTINEL-2718"})
        conn.execute(text("SELECT 'literal-SENTINEL-1618' AS x, 9998877 AS y"))
        with pytest.raises(ProgrammingError):
            conn.execute(text("SELECT 'err-SENTINEL-1414' FROM sqlprobe_no_such"))
    text_out = generate_latest(registry).decode() + generate_openmetrics(registry).decode()
    probe.detach()
    engine.dispose()
    assert "sqlprobe_statement_calls_total" in text_out
    for sentinel in ("SENTINEL", "pw-", "postgres@"):
        assert sentinel not in text_out
    # The numeric literal as a value of its own, not as digits inside a float sample
    # (a duration such as 0.00030023999988770 holds them by chance).
    assert not re.search(r"(?<![\d.])9998877(?![\d.])", text_out)


def test_histogram_buckets_start_below_a_millisecond(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """Default buckets reach 100 µs, so fast primary-key lookups are resolved."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    les = {
        s.labels["le"]
        for m in registry.collect()
        for s in m.samples
        if s.name == "sqlprobe_query_duration_seconds_bucket"
    }
    probe.detach()
    assert "0.0001" in les
    assert "10.0" in les
    assert "+Inf" in les


def test_custom_buckets(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """buckets= replaces the duration buckets."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, buckets=[0.5, 1, 2])
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    les = sorted(
        {
            s.labels["le"]
            for m in registry.collect()
            for s in m.samples
            if s.name == "sqlprobe_query_duration_seconds_bucket"
        }
    )
    probe.detach()
    assert les == ["+Inf", "0.5", "1.0", "2.0"]


def test_statements_snapshot(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """Probe.statements() returns totals per shape, largest total time first."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    with sqlite_engine.connect() as conn:
        for i in range(4):
            conn.execute(text(f"SELECT {i}"))
    stats = probe.statements()
    probe.detach()
    assert len(stats) == 1
    assert stats[0].calls == 4
    assert stats[0].operation == "SELECT"
    assert stats[0].mean_seconds == pytest.approx(stats[0].total_seconds / 4)
