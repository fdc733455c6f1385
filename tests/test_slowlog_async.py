"""slow_query through AsyncSession / AsyncEngine on asyncpg: the source crosses the greenlet."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe._core._fingerprint import analyze

from .test_slowlog import FIELDS, here, line_after, slow_events

pytestmark = [pytest.mark.postgres, pytest.mark.smoke]


async def test_async_session_events_point_at_the_awaiting_line(
    async_pg_engine: Any, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """Each slow statement via AsyncSession logs one complete event whose source is this line."""
    probe = sqlprobe.attach(
        async_pg_engine, registry=registry, logger=logger, slow_query_threshold=0.1
    )
    sql = "SELECT pg_sleep(0.2), relname FROM pg_class WHERE relname = :name LIMIT 1"
    lines = []
    async with AsyncSession(async_pg_engine) as session:
        for _ in range(2):
            lines.append(line_after())
            (await session.execute(text(sql), {"name": "pg_class"})).all()
        for _ in range(5):
            await session.execute(text("SELECT 1"))
    probe.detach()

    events = slow_events(logs)
    assert len(events) == 2
    shape = analyze(events[0]["statement"])
    name = "test_async_session_events_point_at_the_awaiting_line"
    for event, line in zip(events, lines, strict=True):
        assert set(event) == FIELDS | {"event", "level", "log_level"}
        assert event["engine"] == "postgresql://127.0.0.1:5432/test"
        assert (event["operation"], event["table"]) == ("SELECT", "pg_class")
        assert event["fingerprint"] == shape.fingerprint
        assert event["statement"] == shape.normalized
        assert 200.0 <= event["duration_ms"] < 1000.0
        assert event["threshold_ms"] == 100.0
        assert event["source"] == f"{here(__file__)}:{line} in {name}"
        assert event["suppressed"] == 0


async def test_run_sync_points_at_the_sync_function(
    async_pg_engine: Any, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """A statement issued by a function given to run_sync is located in that function."""
    sqlprobe.attach(async_pg_engine, registry=registry, logger=logger, slow_query_threshold=0.1)
    where: list[int] = []

    def report(sync_conn: Any) -> None:
        where.append(line_after())
        sync_conn.execute(text("SELECT pg_sleep(0.15)"))

    async with async_pg_engine.connect() as conn:
        await conn.run_sync(report)
    (event,) = slow_events(logs)
    assert event["source"] == f"{here(__file__)}:{where[0]} in report"
