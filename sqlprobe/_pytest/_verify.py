"""``--sqlprobe-verify-fixes``: each suggested loader option, tried on the test itself.

A test in which an N+1 was found (and not accepted) is run again, whole (fixtures set up
afresh), once per suggestion, with the suggested loader option applied to every ORM
SELECT of the option's root entity (``selectinload(User.orders)`` on each
``select(User)``, ``session.get(User, ...)``...). The option is added by a
``do_orm_execute`` listener on the ``Session`` class that exists only during that
re-run, so nothing else is touched. Reported per finding:

* whether the test still passes with the option;
* the statements of its call phase before and after;
* whether the rows the ORM loaded were the same (the identities of the objects it
  loaded, compared as sets: an eager load must bring the same rows, not fewer);
* whether the N+1 is gone. A suggestion that breaks the test, changes the rows or
  leaves the N+1 is reported as such, never as a fix; one that is not a loader option
  (``expire_on_commit=False``, a generic hint) is reported as not verifiable.

The first run's report is logged once the re-runs are done (it carries their outcome,
which is how the outcome reaches the pytest-xdist controller); the re-runs' own
reports are not logged.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["FixVerifier", "RowRecorder", "build_option"]

_CALL = re.compile(r"(\w+)\((\w+)\.(\w+)\)")
_CHAIN = re.compile(r"^\w+\(\w+\.\w+\)(?:\.\w+\(\w+\.\w+\))*$")
#: Loader options a suggestion may name.
LOADERS = frozenset(
    {"selectinload", "joinedload", "subqueryload", "immediateload", "undefer", "defaultload"}
)


def _mapped_class(name: str, attribute: str, prefer: Callable[[type], bool] | None) -> Any:
    from sqlalchemy.orm import mapperlib

    found = []
    for registry in list(mapperlib._all_registries()):
        for mapper in list(registry.mappers):
            cls = mapper.class_
            if cls.__name__ == name and attribute in mapper.attrs:
                found.append(cls)
    if len(found) > 1 and prefer is not None:
        # Several test modules of one session may each map a ``User``.
        found = [cls for cls in found if prefer(cls)]
    if len(found) != 1:
        raise LookupError(
            f"{'no' if not found else 'more than one'} mapped class {name} with {attribute}"
        )
    return found[0]


def build_option(suggestion: str, prefer: Callable[[type], bool] | None = None) -> tuple[Any, Any]:
    """(the root class, the loader option) of a suggestion such as
    ``selectinload(User.orders).selectinload(Order.items)``; LookupError if it is none.

    When several mapped classes carry the name, only those ``prefer`` accepts count (the
    verifier prefers classes defined beside the test)."""
    from sqlalchemy import orm

    text = suggestion.strip()
    if not _CHAIN.match(text):
        raise LookupError("not a loader option")
    option: Any = None
    root = None
    for loader, cls_name, attribute in _CALL.findall(text):
        if loader not in LOADERS:
            raise LookupError(f"{loader} is not a loader option")
        cls = _mapped_class(cls_name, attribute, prefer)
        attr = getattr(cls, attribute)
        if option is None:
            root = cls
            option = getattr(orm, loader)(attr)
        else:
            option = getattr(option, loader)(attr)
    return root, option


def _beside(item: pytest.Item) -> Callable[[type], bool]:
    """Whether a class is the test's: imported by its module, or defined beside it."""
    import os
    import sys

    folder = os.path.dirname(os.path.abspath(str(item.path)))
    test_module = getattr(item, "module", None)

    def accept(cls: type) -> bool:
        if getattr(test_module, cls.__name__, None) is cls:
            return True
        # The module must still hold this very class: an earlier module of the same
        # name (pytester's conftest of another test) has been replaced in sys.modules.
        module = sys.modules.get(cls.__module__)
        path = getattr(module, "__file__", None)
        return (
            path is not None
            and getattr(module, cls.__name__, None) is cls
            and os.path.abspath(path).startswith(folder + os.sep)
        )

    return accept


class RowRecorder:
    """The identities of the objects every Session loads while it is open."""

    def __init__(self) -> None:
        self.rows: set[str] = set()

    def _loaded(self, session: Any, instance: Any) -> None:
        from sqlalchemy import inspect

        try:
            state = inspect(instance)
            self.rows.add(f"{type(instance).__name__}{state.identity!r}")
        except Exception:  # identity is best effort, never disturb the ORM
            pass

    def __enter__(self) -> RowRecorder:
        from sqlalchemy import event
        from sqlalchemy.orm import Session

        event.listen(Session, "loaded_as_persistent", self._loaded)
        return self

    def __exit__(self, *exc: object) -> None:
        from sqlalchemy import event
        from sqlalchemy.orm import Session

        event.remove(Session, "loaded_as_persistent", self._loaded)

    def digest(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.rows)).encode()).hexdigest()


class _Apply:
    """Adds one loader option to the ORM SELECTs of its root entity (one re-run)."""

    def __init__(self, root: Any, option: Any) -> None:
        self.root = root
        self.option = option

    def __call__(self, state: Any) -> None:
        if not state.is_select or state.is_relationship_load or state.is_column_load:
            return
        statement = state.statement
        try:
            entities = [d.get("entity") for d in statement.column_descriptions]
        except Exception:
            return
        if self.root in entities:
            state.statement = statement.options(self.option)

    def __enter__(self) -> _Apply:
        from sqlalchemy import event
        from sqlalchemy.orm import Session

        event.listen(Session, "do_orm_execute", self)
        return self

    def __exit__(self, *exc: object) -> None:
        from sqlalchemy import event
        from sqlalchemy.orm import Session

        event.remove(Session, "do_orm_execute", self)


class FixVerifier:
    """Runs a test's protocol itself, to run it again once per suggested fix."""

    def __init__(self, session: Any) -> None:
        self.session = session

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        from _pytest.runner import runtestprotocol

        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        for report in reports:
            result = getattr(report, "sqlprobe", None)
            if report.when == "call" and isinstance(result, dict) and result.get("verify"):
                result["verified"] = [
                    self._verify(item, nextitem, result, todo) for todo in result["verify"]
                ]
        for report in reports:
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _verify(
        self,
        item: pytest.Item,
        nextitem: pytest.Item | None,
        first: dict[str, Any],
        todo: dict[str, Any],
    ) -> dict[str, Any]:
        from _pytest.runner import runtestprotocol

        suggestion = str(todo.get("suggestion", ""))
        relationship = str(todo.get("relationship", ""))
        out: dict[str, Any] = {"test": item.nodeid, "suggestion": suggestion, "fix": False}
        try:
            root, option = build_option(suggestion, _beside(item))
        except LookupError as exc:
            out["line"] = f"{suggestion}: not verifiable ({exc})"
            return out
        rerun: dict[str, Any] = {}
        self.session.rerun = rerun
        try:
            with _Apply(root, option):
                reports = runtestprotocol(item, nextitem=nextitem, log=False)
        finally:
            self.session.rerun = None
        passed = all(r.passed for r in reports if r.when == "call") and not any(
            r.failed for r in reports
        )
        before, after = int(first.get("statements", 0)), int(rerun.get("count", 0))
        same = rerun.get("rows") == first.get("rows")
        remains = relationship != "" and relationship in rerun.get("relationships", ())
        verdict = [
            "passes" if passed else "breaks the test",
            f"{before} -> {after} statements",
            "same rows" if same else "different rows",
        ]
        if remains:
            verdict.append(f"the N+1 on {relationship} remains")
        out.update(passes=passed, before=before, after=after, same_rows=same)
        out["fix"] = passed and same and not remains and after < before
        line = f"{suggestion}: {', '.join(verdict)}"
        if not out["fix"]:
            line += " (not a fix)"
        out["line"] = line
        return out
