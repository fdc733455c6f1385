"""Attach sqlprobe to every engine of the process (the suite's attached run).

``scripts/sqlalchemy-suite.sh`` puts this directory on ``PYTHONPATH`` for the attached
run only, so Python imports this module at start-up, before pytest and SQLAlchemy's
test plugin. It does not import anything itself: it waits for the process to import
``sqlalchemy`` and calls ``sqlprobe.attach()`` right after that import, without an
engine and with a registry of its own (nothing else in the process sees it), every
other option at its default. That is an application that imports SQLAlchemy and
sqlprobe and attaches before it creates its engines; attaching at interpreter start-up
instead would import SQLAlchemy into every Python process the tests spawn, which some
tests check does not happen.

So that a run that silently did not attach cannot pass for a clean comparison, the
process appends one JSON line to the file named by ``SQLPROBE_SA_SUITE_MARKER`` when
it exits: its pid and first arguments, whether it attached, how many engine probes the
global probe holds and how many statements the registry counted. The comparer refuses
a run whose pytest process counted no statement. Without that variable (a Python
process that merely inherited the path) nothing is attached.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import sys
import weakref
from typing import Any

_record: dict[str, Any] = {"pid": os.getpid(), "attached": False}
_probe: list[Any] = []


def _write(path: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_record) + "\n")
    except OSError:
        pass


def _attach() -> None:
    try:
        from prometheus_client import CollectorRegistry

        import sqlprobe

        registry = CollectorRegistry()
        _probe[:] = [sqlprobe.attach(registry=registry), registry]
        _record["attached"] = _probe[0].attached
    except Exception as exc:
        _record["error"] = f"attach() raised {type(exc).__name__}: {exc}"


def _report(path: str) -> None:
    _record["argv"] = sys.argv[:2]
    if _probe:
        probe, registry = _probe
        _record["engines"] = len(probe.probes)
        try:
            total = 0.0
            for family in registry.collect():
                if family.name == "sqlprobe_statement_calls":
                    total += sum(s.value for s in family.samples if s.name.endswith("_total"))
            _record["statements"] = int(total)
        except Exception as exc:
            _record["error"] = f"reading the registry raised {type(exc).__name__}: {exc}"
    _write(path)


class _Anchor:
    pass


_anchor = _Anchor()


class _AttachAfterImport:
    """A meta path finder that runs :func:`_attach` once ``sqlalchemy`` is imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "sqlalchemy":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            _attach()  # nothing to hook into; attach before SQLAlchemy's import instead
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _attach()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _main() -> None:
    marker = os.environ.get("SQLPROBE_SA_SUITE_MARKER")
    if not marker:
        return
    if "sqlalchemy" in sys.modules:
        _attach()
    else:
        sys.meta_path.insert(0, _AttachAfterImport())
    # atexit runs handlers last-registered first. sqlprobe's weakref.finalize hooks (an
    # engine's clean-up) run from weakref's own atexit handler, registered with the
    # first finalize; creating one here first makes the report run before them.
    weakref.finalize(_anchor, lambda: None)
    atexit.register(_report, marker)


_main()
