"""sqlprobe.testing.capture: what it records, which engines, noise, assertions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import sqlprobe
from sqlprobe import _state
from sqlprobe._scenario import Base, User, seed
from sqlprobe.testing import capture

pytestmark = [pytest.mark.smoke, pytest.mark.usefixtures("detach_new_probes")]


@pytest.fixture
def demo_engine() -> Iterator[Engine]:
    """An in-memory SQLite engine with the demo schema and 6 users with 2 orders each."""
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(session, users=6, orders_per_user=2, articles_per_user=0)
    yield engine
    engine.dispose()


def test_records_normalized_statements(demo_engine: Engine, registry: CollectorRegistry) -> None:
    """Each statement is recorded with normalized text, fingerprint, operation, table, time."""
    sqlprobe.attach(demo_engine, registry=registry)
    with capture(demo_engine) as q, demo_engine.connect() as conn:
        conn.execute(text("SELECT name FROM sqlprobe_demo_users WHERE name = 'user1'"))
        conn.execute(text("SELECT name FROM sqlprobe_demo_users WHERE name = :n"), {"n": "x"})
        conn.execute(text("UPDATE sqlprobe_demo_users SET active = 0 WHERE id = 3"))
    assert len(q) == 3
    first, second, third = q.records
    assert first.statement == "SELECT name FROM sqlprobe_demo_users WHERE name = ?"
    assert "user1" not in first.statement
    assert first.fingerprint == second.fingerprint
    assert (first.operation, first.table) == ("SELECT", "sqlprobe_demo_users")
    assert (third.operation, third.rows) == ("UPDATE", 1)
    assert all(s.duration > 0 for s in q)
    assert first.engine == "sqlite:///:memory:"
    assert q.count("SELECT") == 2
    assert q.count(table="sqlprobe_demo_users") == 3
    assert q.total_duration == pytest.approx(sum(s.duration for s in q.statements))


def test_only_inside_the_block(demo_engine: Engine, registry: CollectorRegistry) -> None:
    """Statements before and after the block are not recorded."""
    sqlprobe.attach(demo_engine, registry=registry)
    with demo_engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        with capture(demo_engine) as q:
            conn.exec_driver_sql("SELECT 2")
        conn.exec_driver_sql("SELECT 3")
    assert [s.statement for s in q] == ["SELECT ?"]


def test_noise_excluded_unless_asked(demo_engine: Engine, registry: CollectorRegistry) -> None:
    """SAVEPOINT/RELEASE are left out by default and kept with include_noise=True."""
    sqlprobe.attach(demo_engine, registry=registry)

    def work() -> None:
        with Session(demo_engine) as session, session.begin(), session.begin_nested():
            session.scalars(select(User).limit(1)).all()

    with capture(demo_engine) as quiet:
        work()
    with capture(demo_engine, include_noise=True) as noisy:
        work()
    assert [s.operation for s in quiet] == ["SELECT"]
    assert [s.operation for s in noisy] == ["SAVEPOINT", "SELECT", "RELEASE"]


def test_unattached_engine_is_attached_privately(demo_engine: Engine) -> None:
    """An engine nobody attached is attached for the block only, off the global registry."""
    assert demo_engine not in _state.probes
    with capture(demo_engine) as q, demo_engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        probe = _state.probes[demo_engine]
        assert probe.options is not None
        assert probe.options.registry is not REGISTRY
    assert len(q) == 1
    assert demo_engine not in _state.probes
    assert not probe.attached


def test_no_engine_means_every_attached_engine(registry: CollectorRegistry) -> None:
    """capture() records attached engines, including ones attached inside it, not others."""
    one, two, other = (create_engine("sqlite://") for _ in range(3))
    sqlprobe.attach(one, registry=registry, name="one")
    with capture() as q:
        sqlprobe.attach(two, registry=registry, name="two")
        for engine in (one, two, other):
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
    assert sorted(s.engine for s in q) == ["one", "two"]


def test_assert_helpers_list_statements(demo_engine: Engine) -> None:
    """assert_count and assert_max pass within bounds and fail with the numbered statements."""
    with capture(demo_engine) as q, demo_engine.connect() as conn:
        conn.exec_driver_sql("SELECT id FROM sqlprobe_demo_users")
        conn.exec_driver_sql("SELECT id FROM sqlprobe_demo_orders")
    q.assert_count(2)
    q.assert_max(2)
    with pytest.raises(AssertionError) as info:
        q.assert_max(1)
    message = str(info.value)
    assert "expected at most 1 statements, 2 ran" in message
    assert "  1. SELECT id FROM sqlprobe_demo_users" in message
    assert "  2. SELECT id FROM sqlprobe_demo_orders" in message
    with pytest.raises(AssertionError, match="expected 3 statements, 2 ran"):
        q.assert_count(3)


def test_assert_no_n_plus_one(demo_engine: Engine) -> None:
    """assert_no_n_plus_one fails on a lazy loop, naming the relationship and the fix."""
    with capture(demo_engine) as q, Session(demo_engine) as session:
        for user in session.scalars(select(User)):
            assert user.orders
    assert len(q.n_plus_one) == 1
    with pytest.raises(AssertionError) as info:
        q.assert_no_n_plus_one()
    assert "User.orders" in str(info.value)
    assert "selectinload(User.orders)" in str(info.value)

    with capture(demo_engine) as clean, Session(demo_engine) as session:
        session.scalars(select(User)).all()
    clean.assert_no_n_plus_one()


def test_detections_of_other_engines_ignored(demo_engine: Engine) -> None:
    """A capture of one engine ignores N+1 detections on another."""
    other = create_engine("sqlite://")
    sqlprobe.attach(other, registry=CollectorRegistry(), name="other")
    with capture(demo_engine) as q, other.connect() as conn:
        for _ in range(6):
            conn.exec_driver_sql("SELECT 1")
    assert q.n_plus_one == []


def test_failed_statement_recorded(demo_engine: Engine) -> None:
    """A failed statement is recorded with its error class; the error still reaches the caller."""
    with capture(demo_engine) as q, demo_engine.connect() as conn, pytest.raises(OperationalError):
        conn.exec_driver_sql("SELECT nope FROM missing_table")
    assert [(s.operation, s.error) for s in q] == [("SELECT", "OperationalError")]


@pytest.mark.postgres
async def test_async_engine(async_pg_engine: Any) -> None:
    """An AsyncEngine is captured through its sync engine."""
    async with async_pg_engine.connect() as conn:
        await conn.execute(text("SELECT 1"))  # first connect: dialect setup queries
        await conn.execute(text("CREATE TEMP TABLE capture_async (x int)"))
        await conn.execute(text("INSERT INTO capture_async VALUES (1), (2)"))
        with capture(async_pg_engine) as q:
            await conn.execute(text("SELECT 1 + :x"), {"x": 1})
            await conn.execute(text("UPDATE capture_async SET x = :x"), {"x": 3})
    assert [s.statement for s in q] == ["SELECT ? + ?", "UPDATE capture_async SET x = ?"]
    assert q[0].rows == -1  # a SELECT's row count is not read
    assert q[1].rows == 2


@pytest.mark.postgres
def test_first_connect_queries_are_noise(pg_engine: Engine) -> None:
    """The dialect's first-connect queries are left out unless include_noise=True."""
    with capture(pg_engine) as q, pg_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert [s.statement for s in q] == ["SELECT ?"]
    fresh = create_engine(pg_engine.url)
    try:
        with capture(fresh, include_noise=True) as noisy, fresh.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert len(noisy) > 1
        assert noisy[-1].statement == "SELECT ?"
    finally:
        fresh.dispose()


def test_closed_capture_leaves_nothing_registered(demo_engine: Engine) -> None:
    """After a capture closes, no listener of it stays registered and nothing more is recorded."""
    before = (_state.attach_listeners(), _state.detection_listeners())
    with capture() as everything, capture(demo_engine) as one:
        assert (_state.attach_listeners(), _state.detection_listeners()) != before
    assert (_state.attach_listeners(), _state.detection_listeners()) == before
    with demo_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    later = create_engine("sqlite://")
    sqlprobe.attach(later, registry=CollectorRegistry())
    with later.connect() as conn:
        conn.execute(text("SELECT 2"))
    assert len(everything) == 0
    assert len(one) == 0
