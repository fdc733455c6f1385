"""sqlprobe: query-performance profiling and observability for SQLAlchemy.

One line attaches it to an engine::

    import sqlprobe

    probe = sqlprobe.attach(engine)
    sqlprobe.start_http_server()   # /metrics on 127.0.0.1:9464

From then on every statement is measured and leaves the process as Prometheus
metrics, OpenTelemetry spans and structured slow-query logs. The names of all of them
are a contract (see the documentation); nothing is configured globally: registry,
tracer provider, meter provider and logger are injected or default to the global ones.

Importing ``sqlprobe`` does no work: the public names are loaded on first use, so the
pytest plugin (an entry point loaded by every pytest run) and CLI start-up stay cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core._scope import Scope, scope
    from ._probe import EngineInfo, Probe, StatementStats, attach
    from ._server import MetricsServer, MetricsServerError, start_http_server

__all__ = [
    "EngineInfo",
    "MetricsServer",
    "MetricsServerError",
    "Probe",
    "Scope",
    "StatementStats",
    "attach",
    "scope",
    "start_http_server",
]

from ._core._version import __version__ as __version__

_EXPORTS = {
    "EngineInfo": "._probe",
    "Probe": "._probe",
    "StatementStats": "._probe",
    "attach": "._probe",
    "Scope": "._core._scope",
    "scope": "._core._scope",
    "MetricsServer": "._server",
    "MetricsServerError": "._server",
    "start_http_server": "._server",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sqlprobe' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
