"""Build sqlprobe's Grafana dashboards as code.

Run ``python dashboards/build.py`` (with ``pip install -r dashboards/requirements.txt``, Python
>= 3.11) to regenerate ``dashboards/sqlprobe-queries.json`` and ``dashboards/sqlprobe-pool.json``;
``--out DIR`` writes them elsewhere. The JSON files are committed and provisioned as they are, so
grafana-foundation-sdk is a build-time tool, never a runtime dependency of sqlprobe.
``tests/dashboards/test_dashboards.py`` regenerates them and fails when the committed files drift.

Metric names and labels are the telemetry contract in DESIGN.md. Every query filters on the
``job``, ``instance`` and ``engine`` variables and uses ``$__rate_interval`` in every range.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from grafana_foundation_sdk.builders import prometheus, table, timeseries
from grafana_foundation_sdk.builders.common import (
    TableSortByFieldState,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DashboardLink,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
QUERIES_UID = "sqlprobe-queries"
POOL_UID = "sqlprobe-pool"
TAG = "sqlprobe"
#: The uid of the Prometheus data source in dashboards/provisioning (docker-compose.yml).
PROVISIONED_UID = "prometheus"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The label matchers every query carries.
SEL = 'job=~"$job", instance=~"$instance", engine=~"$engine"'
#: Dashboard variables carried over by drill-down links.
LINK_VARS = "&".join(
    ["${__url_time_range}"]
    + [f"${{{name}:queryparam}}" for name in ("datasource", "job", "instance", "engine")]
)


def rate(metric: str, extra: str = "") -> str:
    """``rate(metric{SEL, extra}[$__rate_interval])``."""
    matchers = f"{SEL}, {extra}" if extra else SEL
    return f"rate({metric}{{{matchers}}}[$__rate_interval])"


def quantile(q: float, histogram: str, by: str) -> str:
    """The ``q`` quantile of a histogram's ``_bucket`` rate, aggregated by ``by`` and ``le``."""
    return f"histogram_quantile({q}, sum by ({by}, le) ({rate(histogram + '_bucket')}))"


def info_join(expr: str, labels: str) -> str:
    """Attach ``labels`` of ``sqlprobe_statement_info`` to a per-fingerprint expression."""
    return (
        f"{expr} * on (engine, fingerprint) group_left({labels}) "
        f"max by (engine, fingerprint, {labels}) (sqlprobe_statement_info{{{SEL}}})"
    )


def target(
    expr: str, legend: str = "", ref: str = "A", exemplar: bool = False
) -> prometheus.Dataquery:
    """A Prometheus range query on the templated datasource."""
    query = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE).range()
    if legend:
        query = query.legend_format(legend)
    if exemplar:
        query = query.exemplar(True)
    return query


def table_target(expr: str) -> prometheus.Dataquery:
    """A Prometheus instant query in table format on the templated datasource."""
    return (
        prometheus.Dataquery()
        .expr(expr)
        .ref_id("A")
        .datasource(DATASOURCE)
        .instant()
        .format(PromQueryFormat.TABLE)
    )


def drilldown(title: str, uid: str, slug: str) -> DashboardLink:
    """A panel link to the other dashboard that keeps the time range and the variables."""
    return DashboardLink(title).type(DashboardLinkType.LINK).url(f"/d/{uid}/{slug}?{LINK_VARS}")


def graph(
    title: str,
    description: str,
    unit: str,
    targets: Iterable[prometheus.Dataquery],
    width: int = 12,
) -> timeseries.Panel:
    """A time series panel with a table legend, on the templated datasource."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(width)
        .fill_opacity(10)
        .legend(
            VizLegendOptions()
            .display_mode(LegendDisplayMode.TABLE)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING))
    )
    for query in targets:
        panel = panel.with_target(query)
    return panel


def top_table(title: str, description: str, unit: str, expr: str, value_name: str) -> table.Panel:
    """A table of the top statements: shape, operation, table, normalized text and one value."""
    organize = DataTransformerConfig(
        id_val="organize",
        options={
            "excludeByName": {"Time": True},
            "indexByName": {
                "engine": 0,
                "fingerprint": 1,
                "operation": 2,
                "table": 3,
                "statement": 4,
                "Value": 5,
            },
            "renameByName": {"Value": value_name},
        },
    )
    return (
        table.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(10)
        .span(24)
        .with_target(table_target(expr))
        .with_transformation(organize)
        .sort_by([TableSortByFieldState().display_name(value_name).desc(True)])
    )


def variables(metric: str) -> list[QueryVariable | DatasourceVariable]:
    """The datasource variable and the job, instance and engine filters, read off ``metric``."""

    def label(name: str, selector: str) -> QueryVariable:
        return (
            QueryVariable(name)
            .label(name)
            .datasource(DATASOURCE)
            .query(f"label_values({selector}, {name})")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".+")
        )

    return [
        DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        # The uid docker-compose.yml provisions; Grafana falls back to the default otherwise.
        .current(VariableOption(selected=True, text="Prometheus", value=PROVISIONED_UID)),
        label("job", metric),
        label("instance", f'{metric}{{job=~"$job"}}'),
        label("engine", f'{metric}{{job=~"$job", instance=~"$instance"}}'),
    ]


def base(title: str, uid: str, description: str, variable_metric: str) -> Dashboard:
    """Settings the two dashboards share: uid, tags, time, variables and the links between them."""
    dashboard = (
        Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .link(
            DashboardLink("sqlprobe")
            .type(DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(False)
            .include_vars(True)
            .keep_time(True)
        )
    )
    for variable in variables(variable_metric):
        dashboard = dashboard.with_variable(variable)
    return dashboard


def number_panels(dashboard: Dashboard) -> Dashboard:
    """Give every panel a stable id in layout order (Grafana would assign random ones)."""
    built = dashboard.build()
    for index, panel in enumerate(built.panels or [], start=1):
        panel.id_val = index
    return dashboard


def queries_dashboard() -> Dashboard:
    """Dashboard "sqlprobe / Queries": throughput, latency, errors, top statements, N+1."""
    to_pool = drilldown("Connection pool", POOL_UID, "sqlprobe-connection-pool")
    calls = "sqlprobe_statement_calls_total"
    seconds = "sqlprobe_statement_seconds_total"
    rows = "sqlprobe_statement_rows_total"
    per_shape = "sum by (engine, fingerprint)"
    dashboard = base(
        "sqlprobe / Queries",
        QUERIES_UID,
        "SQL statements measured by sqlprobe: throughput, latency, errors and the costliest "
        "statement shapes.",
        # Exported at zero from attach time, so a new engine is selectable before it is busy.
        "sqlprobe_slow_queries_total",
    )
    dashboard = dashboard.with_row(Row("Overview"))
    dashboard = dashboard.with_panel(
        graph(
            "Statements per second by operation",
            "Statements executed per second, by SQL operation "
            "(sqlprobe_query_duration_seconds_count).",
            "ops",
            [
                target(
                    f"sum by (operation) ({rate('sqlprobe_query_duration_seconds_count')})",
                    "{{operation}}",
                )
            ],
        )
    )
    dashboard = dashboard.with_panel(
        graph(
            "Statement latency",
            "p50, p95 and p99 of statement execution time per engine "
            "(sqlprobe_query_duration_seconds). Exemplars link a point to the trace of the "
            "statement that produced it.",
            "s",
            [
                target(
                    quantile(q, "sqlprobe_query_duration_seconds", "engine"),
                    f"p{int(q * 100)} {{{{engine}}}}",
                    ref,
                    exemplar=True,
                )
                for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
            ],
        ).links([to_pool])
    )
    dashboard = dashboard.with_panel(
        graph(
            "Errors per second by class",
            "Failed statements per second by exception class and operation "
            "(sqlprobe_query_errors_total).",
            "ops",
            [
                target(
                    f"sum by (error, operation) ({rate('sqlprobe_query_errors_total')})",
                    "{{error}} {{operation}}",
                )
            ],
        )
    )
    dashboard = dashboard.with_panel(
        graph(
            "Slow statements per second",
            "Statements slower than sqlprobe's slow-query threshold, per second and operation "
            "(sqlprobe_slow_queries_total). Each one is also logged as a slow_query event.",
            "ops",
            [
                target(
                    f"sum by (operation) ({rate('sqlprobe_slow_queries_total')})",
                    "{{operation}}",
                )
            ],
        )
    )
    dashboard = dashboard.with_row(Row("Statements"))
    dashboard = dashboard.with_panel(
        top_table(
            "Top statements by total time",
            "The 10 statement shapes that spent the most execution time, in seconds per second "
            "(sqlprobe_statement_seconds_total), with their normalized text from "
            "sqlprobe_statement_info.",
            "s",
            info_join(f"topk(10, {per_shape} ({rate(seconds)}))", "statement, operation, table"),
            "Time per second",
        )
    )
    dashboard = dashboard.with_panel(
        top_table(
            "Top statements by mean time",
            "The 10 statement shapes with the longest mean execution time "
            "(sqlprobe_statement_seconds_total / sqlprobe_statement_calls_total), with their "
            "normalized text from sqlprobe_statement_info.",
            "s",
            info_join(
                f"topk(10, {per_shape} ({rate(seconds)}) / {per_shape} ({rate(calls)}))",
                "statement, operation, table",
            ),
            "Mean time",
        )
    )
    dashboard = dashboard.with_panel(
        graph(
            "Rows per statement",
            "Mean rows per execution for the 10 shapes returning or changing the most rows "
            "(sqlprobe_statement_rows_total / sqlprobe_statement_calls_total).",
            "short",
            [
                target(
                    info_join(
                        f"topk(10, {per_shape} ({rate(rows)}) / {per_shape} ({rate(calls)}))",
                        "operation, table",
                    ),
                    "{{operation}} {{table}} {{fingerprint}}",
                )
            ],
        )
    )
    dashboard = dashboard.with_panel(
        graph(
            "N+1 detections",
            "N+1 patterns detected per interval, by statement and ORM relationship "
            "(sqlprobe_n_plus_one_total). The n_plus_one log event names the code and the fix.",
            "short",
            [
                target(
                    "sum by (engine, fingerprint, relationship) "
                    f"(increase(sqlprobe_n_plus_one_total{{{SEL}}}[$__rate_interval]))",
                    "{{relationship}} {{fingerprint}}",
                )
            ],
        )
    )
    dashboard = dashboard.with_row(Row("Database time by route"))
    dashboard = dashboard.with_panel(
        graph(
            "Database time by route",
            "Statement time per second spent for each route or unit of work "
            "(sqlprobe_scope_db_seconds: the requests of the middleware, sqlprobe.scope()). "
            "The routes on top are what the database spends its time on.",
            "s",
            [
                target(
                    f"sum by (engine, route) ({rate('sqlprobe_scope_db_seconds_sum')})",
                    "{{route}} {{engine}}",
                )
            ],
        )
    )
    dashboard = dashboard.with_panel(
        graph(
            "Statements per request (p95)",
            "95th percentile of statements per unit of work, by route "
            "(sqlprobe_scope_statements). A high or growing count is an N+1 or a chatty "
            "endpoint (alert SqlprobeStatementsPerRequestHigh).",
            "short",
            [
                target(
                    quantile(0.95, "sqlprobe_scope_statements", "engine, route"),
                    "{{route}} {{engine}}",
                )
            ],
        )
    )
    for title, family, what in (
        ("Database time per request", "sqlprobe_scope_db_seconds", "statement time"),
        ("Pool wait per request", "sqlprobe_scope_pool_wait_seconds", "pool checkout wait"),
    ):
        dashboard = dashboard.with_panel(
            graph(
                title,
                f"Mean {what} per unit of work, by route ({family} sum / count).",
                "s",
                [
                    target(
                        f"sum by (engine, route) ({rate(family + '_sum')}) "
                        f"/ sum by (engine, route) ({rate(family + '_count')})",
                        "{{route}} {{engine}}",
                    )
                ],
            )
        )
    dashboard = dashboard.with_row(Row("Index advice"))
    dashboard = dashboard.with_panel(advice_table())
    return number_panels(dashboard)


def advice_table() -> table.Panel:
    """The indexes sqlprobe's advisor suggests (``attach(index_advice=True)``), one per row."""
    organize = DataTransformerConfig(
        id_val="organize",
        options={
            "excludeByName": {"Time": True, "Value": True},
            "indexByName": {"engine": 0, "table": 1, "columns": 2, "proven": 3},
            "renameByName": {"columns": "index columns"},
        },
    )
    return (
        table.Panel()
        .title("Index advice")
        .description(
            "Indexes sqlprobe's index advisor suggests for slow SELECT shapes "
            "(sqlprobe_index_advice_info, with attach(index_advice=True)). proven=true: the "
            "database's planner confirmed it (PostgreSQL with hypopg: cost down at least "
            "10x; SQLite: the plan switches to the index). The index_advice log event has "
            "the DDL, the model change and the Alembic operation."
        )
        .unit("none")
        .datasource(DATASOURCE)
        .height(8)
        .span(24)
        .with_target(
            table_target(
                f"max by (engine, table, columns, proven) (sqlprobe_index_advice_info{{{SEL}}})"
            )
        )
        .with_transformation(organize)
        .sort_by([TableSortByFieldState().display_name("table")])
    )


def pool_dashboard() -> Dashboard:
    """Dashboard "sqlprobe / Connection pool": occupancy, waits, timeouts, transactions."""
    to_queries = drilldown("Queries", QUERIES_UID, "sqlprobe-queries")
    dashboard = base(
        "sqlprobe / Connection pool",
        POOL_UID,
        "SQLAlchemy connection pools measured by sqlprobe: occupancy, checkout waits and "
        "timeouts, connection lifecycle and transactions.",
        "sqlprobe_pool_connections",
    )
    dashboard = dashboard.with_row(Row("Occupancy"))
    dashboard = dashboard.with_panel(
        graph(
            "Connections",
            "Connections in the pool by state (used, idle) against the pool's maximum "
            "(pool_size + max_overflow; absent for unbounded pools).",
            "short",
            [
                target(
                    f"sum by (engine, state) (sqlprobe_pool_connections{{{SEL}}})",
                    "{{state}} {{engine}}",
                ),
                target(
                    f"sum by (engine) (sqlprobe_pool_max_connections{{{SEL}}})",
                    "max {{engine}}",
                    "B",
                ),
            ],
        )
    )
    dashboard = dashboard.with_panel(
        graph(
            "Checkout wait",
            "p50 and p99 of the time spent waiting for a connection from the pool "
            "(sqlprobe_pool_checkout_wait_seconds).",
            "s",
            [
                target(
                    quantile(q, "sqlprobe_pool_checkout_wait_seconds", "engine"),
                    f"p{int(q * 100)} {{{{engine}}}}",
                    ref,
                )
                for q, ref in ((0.5, "A"), (0.99, "B"))
            ],
        ).links([to_queries])
    )
    dashboard = dashboard.with_panel(
        graph(
            "Checkout timeouts",
            "Checkouts per interval that gave up with the pool's TimeoutError "
            "(sqlprobe_pool_checkout_timeouts_total). Any is an outage for those requests.",
            "short",
            [
                target(
                    "sum by (engine) "
                    f"(increase(sqlprobe_pool_checkout_timeouts_total{{{SEL}}}[$__rate_interval]))",
                    "{{engine}}",
                )
            ],
        )
    )
    dashboard = dashboard.with_panel(
        graph(
            "Pool utilization",
            "Share of the pool's maximum that is checked out (used / max).",
            "percentunit",
            [
                target(
                    f'sum by (engine) (sqlprobe_pool_connections{{{SEL}, state="used"}}) '
                    f"/ sum by (engine) (sqlprobe_pool_max_connections{{{SEL}}})",
                    "{{engine}}",
                )
            ],
        )
    )
    dashboard = dashboard.with_row(Row("Connection lifecycle"))
    dashboard = dashboard.with_panel(
        graph(
            "Connection use time",
            "p50 and p99 of how long a connection stays checked out "
            "(sqlprobe_pool_connection_use_seconds). Long use times hold the pool hostage.",
            "s",
            [
                target(
                    quantile(q, "sqlprobe_pool_connection_use_seconds", "engine"),
                    f"p{int(q * 100)} {{{{engine}}}}",
                    ref,
                )
                for q, ref in ((0.5, "A"), (0.99, "B"))
            ],
        )
    )
    dashboard = dashboard.with_panel(
        graph(
            "Connects, connect errors and invalidations",
            "New DBAPI connections opened, attempts that failed (the database refused or "
            "was unreachable) and connections invalidated per second "
            "(sqlprobe_pool_connects_total, sqlprobe_pool_connect_errors_total, "
            "sqlprobe_pool_invalidations_total).",
            "ops",
            [
                target(
                    f"sum by (engine) ({rate('sqlprobe_pool_connects_total')})",
                    "connects {{engine}}",
                ),
                target(
                    f"sum by (engine) ({rate('sqlprobe_pool_invalidations_total')})",
                    "invalidations {{engine}}",
                    "B",
                ),
                # The error series exist only once a connect failed: `or 0 x connects`
                # shows 0 rather than "No data" until then.
                target(
                    f"sum by (engine) ({rate('sqlprobe_pool_connect_errors_total')}) "
                    f"or sum by (engine) (0 * {rate('sqlprobe_pool_connects_total')})",
                    "connect errors {{engine}}",
                    "C",
                ),
            ],
        )
    )
    dashboard = dashboard.with_panel(
        graph(
            "Connect time",
            "p99 time to open a new DBAPI connection (sqlprobe_pool_connect_seconds).",
            "s",
            [
                target(
                    quantile(0.99, "sqlprobe_pool_connect_seconds", "engine"),
                    "p99 {{engine}}",
                )
            ],
        )
    )
    dashboard = dashboard.with_row(Row("Transactions"))
    dashboard = dashboard.with_panel(
        graph(
            "Transaction duration",
            "p50 and p99 from begin to commit or rollback, by outcome "
            "(sqlprobe_transaction_duration_seconds).",
            "s",
            [
                target(
                    quantile(q, "sqlprobe_transaction_duration_seconds", "engine, outcome"),
                    f"p{int(q * 100)} {{{{outcome}}}} {{{{engine}}}}",
                    ref,
                )
                for q, ref in ((0.5, "A"), (0.99, "B"))
            ],
        )
    )
    count = "sqlprobe_transaction_duration_seconds_count"
    all_tx = f"sum by (engine) ({rate(count)})"
    rollback = 'outcome="rollback"'
    rollbacks = f"sum by (engine) ({rate(count, rollback)})"
    dashboard = dashboard.with_panel(
        graph(
            "Rollback ratio",
            "Share of transactions that ended in a rollback "
            "(sqlprobe_transaction_duration_seconds_count by outcome); 0 when none did.",
            "percentunit",
            [
                target(
                    f"({rollbacks} or {all_tx} * 0) / {all_tx}",
                    "{{engine}}",
                )
            ],
        )
    )
    dashboard = dashboard.with_row(Row("Holders and sizing"))
    dashboard = dashboard.with_panel(
        graph(
            "Peak connections in use",
            "The most connections checked out at once between scrapes "
            "(sqlprobe_pool_peak_connections) against the pool's maximum: what the "
            "workload needs, for sizing pool_size and max_overflow.",
            "short",
            [
                target(
                    f"max by (engine) (sqlprobe_pool_peak_connections{{{SEL}}})",
                    "peak {{engine}}",
                ),
                target(
                    f"sum by (engine) (sqlprobe_pool_max_connections{{{SEL}}})",
                    "max {{engine}}",
                    "B",
                ),
            ],
        )
    )
    dashboard = dashboard.with_panel(
        graph(
            "Idle share of checked-out time",
            "Share of the time connections were checked out in which no statement ran "
            "(sqlprobe_pool_connection_idle_seconds / sqlprobe_pool_connection_use_seconds). "
            "High: code holds connections while doing something else; the pool_hold log "
            "events name it.",
            "percentunit",
            [
                target(
                    f"sum by (engine) ({rate('sqlprobe_pool_connection_idle_seconds_sum')}) "
                    f"/ sum by (engine) ({rate('sqlprobe_pool_connection_use_seconds_sum')})",
                    "{{engine}}",
                )
            ],
        )
    )
    return number_panels(dashboard)


DASHBOARDS = {
    "sqlprobe-queries.json": queries_dashboard,
    "sqlprobe-pool.json": pool_dashboard,
}


def render(dashboard: Dashboard) -> str:
    """The dashboard as stable, sorted, indented JSON with a trailing newline."""
    return json.dumps(dashboard.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write every dashboard's JSON into ``--out`` (default: this folder)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, factory in DASHBOARDS.items():
        (args.out / filename).write_text(render(factory()))
        print(f"wrote {args.out / filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
