"""The pytest plugin, run in inner pytest sessions with pytester."""

from __future__ import annotations

import re

import pytest
from sqlalchemy.orm import configure_mappers

import sqlprobe
import sqlprobe._core._scope
import sqlprobe._probe
import sqlprobe._pytest._capture
import sqlprobe._pytest._session
import sqlprobe._scenario
import sqlprobe.testing

pytest_plugins = ["pytester"]

# The inner sessions run in this process (seconds faster than subprocesses). pytester
# restores sys.modules after each, so every module they use is imported (and the demo
# mappers configured) out here first: a module first imported inside an inner run would
# be imported again by the next one, with new classes that SQLAlchemy's registries
# reject.
configure_mappers()
assert sqlprobe._scenario.User.orders is not None
assert sqlprobe.attach is sqlprobe._probe.attach
assert sqlprobe.scope is sqlprobe._core._scope.scope

#: Inner runs: no asyncio plugin (its config warning is not ours), no hypothesis plugin (its
#: session summary costs about 2 s per run), and no warning that
#: sqlprobe, already imported here, cannot be assertion-rewritten again.
INNER = (
    "-p",
    "no:queryguard",
    "-p",
    "no:queryspy",
    "-p",
    "no:asyncio",
    "-p",
    "no:hypothesispytest",
    "-W",
    "ignore::pytest.PytestAssertRewriteWarning",
)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run an inner pytest session in this process."""
    return pytester.runpytest(*INNER, *args)


CONFTEST = """
import pytest
import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

import sqlprobe
from sqlprobe._scenario import Base, User, seed


def drop(logger, method, event):
    raise structlog.DropEvent


@pytest.fixture
def engine():
    e = create_engine("sqlite://")
    Base.metadata.create_all(e)
    with Session(e) as s:
        seed(s, users=8, orders_per_user=1, articles_per_user=0)
    probe = sqlprobe.attach(
        e, registry=CollectorRegistry(), logger=structlog.wrap_logger(None, processors=[drop])
    )
    yield e
    probe.detach()
    e.dispose()


def lazy_loop(engine):
    with Session(engine) as session:
        for user in session.scalars(select(User)):
            user.orders
"""

TESTS = """
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload
from sqlprobe._scenario import User
from conftest import lazy_loop


@pytest.mark.max_queries(2)
def test_over_budget(engine):
    with engine.connect() as conn:
        for table in ("sqlprobe_demo_users", "sqlprobe_demo_orders", "sqlprobe_demo_articles"):
            conn.exec_driver_sql(f"SELECT count(*) FROM {table}")


@pytest.mark.max_queries(2)
def test_within_budget(engine):
    with Session(engine) as session:
        session.scalars(select(User).options(selectinload(User.orders))).all()


def test_n_plus_one(engine):
    lazy_loop(engine)


def test_clean(engine):
    with Session(engine) as session:
        session.scalars(select(User)).all()
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """An inner project with an attached SQLite engine and four tests."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_app=TESTS)
    return pytester


def test_budget_exceeded_fails_with_statement_list(project: pytest.Pytester) -> None:
    """A test over its max_queries budget fails, listing its statements; one within passes."""
    result = run(project, "-k", "budget")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_over_budget ran 3 SQL statements, over its budget of 2*",
            "*1. SELECT count(*) FROM sqlprobe_demo_users*",
            "*2. SELECT count(*) FROM sqlprobe_demo_orders*",
            "*3. SELECT count(*) FROM sqlprobe_demo_articles*",
        ]
    )
    assert "test_within_budget ran" not in result.stdout.str()


def test_n_plus_one_option_fails_the_test(project: pytest.Pytester) -> None:
    """--sqlprobe-n-plus-one=fail fails the test with an N+1 and names the relationship."""
    result = run(project, "--sqlprobe-n-plus-one=fail", "-k", "n_plus_one or clean")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*User.orders: executed *+ times in scope * at conftest.py:* in lazy_loop",
            "*suggestion: selectinload(User.orders)",
            "*FAILED test_app.py::test_n_plus_one*",
        ]
    )


def test_n_plus_one_ini_warn(project: pytest.Pytester) -> None:
    """The ini key set to warn turns an N+1 into a SqlprobeWarning, and the test passes."""
    project.makeini("[pytest]\nsqlprobe_n_plus_one = warn\n")
    result = run(project, "-k", "n_plus_one")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(
        ["*conftest.py:32: SqlprobeWarning: 1 N+1 pattern(s) detected:", "*- User.orders: *"]
    )


def test_summary_lists_heaviest_tests(project: pytest.Pytester) -> None:
    """--sqlprobe-summary ends the session with the tests that ran the most statements."""
    result = run(project, "--sqlprobe-summary", "-k", "n_plus_one or clean or within")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*sqlprobe: tests that ran the most SQL statements*",
            "9  test_app.py::test_n_plus_one",
            "2  test_app.py::test_within_budget",
            "1  test_app.py::test_clean",
            "12 statements in 3 tests",
        ]
    )


def test_fixture_yields_a_capture(pytester: pytest.Pytester) -> None:
    """The sqlprobe_capture fixture records the test's statements."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        def test_count(engine, sqlprobe_capture):
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
                conn.exec_driver_sql("SELECT 2")
            assert len(sqlprobe_capture) == 2
            sqlprobe_capture.assert_max(2)
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_fixture_attaches_the_engines(pytester: pytest.Pytester) -> None:
    """sqlprobe_capture alone sees an engine nobody attached, built before or during the test."""
    pytester.makeconftest(BARE_CONFTEST)
    pytester.makepyfile(
        """
        from sqlalchemy import create_engine
        from conftest import EARLY, two

        def test_count(sqlprobe_capture):
            two(EARLY)
            two(create_engine("sqlite://"))
            assert len(sqlprobe_capture) == 4
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_does_nothing_when_not_asked(project: pytest.Pytester) -> None:
    """Without marker, option or ini, nothing is captured, failed or printed."""
    project.makepyfile(
        test_quiet="""
        def test_quiet(request, engine):
            from conftest import lazy_loop
            lazy_loop(engine)
            assert not request.config.pluginmanager.has_plugin("sqlprobe-active")
        """
    )
    result = run(project, "--strict-markers", "test_quiet.py")
    result.assert_outcomes(passed=1)
    assert "sqlprobe:" not in result.stdout.str()
    assert "SqlprobeWarning" not in result.stdout.str()


def test_bad_option_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """An unknown ini mode stops the run with a plain message."""
    pytester.makeini("[pytest]\nsqlprobe_n_plus_one = loud\n")
    result = run(pytester)
    result.stderr.fnmatch_lines(["*sqlprobe_n_plus_one must be one of fail, warn, off*"])


# -- engines, units of work, markers (issue 16) ----------------------------------------

BARE_CONFTEST = """
import sqlite3

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from sqlprobe._scenario import Base, seed

# Built at import time, before the plugin knows it is wanted: found and attached anyway.
EARLY = create_engine("sqlite://")


@pytest.fixture
def late():
    e = create_engine("sqlite://")  # built during the session: attached on creation
    Base.metadata.create_all(e)
    with Session(e) as s:
        seed(s, users=8, orders_per_user=1, articles_per_user=0)
    yield e
    e.dispose()


def two(engine):
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.execute(text("SELECT 2"))
"""


def test_every_engine_of_the_session_is_attached(pytester: pytest.Pytester) -> None:
    """Engines built at import and in fixtures are measured unattached; an own attach() wins."""
    pytester.makeconftest(BARE_CONFTEST)
    pytester.makepyfile(
        """
        import pytest
        from conftest import EARLY, two

        @pytest.mark.sqlprobe(max_queries=1)
        def test_early():
            two(EARLY)

        @pytest.mark.sqlprobe(max_queries=1)
        def test_late(late):
            two(late)

        @pytest.mark.sqlprobe(max_queries=2)
        def test_own_attach_wins():
            import sqlprobe
            from prometheus_client import CollectorRegistry

            probe = sqlprobe.attach(EARLY, registry=CollectorRegistry())  # no ValueError
            try:
                two(EARLY)
            finally:
                probe.detach()
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_early ran 2 SQL statements, over its budget of 1 "
            "(@pytest.mark.sqlprobe(max_queries=1))*",
            "*test_late ran 2 SQL statements, over its budget of 1*",
        ]
    )


def test_a_budget_that_saw_no_statement_fails(pytester: pytest.Pytester) -> None:
    """A budgeted test whose SQL sqlprobe never saw fails saying so; allow_no_queries passes."""
    pytester.makeconftest(BARE_CONFTEST)
    pytester.makepyfile(
        test_blind="""
        import sqlite3
        import pytest

        def unseen():
            conn = sqlite3.connect(":memory:")  # not through SQLAlchemy: invisible
            for i in range(10):
                conn.execute("SELECT ?", (i,))
            conn.close()

        @pytest.mark.sqlprobe(max_queries=0)
        def test_blind():
            unseen()

        @pytest.mark.sqlprobe(max_queries=0, allow_no_queries=True)
        def test_meant_to_run_none():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_blind has a query budget (@pytest.mark.sqlprobe(max_queries=0)) but "
            "sqlprobe saw no SQL statement at all while it ran*",
            "*FAILED test_blind.py::test_blind*",
        ]
    )


def test_each_test_is_one_unit_of_work(project: pytest.Pytester) -> None:
    """Repeats in two transactions of one test add up; six request scopes in a test do not."""
    project.makepyfile(
        test_units="""
        import sqlprobe
        from sqlalchemy import text

        QUERY = text("SELECT * FROM sqlprobe_demo_orders WHERE user_id = :u")

        def test_two_transactions(engine):
            for start in (1, 4):
                with engine.connect() as conn:  # 3 + 3 repeats: 6 in the test
                    for user_id in range(start, start + 3):
                        conn.execute(QUERY, {"u": user_id})

        def test_six_requests(engine):
            for user_id in range(1, 7):  # one query per request
                with sqlprobe.scope("GET /users/{id}"), engine.connect() as conn:
                    conn.execute(QUERY, {"u": user_id})
        """
    )
    result = run(project, "--sqlprobe-n-plus-one=fail", "test_units.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*a repeated SELECT: executed 5+ times in scope "
            "'test_units.py::test_two_transactions'*",
            "*FAILED test_units.py::test_two_transactions*",
        ]
    )
    assert "test_six_requests -" not in result.stdout.str()


def test_marker_budgets_and_allow_list(project: pytest.Pytester) -> None:
    """sqlprobe(max_time=...) fails a slow test; allow_n_plus_one accepts the named N+1."""
    project.makepyfile(
        test_marks="""
        import pytest
        from conftest import lazy_loop

        @pytest.mark.sqlprobe(max_time=0)
        def test_time(engine):
            lazy_loop(engine)

        @pytest.mark.sqlprobe(allow_n_plus_one=["User.orders"])
        def test_allowed(engine):
            lazy_loop(engine)

        @pytest.mark.sqlprobe(n_plus_one="off")
        def test_off(engine):
            lazy_loop(engine)

        @pytest.mark.sqlprobe(max_querys=1)
        def test_typo(engine):
            pass
        """
    )
    result = run(project, "--sqlprobe-n-plus-one=fail", "test_marks.py")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_time spent * ms in SQL statements, over its budget of 0.0 ms "
            "(@pytest.mark.sqlprobe(max_time=0))*",
            "*test_typo: @pytest.mark.sqlprobe got unknown argument(s) max_querys*",
        ]
    )


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    """Both markers are registered, so --strict-markers accepts them."""
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.sqlprobe(max_queries=None, max_time=None, *",
            "@pytest.mark.max_queries(n):*",
        ]
    )


def test_side_by_side_with_queryspy_and_queryguard(project: pytest.Pytester) -> None:
    """With queryspy and pytest-queryguard loaded, sqlprobe's marker, options and summary report."""
    pytest.importorskip("queryspy")
    pytest.importorskip("pytest_queryguard")
    project.makepyfile(
        test_both="""
        import pytest
        from conftest import lazy_loop

        @pytest.mark.sqlprobe(max_queries=2)
        def test_budget(engine):
            lazy_loop(engine)

        def test_loop(engine):
            lazy_loop(engine)
        """
    )
    # Not run(): the competitors' plugins stay enabled in this inner session.
    result = project.runpytest(
        "-p", "no:asyncio", "-p", "no:hypothesispytest",
        "-W", "ignore::pytest.PytestAssertRewriteWarning",
        "--strict-markers", "--sqlprobe-n-plus-one=fail", "--sqlprobe-summary", "test_both.py",
    )  # fmt: skip
    out = result.stdout.str()
    assert "queryguard" in out and "queryspy" in out  # both plugins were loaded
    result.assert_outcomes(failed=2, warnings=1)
    result.stdout.fnmatch_lines(
        ["*another plugin (or the ini file) registers the 'max_queries' marker*"]
    )
    result.stdout.fnmatch_lines(
        [
            "*test_budget ran 9 SQL statements, over its budget of 2 "
            "(@pytest.mark.sqlprobe(max_queries=2))*",
            "*User.orders: executed *+ times in scope *",
            "*sqlprobe: tests that ran the most SQL statements*",
        ]
    )


def test_every_option_and_marker_key_is_documented(pytester: pytest.Pytester) -> None:
    """docs/testing.md names every --sqlprobe- option, ini key and marker key."""
    from pathlib import Path

    from sqlprobe._pytest._policy import MARKER_KEYS

    page = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    result = run(pytester, "--help")
    options = set(re.findall(r"(--sqlprobe-[a-z-]+)", result.stdout.str()))
    ini_keys = set(re.findall(r"^  (sqlprobe_[a-z_]+)", result.stdout.str(), re.M))
    assert len(options) == 8 and len(ini_keys) == 4, (options, ini_keys)
    for name in sorted(options | ini_keys | {f"`{k}`" for k in MARKER_KEYS}):
        assert name in page, f"{name} is not in docs/testing.md"
