"""The background IndexAdvisor: bounded queue, rate limit, once per fingerprint, close()."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine

from sqlprobe._analysis._advisor import Analysis, IndexAdvice, IndexAdvisor


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A SQLite file with a 3000-row table whose columns a..e have no index."""
    path = Path(tmp_path_factory.mktemp("worker")) / "w.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as c:
        c.exec_driver_sql(
            "CREATE TABLE adv_w (id INTEGER PRIMARY KEY, a INT, b INT, c INT, d INT, e INT)"
        )
        c.exec_driver_sql(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)"
            " INSERT INTO adv_w (a, b, c, d, e) SELECT i, i * 3, i * 7, i * 11, i * 13 FROM n"
        )
    yield engine
    engine.dispose()


class Recorder:
    """Collects what the advisor reports, thread-safely."""

    def __init__(self) -> None:
        self.advice: list[IndexAdvice] = []
        self.analyses: list[Analysis] = []
        self.contained: list[str] = []
        self.done = threading.Semaphore(0)

    def on_advice(self, advice: IndexAdvice) -> None:
        self.advice.append(advice)

    def on_analysis(self, analysis: Analysis) -> None:
        self.analyses.append(analysis)
        self.done.release()

    def contain(self, stage: str) -> None:
        self.contained.append(stage)
        self.done.release()

    def wait(self, n: int, timeout: float = 10.0) -> None:
        for _ in range(n):
            assert self.done.acquire(timeout=timeout), "the advisor did not report in time"


def make(db: Engine, rec: Recorder, connect: Any = None, **options: Any) -> IndexAdvisor:
    return IndexAdvisor(
        connect or db.connect,
        "sqlite",
        on_advice=rec.on_advice,
        on_analysis=rec.on_analysis,
        contain=rec.contain,
        **options,
    )


def test_advice_arrives_once_per_fingerprint(db: Engine) -> None:
    """The same fingerprint submitted twice is analysed once; its advice is reported once."""
    rec = Recorder()
    advisor = make(db, rec)
    try:
        assert advisor.submit("SELECT * FROM adv_w WHERE a = ?", (5,), "f1", "app.py:1") is True
        assert advisor.submit("SELECT * FROM adv_w WHERE a = ?", (6,), "f1", "app.py:1") is False
        rec.wait(1)
        assert [(a.columns, a.source) for a in rec.advice] == [(("a",), "app.py:1")]
        assert advisor.analysed == 1
    finally:
        advisor.close()


def test_the_thread_starts_lazily_and_close_joins_it(db: Engine) -> None:
    """No thread before the first submit; close() stops and joins it; submit then refuses."""
    before = {t.name for t in threading.enumerate()}
    rec = Recorder()
    advisor = make(db, rec)
    assert {t.name for t in threading.enumerate()} == before
    advisor.submit("SELECT * FROM adv_w WHERE b = 3", None, "f2")
    rec.wait(1)
    thread = advisor._thread
    assert thread is not None and thread.is_alive()
    advisor.close(timeout=5)
    assert not thread.is_alive()
    assert advisor.submit("SELECT * FROM adv_w WHERE c = 3", None, "f3") is False


def test_a_full_queue_drops_without_blocking(db: Engine) -> None:
    """With the worker busy, submits beyond queue_size return False at once and are counted."""
    gate = threading.Event()
    rec = Recorder()

    def slow_connect() -> Connection:
        gate.wait(10)
        return db.connect()

    advisor = make(db, rec, connect=slow_connect, queue_size=2)
    try:
        advisor.submit("SELECT * FROM adv_w WHERE a = 1", None, "q0")
        deadline = time.monotonic() + 5
        while advisor._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)  # the worker has taken q0 and waits in connect()
        started = time.perf_counter()
        results = [
            advisor.submit(f"SELECT * FROM adv_w WHERE b = {i}", None, f"q{i}") for i in range(1, 6)
        ]
        elapsed = time.perf_counter() - started
        assert results == [True, True, False, False, False]
        assert advisor.dropped == 3
        assert elapsed < 0.5
        # A dropped fingerprint may come back later.
        gate.set()
        rec.wait(3)
        assert advisor.submit("SELECT * FROM adv_w WHERE b = 3", None, "q3") is True
        rec.wait(1)
    finally:
        gate.set()
        advisor.close()


def test_rate_limit_drops_over_budget_and_retries_later(db: Engine) -> None:
    """max_per_interval analyses per interval; the rest are dropped, wanted again, and may
    come back later."""
    now = [1000.0]
    rec = Recorder()
    advisor = make(db, rec, max_per_interval=2, interval=60.0, clock=lambda: now[0])
    try:
        for i, column in enumerate("abcd"):
            advisor.submit(f"SELECT * FROM adv_w WHERE {column} = 1", None, f"r{i}")
        rec.wait(2)
        deadline = time.monotonic() + 5
        while advisor.rate_limited < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert advisor.analysed == 2 and advisor.rate_limited == 2
        assert sorted(a.columns for a in rec.advice) == [("a",), ("b",)]
        # What was analysed is not wanted again; what the rate limit dropped is.
        assert [advisor.wants(f"r{i}") for i in range(4)] == [False, False, True, True]
        assert advisor.submit("SELECT * FROM adv_w WHERE a = 1", None, "r0") is False
        now[0] += 61.0
        assert advisor.submit("SELECT * FROM adv_w WHERE c = 1", None, "r2") is True
        rec.wait(1)
        assert advisor.analysed == 3
    finally:
        advisor.close()


def test_failures_are_contained_and_the_worker_goes_on(db: Engine) -> None:
    """A failing connect and a failing on_advice are contained by stage; later work proceeds."""
    rec = Recorder()
    calls = [0]

    def flaky() -> Connection:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("database is down")
        return db.connect()

    def bad_callback(advice: IndexAdvice) -> None:
        raise ValueError("callback broke")

    advisor = IndexAdvisor(
        flaky, "sqlite", on_advice=bad_callback, on_analysis=rec.on_analysis, contain=rec.contain
    )
    try:
        advisor.submit("SELECT * FROM adv_w WHERE a = 1", None, "x1")
        rec.wait(1)
        advisor.submit("SELECT * FROM adv_w WHERE e = 1", None, "x2")
        rec.wait(1)
        deadline = time.monotonic() + 5
        while len(rec.contained) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rec.contained == ["index_advice", "index_advice_callback"]
        assert advisor.failed == 1 and advisor.analysed == 1
    finally:
        advisor.close()


def test_the_seen_set_is_bounded(db: Engine) -> None:
    """Beyond max_fingerprints the oldest fingerprint is forgotten (memory stays bounded)."""
    rec = Recorder()
    advisor = make(db, rec, max_fingerprints=2)
    try:
        for fp in ("s1", "s2", "s3"):
            advisor.submit("SELECT * FROM adv_w WHERE a = 1", None, fp)
        rec.wait(3)
        assert len(advisor._seen) == 2
        assert advisor.submit("SELECT * FROM adv_w WHERE a = 1", None, "s1") is True
        rec.wait(1)
    finally:
        advisor.close()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("min_improvement", 0.5),
        ("queue_size", 0),
        ("max_per_interval", 0),
        ("interval", 0),
        ("statement_timeout", 0),
        ("max_fingerprints", 0),
    ],
)
def test_options_are_validated_eagerly(db: Engine, option: str, value: Any) -> None:
    """A bad option raises ValueError naming it, at construction."""
    with pytest.raises(ValueError, match=option):
        make(db, Recorder(), **{option: value})


def test_unknown_dialect_is_refused(db: Engine) -> None:
    """An unsupported dialect name raises ValueError at construction."""
    with pytest.raises(ValueError, match="dialect_name"):
        IndexAdvisor(db.connect, "oracle", on_advice=print, contain=print)
