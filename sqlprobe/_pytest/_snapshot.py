"""Query snapshots: each test's statement shapes, kept in YAML beside the test module.

``--sqlprobe-snapshot`` compares what a test runs with what it ran when its snapshot
was recorded (``tests/test_users.py`` -> ``tests/test_users.sqlprobe.yaml``, one entry
per test, keyed by the test's name within its module), and fails it with a diff when
they differ. A test without an entry gets one; ``--sqlprobe-snapshot-update`` rewrites
the entries of every test that runs. Entries of tests that did not run are kept.

An entry is the ordered list of the test's statement shapes, in the order each was
first executed: the normalized text (no literal or parameter value; IN lists and
multi-row VALUES of any length collapse to one form), its operation, its table and how
many times it ran. Transaction statements (BEGIN, COMMIT, ROLLBACK, SAVEPOINT with its
generated name, RELEASE, SET) and first-connect queries are left out, and no timing is
kept, so a re-run with other data gives the same file; a new, removed or changed
shape, or a count that moved (one query per row instead of one in all), is a diff.

Under pytest-xdist the workers only read the files; each test's entry travels to the
controller on its report and the controller writes every file once, at the end.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._capture import TestCapture

__all__ = ["SUFFIX", "SnapshotStore", "shapes", "snapshot_path", "write_snapshots"]

SUFFIX = ".sqlprobe.yaml"
HEADER = (
    "# sqlprobe query snapshots: the statement shapes each test runs, in order.\n"
    "# Written by pytest --sqlprobe-snapshot; rewrite with --sqlprobe-snapshot-update.\n"
)


def snapshot_path(module: Path) -> Path:
    """``test_users.sqlprobe.yaml`` beside ``test_users.py``."""
    return module.with_name(module.stem + SUFFIX)


def _key(item: pytest.Item) -> str:
    # The node id within its module: "test_list", "TestUsers::test_list[3]".
    return item.nodeid.split("::", 1)[1] if "::" in item.nodeid else item.name


def shapes(q: TestCapture) -> list[dict[str, Any]]:
    """The test's statement shapes in order of first execution, with their counts."""
    out: dict[str, dict[str, Any]] = {}
    for s in q.statements:
        entry = out.get(s.fingerprint)
        if entry is None:
            out[s.fingerprint] = {
                "sql": s.statement,
                "operation": s.operation,
                "table": s.table,
                "count": 1,
            }
        else:
            entry["count"] += 1
    return list(out.values())


def _load(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise pytest.UsageError(f"{path} is not a sqlprobe snapshot file (not a mapping)")
    return data


class SnapshotStore:
    """Reads the snapshot files (once each) and checks one test against its entry."""

    def __init__(self, config: pytest.Config, *, update: bool) -> None:
        self.update = update
        self.rootpath = config.rootpath
        self._files: dict[Path, dict[str, Any]] = {}

    def check(self, item: pytest.Item, q: TestCapture) -> tuple[str | None, dict[str, Any] | None]:
        """(the failure text or None, the entry to write or None)."""
        module = Path(str(item.path))
        path = snapshot_path(module)
        key = _key(item)
        queries = shapes(q)
        entry = {"module": str(path), "key": key, "queries": queries}
        if self.update:
            return None, entry
        recorded = self._files.get(path)
        if recorded is None:
            recorded = self._files[path] = _load(path)
        old = recorded.get(key)
        if old is None:
            return None, entry  # a new test: record it
        if old == queries:
            return None, None
        sources = {s.statement: q.sources.get(s.fingerprint, "") for s in q.statements}
        return self._diff(item, path, old, queries, sources), None

    def _diff(
        self,
        item: pytest.Item,
        path: Path,
        old: list[dict[str, Any]],
        new: list[dict[str, Any]],
        sources: dict[str, str],
    ) -> str:
        try:
            shown = path.relative_to(self.rootpath)
        except ValueError:
            shown = path
        lines = [
            f"the queries of {item.nodeid} changed since its snapshot in {shown} "
            "(--sqlprobe-snapshot-update records the new ones):"
        ]

        def at(entry: dict[str, Any]) -> str:
            source = sources.get(entry["sql"], "")
            return f"\n      at {source}" if source else ""

        def describe(entry: dict[str, Any]) -> str:
            text = str(entry.get("sql", ""))
            text = text if len(text) <= 200 else text[:197] + "..."
            return f"{text}  [{entry.get('count')}x]"

        matcher = difflib.SequenceMatcher(
            a=[e.get("sql") for e in old], b=[e.get("sql") for e in new], autojunk=False
        )
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                for a, b in zip(old[i1:i2], new[j1:j2], strict=True):
                    if a != b:
                        changes = ", ".join(
                            f"{k} {a.get(k)!r} -> {b.get(k)!r}"
                            for k in ("count", "operation", "table")
                            if a.get(k) != b.get(k)
                        )
                        lines.append(f"  ~ {describe(b)}: {changes}{at(b)}")
                continue
            for a in old[i1:i2]:
                lines.append(f"  - {describe(a)}")
            for b in new[j1:j2]:
                lines.append(f"  + {describe(b)}{at(b)}")
        return "\n".join(lines)


def write_snapshots(config: pytest.Config, entries: dict[str, tuple[str, str, Any]]) -> None:
    """Merge the entries of the tests that ran into their files, and write each once."""
    import yaml

    by_file: dict[Path, dict[str, Any]] = {}
    for module, key, queries in entries.values():
        by_file.setdefault(Path(module), {})[key] = queries
    for path, new in sorted(by_file.items()):
        data = _load(path)
        data.update(new)
        text = yaml.safe_dump(
            {k: data[k] for k in sorted(data)},
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=True,
            width=1_000_000,
        )
        if path.exists() and path.read_text(encoding="utf-8") == HEADER + text:
            continue
        path.write_text(HEADER + text, encoding="utf-8")
