"""The documentation: complete configuration reference, no references outside the repository."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sqlprobe
from sqlprobe import _config

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _rows(page: str) -> dict[str, list[str]]:
    """First cell (the backticked name) -> all cells, for every table row of a page."""
    rows: dict[str, list[str]] = {}
    for line in (DOCS / page).read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = cells
    return rows


def test_every_attach_option_is_documented_with_its_default() -> None:
    """configuration.md has a row for every attach() keyword, giving its code default."""
    rows = _rows("configuration.md")
    for name, param in inspect.signature(sqlprobe.attach).parameters.items():
        assert name in rows, f"attach({name}=...) is not in docs/configuration.md"
        if param.default not in (None, inspect.Parameter.empty):
            assert str(param.default) in rows[name][1], (name, param.default, rows[name])


def test_every_server_option_is_documented() -> None:
    """configuration.md has a row for every start_http_server() argument."""
    rows = _rows("configuration.md")
    for name in inspect.signature(sqlprobe.start_http_server).parameters:
        assert name in rows, f"start_http_server({name}=...) is not in docs/configuration.md"


def test_every_environment_variable_is_documented_with_its_default() -> None:
    """Each SQLPROBE_* variable sqlprobe reads has a row with its default and accepted values."""
    rows = _rows("configuration.md")
    for var in _config.ENVIRONMENT:
        assert var.name in rows, f"{var.name} is not in docs/configuration.md"
        assert rows[var.name][1] == f"`{var.default}`", rows[var.name]
    # ...and every SQLPROBE_* name the package's code mentions is one sqlprobe knows.
    source = "\n".join(p.read_text() for p in (ROOT / "sqlprobe").rglob("*.py"))
    mentioned = set(re.findall(r"\bSQLPROBE_[A-Z_]+[A-Z]\b", source))
    assert mentioned <= {v.name for v in _config.ENVIRONMENT}, mentioned


def test_nav_lists_every_page() -> None:
    """mkdocs.yml's nav names every page under docs/ and only pages that exist."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in pages(item)]
        if isinstance(node, dict):
            return [p for value in node.values() for p in pages(value)]
        return []

    listed = pages(config["nav"])
    present = sorted(str(p.relative_to(DOCS)) for p in DOCS.glob("*.md"))
    assert sorted(listed) == present


def test_docs_refer_to_nothing_outside_the_repository() -> None:
    """No page (or README) mentions DESIGN.md or ../shared, which users do not have."""
    for page in [*DOCS.rglob("*.md"), ROOT / "README.md"]:
        text = page.read_text()
        assert "DESIGN.md" not in text, page
        assert "../shared" not in text and "shared/" not in text, page


@pytest.mark.skipif(
    shutil.which("mkdocs") is None and not (Path(sys.prefix) / "bin" / "mkdocs").exists(),
    reason="mkdocs is not installed (pip install -e '.[docs]')",
)
def test_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` passes (broken links, missing pages, unresolved API names fail)."""
    mkdocs = Path(sys.prefix) / "bin" / "mkdocs"
    proc = subprocess.run(
        [
            str(mkdocs if mkdocs.exists() else "mkdocs"),
            "build",
            "--strict",
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.prefix) / "bin")},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    for name in (
        "sqlprobe.attach",
        "sqlprobe.Probe",
        "sqlprobe.StatementStats",
        "sqlprobe.MetricsServer",
        "client_auth_required",
        "sqlprobe.testing.capture",
    ):
        assert name in reference, name
    assert ":meth:" not in reference and ":func:" not in reference
