"""Compare the bare and the attached run of SQLAlchemy's test suite.

Called by ``scripts/sqlalchemy-suite.sh`` once both runs of every part are done. Reads,
per part, the JUnit XML reports (``bare-PART.xml``, ``attached-PART.xml``), pytest's
exit status and wall time of each run (``*.rc``, ``*.seconds``) and the attached run's
activity marker (``marker-PART.jsonl``, written by ``attached/sitecustomize.py``).

Prints the counts and times of both runs, the tests that fail (failure or error, in
any phase) only attached, those that fail only bare, and those that fail in both.
Test ids are pytest node ids, rebuilt from the report's ``classname``: SQLAlchemy
generates per-backend classes (``..._sqlite+pysqlite_3_40_1``) whose ``file``
attribute is ``<string>``, so the module is found as the longest dotted prefix of the
class name that is a file of the source tree.

A test that fails in one run only is run again by the shell script, alone, in both
modes (``rerun-bare-PART.xml``, ``rerun-attached-PART.xml``); when those reports exist,
a difference counts only if the re-run shows it again (fails attached and passes bare,
or the reverse), and is listed as "not reproduced" otherwise: timing tests fail now and
then on a loaded machine, and a test that depends on the tests before it can pass
alone. ``--differences PART`` prints the node ids that fail in one run only, for the
re-run.

Exit status: 0 when no test fails only attached; 1 when some test does; 2 when the
comparison cannot be trusted (a report is missing, pytest stopped abnormally, a test
that ran bare is absent from the attached run, or the attached run counted no
statement, i.e. sqlprobe was not active).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: pytest exit statuses after which the report is complete: all passed, some failed.
COMPLETE_STATUSES = {0, 1}
MESSAGE_MAX = 200


@dataclass
class Run:
    """One pytest run of one part: outcome per test id and the totals."""

    outcomes: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    status: int | None = None

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)

    @property
    def failing(self) -> set[str]:
        return {t for t, o in self.outcomes.items() if o in ("failed", "error")}


class NodeIds:
    """Maps a JUnit ``classname`` and ``name`` to the pytest node id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._modules: dict[str, str | None] = {}

    def _module_file(self, dotted: str) -> str | None:
        if dotted not in self._modules:
            path = dotted.replace(".", "/") + ".py"
            self._modules[dotted] = path if (self.root / path).is_file() else None
        return self._modules[dotted]

    def __call__(self, classname: str, name: str) -> str:
        parts = classname.split(".")
        for i in range(len(parts), 0, -1):
            path = self._module_file(".".join(parts[:i]))
            if path is not None:
                return "::".join([path, *parts[i:], name])
        return f"{classname}::{name}" if classname else name


def _first_line(text: str | None) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= MESSAGE_MAX else line[: MESSAGE_MAX - 3] + "..."


def read_run(out: Path, run: str, part: str, ids: NodeIds) -> Run | None:
    result = Run()
    xml = out / f"{run}-{part}.xml"
    if not xml.is_file():
        return None
    for case in ET.parse(xml).iter("testcase"):
        test = ids(case.get("classname", ""), case.get("name", ""))
        outcome = "passed"
        message = ""
        for child in case:
            if child.tag == "failure":
                outcome, message = "failed", child.get("message") or child.text or ""
            elif child.tag == "error" and outcome != "failed":
                outcome, message = "error", child.get("message") or child.text or ""
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        # A test can be reported twice (a failure in the call, an error in teardown).
        previous = result.outcomes.get(test)
        if previous in ("failed", "error") and outcome not in ("failed", "error"):
            continue
        result.outcomes[test] = outcome
        if message:
            result.messages[test] = _first_line(message)
    for name, attr in (("seconds", "seconds"), ("rc", "status")):
        path = out / f"{run}-{part}.{name}"
        if path.is_file():
            text = path.read_text().strip()
            setattr(result, attr, float(text) if attr == "seconds" else int(text))
    return result


def read_marker(out: Path, part: str) -> list[dict[str, Any]]:
    path = out / f"marker-{part}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _line(label: str, run: Run) -> str:
    return (
        f"  {label:<16}{len(run.outcomes):>7} tests {run.count('passed'):>7} passed"
        f" {run.count('skipped'):>6} skipped {run.count('failed'):>5} failed"
        f" {run.count('error'):>5} errors {run.seconds:>8.1f} s  (pytest exit {run.status})"
    )


def _listing(title: str, tests: list[str], messages: dict[str, str], prefix: str) -> None:
    print(f"{title} ({len(tests)}):")
    for test in tests:
        print(f"  {prefix}{test}")
        if test in messages:
            print(f"      {messages[test]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the unpacked sdist")
    parser.add_argument("--out", type=Path, required=True, help="the runs' output directory")
    parser.add_argument("--title", default="", help="the heading line")
    parser.add_argument(
        "--differences", action="store_true", help="print the ids failing in one run only"
    )
    parser.add_argument("parts", nargs="+", help="part labels, as in the file names")
    args = parser.parse_args(argv)

    ids = NodeIds(args.root)
    if args.differences:
        for part in args.parts:
            bare, attached = (read_run(args.out, r, part, ids) for r in ("bare", "attached"))
            if bare is not None and attached is not None:
                for test in sorted(bare.failing ^ attached.failing):
                    print(test)
        return 0
    problems: list[str] = []
    only_attached: list[str] = []
    only_bare: list[str] = []
    both: list[str] = []
    unconfirmed: list[str] = []
    messages: dict[str, str] = {}
    total = {"bare": 0.0, "attached": 0.0}
    if args.title:
        print(args.title)
    for part in args.parts:
        prefix = f"[{part}] " if len(args.parts) > 1 else ""
        description = out_text(args.out / f"{part}.args")
        print(f"\npart {part}: {description}")
        runs = {r: read_run(args.out, r, part, ids) for r in ("bare", "attached")}
        for label, run in runs.items():
            if run is None:
                problems.append(f"{part}: no report from the {label} run")
                print(f"  {label:<16}no report")
                continue
            total[label] += run.seconds
            print(_line(label, run))
            if run.status not in COMPLETE_STATUSES:
                problems.append(f"{part}: the {label} run stopped with pytest exit {run.status}")
        bare, attached = runs["bare"], runs["attached"]
        marker = read_marker(args.out, part)
        pytest_records = [
            m for m in marker if any("pytest" in str(a) for a in m.get("argv", []) or [])
        ]
        statements = sum(int(m.get("statements", 0) or 0) for m in pytest_records)
        engines = sum(int(m.get("engines", 0) or 0) for m in pytest_records)
        errors = [str(m["error"]) for m in marker if "error" in m]
        print(
            f"  sqlprobe in the attached run: {len(marker)} process(es) reported,"
            f" {engines} engine probe(s) and {statements} statement(s) counted"
            " in the pytest process"
        )
        for error in errors:
            problems.append(f"{part}: {error}")
        if statements == 0:
            problems.append(f"{part}: the attached run counted no statement (not attached?)")
        if bare is None or attached is None:
            continue
        absent = sorted(
            t
            for t, o in bare.outcomes.items()
            if t not in attached.outcomes and o in ("passed", "skipped")
        )
        if absent:
            problems.append(f"{part}: {len(absent)} test(s) ran bare but not attached")
            _listing("  ran bare, absent attached", absent[:50], {}, prefix)
        rerun = {r: read_run(args.out, f"rerun-{r}", part, ids) for r in ("bare", "attached")}
        confirmed = rerun["bare"] is not None and rerun["attached"] is not None
        if confirmed:
            assert rerun["bare"] is not None and rerun["attached"] is not None
            print(_line("re-run bare", rerun["bare"]))
            print(_line("re-run attached", rerun["attached"]))
        for kind, failing, passing, into in (
            ("attached", attached, bare, only_attached),
            ("bare", bare, attached, only_bare),
        ):
            for test in sorted(failing.failing - passing.failing):
                if test in failing.messages:
                    messages[prefix + test] = failing.messages[test]
                if confirmed:
                    again = rerun[kind]
                    other = rerun["bare" if kind == "attached" else "attached"]
                    assert again is not None and other is not None
                    if not (test in again.failing and other.outcomes.get(test) == "passed"):
                        unconfirmed.append(f"{prefix}{test}  (failed only {kind})")
                        continue
                into.append(prefix + test)
        both.extend(prefix + t for t in sorted(bare.failing & attached.failing))

    print(f"\ntime: bare {total['bare']:.1f} s, attached {total['attached']:.1f} s")
    print()
    _listing("failing only attached", only_attached, messages, "")
    _listing("failing only bare", only_bare, messages, "")
    _listing("failing in both runs", both, {}, "")
    if unconfirmed:
        _listing("not reproduced when run again alone (not counted)", unconfirmed, {}, "")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        print("result: the comparison is incomplete (exit 2)")
        return 2
    if only_attached:
        print(f"result: {len(only_attached)} test(s) fail only with sqlprobe attached (exit 1)")
        return 1
    print("result: identical failure sets")
    return 0


def out_text(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


if __name__ == "__main__":
    sys.exit(main())
