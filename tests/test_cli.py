"""`sqlprobe demo`: the main job runs, serves /metrics while it runs and prints its table."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_demo_runs_on_embedded_sqlite(tmp_path: Path) -> None:
    """`sqlprobe demo` runs on SQLite, serves /metrics while running, prints top statements."""
    port = _free_port()
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlprobe.cli", "demo", "--duration", "4", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    body = ""
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "sqlprobe_statement_calls_total" not in body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.2)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.decode()
    assert proc.returncode == 0, text
    assert (tmp_path / "sqlprobe-demo.db").exists()
    assert 'engine="demo"' in body
    assert re.search(r'sqlprobe_query_errors_total\{[^}]*error="OperationalError"', body) or (
        "Top statements by total time" in text
    )
    assert "Top statements by total time" in text
    assert "sqlprobe_sleep" in text  # the deliberately slow query tops the table
    # The events point at the demo's own code and name the relationship and its fix.
    assert re.search(r"n_plus_one .*relationship=User\.orders", text)
    assert "suggestion=selectinload(User.orders)" in text
    assert re.search(r"source='?[^ ]*cli\.py:\d+ in n_plus_one_page", text)
    assert re.search(r"slow_query .*source='?[^ ]*cli\.py:\d+ in run_demo", text)
    iterations = int(re.search(r"(\d+) iterations, (\d+) statements", text).group(1))  # type: ignore[union-attr]
    assert iterations > 0


def test_demo_on_postgresql_with_iterations(tmp_path: Path) -> None:
    """`--url` runs the same workload on PostgreSQL; `--iterations` bounds it."""
    url = os.environ.get(
        "SQLPROBE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    proc = subprocess.run(
        [
            sys.executable, "-m", "sqlprobe.cli", "demo", "--url", url,
            "--iterations", "3", "--no-metrics",
        ],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    text = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, text
    assert "3 iterations" in text
    assert "pg_sleep" in text
