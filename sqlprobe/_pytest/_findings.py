"""Findings out of the test run: the baseline file and the SARIF 2.1.0 report.

A finding is plain data (it crosses from pytest-xdist workers to the controller on the
test's report): ``kind`` (``n-plus-one``, ``query-budget``, ``time-budget``), ``test``
(the node id), ``message``, ``path`` and ``line`` (the loop's line for an N+1, the
test's for a budget), ``subject`` (the relationship, else the statement fingerprint;
the budget's name) and, for an N+1, ``suggestion``.

Baseline
--------
A JSON file of accepted findings, identified by (kind, test, subject): no line number,
so editing the code above a known N+1 does not make it new. ``--sqlprobe-baseline=PATH``
makes those findings neither fail nor warn (they are still in the SARIF file, marked
``unchanged``); ``--sqlprobe-baseline-update`` writes every finding of the run to PATH.

SARIF
-----
One run, tool ``sqlprobe``, one rule per finding kind, each result at its source line
(``%SRCROOT%``-relative URI: the rootdir), with a stable partial fingerprint and
``baselineState`` ``new`` or ``unchanged``; GitHub code scanning reads it as is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["RULES", "Baseline", "sarif_log", "write_sarif"]

#: kind -> (name, short description, full description, level)
RULES: dict[str, tuple[str, str, str, str]] = {
    "n-plus-one": (
        "NPlusOneQuery",
        "N+1 query pattern",
        "The same SELECT shape ran once per parent row in one unit of work (a test, a "
        "request, a session or a transaction): load the rows in one query, e.g. with the "
        "suggested loader option.",
        "warning",
    ),
    "query-budget": (
        "QueryBudgetExceeded",
        "Test over its query budget",
        "The test ran more SQL statements than its max_queries budget allows.",
        "error",
    ),
    "time-budget": (
        "QueryTimeBudgetExceeded",
        "Test over its SQL time budget",
        "The test's SQL statements took longer in total than its max_time budget allows.",
        "error",
    ),
}
VERSION = 1


def _identity(finding: dict[str, Any]) -> tuple[str, str, str]:
    return (str(finding["kind"]), str(finding["test"]), str(finding["subject"]))


class Baseline:
    """The accepted findings of a baseline file."""

    def __init__(self, accepted: set[tuple[str, str, str]]) -> None:
        self.accepted = accepted

    @classmethod
    def load(cls, path: Path) -> Baseline:
        import pytest

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise pytest.UsageError(
                f"the sqlprobe baseline {path} does not exist; write it with "
                "--sqlprobe-baseline-update"
            ) from None
        except ValueError as exc:
            raise pytest.UsageError(f"the sqlprobe baseline {path} is not JSON: {exc}") from None
        entries = data.get("findings") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise pytest.UsageError(f"the sqlprobe baseline {path} has no findings list")
        return cls({_identity(e) for e in entries if isinstance(e, dict)})

    def accepts(self, finding: dict[str, Any]) -> bool:
        return _identity(finding) in self.accepted

    @staticmethod
    def write(path: Path, findings: list[dict[str, Any]]) -> None:
        entries = sorted({_identity(f): f for f in findings}.items(), key=lambda item: item[0])
        data = {
            "version": VERSION,
            "tool": "sqlprobe",
            "findings": [
                {"kind": k, "test": t, "subject": s, "message": f["message"]}
                for (k, t, s), f in entries
            ],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _uri(path: str, root: Path) -> tuple[str, bool]:
    """(URI, relative to the root?) of a finding's path (cwd-relative or absolute)."""
    absolute = Path(path) if os.path.isabs(path) else Path.cwd() / path
    try:
        return absolute.resolve().relative_to(root.resolve()).as_posix(), True
    except ValueError:
        return absolute.resolve().as_uri(), False


def sarif_log(findings: list[dict[str, Any]], *, root: Path) -> dict[str, Any]:
    """The SARIF 2.1.0 log of a run's findings."""
    from .._core._version import __version__

    kinds = list(RULES)
    rules = [
        {
            "id": kind,
            "name": name,
            "shortDescription": {"text": short},
            "fullDescription": {"text": full},
            "defaultConfiguration": {"level": level},
        }
        for kind, (name, short, full, level) in RULES.items()
    ]
    results = []
    for f in findings:
        kind = str(f["kind"])
        if kind not in RULES:
            continue
        uri, relative = _uri(str(f["path"]), root)
        location: dict[str, Any] = {"uri": uri}
        if relative:
            location["uriBaseId"] = "%SRCROOT%"
        digest = hashlib.sha256("\x00".join(_identity(f)).encode()).hexdigest()[:32]
        properties: dict[str, Any] = {"test": f["test"], "subject": f["subject"]}
        if f.get("suggestion"):
            properties["suggestion"] = f["suggestion"]
        results.append(
            {
                "ruleId": kind,
                "ruleIndex": kinds.index(kind),
                "level": RULES[kind][3],
                "message": {"text": str(f["message"])},
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": location,
                            "region": {"startLine": max(int(f["line"]), 1)},
                        }
                    }
                ],
                "partialFingerprints": {"sqlprobeFinding/v1": digest},
                "baselineState": "unchanged" if f.get("baselined") else "new",
                "properties": properties,
            }
        )
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "sqlprobe",
                        "version": __version__,
                        "rules": rules,
                    }
                },
                "originalUriBaseIds": {"%SRCROOT%": {"uri": root.resolve().as_uri() + "/"}},
                "results": results,
            }
        ],
    }


def write_sarif(path: Path, findings: list[dict[str, Any]], *, root: Path) -> None:
    """Write the SARIF file (its directory is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sarif_log(findings, root=root), indent=2) + "\n", encoding="utf-8")
