"""Plan-based index advice on SQLite (plan switch on a schema copy) and MariaDB (EXPLAIN)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine

from sqlprobe._analysis._advisor import analyse
from sqlprobe._analysis._advisor_core import _session

from .conftest import MYSQL_URL, _need

_ROWS = 5000


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A SQLite file with a 5000-row orders table (one indexed column) and a 50-row table."""
    path = Path(tmp_path_factory.mktemp("advisor")) / "adv.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as c:
        c.exec_driver_sql(
            "CREATE TABLE adv_orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL,"
            " sku TEXT NOT NULL, status INTEGER NOT NULL, paid BOOLEAN NOT NULL)"
        )
        c.exec_driver_sql("CREATE INDEX adv_orders_sku ON adv_orders (sku)")
        c.exec_driver_sql(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)"
            " INSERT INTO adv_orders (user_id, sku, status, paid)"
            " SELECT i % 1000, 'sku-' || i, i % 4, i % 2 FROM n"
        )
        c.exec_driver_sql("CREATE TABLE adv_tiny (id INTEGER PRIMARY KEY, code TEXT)")
        c.exec_driver_sql(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50)"
            " INSERT INTO adv_tiny (code) SELECT 'c' || i FROM n"
        )
    yield engine
    engine.dispose()


@pytest.fixture
def lite(sqlite_db: Engine) -> Iterator[Connection]:
    """A connection to the SQLite file."""
    with sqlite_db.connect() as connection:
        yield connection


def test_sqlite_single_column_advice_is_proven_by_the_plan_switch(lite: Connection) -> None:
    """SQLite: SCAN becomes SEARCH with the candidate on the schema copy: proof="plan"."""
    result = analyse(lite, "SELECT * FROM adv_orders WHERE user_id = ?", (42,))
    (advice,) = result.advice
    assert (advice.table, advice.columns) == ("adv_orders", ("user_id",))
    assert advice.proven is True and advice.proof == "plan"
    assert advice.cost_before is None and advice.cost_after is None
    assert advice.ddl == "CREATE INDEX ix_adv_orders_user_id ON adv_orders (user_id)"
    assert advice.alembic == 'op.create_index("ix_adv_orders_user_id", "adv_orders", ["user_id"])'
    # Nothing was created in the real database.
    names = lite.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'").scalars()
    assert "ix_adv_orders_user_id" not in list(names)


def test_sqlite_normalized_statement_is_planned_with_nulls(lite: Connection) -> None:
    """SQLite: a ? statement without values still gets the plan-switch advice."""
    result = analyse(lite, "SELECT id FROM adv_orders WHERE user_id = ? ORDER BY id LIMIT ?")
    assert [a.columns for a in result.advice] == [("user_id",)]


@pytest.mark.parametrize(
    ("statement", "why"),
    [
        ("SELECT * FROM adv_orders WHERE sku = 'sku-5'", "index"),
        ("SELECT * FROM adv_orders WHERE paid = 1", "selective"),
        ("SELECT * FROM adv_orders WHERE status = 2", "selective"),
        ("SELECT * FROM adv_tiny WHERE code = 'c4'", "rows"),
        ("SELECT * FROM adv_orders WHERE sku LIKE '%5'", "predicate"),
    ],
    ids=["indexed", "boolean", "few_values", "tiny", "leading_wildcard"],
)
def test_sqlite_no_suggestion(lite: Connection, statement: str, why: str) -> None:
    """SQLite: indexed, boolean, few-valued, tiny-table and leading-wildcard statements: none."""
    result = analyse(lite, statement)
    assert result.advice == []
    assert any(why in note for note in result.notes), result.notes


def test_sqlite_timeout_interrupts_a_long_statement(lite: Connection) -> None:
    """SQLite: the progress handler stops a statement that outlives statement_timeout."""
    import sqlite3

    slow = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000000)"
        " SELECT count(*) FROM n"
    )
    dbapi = lite.connection.dbapi_connection
    assert dbapi is not None
    with pytest.raises(sqlite3.OperationalError), _session(lite, "sqlite", 0.05):
        dbapi.cursor().execute(slow).fetchall()
    assert dbapi.cursor().execute("SELECT 1").fetchall() == [(1,)]


@pytest.fixture(scope="module")
def maria() -> Iterator[Engine]:
    """MariaDB: a 5000-row adv_orders table with one indexed column, dropped afterwards."""
    _need(3306, "MariaDB")
    engine = create_engine(MYSQL_URL)
    with engine.begin() as c:
        c.exec_driver_sql("DROP TABLE IF EXISTS adv_orders")
        c.exec_driver_sql(
            "CREATE TABLE adv_orders (id INT PRIMARY KEY AUTO_INCREMENT, user_id INT NOT NULL,"
            " sku VARCHAR(40) NOT NULL, status INT NOT NULL, KEY adv_orders_sku (sku))"
        )
        c.exec_driver_sql(
            "INSERT INTO adv_orders (user_id, sku, status)"
            " SELECT seq MOD 1000, CONCAT('sku-', seq), seq MOD 4 FROM seq_1_to_5000"
        )
        c.exec_driver_sql("ANALYZE TABLE adv_orders")
    yield engine
    with engine.begin() as c:
        c.exec_driver_sql("DROP TABLE IF EXISTS adv_orders")
    engine.dispose()


@pytest.mark.mariadb
def test_mariadb_single_column_advice_from_explain(maria: Engine) -> None:
    """MariaDB: type=ALL with no key gives an unproven single-column suggestion."""
    with maria.connect() as c:
        result = analyse(c, "SELECT * FROM adv_orders WHERE user_id = %(u)s", {"u": 7})
    (advice,) = result.advice
    assert (advice.table, advice.columns) == ("adv_orders", ("user_id",))
    assert advice.proven is False and advice.proof == "plan"
    assert advice.ddl == "CREATE INDEX ix_adv_orders_user_id ON adv_orders (user_id)"


@pytest.mark.mariadb
@pytest.mark.parametrize(
    ("statement", "why"),
    [
        ("SELECT * FROM adv_orders WHERE sku = 'sku-9'", "index"),
        ("SELECT * FROM adv_orders WHERE status = 1", "selective"),
        ("SELECT * FROM adv_orders WHERE user_id = ?", "placeholders"),
    ],
    ids=["indexed", "few_values", "no_values"],
)
def test_mariadb_no_suggestion(maria: Engine, statement: str, why: str) -> None:
    """MariaDB: an indexed column, a few-valued column and a statement without values: none."""
    with maria.connect() as c:
        result = analyse(c, statement)
    assert result.advice == []
    assert any(why in note for note in result.notes), result.notes


@pytest.mark.mariadb
def test_mariadb_session_timeout_is_set_and_reset(maria: Engine) -> None:
    """MariaDB: max_statement_time holds during an analysis and returns to the default."""
    with maria.connect() as c:
        default = c.exec_driver_sql("SELECT @@session.max_statement_time").scalar()
        c.rollback()
        with _session(c, "mysql", 1.5):
            assert float(c.exec_driver_sql("SELECT @@session.max_statement_time").scalar()) == 1.5
        assert c.exec_driver_sql("SELECT @@session.max_statement_time").scalar() == default
