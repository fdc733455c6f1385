"""ASGI and WSGI middleware: a scope per request, named by method and route template."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe import _state
from sqlprobe.middleware import RequestScope, SqlprobeASGIMiddleware, SqlprobeWSGIMiddleware

from .conftest import make_logger, total

pytestmark = pytest.mark.smoke

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py (examples/ is not a package)."""
    module = sys.modules.get(f"sqlprobe_example_{name}")
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(
        f"sqlprobe_example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def detach_new_probes() -> Iterator[None]:
    """Detach every probe a test attached, so no listener outlives its test."""
    before = {id(p) for p in _state.probes.values()}
    yield
    for probe in list(_state.probes.values()):
        if id(probe) not in before:
            probe.detach()


def n_plus_one(logs: LogCapture) -> list[tuple[str, str]]:
    return [(e["scope"], e["relationship"]) for e in logs.entries if e["event"] == "n_plus_one"]


# -- ASGI: the FastAPI example through httpx.ASGITransport ----------------------------------


@pytest.fixture
def fastapi_app(registry: CollectorRegistry, logs: LogCapture) -> Any:
    """The FastAPI example on an in-memory SQLite database."""
    example = load_example("fastapi_app")
    engine = example.make_engine()
    yield example.create_app(engine, registry=registry, logger=make_logger(logs))
    engine.dispose()


async def get(app: Any, path: str) -> Any:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path)


async def test_asgi_n_plus_one_reported_with_route(
    fastapi_app: Any, logs: LogCapture, registry: CollectorRegistry
) -> None:
    """An N+1 in a FastAPI request is reported with "METHOD route" as its scope."""
    response = await get(fastapi_app, "/users")
    assert response.status_code == 200
    assert len(response.json()) == 20
    assert n_plus_one(logs) == [("GET /users", "User.orders")]
    assert total(registry, "sqlprobe_n_plus_one_total", relationship="User.orders") == 1


async def test_asgi_route_template_not_path(fastapi_app: Any, logs: LogCapture) -> None:
    """A parametrised route is named by its template, not by the requested path."""
    await get(fastapi_app, "/orders/recent/10")
    await get(fastapi_app, "/orders/recent/12")
    assert n_plus_one(logs) == [
        ("GET /orders/recent/{limit}", "Order.user"),
        ("GET /orders/recent/{limit}", "Order.user"),
    ]


async def test_asgi_each_request_is_a_unit(fastapi_app: Any, logs: LogCapture) -> None:
    """The eager route is not flagged, and repeats do not add up across requests."""
    for _ in range(3):
        await get(fastapi_app, "/users/eager")
    assert n_plus_one(logs) == []


async def test_asgi_fallback_and_custom_route(
    sqlite_engine: Any, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Without a router the scope is the path; route= supplies a template."""
    sqlprobe.attach(sqlite_engine, registry=registry, logger=make_logger(logs))
    seen: list[tuple[str, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        current = sqlprobe._core._scope.current_scope()
        assert isinstance(current, RequestScope)
        seen.append((current.name, current.route))
        with sqlite_engine.connect() as conn:
            for i in range(5):  # one statement per item: different values
                conn.execute(text("SELECT :i"), {"i": i})
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await get(SqlprobeASGIMiddleware(app), "/items/42")
    custom = SqlprobeASGIMiddleware(app, route=lambda scope: "/items/{id}")
    await get(custom, "/items/43")
    assert seen == [("GET /items/42", "/items/42"), ("GET /items/{id}", "/items/{id}")]
    assert [s for s, _ in n_plus_one(logs)] == ["GET /items/42", "GET /items/{id}"]
    assert sqlprobe._core._scope.current_scope() is None


async def test_asgi_non_http_passes_through() -> None:
    """Lifespan and websocket traffic gets no scope."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(sqlprobe._core._scope.current_scope())

    async def receive() -> Any:
        return {}

    async def send(message: Any) -> None:
        return None

    await SqlprobeASGIMiddleware(app)({"type": "lifespan"}, receive, send)
    assert seen == [None]


# -- WSGI: the Flask example through Flask's test client -----------------------------------


@pytest.fixture
def flask_app(registry: CollectorRegistry, logs: LogCapture) -> Any:
    """The Flask example on an in-memory SQLite database."""
    example = load_example("flask_app")
    engine = example.make_engine()
    yield example.create_app(engine, registry=registry, logger=make_logger(logs))
    engine.dispose()


def test_wsgi_n_plus_one_reported_with_route(
    flask_app: Any, logs: LogCapture, registry: CollectorRegistry
) -> None:
    """An N+1 in a Flask request is reported with the URL rule as its scope."""
    client = flask_app.test_client()
    assert client.get("/users").status_code == 200
    assert client.get("/users/eager").status_code == 200
    assert client.get("/orders/recent/10").status_code == 200
    assert n_plus_one(logs) == [
        ("GET /users", "User.orders"),
        ("GET /orders/recent/<int:limit>", "Order.user"),
    ]
    assert total(registry, "sqlprobe_n_plus_one_total") == 2
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'sqlprobe_n_plus_one_total{engine="sqlite:///:memory:"' in metrics


def test_wsgi_streamed_body_runs_in_scope(
    sqlite_engine: Any, registry: CollectorRegistry, logs: LogCapture
) -> None:
    """Statements run while the body is iterated belong to the request; close() too."""
    from werkzeug.test import Client

    sqlprobe.attach(sqlite_engine, registry=registry, logger=make_logger(logs))
    closed: list[Any] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            with sqlite_engine.connect() as conn:
                for i in range(5):
                    conn.execute(text("SELECT :i"), {"i": i})
                    yield b"x"

        def close(self) -> None:
            closed.append(sqlprobe._core._scope.current_scope())

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    response = Client(SqlprobeWSGIMiddleware(app)).get("/stream/7")
    assert response.get_data() == b"xxxxx"
    response.close()
    assert n_plus_one(logs) == [("GET /stream/7", "")]
    assert [s.name for s in closed] == ["GET /stream/7"]
    assert sqlprobe._core._scope.current_scope() is None


def test_wsgi_error_propagates_and_scope_ends() -> None:
    """An exception from the application reaches the server and the scope is closed."""

    def app(environ: Any, start_response: Any) -> Any:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        SqlprobeWSGIMiddleware(app)({"REQUEST_METHOD": "POST", "PATH_INFO": "/x"}, None)
    assert sqlprobe._core._scope.current_scope() is None


def test_request_scope_name_can_be_fixed() -> None:
    """Assigning name or route replaces the looked-up value."""
    scope = RequestScope("GET", "/a/1", lambda: "/a/{id}")
    assert (scope.name, scope.route) == ("GET /a/{id}", "/a/{id}")
    scope.route = "/a/<id>"
    assert scope.name == "GET /a/<id>"
    scope.name = "job"
    assert scope.name == "job"


def test_sqlcommenter_route_is_the_template(registry: CollectorRegistry) -> None:
    """sqlcommenter's route, read from the request scope, is the Flask URL rule."""
    from flask import Flask
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    sent: list[str] = []
    with engine.connect() as conn:
        conn.connection.driver_connection.set_trace_callback(sent.append)  # type: ignore[union-attr]
    sqlprobe.attach(engine, registry=registry, sqlcommenter=True)
    app = Flask("routes")
    app.wsgi_app = SqlprobeWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]

    @app.get("/users/<int:uid>")
    def user(uid: int) -> str:
        with engine.connect() as conn:
            conn.execute(text("SELECT :uid"), {"uid": uid})
        return "ok"

    assert app.test_client().get("/users/42").status_code == 200
    assert [s for s in sent if s.startswith("SELECT")] == [
        "SELECT 42 /*db_driver='pysqlite',framework='sqlalchemy%3A"
        + sqlalchemy.__version__
        + "',route='%2Fusers%2F%3Cint%3Auid%3E'*/"
    ]
    engine.dispose()
