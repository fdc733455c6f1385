"""Leaks: no parameter value, SQL literal or credential leaves the process by default.

Sentinel secrets go into bound parameters (single rows and executemany), SQL literals,
a driver error message (a unique violation quotes the duplicate value), an internal
error raised with a secret in its message, and the URL password (PostgreSQL trusts
local connections, so any password is accepted). With the default options, except a
zero slow-query threshold so that every statement is logged, none of them may appear
in /metrics (text and OpenMetrics), in any span, or in any log event.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from structlog.testing import LogCapture

import sqlprobe

from ..conftest import MYSQL_URL, PG_URL, _need, make_logger
from .conftest import Boom

PASSWORD = "SentinelPassw0rdQ7"
PARAM = "SentinelParamK2"
MANY = "SentinelManyV5"
LITERAL = "SentinelLiteralX9"
SECRETS = (PASSWORD, PARAM, MANY, LITERAL)

pytestmark = pytest.mark.smoke


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def secret_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine per database; PostgreSQL's URL carries the sentinel password."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'leaks.db'}")
    elif request.param == "postgresql":
        _need(5432, "PostgreSQL")
        engine = create_engine(make_url(PG_URL).set(password=PASSWORD))
    else:
        _need(3306, "MariaDB")
        engine = create_engine(MYSQL_URL)
    yield engine
    engine.dispose()


class LeakySink:
    """A record sink that fails with the statement's parameters in its message."""

    stage = "leaky_test_sink"

    def on_statement(self, record: Any) -> None:
        raise Boom(f"parameters were {record.parameters!r} in {record.statement!r}")


def _workload(engine: Engine, name: str) -> None:
    metadata = MetaData()
    users = Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True),
        Column("login", String(64), unique=True),
        Column("password", String(64)),
    )
    metadata.create_all(engine)
    try:
        with engine.begin() as conn:
            conn.execute(insert(users).values(id=1, login=PARAM, password=PARAM))
            conn.execute(
                insert(users), [{"id": i, "login": f"{MANY}{i}", "password": MANY} for i in (2, 3)]
            )
        with engine.connect() as conn:
            assert conn.execute(select(users.c.id).where(users.c.login == PARAM)).scalar() == 1
            for i in range(6):  # an N+1 shape (varying values), literal in the text
                conn.execute(
                    text(f"SELECT id FROM {name} WHERE password = '{LITERAL}' AND id = :i"),
                    {"i": i},
                ).all()
            conn.execute(text(f"UPDATE {name} SET password = '{LITERAL}' WHERE id = 1"))
            conn.commit()
            with pytest.raises(DBAPIError) as info:
                conn.execute(insert(users).values(id=9, login=PARAM, password="x"))
            assert PARAM in str(info.value)  # the driver quotes the value; sqlprobe must not
            conn.rollback()
            with pytest.raises(DBAPIError):
                conn.exec_driver_sql(f"SELECT '{LITERAL}' FROM")
            conn.rollback()
    finally:
        metadata.drop_all(engine)


def _span_text(span: ReadableSpan) -> str:
    parts = [span.name, repr(dict(span.attributes or {})), repr(span.status.description)]
    for event in span.events:
        parts.append(event.name)
        parts.append(repr(dict(event.attributes or {})))
    return "\n".join(parts)


def _assert_clean(where: str, text_: str) -> None:
    for secret in SECRETS:
        assert secret.lower() not in text_.lower(), f"{secret} leaked into {where}"


def test_no_secret_reaches_metrics_spans_or_logs(
    secret_engine: Engine, registry: CollectorRegistry, logs: LogCapture, unique: str
) -> None:
    """Parameters, literals and the URL password appear in no metric, span or log."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    probe = sqlprobe.attach(
        secret_engine,
        registry=registry,
        tracer_provider=provider,
        logger=make_logger(logs),
        slow_query_threshold=0,
    )
    assert probe.collector is not None
    probe.collector.add_sink(LeakySink())
    try:
        _workload(secret_engine, f"sp_leak_{unique}")
        metrics = generate_latest(registry).decode()
        openmetrics = generate_openmetrics(registry).decode()
        spans = exporter.get_finished_spans()
        events = [e["event"] for e in logs.entries]
    finally:
        probe.detach()

    # The run exercised every path that could leak.
    assert "sqlprobe_query_errors_total" in metrics
    assert 'stage="leaky_test_sink"' in metrics
    assert "trace_id" in openmetrics  # exemplars
    assert {"slow_query", "n_plus_one", "internal_error"} <= set(events), set(events)
    assert any(s.kind is SpanKind.CLIENT and s.attributes for s in spans)
    assert any(s.status.status_code.name == "ERROR" for s in spans)

    _assert_clean("/metrics", metrics)
    _assert_clean("OpenMetrics", openmetrics)
    _assert_clean("the probe", f"{probe!r} {probe.name} {probe.info}")
    for span in spans:
        _assert_clean(f"span {span.name}", _span_text(span))
    for entry in logs.entries:
        _assert_clean(f"log event {entry['event']}", repr(entry))


@pytest.mark.postgres
def test_explain_plans_carry_no_literal(
    registry: CollectorRegistry, logs: LogCapture, unique: str
) -> None:
    """With explain=True (parameters not captured) plans show no literal or parameter."""
    _need(5432, "PostgreSQL")
    engine = create_engine(make_url(PG_URL).set(password=PASSWORD))
    probe = sqlprobe.attach(
        engine, registry=registry, logger=make_logger(logs), slow_query_threshold=0, explain=True
    )
    name = f"sp_leak_plan_{unique}"
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {name} (id int, login text)")
        with engine.connect() as conn:
            conn.execute(
                text(f"SELECT id FROM {name} WHERE login = :p OR login = '{LITERAL}'"),
                {"p": PARAM},
            ).all()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the EXPLAIN worker logs the event when ready
            plans = [
                e["plan"]
                for e in list(logs.entries)
                if e["event"] == "slow_query" and e["table"] == name and e["operation"] == "SELECT"
            ]
            if plans:
                break
            time.sleep(0.01)
        assert plans and "full" in plans[0], plans
        assert "?" in repr(plans[0]["full"])  # the filter is there, its values are not
        for entry in logs.entries:
            _assert_clean(f"log event {entry['event']}", repr(entry))
        _assert_clean("/metrics", generate_latest(registry).decode())
    finally:
        probe.detach()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        engine.dispose()
