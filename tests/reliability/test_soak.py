"""Soak: the whole agent at full speed against PostgreSQL; memory and latency stay flat.

Six threads share a four-connection pool and run, as fast as they can, units of work of
the kind a web application has: inside a ``sqlprobe.scope``, five identical SELECTs
(an N+1 on purpose), an upsert, an update, now and then a slow statement and a unique
violation. The whole agent is on: Prometheus metrics and pool metrics, spans through a
``BatchSpanProcessor`` into an exporter that only counts them, the slow-query log (5 ms
threshold) and N+1 detection; a scraper reads /metrics all the while.

The run is cut into ten windows. Memory (RSS) from the end of the first window to the
end of the run, and the median statement latency of the second window against the
last, must stay flat; every count (calls per statement, errors, pool checkouts,
transactions, N+1 detections, spans) must equal what the application did. The server
is shared: if it is restarted or our backends are killed during the run, the workers
recover as an application would and the counts must still be exact; a checkout that
times out (QueuePool hands connections to whichever thread asks first, so a waiter can
lose that race for seconds) must be counted in ``sqlprobe_pool_checkout_timeouts_total``.

``-m soak`` runs it for ``SQLPROBE_SOAK_SECONDS`` (default 180); the default run has a
10-second version. Figures are printed (run with ``-s``) and kept in
docs/reliability.md.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from array import array
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

import sqlprobe

from ..conftest import PG_URL, _need, sample
from .conftest import CountingLogger, NullExporter, percentile, rss_bytes, samples_by

pytestmark = pytest.mark.postgres

THREADS = 6
WINDOWS = 10
MB = 1024 * 1024


class Counts:
    """What one worker did (no lock needed: each worker has its own)."""

    def __init__(self) -> None:
        self.selects = self.upserts = self.updates = self.sleeps = self.dupes = 0
        self.checkouts = self.commits = self.detections = self.integrity = 0
        self.disconnects = self.timeouts = 0


def _stacks() -> str:
    """Every thread's stack now (to tell a stuck pool from a stuck statement)."""
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"--- thread {ident}\n" + "".join(traceback.format_stack(frame)[-8:]))
    return "\n".join(out)


def soak(seconds: float, unique: str) -> dict[str, Any]:
    """Run the soak for ``seconds``; returns its figures (asserting the exact counts)."""
    _need(5432, "PostgreSQL")
    table = f"sp_soak_{unique}"
    engine = create_engine(PG_URL, pool_size=4, max_overflow=0, pool_timeout=5)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (k integer PRIMARY KEY, v integer)")
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (0, 0)")
    registry = CollectorRegistry()
    exporter = NullExporter()
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter, max_queue_size=200_000, schedule_delay_millis=200, max_export_batch_size=8192
        )
    )
    logger = CountingLogger()
    probe = sqlprobe.attach(
        engine,
        registry=registry,
        name="soak",
        tracer_provider=provider,
        logger=logger,
        slow_query_threshold=0.005,
    )
    select_one = text(f"SELECT v FROM {table} WHERE k = :k")
    upsert = text(
        f"INSERT INTO {table} (k, v) VALUES (:k, :v) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
    )
    bump = text(f"UPDATE {table} SET v = v + 1 WHERE k = :k")
    slow = text("SELECT pg_sleep(0.006)")
    dupe = text(f"INSERT INTO {table} (k, v) VALUES (0, :v)")

    stop = threading.Event()
    window = [0]
    # Latencies (s) of the second and the last window, as 8-byte doubles (no objects).
    measured = {1: array("d"), WINDOWS - 1: array("d")}
    counts = [Counts() for _ in range(THREADS)]
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        # Counted as attempted right before each execute: a statement that fails (the
        # server restarted under us) is still a call, and its error is counted.
        c = counts[n]
        clock = time.perf_counter
        try:
            i = 0
            while not stop.is_set():
                i += 1
                key = n * 1000 + i % 100 + 1
                lat = measured.get(window[0])
                try:
                    with sqlprobe.scope("soak unit"), engine.connect() as conn:
                        c.checkouts += 1
                        for j in range(5):  # one SELECT per item: an N+1 per unit
                            c.selects += 1
                            t0 = clock()
                            conn.execute(select_one, {"k": key + j}).scalar()
                            if lat is not None:
                                lat.append(clock() - t0)
                        c.detections += 1
                        c.upserts += 1
                        conn.execute(upsert, {"k": key, "v": i})
                        c.updates += 1
                        conn.execute(bump, {"k": key})
                        if i % 50 == 0:
                            c.sleeps += 1
                            conn.execute(slow)
                        conn.commit()
                        c.commits += 1
                        if i % 100 == 0:
                            try:
                                c.dupes += 1
                                conn.execute(dupe, {"v": i})
                            except IntegrityError:
                                c.integrity += 1
                                conn.rollback()
                except PoolTimeoutError:
                    # QueuePool is not fair: under contention a thread can lose the race
                    # for a returned connection again and again. sqlprobe must count it.
                    c.timeouts += 1
                except OperationalError:
                    # Someone restarted or killed the shared server: recover like an
                    # application would, and say so in the figures.
                    c.disconnects += 1
                    time.sleep(0.05)
        except BaseException as exc:
            failures.append(exc)
            stacks.append(_stacks())

    stacks: list[str] = []
    scrapes = 0
    rss: list[int] = []
    statements_per_window: list[int] = []
    try:
        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
        for t in threads:
            t.start()
        step = seconds / WINDOWS
        for w in range(WINDOWS):
            window[0] = w
            end = time.monotonic() + step
            before = sum(samples_by(registry, "sqlprobe_statement_calls_total", "engine").values())
            while time.monotonic() < end:
                generate_latest(registry)
                scrapes += 1
                time.sleep(min(0.25, max(end - time.monotonic(), 0)))
            after = sum(samples_by(registry, "sqlprobe_statement_calls_total", "engine").values())
            statements_per_window.append(int(after - before))
            rss.append(rss_bytes())
        stop.set()
        for t in threads:
            t.join(60)
        assert not [t for t in threads if t.is_alive()], "a worker is stuck"
        assert not failures, f"{failures}\npool: {engine.pool.status()}\n{stacks[0]}"
        provider.force_flush(30_000)

        total = {name: sum(getattr(c, name) for c in counts) for name in vars(counts[0])}
        statements = (
            total["selects"]
            + total["upserts"]
            + total["updates"]
            + total["sleeps"]
            + total["dupes"]
        )
        calls: dict[str, float] = {}
        info: dict[str, str] = {}
        for metric in registry.collect():
            for s in metric.samples:
                if s.name == "sqlprobe_statement_calls_total":
                    calls[s.labels["fingerprint"]] = s.value
                elif s.name == "sqlprobe_statement_info":
                    info[s.labels["fingerprint"]] = s.labels["statement"]
        by_text = {info[fp]: n for fp, n in calls.items()}
        assert by_text[f"SELECT v FROM {table} WHERE k = ?"] == total["selects"]
        assert by_text[f"UPDATE {table} SET v = v + ? WHERE k = ?"] == total["updates"]
        assert by_text["SELECT pg_sleep(?)"] == total["sleeps"]
        assert by_text[f"INSERT INTO {table} (k, v) VALUES (?, ?)"] == total["dupes"]
        upserts = [n for t, n in by_text.items() if "ON CONFLICT" in t]
        assert upserts == [total["upserts"]]
        assert sum(calls.values()) == statements
        assert (
            sample(
                registry,
                "sqlprobe_query_errors_total",
                engine="soak",
                operation="INSERT",
                error="IntegrityError",
            )
            == total["integrity"]
        )
        checkouts = sample(registry, "sqlprobe_pool_checkout_wait_seconds_count", engine="soak")
        assert checkouts == total["checkouts"]
        timeouts = sample(registry, "sqlprobe_pool_checkout_timeouts_total", engine="soak")
        assert timeouts == total["timeouts"]
        commits = sample(
            registry, "sqlprobe_transaction_duration_seconds_count", engine="soak", outcome="commit"
        )
        assert commits == total["commits"]
        n_plus_one = samples_by(registry, "sqlprobe_n_plus_one_total", "engine")
        assert n_plus_one == {"soak": total["detections"]}
        errors = samples_by(registry, "sqlprobe_query_errors_total", "error")
        assert errors.get("OperationalError", 0) <= total["disconnects"]
        slow_count = sum(samples_by(registry, "sqlprobe_slow_queries_total", "operation").values())
        assert slow_count >= total["sleeps"]
        assert exporter.spans == statements
        assert samples_by(registry, "sqlprobe_internal_errors_total", "stage") == {}
        assert logger.counts.get("internal_error", 0) == 0
        assert logger.counts.get("slow_query", 0) > 0
        assert logger.counts.get("n_plus_one", 0) > 0
        first, last = measured[1], measured[WINDOWS - 1]
        return {
            "seconds": seconds,
            "statements": statements,
            "statements_per_second": round(statements / seconds),
            "statements_per_window": statements_per_window,
            "units": total["checkouts"],
            "disconnects": total["disconnects"],
            "pool_timeouts": total["timeouts"],
            "spans": exporter.spans,
            "scrapes": scrapes,
            "rss_start_mb": round(rss[0] / MB, 1),
            "rss_end_mb": round(rss[-1] / MB, 1),
            "rss_growth_mb": round((rss[-1] - rss[0]) / MB, 2),
            "rss_mb_per_window": [round(r / MB, 1) for r in rss],
            "p50_first_ms": round(percentile(first, 0.5) * 1000, 3),
            "p50_last_ms": round(percentile(last, 0.5) * 1000, 3),
            "p99_first_ms": round(percentile(first, 0.99) * 1000, 3),
            "p99_last_ms": round(percentile(last, 0.99) * 1000, 3),
        }
    finally:
        stop.set()
        probe.detach()
        provider.shutdown()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        engine.dispose()


def _check_flat(figures: dict[str, Any], rss_limit_mb: float) -> None:
    print("soak", figures)
    assert figures["rss_growth_mb"] < rss_limit_mb, figures
    # A shared server's load varies: allow some noise, catch a trend.
    assert figures["p50_last_ms"] < figures["p50_first_ms"] * 1.5 + 0.3, figures


def test_soak_short(unique: str) -> None:
    """Ten seconds at full speed with the whole agent: flat memory and latency, exact counts."""
    _check_flat(soak(10.0, unique), rss_limit_mb=6)


@pytest.mark.soak
def test_soak(unique: str) -> None:
    """SQLPROBE_SOAK_SECONDS (180) at full speed: flat memory and latency, exact counts."""
    _check_flat(soak(float(os.environ.get("SQLPROBE_SOAK_SECONDS", "180")), unique), 10)
