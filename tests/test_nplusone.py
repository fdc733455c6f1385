"""N+1 detection: once per unit of work and shape, relationship named, suggestion given."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import ForeignKey, String, create_engine, event, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe import _state
from sqlprobe._analysis import _nplusone
from sqlprobe._hooks import _orm
from sqlprobe._scenario import Base, Order, User, seed

from .conftest import make_logger, total

pytestmark = [pytest.mark.smoke, pytest.mark.usefixtures("detach_new_probes")]

N_PLUS_ONE = "sqlprobe_n_plus_one_total"


@pytest.fixture
def demo_engine() -> Iterator[Engine]:
    """An in-memory SQLite engine with the demo schema and 20 users with 3 orders each."""
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(session, users=20, orders_per_user=3, articles_per_user=0)
    yield engine
    engine.dispose()


def events(logs: LogCapture) -> list[dict[str, Any]]:
    return [e for e in logs.entries if e["event"] == "n_plus_one"]


def touch_orders(session: Session, limit: int | None = None, eager: bool = False) -> int:
    query = select(User).order_by(User.id)
    if eager:
        query = query.options(selectinload(User.orders))
    if limit is not None:
        query = query.limit(limit)
    n = 0
    for user in session.scalars(query):
        n += len(user.orders)
    return n


def test_lazy_loop_detected_once_naming_relationship(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """20 users touching lazy User.orders: detected once, named, selectinload suggested."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    with Session(demo_engine) as session:
        assert touch_orders(session) == 60
    found = events(logs)
    assert len(found) == 1
    event_ = found[0]
    assert event_["relationship"] == "User.orders"
    assert event_["suggestion"] == "selectinload(User.orders)"
    assert event_["count"] == 5
    assert event_["scope"] == "transaction"
    assert event_["log_level"] == "warning"
    assert "sqlprobe_demo_orders" in event_["statement"]
    assert event_["source"].startswith("tests/test_nplusone.py:")
    assert "touch_orders" in event_["source"]
    assert len(event_["fingerprint"]) == 16
    assert (
        total(registry, N_PLUS_ONE, relationship="User.orders", fingerprint=event_["fingerprint"])
        == 1
    )


def test_selectinload_not_flagged(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """The same loop with selectinload(User.orders) is not reported."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    with Session(demo_engine) as session:
        assert touch_orders(session, eager=True) == 60
    assert events(logs) == []
    assert total(registry, N_PLUS_ONE) == 0


@pytest.mark.parametrize(
    ("threshold", "users", "expected"), [(5, 4, 0), (5, 5, 1), (3, 2, 0), (3, 3, 1)]
)
def test_threshold_edges(
    demo_engine: Engine,
    registry: CollectorRegistry,
    logs: LogCapture,
    threshold: int,
    users: int,
    expected: int,
) -> None:
    """n-1 repeats of a shape are not an N+1; n repeats are, exactly once."""
    sqlprobe.attach(
        demo_engine, registry=registry, logger=make_logger(logs), n_plus_one_threshold=threshold
    )
    with Session(demo_engine) as session:
        touch_orders(session, limit=users)
    assert len(events(logs)) == expected
    assert total(registry, N_PLUS_ONE) == expected


def test_eager_batches_are_not_reported(registry: CollectorRegistry, logs: LogCapture) -> None:
    """selectinload's repeated IN batches (500 parents each) are the fix, never an N+1."""
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(session, users=501, orders_per_user=1, articles_per_user=0)
    sqlprobe.attach(engine, registry=registry, logger=make_logger(logs), n_plus_one_threshold=2)
    with Session(engine) as session:
        assert touch_orders(session, eager=True) == 501  # two IN batches: 500 + 1
        assert events(logs) == []
        with engine.connect() as conn:  # the control: a plain repeat at the same threshold
            for u in range(2):
                conn.execute(
                    text("SELECT id FROM sqlprobe_demo_orders WHERE user_id = :u"), {"u": u}
                )
    assert len(events(logs)) == 1
    engine.dispose()


def test_many_to_one_suggests_joinedload(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """A loop over orders touching lazy Order.user names it and suggests joinedload."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    with Session(demo_engine) as session:
        for order in session.scalars(select(Order).where(Order.id % 3 == 0)):
            assert order.user.name
    found = events(logs)
    assert [e["relationship"] for e in found] == ["Order.user"]
    assert found[0]["suggestion"] == "joinedload(Order.user)"


def test_explicit_scope_names_the_unit_of_work(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Inside sqlprobe.scope(...) the event carries the scope's name; a new scope counts anew."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    with Session(demo_engine) as session:
        users = session.scalars(select(User).order_by(User.id)).all()
        with sqlprobe.scope("GET /users"):
            for user in users[:5]:
                assert user.orders
        # Same session and transaction, but each scope counts on its own: 4 + 4 < 5.
        for start in (5, 9):
            with sqlprobe.scope("batch"):
                for user in users[start : start + 4]:
                    assert user.orders
    found = events(logs)
    assert [(e["scope"], e["relationship"]) for e in found] == [("GET /users", "User.orders")]


def test_repeated_detections_are_counted_but_logged_within_a_limit(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Every request's N+1 counts; the log keeps 5 per scope and shape per window."""
    from sqlprobe._sinks._slowlog import EVENTS_PER_FINGERPRINT

    probe = sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    requests = EVENTS_PER_FINGERPRINT + 3
    with Session(demo_engine) as session:
        users = session.scalars(select(User).order_by(User.id)).all()
        for _ in range(requests):
            with sqlprobe.scope("GET /users"):
                for user in users[:5]:
                    session.expire(user, ["orders"])
                    assert user.orders
    assert total(registry, N_PLUS_ONE, engine=probe.name or "") == requests
    found = events(logs)
    assert len(found) == EVENTS_PER_FINGERPRINT
    assert all(e["suppressed"] == 0 for e in found)


def test_scope_as_decorator(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """A function decorated with sqlprobe.scope is one unit of work per call."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))

    @sqlprobe.scope("nightly-report")
    def report(session: Session) -> int:
        return touch_orders(session, limit=6)

    with Session(demo_engine) as session:
        report(session)
        report(session)  # a second call is a new unit of work: reported again
    assert [e["scope"] for e in events(logs)] == ["nightly-report", "nightly-report"]


def test_transactions_are_separate_units(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Without a scope, repeats in different transactions do not add up; within one they do."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    query = text("SELECT id FROM sqlprobe_demo_orders WHERE user_id = :u")
    with demo_engine.connect() as conn:
        for tx in range(3):
            for u in range(4):
                conn.execute(query, {"u": tx * 4 + u})
            conn.commit()
    assert events(logs) == []
    with demo_engine.connect() as conn:
        for u in range(7):
            conn.execute(query, {"u": u})
    found = events(logs)
    assert len(found) == 1
    assert found[0]["relationship"] == ""
    assert found[0]["scope"] == "transaction"
    assert found[0]["suggestion"] == _nplusone.GENERIC_SUGGESTION


def test_interleaved_connections_keep_their_own_counts(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Two transactions run alternately in one thread are counted apart, each detected once."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    query = text("SELECT id FROM sqlprobe_demo_orders WHERE user_id = :u")
    with demo_engine.connect() as a, demo_engine.connect() as b:
        for u in range(4):
            a.execute(query, {"u": u})
            b.execute(query, {"u": u})
        assert events(logs) == []
        a.execute(query, {"u": 9})
        assert len(events(logs)) == 1
        b.execute(query, {"u": 9})
        assert len(events(logs)) == 2
        a.commit()
        for u in range(4):  # a new transaction on the same connection starts from zero
            a.execute(query, {"u": u})
    assert len(events(logs)) == 2


def test_counts_do_not_keep_transactions_alive(
    demo_engine: Engine, registry: CollectorRegistry
) -> None:
    """The per-connection counts hold their transaction weakly."""
    import gc
    import weakref

    sqlprobe.attach(demo_engine, registry=registry, n_plus_one_threshold=3)
    with demo_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        transaction = conn.get_transaction()
        assert transaction is not None
        held = weakref.ref(transaction)
        conn.commit()
        del transaction
        gc.collect()
        assert held() is None


def test_only_selects_are_counted(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Repeated INSERTs are not an N+1."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    with demo_engine.begin() as conn:
        for i in range(10):
            conn.execute(insert(User.__table__).values(name=f"x{i}", email=f"x{i}@t"))
    assert events(logs) == []


def test_session_subclass_and_sessionmaker(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Sessions of a Session subclass made by sessionmaker are named too."""

    class AppSession(Session):
        pass

    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    factory = sessionmaker(demo_engine, class_=AppSession)
    with factory() as session:
        touch_orders(session, limit=5)
    assert [e["relationship"] for e in events(logs)] == ["User.orders"]


def test_threshold_zero_installs_nothing(demo_engine: Engine, registry: CollectorRegistry) -> None:
    """n_plus_one_threshold=0 turns detection off: no callback and no ORM listener."""
    users = _state._orm_users
    probe = sqlprobe.attach(demo_engine, registry=registry, n_plus_one_threshold=0)
    assert probe.collector is not None
    assert probe.collector.unit is None
    assert _state._orm_users == users


def test_orm_listener_removed_with_last_probe(registry: CollectorRegistry) -> None:
    """The Session-class listener lives while a probe detects N+1; detach or GC ends it."""
    gc.collect()  # engines other tests dropped without detach() release their share
    _state.run_deferred()  # (at the next safe point: attach, detach or a scrape)
    base = _state._orm_users
    one, two = create_engine("sqlite://"), create_engine("sqlite://")
    first = sqlprobe.attach(one, registry=registry, name="one")
    second = sqlprobe.attach(two, registry=registry, name="two")
    assert _state._orm_users == base + 2
    assert event.contains(Session, "do_orm_execute", _orm._on_orm_execute)
    first.detach()
    assert event.contains(Session, "do_orm_execute", _orm._on_orm_execute)
    second.detach()
    assert _state._orm_users == base
    if base == 0:
        assert not event.contains(Session, "do_orm_execute", _orm._on_orm_execute)
    three = create_engine("sqlite://")
    sqlprobe.attach(three, registry=registry, name="three")
    assert _state._orm_users == base + 1
    with three.connect() as conn:  # the detector's per-transaction state must not pin it
        conn.exec_driver_sql("SELECT 1")
    del three, conn
    gc.collect()
    _state.run_deferred()
    assert _state._orm_users == base


def test_identical_repeats_are_not_n_plus_one(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """A SELECT repeated without parameters, or with its first values, is no N+1."""
    sqlprobe.attach(sqlite_engine, registry=registry, logger=make_logger(logs))
    with sqlite_engine.connect() as conn:
        for _ in range(8):
            conn.exec_driver_sql("SELECT 1")
    with sqlite_engine.connect() as conn:
        for _ in range(8):
            conn.exec_driver_sql("SELECT ?", (7,))
    assert events(logs) == []
    assert total(registry, N_PLUS_ONE) == 0
    with sqlite_engine.connect() as conn:  # the same loop with varying values is one
        for i in range(8):
            conn.exec_driver_sql("SELECT ?", (i,))
    assert len(events(logs)) == 1
    assert total(registry, N_PLUS_ONE) == 1


def test_counts_per_unit_are_bounded(
    sqlite_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """A scope running more distinct shapes than the cap keeps at most the cap."""
    sqlprobe.attach(sqlite_engine, registry=registry, logger=make_logger(logs))
    with sqlprobe.scope("many") as unit, sqlite_engine.connect() as conn:
        for i in range(_nplusone.MAX_SHAPES_PER_UNIT + 40):
            conn.exec_driver_sql(f"SELECT 1 AS c{i}")
        # The detector's counts (the pool hooks keep the unit's totals in state too).
        counts = next(v for v in unit.state.values() if isinstance(v, dict))
        assert len(counts) == _nplusone.MAX_SHAPES_PER_UNIT


def test_shared_series_exports_one_sample(registry: CollectorRegistry, logs: LogCapture) -> None:
    """Two engines under one name share one n_plus_one sample set (no duplicate series)."""
    engines = [create_engine("sqlite://"), create_engine("sqlite://")]
    for engine in engines:
        sqlprobe.attach(engine, registry=registry, name="shared", logger=make_logger(logs))
        with engine.connect() as conn:
            for i in range(5):  # varying parameters: a repeat of one value is no N+1
                conn.exec_driver_sql("SELECT ?", (i,))
    samples = [s for m in registry.collect() for s in m.samples if s.name == N_PLUS_ONE]
    assert len(samples) == 1
    assert samples[0].value == 2


# -- AsyncSession on PostgreSQL ------------------------------------------------------------


def async_models(suffix: str) -> tuple[Any, Any, Any]:
    """Fresh mapped classes with per-test table names (tests share the database)."""
    from sqlalchemy.ext.asyncio import AsyncAttrs

    class AsyncBase(AsyncAttrs, DeclarativeBase):
        pass

    class Author(AsyncBase):
        __tablename__ = f"n1_authors_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(40))
        books: Mapped[list[Book]] = relationship(back_populates="author")

    class Book(AsyncBase):
        __tablename__ = f"n1_books_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        author_id: Mapped[int] = mapped_column(ForeignKey(f"n1_authors_{suffix}.id"))
        author: Mapped[Author] = relationship(back_populates="books")

    return AsyncBase, Author, Book


@pytest.mark.postgres
async def test_async_session_lazy_loads_named(
    async_pg_engine: Any, registry: CollectorRegistry, logs: LogCapture, unique: str
) -> None:
    """AsyncSession awaiting a lazy collection per row is detected and named."""
    from sqlalchemy.ext.asyncio import AsyncSession

    base, author_cls, book_cls = async_models(unique)
    async with async_pg_engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)
    try:
        async with AsyncSession(async_pg_engine) as session:
            session.add_all(
                [author_cls(name=f"a{i}", books=[book_cls(), book_cls()]) for i in range(8)]
            )
            await session.commit()
        sqlprobe.attach(async_pg_engine, registry=registry, logger=make_logger(logs))
        async with AsyncSession(async_pg_engine) as session:
            authors = (await session.scalars(select(author_cls))).all()
            for author in authors:
                assert len(await author.awaitable_attrs.books) == 2
            # Same loop with the loader option: no new detection.
            session.expunge_all()
            query = select(author_cls).options(selectinload(author_cls.books))
            for author in (await session.scalars(query)).all():
                assert len(author.books) == 2
        found = events(logs)
        assert [e["relationship"] for e in found] == ["Author.books"]
        assert found[0]["suggestion"] == "selectinload(Author.books)"
        assert found[0]["source"].startswith("tests/test_nplusone.py:")
        assert "test_async_session_lazy_loads_named" in found[0]["source"]
    finally:
        async with async_pg_engine.begin() as conn:
            await conn.run_sync(base.metadata.drop_all)


@pytest.mark.postgres
async def test_async_session_explicit_scope_and_edge(
    async_pg_engine: Any, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """With AsyncSession, 4 repeats in a scope pass and the 5th is reported under its name."""
    from sqlalchemy.ext.asyncio import AsyncSession

    sqlprobe.attach(async_pg_engine, registry=registry, logger=make_logger(logs))
    query = text("SELECT CAST(:n AS integer) + 1")
    async with AsyncSession(async_pg_engine) as session:
        with sqlprobe.scope("job"):
            for n in range(4):
                await session.execute(query, {"n": n})
            assert events(logs) == []
            await session.execute(query, {"n": 4})
    found = events(logs)
    assert [(e["scope"], e["count"]) for e in found] == [("job", 5)]
