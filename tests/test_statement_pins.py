"""Pins of the statement path: what the timed execution hook passes on, keeps and counts.

Written from the survivors of the ``statement`` mutation target (docs/reliability.md):
each test fails for a one-line change of ``Collector.timed``, ``Collector.failed``,
``Collector._miss`` or ``wrap_execution`` that the rest of the suite let through.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

import sqlprobe
from sqlprobe._core import _collector
from sqlprobe._core._collector import Collector
from sqlprobe._core._fingerprint import Shape
from sqlprobe._core._hold import LAST, SECONDS, STATEMENT, STATEMENTS


class Metrics:
    """A MetricsSink that records what it is told (the collector's own protocol)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def prepare(self, shape: Shape) -> str:
        return shape.fingerprint

    def observe(self, handle: Any, elapsed: float, rows: int, span: Any) -> None:
        self.calls.append(("observe", handle, rows, span))

    def observe_slow(self, handle: Any) -> None:
        self.calls.append(("slow", handle))

    def observe_error(self, handle: Any, error: str) -> None:
        self.calls.append(("error", handle, error))


class Cursor:
    description = None
    rowcount = 3


class Context:
    _rowcount = None


def collector(metrics: Metrics, **kw: Any) -> Collector:
    errors: list[str] = []
    made = Collector(
        engine_name="e",
        metrics=metrics,
        contain=errors.append,
        error_name=lambda exc: type(exc).__name__,
        slow_query_threshold=kw.pop("slow_query_threshold", 10.0),
        **kw,
    )
    made.errors = errors  # type: ignore[attr-defined]
    return made


@pytest.fixture
def engine(tmp_path: Any) -> Any:
    made = create_engine(f"sqlite:///{tmp_path}/pins.db", poolclass=QueuePool)
    with made.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)")
    yield made
    made.dispose()


EXECUTE_METHODS = ("do_execute", "do_executemany", "do_execute_no_params")


def spy_on_driver_calls(dialect: Any) -> dict[str, tuple[Any, ...]]:
    """Wrap the dialect instance's three execution methods (before any attach, so below
    sqlprobe): the last arguments each of them received, by method name."""
    reached: dict[str, tuple[Any, ...]] = {}

    def spy(name: str, original: Any) -> Any:
        def method(*args: Any) -> Any:
            reached[name] = args
            return original(*args)

        return method

    for name in EXECUTE_METHODS:
        setattr(dialect, name, spy(name, getattr(dialect, name)))
    return reached


def run_each_kind(engine: Engine) -> None:
    """One statement through each execution method, in one transaction."""
    with engine.begin() as conn:
        conn.execute(text("SELECT v FROM t WHERE id = :i"), {"i": 1})
        conn.execute(text("INSERT INTO t (v) VALUES (:v)"), [{"v": 1}, {"v": 2}])
        conn.execution_options(no_parameters=True).exec_driver_sql("SELECT 3")


def assert_each_kind_reached_with_its_context(reached: dict[str, tuple[Any, ...]]) -> None:
    """The driver calls of ``run_each_kind`` got their text, parameters and real context."""
    cursor, statement, parameters, context = reached["do_execute"]
    assert statement == "SELECT v FROM t WHERE id = ?" and parameters == (1,)
    assert context is not None and context.cursor is cursor
    cursor, statement, parameters, context = reached["do_executemany"]
    assert parameters == [(1,), (2,)] and context is not None and context.cursor is cursor
    cursor, statement, context = reached["do_execute_no_params"]
    assert statement == "SELECT 3" and context is not None and context.cursor is cursor


def _hold(conn: Any) -> list[Any]:
    record = conn.connection._connection_record
    (hold,) = [v for k, v in vars(record).items() if k.startswith("_sqlprobe_out_")]
    return hold  # type: ignore[no-any-return]


def test_every_statement_kind_adds_its_time_count_end_and_text_to_the_hold(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """execute, executemany, no-parameter and failed statements all go to the checkout's hold."""
    # A clock that moves one second per reading: each statement takes exactly 1 s.
    ticks = itertools.count(1000)
    monkeypatch.setattr(_collector, "perf_counter", lambda: float(next(ticks)))
    probe = sqlprobe.attach(engine, registry=CollectorRegistry())
    try:
        with engine.connect() as conn:
            hold = _hold(conn)
            before = hold[SECONDS]
            run = [
                lambda: conn.execute(text("SELECT v FROM t WHERE id = :i"), {"i": 1}),
                lambda: conn.execute(text("INSERT INTO t (v) VALUES (:v)"), [{"v": 1}, {"v": 2}]),
                lambda: conn.execution_options(no_parameters=True).exec_driver_sql("SELECT 1"),
                lambda: conn.exec_driver_sql("SELECT 2"),
            ]
            texts = [
                "SELECT v FROM t WHERE id = ?",
                "INSERT INTO t (v) VALUES (?)",
                "SELECT 1",
                "SELECT 2",
            ]
            for n, (statement, expected) in enumerate(zip(run, texts, strict=True), 1):
                statement()
                assert hold[STATEMENTS] == n
                assert hold[STATEMENT] == expected
                assert hold[SECONDS] - before == float(n)
                assert hold[LAST] == 1000.0 + 2 * n - 1  # the end of this statement
            with pytest.raises(Exception, match="no_such_table"):
                conn.exec_driver_sql("SELECT * FROM no_such_table")
            assert hold[STATEMENTS] == 5
            assert hold[STATEMENT] == "SELECT * FROM no_such_table"
            assert hold[SECONDS] - before == 5.0
            assert hold[LAST] == 1009.0
    finally:
        probe.detach()


def test_the_execution_context_reaches_the_dialect_methods_it_wraps(engine: Engine) -> None:
    """The wrapped do_execute / do_executemany / do_execute_no_params get the real context."""
    seen = spy_on_driver_calls(engine.dialect)
    probe = sqlprobe.attach(engine, registry=CollectorRegistry())
    try:
        run_each_kind(engine)
    finally:
        probe.detach()
    assert_each_kind_reached_with_its_context(seen)


def test_hooks_left_in_place_by_detach_pass_every_argument_through_and_count_nothing(
    engine: Engine,
) -> None:
    """Wrapped by someone after attach, detach leaves pass-throughs that measure nothing."""
    dialect = engine.dialect
    names = EXECUTE_METHODS
    reached = spy_on_driver_calls(dialect)  # below sqlprobe: what the driver call receives
    registry = CollectorRegistry()
    probe = sqlprobe.attach(engine, registry=registry, name="pins")

    def counted() -> float:
        return sum(
            s.value
            for m in registry.collect()
            for s in m.samples
            if s.name == "sqlprobe_statement_calls_total" and s.labels.get("engine") == "pins"
        )

    for name in names:  # someone wraps sqlprobe's hooks after attach
        ours = getattr(dialect, name)
        setattr(dialect, name, lambda *args, _ours=ours: _ours(*args))
    run_each_kind(engine)
    assert counted() == 3
    probe.detach()
    assert all(getattr(dialect, name).__name__ == "<lambda>" for name in names)
    reached.clear()
    run_each_kind(engine)
    assert counted() == 3  # totals kept, nothing more counted
    assert_each_kind_reached_with_its_context(reached)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 4
    for name in names:
        delattr(dialect, name)


def test_sqlcommenter_comments_every_kind_of_statement(engine: Engine) -> None:
    """With sqlcommenter on, execute, executemany and no-parameter statements carry it."""
    reached = spy_on_driver_calls(engine.dialect)
    probe = sqlprobe.attach(engine, registry=CollectorRegistry(), sqlcommenter="static")
    try:
        run_each_kind(engine)
    finally:
        probe.detach()
    sent = {name: args[1] for name, args in reached.items()}
    assert sent["do_execute"].startswith("SELECT v FROM t WHERE id = ? /*")
    assert sent["do_executemany"].startswith("INSERT INTO t (v) VALUES (?) /*")
    assert sent["do_execute_no_params"].startswith("SELECT 3 /*")
    assert all(s.endswith("*/") for s in sent.values())


def test_without_a_trace_step_every_statement_is_counted_with_its_rows() -> None:
    """No trace step (no OpenTelemetry): metrics see each statement, rows only for DML."""
    metrics = Metrics()
    made = collector(metrics)
    execute = made.timed(lambda *args: None, batched=False)
    context = Context()
    execute(Cursor(), "UPDATE t SET v = 1 WHERE id = 2", (), context)
    execute(Cursor(), "SELECT v FROM t", (), Context())
    assert metrics.calls == [
        ("observe", made._cache["UPDATE t SET v = 1 WHERE id = 2"][1], 3, None),
        ("observe", made._cache["SELECT v FROM t"][1], -1, None),
    ]
    assert context._rowcount == 3  # handed to SQLAlchemy: the driver is asked once
    assert made.errors == []  # type: ignore[attr-defined]


def test_a_rowcount_that_is_not_an_integer_is_reported_unknown() -> None:
    """A driver's non-integer rowcount gives rows -1 and leaves SQLAlchemy's own alone."""

    class Odd(Cursor):
        rowcount = "many"

    metrics = Metrics()
    made = collector(metrics)
    context = Context()
    made.timed(lambda *args: None, batched=False)(Odd(), "DELETE FROM t", (), context)
    assert [c[2] for c in metrics.calls] == [-1]
    assert context._rowcount is None


def test_the_unit_step_gets_the_statement_text_and_the_trace_step_the_context() -> None:
    """The N+1 step sees the original text; the trace step the execution context."""
    seen: list[tuple[Any, ...]] = []
    traced: list[tuple[Any, ...]] = []
    made = collector(
        Metrics(),
        unit=lambda *args: seen.append(args),
        trace=lambda *args: traced.append(args),
    )
    context = Context()
    made.timed(lambda *args: None, batched=True)(Cursor(), "SELECT 1", [(1,), (2,)], context)
    ((_shape, statement, got_context, parameters),) = seen
    assert statement == "SELECT 1" and got_context is context and parameters == [(1,), (2,)]
    ((_shape, _start, _elapsed, batch, trace_context, error),) = traced
    assert batch == 2 and trace_context is context and error is None


def test_a_failed_statement_reaches_trace_metrics_and_record_sinks_complete() -> None:
    """A failure: the error class, no rows, the span linked, the full record to sinks."""
    metrics = Metrics()
    traced: list[tuple[Any, ...]] = []
    records: list[Any] = []

    class Sink:
        stage = "capture"

        def on_statement(self, record: Any) -> None:
            records.append(record)

    def trace(*args: Any) -> str:
        traced.append(args)
        return "span"

    made = collector(metrics, trace=trace)
    made.add_sink(Sink())
    context = Context()

    def boom(*args: Any) -> None:
        raise ZeroDivisionError("boom")

    with pytest.raises(ZeroDivisionError):
        made.timed(boom, batched=True)(Cursor(), "SELECT 1", [(1,), (2,)], context)
    handle = made._cache["SELECT 1"][1]
    assert metrics.calls == [
        ("error", handle, "ZeroDivisionError"),
        ("observe", handle, -1, "span"),
    ]
    ((_shape, start, elapsed, batch, trace_context, error),) = traced
    assert trace_context is context and isinstance(error, ZeroDivisionError) and batch == 2
    assert 0 <= elapsed < 1
    (record,) = records
    assert record.statement == "SELECT 1" and record.start == start
    assert record.rows == -1 and record.batch_size == 2
    assert record.parameters == [(1,), (2,)] and record.context is context
    assert record.span == "span" and isinstance(record.error, ZeroDivisionError)


def test_a_failed_statement_adds_to_the_hold_of_its_checkout() -> None:
    """add_failed_to_hold adds the time, one statement, the end and the text."""

    class Record:
        pass

    record = Record()
    hold = [0.0] * 14
    hold[SECONDS], hold[STATEMENTS] = 1.0, 2
    vars(record)["k"] = hold
    context = Context()
    context._dbapi_connection = type("C", (), {"_connection_record": record})()  # type: ignore[attr-defined]
    _collector.add_failed_to_hold(context, "k", "SELECT 1", 10.0, 10.5)
    assert (hold[SECONDS], hold[STATEMENTS], hold[LAST], hold[STATEMENT]) == (
        1.5,
        3,
        10.5,
        "SELECT 1",
    )
    _collector.add_failed_to_hold(context, "", "SELECT 2", 11.0, 12.0)  # no hold kept
    assert hold[STATEMENTS] == 3


def test_the_text_cache_is_bounded_by_entries_and_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The oldest texts go first once the entry or character bound would be passed."""
    monkeypatch.setattr(_collector, "CACHE_MAX_ENTRIES", 3)
    monkeypatch.setattr(_collector, "CACHE_MAX_CHARS", 40)
    made = collector(Metrics())
    execute = made.timed(lambda *args: None, batched=False)
    texts = [f"SELECT {i}" for i in range(5)]  # 8 characters each
    for t in texts:
        execute(Cursor(), t, (), Context())
    assert list(made._cache) == texts[2:]
    assert made.cache_size() == (3, 24)
    long = "SELECT 'abcdefghijkl' FROM tbl1"  # 31 characters: 24 + 31 > 40, two must go
    execute(Cursor(), long, (), Context())
    assert list(made._cache) == [texts[4], long]
    assert made.cache_size() == (2, 39)
    monkeypatch.setattr(_collector, "CACHE_MAX_STATEMENT", 10)
    execute(Cursor(), "SELECT 123456789", (), Context())  # longer than 10: never cached
    assert made.cache_size() == (2, 39)
    execute(Cursor(), "SELECT 99", (), Context())  # 39 + 9 > 40: the oldest goes
    assert list(made._cache) == [long, "SELECT 99"]
    assert made.cache_size() == (2, 40)  # exactly at the bound is allowed


def test_statement_objects_that_are_not_text_are_cached_by_their_string() -> None:
    """A non-str statement (a driver's own object) is analyzed and cached as its str()."""

    class Statement:
        def __str__(self) -> str:
            return "SELECT 42"

    made = collector(Metrics())
    made.timed(lambda *args: None, batched=False)(Cursor(), Statement(), (), Context())  # type: ignore[arg-type]
    assert list(made._cache) == ["SELECT 42"]
    assert made.cache_size() == (1, 9)


def test_the_trace_gate_defaults_open_and_a_given_gate_is_the_one_read() -> None:
    """Without a gate every statement is traced; with one, only those at or after it."""
    traced: list[float] = []

    def trace(shape: Any, start: float, *rest: Any) -> None:
        traced.append(start)

    open_gate = collector(Metrics(), trace=trace)
    assert open_gate.trace_gate == [float("-inf")]
    open_gate.timed(lambda *args: None, batched=False)(Cursor(), "SELECT 1", (), Context())
    assert len(traced) == 1
    gate = [float("inf")]
    shut = collector(Metrics(), trace=trace, trace_gate=gate)
    assert shut.trace_gate is gate
    shut.timed(lambda *args: None, batched=False)(Cursor(), "SELECT 1", (), Context())
    assert len(traced) == 1
    gate[0] = float("-inf")
    shut.timed(lambda *args: None, batched=False)(Cursor(), "SELECT 1", (), Context())
    assert len(traced) == 2


def test_a_statement_without_an_execution_context_is_still_counted() -> None:
    """A dialect's own call with no context: counted with its rows, no internal error."""
    metrics = Metrics()
    made = collector(metrics)
    made.timed(lambda *args: None, batched=False)(Cursor(), "UPDATE t SET v = 1", (), None)
    assert metrics.calls == [("observe", made._cache["UPDATE t SET v = 1"][1], 3, None)]
    assert made.errors == []  # type: ignore[attr-defined]


def test_a_statement_exactly_at_the_threshold_is_slow_and_recorded_with_its_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """'At or over' the slow-query threshold, succeeded or failed; the record keeps start."""
    ticks = itertools.count(1000)
    monkeypatch.setattr(_collector, "perf_counter", lambda: float(next(ticks)))
    metrics = Metrics()
    records: list[Any] = []

    class Sink:
        stage = "slowlog"

        def on_statement(self, record: Any) -> None:
            records.append(record)

    made = collector(metrics, slow_query_threshold=1.0, slow_sinks=(Sink(),))
    made.timed(lambda *args: None, batched=False)(Cursor(), "SELECT 1", (), Context())
    handle = made._cache["SELECT 1"][1]
    assert ("slow", handle) in metrics.calls
    (record,) = records
    assert (record.start, record.duration) == (1000.0, 1.0)
    made.failed("SELECT 1", 5.0, 6.0, Context(), (), 0, ValueError("x"))
    assert metrics.calls.count(("slow", handle)) == 2
    assert records[1].start == 5.0 and records[1].error is not None


def test_a_failure_without_a_trace_step_links_no_span() -> None:
    """No trace step: the failed statement's observation carries no span (None)."""
    metrics = Metrics()
    made = collector(metrics)
    made.failed("SELECT 1", 1.0, 1.5, Context(), (), 0, KeyError("k"))
    handle = made._cache["SELECT 1"][1]
    assert metrics.calls == [("error", handle, "KeyError"), ("observe", handle, -1, None)]


def test_a_statement_as_long_as_the_cache_allows_is_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CACHE_MAX_STATEMENT is the longest text still cached."""
    monkeypatch.setattr(_collector, "CACHE_MAX_STATEMENT", 10)
    made = collector(Metrics())
    execute = made.timed(lambda *args: None, batched=False)
    execute(Cursor(), "SELECT 100", (), Context())  # 10 characters
    execute(Cursor(), "SELECT 1000", (), Context())  # 11 characters
    assert list(made._cache) == ["SELECT 100"]


def test_a_statement_starting_exactly_at_the_trace_gate_is_traced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trace step runs for statements that start at or after the gate."""
    ticks = itertools.count(1000)
    monkeypatch.setattr(_collector, "perf_counter", lambda: float(next(ticks)))
    traced: list[float] = []
    made = collector(
        Metrics(), trace=lambda _shape, start, *rest: traced.append(start), trace_gate=[1000.0]
    )
    made.timed(lambda *args: None, batched=False)(Cursor(), "SELECT 1", (), Context())
    assert traced == [1000.0]


# -- the hold across transactions (pool hooks; survivors of the pool target) -------------

SLOW = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
    "SELECT count(*) FROM c"
)


def test_each_transaction_of_a_checkout_has_its_own_idle_time(engine: Engine) -> None:
    """Idle in transaction counts only the transaction's own time without a statement."""
    from sqlprobe._core._hold import BEGUN, TXN_IDLE

    probe = sqlprobe.attach(engine, registry=CollectorRegistry())
    try:
        with engine.connect() as conn:
            hold = _hold(conn)
            trans = conn.begin()  # busy: a slow statement, no idle time to speak of
            conn.exec_driver_sql(SLOW)
            statement_end = hold[LAST]
            trans.commit()
            assert hold[LAST] > statement_end  # the COMMIT is statement time: its end
            first = hold[TXN_IDLE]
            assert hold[BEGUN] is None
            assert 0.0 <= first < 0.1
            end_of_commit = hold[LAST]
            assert end_of_commit > 0.0
            with conn.begin():  # idle: a sleep between two quick statements
                conn.exec_driver_sql("SELECT 1")
                time.sleep(0.3)
                conn.exec_driver_sql("SELECT 2")
            assert hold[BEGUN] is None
            assert hold[LAST] > end_of_commit  # the COMMIT's end
            # The first transaction's slow statement (about 0.4 s) is not in it.
            assert 0.25 <= hold[TXN_IDLE] < 1.5
            idle = hold[TXN_IDLE]
            with conn.begin():  # busy again: the most idle transaction is kept
                conn.exec_driver_sql("SELECT 1")
            assert hold[TXN_IDLE] == idle
            before = hold[LAST]
            trans = conn.begin()
            conn.exec_driver_sql("SELECT 3")
            statement_end = hold[LAST]
            assert statement_end > before
            trans.rollback()
            assert hold[BEGUN] is None and hold[LAST] > statement_end  # the ROLLBACK's end
    finally:
        probe.detach()


def test_a_rolled_back_transaction_has_its_own_idle_time_too(engine: Engine) -> None:
    """A ROLLBACK ends its transaction's idle time as a COMMIT does, busy or idle."""
    from sqlprobe._core._hold import BEGUN, TXN_IDLE

    probe = sqlprobe.attach(engine, registry=CollectorRegistry())
    try:
        with engine.connect() as conn:
            hold = _hold(conn)
            with conn.begin():  # busy: statement time the later ones must not subtract
                conn.exec_driver_sql(SLOW)
            assert hold[TXN_IDLE] < 0.1
            trans = conn.begin()  # idle, rolled back
            conn.exec_driver_sql("SELECT 1")
            time.sleep(0.3)
            trans.rollback()
            assert hold[BEGUN] is None
            assert 0.25 <= hold[TXN_IDLE] < 1.5
            idle = hold[TXN_IDLE]
            trans = conn.begin()  # busy, rolled back: less idle than the one kept
            conn.exec_driver_sql(SLOW)
            trans.rollback()
            assert hold[TXN_IDLE] == idle
    finally:
        probe.detach()
