"""Query capture for tests: count, inspect and bound the statements a block runs.

::

    from sqlprobe.testing import capture

    with capture(engine) as q:
        client.get("/users")
    q.assert_max(3)
    q.assert_no_n_plus_one()
    print(q.format())

Which engines
-------------
``capture(engine)`` records the statements of that engine (an ``Engine`` or an
``AsyncEngine``). If the engine is not attached yet, the capture attaches it for its own
duration, with a private ``CollectorRegistry`` and a logger that drops every event, and
detaches it on exit: a test that captures never touches the global registry or the
application's logs. (Attaching the same engine yourself *inside* the block returns that
private probe.)

``capture()`` with no engine records every engine that is attached when it starts and
every engine attached while it is open; it attaches nothing itself.

What is recorded
----------------
Each statement the engine executed (successful or failed) becomes a
:class:`CapturedStatement`: the normalized text (no literal or parameter values), its
fingerprint, operation, table, duration in seconds, the driver's row count (-1 when the
driver reports none, as SQLite does for SELECT) and the error class name of a failure.
Noise is left out unless ``include_noise=True``: transaction statements (``BEGIN``,
``COMMIT``, ``ROLLBACK``, ``SAVEPOINT``, ``RELEASE``, ``SET``; most drivers begin and
commit without a statement at all, so these appear only where one is sent) and the
queries SQLAlchemy runs once when an engine first connects (server version, default
schema...), which would otherwise be charged to whichever test connects first.

N+1 detections (see ``sqlprobe.scope``) of the captured engines made while the capture is
open are collected in :attr:`QueryCapture.n_plus_one`; they follow each probe's own
``n_plus_one_threshold`` (5 for an engine the capture attached itself; none at all for a
probe attached with ``n_plus_one_threshold=0``).

Thread safety
-------------
Like ``structlog.testing.capture_logs``, a capture is not isolated per thread or task:
it records every statement of the captured engines from every thread while it is open.
Tests that run concurrently on one engine see each other's statements.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from ._core._records import Detection
from ._state import (
    add_attach_listener,
    add_detection_listener,
    remove_attach_listener,
    remove_detection_listener,
)

if TYPE_CHECKING:
    from ._core._records import StatementRecord
    from ._probe import Probe

__all__ = ["NOISE", "CapturedStatement", "Detection", "QueryCapture", "capture"]

#: Operations left out of a capture unless ``include_noise=True``.
NOISE: frozenset[str] = frozenset({"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "SET"})


class CapturedStatement(NamedTuple):
    """One statement a capture recorded."""

    statement: str
    """The normalized text: literals and parameters are ``?``."""
    fingerprint: str
    operation: str
    table: str
    duration: float
    """Seconds the driver spent executing it."""
    rows: int
    """The driver's row count, -1 when it reported none."""
    engine: str
    """The ``engine`` label of the probe that saw it."""
    error: str | None
    """The exception class name when the statement failed, else None."""


def _initializing(context: Any) -> bool:
    # SQLAlchemy runs the dialect's first-connect queries (server version, default
    # schema...) on an ad-hoc Connection made with autobegin off; no application
    # Connection has that, so it marks them.
    connection = getattr(context, "root_connection", None)
    return getattr(connection, "_allow_autobegin", True) is False


class _Sink:
    stage = "capture"

    def __init__(self, out: list[CapturedStatement], include_noise: bool) -> None:
        self.out = out
        self.include_noise = include_noise
        self.skip = frozenset() if include_noise else NOISE

    def on_statement(self, record: StatementRecord) -> None:
        shape = record.shape
        if shape.operation in self.skip:
            return
        if not self.include_noise and _initializing(record.context):
            return
        error = record.error
        self.out.append(
            CapturedStatement(
                shape.normalized,
                shape.fingerprint,
                shape.operation,
                shape.table,
                record.duration,
                record.rows,
                record.engine,
                type(error).__name__ if error is not None else None,
            )
        )


def _drop_event(logger: Any, method: str, event: Any) -> Any:
    import structlog

    raise structlog.DropEvent


class QueryCapture:
    """The statements recorded by :func:`capture`; a context manager.

    ``len(q)``, iteration and indexing go over :attr:`statements`.
    """

    def __init__(self, engine: Any = None, *, include_noise: bool = False) -> None:
        self._engine = engine
        self._include_noise = include_noise
        #: Every recorded statement, in execution order.
        self.statements: list[CapturedStatement] = []
        #: N+1 detections made on the captured engines while the capture was open.
        self.n_plus_one: list[Detection] = []
        self._sink = _Sink(self.statements, include_noise)
        self._probes: list[Probe] = []
        self._own_probe: Probe | None = None
        self._engine_names: set[str] = set()
        self._open = False

    # -- context manager -------------------------------------------------------------

    def __enter__(self) -> QueryCapture:
        if self._open:
            raise RuntimeError("this capture is already open")
        from . import _state

        self._open = True
        try:
            if self._engine is not None:
                self._add_probe(self._probe_for(self._engine))
            else:
                # Listen first, then list: an engine attached in between is added twice,
                # which _add_probe ignores, rather than not at all.
                add_attach_listener(self._add_probe)
                with _state.lock:
                    probes = [p for p in _state.probes.values() if p.attached]
                for probe in probes:
                    self._add_probe(probe)
            add_detection_listener(self._on_detection)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _probe_for(self, engine: Any) -> Probe:
        from . import _state
        from ._probe import attach

        sync = getattr(engine, "sync_engine", engine)
        with _state.lock:
            probe = _state.probes.get(sync)
            if probe is not None and probe.attached:
                return probe
        import structlog
        from prometheus_client import CollectorRegistry

        probe = attach(
            engine,
            registry=CollectorRegistry(),
            logger=structlog.wrap_logger(None, processors=[_drop_event]),
        )
        if not probe.attached:
            raise RuntimeError("sqlprobe is disabled (SQLPROBE_ENABLED=0): nothing to capture")
        self._own_probe = probe
        return probe

    def _add_probe(self, probe: Probe) -> None:
        collector = probe.collector
        if collector is None or probe in self._probes:
            return
        collector.add_sink(self._sink)
        self._probes.append(probe)
        self._engine_names.add(collector.engine_name)

    def _on_detection(self, detection: Detection) -> None:
        if detection.engine in self._engine_names:
            self.n_plus_one.append(detection)

    def _close(self) -> None:
        remove_detection_listener(self._on_detection)
        remove_attach_listener(self._add_probe)
        for probe in self._probes:
            collector = probe.collector
            if collector is not None:
                collector.remove_sink(self._sink)
        self._probes.clear()
        if self._own_probe is not None:
            self._own_probe.detach()
            self._own_probe = None
        self._open = False

    # -- reading ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.statements)

    def __iter__(self) -> Iterator[CapturedStatement]:
        return iter(list(self.statements))

    def __getitem__(self, index: int) -> CapturedStatement:
        return self.statements[index]

    @property
    def records(self) -> list[CapturedStatement]:
        """The recorded statements (the same list as :attr:`statements`)."""
        return self.statements

    @property
    def total_duration(self) -> float:
        """Seconds all recorded statements spent in the driver."""
        return sum(s.duration for s in self.statements)

    def count(self, operation: str | None = None, *, table: str | None = None) -> int:
        """How many recorded statements have this operation (and table), or all of them."""
        return sum(
            1
            for s in self.statements
            if (operation is None or s.operation == operation)
            and (table is None or s.table == table)
        )

    def format(self, limit: int = 50) -> str:
        """A numbered, readable list of the statements (at most ``limit`` of them)."""
        lines = []
        for i, s in enumerate(self.statements[:limit], 1):
            text = s.statement if len(s.statement) <= 300 else s.statement[:297] + "..."
            failed = f" [{s.error}]" if s.error else ""
            lines.append(f"{i:3}. {text}  ({s.duration * 1000:.2f} ms){failed}")
        if len(self.statements) > limit:
            lines.append(f"     ... and {len(self.statements) - limit} more")
        return "\n".join(lines)

    # -- assertions ------------------------------------------------------------------

    def assert_count(self, expected: int) -> None:
        """Fail unless exactly ``expected`` statements were recorded."""
        if len(self.statements) != expected:
            raise AssertionError(
                f"expected {expected} statements, {len(self.statements)} ran:\n{self.format()}"
            )

    def assert_max(self, maximum: int) -> None:
        """Fail if more than ``maximum`` statements were recorded."""
        if len(self.statements) > maximum:
            raise AssertionError(
                f"expected at most {maximum} statements, {len(self.statements)} ran:\n"
                f"{self.format()}"
            )

    def assert_no_n_plus_one(self) -> None:
        """Fail if an N+1 was detected on a captured engine while the capture was open."""
        if self.n_plus_one:
            raise AssertionError(format_detections(self.n_plus_one))

    def __repr__(self) -> str:
        return f"<sqlprobe.testing.QueryCapture {len(self.statements)} statements>"


def format_detections(detections: list[Detection]) -> str:
    """A readable description of N+1 detections, one paragraph each."""
    parts = [f"{len(detections)} N+1 pattern(s) detected:"]
    for d in detections:
        what = d.relationship or "a repeated SELECT"
        parts.append(
            f"- {what}: executed {d.count}+ times in scope {d.scope!r} at {d.source or '?'}\n"
            f"  {d.statement[:300]}\n"
            f"  suggestion: {d.suggestion}"
        )
    return "\n".join(parts)


def capture(engine: Any = None, *, include_noise: bool = False) -> QueryCapture:
    """Record the statements run while the returned context manager is open.

    ``engine`` is an ``Engine`` or ``AsyncEngine`` (attached for the duration if it is
    not already), or None for every attached engine. Transaction noise (BEGIN, COMMIT,
    ROLLBACK, SAVEPOINT, RELEASE, SET) is left out unless ``include_noise`` is true.
    """
    return QueryCapture(engine, include_noise=include_noise)
