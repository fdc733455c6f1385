"""The Prometheus rules: promtool checks, unit tests, and mixin conventions."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "rules" / "sqlprobe.rules.yml"
RULES_TEST = ROOT / "dashboards" / "rules" / "sqlprobe.rules.test.yml"
REQUIRED_ALERTS = {
    "SqlprobeDatabaseUnreachable",
    "SqlprobeSlowQueryRateHigh",
    "SqlprobeQueryLatencyP99High",
    "SqlprobePoolExhausted",
    "SqlprobePoolSaturated",
    "SqlprobeErrorRateHigh",
    "SqlprobeNPlusOneDetected",
    "SqlprobeStatementsPerRequestHigh",
}
SEVERITIES = {"info", "warning", "critical"}
RUNBOOK_PREFIX = "https://github.com/sqlprobe/sqlprobe/blob/main/docs/runbooks.md#"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load(RULES)["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _markdown_anchors(path: Path) -> set[str]:
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_promtool_check_rules(promtool: str) -> None:
    """promtool check rules accepts the rule file."""
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_test_rules(promtool: str) -> None:
    """promtool test rules passes every unit test of the rules."""
    result = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULES_TEST.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_test_rules_catches_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """The unit tests fail when an alert's threshold is broken, so they can fail at all."""
    broken = RULES.read_text().replace(
        "job_engine:sqlprobe_query_duration_seconds:p99_rate5m > 0.5",
        "job_engine:sqlprobe_query_duration_seconds:p99_rate5m > 5",
    )
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    (tmp_path / RULES_TEST.name).write_text(RULES_TEST.read_text())
    result = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "SqlprobeQueryLatencyP99High" in result.stdout + result.stderr


def test_required_alerts_exist() -> None:
    """Every alert the issue asks for is defined, each once."""
    names = [alert["alert"] for alert in _alerts()]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS


def test_alerts_follow_mixin_conventions() -> None:
    """Alerts are CamelCase with the Sqlprobe prefix and carry severity, summary, runbook."""
    for alert in _alerts():
        name = alert["alert"]
        assert re.fullmatch(r"Sqlprobe(?:[A-Z][a-z0-9]*|[A-Z0-9]+(?![a-z]))+", name), name
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert "{{" not in annotations["summary"], f"{name}: summary must be static"
        assert "{{" in annotations["description"], f"{name}: description must be templated"
        assert annotations["runbook_url"] == RUNBOOK_PREFIX + name.lower(), name


def test_runbook_has_a_section_per_alert() -> None:
    """docs/runbooks.md has the anchor every runbook_url points at."""
    anchors = _markdown_anchors(ROOT / "docs" / "runbooks.md")
    for alert in _alerts():
        anchor = alert["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in anchors, f"docs/runbooks.md has no section for #{anchor}"


def test_runbook_sections_are_exactly_the_alerts() -> None:
    """docs/runbooks.md has one section per alert and none for alerts that do not exist."""
    headings = re.findall(r"^## (\S+)$", (ROOT / "docs" / "runbooks.md").read_text(), re.M)
    assert sorted(headings) == sorted(alert["alert"] for alert in _alerts())


def test_recording_rules_follow_naming_convention() -> None:
    """Recording rules are named level:metric:operations over sqlprobe metrics."""
    records = [rule["record"] for rule in _rules() if "record" in rule]
    assert records
    for record in records:
        assert re.fullmatch(r"[a-z_]+:sqlprobe_[a-z0-9_]+:[a-z0-9_]+", record), record


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """Per alert, the promtool unit tests have a case that fires and one that does not."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in _load(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            name = check["alertname"]
            if check.get("exp_alerts"):
                for expected in check["exp_alerts"]:
                    assert expected["exp_labels"]["severity"], name
                    assert set(expected["exp_annotations"]) == {
                        "summary",
                        "description",
                        "runbook_url",
                    }, name
                firing.add(name)
            else:
                quiet.add(name)
    names = {alert["alert"] for alert in _alerts()}
    assert names - firing == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a quiet test"
