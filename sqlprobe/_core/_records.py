"""The data that flows from the hooks through the collector to the sinks.

Everything a sink or an analysis is handed is defined here, so that none of them needs
to know who produced it:

* :class:`EngineInfo`: the facts of one attached engine, fixed at attach;
* :class:`StatementRecord`: one executed statement, built only when a sink reads one;
* :class:`Detection`: one N+1 detection;
* :class:`AttachContext`: what each feature is given when a probe is wired (the engine
  facts, a containment callback and the logger); never the probe itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._fingerprint import Shape

__all__ = [
    "RELATIONSHIP_OPTION",
    "AttachContext",
    "Contain",
    "Detection",
    "EngineInfo",
    "StatementRecord",
]

#: ``contain(stage)``: count and (rate-limited) log a failure inside sqlprobe that was
#: caught; call it from an ``except`` block (it reads the exception being handled).
Contain = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What sqlprobe knows of an engine, computed once at attach (no credentials).

    ``name`` is the ``engine`` label of its metrics; ``system`` the OpenTelemetry
    ``db.system.name`` (``postgresql``, ``mysql``, ``mariadb``, ``sqlite``...).
    """

    name: str
    system: str
    driver: str
    host: str | None
    port: int | None
    database: str | None


@dataclass(frozen=True, slots=True)
class AttachContext:
    """What a sink or an analysis is given at attach time.

    ``dialect`` is the engine's SQLAlchemy dialect instance (for facts such as the
    DBAPI module, the paramstyle or ``is_mariadb``), never used to execute anything.
    """

    info: EngineInfo
    dialect: Any
    contain: Contain
    logger: Any


class StatementRecord:
    """One executed statement, as sinks see it.

    ``statement`` is the raw text sent to the driver and ``parameters`` the raw
    parameters: sinks must not export either unless the user asked for parameters
    (``capture_parameters``); ``shape.normalized`` is the safe text. ``span`` is the
    span context linked to the statement (its own span, the instrumentation's, or the
    active one), or None.
    """

    __slots__ = (
        "batch_size",
        "context",
        "duration",
        "engine",
        "error",
        "parameters",
        "rows",
        "shape",
        "span",
        "start",
        "statement",
    )

    def __init__(
        self,
        engine: str,
        statement: str,
        shape: Shape,
        start: float,
        duration: float,
        rows: int,
        batch_size: int,
        parameters: Any,
        context: Any,
        error: BaseException | None,
        span: Any,
    ) -> None:
        self.engine = engine
        self.statement = statement
        self.shape = shape
        self.start = start
        self.duration = duration
        self.rows = rows
        self.batch_size = batch_size
        self.parameters = parameters
        self.context = context
        self.error = error
        self.span = span

    @property
    def fingerprint(self) -> str:
        return self.shape.fingerprint

    @property
    def operation(self) -> str:
        return self.shape.operation

    @property
    def table(self) -> str:
        return self.shape.table


@dataclass(frozen=True, slots=True)
class Detection:
    """One N+1 detection, as logged and as ``sqlprobe.testing`` records it."""

    engine: str
    fingerprint: str
    statement: str
    count: int
    scope: str
    relationship: str
    source: str
    suggestion: str


#: The execution option that carries an ORM loader path from the ORM hook
#: (``_hooks._orm``) to the N+1 detector: ``(PathRegistry, lazy: bool)``.
RELATIONSHIP_OPTION = "_sqlprobe_relationship"
