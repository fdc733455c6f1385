"""Pool and transaction metrics of an AsyncEngine on asyncpg (AsyncAdaptedQueuePool)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

import sqlprobe

from .conftest import PG_ASYNC_URL, _need, sample

pytestmark = pytest.mark.smoke

WAIT = "sqlprobe_pool_checkout_wait_seconds"
CONNS = "sqlprobe_pool_connections"
TXN = "sqlprobe_transaction_duration_seconds_count"


def gauges(registry: CollectorRegistry) -> tuple[float, float]:
    """(idle, used) as scraped."""
    return (
        sample(registry, CONNS, engine="apg", state="idle"),
        sample(registry, CONNS, engine="apg", state="used"),
    )


@pytest.fixture
async def make_engine(unique: str) -> AsyncIterator[Any]:
    """A factory of asyncpg engines tagged with an application_name; disposed afterwards."""
    _need(5432, "PostgreSQL")
    engines: list[Any] = []

    def make(**kw: Any) -> Any:
        kw.setdefault("connect_args", {"server_settings": {"application_name": f"sp_{unique}"}})
        engine = create_async_engine(PG_ASYNC_URL, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.dispose()


async def test_async_wait_and_used_gauge(make_engine: Any, registry: CollectorRegistry) -> None:
    """Six tasks on two connections, 200 ms each: waits add up and `used` reads 2 meanwhile."""
    engine = make_engine(pool_size=2, max_overflow=0)
    assert isinstance(engine.sync_engine.pool, AsyncAdaptedQueuePool)
    sqlprobe.attach(engine, registry=registry, name="apg")
    hold = 0.2

    async def worker() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))
            await asyncio.sleep(hold)

    tasks = [asyncio.create_task(worker()) for _ in range(6)]
    await asyncio.sleep(hold / 2)
    during = gauges(registry)
    await asyncio.gather(*tasks)
    assert during == (0.0, 2.0)
    assert sample(registry, f"{WAIT}_count", engine="apg") == 6
    assert sample(registry, f"{WAIT}_sum", engine="apg") >= 6 * hold - 0.05
    assert sample(registry, "sqlprobe_pool_connection_use_seconds_count", engine="apg") == 6
    assert gauges(registry) == (2.0, 0.0)
    assert sample(registry, "sqlprobe_pool_max_connections", engine="apg") == 2


async def test_async_timeouts(make_engine: Any, registry: CollectorRegistry) -> None:
    """pool_timeout=0.3 while both connections are held: each timeout counted once, same error."""
    engine = make_engine(pool_size=2, max_overflow=0, pool_timeout=0.3)
    sqlprobe.attach(engine, registry=registry, name="apg")
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))
            if gauges(registry)[1] == 2:
                held.set()
            await release.wait()

    holders = [asyncio.create_task(holder()) for _ in range(2)]
    await asyncio.wait_for(held.wait(), 5)

    async def requester() -> None:
        async with engine.connect():
            pass

    results = await asyncio.gather(*(requester() for _ in range(3)), return_exceptions=True)
    release.set()
    await asyncio.gather(*holders)
    assert [type(r) for r in results] == [sa_exc.TimeoutError] * 3
    assert sample(registry, "sqlprobe_pool_checkout_timeouts_total", engine="apg") == 3
    assert sample(registry, f"{WAIT}_count", engine="apg") == 2


async def test_async_pre_ping_after_terminate(
    make_engine: Any, registry: CollectorRegistry, unique: str
) -> None:
    """asyncpg backends killed while pooled: invalidations counted, statements succeed."""
    engine = make_engine(pool_size=2, max_overflow=0, pool_pre_ping=True)
    sqlprobe.attach(engine, registry=registry, name="apg")
    async with engine.connect() as a, engine.connect() as b:
        await a.execute(text("select 1"))
        await b.execute(text("select 1"))
    killer = make_engine(connect_args={})
    async with killer.connect() as conn:
        killed = await conn.scalar(
            text(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                "where application_name = :name"
            ),
            {"name": f"sp_{unique}"},
        )
    assert killed == 2
    for _ in range(3):
        async with engine.connect() as conn:
            assert await conn.scalar(text("select 2")) == 2
    assert sample(registry, "sqlprobe_pool_invalidations_total", engine="apg") == 2
    assert sample(registry, "sqlprobe_pool_connects_total", engine="apg") == 4
    assert gauges(registry) == (2.0, 0.0)


async def test_async_transactions(
    make_engine: Any, registry: CollectorRegistry, unique: str
) -> None:
    """AsyncConnection and AsyncSession: commits and rollbacks, exception-caused ones too."""
    engine = make_engine()
    sqlprobe.attach(engine, registry=registry, name="apg")

    def outcomes() -> tuple[float, float]:
        return (
            sample(registry, TXN, engine="apg", outcome="commit"),
            sample(registry, TXN, engine="apg", outcome="rollback"),
        )

    name = f"sp_atxn_{unique}"
    async with engine.begin() as conn:
        await conn.execute(text(f"create table {name} (id int primary key)"))
    try:
        assert outcomes() == (1.0, 0.0)
        async with engine.connect() as conn:
            await conn.execute(text(f"insert into {name} values (1)"))
            await conn.rollback()
        assert outcomes() == (1.0, 1.0)
        with pytest.raises(sa_exc.IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(text(f"insert into {name} values (2), (2)"))
        assert outcomes() == (1.0, 2.0)
        async with AsyncSession(engine) as session:
            await session.execute(text(f"insert into {name} values (3)"))
            await session.commit()
        assert outcomes() == (2.0, 2.0)
        with pytest.raises(RuntimeError):
            async with AsyncSession(engine) as session, session.begin():
                await session.execute(text(f"insert into {name} values (4)"))
                raise RuntimeError("application error")
        assert outcomes() == (2.0, 3.0)
        async with engine.connect() as conn:
            assert (await conn.execute(text(f"select id from {name}"))).scalars().all() == [3]
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"drop table {name}"))


async def test_async_dispose_keeps_gauges_right(
    make_engine: Any, registry: CollectorRegistry
) -> None:
    """AsyncEngine.dispose(): the new pool is measured; the old one's idle connections are gone."""
    engine = make_engine(pool_size=2, max_overflow=0)
    sqlprobe.attach(engine, registry=registry, name="apg")
    async with engine.connect() as conn:
        await conn.execute(text("select 1"))
    assert gauges(registry) == (1.0, 0.0)
    await engine.dispose()
    assert gauges(registry) == (0.0, 0.0)
    async with engine.connect() as conn:
        await conn.execute(text("select 1"))
        assert gauges(registry) == (0.0, 1.0)
    assert gauges(registry) == (1.0, 0.0)
    assert sample(registry, f"{WAIT}_count", engine="apg") == 2
