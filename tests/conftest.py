"""Shared fixtures: a fresh registry and log capture per test, real database engines.

PostgreSQL (127.0.0.1:5432, database ``test``) and MariaDB (127.0.0.1:3306, database
``test``) are real servers; each test that needs tables gets its own schema objects and
drops them afterwards. A server that is down fails the tests that need it (in CI) or
skips them with the reason (outside CI), never silently.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from structlog.testing import LogCapture

PG_URL = os.environ.get("SQLPROBE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_ASYNC_URL = os.environ.get(
    "SQLPROBE_TEST_PG_ASYNC_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("SQLPROBE_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _need(port: int, what: str) -> None:
    if not _reachable(port):
        if os.environ.get("CI"):
            pytest.fail(f"{what} is not running on 127.0.0.1:{port}")
        pytest.skip(f"{what} is not running on 127.0.0.1:{port}")


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh Prometheus registry for one test."""
    return CollectorRegistry()


@pytest.fixture
def detach_new_probes() -> Iterator[None]:
    """Detach every probe a test attached, so no listener outlives its test."""
    from sqlprobe import _state

    before = {id(p) for p in _state.probes.values()}
    yield
    for probe in list(_state.probes.values()):
        if id(probe) not in before:
            probe.detach()


@pytest.fixture
def logs() -> LogCapture:
    """A structlog capture; pass ``logger=make_logger(logs)`` to attach()."""
    return LogCapture()


def make_logger(capture: LogCapture) -> Any:
    """A structlog logger whose events land in ``capture`` (no global configuration)."""
    return structlog.wrap_logger(None, processors=[structlog.processors.add_log_level, capture])


@pytest.fixture
def logger(logs: LogCapture) -> Any:
    """A logger writing into this test's ``logs`` capture."""
    return make_logger(logs)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for table names, so parallel or repeated runs never collide."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def sqlite_engine() -> Iterator[Engine]:
    """An in-memory SQLite engine."""
    engine = create_engine("sqlite://")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    """An engine on the real PostgreSQL (psycopg 3)."""
    _need(5432, "PostgreSQL")
    engine = create_engine(PG_URL)
    yield engine
    engine.dispose()


@pytest.fixture
def mysql_engine() -> Iterator[Engine]:
    """An engine on the real MariaDB (pymysql)."""
    _need(3306, "MariaDB")
    engine = create_engine(MYSQL_URL)
    yield engine
    engine.dispose()


@pytest.fixture
async def async_pg_engine() -> AsyncIterator[Any]:
    """An AsyncEngine on the real PostgreSQL (asyncpg)."""
    _need(5432, "PostgreSQL")
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(PG_ASYNC_URL)
    yield engine
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def any_engine(request: pytest.FixtureRequest) -> Engine:
    """The same test on SQLite, PostgreSQL and MariaDB."""
    name = {"sqlite": "sqlite_engine", "postgresql": "pg_engine", "mariadb": "mysql_engine"}
    engine: Engine = request.getfixturevalue(name[request.param])
    return engine


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0.0 when the series does not exist."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of every sample called ``name`` whose labels include ``labels``."""
    out = 0.0
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out += s.value
    return out
