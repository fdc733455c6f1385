"""Per-statement cost of sqlprobe, side by side with bare SQLAlchemy, in one run.

Each variant gets its own engine, set up once; then rounds interleave the variants
(bare, sqlprobe, ..., bare, sqlprobe, ...) so that machine noise (frequency scaling,
the other core's load) hits every variant alike. Each round times a batch of
primary-key SELECTs on one connection; the per-statement time of a round is the batch
time divided by its size. We report the median over rounds, min and max, the added
cost against bare, and the ratio.

Usage::

    python benchmarks/bench_statements.py                 # SQLite and PostgreSQL
    python benchmarks/bench_statements.py --quick         # a short run (CI smoke)
    python benchmarks/bench_statements.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.engine import Engine

import sqlprobe

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
QUERY = select(items.c.id, items.c.name).where(items.c.id == 1)


@dataclass
class Variant:
    """A named way of setting up an engine (and tearing the instrumentation down)."""

    name: str
    setup: Callable[[Engine], Callable[[], None]]
    available: Callable[[], str | None] = lambda: None


@dataclass
class Result:
    variant: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def _noop(engine: Engine) -> Callable[[], None]:
    return lambda: None


def _sqlprobe(**kwargs: Any) -> Callable[[Engine], Callable[[], None]]:
    def setup(engine: Engine) -> Callable[[], None]:
        probe = sqlprobe.attach(engine, registry=CollectorRegistry(), **kwargs)
        return probe.detach

    return setup


VARIANTS = [
    Variant("bare", _noop),
    Variant("sqlprobe (metrics)", _sqlprobe()),
]


def _prepare(url: str) -> Engine:
    engine = create_engine(url)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(items), [{"id": i, "name": f"n{i}"} for i in range(1, 101)])
    return engine


def run(url: str, variants: list[Variant], *, rounds: int, batch: int) -> list[Result]:
    """Interleave the variants for ``rounds`` rounds of ``batch`` statements each."""
    in_memory = url == "sqlite://"
    if not in_memory:
        _prepare(url).dispose()
    engines: list[tuple[Variant, Engine, Any, Callable[[], None]]] = []
    for variant in variants:
        # An in-memory SQLite database belongs to its engine: fill each one.
        engine = _prepare(url) if in_memory else create_engine(url)
        teardown = variant.setup(engine)
        conn = engine.connect()
        for _ in range(200):  # warm caches: compiled statement, shape cache, pool
            conn.execute(QUERY).all()
        engines.append((variant, engine, conn, teardown))
    results = {v.name: Result(v.name) for v in variants}
    perf = time.perf_counter
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for variant, _engine, conn, _ in engines:
                execute = conn.execute
                start = perf()
                for _ in range(batch):
                    execute(QUERY).all()
                results[variant.name].samples.append((perf() - start) / batch)
            gc.collect()
    finally:
        if gc_was:
            gc.enable()
        for _variant, engine, conn, teardown in engines:
            conn.close()
            teardown()
            engine.dispose()
    return [results[v.name] for v in variants]


def table(title: str, results: list[Result]) -> str:
    """A Markdown table: median, min, max (µs per statement), added cost and ratio."""
    bare = results[0].median
    lines = [
        f"### {title}",
        "",
        "| variant | median µs | min µs | max µs | added µs (median) | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.variant} | {r.median * 1e6:.2f} | {min(r.samples) * 1e6:.2f} | "
            f"{max(r.samples) * 1e6:.2f} | {(r.median - bare) * 1e6:+.2f} | "
            f"{r.median / bare:.3f} |"
        )
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--write", help="write the Markdown report to this file")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 41)
    batch = args.batch or (500 if args.quick else 2000)

    sections = [environment(), ""]
    sqlite_results = run("sqlite://", VARIANTS, rounds=rounds, batch=batch)
    sections.append(
        table(
            f"SQLite in-memory, primary-key SELECT, Core ({rounds} rounds × {batch})",
            sqlite_results,
        )
    )
    if not args.no_postgres:
        pg_results = run(PG_URL, VARIANTS, rounds=max(3, rounds // 4), batch=max(100, batch // 4))
        sections.append("")
        sections.append(
            table(
                f"PostgreSQL (psycopg 3, 127.0.0.1), primary-key SELECT, Core "
                f"({max(3, rounds // 4)} rounds × {max(100, batch // 4)})",
                pg_results,
            )
        )
    report = "\n".join(sections) + "\n"
    print(report)
    if args.write:
        with open(args.write, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
