"""docker-compose.yml, checked structurally (no Docker engine): mounts, configs, provisioning."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"app", "postgres", "prometheus", "alertmanager", "grafana", "otel-collector", "tempo"}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _service(name: str) -> dict[str, Any]:
    return _compose()["services"][name]


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Bind mounts of a service: container path -> host path (relative to the repository)."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.startswith((".", "/")):
            mounts[container] = (ROOT / host).resolve()
    return mounts


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a path inside a service's container comes from on the host, through its mounts."""
    path = PurePosixPath(container_path)
    for container, host in _mounts(service).items():
        mount = PurePosixPath(container)
        if path == mount:
            return host
        if mount in path.parents:
            return host / path.relative_to(mount)
    raise AssertionError(f"{container_path} is not mounted from the host")


def _flag(command: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``-name=value`` in a command list."""
    for arg in command:
        match = re.fullmatch(rf"--?{re.escape(name)}=(.+)", arg)
        if match:
            return match.group(1)
    raise AssertionError(f"no {name} flag in {command}")


def _config_of(service: dict[str, Any], flag: str) -> Any:
    """The YAML a service's command names with ``flag``, read from its host mount."""
    return yaml.safe_load(_host_path(service, _flag(service["command"], flag)).read_text())


def _provisioned(kind: str) -> dict[str, Any]:
    grafana = _service("grafana")
    files = [
        host
        for container, host in _mounts(grafana).items()
        if container.startswith(f"/etc/grafana/provisioning/{kind}/")
    ]
    assert files, f"no Grafana {kind} provisioning mounted"
    merged: dict[str, Any] = {}
    for path in files:
        for key, value in yaml.safe_load(path.read_text()).items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
    return merged


def _committed_dashboards() -> dict[Path, dict[str, Any]]:
    return {
        path.resolve(): json.loads(path.read_text())
        for path in sorted((ROOT / "dashboards").glob("sqlprobe-*.json"))
    }


def test_compose_has_every_service() -> None:
    """The stack has the app, PostgreSQL, Prometheus, Alertmanager, Grafana, collector and Tempo."""
    assert set(_compose()["services"]) >= SERVICES


def test_every_mounted_host_file_exists() -> None:
    """Every bind-mounted host path exists, and is a file where the mount names a file."""
    for name, service in _compose()["services"].items():
        for container, host in _mounts(service).items():
            assert host.exists(), f"{name}: {host} (mounted at {container}) does not exist"
            assert ROOT in host.parents, f"{name}: {host} is outside the repository"
            if PurePosixPath(container).suffix:
                assert host.is_file(), f"{name}: {host} is not a file"


def test_app_image_builds_from_files_that_exist() -> None:
    """The app's Dockerfile exists and every file it COPYs from the build context exists."""
    build = _service("app")["build"]
    context = (ROOT / build["context"]).resolve()
    dockerfile = context / build["dockerfile"]
    assert dockerfile.is_file()
    copies = [
        line.split()[1:-1]
        for line in dockerfile.read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
    ]
    assert copies
    for sources in copies:
        for source in sources:
            assert (context / source).exists(), f"{dockerfile.name} copies missing {source}"


def test_app_exports_traces_to_the_collector() -> None:
    """The app sends OTLP to the collector, which forwards to Tempo's OTLP receiver."""
    app = _service("app")
    env = app["environment"]
    endpoint = urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname == "otel-collector"
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    collector = _service("otel-collector")
    config = yaml.safe_load(
        _host_path(collector, _flag(collector["command"], "config")).read_text()
    )
    protocol = "http" if env["OTEL_EXPORTER_OTLP_PROTOCOL"].startswith("http") else "grpc"
    listen = config["receivers"]["otlp"]["protocols"][protocol]["endpoint"]
    assert listen.endswith(f":{endpoint.port}")
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    (exporter,) = pipeline["exporters"]
    host, port = config["exporters"][exporter]["endpoint"].split(":")
    assert host == "tempo"
    tempo = _service("tempo")
    tempo_config = _config_of(tempo, "config.file")
    grpc = tempo_config["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc.endswith(f":{port}")


def test_prometheus_config_passes_promtool(promtool: str, tmp_path: Path) -> None:
    """The compose Prometheus config, with its rule files resolved to the host, passes promtool."""
    service = _service("prometheus")
    command = service["command"]
    assert "--enable-feature=exemplar-storage" in command
    config_path = _host_path(service, _flag(command, "config.file"))
    config = yaml.safe_load(config_path.read_text())
    rule_files = [str(_host_path(service, rule)) for rule in config["rule_files"]]
    assert str((ROOT / "dashboards" / "rules" / "sqlprobe.rules.yml").resolve()) in rule_files
    config["rule_files"] = rule_files
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_the_app_and_alerts_alertmanager() -> None:
    """Prometheus scrapes the app's metrics port and sends alerts to the alertmanager service."""
    service = _service("prometheus")
    config = yaml.safe_load(
        _host_path(service, _flag(service["command"], "config.file")).read_text()
    )
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    app_command = _service("app")["command"]
    port = app_command[app_command.index("--port") + 1]
    assert f"app:{port}" in targets
    assert app_command[app_command.index("--addr") + 1] == "0.0.0.0"
    alertmanagers = [
        target
        for am in config["alerting"]["alertmanagers"]
        for static in am["static_configs"]
        for target in static["targets"]
    ]
    assert alertmanagers == ["alertmanager:9093"]


def test_alertmanager_config_passes_amtool(alertmanager_binary: str) -> None:
    """The compose Alertmanager config passes amtool check-config."""
    amtool = str(Path(alertmanager_binary).with_name("amtool"))
    if not Path(amtool).exists():
        pytest.fail("amtool missing next to prometheus-alertmanager")
    service = _service("alertmanager")
    config = _host_path(service, _flag(service["command"], "config.file"))
    result = subprocess.run(
        [amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisions_the_committed_dashboards() -> None:
    """The dashboard provider's folder receives exactly the committed dashboards."""
    grafana = _service("grafana")
    providers = _provisioned("dashboards")["providers"]
    assert providers
    provided: set[Path] = set()
    for provider in providers:
        assert provider["type"] == "file"
        folder = PurePosixPath(provider["options"]["path"])
        for container, host in _mounts(grafana).items():
            if PurePosixPath(container).parent == folder and container.endswith(".json"):
                provided.add(host)
    assert provided == set(_committed_dashboards())
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path(grafana, home) in provided


def test_datasource_uids_match_the_dashboards() -> None:
    """Provisioned uids match the dashboards' datasource references and the exemplar links."""
    datasources = {ds["uid"]: ds for ds in _provisioned("datasources")["datasources"]}
    assert datasources["prometheus"]["type"] == "prometheus"
    assert datasources["tempo"]["type"] == "tempo"
    services = set(_compose()["services"])
    for ds in datasources.values():
        assert urlparse(ds["url"]).hostname in services, ds["name"]
    destinations = datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert {d["datasourceUid"] for d in destinations} == {"tempo"}
    assert {d["name"] for d in destinations} == {"trace_id"}
    for path, dashboard in _committed_dashboards().items():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        source = variables["datasource"]
        default = datasources[source["current"]["value"]]
        assert default["type"] == source["query"], path.name
        refs = _datasource_refs(dashboard)
        assert refs
        for ref in refs:
            uid = ref.get("uid", "")
            if uid.startswith("$"):
                assert uid in ("$datasource", "${datasource}"), (path.name, ref)
                assert ref["type"] == source["query"], (path.name, ref)
            else:
                assert datasources[uid]["type"] == ref["type"], (path.name, ref)


def _datasource_refs(node: Any) -> list[dict[str, Any]]:
    """Every ``datasource`` object anywhere in a dashboard."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                found.append(value)
            found.extend(_datasource_refs(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_datasource_refs(item))
    return found


def test_docs_say_what_to_open() -> None:
    """docs/dashboards.md tells the reader to run docker compose up and open Grafana's port."""
    text = (ROOT / "docs" / "dashboards.md").read_text()
    assert "docker compose up" in text
    port = _service("grafana")["ports"][0].split(":")[0]
    assert f"http://localhost:{port}" in text
    for dashboard in _committed_dashboards().values():
        assert dashboard["title"] in text
