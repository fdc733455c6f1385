"""Transaction duration by outcome on the real PostgreSQL: Core and ORM, commit and rollback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Column, Integer, MetaData, Table, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlprobe

pytestmark = pytest.mark.smoke

COUNT = "sqlprobe_transaction_duration_seconds_count"
SUM = "sqlprobe_transaction_duration_seconds_sum"


def outcomes(registry: CollectorRegistry) -> tuple[float, float]:
    """(commits, rollbacks) as scraped."""
    return tuple(  # type: ignore[return-value]
        registry.get_sample_value(COUNT, {"engine": "pg", "outcome": outcome}) or 0.0
        for outcome in ("commit", "rollback")
    )


@pytest.fixture
def table(pg_engine: Engine, unique: str) -> Iterator[Table]:
    """A one-column table, dropped afterwards."""
    metadata = MetaData()
    t = Table(f"sp_txn_{unique}", metadata, Column("id", Integer, primary_key=True))
    metadata.create_all(pg_engine)
    yield t
    metadata.drop_all(pg_engine)


def test_core_commit_and_rollback(
    pg_engine: Engine, registry: CollectorRegistry, table: Table
) -> None:
    """Core: begin()/commit is a commit, an explicit rollback and a failed block are rollbacks."""
    sqlprobe.attach(pg_engine, registry=registry, name="pg")
    assert outcomes(registry) == (0.0, 0.0)
    with pg_engine.begin() as conn:
        conn.execute(insert(table).values(id=1))
        time.sleep(0.05)
    assert outcomes(registry) == (1.0, 0.0)
    assert registry.get_sample_value(SUM, {"engine": "pg", "outcome": "commit"}) >= 0.05
    with pg_engine.connect() as conn:
        conn.execute(insert(table).values(id=2))
        conn.rollback()
    assert outcomes(registry) == (1.0, 1.0)
    with pytest.raises(IntegrityError), pg_engine.begin() as conn:
        conn.execute(insert(table).values(id=1))
    assert outcomes(registry) == (1.0, 2.0)
    with pytest.raises(ZeroDivisionError), pg_engine.begin() as conn:
        conn.execute(select(table))
        _ = 1 / 0
    assert outcomes(registry) == (1.0, 3.0)
    with pg_engine.connect() as conn:
        assert conn.execute(select(table.c.id)).scalars().all() == [1]
    # A connection closed with its transaction open is rolled back by SQLAlchemy.
    assert outcomes(registry) == (1.0, 4.0)


def test_pool_reset_without_transaction_is_not_counted(
    pg_engine: Engine, registry: CollectorRegistry
) -> None:
    """The pool's reset-on-return rollback of a connection with no begun transaction is ignored."""
    sqlprobe.attach(pg_engine, registry=registry, name="pg")
    raw = pg_engine.raw_connection()
    cursor = raw.cursor()
    cursor.execute("select 1")
    cursor.close()
    raw.close()  # the pool rolls the DBAPI connection back
    with pg_engine.connect():
        pass  # no statement: SQLAlchemy never began a transaction
    assert outcomes(registry) == (0.0, 0.0)


class Base(DeclarativeBase):
    pass


def test_orm_session_outcomes(pg_engine: Engine, registry: CollectorRegistry, unique: str) -> None:
    """ORM: commit() is a commit; an exception inside session.begin() and close() roll back."""

    class Item(Base):
        __tablename__ = f"sp_orm_txn_{unique}"
        id: Mapped[int] = mapped_column(primary_key=True)

    Base.metadata.create_all(pg_engine, tables=[Item.__table__])  # type: ignore[list-item]
    try:
        sqlprobe.attach(pg_engine, registry=registry, name="pg")
        with Session(pg_engine) as session:
            session.add(Item(id=1))
            session.commit()
        assert outcomes(registry) == (1.0, 0.0)
        with pytest.raises(IntegrityError), Session(pg_engine) as session, session.begin():
            session.add(Item(id=1))
        assert outcomes(registry) == (1.0, 1.0)
        with pytest.raises(RuntimeError), Session(pg_engine) as session, session.begin():
            session.execute(select(Item))
            raise RuntimeError("application error")
        assert outcomes(registry) == (1.0, 2.0)
        with Session(pg_engine) as session:
            assert session.scalars(select(Item.id)).all() == [1]
        assert outcomes(registry) == (1.0, 3.0)
    finally:
        Base.metadata.drop_all(pg_engine, tables=[Item.__table__])  # type: ignore[list-item]
        Base.metadata.remove(Item.__table__)  # type: ignore[arg-type]


def test_failed_commit_is_a_rollback(
    pg_engine: Engine, registry: CollectorRegistry, unique: str
) -> None:
    """A commit the database refuses (deferred constraint) ends the transaction as rollback."""
    sqlprobe.attach(pg_engine, registry=registry, name="pg")
    name = f"sp_deferred_{unique}"
    with pg_engine.begin() as conn:
        conn.execute(
            text(
                f"create table {name} (id int, constraint {name}_u unique (id) "
                "deferrable initially deferred)"
            )
        )
    try:
        with pytest.raises(IntegrityError), pg_engine.begin() as conn:
            conn.execute(text(f"insert into {name} values (1), (1)"))
        assert outcomes(registry) == (1.0, 1.0)
    finally:
        with pg_engine.begin() as conn:
            conn.execute(text(f"drop table {name}"))
    assert outcomes(registry) == (2.0, 1.0)
