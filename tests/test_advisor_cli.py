"""`sqlprobe advise` (`_advise_cli.main`): from /metrics or a SQL file to printed advice."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import create_engine

from sqlprobe._advise_cli import main


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite file with a 4000-row adv_orders table and no index on user_id."""
    path = Path(tmp_path_factory.mktemp("cli")) / "cli.db"
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    with engine.begin() as c:
        c.exec_driver_sql(
            "CREATE TABLE adv_orders (id INTEGER PRIMARY KEY, user_id INT, note TEXT)"
        )
        c.exec_driver_sql(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4000)"
            " INSERT INTO adv_orders (user_id, note) SELECT i % 900, 'n;' || i FROM n"
        )
    engine.dispose()
    yield url


class StatementInfo(Collector):
    """sqlprobe's statement families, as a running process exports them."""

    def __init__(self, shapes: list[tuple[str, str, str, float]]) -> None:
        self.shapes = shapes

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "sqlprobe_statement_info",
            "",
            labels=["engine", "fingerprint", "operation", "table", "statement"],
        )
        seconds = CounterMetricFamily(
            "sqlprobe_statement_seconds", "", labels=["engine", "fingerprint"]
        )
        for fingerprint, operation, statement, secs in self.shapes:
            info.add_metric(["app", fingerprint, operation, "adv_orders", statement], 1)
            seconds.add_metric(["app", fingerprint], secs)
        return [info, seconds]


def serve(shapes: list[tuple[str, str, str, float]]) -> tuple[str, object]:
    registry = CollectorRegistry()
    registry.register(StatementInfo(shapes))
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    return f"http://127.0.0.1:{server.server_port}/metrics", server


def test_advise_from_metrics_prints_the_advice(db_url: str) -> None:
    """SELECT shapes from /metrics are advised (most total time first) and printed in 80 columns."""
    url, server = serve(
        [
            (
                "aaaa",
                "SELECT",
                "SELECT adv_orders.id FROM adv_orders WHERE adv_orders.user_id = ?",
                9.0,
            ),
            ("bbbb", "INSERT", "INSERT INTO adv_orders (user_id) VALUES (?)", 20.0),
            ("cccc", "SELECT", "SELECT * FROM adv_orders WHERE id = ?", 1.0),
        ]
    )
    out = io.StringIO()
    try:
        assert main(["--url", db_url, "--metrics-url", url], out=out) == 0
    finally:
        server.shutdown()  # type: ignore[attr-defined]
    text = out.getvalue()
    assert "adv_orders (user_id)" in text
    assert "CREATE INDEX ix_adv_orders_user_id ON adv_orders (user_id)" in text
    assert 'op.create_index("ix_adv_orders_user_id", "adv_orders", ["user_id"])' in text
    assert "1 index suggestion(s) for 2 statement(s)." in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_advise_from_a_file_splits_statements_with_the_tokenizer(
    db_url: str, tmp_path: Path
) -> None:
    """A SQL file's statements (a ';' inside a string does not split) are each advised."""
    sql = tmp_path / "slow.sql"
    sql.write_text(
        "SELECT * FROM adv_orders WHERE note = 'a;b' AND user_id = 5;\n"
        "SELECT * FROM adv_orders WHERE id = 3;\n"
        "SELECT * FROM adv_orders WHERE nosuch(user_id) = 1 AND user_id = 2;\n"
    )
    out = io.StringIO()
    assert main(["--url", db_url, "--file", str(sql), "--verbose"], out=out) == 0
    text = out.getvalue()
    assert "for 3 statement(s)." in text
    assert "skipped (OperationalError: no such function: nosuch)" in text
    assert "ix_adv_orders_" in text
    assert "no advice  SELECT * FROM adv_orders WHERE id = ?" in text


def test_advise_on_an_asyncio_url(db_url: str, tmp_path: Path) -> None:
    """An asyncio driver's URL (sqlite+aiosqlite) is advised like its synchronous twin."""
    pytest.importorskip("aiosqlite")
    sql = tmp_path / "slow.sql"
    sql.write_text("SELECT * FROM adv_orders WHERE user_id = 5;\n")
    out = io.StringIO()
    url = db_url.replace("sqlite://", "sqlite+aiosqlite://", 1)
    assert main(["--url", url, "--file", str(sql)], out=out) == 0
    text = out.getvalue()
    assert "CREATE INDEX ix_adv_orders_user_id ON adv_orders (user_id)" in text
    assert "1 index suggestion(s) for 1 statement(s)." in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--url", "nosuchdb://x", "--file", "x.sql"], "bad --url"),
        (["--url", "sqlite://", "--file", "/nonexistent/x.sql"], "cannot read /nonexistent/x.sql"),
        (["--url", "sqlite://", "--metrics-url", "http://127.0.0.1:9/metrics"], "cannot read"),
        (["--url", "sqlite://"], "one of the arguments"),
        (["--url", "sqlite://", "--file", "x.sql", "--top", "0"], "--top"),
        (
            [
                "--url",
                "postgresql+psycopg://nobody@127.0.0.1:9/none",
                "--file",
                "SQLFILE",
            ],
            "cannot connect",
        ),
    ],
    ids=["bad_url", "no_file", "no_metrics", "no_source", "bad_top", "no_database"],
)
def test_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Every error is one line on stderr with exit status 2, never a traceback."""
    sql = tmp_path / "one.sql"
    sql.write_text("SELECT 1")
    argv = [str(sql) if a == "SQLFILE" else a for a in argv]
    assert main(argv, out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert "Traceback" not in err
