"""The /metrics endpoint, on prometheus_client's own HTTP server."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry

__all__ = ["MetricsServer", "start_http_server"]

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 9464


@dataclass
class MetricsServer:
    """A running /metrics server; :meth:`close` stops it and frees the port."""

    addr: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """The metrics URL (http or https as configured)."""
        scheme = "https" if getattr(self._server, "_sqlprobe_tls", False) else "http"
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{scheme}://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _env_port() -> int:
    raw = os.environ.get("SQLPROBE_METRICS_PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"SQLPROBE_METRICS_PORT must be a port number, got {raw!r}") from None


def start_http_server(
    port: int | None = None,
    addr: str | None = None,
    *,
    registry: CollectorRegistry | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    client_cafile: str | None = None,
    client_capath: str | None = None,
    client_auth_required: bool = False,
) -> MetricsServer:
    """Serve /metrics for Prometheus in a daemon thread.

    Binds 127.0.0.1:9464 unless told otherwise (``port``/``addr``, or the
    ``SQLPROBE_METRICS_PORT``/``SQLPROBE_METRICS_ADDR`` environment variables): metrics
    name tables and statement shapes, which are not for the whole network by default.
    ``port=0`` picks a free port (see :attr:`MetricsServer.port`). ``certfile`` and
    ``keyfile`` turn on TLS; ``client_cafile``/``client_capath`` and
    ``client_auth_required`` ask clients for certificates. All of this is handed to
    ``prometheus_client.start_http_server``. With ``PROMETHEUS_MULTIPROC_DIR`` set and
    no registry given, the server aggregates every worker process's metrics.
    """
    if port is None:
        port = _env_port()
    if addr is None:
        addr = os.environ.get("SQLPROBE_METRICS_ADDR", "").strip() or DEFAULT_ADDR
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer from 0 to 65535, got {port!r}")
    if (certfile is None) != (keyfile is None):
        raise ValueError("certfile and keyfile must be given together")
    if registry is None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = prometheus_client.REGISTRY
    server, thread = prometheus_client.start_http_server(
        port,
        addr=addr,
        registry=registry,
        certfile=certfile,
        keyfile=keyfile,
        client_cafile=client_cafile,
        client_capath=client_capath,
        client_auth_required=client_auth_required,
    )
    server._sqlprobe_tls = certfile is not None  # type: ignore[attr-defined]
    bound_addr, bound_port = server.server_address[:2]
    return MetricsServer(addr=str(bound_addr), port=int(bound_port), _server=server, _thread=thread)
