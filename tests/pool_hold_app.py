"""A WSGI application for the gunicorn fault-injection test (``test_pool_hold_gunicorn``).

Served by ``gunicorn --preload -w 2 tests.pool_hold_app:application``: the engine is
made and attached in the master, the workers are forked from it. Each request holds its
connection inside a transaction while it sleeps; ``pool_hold`` events are appended as
JSON lines to the file named by ``SQLPROBE_TEST_HOLD_LOG``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from sqlalchemy import create_engine, text

import sqlprobe
from sqlprobe.middleware import SqlprobeWSGIMiddleware

LOG = os.environ.get("SQLPROBE_TEST_HOLD_LOG", os.devnull)
URL = os.environ.get("SQLPROBE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _write(logger: Any, method: str, event: Any) -> Any:
    event["pid"] = os.getpid()
    with open(LOG, "a") as f:
        f.write(json.dumps(event, default=str) + "\n")
    raise structlog.DropEvent


engine = create_engine(URL, pool_size=2)
sqlprobe.attach(engine, name="gunicorn", logger=structlog.wrap_logger(None, processors=[_write]))


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    with engine.begin() as conn:  # the checkout line
        conn.execute(text("SELECT 1"))
        time.sleep(0.8)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def _route(environ: dict[str, Any]) -> str | None:
    path = environ.get("PATH_INFO", "")
    return "/hold/{id}" if path.startswith("/hold/") else None


application = SqlprobeWSGIMiddleware(app, route=_route)
