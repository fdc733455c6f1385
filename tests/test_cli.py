"""`sqlprobe`: the demo runs and serves /metrics; every user error is one line, exit 2."""

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
    assert "FROM sqlprobe_demo_shipments WHERE" in text  # the slow lookup is in the table
    # The events point at the demo's own code and name the relationship and its fix.
    assert re.search(r"n_plus_one .*relationship=User\.orders", text)
    assert "suggestion=selectinload(User.orders)" in text
    assert re.search(r"source='?[^ ]*cli\.py:\d+ in n_plus_one_page", text)
    # Console lines wrap at the terminal's width: read the events joined.
    joined = " ".join(text.split())
    slow_event = r"slow_query duration_ms=\d+ statement='[^']*' source=\S*_scenario\.py:\d+"
    assert re.search(slow_event + " in track_shipment", joined)
    assert "index advice: sqlprobe_demo_shipments (tracking_number)" in joined
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


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the console script's main() in-process: its exit status and standard error."""
    from sqlprobe.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, argument: str, accepted: str) -> None:
    """The error is exactly one line on stderr, exit 2, naming the argument and the rule."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert f"argument {argument}:" in lines[0], err
    assert accepted in lines[0], err


@pytest.mark.parametrize(
    ("argv", "argument", "accepted"),
    [
        (["--url", "foo"], "--url", "dialect[+driver]://"),
        (["--url", "nosuch://host/db"], "--url", "no dialect 'nosuch'"),
        (["--url", "mysql+mysqldb://u@localhost/db"], "--url", "driver of 'mysql+mysqldb'"),
        (["--url", "postgresql+asyncpg://u@localhost/db"], "--url", "synchronous driver"),
        (["--port", "-1"], "--port", "from 0 to 65535"),
        (["--port", "http"], "--port", "from 0 to 65535"),
        (["--port", "65536"], "--port", "from 0 to 65535"),
        (["--iterations", "-3"], "--iterations", "1 or more"),
        (["--iterations", "0"], "--iterations", "1 or more"),
        (["--iterations", "2.5"], "--iterations", "1 or more"),
        (["--duration", "-1"], "--duration", "0 or more"),
        (["--duration", "nan"], "--duration", "0 or more"),
        (["--duration", "soon"], "--duration", "0 or more"),
        (["--addr", ""], "--addr", "host name or IP address"),
    ],
)
def test_bad_arguments_are_one_line(
    argv: list[str], argument: str, accepted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bad demo argument is one line naming it and what it accepts, exit status 2."""
    code, err = _main(["demo", *argv], capsys)
    _one_line_error(code, err, argument, accepted)


def test_url_password_is_not_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL with a password is shown masked in the error."""
    code, err = _main(["demo", "--url", "nosuch://me:s3cret@host/db"], capsys)
    _one_line_error(code, err, "--url", "nosuch")
    assert "s3cret" not in err and "***" in err


@pytest.mark.postgres
def test_unreachable_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database that refuses the connection is an --url error naming the URL, exit 2."""
    url = "postgresql+psycopg://postgres@127.0.0.1:1/test"
    code, err = _main(["demo", "--url", url, "--no-metrics", "--iterations", "1"], capsys)
    _one_line_error(code, err, "--url", f"cannot connect to {url}: OperationalError")


def test_busy_port_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A /metrics port in use is a --port error naming the address and port, exit 2."""
    monkeypatch.chdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = _main(["demo", "--port", str(port), "--iterations", "1"], capsys)
    _one_line_error(code, err, "--port", f"127.0.0.1:{port}: port {port} is already in use")


def test_unresolvable_address_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --addr that does not resolve is an --addr error naming it, exit 2."""
    monkeypatch.chdir(tmp_path)
    code, err = _main(["demo", "--addr", "nosuch.invalid", "--port", "0"], capsys)
    _one_line_error(code, err, "--addr", "'nosuch.invalid' does not resolve")


def test_unknown_command_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command or option is one line, exit 2; no command at all too."""
    for argv, needle in (
        (["frob"], "invalid choice: 'frob'"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "required: COMMAND"),
    ):
        code, err = _main(argv, capsys)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints sqlprobe's version (and SQLAlchemy's) and exits 0."""
    import sqlalchemy

    import sqlprobe
    from sqlprobe.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sqlprobe {sqlprobe.__version__} ")
    assert f"SQLAlchemy {sqlalchemy.__version__}" in out


def test_help_is_clean() -> None:
    """--help of the command and of demo shows no docstring markup and lists --version."""
    for argv in (["--help"], ["demo", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-m", "sqlprobe.cli", *argv], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert "``" not in proc.stdout and ":func:" not in proc.stdout
        assert "usage: sqlprobe" in proc.stdout
    assert (
        "--version"
        in subprocess.run(
            [sys.executable, "-m", "sqlprobe.cli", "--help"], capture_output=True, text=True
        ).stdout
    )


def test_bad_port_variable_does_not_break_help() -> None:
    """SQLPROBE_METRICS_PORT=abc: --help works, with one warning naming the variable."""
    proc = subprocess.run(
        [sys.executable, "-m", "sqlprobe.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "SQLPROBE_METRICS_PORT": "abc"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warning = proc.stderr.strip().splitlines()
    assert len(warning) == 1, proc.stderr
    assert "SQLPROBE_METRICS_PORT='abc'" in warning[0] and "0 to 65535" in warning[0]
    assert "default 9464" in proc.stdout


def test_demo_summary_at_80_columns(tmp_path: Path) -> None:
    """Piped at 80 columns, the demo ends with its findings, and no statement is cut."""
    proc = subprocess.run(
        [*[sys.executable, "-m", "sqlprobe.cli"], "demo", "--iterations", "26", "--no-metrics"],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out and "..." not in out.split("What sqlprobe found")[0]
    # The log's rate limit is announced, not left to look like the N+1 went away.
    assert "the log holds back further ones for a minute" in " ".join(out.split())
    summary = out.split("What sqlprobe found", 1)[1]
    flat = " ".join(re.sub(r"[│┃]", " ", summary).split())
    assert "N+1: the relationship User.orders, 26 times in 'GET /users'" in flat
    # The whole statement, to its last word (SQLAlchemy 2.0 also labels the columns).
    assert re.search(
        r"run once per parent: SELECT sqlprobe_demo_orders\.id[^?]*"
        r"FROM sqlprobe_demo_orders WHERE \? = sqlprobe_demo_orders\.user_id fix:",
        flat,
    ), flat
    assert "fix: selectinload(User.orders)" in flat
    lookup = (
        "SELECT sqlprobe_demo_shipments.id, sqlprobe_demo_shipments.carrier FROM "
        "sqlprobe_demo_shipments WHERE sqlprobe_demo_shipments.tracking_number = ?"
    )
    assert "slow: 2 call(s), mean" in flat and lookup in flat
    # The slow lookup's index advice, proven on SQLite's plan, in SQL, model and migration.
    advice = flat.split("index advice: ", 1)[1].split(" failed: ", 1)[0]
    assert advice.startswith("sqlprobe_demo_shipments (tracking_number), proven: the plan")
    assert f"for: {lookup}" in advice
    assert (
        "ddl: CREATE INDEX ix_sqlprobe_demo_shipments_tracking_number ON "
        "sqlprobe_demo_shipments (tracking_number)"
    ) in advice
    assert "model: Shipment.tracking_number: mapped_column(..., index=True)" in advice
    assert (
        'alembic: op.create_index("ix_sqlprobe_demo_shipments_tracking_number", '
        '"sqlprobe_demo_shipments", ["tracking_number"])'
    ) in advice
    assert re.search(r"now: \d+ ms per call without the index", advice), advice
    assert re.search(r"at: \S*_scenario\.py:\d+ in track_shipment", advice), advice
    assert "failed: 2 time(s) with OperationalError: SELECT no_such_column FROM" in flat
    # A realistic transaction mix: the failing statement's transaction is the only rollback.
    rolled = int(re.search(r"(\d+) rolled back", flat).group(1))  # type: ignore[union-attr]
    committed = int(re.search(r"(\d+) committed", flat).group(1))  # type: ignore[union-attr]
    assert rolled == 2 and committed >= 26
    assert "sqlprobe.attach(engine)" in flat and "sqlprobe run --" in flat
    # The table marks the N+1 and the slow statement, with their full text.
    table = " ".join(re.sub(r"[│┃]", " ", out.split("Top statements by total time")[1]).split())
    assert "[N+1] SELECT sqlprobe_demo_orders.id" in table
    assert "[slow] SELECT sqlprobe_demo_shipments.id" in table
