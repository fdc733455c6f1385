"""What every benchmark here shares: the table, the query, the database and the record.

The benchmarks themselves are ``suite.py`` (every figure of RESULTS.md, side by side
with bare SQLAlchemy and opentelemetry-instrumentation-sqlalchemy) and
``breakdown.py`` (the statement path taken apart).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

from sqlalchemy import Column, Integer, MetaData, String, Table, select

import sqlprobe

__all__ = [
    "PG_URL",
    "QUERY",
    "environment",
    "interleaved",
    "items",
    "machine_noise",
    "metadata",
    "paired_median",
]

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


def machine_noise(seconds: float = 3.0) -> str:
    """How steady the CPU is: a fixed pure-Python loop timed over and over.

    Shared two-core machines slow down in bursts; a reader of the figures should know
    how much, and the benchmarks that report absolute times run in rounds because of it.
    """
    import statistics
    import time

    times: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        total = 0
        for i in range(100_000):
            total += i
        times.append(time.perf_counter() - start)
    low, mid, high = min(times), statistics.median(times), max(times)
    return (
        f"- machine noise: a fixed loop timed {len(times)} times over {seconds:g} s took "
        f"{low * 1e3:.2f} ms at best, {mid * 1e3:.2f} ms median, {high * 1e3:.2f} ms at worst "
        f"({mid / low:.2f}x and {high / low:.2f}x the best)"
    )


def interleaved(
    runs: Sequence[tuple[str, Callable[[int], None], int]],
    rounds: int,
    clock: Callable[[], float] = time.thread_time,
) -> dict[str, list[float]]:
    """Seconds per iteration of each ``(name, run, batch)``, ``rounds`` samples each.

    Every round times one batch of every run, starting one run later each round (so no
    run always follows the same neighbour or the garbage collection between rounds);
    the collector is off inside a round. Pair the samples by round with
    :func:`paired_median`.

    The default clock is the thread's CPU time: on a machine whose cores are shared
    with other jobs, wall time also counts the slices the scheduler gave to them,
    which is most of the round-to-round noise; CPU time leaves out that (and any wait
    on a database server), and keeps what the code under test costs.
    """
    samples: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    perf = clock
    order = list(runs)
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(order)
            for name, run, batch in order[k:] + order[:k]:
                start = perf()
                run(batch)
                samples[name].append((perf() - start) / batch)
            gc.enable()
            gc.collect()
            gc.disable()
    finally:
        gc.enable()
    return samples


def paired_median(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of ``a - b`` (both sampled in the same round)."""
    return statistics.median(x - y for x, y in zip(a, b, strict=True))
