"""OTel metrics with a meter_provider: statement duration and the pool metrics, read back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, exc, text
from sqlalchemy.engine import Engine

import sqlprobe
from sqlprobe._config import DEFAULT_BUCKETS

from .conftest import PG_URL, _need

pytestmark = pytest.mark.smoke


@pytest.fixture
def reader() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    r = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[r])
    yield provider, r
    provider.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    if data is None:
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            if sm.scope.name != "sqlprobe":
                continue
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def test_operation_duration(
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    reader: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    """db.client.operation.duration counts statements with semconv attributes, advisory buckets."""
    provider, r = reader
    probe = sqlprobe.attach(sqlite_engine, registry=registry, meter_provider=provider)
    try:
        with sqlite_engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            for i in range(3):
                conn.execute(text("SELECT id FROM t WHERE id = :i"), {"i": i})
            conn.execute(text("INSERT INTO t VALUES (1)"))
            with pytest.raises(exc.IntegrityError):
                conn.execute(text("INSERT INTO t VALUES (1)"))
        points = _points(r)["db.client.operation.duration"]
        by_attrs = {tuple(sorted(p.attributes.items())): p for p in points}
        select = by_attrs[
            (
                ("db.collection.name", "t"),
                ("db.operation.name", "SELECT"),
                ("db.system.name", "sqlite"),
            )
        ]
        assert isinstance(select, HistogramDataPoint)
        assert select.count == 3
        assert tuple(select.explicit_bounds) == DEFAULT_BUCKETS
        failed = [p for p in points if p.attributes.get("error.type") == "IntegrityError"]
        assert len(failed) == 1 and failed[0].count == 1
        assert failed[0].attributes["db.response.status_code"] == "1555"
        # Same measurements as Prometheus: the sums agree.
        prom = registry.get_sample_value(
            "sqlprobe_query_duration_seconds_sum",
            {"engine": probe.name or "", "operation": "SELECT"},
        )
        assert prom is not None and abs(select.sum - prom) < 1e-9
        assert not any("sqlprobe.fingerprint" in p.attributes for p in points)
    finally:
        probe.detach()


@pytest.fixture
def small_pool() -> Iterator[Engine]:
    _need(5432, "PostgreSQL")
    engine = create_engine(PG_URL, pool_size=1, max_overflow=1, pool_timeout=0.05)
    yield engine
    engine.dispose()


def test_pool_metrics(
    small_pool: Engine,
    registry: CollectorRegistry,
    reader: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    """Connection count by state, max, wait/use/create times and timeouts are emitted."""
    provider, r = reader
    probe = sqlprobe.attach(small_pool, registry=registry, meter_provider=provider)
    if "connect" not in vars(small_pool.pool):
        probe.detach()
        pytest.fail("the pool hooks (pool.connect wrapper) are not installed")
    try:
        first = small_pool.connect()
        second = small_pool.connect()
        with pytest.raises(exc.TimeoutError):
            small_pool.connect()
        points = _points(r)
        count = {
            p.attributes["db.client.connection.state"]: p.value
            for p in points["db.client.connection.count"]
        }
        assert count == {"idle": 0, "used": 2}
        assert [p.value for p in points["db.client.connection.max"]] == [2]
        assert [p.value for p in points["db.client.connection.timeouts"]] == [1]
        first.close()
        second.close()
        points = _points(r)
        count = {
            p.attributes["db.client.connection.state"]: p.value
            for p in points["db.client.connection.count"]
        }
        assert count == {"idle": 1, "used": 0}  # the overflow connection was closed
        for name, n in (
            ("db.client.connection.wait_time", 2),
            ("db.client.connection.use_time", 2),
            ("db.client.connection.create_time", 2),
        ):
            (point,) = points[name]
            assert point.count == n, name
            assert point.attributes == {"db.client.connection.pool.name": probe.name}
    finally:
        probe.detach()
