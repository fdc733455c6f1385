"""`sqlprobe run -- COMMAND`: every engine of an unmodified program is attached, /metrics served."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parent.parent
SQLPROBE = [sys.executable, "-m", "sqlprobe.cli"]

# A program with no sqlprobe line: a few statements, then it waits to be scraped.
PLAIN_APP = """\
import sys, time
from sqlalchemy import create_engine, text

engine = create_engine("sqlite://")
with engine.connect() as conn:
    for i in range(7):
        conn.execute(text("SELECT :i AS plain_app_value"), {"i": i})
print("ready", flush=True)
time.sleep(60)
"""

PLAIN_WSGI = """\
import os
from sqlalchemy import create_engine, text

engine = create_engine(os.environ["APP_DB"])
with engine.begin() as conn:
    conn.execute(text("CREATE TABLE IF NOT EXISTS hits (id INTEGER PRIMARY KEY, pid INTEGER)"))


def app(environ, start_response):
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO hits (pid) VALUES (:p)"), {"p": os.getpid()})
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{os.getpid()}\\n".encode()]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        body: bytes = r.read()
    return body.decode()


def _wait_get(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _get(url)
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"{url} never answered: {out}")
            time.sleep(0.2)


def _calls_by_statement(body: str) -> dict[str, float]:
    families = list(text_string_to_metric_families(body))
    info = {
        s.labels["fingerprint"]: s.labels["statement"]
        for f in families
        for s in f.samples
        if s.name == "sqlprobe_statement_info"
    }
    return {
        info[s.labels["fingerprint"]]: s.value
        for f in families
        for s in f.samples
        if s.name == "sqlprobe_statement_calls_total" and s.labels["fingerprint"] in info
    }


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each is sent SIGTERM (forwarded to its command) afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _sqlprobe_run(
    args: list[str], cwd: Path, procs: list[subprocess.Popen[bytes]], **env: str
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*SQLPROBE, "run", *args],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    procs.append(proc)
    return proc


def test_plain_program_is_attached_and_served(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    """A program without any sqlprobe line exports its statements on /metrics under run."""
    (tmp_path / "app.py").write_text(PLAIN_APP)
    port = _free_port()
    runner_tmp = tmp_path / "tmp"
    runner_tmp.mkdir()
    proc = _sqlprobe_run(
        ["--port", str(port), "--", "python", "app.py"], tmp_path, started, TMPDIR=str(runner_tmp)
    )
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 30
    calls: dict[str, float] = {}
    while time.monotonic() < deadline and calls.get("SELECT ? AS plain_app_value") != 7:
        calls = _calls_by_statement(_wait_get(url, proc))
        time.sleep(0.2)
    assert calls.get("SELECT ? AS plain_app_value") == 7, calls
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert f"sqlprobe run: /metrics at http://127.0.0.1:{port}/metrics" in out
    assert list(runner_tmp.iterdir()) == []  # its sitecustomize directory is removed


def test_flask_example_under_run(tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    """`sqlprobe run -- flask --app examples/flask_app.py run` exports the app's statements."""
    metrics_port, app_port = _free_port(), _free_port()
    proc = _sqlprobe_run(
        [
            "--port", str(metrics_port), "--",
            "flask", "--app", "examples.flask_app:create_app", "run", "--port", str(app_port),
        ],
        ROOT,
        started,
    )  # fmt: skip
    _wait_get(f"http://127.0.0.1:{app_port}/users/eager", proc)
    _get(f"http://127.0.0.1:{app_port}/users")
    calls = _calls_by_statement(_get(f"http://127.0.0.1:{metrics_port}/metrics"))
    orders = [n for text, n in calls.items() if text.startswith("SELECT orders.id")]
    assert orders and max(orders) == 20, calls  # the N+1 of GET /users: one per user
    body = _get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert 'relationship="User.orders"' in body


def test_gunicorn_two_workers_are_summed(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    """Under gunicorn with 2 workers, /metrics (multiprocess, set up by run) sums both exactly."""
    (tmp_path / "wsgi_app.py").write_text(PLAIN_WSGI)
    metrics_port, app_port = _free_port(), _free_port()
    proc = _sqlprobe_run(
        [
            "--port", str(metrics_port), "--",
            "gunicorn", "-w", "2", "-b", f"127.0.0.1:{app_port}", "--chdir", str(tmp_path),
            "wsgi_app:app",
        ],
        tmp_path,
        started,
        APP_DB=f"sqlite:///{tmp_path / 'app.db'}",
    )  # fmt: skip
    _wait_get(f"http://127.0.0.1:{app_port}/", proc)

    def burst(n: int) -> set[str]:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            return set(pool.map(lambda _: _get(f"http://127.0.0.1:{app_port}/"), range(n)))

    pids = burst(30)
    # `sqlprobe top` against the multiprocess endpoint, while more requests come in.
    top = subprocess.Popen(
        [*SQLPROBE, "top", f"127.0.0.1:{metrics_port}", "--once", "--interval", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    pids |= burst(30)
    out, err = top.communicate(timeout=30)
    assert len(pids) == 2, "requests should have reached both workers"
    calls = _calls_by_statement(_get(f"http://127.0.0.1:{metrics_port}/metrics"))
    assert calls["INSERT INTO hits (pid) VALUES (?)"] == 60 + 1
    assert top.returncode == 0, err
    assert "INSERT INTO hits (pid) VALUES (?)" in out, out
    rate = float(out.split("statements ", 1)[1].split("/s", 1)[0].replace(",", ""))
    assert rate > 0, out


def test_exit_status_and_own_sitecustomize(tmp_path: Path) -> None:
    """The command's exit status comes back, and an existing sitecustomize still runs."""
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text(
        "import pathlib\npathlib.Path('own-sitecustomize-ran').write_text('yes')\n"
    )
    proc = subprocess.run(
        [*SQLPROBE, "run", "--no-metrics", "--", "python", "-c",
         "import sqlprobe._state as s, sys; sys.exit(3 if s.lock is not None else 4)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(own)},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert (tmp_path / "own-sitecustomize-ran").read_text() == "yes"


@pytest.mark.parametrize(
    ("argv", "argument", "needle"),
    [
        ([], "COMMAND", "expected a command to run after --"),
        (["--"], "COMMAND", "expected a command to run after --"),
        (["--", "no-such-command-xyz"], "COMMAND", "'no-such-command-xyz' is not an executable"),
        (["--port", "-1", "--", "python"], "--port", "from 0 to 65535"),
        (["--slow-query-ms", "soon", "--", "python"], "--slow-query-ms", "milliseconds"),
        (["--", "--port", "1"], "COMMAND", "options go before --"),
        (["--addr", "nosuch.invalid", "--", "python"], "--addr", "does not resolve"),
    ],
)
def test_bad_run_arguments_are_one_line(argv: list[str], argument: str, needle: str) -> None:
    """Each mistake is one line naming the argument, exit status 2, and nothing is run."""
    proc = subprocess.run(
        [*SQLPROBE, "run", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"argument {argument}:" in lines[0] and needle in lines[0], lines[0]


def test_busy_port_is_refused_before_running() -> None:
    """A /metrics port in use is an --port error before the command starts."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [*SQLPROBE, "run", "--port", str(port), "--", "python", "-c", "print('ran')"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2
    assert "ran" not in proc.stdout
    assert f"argument --port: cannot serve /metrics on 127.0.0.1:{port}" in proc.stderr
