"""Prometheus multiprocess mode: several worker processes, exact aggregated counts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from .conftest import PG_URL, total

pytestmark = pytest.mark.smoke

WORKER = textwrap.dedent(
    """
    import os, sys
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError
    import sqlprobe
    from sqlprobe._sinks._multiprocess import multiprocess_active

    assert multiprocess_active(), "multiprocess mode should be on in the worker"
    n = int(sys.argv[1])
    engine = create_engine(sys.argv[2])
    probe = sqlprobe.attach(engine, name="mp", slow_query_threshold=10)
    with engine.connect() as conn:
        for i in range(n):
            conn.execute(text("SELECT :i + 1 AS x"), {"i": i})
        try:
            conn.execute(text("SELECT * FROM sqlprobe_mp_missing"))
        except DBAPIError:
            pass
    print(sum(s.calls for s in probe.statements()))
    """
)


def _run_workers(tmp_path: Path, url: str, workers: int, n: int) -> list[int]:
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(n), url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(workers)
    ]
    counts = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        counts.append(int(out.decode().split()[-1]))
    PIDS[:] = [p.pid for p in procs]
    return counts


PIDS: list[int] = []


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/mp.db", PG_URL])
def test_worker_processes_add_up_exactly(tmp_path: Path, url: str) -> None:
    """Counts written by several worker processes aggregate exactly at scrape time."""
    workers, n = 3, 300
    url = url.format(tmp=tmp_path)
    per_worker = _run_workers(tmp_path, url, workers, n)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path / "prom"))
    calls = total(registry, "sqlprobe_statement_calls_total", engine="mp")
    assert calls == sum(per_worker)
    mine = [
        s
        for m in registry.collect()
        for s in m.samples
        if s.name == "sqlprobe_statement_info" and "AS x" in s.labels["statement"]
    ]
    assert len(mine) == 1
    fingerprint = mine[0].labels["fingerprint"]
    assert total(registry, "sqlprobe_statement_calls_total", fingerprint=fingerprint) == (
        workers * n
    )
    duration_count = total(registry, "sqlprobe_query_duration_seconds_count", engine="mp")
    assert duration_count == sum(per_worker)
    inf = total(registry, "sqlprobe_query_duration_seconds_bucket", engine="mp", le="+Inf")
    assert inf == sum(per_worker)
    assert total(registry, "sqlprobe_query_errors_total", engine="mp") == workers
    slow = registry.get_sample_value(
        "sqlprobe_slow_queries_total", {"engine": "mp", "operation": "SELECT"}
    )
    assert slow == 0.0
    # Pool and transaction series are written by each worker as they happen.
    assert total(registry, "sqlprobe_pool_connects_total", engine="mp") == workers
    assert total(registry, "sqlprobe_pool_checkout_wait_seconds_count", engine="mp") == workers
    rollbacks = total(
        registry, "sqlprobe_transaction_duration_seconds_count", engine="mp", outcome="rollback"
    )
    assert rollbacks == workers
    assert total(registry, "sqlprobe_pool_connections", engine="mp", state="used") == 0
    if not url.startswith("sqlite"):
        assert total(registry, "sqlprobe_pool_connections", engine="mp", state="idle") == workers
    # Once the server reports the workers dead, their live gauges leave the sum.
    from prometheus_client import multiprocess

    for pid in PIDS:
        multiprocess.mark_process_dead(pid, str(tmp_path / "prom"))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path / "prom"))
    assert total(registry, "sqlprobe_pool_connections", engine="mp") == 0
    assert total(registry, "sqlprobe_statement_calls_total", engine="mp") == sum(per_worker)


def test_multiprocess_mode_needs_the_variable_before_import(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PROMETHEUS_MULTIPROC_DIR set after prometheus_client was imported keeps the default."""
    from sqlprobe._sinks._multiprocess import multiprocess_active

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert not multiprocess_active()


def test_gunicorn_workers_aggregate_exactly(tmp_path: Path) -> None:
    """Under real gunicorn workers, /metrics from any worker shows the exact totals of all."""
    import concurrent.futures
    import shutil
    import socket
    import time
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    gunicorn = Path(sys.executable).with_name("gunicorn")
    if not gunicorn.exists():
        pytest.fail("gunicorn is not installed (requirements-dev.txt)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prom = tmp_path / "prom"
    prom.mkdir()
    app_dir = Path(__file__).resolve().parent.parent / "examples" / "gunicorn"
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}",
        "BIND": f"127.0.0.1:{port}",
        "WORKERS": "3",
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
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> str:
        with urllib.request.urlopen(base + path, timeout=10) as r:
            body: bytes = r.read()
        return body.decode()

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get("/metrics")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    pytest.fail(f"gunicorn did not start: {out}")
                time.sleep(0.2)
        requests = 120
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            bodies = list(pool.map(lambda _: get("/users"), range(requests)))
        pids = {b.split()[1] for b in bodies}
        assert len(pids) >= 2, "requests should have reached several workers"
        for _ in range(5):  # whichever worker answers, the totals are the same
            families = list(text_string_to_metric_families(get("/metrics")))
            info = {
                s.labels["fingerprint"]: s.labels["statement"]
                for f in families
                for s in f.samples
                if f.name == "sqlprobe_statement_info"
            }
            calls = {
                s.labels["fingerprint"]: s.value
                for f in families
                for s in f.samples
                if s.name == "sqlprobe_statement_calls_total"
            }
            by_text = {info[fp]: calls[fp] for fp in calls if fp in info}
            assert by_text["INSERT INTO visits (path) VALUES (?)"] == requests
            assert by_text["SELECT count(*) FROM visits"] == requests
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(prom, ignore_errors=True)
