"""N+1 detection: once per unit of work and shape, the cause named, the fix that fits it."""

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

from . import nplusone_corpus as corpus
from .conftest import make_logger, total

pytestmark = [pytest.mark.smoke, pytest.mark.usefixtures("detach_new_probes")]
pytest_plugins = ["pytester"]

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
    """20 users touching lazy User.orders: detected once at the 2nd parent, in the Session."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    with Session(demo_engine) as session:
        assert touch_orders(session) == 60
    found = events(logs)
    assert len(found) == 1
    event_ = found[0]
    assert event_["relationship"] == "User.orders"
    assert event_["suggestion"] == "selectinload(User.orders)"
    assert event_["count"] == 2
    assert event_["scope"] == "session"
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
    ("threshold", "users", "expected"), [(2, 1, 0), (2, 2, 1), (3, 2, 0), (3, 3, 1)]
)
def test_relationship_threshold_edges(
    demo_engine: Engine,
    registry: CollectorRegistry,
    logs: LogCapture,
    threshold: int,
    users: int,
    expected: int,
) -> None:
    """A lazy load for n-1 parents is no N+1; for n parents it is, exactly once."""
    sqlprobe.attach(
        demo_engine,
        registry=registry,
        logger=make_logger(logs),
        n_plus_one_relationship_threshold=threshold,
    )
    with Session(demo_engine) as session:
        touch_orders(session, limit=users)
    assert len(events(logs)) == expected
    assert total(registry, N_PLUS_ONE) == expected


@pytest.mark.parametrize(
    ("threshold", "repeats", "expected"), [(5, 4, 0), (5, 5, 1), (3, 2, 0), (3, 3, 1)]
)
def test_plain_threshold_edges(
    demo_engine: Engine,
    registry: CollectorRegistry,
    logs: LogCapture,
    threshold: int,
    repeats: int,
    expected: int,
) -> None:
    """A plain repeated SELECT shape is an N+1 at n_plus_one_threshold repeats, not before."""
    sqlprobe.attach(
        demo_engine, registry=registry, logger=make_logger(logs), n_plus_one_threshold=threshold
    )
    with Session(demo_engine) as session:  # session.get per id: no relationship involved
        for i in range(1, repeats + 1):
            assert session.get(User, i) is not None
    assert len(events(logs)) == expected
    assert [e["relationship"] for e in events(logs)] == [""] * expected


@pytest.mark.parametrize("bad", [1, 0, True, "2", 2.0])
def test_relationship_threshold_validated_at_attach(demo_engine: Engine, bad: Any) -> None:
    """n_plus_one_relationship_threshold must be an integer of at least 2."""
    with pytest.raises(ValueError, match="n_plus_one_relationship_threshold"):
        sqlprobe.attach(demo_engine, n_plus_one_relationship_threshold=bad)


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
            for user in users[:2]:
                assert user.orders
        # Same Session, but each scope counts on its own (innermost): 1 + 1 < 2.
        for start in (5, 6):
            with sqlprobe.scope("batch"):
                assert users[start].orders
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
    """The Session-class after_begin listener lives while a probe detects N+1; detach ends it."""
    gc.collect()  # engines other tests dropped without detach() release their share
    _state.run_deferred()  # (at the next safe point: attach, detach or a scrape)
    base = _state._orm_users
    one, two = create_engine("sqlite://"), create_engine("sqlite://")
    first = sqlprobe.attach(one, registry=registry, name="one")
    second = sqlprobe.attach(two, registry=registry, name="two")
    assert _state._orm_users == base + 2
    assert event.contains(Session, "after_begin", _orm._on_after_begin)
    first.detach()
    assert event.contains(Session, "after_begin", _orm._on_after_begin)
    second.detach()
    assert _state._orm_users == base
    if base == 0:
        assert not event.contains(Session, "after_begin", _orm._on_after_begin)
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


# -- the corpus ------------------------------------------------------------------------------


def run_scenario(
    scenario: corpus.Scenario, engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> list[dict[str, Any]]:
    corpus.prepare(engine)
    if scenario.setup is not None:
        scenario.setup(engine)
    probe = sqlprobe.attach(engine, registry=registry, logger=make_logger(logs))
    try:
        scenario.run(engine)
    finally:
        probe.detach()
    return events(logs)


def check_scenario(scenario: corpus.Scenario, found: list[dict[str, Any]]) -> None:
    got = sorted((e["relationship"], e["suggestion"]) for e in found)
    assert got == sorted(scenario.expected), scenario.name
    if scenario.scope is not None:
        assert {e["scope"] for e in found} == {scenario.scope}
    for e in found:
        assert e["source"].startswith("tests/nplusone_corpus.py:"), e["source"]


@pytest.mark.parametrize("scenario", corpus.SCENARIOS, ids=lambda s: s.name)
def test_corpus_sqlite(
    scenario: corpus.Scenario, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Each corpus scenario on SQLite: every real N+1 found with its fix, clean ones clean."""
    engine = create_engine("sqlite://")
    try:
        check_scenario(scenario, run_scenario(scenario, engine, registry, logs))
        assert total(registry, N_PLUS_ONE) == len(scenario.expected)
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize(
    "scenario", [s for s in corpus.SCENARIOS if s.postgres], ids=lambda s: s.name
)
def test_corpus_postgres(
    scenario: corpus.Scenario, pg_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """The PostgreSQL subset of the corpus reports what it does on SQLite."""
    try:
        check_scenario(scenario, run_scenario(scenario, pg_engine, registry, logs))
    finally:
        corpus.Base.metadata.drop_all(pg_engine)


def test_corpus_size() -> None:
    """The corpus holds at least the issue's 14 real and 11 clean scenarios."""
    real = [s for s in corpus.SCENARIOS if s.expected]
    clean = [s for s in corpus.SCENARIOS if not s.expected]
    assert len(real) >= 14 and len(clean) >= 11
    assert len({s.name for s in corpus.SCENARIOS}) == len(corpus.SCENARIOS)


# -- units of work ---------------------------------------------------------------------------


def test_no_listener_on_orm_executions(demo_engine: Engine, registry: CollectorRegistry) -> None:
    """With detection on, sqlprobe adds no do_orm_execute listener (naming costs nothing)."""
    sqlprobe.attach(demo_engine, registry=registry)
    ours = [
        fn
        for fn in Session(demo_engine).dispatch.do_orm_execute
        if getattr(fn, "__module__", "").startswith("sqlprobe")
    ]
    assert ours == []
    assert event.contains(Session, "after_begin", _orm._on_after_begin)


def test_session_unit_spans_commits_and_ends_at_close(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """One lazy load before and one after a commit add up; a closed Session starts anew."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    with Session(demo_engine, expire_on_commit=False) as session:
        users = session.scalars(select(User).order_by(User.id).limit(4)).all()
        assert users[0].orders
        session.close()  # the unit ends here: the next load is the first of a new one
        session.add_all(users[1:])
        assert users[1].orders
        assert events(logs) == []
        session.commit()
        assert users[2].orders  # another transaction, the same Session
    found = events(logs)
    assert [(e["scope"], e["relationship"], e["count"]) for e in found] == [
        ("session", "User.orders", 2)
    ]


def test_closed_session_on_external_connection_falls_back_to_transaction(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Once a Session bound to a test's connection is closed, that connection's own
    statements count in its transaction again, not in the closed Session."""
    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    query = text("SELECT id FROM sqlprobe_demo_orders WHERE user_id = :u")
    with demo_engine.connect() as conn:
        with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
            assert session.get(User, 1) is not None
            conn.execute(query, {"u": 1})
        for u in range(2, 7):
            conn.execute(query, {"u": u})
    assert [(e["scope"], e["count"]) for e in events(logs)] == [("transaction", 5)]


def test_session_counts_do_not_keep_sessions_alive(
    demo_engine: Engine, registry: CollectorRegistry
) -> None:
    """The connection holds its Session weakly; the counts live on the identity map."""
    import weakref

    sqlprobe.attach(demo_engine, registry=registry)
    session = Session(demo_engine)
    touch_orders(session, limit=3)
    held = weakref.ref(session)
    session.close()
    del session
    gc.collect()
    assert held() is None


def test_test_unit_spans_sessions_and_keeps_requests_innermost(
    demo_engine: Engine, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """A per-test unit adds up loads across Sessions; request scopes inside count alone."""
    from sqlprobe._core._scope import per_test_unit

    sqlprobe.attach(demo_engine, registry=registry, logger=make_logger(logs))
    engine = demo_engine
    corpus_engine = create_engine("sqlite://")
    corpus.prepare(corpus_engine)
    sqlprobe.attach(corpus_engine, registry=registry, logger=make_logger(logs), name="corpus")
    try:
        with per_test_unit("tests/test_x.py::test_requests"):
            corpus.six_clean_requests(corpus_engine)  # 6 requests, each its own unit
            assert events(logs) == []
            corpus.one_lazy_load_per_session(corpus_engine)  # the test is the unit
        found = events(logs)  # the lazy loads at the 2nd Session, the gets at the 5th
        assert [(e["scope"], e["relationship"]) for e in found] == [
            ("tests/test_x.py::test_requests", "Author.books"),
            ("tests/test_x.py::test_requests", ""),
        ]
        corpus.one_lazy_load_per_session(corpus_engine)  # no test unit: one per Session
        assert len(events(logs)) == 2
    finally:
        corpus_engine.dispose()
    del engine


def test_describe_path_chains_loader_options() -> None:
    """A loader path gives the last relationship's name and options chained from the root."""
    from sqlalchemy import inspect

    path = inspect(User)._path_registry[User.orders.property][inspect(Order)][Order.user.property]
    assert _nplusone.describe_path(path) == (
        "Order.user",
        "selectinload(User.orders).joinedload(Order.user)",
    )
    assert _nplusone.describe_path(()) == ("", "")


def test_classify_core_statement_is_a_plain_repeat(sqlite_engine: Engine) -> None:
    """A Core statement has no ORM load options: a plain repeat, at n_plus_one_threshold."""
    seen: list[Any] = []

    @event.listens_for(sqlite_engine, "after_cursor_execute")
    def grab(*args: Any) -> None:
        seen.append(_nplusone.classify(args[4]))

    with sqlite_engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert seen == [_nplusone.REPEAT]
    assert not seen[0].per_parent


# -- async -------------------------------------------------------------------------------------


async def test_async_sqlite_corpus_lazy_and_job_loop(
    registry: CollectorRegistry, logs: LogCapture, tmp_path: Any
) -> None:
    """AsyncSession: a lazy collection awaited per row, and a job loop committing per item."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    seed = create_engine(f"sqlite:///{tmp_path}/corpus.db")
    corpus.prepare(seed)
    seed.dispose()
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/corpus.db")
    try:
        sqlprobe.attach(engine, registry=registry, logger=make_logger(logs))
        async with AsyncSession(engine) as session:
            for author in (await session.scalars(select(corpus.Author))).all():
                assert await author.awaitable_attrs.books
        async with AsyncSession(engine, expire_on_commit=False) as session:
            query = select(corpus.Author).order_by(corpus.Author.id).limit(3)
            for author in (await session.scalars(query)).all():
                notes = await session.scalars(author.tags.select())
                session.add(corpus.Log(line=str(len(notes.all()))))
                await session.commit()
        found = events(logs)
        assert [(e["scope"], e["relationship"]) for e in found] == [
            ("session", "Author.books"),
            ("session", "Author.tags"),
        ]
        assert found[0]["suggestion"] == "selectinload(Author.books)"
        assert "test_async_sqlite_corpus_lazy_and_job_loop" in found[0]["source"]
    finally:
        await engine.dispose()


async def test_async_requests_through_asgi_middleware(
    registry: CollectorRegistry, logs: LogCapture, tmp_path: Any
) -> None:
    """ASGI requests with an AsyncSession: a lazy loop is found under the request's name,
    and six requests that each load one parent's books stay clean."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from sqlprobe.middleware import SqlprobeASGIMiddleware

    seed = create_engine(f"sqlite:///{tmp_path}/corpus.db")
    corpus.prepare(seed)
    seed.dispose()
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/corpus.db")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async with AsyncSession(engine) as session:
            if scope["path"] == "/authors":
                query = select(corpus.Author).order_by(corpus.Author.id)
                for author in (await session.scalars(query)).all():
                    assert await author.awaitable_attrs.books
            else:
                author = await session.get(corpus.Author, int(scope["path"].rsplit("/")[-1]))
                assert author is not None and await author.awaitable_attrs.books
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(path: str) -> None:
        sent: list[Any] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "root_path": ""}
        await SqlprobeASGIMiddleware(app)(scope, receive, send)
        assert sent[0]["status"] == 200

    try:
        sqlprobe.attach(engine, registry=registry, logger=make_logger(logs))
        for a in range(1, corpus.AUTHORS + 1):
            await call(f"/authors/{a}")
        assert events(logs) == []
        await call("/authors")
        found = events(logs)
        assert [(e["scope"], e["relationship"], e["suggestion"]) for e in found] == [
            ("GET /authors", "Author.books", "selectinload(Author.books)")
        ]
    finally:
        await engine.dispose()


# -- fixes, applied -----------------------------------------------------------------------------


def _is_loader_option(suggestion: str) -> bool:
    """Whether the pytest plugin's verify-fixes can apply the suggestion as it is."""
    from sqlprobe._pytest._verify import build_option

    try:
        build_option(suggestion)
    except LookupError:
        return False
    return True


@pytest.mark.parametrize(
    "scenario",
    [s for s in corpus.SCENARIOS if any(_is_loader_option(x[1]) for x in s.expected)],
    ids=lambda s: s.name,
)
def test_suggested_loader_options_remove_the_n_plus_one(
    scenario: corpus.Scenario, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Each loader-option fix the corpus gets, applied to its root query, removes that N+1."""
    gc.collect()  # mapped classes of earlier tests' dropped registries: not ambiguous
    engine = create_engine("sqlite://")
    found = run_scenario(scenario, engine, registry, logs)
    from sqlprobe._pytest._verify import build_option

    fixes = {
        e["relationship"]: build_option(e["suggestion"])
        for e in found
        if _is_loader_option(e["suggestion"])
    }
    assert fixes
    logs.entries.clear()

    def apply(state: Any) -> None:
        if not state.is_select or state.is_relationship_load:
            return
        entity = state.statement.column_descriptions[0].get("entity")
        for root, option in fixes.values():
            if entity is root:
                state.statement = state.statement.options(option)

    probe = sqlprobe.attach(engine, registry=CollectorRegistry(), logger=make_logger(logs))
    event.listen(Session, "do_orm_execute", apply)
    try:
        scenario.run(engine)
    finally:
        event.remove(Session, "do_orm_execute", apply)
        probe.detach()
        engine.dispose()
    left = {e["relationship"] for e in events(logs)}
    assert not (left & set(fixes)), left


# -- the corpus in tests: per-test units and the pytest plugin ----------------------------------


@pytest.mark.parametrize("scenario", corpus.SCENARIOS, ids=lambda s: s.name)
def test_corpus_in_a_per_test_unit(
    scenario: corpus.Scenario, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Inside the per-test unit each scenario reports what it must under pytest."""
    from sqlprobe._core._scope import per_test_unit

    engine = create_engine("sqlite://")
    corpus.prepare(engine)
    if scenario.setup is not None:
        scenario.setup(engine)
    probe = sqlprobe.attach(engine, registry=registry, logger=make_logger(logs))
    try:
        with per_test_unit("tests/test_corpus.py::test_scenario"):
            scenario.run(engine)
    finally:
        probe.detach()
        engine.dispose()
    got = sorted((e["relationship"], e["suggestion"]) for e in events(logs))
    assert got == sorted(scenario.expected_in_test())


def test_corpus_under_the_pytest_plugin(pytester: pytest.Pytester) -> None:
    """With --sqlprobe-n-plus-one=fail, each scenario with an N+1 fails naming it, the
    clean ones pass: no false positive, none missed, under the plugin's own attach."""
    pytester.makepyfile(
        test_corpus="""
        import pytest
        from sqlalchemy import create_engine

        from tests import nplusone_corpus as corpus


        @pytest.fixture
        def engine():
            engine = create_engine("sqlite://")
            corpus.prepare(engine)
            yield engine
            engine.dispose()


        @pytest.mark.parametrize("scenario", corpus.SCENARIOS, ids=lambda s: s.name)
        def test_scenario(scenario, engine):
            if scenario.setup is not None:
                scenario.setup(engine)
            scenario.run(engine)
        """
    )
    from .test_pytest_plugin import INNER

    result = pytester.runpytest(*INNER, "--sqlprobe-n-plus-one=fail")
    real = [s for s in corpus.SCENARIOS if s.expected_in_test()]
    result.assert_outcomes(passed=len(corpus.SCENARIOS) - len(real), failed=len(real))
    out = result.stdout.str()
    for scenario in real:
        assert f"FAILED test_corpus.py::test_scenario[{scenario.name}]" in out, scenario.name
        for name, suggestion in scenario.expected_in_test():
            if name:
                assert f"{name}:" in out and suggestion in out, name
