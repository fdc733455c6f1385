"""The pytest plugin, run in inner pytest sessions with pytester."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import configure_mappers

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

#: Inner runs: no asyncio plugin (its config warning is not ours), no hypothesis plugin (its
#: session summary costs about 2 s per run), and no warning that
#: sqlprobe, already imported here, cannot be assertion-rewritten again.
INNER = (
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
            "*User.orders: executed 2+ times in scope 'session' at conftest.py:* in lazy_loop",
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


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    """max_queries is a registered marker, so --strict-markers accepts it."""
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.max_queries(n):*"])


def test_bad_option_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """An unknown ini mode stops the run with a plain message."""
    pytester.makeini("[pytest]\nsqlprobe_n_plus_one = loud\n")
    result = run(pytester)
    result.stderr.fnmatch_lines(["*sqlprobe_n_plus_one must be one of fail, warn, off*"])
