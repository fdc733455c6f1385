"""The examples do what they say: /metrics answers at /metrics, nothing is left behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from .test_middleware import load_example

pytestmark = [pytest.mark.smoke, pytest.mark.usefixtures("detach_new_probes")]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def test_fastapi_metrics_at_metrics_without_redirect(registry: CollectorRegistry) -> None:
    """GET /metrics on the FastAPI example is a 200 with sqlprobe's metrics, not a 307."""
    example = load_example("fastapi_app")
    app = example.create_app(registry=registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.get("/users/eager")).status_code == 200
        response = await client.get("/metrics", follow_redirects=False)
    assert response.status_code == 200, response.headers
    assert response.headers["content-type"].startswith("text/plain")
    calls = [
        s.value
        for f in text_string_to_metric_families(response.text)
        for s in f.samples
        if s.name == "sqlprobe_statement_calls_total"
    ]
    assert sum(calls) >= 2  # the users and their orders (selectinload)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_gunicorn_example_leaves_no_database_in_the_repository(tmp_path: Path) -> None:
    """Run as documented (no DATABASE_URL), the gunicorn example keeps its SQLite file in TMPDIR."""
    gunicorn = Path(sys.executable).with_name("gunicorn")
    if not gunicorn.exists():
        pytest.fail("gunicorn is not installed (requirements-dev.txt)")
    app_dir = EXAMPLES / "gunicorn"
    before = sorted(p.name for p in app_dir.iterdir())
    prom = tmp_path / "prom"
    prom.mkdir()
    port = _free_port()
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
        "TMPDIR": str(tmp_path),
        "BIND": f"127.0.0.1:{port}",
        "WORKERS": "1",
    }
    proc = subprocess.Popen(
        [
            str(gunicorn),
            "--chdir",
            str(app_dir),
            "-c",
            str(app_dir / "gunicorn.conf.py"),
            "app:app",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/users", timeout=5) as r:
                    assert r.status == 200
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    pytest.fail(f"gunicorn did not start: {out}")
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    after = sorted(p.name for p in app_dir.iterdir() if p.name != "__pycache__")
    assert after == [n for n in before if n != "__pycache__"]
    assert (tmp_path / "sqlprobe-gunicorn.db").exists()
