"""The loading-strategy comparison: measured rows on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from rich.console import Console
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlprobe import _loading, _state
from sqlprobe.testing import capture

from .conftest import PG_ASYNC_URL, PG_URL, _need

pytestmark = pytest.mark.smoke

USERS = 12
ORDERS = 3


@pytest.fixture(autouse=True)
def detach_new_probes() -> Iterator[None]:
    """Detach every probe a test attached, so no listener outlives its test."""
    before = {id(p) for p in _state.probes.values()}
    yield
    for probe in list(_state.probes.values()):
        if id(probe) not in before:
            probe.detach()


def expected_statements(strategy: str) -> int:
    return {
        "lazy (select)": 1 + USERS,
        "joined": 1,
        "selectin": 2,
        "subquery": 2,
        "raise": 1,
        "write_only": 1 + USERS,
    }[strategy]


def check(rows: list[_loading.Row], engine: Engine) -> None:
    """Each row's statement count equals what capture() records for the same workload."""
    assert [r.strategy for r in rows] == list(_loading.STRATEGIES)
    for row in rows:
        with Session(engine) as session, capture(engine) as q:
            seen = _loading.workload(session, row.strategy, USERS)
        assert row.statements == len(q) == expected_statements(row.strategy), row
        assert row.orders_seen == seen
        assert row.users == USERS
        assert row.wall_seconds > 0
        assert row.db_seconds > 0
        assert row.peak_bytes > 0
    by = {r.strategy: r for r in rows}
    orders = USERS * ORDERS
    assert by["lazy (select)"].orders_seen == orders
    assert by["raise"].orders_seen == 0
    # Rows sent by the database: the join repeats nothing but sends one row per order;
    # the other strategies send the users and then the orders.
    assert by["joined"].rows == orders
    for name in ("lazy (select)", "selectin", "subquery", "write_only"):
        assert by[name].rows == USERS + orders, name
    assert by["raise"].rows == USERS


def test_sqlite_comparison(tmp_path: object) -> None:
    """On SQLite every strategy is measured and counts match capture()."""
    url = f"sqlite:///{tmp_path}/compare.db"
    rows = _loading.run_comparison(url, users=USERS, orders_per_user=ORDERS, repeat=1)
    engine = create_engine(url)
    try:
        check(rows, engine)
    finally:
        engine.dispose()
    console = Console(width=200, record=True)
    console.print(_loading.render(rows))
    output = console.export_text()
    assert f"Loading {USERS} users and their orders on sqlite:///" in output
    assert "raises at first access" in output


def test_existing_data_is_used_not_reseeded(tmp_path: object) -> None:
    """A second run on the same database lists the existing users without seeding again."""
    url = f"sqlite:///{tmp_path}/again.db"
    _loading.run_comparison(url, users=USERS, orders_per_user=ORDERS, repeat=1, strategies=())
    rows = _loading.run_comparison(url, users=50, repeat=1, strategies=("selectin",))
    assert rows[0].users == USERS  # only USERS exist; 50 were asked for


def test_bad_arguments_rejected() -> None:
    """Unknown strategies and async URLs are refused with a plain message."""
    with pytest.raises(ValueError, match="unknown strategies: eager"):
        _loading.run_comparison("sqlite://", strategies=("eager",))
    with pytest.raises(ValueError, match="synchronous driver"):
        _loading.run_comparison(PG_ASYNC_URL)


@pytest.mark.postgres
def test_postgresql_comparison(unique: str) -> None:
    """On PostgreSQL (own schema) every strategy is measured and counts match capture()."""
    _need(5432, "PostgreSQL")
    schema = f"cmp_{unique}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    engine = create_engine(url)
    try:
        rows = _loading.run_comparison(url, users=USERS, orders_per_user=ORDERS, repeat=1)
        check(rows, engine)
        assert rows[0].database == "postgresql://127.0.0.1:5432/test"
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
