"""Per-unit-of-work histograms by route: exact counts, templates not paths, bounded labels."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

import sqlprobe
from sqlprobe.middleware import SqlprobeASGIMiddleware, SqlprobeWSGIMiddleware

from .conftest import PG_URL, _need, sample

STATEMENTS = "sqlprobe_scope_statements"
DB = "sqlprobe_scope_db_seconds"
WAIT = "sqlprobe_scope_pool_wait_seconds"


@pytest.fixture
def engine(unique: str, detach_new_probes: None) -> Iterator[Engine]:
    """A PostgreSQL engine, disposed after the test."""
    _need(5432, "PostgreSQL")
    engine = create_engine(PG_URL, connect_args={"application_name": f"sqlprobe_sm_{unique}"})
    yield engine
    engine.dispose()


def routes(registry: CollectorRegistry) -> set[str]:
    """Every route label value of the per-unit-of-work histograms."""
    return {
        s.labels["route"]
        for m in registry.collect()
        if m.name in (STATEMENTS, DB, WAIT)
        for s in m.samples
    }


def test_plain_scopes_count_exactly(engine: Engine, registry: CollectorRegistry) -> None:
    """N scopes running k statements each give count N and sum N*k, in two checkouts each."""
    probe = sqlprobe.attach(engine, registry=registry)
    name = probe.name or ""
    n, k = 7, 4
    for _ in range(n):
        with sqlprobe.scope("report"):
            with engine.connect() as conn:
                for i in range(k - 1):
                    conn.execute(text("SELECT :i"), {"i": i})
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    labels = {"engine": name, "route": "report"}
    assert sample(registry, f"{STATEMENTS}_count", **labels) == n
    assert sample(registry, f"{STATEMENTS}_sum", **labels) == n * k
    assert sample(registry, f"{DB}_count", **labels) == n
    assert 0 < sample(registry, f"{DB}_sum", **labels) < 5
    assert sample(registry, f"{WAIT}_count", **labels) == n


def test_connection_still_out_at_scope_end_counts(
    engine: Engine, registry: CollectorRegistry
) -> None:
    """A connection checked in after its scope ended counts as it stood at the end."""
    probe = sqlprobe.attach(engine, registry=registry)
    conn = None
    with sqlprobe.scope("leaky"):
        conn = engine.connect()
        conn.execute(text("SELECT 1"))
        conn.execute(text("SELECT 2"))
    conn.execute(text("SELECT 3"))
    conn.close()
    labels = {"engine": probe.name or "", "route": "leaky"}
    assert sample(registry, f"{STATEMENTS}_count", **labels) == 1
    assert sample(registry, f"{STATEMENTS}_sum", **labels) == 2


def test_asgi_requests_by_template_never_by_path(
    engine: Engine, registry: CollectorRegistry
) -> None:
    """Starlette requests with ids in paths are counted under the route template."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    probe = sqlprobe.attach(engine, registry=registry)
    k = 3

    def user(request: Any) -> PlainTextResponse:
        with engine.connect() as conn:
            for _ in range(k):
                conn.execute(text("SELECT :id"), {"id": int(request.path_params["user_id"])})
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/users/{user_id}", user)])
    app.add_middleware(SqlprobeASGIMiddleware)
    client = TestClient(app)
    ids = [1234567, 7654321, 555, 98765, 4242]
    for i in ids:
        assert client.get(f"/users/{i}").text == "ok"
    assert client.get("/nowhere/31337").status_code == 404
    labels = {"engine": probe.name or "", "route": "GET /users/{user_id}"}
    assert sample(registry, f"{STATEMENTS}_count", **labels) == len(ids)
    assert sample(registry, f"{STATEMENTS}_sum", **labels) == len(ids) * k
    found = routes(registry)
    assert found == {"GET /users/{user_id}"}
    assert not any(re.search(r"\d{3,}", r) for r in found)


def test_wsgi_requests_by_flask_rule(engine: Engine, registry: CollectorRegistry) -> None:
    """Flask requests count under the URL rule even when the session outlives the request."""
    from flask import Flask

    probe = sqlprobe.attach(engine, registry=registry)
    app = Flask(__name__)
    held: list[Any] = []

    @app.route("/orders/<int:order_id>")
    def order(order_id: int) -> str:
        conn = engine.connect()
        conn.execute(text("SELECT :id"), {"id": order_id})
        conn.execute(text("SELECT 2"))
        held.append(conn)
        return "ok"

    @app.teardown_appcontext
    def close(_exc: Any) -> None:  # like Flask-SQLAlchemy: after the request context
        while held:
            held.pop().close()

    app.wsgi_app = SqlprobeWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    client = app.test_client()
    for i in (101, 202, 303):
        response = client.get(f"/orders/{i}")
        assert response.data == b"ok"
        response.close()  # what a WSGI server does at the end of the response
    labels = {"engine": probe.name or "", "route": "GET /orders/<int:order_id>"}
    assert sample(registry, f"{STATEMENTS}_count", **labels) == 3
    assert sample(registry, f"{STATEMENTS}_sum", **labels) == 6
    assert routes(registry) == {"GET /orders/<int:order_id>"}


def test_unmatched_requests_never_label_the_path(
    engine: Engine, registry: CollectorRegistry
) -> None:
    """A request whose template is unknown is labelled METHOD _unmatched, not its path."""
    from werkzeug.test import Client

    sqlprobe.attach(engine, registry=registry)

    def app(environ: Any, start_response: Any) -> Any:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"x"]

    client = Client(SqlprobeWSGIMiddleware(app))
    for i in range(5):
        client.get(f"/items/{1000 + i}").close()
    client.open(f"/items/{9000}", method="BREW").close()
    assert routes(registry) == {"GET _unmatched", "OTHER _unmatched"}


def test_routes_beyond_max_routes_count_as_other(
    engine: Engine, registry: CollectorRegistry
) -> None:
    """Beyond max_routes labels per engine, further routes are counted under _other."""
    probe = sqlprobe.attach(engine, registry=registry, max_routes=3)
    for i in range(6):
        with sqlprobe.scope(f"job-{i}"), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert routes(registry) == {"job-0", "job-1", "job-2", "_other"}
    other = {"engine": probe.name or "", "route": "_other"}
    assert sample(registry, f"{STATEMENTS}_count", **other) == 3


def test_max_routes_is_validated() -> None:
    """max_routes must be a positive integer (checked at attach)."""
    engine = create_engine("sqlite://")
    with pytest.raises(ValueError, match="max_routes"):
        sqlprobe.attach(engine, registry=CollectorRegistry(), max_routes=0)
    with pytest.raises(ValueError, match="pool_hold_threshold"):
        sqlprobe.attach(engine, registry=CollectorRegistry(), pool_hold_threshold=-1)
