"""Attach sqlprobe to every engine this process creates (the suite's attached run).

``scripts/sqlalchemy-suite.sh`` puts this directory on ``PYTHONPATH`` for the attached
run only, so Python imports this module at start-up, before pytest and SQLAlchemy's
test plugin. It calls ``sqlprobe.attach()`` without an engine and with a registry of
its own (nothing else in the process sees it), with every other option at its
default, as an application adopting sqlprobe would.

So that a run that silently did not attach cannot pass for a clean comparison, the
process appends one JSON line to the file named by ``SQLPROBE_SA_SUITE_MARKER`` when
it exits: its pid and arguments, whether the probe was attached, how many engine
probes it holds and how many statements the registry counted. The comparer refuses a
run whose pytest process counted no statement. Without that variable (a Python
process that merely inherited the path) nothing is attached.
"""

from __future__ import annotations

import atexit
import json
import os
import sys


def _write(path: str, record: dict[str, object]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError:
        pass


def _statements(registry: object) -> int:
    total = 0.0
    for family in registry.collect():  # type: ignore[attr-defined]
        if family.name == "sqlprobe_statement_calls":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return int(total)


def _main() -> None:
    marker = os.environ.get("SQLPROBE_SA_SUITE_MARKER")
    if not marker:
        return
    record: dict[str, object] = {"pid": os.getpid()}
    try:
        from prometheus_client import CollectorRegistry

        import sqlprobe

        registry = CollectorRegistry()
        probe = sqlprobe.attach(registry=registry)
    except Exception as exc:
        record["error"] = f"attach() raised {type(exc).__name__}: {exc}"
        record["argv"] = sys.argv[:2]
        _write(marker, record)
        return

    def report() -> None:
        record["argv"] = sys.argv[:2]
        record["attached"] = probe.attached
        record["engines"] = len(probe.probes)
        try:
            record["statements"] = _statements(registry)
        except Exception as exc:
            record["error"] = f"reading the registry raised {type(exc).__name__}: {exc}"
        _write(marker, record)

    atexit.register(report)


_main()
