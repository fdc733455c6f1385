"""The Grafana dashboards: no drift from build.py, dashboard-linter rules, valid PromQL."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
UIDS = {"sqlprobe-queries.json": "sqlprobe-queries", "sqlprobe-pool.json": "sqlprobe-pool"}
TITLES = {
    "sqlprobe-queries.json": "sqlprobe / Queries",
    "sqlprobe-pool.json": "sqlprobe / Connection pool",
}
DATASOURCE_UIDS = {"$datasource", "${datasource}"}
MATCHERS = ('job=~"$job"', 'instance=~"$instance"', 'engine=~"$engine"')
RATE_FUNCTIONS = {"rate", "irate", "increase"}
COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
# Parentheses after these hold label names, not expressions.
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", *AGGREGATIONS, *LABEL_LIST_KEYWORDS}

Problems = list[str]


# --- helpers ------------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that is not a row, rows' nested panels included."""
    found = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            if inner.get("type") != "row":
                found.append(inner)
    return found


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Template variables by name."""
    return {var["name"]: var for var in dashboard.get("templating", {}).get("list", [])}


def metric_references(expr: str) -> list[tuple[str, str | None, str]]:
    """(metric name, innermost enclosing function or None, label matchers) for every selector.

    A small PromQL scanner: it skips strings, label matchers and range brackets, treats the
    parentheses after by/on/group_left/... as label lists, and tracks which function call each
    metric name sits in.
    """
    refs: list[tuple[str, str | None, str]] = []
    stack: list[str | None] = []  # function name per open paren; "#labels" for label lists
    i = 0
    previous_word = ""
    while i < len(expr):
        char = expr[i]
        if char in "\"'`":
            end = expr.index(char, i + 1)
            i = end + 1
            continue
        if char == "[":
            i = expr.index("]", i) + 1
            continue
        if char == "(":
            if previous_word in LABEL_LIST_KEYWORDS:
                stack.append("#labels")
            else:
                stack.append(previous_word or None)
            previous_word = ""
            i += 1
            continue
        if char == ")":
            stack.pop()
            previous_word = ""
            i += 1
            continue
        match = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr[i:])
        if match:
            word = match.group(0)
            i += len(word)
            rest = expr[i:].lstrip()
            in_labels = bool(stack) and stack[-1] == "#labels"
            is_call = rest.startswith("(")
            if not in_labels and not is_call and word not in PROMQL_WORDS:
                matchers = ""
                if rest.startswith("{"):
                    start = expr.index("{", i)
                    end = expr.index("}", start)
                    matchers = expr[start + 1 : end]
                    i = end + 1
                refs.append((word, stack[-1] if stack else None, matchers))
            previous_word = word
            continue
        if char == "{":
            i = expr.index("}", i) + 1
            continue
        if not char.isspace():
            previous_word = ""
        i += 1
    assert not stack, f"unbalanced parentheses in {expr!r}"
    return refs


# --- the dashboard-linter rules, re-implemented -------------------------------------------


def lint_template_datasource(dashboard: dict[str, Any]) -> Problems:
    """template-datasource-rule: a `datasource` variable of type datasource for Prometheus."""
    var = variables(dashboard).get("datasource")
    if var is None:
        return ["no `datasource` variable"]
    problems = []
    if var.get("type") != "datasource":
        problems.append("`datasource` variable is not of type datasource")
    if var.get("query") != "prometheus":
        problems.append("`datasource` variable does not select Prometheus data sources")
    return problems


def lint_template_label(dashboard: dict[str, Any], name: str) -> Problems:
    """template-job/instance-rule: a multi-select label_values query variable on $datasource."""
    var = variables(dashboard).get(name)
    if var is None:
        return [f"no `{name}` variable"]
    problems = []
    if var.get("type") != "query":
        problems.append(f"`{name}` is not a query variable")
    if var.get("label") != name:
        problems.append(f"`{name}` is not labelled {name!r}")
    if (var.get("datasource") or {}).get("uid") not in DATASOURCE_UIDS:
        problems.append(f"`{name}` does not use $datasource")
    if not str(var.get("query", "")).startswith("label_values("):
        problems.append(f"`{name}` is not a label_values() query")
    elif not str(var["query"]).rstrip().endswith(f", {name})"):
        problems.append(f"`{name}` does not read the {name} label")
    if not var.get("multi"):
        problems.append(f"`{name}` is not multi-select")
    if var.get("allValue") != ".+":
        problems.append(f"`{name}` allValue is not '.+'")
    return problems


def lint_panel_datasource(dashboard: dict[str, Any]) -> Problems:
    """panel-datasource-rule: every panel and every target use the templated datasource."""
    problems = []
    for panel in panels(dashboard):
        if (panel.get("datasource") or {}).get("uid") not in DATASOURCE_UIDS:
            problems.append(f"panel {panel.get('title')!r} does not use $datasource")
        for target in panel.get("targets", []):
            if (target.get("datasource") or {}).get("uid") not in DATASOURCE_UIDS:
                problems.append(f"a target of {panel.get('title')!r} does not use $datasource")
    return problems


def lint_rate_interval(dashboard: dict[str, Any]) -> Problems:
    """target-rate-interval-rule: every range of rate/irate/increase is $__rate_interval."""
    problems = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            calls = re.findall(r"\b(?:rate|irate|increase)\s*\(", expr)
            ranges = re.findall(r"\[([^\]]*)\]", expr)
            if any(r != "$__rate_interval" for r in ranges) or len(ranges) != len(calls):
                problems.append(f"{panel['title']!r}: not $__rate_interval in {expr!r}")
    return problems


def lint_target_matchers(dashboard: dict[str, Any]) -> Problems:
    """target-job/instance-rule: every selector filters on $job, $instance and $engine."""
    problems = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            refs = metric_references(target["expr"])
            if not refs:
                problems.append(f"{panel['title']!r}: no metric in {target['expr']!r}")
            for metric, _, matchers in refs:
                missing = [m for m in MATCHERS if m not in matchers]
                if missing:
                    problems.append(f"{panel['title']!r}: {metric} lacks {missing}")
    return problems


def lint_counters_under_rate(dashboard: dict[str, Any]) -> Problems:
    """Counters and histogram series are only used inside rate(), irate() or increase()."""
    problems = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            for metric, function, _ in metric_references(target["expr"]):
                if metric.endswith(COUNTER_SUFFIXES) and function not in RATE_FUNCTIONS:
                    problems.append(f"{panel['title']!r}: {metric} used outside rate()")
    return problems


def lint_panel_metadata(dashboard: dict[str, Any]) -> Problems:
    """Every panel has a title, a description and a unit."""
    problems = []
    for panel in panels(dashboard):
        name = panel.get("title") or f"panel {panel.get('id')}"
        if not panel.get("title"):
            problems.append(f"{name}: no title")
        if not panel.get("description"):
            problems.append(f"{name}: no description")
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{name}: no unit")
    return problems


RULES: dict[str, Callable[[dict[str, Any]], Problems]] = {
    "template-datasource-rule": lint_template_datasource,
    "template-job-rule": lambda d: lint_template_label(d, "job"),
    "template-instance-rule": lambda d: lint_template_label(d, "instance"),
    "template-engine-rule": lambda d: lint_template_label(d, "engine"),
    "panel-datasource-rule": lint_panel_datasource,
    "target-rate-interval-rule": lint_rate_interval,
    "target-matchers-rule": lint_target_matchers,
    "target-counter-agg-rule": lint_counters_under_rate,
    "panel-title-description-unit-rule": lint_panel_metadata,
}


# --- tests --------------------------------------------------------------------------------


def test_build_reproduces_committed_json(tmp_path: Path) -> None:
    """Regenerating the dashboards with build.py gives exactly the committed JSON."""
    if importlib.util.find_spec("grafana_foundation_sdk") is None:
        message = "grafana-foundation-sdk missing: pip install -r dashboards/requirements.txt"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [sys.executable, str(DASHBOARDS / "build.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in UIDS:
        fresh = (tmp_path / name).read_text()
        assert fresh == (DASHBOARDS / name).read_text(), (
            f"dashboards/{name} drifted from build.py: run python dashboards/build.py"
        )


def test_both_dashboards_exist_with_fixed_uids(dashboards: dict[str, dict[str, Any]]) -> None:
    """The two dashboards are committed with their fixed uids and titles."""
    assert set(dashboards) == set(UIDS)
    for name, dashboard in dashboards.items():
        assert dashboard["uid"] == UIDS[name]
        assert dashboard["title"] == TITLES[name]
        assert "sqlprobe" in dashboard["tags"]


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("name", sorted(UIDS))
def test_dashboard_passes_lint_rule(
    rule: str, name: str, dashboards: dict[str, dict[str, Any]]
) -> None:
    """Each dashboard passes each re-implemented dashboard-linter rule."""
    assert RULES[rule](dashboards[name]) == []


def _first_target(dashboard: dict[str, Any]) -> dict[str, Any]:
    return next(t for p in panels(dashboard) for t in p.get("targets", []))


BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "template-datasource-rule": lambda d: d["templating"]["list"].pop(0),
    "template-job-rule": lambda d: variables(d)["job"].update(allValue=None),
    "template-instance-rule": lambda d: variables(d)["instance"].update(multi=False),
    "template-engine-rule": lambda d: variables(d)["engine"].update(datasource={"uid": "x"}),
    "panel-datasource-rule": lambda d: _first_target(d).update(datasource={"uid": "prom"}),
    "target-rate-interval-rule": lambda d: _first_target(d).update(
        expr=_first_target(d)["expr"].replace("$__rate_interval", "5m")
    ),
    "target-matchers-rule": lambda d: _first_target(d).update(
        expr=_first_target(d)["expr"].replace('instance=~"$instance", ', "")
    ),
    "target-counter-agg-rule": lambda d: _first_target(d).update(
        expr='sum(sqlprobe_statement_calls_total{job=~"$job", instance=~"$instance", '
        'engine=~"$engine"})'
    ),
    "panel-title-description-unit-rule": lambda d: panels(d)[0]["fieldConfig"]["defaults"].pop(
        "unit"
    ),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_lint_rule_catches_a_broken_dashboard(
    rule: str, dashboards: dict[str, dict[str, Any]]
) -> None:
    """Each lint rule reports a problem on a dashboard broken in the way it guards against."""
    broken = copy.deepcopy(dashboards["sqlprobe-queries.json"])
    BREAKAGES[rule](broken)
    assert RULES[rule](broken) != []


def test_counter_rule_accepts_histogram_quantile_over_rate() -> None:
    """histogram_quantile over rate of _bucket and division of rates are accepted."""
    expr = (
        'histogram_quantile(0.99, sum by (engine, le) (rate(x_bucket{a="b"}[1m]))) '
        "/ on (engine) group_left(table) sum by (engine) (increase(y_total[1m])) * z_info"
    )
    refs = metric_references(expr)
    assert [(m, f) for m, f, _ in refs] == [
        ("x_bucket", "rate"),
        ("y_total", "increase"),
        ("z_info", None),
    ]


def test_dashboards_link_to_each_other_keeping_variables(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    """Each dashboard links to the sqlprobe dashboards and drills down to the other one."""
    for name, dashboard in dashboards.items():
        tag_links = [link for link in dashboard["links"] if link["type"] == "dashboards"]
        assert tag_links, name
        for link in tag_links:
            assert link["tags"] == ["sqlprobe"]
            assert link["includeVars"] and link["keepTime"]
        other = next(uid for n, uid in UIDS.items() if n != name)
        urls = [link["url"] for panel in panels(dashboard) for link in panel.get("links", [])]
        drilldowns = [url for url in urls if url.startswith(f"/d/{other}/")]
        assert drilldowns, f"{name} has no panel link to {other}"
        for url in drilldowns:
            for var in ("datasource", "job", "instance", "engine"):
                assert f"${{{var}:queryparam}}" in url
            assert "${__url_time_range}" in url


def test_latency_panel_shows_exemplars(dashboards: dict[str, dict[str, Any]]) -> None:
    """The statement latency panel asks for exemplars on p50, p95 and p99."""
    panel = next(
        p for p in panels(dashboards["sqlprobe-queries.json"]) if p["title"] == "Statement latency"
    )
    exprs = {t["expr"].split(",")[0]: t.get("exemplar") for t in panel["targets"]}
    assert exprs == {
        "histogram_quantile(0.5": True,
        "histogram_quantile(0.95": True,
        "histogram_quantile(0.99": True,
    }


def test_top_statements_join_statement_info(dashboards: dict[str, dict[str, Any]]) -> None:
    """The top-statement tables join the normalized text from sqlprobe_statement_info."""
    queries = dashboards["sqlprobe-queries.json"]
    tables = [p for p in panels(queries) if p["type"] == "table"]
    assert {p["title"] for p in tables} == {
        "Top statements by total time",
        "Top statements by mean time",
        "Index advice",
    }
    for panel in [p for p in tables if p["title"] != "Index advice"]:
        (target,) = panel["targets"]
        assert target["format"] == "table" and target["instant"] is True
        assert "topk(10," in target["expr"]
        assert "group_left(statement, operation, table)" in target["expr"]
        assert "sqlprobe_statement_info" in target["expr"]


def test_every_target_is_valid_promql(
    prometheus: Any, dashboard_queries: list[tuple[str, str, str]]
) -> None:
    """A real Prometheus accepts every panel query, with variables substituted."""
    assert dashboard_queries
    for name, title, expr in dashboard_queries:
        status, body = prometheus.query(expr)
        assert status == 200 and body["status"] == "success", (name, title, expr, body)


def test_every_variable_selector_is_valid_promql(
    prometheus: Any, dashboards: dict[str, dict[str, Any]]
) -> None:
    """The series selector inside every label_values() variable query is valid PromQL."""
    for dashboard in dashboards.values():
        for name in ("job", "instance", "engine"):
            query = variables(dashboard)[name]["query"]
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
            assert match, query
            selector = match.group(1).replace("$job", ".+").replace("$instance", ".+")
            status, body = prometheus.query(selector)
            assert status == 200 and body["status"] == "success", (query, body)


def test_prometheus_rejects_invalid_promql(prometheus: Any) -> None:
    """The PromQL oracle answers 400 to a syntax error, so the validity test can fail."""
    status, body = prometheus.query("sum by (engine (rate(x[1m]))")
    assert status == 400 and body["status"] == "error"
    status, body = prometheus.query("rate(sqlprobe_statement_calls_total[$__rate_interval])")
    assert status == 400


def test_committed_json_is_canonical(dashboards: dict[str, dict[str, Any]]) -> None:
    """The committed files are sorted, two-space indented JSON ending in a newline."""
    for name, dashboard in dashboards.items():
        text = (DASHBOARDS / name).read_text()
        assert text == json.dumps(dashboard, indent=2, sort_keys=True) + "\n"


def test_runbooks_name_existing_panels(dashboards: dict[str, dict[str, Any]]) -> None:
    """Every panel the runbooks send operators to (quoted title) exists on a dashboard."""
    titles = {panel["title"] for d in dashboards.values() for panel in panels(d)}
    text = (ROOT / "docs" / "runbooks.md").read_text()
    quoted = {" ".join(title.split()) for title in re.findall(r'"([A-Z][^"]+)"', text)}
    assert quoted, "the runbooks name no panels"
    assert quoted - titles == set()


def test_index_advice_table_lists_each_suggestion(dashboards: dict[str, dict[str, Any]]) -> None:
    """The Queries dashboard's last row is an "Index advice" table of
    sqlprobe_index_advice_info: one row per engine, table, columns and proven, no value."""
    queries = dashboards["sqlprobe-queries.json"]
    rows = [p["title"] for p in queries["panels"] if p["type"] == "row"]
    assert rows[-1] == "Index advice"
    (panel,) = [p for p in panels(queries) if p["title"] == "Index advice"]
    assert panel["type"] == "table"
    assert panel["gridPos"]["y"] > max(
        p["gridPos"]["y"] for p in panels(queries) if p["title"] != "Index advice"
    )
    (target,) = panel["targets"]
    assert target["format"] == "table" and target["instant"] is True
    assert target["expr"] == (
        "max by (engine, table, columns, proven) (sqlprobe_index_advice_info"
        f"{{{', '.join(MATCHERS)}}})"
    )
    (organize,) = [t for t in panel["transformations"] if t["id"] == "organize"]
    assert organize["options"]["excludeByName"] == {"Time": True, "Value": True}
    order = organize["options"]["indexByName"]
    assert sorted(order, key=order.get) == ["engine", "table", "columns", "proven"]
