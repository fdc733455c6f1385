"""Concurrency: threads and asyncio tasks at once, with pool contention, lose no count.

8 threads on a psycopg engine and 200 asyncio tasks on an asyncpg AsyncEngine run at
the same time against the real PostgreSQL, each engine with a pool much smaller than
its workers, while another thread scrapes the registry in a loop. Every statement,
histogram observation, pool checkout and transaction must be counted exactly once, and
everything must finish within bounded waits (a deadlock fails the test, it does not
hang it).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, literal_column, select, text
from sqlalchemy.ext.asyncio import create_async_engine

import sqlprobe

from ..conftest import PG_ASYNC_URL, PG_URL, _need, make_logger, sample
from .conftest import samples_by

THREADS = 8
THREAD_ITERATIONS = 120
TASKS = 200
TASK_ITERATIONS = 6
DEADLINE = 60.0  # seconds; far above the ~3 s a run takes, far below a CI timeout

pytestmark = pytest.mark.postgres


def _calls_by_statement(registry: CollectorRegistry, engine: str) -> dict[str, float]:
    """Calls per normalized statement text of one engine."""
    texts: dict[str, str] = {}
    calls: dict[str, float] = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.labels.get("engine") != engine:
                continue
            if s.name == "sqlprobe_statement_info":
                texts[s.labels["fingerprint"]] = s.labels["statement"]
            elif s.name == "sqlprobe_statement_calls_total":
                calls[s.labels["fingerprint"]] = s.value
    return {texts.get(fp, fp): n for fp, n in calls.items()}


async def test_threads_and_tasks_lose_no_count(registry: CollectorRegistry, logs: Any) -> None:
    """8 threads and 200 tasks with small pools: exact counts, no deadlock."""
    _need(5432, "PostgreSQL")
    sync_engine = create_engine(PG_URL, pool_size=3, max_overflow=0, pool_timeout=DEADLINE)
    async_engine = create_async_engine(
        PG_ASYNC_URL, pool_size=5, max_overflow=0, pool_timeout=DEADLINE
    )
    # Initialize both dialects first, so their first-connect queries are not counted.
    with sync_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    async with async_engine.connect() as aconn:
        await aconn.execute(text("SELECT 1"))
    logger = make_logger(logs)
    threads_probe = sqlprobe.attach(sync_engine, registry=registry, name="threads", logger=logger)
    tasks_probe = sqlprobe.attach(async_engine, registry=registry, name="tasks", logger=logger)
    one = select(literal_column("1").label("one")).where(text("1 = :x"))
    two = text("SELECT CAST(:a AS INTEGER) + CAST(:b AS INTEGER) AS s")
    errors: list[BaseException] = []
    stop_scraping = threading.Event()
    scrapes = 0

    def worker(n: int) -> None:
        try:
            for i in range(THREAD_ITERATIONS):
                with sync_engine.connect() as conn:
                    assert conn.execute(one, {"x": 1}).scalar() == 1
                    assert conn.execute(two, {"a": n, "b": i}).scalar() == n + i
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def scraper() -> None:
        nonlocal scrapes
        while not stop_scraping.is_set():
            generate_latest(registry)
            scrapes += 1
            time.sleep(0.005)

    async def task(n: int) -> None:
        for i in range(TASK_ITERATIONS):
            async with async_engine.connect() as aconn:
                assert (await aconn.execute(one, {"x": 1})).scalar() == 1
                assert (await aconn.execute(two, {"a": n, "b": i})).scalar() == n + i

    try:
        scrape_thread = threading.Thread(target=scraper, daemon=True)
        scrape_thread.start()
        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
        for t in threads:
            t.start()
        await asyncio.wait_for(asyncio.gather(*(task(n) for n in range(TASKS))), DEADLINE)
        deadline = time.monotonic() + DEADLINE
        for t in threads:
            await asyncio.to_thread(t.join, max(deadline - time.monotonic(), 0.1))
        stuck = [t for t in threads if t.is_alive()]
        assert not stuck, f"{len(stuck)} threads still running after {DEADLINE} s: deadlock?"
        stop_scraping.set()
        scrape_thread.join(5)
        assert not scrape_thread.is_alive()
        assert not errors, errors
        assert scrapes > 0

        for name, statements in (
            ("threads", THREADS * THREAD_ITERATIONS),
            ("tasks", TASKS * TASK_ITERATIONS),
        ):
            calls = _calls_by_statement(registry, name)
            assert sorted(calls.values()) == [statements, statements], calls
            selects = sample(
                registry,
                "sqlprobe_query_duration_seconds_count",
                engine=name,
                operation="SELECT",
            )
            assert selects == 2 * statements
            checkouts = sample(registry, "sqlprobe_pool_checkout_wait_seconds_count", engine=name)
            assert checkouts == statements
            # Each connect() block began a transaction that ended in a rollback on close.
            txns = samples_by(registry, "sqlprobe_transaction_duration_seconds_count", "outcome")
            assert (
                sample(
                    registry,
                    "sqlprobe_transaction_duration_seconds_count",
                    engine=name,
                    outcome="rollback",
                )
                == statements
            ), txns
            assert sample(registry, "sqlprobe_pool_connections", engine=name, state="used") == 0
            assert sample(registry, "sqlprobe_pool_checkout_timeouts_total", engine=name) == 0
        assert samples_by(registry, "sqlprobe_internal_errors_total", "stage") == {}
        assert not [e for e in logs.entries if e["event"] == "internal_error"]
    finally:
        stop_scraping.set()
        threads_probe.detach()
        tasks_probe.detach()
        sync_engine.dispose()
        await async_engine.dispose()
