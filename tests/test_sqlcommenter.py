"""sqlcommenter: the comment the database receives, parsed back against the specification."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState, use_span
from prometheus_client import CollectorRegistry
from sqlalchemy import __version__ as sa_version
from sqlalchemy import text
from sqlalchemy.engine import Engine

import sqlprobe
from sqlprobe._sinks._sqlcommenter import encode, serialize

pytestmark = pytest.mark.smoke

_PAIR = re.compile(r"^([^=']+)='((?:[^'\\]|\\.)*)'$")


def parse(sent: str) -> dict[str, str]:
    """Parse a trailing sqlcommenter comment the way a database-side tool would."""
    match = re.search(r" /\*(.*)\*/;?$", sent)
    assert match is not None, sent
    pairs: dict[str, str] = {}
    keys: list[str] = []
    for item in match.group(1).split(","):
        m = _PAIR.match(item)
        assert m is not None, item
        key = unquote(m.group(1).replace("\\'", "'"))
        keys.append(key)
        pairs[key] = unquote(m.group(2).replace("\\'", "'"))
    assert keys == sorted(keys), "keys must be sorted"
    return pairs


PG_SELF = "SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid() AND 1 = :one"
MY_SELF = "SELECT INFO FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID() AND 1 = :one"


def _sent(engine: Engine, **params: Any) -> str:
    """The text the server received for a statement that reads its own text back."""
    own = PG_SELF if engine.dialect.name == "postgresql" else MY_SELF
    with engine.connect() as conn:
        value: str = conn.execute(text(own), {"one": 1, **params}).scalar_one()
    return value


def test_encoding_round_trip() -> None:
    """Keys and values are URL-encoded like encodeURIComponent, quotes escaped, keys sorted."""
    comment = serialize({"route": "/param first", "action": "it's*(ok)", "b%": "a,b='c'"})
    assert comment == ("/*action='it\\'s*(ok)',b%25='a%2Cb%3D\\'c\\'',route='%2Fparam%20first'*/")
    assert parse(f"SELECT 1 {comment}") == {
        "action": "it's*(ok)",
        "b%": "a,b='c'",
        "route": "/param first",
    }
    assert encode("é") == "%C3%A9"
    assert serialize({"a": ""}) == ""


@pytest.fixture(params=["postgresql", "mariadb"])
def server_engine(request: pytest.FixtureRequest) -> Engine:
    engine: Engine = request.getfixturevalue(
        "pg_engine" if request.param == "postgresql" else "mysql_engine"
    )
    return engine


def test_true_mode_comment_reaches_server(
    server_engine: Engine, registry: CollectorRegistry
) -> None:
    """sqlcommenter=True sends traceparent, tracestate, scope fields, driver, framework."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    probe = sqlprobe.attach(
        server_engine, registry=registry, tracer_provider=provider, sqlcommenter=True
    )
    parent = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("congo", "t61rcWkgMzE"), ("rojo", "00f067aa0ba902b7")]),
    )
    try:
        with (
            use_span(NonRecordingSpan(parent)),
            sqlprobe.scope("users", route="/users/{id}", controller="users", action="show"),
        ):
            sent = _sent(server_engine)
        driver = server_engine.dialect.driver
        assert parse(sent) == {
            "action": "show",
            "controller": "users",
            "db_driver": f"{driver}:{server_engine.dialect.loaded_dbapi.__version__}",
            "framework": f"sqlalchemy:{sa_version}",
            "route": "/users/{id}",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
        }
        assert "route='%2Fusers%2F%7Bid%7D'" in sent  # % survived the driver's formatting
        # Outside any scope or span only the constant keys remain.
        assert set(parse(_sent(server_engine))) == {"db_driver", "framework"}
        assert not [s for s in probe.statements() if "/*" in s.statement]
    finally:
        probe.detach()
        provider.shutdown()


def test_static_mode_identical_every_time(
    server_engine: Engine, registry: CollectorRegistry
) -> None:
    """sqlcommenter="static" sends identical text on every execution: driver and framework only."""
    provider = TracerProvider()
    tracer = provider.get_tracer("tests")
    probe = sqlprobe.attach(
        server_engine, registry=registry, tracer_provider=provider, sqlcommenter="static"
    )
    try:
        seen = set()
        for n in range(3):
            with (
                tracer.start_as_current_span(f"request-{n}"),
                sqlprobe.scope("users", route=f"/r{n}"),
            ):
                seen.add(_sent(server_engine))
        assert len(seen) == 1
        assert set(parse(seen.pop())) == {"db_driver", "framework"}
    finally:
        probe.detach()
        provider.shutdown()


def test_no_params_path_is_commented(pg_engine: Engine, registry: CollectorRegistry) -> None:
    """A statement run without parameters gets the comment with single % escapes."""
    probe = sqlprobe.attach(pg_engine, registry=registry, sqlcommenter="static")
    try:
        with pg_engine.connect() as conn:
            sent = (
                conn.execution_options(no_parameters=True)
                .exec_driver_sql("SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()")
                .scalar_one()
            )
        assert set(parse(sent)) == {"db_driver", "framework"}
    finally:
        probe.detach()


def _sqlite_sent(engine: Engine, sql: str) -> list[str]:
    sent: list[str] = []
    with engine.connect() as conn:
        raw: Any = conn.connection.dbapi_connection
        raw.set_trace_callback(sent.append)
        conn.exec_driver_sql(sql)
        raw.set_trace_callback(None)
    return sent


def test_existing_comment_left_alone(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """A statement that already has a comment is sent unchanged; a trailing ; stays last."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, sqlcommenter=True)
    try:
        assert _sqlite_sent(sqlite_engine, "SELECT 1 /* mine */") == ["SELECT 1 /* mine */"]
        assert _sqlite_sent(sqlite_engine, "SELECT 1 -- mine") == ["SELECT 1 -- mine"]
        (sent,) = _sqlite_sent(sqlite_engine, "SELECT 2;")
        assert sent.endswith("*/;")
        assert set(parse(sent)) == {"db_driver", "framework"}
    finally:
        probe.detach()


def test_fingerprint_and_cache_ignore_comment(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """Per-execution traceparents neither add shapes nor grow the statement cache."""
    provider = TracerProvider()
    tracer = provider.get_tracer("tests")
    probe = sqlprobe.attach(
        sqlite_engine, registry=registry, tracer_provider=provider, sqlcommenter=True
    )
    assert probe.collector is not None
    try:
        with sqlite_engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")  # first-use statements out of the way
            before = probe.collector.cache_size()[0]
            for n in range(5):
                with tracer.start_as_current_span(f"request-{n}"):
                    conn.execute(text("SELECT 42 WHERE 1 = :x"), {"x": n})
        assert probe.collector.cache_size()[0] == before + 1
        (shape,) = [s for s in probe.statements() if "42" in s.statement or s.calls == 5]
        assert "/*" not in shape.statement
    finally:
        probe.detach()
        provider.shutdown()


def test_off_by_default_sends_statement_unchanged(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """Without the sqlcommenter option the driver receives the statement as compiled."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    try:
        assert _sqlite_sent(sqlite_engine, "SELECT 3") == ["SELECT 3"]
    finally:
        probe.detach()


async def test_async_engine_comment(async_pg_engine: Any, registry: CollectorRegistry) -> None:
    """On an AsyncEngine (asyncpg) the comment carries the task's scope and trace context."""
    provider = TracerProvider()
    tracer = provider.get_tracer("tests")
    probe = sqlprobe.attach(
        async_pg_engine, registry=registry, tracer_provider=provider, sqlcommenter=True
    )
    try:
        with (
            tracer.start_as_current_span("request") as span,
            sqlprobe.scope("job", action="nightly"),
        ):
            async with async_pg_engine.connect() as conn:
                result = await conn.execute(text(PG_SELF), {"one": 1})
                sent = result.scalar_one()
        pairs = parse(sent)
        ctx = span.get_span_context()
        flags = f"{ctx.trace_flags:02x}"  # sampled, and W3C level 2's random-trace-id bit
        assert pairs["traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags}"
        assert pairs["action"] == "nightly"
        assert pairs["db_driver"].startswith("asyncpg")
    finally:
        probe.detach()
        provider.shutdown()
