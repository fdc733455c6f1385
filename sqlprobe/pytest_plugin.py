"""sqlprobe's pytest plugin: query budgets, N+1 checks and a statement-count summary.

Registered through the ``pytest11`` entry point, so pytest loads it in every run of an
environment where sqlprobe is installed. It therefore does nothing unless asked: it adds
its options, ini keys and marker, and defines a fixture; nothing is captured, counted
or printed until one of these is used.

* ``sqlprobe_capture`` fixture: a :class:`sqlprobe.testing.QueryCapture` of every
  attached engine, open for the test (and for the fixtures set up after it).
* ``@pytest.mark.max_queries(N)``: the test fails when its body runs more than ``N``
  statements (transaction noise excluded), with the numbered list of statements.
* ``--sqlprobe-n-plus-one=fail|warn`` (ini ``sqlprobe_n_plus_one``): every test is
  captured; an N+1 detected during it fails it, or emits a :class:`SqlprobeWarning`.
* ``--sqlprobe-summary`` (ini ``sqlprobe_summary = true``): every test is captured and
  the session ends with the tests that ran the most statements. The summary is also
  printed when the N+1 option or the marker is in use, for the tests it captured.

Only the test's call phase is measured (not fixture setup or teardown), and only
engines sqlprobe is attached to: attach yours in ``conftest.py`` (a private
``CollectorRegistry`` keeps tests off the global one), or call ``sqlprobe.attach()``
without an engine before the engines are created. N+1 detection follows each probe's
``n_plus_one_threshold`` and unit of work (a ``sqlprobe.scope`` or a transaction).
"""

from __future__ import annotations

import warnings
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sqlprobe.testing import QueryCapture

__all__ = ["SqlprobeWarning"]

MARKER = "max_queries"
MODES = ("fail", "warn", "off")
#: Tests listed in the end-of-session summary.
SUMMARY_SIZE = 10
_PLUGIN_NAME = "sqlprobe-active"


class SqlprobeWarning(UserWarning):
    """An N+1 detected in a test run with ``--sqlprobe-n-plus-one=warn``."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sqlprobe", "sqlprobe query checks")
    group.addoption(
        "--sqlprobe-n-plus-one",
        dest="sqlprobe_n_plus_one",
        choices=MODES,
        default=None,
        help="fail or warn when a test runs an N+1 query pattern (default: off).",
    )
    group.addoption(
        "--sqlprobe-summary",
        dest="sqlprobe_summary",
        action="store_true",
        default=None,
        help="list the tests that ran the most SQL statements at the end of the session.",
    )
    parser.addini(
        "sqlprobe_n_plus_one", "fail, warn or off: N+1 query patterns in tests.", default="off"
    )
    parser.addini(
        "sqlprobe_summary",
        "list the tests that ran the most SQL statements.",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(n): fail the test if it runs more than n SQL statements (sqlprobe).",
    )
    mode = config.getoption("sqlprobe_n_plus_one") or config.getini("sqlprobe_n_plus_one")
    mode = str(mode or "off").strip().lower()
    if mode not in MODES:
        raise pytest.UsageError(f"sqlprobe_n_plus_one must be one of fail, warn, off; got {mode!r}")
    summary = bool(config.getoption("sqlprobe_summary") or config.getini("sqlprobe_summary"))
    if mode != "off" or summary:
        config.pluginmanager.register(_Checks(mode, capture_all=True), _PLUGIN_NAME)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.has_plugin(_PLUGIN_NAME):
        return
    if any(item.get_closest_marker(MARKER) is not None for item in items):
        config.pluginmanager.register(_Checks("off", capture_all=False), _PLUGIN_NAME)


@pytest.fixture
def sqlprobe_capture() -> Iterator[QueryCapture]:
    """A capture of every attached engine's statements, open for the test."""
    from sqlprobe.testing import capture

    with capture() as q:
        yield q


def _budget(item: pytest.Item) -> int | None:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None
    value = marker.args[0] if marker.args else marker.kwargs.get("n")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.{MARKER} takes a non-negative integer, got {value!r}"
        )
    return value


def _warn_at_source(message: str, source: str, item: pytest.Item) -> None:
    """Warn as if from the loop's line (``path.py:LINE in fn``), else from the test."""
    filename, _, rest = source.rpartition(":")
    line = rest.split(" ", 1)[0]
    if filename and line.isdigit():
        warnings.warn_explicit(SqlprobeWarning(message), SqlprobeWarning, filename, int(line))
        return
    path, lineno, _ = item.location
    warnings.warn_explicit(SqlprobeWarning(message), SqlprobeWarning, path, (lineno or 0) + 1)


class _Checks:
    """The active part, registered only when some test asked for it."""

    def __init__(self, mode: str, *, capture_all: bool) -> None:
        self.mode = mode
        self.capture_all = capture_all
        self.counts: list[tuple[int, str]] = []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, Any, Any]:
        budget = _budget(item)
        if budget is None and not self.capture_all:
            return (yield)
        from sqlprobe.testing import capture, format_detections

        q = capture()
        with q:
            try:
                result = yield
            finally:
                self.counts.append((len(q), item.nodeid))
        problems = []
        if budget is not None and len(q) > budget:
            problems.append(
                f"{item.nodeid} ran {len(q)} SQL statements, over its budget of {budget} "
                f"(@pytest.mark.{MARKER}({budget})):\n{q.format()}"
            )
        if q.n_plus_one and self.mode == "fail":
            problems.append(format_detections(q.n_plus_one))
        elif q.n_plus_one and self.mode == "warn":
            _warn_at_source(format_detections(q.n_plus_one), q.n_plus_one[0].source, item)
        if problems:
            pytest.fail("\n\n".join(problems), pytrace=False)
        return result

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.counts:
            return
        top = sorted(self.counts, key=lambda c: c[0], reverse=True)[:SUMMARY_SIZE]
        terminalreporter.write_sep("-", "sqlprobe: tests that ran the most SQL statements")
        width = len(str(top[0][0]))
        for count, nodeid in top:
            terminalreporter.write_line(f"{count:>{width}}  {nodeid}")
        total = sum(c for c, _ in self.counts)
        terminalreporter.write_line(f"{total} statements in {len(self.counts)} tests")
