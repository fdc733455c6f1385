"""Run mutmut on one or more mutation targets (see scripts/mutation.sh).

A target is a table ``[tool.mutmut.targets.NAME]`` in pyproject.toml: the modules to
mutate (``source_paths``) and the tests that can kill their mutants
(``pytest_add_cli_args_test_selection``); every other ``[tool.mutmut]`` key is shared.
mutmut reads its configuration only from the pyproject.toml of the directory it runs
in, so each target runs in a directory of its own, ``build/mutation/NAME``: links to
the project's files plus a pyproject.toml whose ``[tool.mutmut]`` is the target's. The
mutants, mutmut's cache and the results of a target therefore stay apart from the
others'.

For each target the script prints the counts (killed, survived, timeout, no tests,
...) and writes ``mutation-survivors-NAME.txt``: every mutant not killed, with its
status and its diff against the original function. Which
survivors are equivalent is decided by reading them; the list, with a reason each, is
in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # mutmut itself needs the toml package there
    import toml as tomllib

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
#: Top-level entries never linked into a target's directory.
SKIP = {".git", ".venv", ".venv-sa20", ".venv-py312", "build", "mutants", "pyproject.toml", "site"}


def _targets() -> tuple[dict[str, object], dict[str, dict[str, object]]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["mutmut"]
    shared = {k: v for k, v in config.items() if k not in ("targets", "source_paths")}
    shared.pop("pytest_add_cli_args_test_selection", None)
    return shared, config["targets"]


def _pyproject(settings: dict[str, object]) -> str:
    """pyproject.toml with its ``[tool.mutmut...]`` tables replaced by ``settings``."""
    kept: list[str] = []
    skipping = False
    for line in (ROOT / "pyproject.toml").read_text("utf-8").splitlines():
        if line.startswith("["):
            skipping = re.match(r"\[tool\.mutmut[\].]", line) is not None
        if not skipping:
            kept.append(line)
    kept.append("[tool.mutmut]")
    # Lists of strings, numbers and booleans: JSON spells them as TOML does.
    kept.extend(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    return "\n".join(kept) + "\n"


def _prepare(name: str, settings: dict[str, object], resume: bool) -> Path:
    where = WORK / name
    if resume and (where / "mutants").is_dir():
        return where  # mutmut keeps the results it has and tests the rest
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name not in SKIP:
            (where / entry.name).symlink_to(entry)
    (where / "pyproject.toml").write_text(_pyproject(settings), "utf-8")
    return where


def _mutmut(where: Path, *args: str, capture: bool = False) -> str:
    exe = str(Path(sys.executable).with_name("mutmut"))
    done = subprocess.run([exe, *args], cwd=where, text=True, capture_output=capture, check=False)
    return done.stdout if capture else ""


@functools.cache
def _functions(path: Path) -> dict[str, str]:
    """The source of each function of a mutants file, by name (originals and mutants)."""
    source = path.read_text("utf-8")
    lines = source.splitlines()
    return {
        node.name: "\n".join(lines[node.lineno - 1 : node.end_lineno])
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name
    }


def _with_diff(mutants: Path, line: str) -> str:
    """A line of `mutmut results` (``module.xfunction__mutmut_N: status``) with the
    mutant's diff against its original function under it.

    `mutmut show NAME` prints the same but takes seconds per call; the mutants file holds
    every mutant as a function of its own beside ``..._mutmut_orig``, so the diff is read
    from there.
    """
    name = line.rsplit(":", 1)[0].strip()
    module, _, function = name.rpartition(".")
    path = mutants / (module.replace(".", "/") + ".py")
    if "__mutmut_" not in function or not path.is_file():
        return line + "\n"
    functions = _functions(path)
    base = function.rsplit("__mutmut_", 1)[0]
    original, mutant = functions.get(base + "__mutmut_orig"), functions.get(function)
    if original is None or mutant is None:
        return line + "\n"
    diff = difflib.unified_diff(
        original.replace(base + "__mutmut_orig", "f").splitlines(),
        mutant.replace(function, "f").splitlines(),
        lineterm="",
        n=1,
    )
    body = [f"    {d}" for d in diff if not d.startswith(("---", "+++"))]
    return line + "\n" + "".join(b + "\n" for b in body)


def run(name: str, settings: dict[str, object], workers: int, resume: bool) -> dict[str, int]:
    where = _prepare(name, settings, resume)
    print(f"== mutation target {name}: {', '.join(settings['source_paths'])}", flush=True)
    _mutmut(where, "run", "--max-children", str(workers))
    _mutmut(where, "export-cicd-stats", capture=True)
    stats_file = where / "mutants" / "mutmut-cicd-stats.json"
    stats: dict[str, int] = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    listing = _mutmut(where, "results", capture=True)
    out = ROOT / f"mutation-survivors-{name}.txt"
    lines = [line.strip() for line in listing.splitlines() if line.strip()]
    out.write_text("".join(_with_diff(where / "mutants", line) for line in lines), "utf-8")
    print(f"{name}: {json.dumps(stats)}  (survivors: {out.relative_to(ROOT)})", flush=True)
    return stats


def main() -> None:
    shared, targets = _targets()
    parser = argparse.ArgumentParser(description="mutation testing per target")
    parser.add_argument("targets", nargs="*", help=f"of: {', '.join(targets)} (default: all)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("MUTATION_WORKERS", "1")))
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run of each target"
    )
    args = parser.parse_args()
    unknown = [t for t in args.targets if t not in targets]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(targets)}")
    summary = {}
    for name in args.targets or list(targets):
        summary[name] = run(name, {**shared, **targets[name]}, args.workers, args.resume)
    keys = ("killed", "survived", "timeout", "no_tests", "suspicious", "total")
    print("\ntarget        " + "".join(f"{k:>11}" for k in keys))
    for name, stats in summary.items():
        print(f"{name:<14}" + "".join(f"{stats.get(k, 0):>11}" for k in keys))


if __name__ == "__main__":
    main()
