"""Fixtures for the dashboard, rule and compose tests: tool binaries and a real Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def in_ci() -> bool:
    """Whether we run in CI, where a missing tool is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str, package: str) -> str:
    """Return the path of a tool; skip when it is missing locally, fail when it is missing in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (install the Debian package {package})"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET a URL and return (status, body), without raising on HTTP error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until_ready(url: str, proc: subprocess.Popen[bytes], deadline_s: float, log: Path) -> None:
    """Poll a readiness URL until it answers 200; fail with the process log on timeout or exit."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url} process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            status, _ = http_get(url, timeout=1.0)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} not ready after {deadline_s}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process we started, killing it if it does not exit promptly."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Prometheus:
    """A Prometheus server started by a test on 127.0.0.1 with its own config and storage."""

    def __init__(self, binary: str, config: str, workdir: Path, extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        (workdir / "prometheus.yml").write_text(config)
        self.log = workdir / "prometheus.log"
        self._log_file = self.log.open("wb")
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                *extra_args,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def wait_ready(self, deadline_s: float = 30.0) -> None:
        """Block until /-/ready answers, within a bounded time."""
        wait_until_ready(f"{self.url}/-/ready", self.proc, deadline_s, self.log)

    def query(self, expr: str, timeout: float = 10.0) -> tuple[int, dict[str, object]]:
        """Run an instant query and return (HTTP status, decoded JSON body)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url, timeout=timeout)
        return status, json.loads(body)

    def close(self) -> None:
        """Stop the server and close its log."""
        try:
            stop(self.proc)
        finally:
            self._log_file.close()


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool (Debian package prometheus)."""
    return require_binary("promtool", "prometheus")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Path of the prometheus server binary (Debian package prometheus)."""
    return require_binary("prometheus", "prometheus")


@pytest.fixture(scope="session")
def prometheus(
    prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A real, empty Prometheus on a free 127.0.0.1 port, to judge PromQL; stopped at the end."""
    config = "global:\n  scrape_interval: 1m\nscrape_configs: []\n"
    server = Prometheus(prometheus_binary, config, tmp_path_factory.mktemp("prometheus"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def alertmanager_binary() -> str:
    """Path of the Alertmanager binary (Debian package prometheus-alertmanager)."""
    return require_binary("prometheus-alertmanager", "prometheus-alertmanager")


@pytest.fixture(scope="module")
def launch(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """A factory that starts a server process and waits (bounded) until a URL answers 200.

    ``launch(name, args, ready_url, deadline_s=30, cwd=None, env=None)`` logs into a temp folder and
    returns the process; every process it started is stopped when the module's tests end,
    pass or fail. Use ``{workdir}`` in args for that folder.
    """
    started: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(
        name: str,
        args: list[str],
        ready_url: str,
        deadline_s: float = 30.0,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        workdir = tmp_path_factory.mktemp(name)
        log = workdir / f"{name}.log"
        log_file = log.open("wb")
        proc = subprocess.Popen(
            [arg.replace("{workdir}", str(workdir)) for arg in args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd or workdir,
            env=env,
        )
        started.append((proc, log_file))
        proc.log_path = log  # type: ignore[attr-defined]
        wait_until_ready(ready_url, proc, deadline_s, log)
        return proc

    try:
        yield start
    finally:
        for proc, log_file in reversed(started):
            try:
                stop(proc)
            finally:
                log_file.close()


@pytest.fixture(scope="session")
def get_free_port() -> Callable[[], int]:
    """The free_port() helper, for tests that start their own servers."""
    return free_port


#: Values the dashboard variables take when a test runs a panel's query without Grafana.
VARIABLE_VALUES = {
    "${__rate_interval}": "1m",
    "$__rate_interval": "1m",
    "${datasource}": "prometheus",
    "$datasource": "prometheus",
    "$job": ".+",
    "$instance": ".+",
    "$engine": ".+",
}


def substitute(expr: str) -> str:
    """Replace the dashboards' variables the way Grafana would with everything selected."""
    for variable, value in VARIABLE_VALUES.items():
        expr = expr.replace(variable, value)
    return expr


def load_dashboards() -> dict[str, dict[str, Any]]:
    """The committed dashboards, by file name."""
    folder = Path(__file__).resolve().parents[2] / "dashboards"
    return {
        path.name: json.loads(path.read_text()) for path in sorted(folder.glob("sqlprobe-*.json"))
    }


def panel_targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every (panel title, target) of a dashboard, rows' nested panels included."""
    found = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner.get("title", ""), target))
    return found


@pytest.fixture(scope="session")
def dashboards() -> dict[str, dict[str, Any]]:
    """The committed dashboards, by file name."""
    return load_dashboards()


@pytest.fixture(scope="session")
def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expression with variables substituted) for every target."""
    return [
        (name, title, substitute(target["expr"]))
        for name, dashboard in load_dashboards().items()
        for title, target in panel_targets(dashboard)
    ]
