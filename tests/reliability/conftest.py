"""Helpers of the reliability suite: an application workload, broken sinks, measurements.

The workload (:func:`run_workload`) is a small application: DDL, executemany, reads,
an expanding IN, updates, an integrity error, a syntax error, a missing table, an
explicit rollback and an N+1 loop. It returns every result and every error as plain
values, so a run with sqlprobe attached (and some part of it broken) can be compared
with a run without sqlprobe, value for value.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from ..conftest import MYSQL_URL, PG_URL, _need

STAGE_ERRORS = "sqlprobe_internal_errors_total"


# -- engines ------------------------------------------------------------------------------


@pytest.fixture
def sqlite_file_engine(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite engine on a file (EXPLAIN needs a database another connection can see)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'reliability.db'}")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The same test on a SQLite file, the real PostgreSQL and the real MariaDB."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'reliability.db'}")
    elif request.param == "postgresql":
        _need(5432, "PostgreSQL")
        engine = create_engine(PG_URL)
    else:
        _need(3306, "MariaDB")
        engine = create_engine(MYSQL_URL)
    yield engine
    engine.dispose()


# -- the application ------------------------------------------------------------------------


def items_table(name: str) -> tuple[MetaData, Table]:
    metadata = MetaData()
    table = Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", String(64), unique=True),
        Column("qty", Integer),
    )
    return metadata, table


def _outcome(exc: BaseException) -> tuple[str, str, str]:
    """An error as the application sees it: class, driver class, driver message."""
    orig = getattr(exc, "orig", None)
    return (type(exc).__name__, type(orig).__name__, str(orig if orig is not None else exc))


def run_workload(engine: Engine, name: str, n_plus_one: int = 6) -> list[Any]:
    """Run the application workload on ``engine``; every result and error, as values."""
    metadata, items = items_table(name)
    out: list[Any] = []
    metadata.drop_all(engine)
    metadata.create_all(engine)
    try:
        with engine.begin() as conn:
            result = conn.execute(
                insert(items), [{"id": i, "name": f"n{i}", "qty": i * 10} for i in range(1, 9)]
            )
            out.append(("insert", result.rowcount))
        with engine.connect() as conn:
            rows = conn.execute(select(items).order_by(items.c.id)).all()
            out.append(("all", [tuple(r) for r in rows]))
            ids = conn.execute(select(items.c.id).where(items.c.id.in_([2, 4, 6]))).scalars()
            out.append(("in", sorted(ids)))
            result = conn.execute(update(items).where(items.c.id > 5).values(qty=0))
            out.append(("update", result.rowcount))
            conn.commit()
            try:
                conn.execute(insert(items).values(id=99, name="n1", qty=1))
                out.append("no integrity error")
            except DBAPIError as exc:
                out.append(("integrity", _outcome(exc)))
                conn.rollback()
            try:
                conn.exec_driver_sql("SELEC 1 FROM nowhere WHERE")
                out.append("no syntax error")
            except DBAPIError as exc:
                out.append(("syntax", _outcome(exc)))
                conn.rollback()
            try:
                conn.execute(text("SELECT * FROM sqlprobe_rel_missing_table"))
                out.append("no missing-table error")
            except DBAPIError as exc:
                out.append(("missing", _outcome(exc)))
                conn.rollback()
            conn.execute(delete(items).where(items.c.id == 1))
            conn.rollback()
            # One SELECT shape per item in one transaction: the N+1 detector's case.
            names = [
                conn.execute(select(items.c.name).where(items.c.id == i)).scalar_one()
                for i in range(1, n_plus_one + 1)
            ]
            out.append(("loop", names))
            out.append(("count", conn.execute(select(func.count()).select_from(items)).scalar()))
            out.append(("sum", conn.execute(select(func.sum(items.c.qty))).scalar()))
    finally:
        metadata.drop_all(engine)
    return out


# -- broken parts ---------------------------------------------------------------------------


class Boom(RuntimeError):
    """The failure the tests inject into sqlprobe's sinks."""


class Raiser:
    """A callable that counts its calls and raises :class:`Boom` (thread-safe count)."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls += 1
        raise Boom("injected")


class RaisingLogger:
    """A logger whose every method raises; it remembers the events it was given.

    With ``remember=False`` it keeps only a count per event name (long runs).
    """

    def __init__(self, remember: bool = True) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.counts: dict[str, int] = {}
        self.remember = remember
        self._lock = threading.Lock()

    def __getattr__(self, method: str) -> Any:
        def log(event: str, *args: Any, **kw: Any) -> None:
            with self._lock:
                self.counts[event] = self.counts.get(event, 0) + 1
                if self.remember:
                    self.events.append((method, event, kw))
            raise Boom(f"logger.{method}")

        return log

    def count(self, event: str, **fields: Any) -> int:
        return sum(
            1
            for _m, e, kw in list(self.events)
            if e == event and all(kw.get(k) == v for k, v in fields.items())
        )


class CountingLogger:
    """A logger that keeps only counts of its events (for long runs: no growth)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def __getattr__(self, method: str) -> Any:
        def log(event: str, *args: Any, **kw: Any) -> None:
            with self._lock:
                self.counts[event] = self.counts.get(event, 0) + 1
                self.last[event] = kw

        return log


class RaisingSpanProcessor(SpanProcessor):
    """A span processor whose ``on_end`` raises (the SDK lets it propagate)."""

    def __init__(self) -> None:
        self.raiser = Raiser()

    def on_end(self, span: ReadableSpan) -> None:
        self.raiser()


class NullExporter(SpanExporter):
    """Counts exported spans and keeps none of them."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


# -- measurements ----------------------------------------------------------------------------


def rss_bytes() -> int:
    """The resident set size of this process now (Linux), after a full collection."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stage_errors(registry: CollectorRegistry, stage: str) -> float:
    value = registry.get_sample_value(STAGE_ERRORS, {"stage": stage})
    return 0.0 if value is None else value


def series_count(registry: CollectorRegistry, name: str) -> int:
    return sum(1 for m in registry.collect() for s in m.samples if s.name == name)


def samples_by(registry: CollectorRegistry, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == name:
                key = s.labels.get(label, "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
