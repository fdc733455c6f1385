"""The package layout's dependency rule, as import-linter contracts, can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package and its import-linter configuration."""
    if not LINT.exists():
        pytest.fail("lint-imports is not installed in this environment")
    shutil.copytree(ROOT / "sqlprobe", tmp_path / "sqlprobe")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layout_keeps_its_contracts(tree: Path) -> None:
    """lint-imports passes on the package as it is."""
    result = _lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("_sinks/_slowlog.py", "from .._probe import Probe", "never import the probe"),
        ("_analysis/_nplusone.py", "from .. import _state", "never import the probe"),
        ("_sinks/_prometheus.py", "from .._hooks import _pool", "never import the probe"),
        ("_core/_collector.py", "from .._sinks import _prometheus", "core imports no feature"),
        ("_sinks/_otel.py", "from .._analysis import _explain", "Layers"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    tree: Path, module: str, line: str, broken: str
) -> None:
    """Adding an import that crosses the layers makes lint-imports fail, naming the rule."""
    path = tree / "sqlprobe" / module
    source = path.read_text()
    marker = "from __future__ import annotations\n"
    assert marker in source
    path.write_text(source.replace(marker, marker + line + "  # noqa\n", 1))
    result = _lint(tree)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    broken_lines = [ln for ln in result.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(broken in ln for ln in broken_lines), result.stdout
