"""A WSGI application under gunicorn workers, with sqlprobe in multiprocess mode.

Run it (from the repository root)::

    mkdir -p /tmp/sqlprobe-prom && rm -f /tmp/sqlprobe-prom/*
    PROMETHEUS_MULTIPROC_DIR=/tmp/sqlprobe-prom \\
        gunicorn --chdir examples/gunicorn -c examples/gunicorn/gunicorn.conf.py app:app

``/metrics`` on any worker serves the sum over all workers; ``/users`` runs queries.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import create_engine, text

import sqlprobe

# The default database lives in the temporary directory, not in the working directory
# (the repository, when run as below), where it would be left behind.
DATABASE_URL = os.environ.get(
    "DATABASE_URL", f"sqlite:///{Path(tempfile.gettempdir()) / 'sqlprobe-gunicorn.db'}"
)

# One engine per worker process: create it after the fork (gunicorn imports this module
# in each worker unless preload_app is on), and attach sqlprobe to it.
engine = create_engine(DATABASE_URL)
sqlprobe.attach(engine, name="app-db")

with engine.begin() as conn:
    conn.execute(text("CREATE TABLE IF NOT EXISTS visits (id INTEGER PRIMARY KEY, path TEXT)"))


def _metrics() -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """GET /users runs two statements; GET /metrics serves the workers' aggregate."""
    path = environ.get("PATH_INFO", "/")
    if path == "/metrics":
        body = _metrics()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [body]
    if path == "/users":
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO visits (path) VALUES (:p)"), {"p": path})
            n = conn.execute(text("SELECT count(*) FROM visits")).scalar_one()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{n} {os.getpid()}\n".encode()]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]
