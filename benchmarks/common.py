"""What every benchmark here shares: the table, the query, the database and the record.

The benchmarks themselves are ``suite.py`` (every figure of RESULTS.md, side by side
with bare SQLAlchemy and opentelemetry-instrumentation-sqlalchemy) and
``breakdown.py`` (the statement path taken apart).
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

from sqlalchemy import Column, Integer, MetaData, String, Table, select

import sqlprobe

__all__ = ["PG_URL", "QUERY", "environment", "items", "metadata"]

PG_URL = os.environ.get(
    "SQLPROBE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

metadata = MetaData()
items = Table(
    "sqlprobe_bench_items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(50)),
)
#: A primary-key SELECT: the cheapest real statement, so sqlprobe's share shows most.
QUERY = select(items.c.id, items.c.name).where(items.c.id == 1)


def environment() -> str:
    """Machine, versions and date for the record."""
    from importlib.metadata import version

    import sqlalchemy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- machine: {os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}\n"
        f"- python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, "
        f"prometheus_client {version('prometheus-client')}, sqlprobe {sqlprobe.__version__}"
    )
