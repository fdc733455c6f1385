"""Where the metrics-only cost per statement sits: the hot path taken apart.

    .venv/bin/python benchmarks/breakdown.py

Interleaved rounds on SQLite in-memory (primary-key SELECT, one connection), each
variant adding one piece of sqlprobe's statement path on top of the previous one:

1. bare SQLAlchemy;
2. a ``do_execute`` listener that calls the dialect's ``do_execute`` and returns True
   (SQLAlchemy's dialect-event dispatch plus two ``perf_counter`` calls): the floor of
   any timing hook that does not use ConnectionEvents;
3. + the shape lookup (the text-keyed cache hit);
4. + the Prometheus accumulators (one lock, four increments, a bisect);
5. sqlprobe as attached by default without N+1 (adds the sink checks and, with
   opentelemetry importable, the ambient-span check);
6. sqlprobe with its defaults (N+1 counting on).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

import sqlprobe

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import QUERY, items, metadata


def _engine() -> Engine:
    engine = create_engine("sqlite://")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(items.insert(), [{"id": i, "name": f"n{i}"} for i in range(1, 11)])
    return engine


def _listener(engine: Engine, body: Callable[[str, float], None] | None) -> None:
    do_execute = engine.dialect.do_execute
    perf = time.perf_counter

    def on_do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        start = perf()
        do_execute(cursor, statement, parameters, context)
        elapsed = perf() - start
        if body is not None:
            body(statement, elapsed)
        return True

    event.listen(engine, "do_execute", on_do_execute)


def main() -> None:
    quiet = structlog.wrap_logger(structlog.ReturnLogger())
    variants: list[tuple[str, Engine]] = []
    variants.append(("1 bare", _engine()))
    e = _engine()
    _listener(e, None)
    variants.append(("2 + timed do_execute listener", e))

    e = _engine()
    probe = sqlprobe.attach(_engine(), registry=CollectorRegistry(), n_plus_one_threshold=0)
    collector = probe.collector
    assert collector is not None
    cache_get = collector._cache.get
    collector.entry(str(QUERY.compile(e)))

    def lookup(statement: str, elapsed: float) -> None:
        cache_get(statement)

    _listener(e, lookup)
    variants.append(("3 + shape cache lookup", e))

    e = _engine()
    series = collector.series

    def accumulate(statement: str, elapsed: float) -> None:
        entry = cache_get(statement)
        if entry is None:
            entry = collector.entry(statement)
        series.observe(entry[1], entry[2], elapsed, -1)

    _listener(e, accumulate)
    variants.append(("4 + Prometheus accumulators", e))

    e = _engine()
    sqlprobe.attach(e, registry=CollectorRegistry(), n_plus_one_threshold=0, logger=quiet)
    variants.append(("5 sqlprobe.attach, N+1 off", e))
    e = _engine()
    sqlprobe.attach(e, registry=CollectorRegistry(), logger=quiet)
    variants.append(("6 sqlprobe.attach, defaults", e))

    conns = [(name, engine.connect()) for name, engine in variants]
    for _, conn in conns:
        for _ in range(500):
            conn.execute(QUERY).all()
    samples: dict[str, list[float]] = {name: [] for name, _ in conns}
    batch, rounds = 2000, 41
    gc.disable()
    for _ in range(rounds):
        for name, conn in conns:
            execute = conn.execute
            start = time.perf_counter()
            for _ in range(batch):
                execute(QUERY).all()
            samples[name].append((time.perf_counter() - start) / batch)
        gc.enable()
        gc.collect()
        gc.disable()
    gc.enable()
    bare = statistics.median(samples["1 bare"])
    previous = bare
    print("| step | median µs | added vs bare | added by this step |")
    print("|---|---:|---:|---:|")
    for name, values in samples.items():
        m = statistics.median(values)
        print(f"| {name} | {m * 1e6:.2f} | {(m - bare) * 1e6:+.2f} | {(m - previous) * 1e6:+.2f} |")
        previous = m


if __name__ == "__main__":
    main()
