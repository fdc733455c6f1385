"""sqlprobe: query-performance profiling and observability for SQLAlchemy.

One line attaches it to an engine::

    import sqlprobe

    probe = sqlprobe.attach(engine)
    sqlprobe.start_http_server()   # /metrics on 127.0.0.1:9464

From then on every statement is measured and leaves the process as Prometheus
metrics, OpenTelemetry spans and structured slow-query logs. The names of all of them
are a contract (see the documentation); nothing is configured globally: registry,
tracer provider, meter provider and logger are injected or default to the global ones.
"""

from __future__ import annotations

from ._probe import EngineInfo, Probe, StatementStats, attach
from ._scope import Scope, scope
from ._server import MetricsServer, start_http_server

__all__ = [
    "EngineInfo",
    "MetricsServer",
    "Probe",
    "Scope",
    "StatementStats",
    "attach",
    "scope",
    "start_http_server",
]

__version__ = "0.1.0.dev0"
