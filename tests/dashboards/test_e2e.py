"""End to end: ``sqlprobe demo``, a real Prometheus with the rules, a real Alertmanager.

The demo runs with a global OpenTelemetry tracer provider (as under opentelemetry-instrument
in docker-compose.yml), so its latency histogram carries trace_id exemplars.
Prometheus scrapes the demo every second with the rules loaded; every dashboard query must
return data, and the slow-query alert (``for`` shortened in a test copy of the rules) must
reach a webhook served by this test through Alertmanager. The demo runs with
SQLPROBE_SLOW_QUERY_MS lowered, the operators' knob, so that enough of its statements count
as slow. Everything binds to 127.0.0.1, runs in temp folders, is bounded in time and is
stopped when the module ends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "rules" / "sqlprobe.rules.yml"
SLOW_ALERT = "SqlprobeSlowQueryRateHigh"
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
#: The whole module (start-up, data, alert delivery) must finish within this many seconds.
BUDGET_S = 80.0
#: Dashboard queries must all have data this many seconds after the module started.
DATA_BUDGET_S = 50.0


@dataclass
class Stack:
    """The running stack: where to query Prometheus and what the webhook received."""

    prometheus_url: str
    started: float
    metrics_url: str = ""
    notifications: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def remaining(self, budget: float = BUDGET_S) -> float:
        """Seconds left of a time budget counted from the module's start."""
        return self.started + budget - time.monotonic()

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant query and return its result vector (fails on a non-success answer)."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]


#: Runs ``sqlprobe demo`` with a global (sampled, never exported) OpenTelemetry tracer provider,
#: so that latency observations carry trace_id exemplars as they do in an instrumented app.
DEMO_WITH_TRACING = """
import sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
trace.set_tracer_provider(TracerProvider())
from sqlprobe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _demo_command(port: int, duration: int) -> list[str]:
    return [
        sys.executable,
        "-c",
        DEMO_WITH_TRACING,
        "demo",
        "--duration",
        str(duration),
        "--port",
        str(port),
        "--addr",
        "127.0.0.1",
    ]


def _webhook(stack: Stack) -> ThreadingHTTPServer:
    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            payload = json.loads(self.rfile.read(length))
            with stack.lock:
                stack.notifications.append(payload)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Receiver)


@pytest.fixture(scope="module")
def stack(
    launch: Callable[..., subprocess.Popen[bytes]],
    prometheus_binary: str,
    alertmanager_binary: str,
    get_free_port: Callable[[], int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """sqlprobe demo, Prometheus (1s scrapes, rules loaded), Alertmanager and a webhook."""
    started = time.monotonic()
    workdir = tmp_path_factory.mktemp("e2e")
    stack_info = Stack(prometheus_url="", started=started)
    webhook = _webhook(stack_info)
    thread = threading.Thread(target=webhook.serve_forever, daemon=True)
    thread.start()
    try:
        hook_port = webhook.server_address[1]
        (workdir / "alertmanager.yml").write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "test",
                        "group_by": ["alertname"],
                        "group_wait": "1s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [
                        {
                            "name": "test",
                            "webhook_configs": [{"url": f"http://127.0.0.1:{hook_port}/hook"}],
                        }
                    ],
                }
            )
        )
        am_port = get_free_port()
        launch(
            "alertmanager",
            [
                alertmanager_binary,
                f"--config.file={workdir / 'alertmanager.yml'}",
                "--storage.path={workdir}/data",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            f"http://127.0.0.1:{am_port}/-/ready",
        )

        app_port = get_free_port()
        # 10 microseconds: most of the demo's statements count as slow.
        env = {**os.environ, "SQLPROBE_SLOW_QUERY_MS": "0.01"}
        launch(
            "demo",
            _demo_command(app_port, int(BUDGET_S) + 30),
            f"http://127.0.0.1:{app_port}/metrics",
            deadline_s=30,
            cwd=workdir,
            env=env,
        )

        am_target = f"127.0.0.1:{am_port}"
        # A test copy of the rules whose alerts fire after one second instead of minutes.
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "alert" in rule and "for" in rule:
                    rule["for"] = "1s"
        (workdir / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        (workdir / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(workdir / "rules.yml")],
                    "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am_target]}]}]},
                    "scrape_configs": [
                        {
                            "job_name": "sqlprobe-e2e",
                            "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}],
                        }
                    ],
                }
            )
        )
        prom_port = get_free_port()
        launch(
            "prometheus",
            [
                prometheus_binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                "--storage.tsdb.path={workdir}/data",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--enable-feature=exemplar-storage",
            ],
            f"http://127.0.0.1:{prom_port}/-/ready",
        )
        stack_info.prometheus_url = f"http://127.0.0.1:{prom_port}"
        stack_info.metrics_url = f"http://127.0.0.1:{app_port}/metrics"
        yield stack_info
    finally:
        webhook.shutdown()
        webhook.server_close()


def test_every_dashboard_query_returns_data(
    stack: Stack, dashboard_queries: list[tuple[str, str, str]]
) -> None:
    """Every target of every panel, variables substituted, returns a non-empty result."""
    assert dashboard_queries
    empty = list(dashboard_queries)
    while empty and stack.remaining(DATA_BUDGET_S) > 0:
        empty = [query for query in empty if not stack.query(query[2])]
        if empty:
            time.sleep(1)
    if empty:
        with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
            exported = sorted(
                {
                    line.split("{")[0].split(" ")[0]
                    for line in response.read().decode().splitlines()
                    if line.startswith("sqlprobe_")
                }
            )
        panels = sorted({f"{name}: {title}" for name, title, _ in empty})
        pytest.fail(
            f"{len(empty)} queries still empty after {DATA_BUDGET_S}s, panels {panels}; "
            f"the demo exports {exported}; first empty query: {empty[0][2]}"
        )


def test_every_recording_rule_has_data_and_no_rule_fails(stack: Stack) -> None:
    """Prometheus evaluates every rule without error and every recording rule has data."""
    records = [
        rule["record"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    ]
    empty = list(records)
    while empty and stack.remaining(DATA_BUDGET_S) > 0:
        empty = [record for record in empty if not stack.query(record)]
        if empty:
            time.sleep(1)
    assert empty == [], f"recording rules without data after {DATA_BUDGET_S}s"
    url = f"{stack.prometheus_url}/api/v1/rules"
    with urllib.request.urlopen(url, timeout=5) as response:
        groups = json.loads(response.read())["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(records) + len(REQUIRED_ALERTS)
    failing = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert failing == {}


def test_latency_exemplars_carry_trace_ids(stack: Stack) -> None:
    """Prometheus stores exemplars with the trace_id and span_id of the statements' spans."""
    now = time.time()
    params = urllib.parse.urlencode(
        {
            "query": 'sqlprobe_query_duration_seconds_bucket{job="sqlprobe-e2e"}',
            "start": now - 300,
            "end": now + 60,
        }
    )
    exemplars: list[dict[str, Any]] = []
    while not exemplars and stack.remaining(DATA_BUDGET_S) > 0:
        url = f"{stack.prometheus_url}/api/v1/query_exemplars?{params}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        exemplars = [e for series in body["data"] for e in series["exemplars"]]
        if not exemplars:
            time.sleep(1)
    assert exemplars, "no exemplars stored for sqlprobe_query_duration_seconds"
    for exemplar in exemplars:
        assert re.fullmatch(r"[0-9a-f]{32}", exemplar["labels"]["trace_id"]), exemplar
        assert re.fullmatch(r"[0-9a-f]{16}", exemplar["labels"]["span_id"]), exemplar


def test_slow_query_alert_reaches_the_webhook(stack: Stack) -> None:
    """The slow-query alert fires in Prometheus and Alertmanager delivers it to the webhook."""
    delivered: list[dict[str, Any]] = []
    while not delivered and stack.remaining() > 0:
        with stack.lock:
            delivered = [
                alert
                for notification in stack.notifications
                for alert in notification["alerts"]
                if alert["labels"]["alertname"] == SLOW_ALERT and alert["status"] == "firing"
            ]
        if not delivered:
            time.sleep(0.5)
    assert delivered, (
        f"{SLOW_ALERT} not delivered within {BUDGET_S}s; Prometheus alerts: {stack.query('ALERTS')}"
    )
    alert = delivered[0]
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["job"] == "sqlprobe-e2e"
    assert alert["annotations"]["runbook_url"].endswith("#sqlprobeslowqueryratehigh")
    assert "exceeded sqlprobe's slow-query threshold" in alert["annotations"]["description"]
