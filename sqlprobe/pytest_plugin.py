"""sqlprobe's pytest plugin: query budgets, N+1 checks, query snapshots, SARIF.

Registered through the ``pytest11`` entry point, so pytest loads it in every run of an
environment where sqlprobe is installed. It therefore does nothing unless asked: it adds
its options, ini keys and markers, and defines a fixture; nothing is attached,
captured, counted or printed until one of these is used (the implementation, in
``sqlprobe._pytest``, is not even imported).

* ``@pytest.mark.sqlprobe(max_queries=3, max_time=0.5, allow_n_plus_one=["User.orders"],
  n_plus_one="fail", allow_no_queries=False, snapshot=True)``: a per-test budget
  and N+1 policy. ``@pytest.mark.max_queries(N)`` still works while no other plugin
  registers a marker of that name (pytest-queryguard does); otherwise sqlprobe warns
  once and leaves that marker to its owner.
* ``--sqlprobe-n-plus-one=fail|warn`` (ini ``sqlprobe_n_plus_one``): every test is
  captured; an N+1 detected during it fails it, or emits a :class:`SqlprobeWarning`.
* ``--sqlprobe-summary`` (ini ``sqlprobe_summary = true``): the session ends with the
  tests that ran the most statements.
* ``--sqlprobe-snapshot`` / ``--sqlprobe-snapshot-update``: per-test query snapshots
  in ``<test module>.sqlprobe.yaml`` beside each test module.
* ``--sqlprobe-baseline=PATH`` (ini ``sqlprobe_baseline``), ``--sqlprobe-baseline-update``:
  accepted findings; ``--sqlprobe-sarif=PATH``: every finding as SARIF 2.1.0.
* ``--sqlprobe-verify-fixes``: a test with an N+1 is run again with the suggested loader
  option applied, and the outcome is reported per finding.

Once any of these is on, sqlprobe attaches itself to every engine of the session (see
``sqlprobe._pytest._session``); each measured test is a unit of work for N+1
detection. Only the test's call phase is measured (not fixture setup or teardown).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from ._pytest._policy import LEGACY_MARKER, MARKER, MODES, Settings, marked
from ._pytest._session import SqlprobeWarning

if TYPE_CHECKING:
    from sqlprobe.testing import QueryCapture

__all__ = ["SqlprobeWarning"]

_PLUGIN_NAME = "sqlprobe-active"
_SETTINGS = pytest.StashKey[Settings]()


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
    group.addoption(
        "--sqlprobe-snapshot",
        dest="sqlprobe_snapshot",
        action="store_true",
        default=None,
        help="record each test's statement shapes in <module>.sqlprobe.yaml beside the test "
        "module; fail a test whose queries changed since.",
    )
    group.addoption(
        "--sqlprobe-snapshot-update",
        dest="sqlprobe_snapshot_update",
        action="store_true",
        default=False,
        help="rewrite the query snapshots of the tests that run.",
    )
    group.addoption(
        "--sqlprobe-baseline",
        dest="sqlprobe_baseline",
        metavar="PATH",
        default=None,
        help="a file of accepted findings: they neither fail nor warn.",
    )
    group.addoption(
        "--sqlprobe-baseline-update",
        dest="sqlprobe_baseline_update",
        action="store_true",
        default=False,
        help="write this run's findings to the --sqlprobe-baseline file.",
    )
    group.addoption(
        "--sqlprobe-sarif",
        dest="sqlprobe_sarif",
        metavar="PATH",
        default=None,
        help="write this run's findings to PATH as SARIF 2.1.0 (code scanning).",
    )
    group.addoption(
        "--sqlprobe-verify-fixes",
        dest="sqlprobe_verify_fixes",
        action="store_true",
        default=False,
        help="run each test with an N+1 again with the suggested loader option applied, "
        "and report whether it fixes it.",
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
    parser.addini(
        "sqlprobe_snapshot", "check each test's query snapshot.", type="bool", default=False
    )
    parser.addini("sqlprobe_baseline", "the file of accepted sqlprobe findings.", default="")


def _foreign_max_queries(config: pytest.Config) -> bool:
    """Whether something else (another plugin, the ini file) registered ``max_queries``."""
    for line in config.getini("markers"):
        name = str(line).split(":", 1)[0].split("(", 1)[0].strip()
        if name == LEGACY_MARKER:
            return True
    return False


# trylast: the other plugins' pytest_configure (their markers) has run by then.
@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(max_queries=None, max_time=None, allow_n_plus_one=(), n_plus_one=None, "
        "allow_no_queries=False, snapshot=True): sqlprobe's query budget and N+1 policy "
        "for the test.",
    )
    legacy = not _foreign_max_queries(config)
    if legacy:
        config.addinivalue_line(
            "markers",
            f"{LEGACY_MARKER}(n): fail the test if it runs more than n SQL statements "
            "(sqlprobe; same as @pytest.mark.sqlprobe(max_queries=n)).",
        )
    else:
        config.issue_config_time_warning(
            SqlprobeWarning(
                f"another plugin (or the ini file) registers the {LEGACY_MARKER!r} marker, "
                f"so sqlprobe leaves @pytest.mark.{LEGACY_MARKER} to it; sqlprobe's budget is "
                f"@pytest.mark.{MARKER}(max_queries=N)"
            ),
            stacklevel=2,
        )
    settings = Settings.from_config(config, legacy_marker=legacy)
    config.stash[_SETTINGS] = settings
    if settings.capture_all or _xdist_controller(config):
        # A pytest-xdist controller collects nothing (its workers do), so it cannot
        # wait for a marked test: it gathers whatever the workers' reports carry.
        _activate(config, settings)


def _xdist_controller(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def _activate(config: pytest.Config, settings: Settings) -> None:
    from ._pytest._session import PluginSession

    plugin = PluginSession(config, settings, attach=not _xdist_controller(config))
    config.pluginmanager.register(plugin, _PLUGIN_NAME)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.has_plugin(_PLUGIN_NAME):
        return
    settings = config.stash.get(_SETTINGS, None)
    if settings is not None and any(marked(item, settings) for item in items):
        _activate(config, settings)


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.pluginmanager.get_plugin(_PLUGIN_NAME)
    if plugin is not None:
        plugin.close()
        config.pluginmanager.unregister(plugin, _PLUGIN_NAME)


@pytest.fixture
def sqlprobe_capture(request: pytest.FixtureRequest) -> Iterator[QueryCapture]:
    """A capture of every engine's statements, open for the test.

    Using it turns the plugin on like a marker does: every engine of the session is
    attached from then on (and those that exist are attached now).
    """
    from sqlprobe.testing import capture

    config = request.config
    settings = config.stash.get(_SETTINGS, None)
    if settings is not None and not config.pluginmanager.has_plugin(_PLUGIN_NAME):
        _activate(config, settings)
    with capture() as q:
        yield q
