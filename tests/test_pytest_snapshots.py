"""Query snapshots, the baseline, SARIF and verified fixes of the pytest plugin (pytester)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_pytest_plugin import CONFTEST, run

pytest_plugins = ["pytester"]

#: A test that runs the same queries on other data each time: random names, a random
#: IN-list length, literals in the text, a SAVEPOINT, inserts and a lazy loop.
SHUFFLED = """
import os
import random
from datetime import datetime
from decimal import Decimal

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session
from sqlprobe._scenario import Order, User


@pytest.mark.parametrize("seed", range(20))
def test_shuffled(engine, seed):
    rng = random.Random(int(os.environ.get("SNAPSHOT_SEED", "0")) * 100 + seed)
    with Session(engine) as session:
        names = [f"user-{rng.randrange(10**6)}" for _ in range(rng.randint(1, 9))]
        session.scalars(select(User).where(User.name.in_(names))).all()
        with session.begin_nested():
            amount = Decimal(rng.randint(1, 10**5)) / 100
            session.add(
                Order(user_id=1, product_name=f"p{rng.random()}", amount=amount,
                      created_at=datetime(2026, 1, rng.randint(1, 28)))
            )
        limit = rng.random()
        session.execute(text(f"SELECT count(*) FROM sqlprobe_demo_orders WHERE amount > {limit}"))
        users = session.scalars(select(User).order_by(User.id)).all()
        rng.shuffle(users)
        for user in users:
            user.orders
        session.commit()
"""


def _entries(path: Path) -> dict[str, object]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_snapshots_are_stable_across_random_data(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 data seeds give 20 identical entries; other data, and xdist, leave the file unchanged."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_snap=SHUFFLED)
    run(pytester, "--sqlprobe-snapshot").assert_outcomes(passed=20)
    path = pytester.path / "test_snap.sqlprobe.yaml"
    first = path.read_text(encoding="utf-8")
    entries = _entries(path)
    assert sorted(entries) == sorted(f"test_shuffled[{i}]" for i in range(20))
    assert len({json.dumps(e) for e in entries.values()}) == 1, "entries differ between seeds"
    shapes = next(iter(entries.values()))
    assert isinstance(shapes, list)
    ops = [(s["operation"], s["table"], s["count"]) for s in shapes]
    assert ("SELECT", "sqlprobe_demo_orders", 8) in ops  # the lazy loop, one per user
    assert not any(op in ("SAVEPOINT", "RELEASE", "BEGIN", "COMMIT") for op, _, _ in ops)
    assert all("user-" not in s["sql"] and "IN (?, ?" not in s["sql"] for s in shapes)
    assert "duration" not in first and "0." not in first

    for seed in ("1",):
        monkeypatch.setenv("SNAPSHOT_SEED", seed)
        run(pytester, "--sqlprobe-snapshot").assert_outcomes(passed=20)
        assert path.read_text(encoding="utf-8") == first
    monkeypatch.setenv("SNAPSHOT_SEED", "3")
    result = pytester.runpytest_subprocess(
        "-p", "no:queryguard", "-p", "no:queryspy", "-n", "2", "--sqlprobe-snapshot"
    )
    result.assert_outcomes(passed=20)
    assert path.read_text(encoding="utf-8") == first


def test_a_changed_query_fails_with_a_diff(pytester: pytest.Pytester) -> None:
    """A query added or repeated since the snapshot fails the test with a diff and the line."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_users="""
        from sqlalchemy import select
        from sqlalchemy.orm import Session
        from sqlprobe._scenario import User

        def test_list(engine):
            with Session(engine) as session:
                session.scalars(select(User)).all()

        def test_other(engine):
            with Session(engine) as session:
                session.get(User, 1)
        """
    )
    run(pytester, "--sqlprobe-snapshot").assert_outcomes(passed=2)
    pytester.makepyfile(
        test_users="""
        from sqlalchemy import select
        from sqlalchemy.orm import Session
        from sqlprobe._scenario import User

        def test_list(engine):
            with Session(engine) as session:
                for user in session.scalars(select(User)).all():
                    user.orders

        def test_other(engine):
            with Session(engine) as session:
                session.get(User, 1)
        """
    )
    result = run(pytester, "--sqlprobe-snapshot")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the queries of test_users.py::test_list changed since its snapshot in "
            "test_users.sqlprobe.yaml (--sqlprobe-snapshot-update records the new ones):",
            "*+ SELECT sqlprobe_demo_orders.id, *FROM sqlprobe_demo_orders WHERE *[[]8x[]]",
            "*at test_users.py:8 in test_list",
            "*FAILED test_users.py::test_list*",
        ]
    )
    run(pytester, "--sqlprobe-snapshot-update").assert_outcomes(passed=2)
    run(pytester, "--sqlprobe-snapshot").assert_outcomes(passed=2)
