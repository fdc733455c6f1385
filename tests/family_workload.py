"""A workload that makes every metric family sqlprobe exports carry a sample.

Used in-process by ``test_families.py`` and, for Prometheus multiprocess mode, as a
script (``python tests/family_workload.py DIR``) whose output is the aggregated
exposition of a ``MultiProcessCollector``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any

import structlog
from sqlalchemy import create_engine, exc, text
from sqlalchemy.pool import QueuePool


class _RaisingLogger:
    """A logger whose warnings raise: the slow-query log's failure is contained."""

    def warning(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("broken logger")

    def error(self, *args: Any, **kwargs: Any) -> None:
        return None


def run(registry: Any, directory: str) -> list[Any]:
    """Run the workload on SQLite file engines; return the engines (keep them alive)."""
    import sqlprobe

    quiet = structlog.wrap_logger(None, processors=[_drop])
    engine = create_engine(
        f"sqlite:///{directory}/families.db", poolclass=QueuePool, pool_size=2, max_overflow=1
    )
    probe = sqlprobe.attach(
        engine, name="families", registry=registry, logger=quiet, slow_query_threshold=0.05
    )
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v INTEGER)"))
        conn.execute(text("DELETE FROM t"))
        conn.execute(text("INSERT INTO t (id, v) VALUES (1, 1), (2, 2), (3, 3)"))
        conn.execute(text("UPDATE t SET v = v + 1"))
    # A unit of work: the per-route histograms (and the idle and peak pool series).
    with sqlprobe.scope("families"), engine.connect() as conn:
        for i in range(6):  # one SELECT per item: an N+1
            conn.execute(text("SELECT v FROM t WHERE id = :id"), {"id": i})
    with engine.connect() as conn:
        with contextlib.suppress(exc.OperationalError):
            conn.execute(text("SELECT * FROM no_such_table"))
        conn.execute(text("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                          "WHERE x < 300000) SELECT count(*) FROM c"))  # slow  # fmt: skip
        conn.rollback()
    conn = engine.connect()
    conn.invalidate()
    conn.close()
    # A database that cannot be opened: a connect error, not a statement error.
    broken = create_engine(f"sqlite:///{directory}/missing/dir/x.db")
    broken_probe = sqlprobe.attach(broken, name="broken", registry=registry, logger=quiet)
    with contextlib.suppress(exc.OperationalError):
        broken.connect()
    # A pool that runs dry: a checkout timeout.
    tight = create_engine(
        f"sqlite:///{directory}/tight.db", poolclass=QueuePool, pool_size=1, max_overflow=0,
        pool_timeout=0.05,
    )  # fmt: skip
    tight_probe = sqlprobe.attach(
        tight, name="tight", registry=registry, logger=_RaisingLogger(), slow_query_threshold=0
    )
    held = tight.connect()
    held.execute(text("SELECT 1"))  # slow (threshold 0): its broken logger is contained
    with contextlib.suppress(exc.TimeoutError):
        tight.connect()
    held.close()
    # Index advice: a slow SELECT on an unindexed column of a 3,000-row table.
    advised = create_engine(f"sqlite:///{directory}/advised.db")
    with advised.begin() as conn:
        conn.execute(text("CREATE TABLE big (id INTEGER PRIMARY KEY, k INTEGER, v TEXT)"))
        conn.execute(
            text("INSERT INTO big (id, k, v) VALUES (:i, :i, 'x')"),
            [{"i": i} for i in range(3000)],
        )
    advised_probe = sqlprobe.attach(
        advised, name="advised", registry=registry, logger=quiet, slow_query_threshold=0,
        index_advice=True,
    )  # fmt: skip
    with advised.connect() as conn:
        conn.execute(text("SELECT v FROM big WHERE k = :k"), {"k": 7}).all()
    deadline = time.monotonic() + 30
    while not any(
        s.name == "sqlprobe_index_advice_info" and s.labels.get("engine") == "advised"
        for m in registry.collect()
        for s in m.samples
    ) and not _multiprocess_advised(advised_probe):
        if time.monotonic() > deadline:
            raise RuntimeError("no index advice within 30 s")
        time.sleep(0.05)
    assert probe.attached and broken_probe.attached and tight_probe.attached
    return [engine, broken, tight, advised]


def _multiprocess_advised(probe: Any) -> bool:
    """In multiprocess mode nothing is registered: read the probe's own series."""
    return bool(getattr(probe, "_series", None) and probe._series.advice)


def _drop(logger: Any, method: str, event: Any) -> Any:
    raise structlog.DropEvent


if __name__ == "__main__":
    # Multiprocess mode: the directory must be set before prometheus_client is imported.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    with tempfile.TemporaryDirectory() as tmp:
        engines = run(CollectorRegistry(), tmp)
    aggregate = CollectorRegistry()
    MultiProcessCollector(aggregate)
    sys.stdout.write(generate_latest(aggregate).decode())
