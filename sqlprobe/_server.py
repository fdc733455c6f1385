"""The /metrics endpoint, on prometheus_client's own HTTP server."""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry

from ._config import DEFAULT_METRICS_ADDR, DEFAULT_METRICS_PORT, env_metrics_addr, env_metrics_port

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_PORT",
    "MetricsServer",
    "MetricsServerError",
    "start_http_server",
]

DEFAULT_ADDR = DEFAULT_METRICS_ADDR
DEFAULT_PORT = DEFAULT_METRICS_PORT


class MetricsServerError(OSError):
    """The /metrics server could not start: the message names the address, port and cause.

    An ``OSError`` (code that catches ``OSError`` around ``start_http_server`` keeps
    working) whose ``errno`` is the original one; the original exception is the
    ``__cause__``.
    """

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


@dataclass
class MetricsServer:
    """A running /metrics server; :meth:`close` stops it and frees the port.

    Attributes:
        addr: The address the server is bound to.
        port: The port it is bound to (the real one when ``port=0`` picked a free port).
    """

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


def _where(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _reason(exc: OSError, addr: str, port: int) -> str:
    if isinstance(exc, socket.gaierror):
        return f"address {addr!r} does not resolve ({exc.strerror or exc})"
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use (choose another port, or 0 for a free one)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"address {addr!r} is not an address of this machine"
    if exc.errno == errno.EACCES:
        return f"permission denied (ports below 1024 need privileges; got {port})"
    return exc.strerror or str(exc)


def _check_tls(
    certfile: str | None,
    keyfile: str | None,
    client_cafile: str | None,
    client_capath: str | None,
) -> None:
    # Loaded once here, before anything binds, so that a bad file is reported by name
    # and never leaves a bound socket behind (prometheus_client binds first).
    if certfile is None or keyfile is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile=certfile, keyfile=keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise MetricsServerError(
            f"cannot load the TLS certificate certfile={certfile!r} keyfile={keyfile!r}: "
            f"{getattr(exc, 'strerror', None) or exc}",
            code=getattr(exc, "errno", None),
        ) from exc
    if client_cafile is not None or client_capath is not None:
        try:
            context.load_verify_locations(client_cafile, client_capath)
        except (OSError, ssl.SSLError) as exc:
            raise MetricsServerError(
                f"cannot load the client CA client_cafile={client_cafile!r} "
                f"client_capath={client_capath!r}: {getattr(exc, 'strerror', None) or exc}",
                code=getattr(exc, "errno", None),
            ) from exc


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

    Binds 127.0.0.1:9464 unless told otherwise: metrics name tables and statement
    shapes, which are not for the whole network by default. All of this is handed to
    ``prometheus_client.start_http_server``.

    Args:
        port: TCP port; 0 picks a free one (see `MetricsServer.port`). Default: the
            ``SQLPROBE_METRICS_PORT`` environment variable, then 9464.
        addr: Address to bind (``0.0.0.0`` or ``::`` for every interface). Default:
            ``SQLPROBE_METRICS_ADDR``, then 127.0.0.1.
        registry: The registry to serve. Default: prometheus_client's global one, or,
            with ``PROMETHEUS_MULTIPROC_DIR`` set, a registry that aggregates every
            worker process's metrics.
        certfile: PEM certificate; with ``keyfile`` it turns on TLS (https).
        keyfile: PEM private key of ``certfile``.
        client_cafile: CA file to verify client certificates with.
        client_capath: CA directory to verify client certificates with.
        client_auth_required: Refuse clients without a certificate signed by that CA.

    Returns:
        The running server; `MetricsServer.close` stops it.

    Raises:
        ValueError: ``port`` is not an integer from 0 to 65535, ``addr`` is empty, or
            only one of ``certfile`` and ``keyfile`` is given.
        MetricsServerError: An ``OSError`` naming the address and port: the port is in
            use, the address does not resolve or is not this machine's, a TLS file
            cannot be loaded. The original error is its ``__cause__``.
    """
    if port is None:
        port = env_metrics_port()
    if addr is None:
        addr = env_metrics_addr()
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(
            f"port must be an integer from 0 to 65535 (0 picks a free port), got {port!r}"
        )
    if not isinstance(addr, str) or not addr.strip():
        raise ValueError(f"addr must be a host name or IP address, got {addr!r}")
    if (certfile is None) != (keyfile is None):
        raise ValueError("certfile and keyfile must be given together")
    _check_tls(certfile, keyfile, client_cafile, client_capath)
    if registry is None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = prometheus_client.REGISTRY
    try:
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
    except UnicodeError as exc:  # an address the IDNA codec refuses (empty label, ...)
        raise MetricsServerError(
            f"cannot serve /metrics on {_where(addr, port)}: address {addr!r} is not a valid "
            "host name"
        ) from exc
    except OSError as exc:
        raise MetricsServerError(
            f"cannot serve /metrics on {_where(addr, port)}: {_reason(exc, addr, port)}",
            code=exc.errno,
        ) from exc
    server._sqlprobe_tls = certfile is not None  # type: ignore[attr-defined]
    bound_addr, bound_port = server.server_address[:2]
    return MetricsServer(addr=str(bound_addr), port=int(bound_port), _server=server, _thread=thread)
