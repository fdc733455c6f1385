"""The active part of the plugin, registered once some feature of it is on.

Engines
-------
It attaches sqlprobe to every engine of the session: ``attach()`` for all engines
(every engine created from now on) with a private ``CollectorRegistry`` and a logger
that drops every event, plus the engines that already exist and nobody attached (a
``conftest.py`` that built its engine at import time); an engine the application
attaches itself keeps its own probe. Everything is detached when the session ends.

Tests
-----
Each measured test's call phase runs inside its own :func:`sqlprobe.scope` (named by
the test's node id): the test is a unit of work for N+1 detection, scopes opened
inside it (a request through the middleware) stay innermost, so two requests in one
test are two units and do not add up. The statements are captured; then, in order:

* a budget (``max_queries``, ``max_time``) checked against *no* statement fails the
  test: sqlprobe saw nothing, so the budget proves nothing (``allow_no_queries=True``
  when running no SQL is the point);
* budgets, N+1 detections (minus those the marker allows and those in the baseline)
  and query snapshots are checked.

What each test found travels on its ``TestReport`` (attribute ``sqlprobe``, plain
data), so under pytest-xdist the controller receives it with the report and writes
the summary, the SARIF file, the baseline and the snapshot files once, alone.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from ._policy import Policy, Settings, policy_for

if TYPE_CHECKING:
    from ._capture import TestCapture

__all__ = ["SUMMARY_SIZE", "PluginSession", "SqlprobeWarning"]

#: Tests listed in the end-of-session summary.
SUMMARY_SIZE = 10

_RESULT = pytest.StashKey[dict[str, Any]]()


class SqlprobeWarning(UserWarning):
    """A finding of sqlprobe's pytest plugin reported as a warning, not a failure."""


def _drop_event(logger: Any, method: str, event: Any) -> Any:
    import structlog

    raise structlog.DropEvent


def _warn_at(message: str, source: str, item: pytest.Item) -> None:
    """Warn as if from the loop's line (``path.py:LINE in fn``), else from the test."""
    filename, _, rest = source.rpartition(":")
    line = rest.split(" ", 1)[0]
    if filename and line.isdigit():
        warnings.warn_explicit(SqlprobeWarning(message), SqlprobeWarning, filename, int(line))
        return
    path, lineno, _ = item.location
    warnings.warn_explicit(SqlprobeWarning(message), SqlprobeWarning, path, (lineno or 0) + 1)


def split_source(source: str) -> tuple[str, int]:
    """``("path.py", 12)`` from ``path.py:12 in fn`` (``("", 0)`` when unknown)."""
    filename, _, rest = source.rpartition(":")
    line = rest.split(" ", 1)[0]
    if filename and line.isdigit():
        return filename, int(line)
    return "", 0


class PluginSession:
    """Attaches the engines, measures the tests, gathers and writes the results."""

    def __init__(self, config: pytest.Config, settings: Settings, *, attach: bool = True) -> None:
        self.config = config
        self.settings = settings
        self.worker = hasattr(config, "workerinput")
        #: (statements, nodeid) per measured test, for the summary.
        self.counts: list[tuple[int, str]] = []
        #: Findings of every test (plain dicts, see :func:`_finding`).
        self.findings: list[dict[str, Any]] = []
        #: nodeid -> (snapshot file, key, queries) of the entries to write.
        self.snapshots: dict[str, tuple[str, str, Any]] = {}
        self.verified: list[dict[str, Any]] = []
        #: The measurements of the current --sqlprobe-verify-fixes re-run, while one runs.
        self.rerun: dict[str, Any] | None = None
        self._probes: list[Any] = []
        self._baseline: Any = None
        self._snapshots: Any = None
        self._verifier: Any = None
        if settings.baseline is not None and not settings.baseline_update:
            from ._findings import Baseline

            # Read now: a missing or broken file stops the run before any test, plainly.
            self._baseline = Baseline.load(settings.baseline)
        if attach:  # not on a pytest-xdist controller: its workers run the tests
            self._attach()
        if settings.verify_fixes:
            from ._verify import FixVerifier

            self._verifier = FixVerifier(self)
            config.pluginmanager.register(self._verifier, "sqlprobe-verify-fixes")

    # -- engines -----------------------------------------------------------------------

    def _attach(self) -> None:
        import structlog
        from prometheus_client import CollectorRegistry
        from sqlalchemy.engine import Engine
        from sqlalchemy.engine.base import OptionEngine

        from .. import _state
        from .._probe import attach

        options: dict[str, Any] = {
            "registry": CollectorRegistry(),
            "logger": structlog.wrap_logger(None, processors=[_drop_event]),
        }
        with _state.lock:
            has_global = bool(_state.global_probe and _state.global_probe[0].attached)
        if not has_global:
            self._probes.append(attach(**options))
        # Engines built before the plugin started (at conftest import): found once.
        for obj in gc.get_objects():
            if isinstance(obj, Engine) and not isinstance(obj, OptionEngine):
                with _state.lock:
                    known = _state.probes.get(obj)
                if known is None or not known.attached:
                    try:
                        probe = attach(obj, **options)
                    except Exception:  # an odd engine must not stop the test run
                        continue
                    # Like the engines attach() for all engines finds: the
                    # application's own attach() of it later replaces this probe.
                    probe._implicit = True
                    self._probes.append(probe)

    def close(self) -> None:
        if self._verifier is not None:
            self.config.pluginmanager.unregister(self._verifier)
            self._verifier = None
        for probe in reversed(self._probes):
            probe.detach()
        self._probes.clear()

    # -- one test ----------------------------------------------------------------------

    # trylast: the innermost wrapper, next to the test itself, so another plugin's
    # wrapper that fails the test (pytest-queryguard's N+1 check) cannot keep sqlprobe
    # from measuring and reporting it.
    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, Any, Any]:
        from .._core._scope import Scope
        from ._capture import TestCapture

        rerun = self.rerun
        if rerun is not None:  # a re-run of --sqlprobe-verify-fixes: measure only
            from ._verify import RowRecorder

            q = TestCapture()
            with Scope(item.nodeid), q, RowRecorder() as rows:
                try:
                    return (yield)
                finally:
                    rerun.update(
                        count=len(q),
                        rows=rows.digest(),
                        relationships=[d.relationship for d in q.n_plus_one],
                    )
        policy = policy_for(item, self.settings)
        if policy is None:
            return (yield)
        snapshots = self._snapshot_store()
        q = TestCapture(sources=snapshots is not None and policy.snapshot)
        recorder: Any = None
        if self.settings.verify_fixes:
            from ._verify import RowRecorder

            recorder = RowRecorder()
        try:
            with Scope(item.nodeid), q:
                if recorder is None:
                    result = yield
                else:
                    with recorder:
                        result = yield
        except BaseException:
            # The test failed on its own: its statements and findings are still
            # reported (summary, SARIF), but sqlprobe adds no failure of its own.
            self._check(item, policy, q, failed=True)
            raise
        self._check(item, policy, q, rows=recorder.digest() if recorder is not None else None)
        return result

    def _check(
        self,
        item: pytest.Item,
        policy: Policy,
        q: TestCapture,
        *,
        failed: bool = False,
        rows: str | None = None,
    ) -> None:
        from ..testing import format_detections

        nodeid = item.nodeid
        out: dict[str, Any] = {"count": len(q), "findings": []}
        item.stash[_RESULT] = out
        problems: list[str] = []
        path, lineno, _ = item.location
        where = (path, (lineno or 0) + 1)

        if policy.budgeted and q.seen == 0 and not policy.allow_no_queries:
            budget = " and ".join(policy.spelled.values())
            watched = ", ".join(q.engines) or "none"
            problems.append(
                f"{nodeid} has a query budget ({budget}) but sqlprobe saw no SQL statement "
                f"at all while it ran (engines watched: {watched}), so the budget proves "
                "nothing. sqlprobe watches every engine created after the plugin starts and "
                "every engine that existed then; attach another one with "
                "sqlprobe.attach(engine). If the test is meant to run no SQL, add "
                "allow_no_queries=True to @pytest.mark.sqlprobe(...)."
            )
        # (finding, the failure text, the detection for N+1 findings)
        found: list[tuple[dict[str, Any], str, Any]] = []
        if policy.max_queries is not None and len(q) > policy.max_queries:
            message = (
                f"{nodeid} ran {len(q)} SQL statements, over its budget of "
                f"{policy.max_queries} ({policy.spelled['max_queries']})"
            )
            finding = _finding("query-budget", nodeid, message, *where, "max_queries")
            found.append((finding, f"{message}:\n{q.format()}", None))
        if policy.max_time is not None and q.total_duration > policy.max_time:
            message = (
                f"{nodeid} spent {q.total_duration * 1000:.1f} ms in SQL statements, over "
                f"its budget of {policy.max_time * 1000:.1f} ms ({policy.spelled['max_time']})"
            )
            finding = _finding("time-budget", nodeid, message, *where, "max_time")
            found.append((finding, f"{message}:\n{q.format()}", None))
        seen: set[tuple[str, str, str]] = set()
        for d in q.n_plus_one:
            if policy.allows(d.relationship, d.fingerprint):
                continue
            # The same loop detected in several units of the test (two requests) is
            # one finding.
            key = (d.relationship, d.fingerprint, d.source)
            if key in seen:
                continue
            seen.add(key)
            file, line = split_source(d.source)
            finding = _finding(
                "n-plus-one",
                nodeid,
                f"N+1: {d.relationship or 'a repeated SELECT'} executed {d.count}+ times "
                f"in one unit of work ({d.scope}); suggestion: {d.suggestion}",
                file or where[0],
                line or where[1],
                d.relationship or d.fingerprint,
            )
            finding["suggestion"] = d.suggestion
            found.append((finding, "", d))
        baseline = self._baseline_store()
        reported = []
        # Writing the baseline is a recording run: its findings fail nothing.
        recording = self.settings.baseline_update
        for finding, problem, detection in found:
            finding["baselined"] = baseline is not None and baseline.accepts(finding)
            out["findings"].append(finding)
            if finding["baselined"] or recording:
                continue
            if detection is not None:
                reported.append(detection)
            else:
                problems.append(problem)
        if reported and policy.n_plus_one == "fail":
            problems.append(format_detections(reported))
        elif reported and policy.n_plus_one == "warn" and not failed:
            _warn_at(format_detections(reported), reported[0].source, item)
        if reported and self.settings.verify_fixes and not failed:
            todo = {(d.relationship, d.suggestion) for d in reported}
            out["verify"] = [{"relationship": r, "suggestion": s} for r, s in sorted(todo)]
            out["statements"] = len(q)
            out["rows"] = rows

        snapshots = self._snapshot_store()
        if snapshots is not None and policy.snapshot and not failed:
            problem, entry = snapshots.check(item, q)
            if entry is not None:
                out["snapshot"] = entry
            if problem:
                problems.append(problem)
        if problems and not failed:
            pytest.fail("\n\n".join(problems), pytrace=False)

    def _baseline_store(self) -> Any:
        if self.settings.baseline is None or self.settings.baseline_update:
            return None
        if self._baseline is None:
            from ._findings import Baseline

            self._baseline = Baseline.load(self.settings.baseline)
        return self._baseline

    def _snapshot_store(self) -> Any:
        settings = self.settings
        if not (settings.snapshot or settings.snapshot_update):
            return None
        if self._snapshots is None:
            try:
                import yaml  # noqa: F401
            except ImportError:
                raise pytest.UsageError(
                    "sqlprobe's query snapshots are YAML files: pip install pyyaml"
                ) from None
            from ._snapshot import SnapshotStore

            self._snapshots = SnapshotStore(self.config, update=settings.snapshot_update)
        return self._snapshots

    # -- results -----------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Generator[None, Any, Any]:
        report = yield
        if report.when == "call":
            result = item.stash.get(_RESULT, None)
            if result is not None:
                report.sqlprobe = result
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        result = getattr(report, "sqlprobe", None)
        if report.when != "call" or not isinstance(result, dict):
            return
        self.counts.append((int(result.get("count", 0)), report.nodeid))
        self.findings.extend(result.get("findings", ()))
        snapshot = result.get("snapshot")
        if snapshot is not None:
            self.snapshots[report.nodeid] = (
                snapshot["module"],
                snapshot["key"],
                snapshot["queries"],
            )
        self.verified.extend(result.get("verified", ()))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.worker:
            return  # the controller writes, from the reports it received
        settings = self.settings
        if self.snapshots:
            from ._snapshot import write_snapshots

            write_snapshots(self.config, self.snapshots)
        if settings.baseline_update and settings.baseline is not None:
            from ._findings import Baseline

            Baseline.write(settings.baseline, self.findings)
        if settings.sarif is not None:
            from ._findings import write_sarif

            write_sarif(settings.sarif, self.findings, root=self.config.rootpath)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        write = terminalreporter.write_line
        if self.verified:
            terminalreporter.write_sep("-", "sqlprobe: suggested fixes, verified")
            for v in self.verified:
                write(f"{v['test']}: {v['line']}")
        if self.settings.baseline_update and self.settings.baseline is not None:
            write(
                f"sqlprobe: {len(self.findings)} finding(s) written to the baseline "
                f"{self.settings.baseline}"
            )
        if self.settings.sarif is not None:
            write(f"sqlprobe: {len(self.findings)} finding(s) written to {self.settings.sarif}")
        if not self.counts:
            return
        top = sorted(self.counts, key=lambda c: c[0], reverse=True)[:SUMMARY_SIZE]
        terminalreporter.write_sep("-", "sqlprobe: tests that ran the most SQL statements")
        width = len(str(top[0][0]))
        for count, nodeid in top:
            write(f"{count:>{width}}  {nodeid}")
        total = sum(c for c, _ in self.counts)
        write(f"{total} statements in {len(self.counts)} tests")


def _finding(
    kind: str, test: str, message: str, path: str, line: int, subject: str
) -> dict[str, Any]:
    """One finding as plain data (it crosses from xdist workers to the controller)."""
    return {
        "kind": kind,
        "test": test,
        "message": message,
        "path": path,
        "line": line,
        "subject": subject,
    }
