"""Behaviours that mutants of the statement path, fingerprints, exporters and pool
metrics survived (``bash scripts/mutation.sh``): each pinned through what a user sees,
the registry's samples, the shapes and the records, so the tests outlive refactors."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from structlog.testing import LogCapture

import sqlprobe
from sqlprobe._core._fingerprint import UNPARSED, analyze, normalize

# ------------------------------------------------------------------------ fingerprints


def test_lowercase_string_prefixes_are_dropped_with_their_literal() -> None:
    """``e'..'``, ``n'..'``, ``b'..'`` and ``x'..'`` normalize like their uppercase forms."""
    assert normalize("SELECT e'a\\'b', n'x', b'01', x'ff'") == "SELECT ?, ?, ?, ?"


def test_doubled_quotes_in_a_quoted_table_name_are_unescaped() -> None:
    """A table named with a doubled quote or backtick is reported with a single one."""
    assert analyze('SELECT * FROM "we""ird"').table == 'we"ird'
    assert analyze("SELECT * FROM `we``ird`").table == "we`ird"


def test_text_holding_every_private_use_mark_still_normalizes() -> None:
    """A statement that leaves no free marker character is normalized, not given up on."""
    marks = "".join(chr(c) for c in range(0xF8F8, 0xF900))
    shape = analyze(f"SELECT X, \"a 1\" FROM t WHERE c = '{marks}'")
    assert shape.normalized != UNPARSED
    assert shape.normalized.startswith("SELECT X, ")
    assert shape.normalized.endswith(" FROM t WHERE c = ?")


@pytest.mark.parametrize("n", [1500, 4000])
def test_very_long_placeholder_lists_collapse(n: int) -> None:
    """IN lists of thousands of bare placeholders collapse to one element."""
    placeholders = ", ".join(["?"] * n)
    assert normalize(f"SELECT * FROM t WHERE id IN ({placeholders})") == (
        "SELECT * FROM t WHERE id IN (?)"
    )


@pytest.mark.parametrize("n", [100, 200])
def test_a_list_that_cannot_collapse_does_not_stop_later_ones(n: int) -> None:
    """An IN list with a column in it is kept, and a long list after it still collapses."""
    placeholders = ", ".join(["?"] * n)
    assert normalize(f"SELECT * FROM t WHERE a IN (?, ?, b) AND c IN ({placeholders})") == (
        "SELECT * FROM t WHERE a IN (?, ?, b) AND c IN (?)"
    )


def test_with_statement_without_a_main_verb_is_other() -> None:
    """A WITH clause followed by no statement verb is OTHER, with no table."""
    shape = analyze("WITH x AS (SELECT 1 FROM t)")
    assert (shape.operation, shape.table) == ("OTHER", "")


def test_with_statement_past_the_candidate_bound_is_other_not_unparsed() -> None:
    """A WITH clause hiding its verb behind 10,000+ candidates gives OTHER, still normalized."""
    body = "SELECT 1 UNION ALL " * 10_001
    shape = analyze(f"WITH a AS ({body}SELECT 1) SELECT * FROM a")
    assert shape.normalized != UNPARSED
    assert shape.normalized.endswith(") SELECT * FROM a")
    assert shape.operation == "OTHER"


def test_quoted_names_past_the_bound_are_normalized_like_code() -> None:
    """Only the first 1,000 quoted names holding digits keep them; later ones are code."""
    names = ", ".join(f'"c {i}"' for i in range(1001))
    normalized = normalize(f"SELECT {names} FROM t")
    assert normalized.startswith('SELECT "c 0", "c 1", ')
    assert normalized.endswith(', "c 998", "c 999", "c ?" FROM t')


def test_big_statements_collapse_lists_and_whitespace_like_small_ones() -> None:
    """Past 64 KiB, IN lists still collapse to ``(?)`` and whitespace runs to one space."""
    pad = "x" * 70_000
    shape = analyze(f"SELECT  a,\n\t{pad} FROM t WHERE b IN (1, 2, 3) AND c IN (?, ?)\n")
    assert shape.normalized == f"SELECT a, {pad} FROM t WHERE b IN (?) AND c IN (?)"
    assert shape.table == "t"


def test_big_statement_with_an_unterminated_mixed_list_keeps_every_element() -> None:
    """Past 64 KiB, an IN list of numbers and placeholders with no ``)`` keeps each element."""
    pad = " " * 70_000
    assert normalize(f"SELECT a FROM t WHERE b IN (1, ?, 2 AND c = 1{pad}") == (
        "SELECT a FROM t WHERE b IN (?, ?, ? AND c = ?"
    )


def test_only_real_string_prefixes_are_cut() -> None:
    """``u&``/``U&`` are cut; names ending in a prefix letter, ``X&``, a long ``_word`` are not."""
    assert normalize("SELECT u&'d\\0061t', U&'x'") == "SELECT ?, ?"
    assert normalize("SELECT date'2024-01-01', a_e'x', a$e'y'") == "SELECT date?, a_e?, a$e?"
    assert normalize("SELECT X&'1', a&'1' FROM t") == "SELECT X&?, a&? FROM t"
    assert normalize("SELECT BOXXXX'a'") == "SELECT BOXXXX?"
    assert normalize("SELECT _" + "a" * 31 + "'x'") == "SELECT ?"
    assert normalize("SELECT _" + "a" * 32 + "'x'") == "SELECT _" + "a" * 32 + "?"


@pytest.mark.parametrize("free", [1, 2])
def test_text_leaving_one_or_two_free_marks_still_normalizes(free: int) -> None:
    """With two free marker characters prefixes and quoted names are kept; with one, not."""
    marks = "".join(chr(c) for c in range(0xF8FF, 0xF8F7, -1))[: 8 - free]
    normalized = normalize(f"SELECT E'x', \"c 1\" FROM t -- {marks}")
    expected = {1: 'SELECT E?, "c ?" FROM t', 2: 'SELECT ?, "c 1" FROM t'}
    assert normalized == expected[free]


def test_in_lists_collapse_whatever_their_spacing_and_order() -> None:
    """Every IN list collapses: ``IN (``, ``IN(``, and tuples written ``( (``."""
    assert normalize("SELECT * FROM t WHERE a IN (1, 2) AND b IN (3, 4)") == (
        "SELECT * FROM t WHERE a IN (?) AND b IN (?)"
    )
    assert normalize("SELECT * FROM t WHERE a IN(1, 2) AND b IN(3, 4)") == (
        "SELECT * FROM t WHERE a IN(?) AND b IN(?)"
    )
    assert normalize("SELECT * FROM t WHERE (a, b) IN ( (1, 2), (3, 4) )") == (
        "SELECT * FROM t WHERE (a, b) IN ((?, ?))"
    )


def test_values_and_arrays_collapse_wherever_they_stand() -> None:
    """A statement starting with VALUES, and arrays before a later ``array`` word, collapse."""
    assert analyze("VALUES (1, 2), (3, 4)")[1:] == ("VALUES (?, ?)", "SELECT", "")
    assert normalize("INSERT INTO t (a) VALUES (1), (2) RETURNING t.values_count") == (
        "INSERT INTO t (a) VALUES (?) RETURNING t.values_count"
    )
    assert normalize("INSERT INTO t (a) VALUES (ARRAY[1, 2, 3])") == (
        "INSERT INTO t (a) VALUES (ARRAY[?])"
    )
    assert normalize("SELECT ARRAY[1, 2] AS a, ARRAY[3, 4] AS b") == (
        "SELECT ARRAY[?] AS a, ARRAY[?] AS b"
    )


def test_only_semicolons_and_spaces_are_stripped_from_the_end() -> None:
    """``SELECT * FROM BOX;`` keeps its table name whole."""
    assert analyze("SELECT * FROM BOX;")[1:] == ("SELECT * FROM BOX", "SELECT", "BOX")


@pytest.mark.parametrize(
    ("statement", "table"),
    [
        ("WITH a AS (SELECT x FROM u) SELECT 1", ""),
        ("(SELECT a FROM t) UNION SELECT b FROM u", "t"),
        ("(SELECT 1) UNION SELECT a FROM t", ""),
        ("SELECT * FROM (SELECT a FROM t UNION SELECT b FROM u) AS x", "t"),
        ("SELECT * FROM (SELECT 1) AS x", ""),
        ("SELECT (SELECT a FROM t), (SELECT b FROM v) FROM u WHERE c IN (SELECT d FROM w)", "u"),
        ("SELECT * " + "FROM (" * 10_001, ""),
    ],
)
def test_select_table_is_the_shallowest_from_of_the_main_select(statement: str, table: str) -> None:
    """The SELECT's table: its own shallowest FROM, the first at that depth, else ``""``."""
    assert analyze(statement).table == table


def test_statement_objects_are_read_through_str_or_named_by_their_type() -> None:
    """A SQLAlchemy ``text()`` is normalized from ``str()``; an unprintable object by type name."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert normalize(text("SELECT * FROM t WHERE a = 1")) == "SELECT * FROM t WHERE a = ?"  # type: ignore[arg-type]
    assert normalize(Unprintable()) == "Unprintable"  # type: ignore[arg-type]


def test_a_failure_inside_the_normalizer_reports_no_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal failure gives the UNPARSED shape with operation OTHER and table ``""``."""
    from sqlprobe._core import _fingerprint

    def broken(text: str) -> str:
        raise ValueError("bug")

    monkeypatch.setattr(_fingerprint, "_tokenize", broken)
    assert analyze("SELECT * FROM t")[1:] == (UNPARSED, "OTHER", "")


def test_truncation_starts_past_the_limit_and_keeps_the_prefix() -> None:
    """A statement of exactly NORMALIZE_LIMIT characters is whole; one more is truncated."""
    from sqlprobe._core._fingerprint import NORMALIZE_LIMIT

    head = "SELECT a FROM t WHERE b = 1 OR c = "
    whole = head + "d" * (NORMALIZE_LIMIT - len(head))
    assert normalize(whole) == head.replace("1", "?") + "d" * (NORMALIZE_LIMIT - len(head))
    cut = normalize(whole + "d")
    assert cut.startswith(head.replace("1", "?"))
    assert cut.endswith("d /* truncated */")


# ---------------------------------------------------------------------- statement path


def test_explain_plans_the_raw_statement_the_driver_ran(
    tmp_path: Path, registry: CollectorRegistry, logs: LogCapture, logger: Any
) -> None:
    """The record carries the raw statement text: EXPLAIN (and index advice) plan it."""
    engine = create_engine(f"sqlite:///{tmp_path / 'raw.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT)"))
        probe = sqlprobe.attach(
            engine, registry=registry, logger=logger, slow_query_threshold=0, explain=True
        )
        with engine.connect() as conn:
            conn.execute(text("SELECT v FROM items WHERE v = :v"), {"v": "7"}).all()
        deadline = time.monotonic() + 10.0
        while True:
            events = [
                e
                for e in logs.entries
                if e["event"] == "slow_query" and e["statement"].startswith("SELECT v FROM")
            ]
            if events or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        probe.detach()
        (event,) = events
        assert event["plan"]["node"] == "SCAN items"
        assert event["plan"]["seq_scans"] == ["items"]
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------- exporters
# Multiprocess mode writes every series through prometheus_client's metric objects too.
# Its tests with worker processes import the unmutated package, so the series is also
# driven here in-process (where the objects keep their values in memory) and read
# through a fresh registry.

MP_BOUNDS = (0.001, 0.01, 0.1)


def _mp_registry(series: Any) -> CollectorRegistry:
    """A fresh registry holding the multiprocess metric objects behind ``series``."""
    registry = CollectorRegistry()
    for metric in series.metrics._made.values():
        registry.register(metric)
    return registry


def test_multiprocess_statement_series_are_written_through() -> None:
    """In multiprocess mode calls, seconds, rows, info, durations, slow and errors are exact."""
    from sqlprobe._sinks._multiprocess import MultiprocessExporter

    exporter = MultiprocessExporter()
    series = exporter.engine_series("db", MP_BOUNDS, 2)
    select, update = analyze("SELECT a FROM t WHERE id = 1"), analyze("UPDATE t SET a = 1")
    first = series.prepare(select)
    series.observe(first, 0.005, 3, None)
    series.observe(first, 0.05, -1, None)  # a failed statement reports no rows
    series.observe(first, 0.0002, 1, None)
    series.observe_slow(first)
    second = series.prepare(update)
    series.observe(second, 0.0005, 2, None)
    series.observe_error(second, "IntegrityError")
    beyond = series.prepare(analyze("DELETE FROM t WHERE id = 2"))
    series.observe(beyond, 2.0, 4, None)
    series.observe_error(beyond, "IntegrityError")
    for n in range(49):
        series.observe_error(second, f"Error{n}")
    series.observe_error(second, "OneTooMany")
    for n in range(50):
        series.connect_failed(f"ConnectError{n}")
    exporter.internal_error("collector")
    reg = _mp_registry(series)

    def value(name: str, **labels: str) -> float | None:
        return reg.get_sample_value(name, {"engine": "db", **labels})

    fp, fp2 = select.fingerprint, update.fingerprint
    assert value("sqlprobe_statement_calls_total", fingerprint=fp) == 3
    assert value("sqlprobe_statement_seconds_total", fingerprint=fp) == pytest.approx(0.0552)
    assert value("sqlprobe_statement_rows_total", fingerprint=fp) == 4
    assert value("sqlprobe_statement_calls_total", fingerprint=fp2) == 1
    assert value("sqlprobe_statement_rows_total", fingerprint=fp2) == 2
    assert value("sqlprobe_statement_calls_total", fingerprint="_other") == 1
    assert value("sqlprobe_statement_seconds_total", fingerprint="_other") == 2.0
    assert value("sqlprobe_statement_rows_total", fingerprint="_other") == 4
    info = {"fingerprint": fp, "operation": "SELECT", "table": "t", "statement": select.normalized}
    assert value("sqlprobe_statement_info", **info) == 1
    assert value("sqlprobe_query_duration_seconds_bucket", operation="SELECT", le="0.001") == 1
    assert value("sqlprobe_query_duration_seconds_bucket", operation="SELECT", le="0.01") == 2
    assert value("sqlprobe_query_duration_seconds_bucket", operation="SELECT", le="0.1") == 3
    assert value("sqlprobe_query_duration_seconds_sum", operation="SELECT") == pytest.approx(0.0552)
    assert value("sqlprobe_query_duration_seconds_bucket", operation="DELETE", le="0.1") == 0
    assert value("sqlprobe_query_duration_seconds_count", operation="DELETE") == 1
    assert value("sqlprobe_slow_queries_total", operation="SELECT") == 1
    assert value("sqlprobe_slow_queries_total", operation="UPDATE") == 0
    assert value("sqlprobe_slow_queries_total", operation="INSERT") == 0
    assert value("sqlprobe_query_errors_total", operation="UPDATE", error="IntegrityError") == 1
    assert value("sqlprobe_query_errors_total", operation="DELETE", error="IntegrityError") == 1
    assert value("sqlprobe_query_errors_total", operation="UPDATE", error="Error48") == 1
    assert value("sqlprobe_query_errors_total", operation="UPDATE", error="_other") == 1
    assert value("sqlprobe_query_errors_total", operation="UPDATE", error="OneTooMany") is None
    assert reg.get_sample_value("sqlprobe_internal_errors_total", {"stage": "collector"}) == 1
    errors = "sqlprobe_pool_connect_errors_total"
    assert reg.get_sample_value(errors, {"engine": "db", "error": "_other"}) == 50
    # This process's view (what Probe.statements() reads) has the same shapes.
    own = CollectorRegistry()
    own.register(exporter)
    assert own.get_sample_value("sqlprobe_statement_info", {"engine": "db", **info}) == 1
    (other,) = series.other.values()
    assert (other.fingerprint, other.statement) == ("_other", "(shapes beyond max_fingerprints)")
    # Each metric object has its family's help text (the aggregate shows it) and mode.
    from sqlprobe._sinks._families import BY_NAME

    for (name, _bounds), metric in series.metrics._made.items():
        spec = BY_NAME[name]
        assert metric._documentation == spec.help
        if spec.kind == "gauge":
            assert metric._multiprocess_mode == spec.multiprocess_mode


def test_multiprocess_detections_and_advice_are_written_through() -> None:
    """In multiprocess mode N+1 counts (unknown shapes under _other) and advice are exported."""
    from sqlprobe._sinks._multiprocess import MultiprocessExporter
    from sqlprobe._sinks._prometheus import MAX_N_PLUS_ONE_SERIES

    exporter = MultiprocessExporter()
    series = exporter.engine_series("db", MP_BOUNDS, 2)
    select = analyze("SELECT a FROM t WHERE id = 1")
    series.prepare(select)
    series.detected(select.fingerprint, "User.orders")
    series.detected(select.fingerprint, "User.orders")
    series.detected("0123456789abcdef", "User.items")
    series.advised("t", "a", False)
    series.advised("t", "c", True)
    series.advised("t", "b", True)  # beyond max_fingerprints (2): not exported
    for n in range(MAX_N_PLUS_ONE_SERIES - 2):  # the series limit, then one more pair
        series.detected(select.fingerprint, f"Rel.r{n}")
    series.detected(select.fingerprint, "User.addresses")
    reg = _mp_registry(series)
    n_plus_one = "sqlprobe_n_plus_one_total"
    labels = {"engine": "db", "fingerprint": select.fingerprint, "relationship": "User.orders"}
    assert reg.get_sample_value(n_plus_one, labels) == 2
    other = {"engine": "db", "fingerprint": "_other", "relationship": "User.items"}
    assert reg.get_sample_value(n_plus_one, other) == 1
    overflow = {"engine": "db", "fingerprint": "_other", "relationship": ""}
    assert reg.get_sample_value(n_plus_one, overflow) == 1
    last = {**labels, "relationship": f"Rel.r{MAX_N_PLUS_ONE_SERIES - 3}"}
    assert reg.get_sample_value(n_plus_one, last) == 1
    assert reg.get_sample_value(n_plus_one, {**labels, "relationship": "User.addresses"}) is None
    advice = {"engine": "db", "table": "t", "columns": "a", "proven": "false"}
    assert reg.get_sample_value("sqlprobe_index_advice_info", advice) == 1
    proven = {**advice, "columns": "c", "proven": "true"}
    assert reg.get_sample_value("sqlprobe_index_advice_info", proven) == 1
    beyond = {**advice, "columns": "b", "proven": "true"}
    assert reg.get_sample_value("sqlprobe_index_advice_info", beyond) is None


def test_multiprocess_pool_series_are_written_through() -> None:
    """In multiprocess mode the pool histograms, counters and gauges are written per event."""
    from sqlprobe._sinks._multiprocess import MultiprocessExporter

    exporter = MultiprocessExporter()
    series = exporter.engine_series("db", MP_BOUNDS, 10)
    state = [(2, 1, 5)]
    series.add_pool(lambda: state[0], True)
    series.checkout(0.002)
    series.connected(0.003)
    series.connect_failed("OperationalError")
    series.timeout()
    series.invalidated()
    series.transaction("commit", 0.05)
    series.transaction("rollback", 0.5)
    series.idle(0.005)
    series.unit("GET /a", 3, 0.01, 0.002, 1)
    series.unit("GET /b", 1, 0.001, 0.0, 1)
    reg = _mp_registry(series)

    def value(name: str, **labels: str) -> float | None:
        return reg.get_sample_value(name, {"engine": "db", **labels})

    assert value("sqlprobe_pool_checkout_wait_seconds_bucket", le="0.001") == 0
    assert value("sqlprobe_pool_checkout_wait_seconds_bucket", le="0.01") == 1
    assert value("sqlprobe_pool_checkout_wait_seconds_sum") == 0.002
    assert value("sqlprobe_pool_connect_seconds_sum") == 0.003
    assert value("sqlprobe_pool_connects_total") == 1
    assert value("sqlprobe_pool_connect_errors_total", error="OperationalError") == 1
    assert value("sqlprobe_pool_checkout_timeouts_total") == 1
    assert value("sqlprobe_pool_invalidations_total") == 1
    assert value("sqlprobe_transaction_duration_seconds_bucket", outcome="commit", le="0.1") == 1
    assert value("sqlprobe_transaction_duration_seconds_bucket", outcome="rollback", le="0.1") == 0
    assert value("sqlprobe_transaction_duration_seconds_count", outcome="rollback") == 1
    assert value("sqlprobe_pool_connection_idle_seconds_sum") == 0.005
    assert value("sqlprobe_scope_statements_sum", route="GET /a") == 3
    assert value("sqlprobe_scope_statements_bucket", route="GET /a", le="2.0") == 0
    assert value("sqlprobe_scope_statements_bucket", route="GET /a", le="3.0") == 1
    assert value("sqlprobe_scope_db_seconds_sum", route="GET /a") == 0.01
    assert value("sqlprobe_scope_pool_wait_seconds_sum", route="GET /a") == 0.002
    assert value("sqlprobe_scope_statements_sum", route="_other") == 1
    assert value("sqlprobe_scope_db_seconds_sum", route="_other") == 0.001
    assert value("sqlprobe_scope_statements_count", route="GET /b") is None
    # Gauges: what the pool reports, the last checkout's view.
    assert value("sqlprobe_pool_connections", state="idle") == 2
    assert value("sqlprobe_pool_connections", state="used") == 1
    assert value("sqlprobe_pool_max_connections") == 5
    assert value("sqlprobe_pool_peak_connections") == 1


def test_multiprocess_checkin_counts_the_returned_connection_as_idle() -> None:
    """A check-in's gauges show the connection back in the pool, or closed by a NullPool."""
    from sqlprobe._sinks._multiprocess import MultiprocessExporter

    exporter = MultiprocessExporter()
    series = exporter.engine_series("db", MP_BOUNDS, 10)
    state = [(3, 0, 5)]
    series.add_pool(lambda: state[0], True)
    labels = {"engine": "db"}
    assert _mp_registry(series).get_sample_value("sqlprobe_pool_peak_connections", labels) == 0
    state[0] = (2, 1, 5)  # checked out, and now being checked in
    series.checkin(0.02)
    reg = _mp_registry(series)
    assert reg.get_sample_value("sqlprobe_pool_connections", {**labels, "state": "idle"}) == 3
    assert reg.get_sample_value("sqlprobe_pool_connections", {**labels, "state": "used"}) == 0
    assert reg.get_sample_value("sqlprobe_pool_peak_connections", labels) == 1
    assert reg.get_sample_value("sqlprobe_pool_connection_use_seconds_sum", labels) == 0.02
    series.checkin(0.03)  # a check-in as the hooks report it: use, then idle
    series.idle(0.004)
    reg = _mp_registry(series)
    assert reg.get_sample_value("sqlprobe_pool_connection_use_seconds_count", labels) == 2
    assert reg.get_sample_value("sqlprobe_pool_connection_use_seconds_sum", labels) == 0.05
    assert reg.get_sample_value("sqlprobe_pool_connection_idle_seconds_sum", labels) == 0.004
    assert reg.get_sample_value("sqlprobe_pool_connections", {**labels, "state": "idle"}) == 3
    state[0] = (3, 0, 5)  # a pool that already counts the connection as returned
    series.checkin(0.01)
    reg = _mp_registry(series)
    assert reg.get_sample_value("sqlprobe_pool_connections", {**labels, "state": "idle"}) == 3
    assert reg.get_sample_value("sqlprobe_pool_connections", {**labels, "state": "used"}) == 0

    nullpool = MultiprocessExporter().engine_series("null", MP_BOUNDS, 10)
    nullpool.add_pool(lambda: (0, 1, None), False)
    nullpool.checkin(0.02)
    reg = _mp_registry(nullpool)
    labels = {"engine": "null"}
    assert reg.get_sample_value("sqlprobe_pool_connections", {**labels, "state": "idle"}) == 0
    assert reg.get_sample_value("sqlprobe_pool_connections", {**labels, "state": "used"}) == 0
    assert reg.get_sample_value("sqlprobe_pool_max_connections", labels) == 0


def test_multiprocess_peak_covers_the_current_and_the_previous_minute() -> None:
    """The peak gauge is the most in use in this minute or the previous one, then forgets."""
    from sqlprobe._sinks._multiprocess import MultiprocessExporter

    exporter = MultiprocessExporter()
    series = exporter.engine_series("db", MP_BOUNDS, 10)
    state = [(0, 3, 5)]
    series.add_pool(lambda: state[0], True)
    labels = {"engine": "db"}

    def peak() -> float | None:
        return _mp_registry(series).get_sample_value("sqlprobe_pool_peak_connections", labels)

    assert peak() == 3
    state[0] = (2, 1, 5)
    series.checkout(0.001)
    assert peak() == 3  # same window
    series._peak_window[0] -= 60.5  # a minute later: the previous minute still counts
    series.checkout(0.001)
    assert peak() == 3
    assert series._peak_window[1:] == [1, 3]
    state[0] = (0, 4, 5)
    series.checkout(0.001)
    assert peak() == 4
    series._peak_window[0] -= 120.5  # two minutes with no event: both are forgotten
    state[0] = (2, 1, 5)
    series.checkout(0.001)
    assert peak() == 1
    assert series._peak_window[1:] == [1, 0]
    series._peak_window[0] -= 60.5  # a minute in which nothing was in use
    state[0] = (3, 0, 5)
    series.invalidated()
    assert series._peak_window[1:] == [0, 1]


def _exported(name: str = "db", max_fingerprints: int = 10) -> tuple[Any, Any, CollectorRegistry]:
    """A single-process exporter on a fresh registry, and the series of engine ``name``."""
    from sqlprobe._sinks._prometheus import PrometheusExporter

    exporter = PrometheusExporter()
    registry = CollectorRegistry()
    registry.register(exporter)
    return exporter, exporter.engine_series(name, MP_BOUNDS, max_fingerprints), registry


def test_pool_gauges_add_up_the_live_pools_of_a_name() -> None:
    """Idle, used and max sum over live pools; an unbounded or no live pool drops the max."""
    _exporter, series, registry = _exported()
    labels = {"engine": "db"}

    def gauges() -> tuple[float | None, float | None, float | None]:
        return (
            registry.get_sample_value("sqlprobe_pool_connections", {**labels, "state": "idle"}),
            registry.get_sample_value("sqlprobe_pool_connections", {**labels, "state": "used"}),
            registry.get_sample_value("sqlprobe_pool_max_connections", labels),
        )

    assert gauges() == (0, 0, None)
    first, second, gone = (lambda: (2, 1, 5)), (lambda: (1, 2, 3)), (lambda: None)
    series.add_pool(first, True)
    series.add_pool(gone, True)
    assert gauges() == (2, 1, 5)
    series.add_pool(second, True)
    assert gauges() == (3, 3, 8)
    assert series.pool_snapshot() == (3, 3, 8, 2)

    def unbounded() -> tuple[int, int, None]:
        return (0, 4, None)

    series.add_pool(unbounded, False)
    assert gauges() == (3, 7, None)
    series.remove_pool(unbounded)
    series.remove_pool(first)
    assert gauges() == (1, 2, 3)
    assert series.pool_snapshot() == (1, 2, 3, 1)


def test_peak_gauge_sums_each_pool_peak_taken_at_the_scrape() -> None:
    """The peak is the sum of each pool's peak read at the scrape; no pool, no sample."""
    _exporter, series, registry = _exported()
    labels = {"engine": "db"}
    assert registry.get_sample_value("sqlprobe_pool_peak_connections", labels) is None
    first, second = (lambda: 2), (lambda: 3)
    series.add_peak(first)
    series.add_peak(second)
    assert registry.get_sample_value("sqlprobe_pool_peak_connections", labels) == 5
    series.remove_peak(second)
    assert registry.get_sample_value("sqlprobe_pool_peak_connections", labels) == 2


def test_pool_counters_and_histograms_are_exact() -> None:
    """Every pool event lands in its own series with its exact value."""
    _exporter, series, registry = _exported()
    for _ in range(2):  # twice each: a count or sum that is set instead of added shows
        series.checkout(0.002)
        series.checkin(0.02)
        series.connected(0.003)
        series.connect_failed("OperationalError")
        series.timeout()
        series.invalidated()
        series.transaction("commit", 0.05)
        series.idle(0.005)
        series.checkin(0.03)
        series.idle(0.0004)
    series.connected(0.0005)
    series.transaction("rollback", 0.5)
    series.unit("GET /a", 3, 0.01, 0.002, 1)
    series.unit("GET /a", 2, 0.02, 0.0, 1)
    series.unit("GET /b", 1, 0.001, 0.0, 1)
    series.unit("GET /c", 4, 0.002, 0.0, 1)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"engine": "db", **labels})

    assert value("sqlprobe_pool_checkout_wait_seconds_bucket", le="0.001") == 0
    assert value("sqlprobe_pool_checkout_wait_seconds_bucket", le="0.01") == 2
    assert value("sqlprobe_pool_checkout_wait_seconds_sum") == 0.004
    assert value("sqlprobe_pool_connection_use_seconds_count") == 4
    assert value("sqlprobe_pool_connection_use_seconds_sum") == pytest.approx(0.1)
    assert value("sqlprobe_pool_connection_use_seconds_bucket", le="0.01") == 0
    assert value("sqlprobe_pool_connection_use_seconds_bucket", le="0.1") == 4
    assert value("sqlprobe_pool_connection_idle_seconds_bucket", le="0.001") == 2
    assert value("sqlprobe_pool_connection_idle_seconds_bucket", le="0.01") == 4
    assert value("sqlprobe_pool_connection_idle_seconds_sum") == pytest.approx(0.0108)
    assert value("sqlprobe_pool_connect_seconds_count") == 3
    assert value("sqlprobe_pool_connect_seconds_bucket", le="0.001") == 1
    assert value("sqlprobe_pool_connect_seconds_bucket", le="0.01") == 3
    assert value("sqlprobe_pool_connects_total") == 3
    assert value("sqlprobe_pool_connect_errors_total", error="OperationalError") == 2
    assert value("sqlprobe_pool_checkout_timeouts_total") == 2
    assert value("sqlprobe_pool_invalidations_total") == 2
    assert value("sqlprobe_transaction_duration_seconds_bucket", outcome="commit", le="0.1") == 2
    assert value("sqlprobe_transaction_duration_seconds_sum", outcome="commit") == 0.1
    assert value("sqlprobe_transaction_duration_seconds_sum", outcome="rollback") == 0.5
    assert value("sqlprobe_transaction_duration_seconds_bucket", outcome="rollback", le="0.1") == 0
    assert value("sqlprobe_scope_statements_count", route="GET /a") == 2
    assert value("sqlprobe_scope_statements_sum", route="GET /a") == 5
    assert value("sqlprobe_scope_statements_bucket", route="GET /a", le="2.0") == 1
    assert value("sqlprobe_scope_db_seconds_sum", route="GET /a") == pytest.approx(0.03)
    assert value("sqlprobe_scope_pool_wait_seconds_sum", route="GET /a") == 0.002
    assert value("sqlprobe_scope_statements_count", route="_other") == 2
    assert value("sqlprobe_scope_statements_sum", route="_other") == 5
    assert value("sqlprobe_scope_statements_count", route="GET /b") is None


def test_statement_series_and_their_bounds_are_exact() -> None:
    """Calls, seconds, rows, slow, errors, N+1 and advice per engine, within their bounds."""
    from sqlprobe._sinks._prometheus import MAX_ERROR_CLASSES, MAX_N_PLUS_ONE_SERIES

    exporter, series, registry = _exported(max_fingerprints=2)
    select, update = analyze("SELECT a FROM t WHERE id = 1"), analyze("UPDATE t SET a = 1")
    first = series.prepare(select)
    assert series.prepare(select) is first
    series.observe(first, 0.005, 3, None)
    series.observe(first, 0.05, -1, None)
    series.observe(first, 0.0002, 1, None)
    series.observe_slow(first)
    series.observe_slow(first)
    second = series.prepare(update)
    series.observe(second, 0.0005, 2, None)
    deleted = series.prepare(analyze("DELETE FROM t WHERE id = 2"))
    inserted = series.prepare(analyze("INSERT INTO t (a) VALUES (1)"))
    series.observe(deleted, 2.0, 4, None)
    series.observe(inserted, 0.5, 1, None)
    series.observe(inserted, 0.25, 1, None)
    created = series.prepare(analyze("CREATE TABLE x (a INT)"))
    series.observe(created, 0.001, -1, None)
    series.statement_failed("COMMIT", "OperationalError")  # the first error class
    for n in range(MAX_ERROR_CLASSES - 1):
        series.observe_error(second, f"Error{n}")
    series.observe_error(second, "OneTooMany")
    series.observe_error(second, "Error0")
    series.detected(select.fingerprint, "User.orders")
    series.detected("0123456789abcdef", "User.items")
    for n in range(MAX_N_PLUS_ONE_SERIES - 2):
        series.detected(select.fingerprint, f"Rel.r{n}")
    series.detected(select.fingerprint, "User.addresses")
    series.detected(select.fingerprint, "User.addresses")
    series.advised("t", "a", True)
    series.advised("t", "a", True)
    series.advised("u", "b", False)
    series.advised("v", "c", True)  # beyond max_fingerprints (2)
    exporter.internal_error("otel")
    exporter.internal_error("otel")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"engine": "db", **labels})

    fp, fp2 = select.fingerprint, update.fingerprint
    assert value("sqlprobe_statement_calls_total", fingerprint=fp) == 3
    assert value("sqlprobe_statement_seconds_total", fingerprint=fp) == pytest.approx(0.0552)
    assert value("sqlprobe_statement_rows_total", fingerprint=fp) == 4
    assert value("sqlprobe_statement_rows_total", fingerprint=fp2) == 2
    assert value("sqlprobe_statement_calls_total", fingerprint="_other") == 4
    assert value("sqlprobe_statement_seconds_total", fingerprint="_other") == 2.751
    assert value("sqlprobe_statement_rows_total", fingerprint="_other") == 6
    other_info = {"fingerprint": "_other", "operation": "OTHER", "table": ""}
    other_info["statement"] = "(shapes beyond max_fingerprints)"
    assert value("sqlprobe_statement_info", **other_info) == 1
    info = {"fingerprint": fp, "operation": "SELECT", "table": "t", "statement": select.normalized}
    assert value("sqlprobe_statement_info", **info) == 1
    assert value("sqlprobe_query_duration_seconds_bucket", operation="SELECT", le="0.001") == 1
    assert value("sqlprobe_query_duration_seconds_bucket", operation="SELECT", le="0.1") == 3
    assert value("sqlprobe_query_duration_seconds_bucket", operation="SELECT", le="+Inf") == 3
    assert value("sqlprobe_query_duration_seconds_count", operation="INSERT") == 2
    assert value("sqlprobe_query_duration_seconds_sum", operation="INSERT") == 0.75
    # A preset operation without statements is exported at 0; another one is not.
    assert value("sqlprobe_query_duration_seconds_count", operation="UPDATE") == 1
    assert value("sqlprobe_query_duration_seconds_count", operation="COMMIT") is None
    assert value("sqlprobe_query_duration_seconds_count", operation="CREATE") == 1
    quiet = exporter.engine_series("quiet", MP_BOUNDS, 2)
    quiet.op("CREATE")
    for operation in ("SELECT", "INSERT", "UPDATE", "DELETE"):
        labels = {"engine": "quiet", "operation": operation}
        assert registry.get_sample_value("sqlprobe_query_duration_seconds_count", labels) == 0
    create_op = {"engine": "quiet", "operation": "CREATE"}
    assert registry.get_sample_value("sqlprobe_query_duration_seconds_count", create_op) is None
    assert value("sqlprobe_slow_queries_total", operation="COMMIT") == 0
    assert value("sqlprobe_slow_queries_total", operation="SELECT") == 2
    assert value("sqlprobe_slow_queries_total", operation="DELETE") == 0
    assert value("sqlprobe_query_errors_total", operation="COMMIT", error="OperationalError") == 1
    assert value("sqlprobe_query_errors_total", operation="UPDATE", error="Error0") == 2
    last = f"Error{MAX_ERROR_CLASSES - 2}"
    assert value("sqlprobe_query_errors_total", operation="UPDATE", error=last) == 1
    assert value("sqlprobe_query_errors_total", operation="UPDATE", error="_other") == 1
    assert value("sqlprobe_n_plus_one_total", fingerprint=fp, relationship="User.orders") == 1
    assert value("sqlprobe_n_plus_one_total", fingerprint="_other", relationship="User.items") == 1
    assert value("sqlprobe_n_plus_one_total", fingerprint="_other", relationship="") == 2
    advice = {"table": "t", "columns": "a", "proven": "true"}
    assert value("sqlprobe_index_advice_info", **advice) == 1
    assert value("sqlprobe_index_advice_info", table="u", columns="b", proven="false") == 1
    assert value("sqlprobe_index_advice_info", table="v", columns="c", proven="true") is None
    assert registry.get_sample_value("sqlprobe_internal_errors_total", {"stage": "otel"}) == 2


def test_released_names_keep_their_totals_within_the_bound() -> None:
    """A released engine name keeps its totals until MAX_RETAINED_ENGINES newer ones go."""
    from sqlprobe._sinks._prometheus import MAX_RETAINED_ENGINES

    exporter, series, registry = _exported("first")
    series.timeout()
    again = exporter.engine_series("first", MP_BOUNDS, 10)
    assert again is series
    exporter.release(series)  # one reference left
    assert "first" not in exporter.retained
    exporter.release(series)
    assert list(exporter.retained) == ["first"]
    exporter.release(series)  # a release too many changes nothing
    assert exporter.engine_series("first", MP_BOUNDS, 10) is series  # continues its totals
    assert not exporter.retained
    exporter.release(series)
    message = (
        "engine name 'first' is already attached on this registry with other buckets; "
        "give this engine another name= or the same buckets"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        exporter.engine_series("first", (0.5,), 10)
    for n in range(MAX_RETAINED_ENGINES - 1):
        exporter.release(exporter.engine_series(f"e{n}", MP_BOUNDS, 10))
    timeouts = "sqlprobe_pool_checkout_timeouts_total"
    assert registry.get_sample_value(timeouts, {"engine": "first"}) == 1
    exporter.release(exporter.engine_series("one-more", MP_BOUNDS, 10))
    assert registry.get_sample_value(timeouts, {"engine": "first"}) is None
    assert registry.get_sample_value(timeouts, {"engine": "e0"}) == 0
    assert len(exporter.retained) == MAX_RETAINED_ENGINES


class _SpanContext:
    def __init__(self, trace_id: int, span_id: int) -> None:
        self.trace_id = trace_id
        self.span_id = span_id


def test_exemplars_name_the_trace_in_hex_and_each_bucket_keeps_its_own() -> None:
    """An exemplar has 32/16 lowercase hex ids, the value and its time, one per bucket."""
    _exporter, series, registry = _exported()
    stats = series.prepare(analyze("SELECT 1"))
    before = time.time()
    series.observe(stats, 0.005, -1, _SpanContext(0xABCDEF, 0xFEDCBA))
    series.observe(stats, 0.05, -1, _SpanContext(0x1F, 0x2E))
    after = time.time()
    (family,) = [m for m in registry.collect() if m.name == "sqlprobe_query_duration_seconds"]
    buckets = {
        s.labels["le"]: s.exemplar
        for s in family.samples
        if s.name.endswith("_bucket") and s.labels["operation"] == "SELECT"
    }
    exemplar = buckets["0.01"]
    assert exemplar is not None
    assert exemplar.labels == {
        "trace_id": "00000000000000000000000000abcdef",
        "span_id": "0000000000fedcba",
    }
    assert exemplar.value == 0.005
    assert exemplar.timestamp is not None and before <= exemplar.timestamp <= after
    assert buckets["0.1"] is not None and buckets["0.1"].labels["span_id"] == "000000000000002e"
    assert buckets["0.001"] is None


def test_statements_report_the_shapes_beyond_the_limit_as_other(
    sqlite_engine: Any, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """Probe.statements() lists the overflow under _other with its placeholder text."""
    with sqlite_engine.connect():
        pass  # the dialect's first-connect queries run before the probe
    probe = sqlprobe.attach(sqlite_engine, registry=registry, max_fingerprints=1)
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1")).all()
        conn.execute(text("SELECT 2 + 2 AS x")).all()
        conn.execute(text("SELECT 3 * 3 AS y")).all()
    other = [s for s in probe.statements() if s.fingerprint == "_other"]
    assert [(s.statement, s.operation, s.calls) for s in other] == [
        ("(shapes beyond max_fingerprints)", "OTHER", 2)
    ]


class _RacingLock:
    """The series lock, taken by another thread's prepare/op of the same key first."""

    def __init__(self, series: Any, first: Any) -> None:
        self.series = series
        self.real = series.lock
        self.first = first
        self.won: list[Any] = []

    def __enter__(self) -> None:
        if not self.won:
            self.series.lock = self.real
            self.won.append(self.first())
        self.real.acquire()

    def __exit__(self, *exc: object) -> None:
        self.real.release()


def test_a_shape_made_by_another_thread_meanwhile_is_reused() -> None:
    """A shape or operation created between the unlocked lookup and the lock is not replaced."""
    _exporter, series, _registry = _exported()
    shape = analyze("SELECT a FROM t WHERE id = 1")
    race = _RacingLock(series, lambda: series.prepare(shape))
    series.lock = race
    stats = series.prepare(shape)
    assert stats is race.won[0] is series.shapes[shape.fingerprint]
    race = _RacingLock(series, lambda: series.op("VACUUM"))
    series.lock = race
    op = series.op("VACUUM")
    assert op is race.won[0] is series.ops["VACUUM"]


def test_multiprocess_mode_follows_the_value_class_and_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Multiprocess mode is on when the variable is set and prometheus_client writes files."""
    from prometheus_client import values

    from sqlprobe._sinks._multiprocess import multiprocess_active

    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    assert multiprocess_active() is False
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert multiprocess_active() is True


def test_each_scrape_runs_the_deferred_clean_ups_first() -> None:
    """The exporter calls before_collect once at the start of every scrape."""
    from sqlprobe._sinks._prometheus import PrometheusExporter

    calls: list[int] = []
    exporter = PrometheusExporter(lambda: calls.append(len(exporter.engines)))
    registry = CollectorRegistry()
    registry.register(exporter)
    exporter.engine_series("db", MP_BOUNDS, 10)
    list(registry.collect())
    list(registry.collect())
    assert calls == [1, 1]


# --------------------------------------------------------------------------- pool hooks
# The pool hooks hand values to the Prometheus series through its pending lists; with
# another sink beside it (OTel pool metrics) each value is handed over in a call of its
# own. Both paths are pinned, and every failure of a sink is contained as stage "pool".


class _Raising:
    """A pool sink, hold sink and hold monitor whose every method raises."""

    hold_threshold = 0.0
    idle_in_transaction_threshold = 0.0
    wait_threshold = float("inf")

    def _fail(self, *args: Any) -> None:
        raise RuntimeError("sink bug")

    checkout = checkin = connected = connect_failed = timeout = invalidated = _fail
    transaction = statement_failed = idle = unit = checked_in = exhausted = _fail


def _pool_hooks(path: Path) -> tuple[Any, Any, list[Any]]:
    """A one-connection QueuePool on a SQLite file, its PoolHooks (not installed) and the
    stages they contain."""
    from sqlalchemy.pool import QueuePool

    from sqlprobe._hooks._pool import PoolHooks

    engine = create_engine(
        f"sqlite:///{path}", poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=0.01
    )
    stages: list[Any] = []
    hooks = PoolHooks(engine, contain=stages.append, error_name=lambda exc: type(exc).__name__)
    return engine, hooks, stages


def test_every_pool_sink_failure_is_contained_as_stage_pool(tmp_path: Path) -> None:
    """A sink that raises in each pool hook is contained, always as stage "pool"."""
    from sqlprobe._hooks._pool import PoolHooks

    engine, hooks, stages = _pool_hooks(tmp_path / "contain.db")
    raising = _Raising()
    undo = hooks.install(raising, raising, raising)
    try:
        with sqlprobe.scope("contained"), engine.connect() as conn:  # connected, checkout
            conn.execute(text("CREATE TABLE p (id INTEGER PRIMARY KEY)"))
            conn.execute(text("PRAGMA foreign_keys = ON"))
            conn.commit()  # transaction("commit")
            conn.execute(
                text("CREATE TABLE c (p INTEGER REFERENCES p (id) DEFERRABLE INITIALLY DEFERRED)")
            )
            conn.commit()
            conn.execute(text("SELECT 1"))
            conn.rollback()  # transaction("rollback")
            conn.execute(text("INSERT INTO c VALUES (7)"))
            with pytest.raises(Exception, match="FOREIGN KEY"):
                conn.commit()  # statement_failed, then transaction("rollback")
            conn.rollback()
            with pytest.raises(Exception, match="QueuePool limit"):
                engine.connect()  # timeout
            conn.connection.invalidate(soft=True)  # invalidated (soft)
            # checkin; the scope's end: unit
        with engine.connect() as conn:
            conn.invalidate()  # invalidated
        gone = create_engine(f"sqlite:///{tmp_path / 'no' / 'such.db'}")
        gone_hooks = PoolHooks(gone, contain=stages.append, error_name=lambda exc: "E")
        gone_undo = gone_hooks.install(raising, raising, raising)
        with pytest.raises(Exception, match="unable to open"):
            gone.connect()  # connect_failed
        gone_undo()
    finally:
        undo()
        engine.dispose()
    assert len(stages) >= 10
    assert set(stages) == {"pool"}


def test_pool_values_handed_over_one_call_each_are_exact(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """With OTel pool metrics too, every wait, use, idle and transaction reaches the series."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from sqlalchemy.pool import QueuePool

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    engine = create_engine(f"sqlite:///{tmp_path / 'fanout.db'}", poolclass=QueuePool)
    try:
        sqlprobe.attach(engine, registry=registry, name="fan", meter_provider=provider)
        for _ in range(2):
            with engine.begin() as conn:
                conn.execute(text("SELECT 1"))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            time.sleep(0.02)
            conn.rollback()

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"engine": "fan", **labels})

        assert value("sqlprobe_pool_checkout_wait_seconds_count") == 3
        assert value("sqlprobe_pool_connection_use_seconds_count") == 3
        assert value("sqlprobe_pool_connection_idle_seconds_count") == 3
        assert value("sqlprobe_pool_connects_total") == 1
        assert value("sqlprobe_pool_connect_seconds_count") == 1
        txn = "sqlprobe_transaction_duration_seconds"
        assert value(f"{txn}_count", outcome="commit") == 2
        assert value(f"{txn}_count", outcome="rollback") == 1
        use = value("sqlprobe_pool_connection_use_seconds_sum") or 0.0
        idle = value("sqlprobe_pool_connection_idle_seconds_sum") or 0.0
        assert 0.02 <= idle < use
        assert 0.02 <= (value(f"{txn}_sum", outcome="rollback") or 0.0) < use
        assert 0 < (value(f"{txn}_sum", outcome="commit") or 0.0) < use
        assert 0 <= (value("sqlprobe_pool_connect_seconds_sum") or 0.0) < 0.5
        with engine.connect() as conn:
            conn.invalidate()
        assert value("sqlprobe_pool_invalidations_total") == 1
    finally:
        engine.dispose()
        provider.shutdown()


def test_transaction_open_at_check_in_counts_as_a_rollback(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A connection returned with its transaction still begun counts one rollback."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(
        f"sqlite:///{tmp_path / 'open.db'}", poolclass=QueuePool, pool_reset_on_return=None
    )
    try:
        sqlprobe.attach(engine, registry=registry, name="open")
        raw = engine.raw_connection()
        engine.dialect.do_begin(raw)  # SQLAlchemy began; nothing rolls it back
        time.sleep(0.02)
        raw.close()
        labels = {"engine": "open", "outcome": "rollback"}
        txn = "sqlprobe_transaction_duration_seconds"
        assert registry.get_sample_value(f"{txn}_count", labels) == 1
        assert 0.02 <= (registry.get_sample_value(f"{txn}_sum", labels) or 0.0) < 1.0
        assert (
            registry.get_sample_value(
                "sqlprobe_pool_connection_use_seconds_count", {"engine": "open"}
            )
            == 1
        )
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("size", "overflow", "limit"), [(2, 3, 5.0), (0, 10, None), (5, -1, None), (1, 0, 1.0)]
)
def test_queue_pool_max_is_size_plus_overflow_unless_unbounded(
    tmp_path: Path,
    registry: CollectorRegistry,
    detach_new_probes: None,
    size: int,
    overflow: int,
    limit: float | None,
) -> None:
    """A QueuePool's max is pool_size + max_overflow; pool_size 0 or max_overflow -1: none."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(
        f"sqlite:///{tmp_path / 'max.db'}",
        poolclass=QueuePool,
        pool_size=size,
        max_overflow=overflow,
    )
    try:
        sqlprobe.attach(engine, registry=registry, name="max")
        assert registry.get_sample_value("sqlprobe_pool_max_connections", {"engine": "max"}) == (
            limit
        )
    finally:
        engine.dispose()


def test_only_a_null_pool_keeps_no_returned_connection(tmp_path: Path) -> None:
    """A NullPool closes returned connections; every other pool keeps them."""
    from sqlalchemy.pool import NullPool, QueuePool, StaticPool

    from sqlprobe._hooks._pool import keeps_connections

    url = f"sqlite:///{tmp_path / 'keeps.db'}"
    kept = {
        cls: keeps_connections(create_engine(url, poolclass=cls).pool)
        for cls in (NullPool, QueuePool, StaticPool)
    }
    assert kept == {NullPool: False, QueuePool: True, StaticPool: True}


def test_peak_starts_at_zero_and_keeps_the_most_out_since_attach(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """Before any checkout the peak is 0; pool_peak keeps the most out at once since attach."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'peak.db'}", poolclass=QueuePool)
    try:
        probe = sqlprobe.attach(engine, registry=registry, name="peak")
        labels = {"engine": "peak"}
        assert probe.pool_peak == 0
        assert registry.get_sample_value("sqlprobe_pool_peak_connections", labels) == 0
        first, second = engine.connect(), engine.connect()
        assert probe.pool_peak == 2
        first.close()
        second.close()
        assert probe.pool_peak == 2
        assert registry.get_sample_value("sqlprobe_pool_peak_connections", labels) == 2
        assert registry.get_sample_value("sqlprobe_pool_peak_connections", labels) == 0
        assert probe.pool_peak == 2
        with engine.connect():
            assert probe.pool_peak == 2
    finally:
        engine.dispose()


def test_unit_of_work_adds_every_checkout_also_one_still_out_at_its_end(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A scope's totals add the checked-in and the still-out checkouts; it is then checked in."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'unit.db'}", poolclass=QueuePool)
    slow = text(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :k) "
        "SELECT count(*) FROM n"
    )
    try:
        sqlprobe.attach(engine, registry=registry, name="unit")
        with sqlprobe.scope("leaky"):
            with engine.connect() as conn:
                conn.execute(slow, {"k": 200_000})
                conn.execute(text("SELECT 1"))
            leaked = engine.connect()
            leaked.execute(slow, {"k": 200_000})
        leaked.close()

        def value(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, {"engine": "unit", **labels}) or 0.0

        assert value("sqlprobe_scope_statements_sum", route="leaky") == 3
        queries = value("sqlprobe_query_duration_seconds_sum", operation="SELECT")
        assert value("sqlprobe_scope_db_seconds_sum", route="leaky") >= queries * 0.99
        waits = value("sqlprobe_pool_checkout_wait_seconds_sum")
        assert value("sqlprobe_scope_pool_wait_seconds_sum", route="leaky") == pytest.approx(waits)
        assert value("sqlprobe_pool_connection_use_seconds_count") == 2
    finally:
        engine.dispose()


def test_scope_ending_after_detach_records_nothing(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A unit of work that ends after its engine was detached adds no observation."""
    engine = create_engine(f"sqlite:///{tmp_path / 'late.db'}")
    try:
        probe = sqlprobe.attach(engine, registry=registry, name="late")
        with sqlprobe.scope("late"):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            probe.detach()
        labels = {"engine": "late", "route": "late"}
        assert registry.get_sample_value("sqlprobe_scope_statements_count", labels) is None
    finally:
        engine.dispose()


@pytest.mark.parametrize("otel", [False, True])
def test_a_refused_commit_counts_as_a_failed_commit_statement(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None, otel: bool
) -> None:
    """A COMMIT the database refuses counts one COMMIT error with the driver's error class."""
    from opentelemetry.sdk.metrics import MeterProvider
    from sqlalchemy import event
    from sqlalchemy.exc import IntegrityError

    engine = create_engine(f"sqlite:///{tmp_path / 'refused.db'}")

    @event.listens_for(engine, "connect")
    def _foreign_keys(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE p (id INTEGER PRIMARY KEY)"))
            conn.execute(
                text("CREATE TABLE c (p INTEGER REFERENCES p (id) DEFERRABLE INITIALLY DEFERRED)")
            )
        provider = MeterProvider() if otel else None
        probe = sqlprobe.attach(engine, registry=registry, name="refused", meter_provider=provider)
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("INSERT INTO c VALUES (7)"))
        # One shape, spelled as SQL: the same as an application's own text("COMMIT").
        assert [s.statement for s in probe.statements() if s.operation == "COMMIT"] == ["COMMIT"]
        errors = {
            (s.labels["operation"], s.labels["error"]): s.value
            for m in registry.collect()
            if m.name == "sqlprobe_query_errors"
            for s in m.samples
            if s.name == "sqlprobe_query_errors_total"
        }
        assert errors == {("COMMIT", "IntegrityError"): 1}
        labels = {"engine": "refused", "outcome": "rollback"}
        txn = "sqlprobe_transaction_duration_seconds"
        assert registry.get_sample_value(f"{txn}_count", labels) == 1
        assert 0 < (registry.get_sample_value(f"{txn}_sum", labels) or 0.0) < 1.0
    finally:
        engine.dispose()


def test_rollback_and_commit_time_is_statement_time_of_the_checkout(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A slow COMMIT and ROLLBACK count in the unit's database time, not in idle time."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'slow.db'}", poolclass=QueuePool)
    dialect = engine.dialect
    commit, rollback = dialect.do_commit, dialect.do_rollback

    def slow_commit(connection: Any) -> None:  # a driver whose COMMIT takes 50 ms
        time.sleep(0.05)
        commit(connection)

    def slow_rollback(connection: Any) -> None:
        time.sleep(0.05)
        rollback(connection)

    dialect.do_commit = slow_commit  # type: ignore[method-assign]
    dialect.do_rollback = slow_rollback  # type: ignore[method-assign]
    try:
        sqlprobe.attach(engine, registry=registry, name="slow")
        with sqlprobe.scope("slow"), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.commit()
            conn.execute(text("SELECT 1"))
            conn.rollback()

        def value(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, {"engine": "slow", **labels}) or 0.0

        use = value("sqlprobe_pool_connection_use_seconds_sum")
        idle = value("sqlprobe_pool_connection_idle_seconds_sum")
        db = value("sqlprobe_scope_db_seconds_sum", route="slow")
        assert 0.1 <= db <= use
        assert idle == pytest.approx(use - db, abs=1e-6)
    finally:
        engine.dispose()


class _PoolRecorder:
    """A pool sink, hold sink and hold monitor that record every call."""

    def __init__(self, hold: float, idle_in_transaction: float) -> None:
        self.hold_threshold = hold
        self.idle_in_transaction_threshold = idle_in_transaction
        self.wait_threshold = 0.0
        self.calls: list[tuple[Any, ...]] = []
        self.reported: list[tuple[Any, float, float, float]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, *args))

    def checked_in(self, hold: Any, now: float, held: float, idle: float) -> None:
        self.reported.append((hold, now, held, idle))


@contextlib.contextmanager
def _recording(
    path: Path, *, hold: float = 1e9, idle_in_transaction: float = 1e9
) -> Iterator[tuple[Any, Any, list[Any], _PoolRecorder]]:
    """:func:`_pool_hooks` installed with one :class:`_PoolRecorder` as every sink (its
    thresholds never reached unless given), undone and disposed at the end."""
    engine, hooks, stages = _pool_hooks(path)
    recorder = _PoolRecorder(hold=hold, idle_in_transaction=idle_in_transaction)
    undo = hooks.install(recorder, recorder, recorder)
    try:
        yield engine, hooks, stages, recorder
    finally:
        undo()
        engine.dispose()


def test_checkouts_over_a_threshold_are_reported_at_check_in(tmp_path: Path) -> None:
    """Check-in reports a hold over hold_threshold or idle in a transaction over its own."""
    from sqlprobe._core._hold import TXN_IDLE

    with _recording(tmp_path / "report.db", hold=0.2, idle_in_transaction=0.05) as (
        engine,
        _,
        stages,
        recorder,
    ):
        start = time.perf_counter()
        with engine.connect():  # held past hold_threshold: reported
            time.sleep(0.22)
        with engine.connect() as conn:  # quick: not reported
            conn.execute(text("SELECT 1"))
            conn.commit()
        for end in ("commit", "rollback"):  # idle in a transaction: reported
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                time.sleep(0.06)
                getattr(conn, end)()
        held = [r[2] for r in recorder.reported]
        assert len(held) == 3, held
        assert held[0] >= 0.22 and all(h < 0.2 for h in held[1:])
        for hold, now, use, idle in recorder.reported:
            assert isinstance(hold, list)
            assert start < now <= time.perf_counter()
            assert 0.0 <= idle <= use
        assert recorder.reported[0][3] == recorder.reported[0][2]  # no statement: all idle
        assert all(0.05 <= r[0][TXN_IDLE] <= r[2] for r in recorder.reported[1:])
        # wait_threshold 0: every checkout waited "long" and was told; a timeout too
        exhausted = [c[1:] for c in recorder.calls if c[0] == "exhausted"]
        assert len(exhausted) == 4
        assert all(0 <= waited < 0.1 and timed_out is False for waited, timed_out in exhausted)
        uses = [c[1] for c in recorder.calls if c[0] == "checkin"]
        idles = [c[1] for c in recorder.calls if c[0] == "idle"]
        assert len(uses) == len(idles) == 4
        assert [r[2] for r in recorder.reported] == [uses[0], uses[2], uses[3]]
        assert stages == []
        with engine.connect(), pytest.raises(Exception, match="QueuePool limit"):
            engine.connect()
        waited, timed_out = [c[1:] for c in recorder.calls if c[0] == "exhausted"][-1]
        assert timed_out is True and 0.01 <= waited < 1.0


def test_a_detached_connection_leaves_no_hold_behind(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """After detach() the record's next checkout is measured afresh, and the peak is 1."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(
        f"sqlite:///{tmp_path / 'detached.db'}", poolclass=QueuePool, pool_size=1, max_overflow=2
    )
    try:
        probe = sqlprobe.attach(engine, registry=registry, name="detached")
        conn = engine.connect()
        time.sleep(0.1)
        conn.detach()
        conn.close()
        labels = {"engine": "detached", "state": "idle"}
        assert registry.get_sample_value("sqlprobe_pool_connections", labels) == 0
        assert (
            registry.get_sample_value("sqlprobe_pool_max_connections", {"engine": "detached"}) == 3
        )
        with engine.connect() as again:
            again.execute(text("SELECT 1"))

        def value(name: str) -> float | None:
            return registry.get_sample_value(name, {"engine": "detached"})

        assert value("sqlprobe_pool_connection_use_seconds_count") == 1
        assert (value("sqlprobe_pool_connection_use_seconds_sum") or 1.0) < 0.1
        assert probe.pool_peak == 1
        assert value("sqlprobe_pool_max_connections") == 3
        assert probe._pool is not None and probe._pool.holders() == []
    finally:
        engine.dispose()


def test_an_invalidated_connection_leaves_an_empty_slot(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """An invalidated connection's slot counts neither idle nor used; the max stays."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(
        f"sqlite:///{tmp_path / 'empty.db'}", poolclass=QueuePool, pool_size=2, max_overflow=1
    )
    try:
        sqlprobe.attach(engine, registry=registry, name="empty")
        conn = engine.connect()
        conn.invalidate()
        conn.close()
        labels = {"engine": "empty"}
        conns = "sqlprobe_pool_connections"
        assert registry.get_sample_value(conns, {**labels, "state": "idle"}) == 0
        assert registry.get_sample_value(conns, {**labels, "state": "used"}) == 0
        assert registry.get_sample_value("sqlprobe_pool_max_connections", labels) == 3
    finally:
        engine.dispose()


@pytest.mark.parametrize("poolclass", ["StaticPool", "SingletonThreadPool"])
def test_a_connection_opened_before_attach_shows_once_checked_out(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None, poolclass: str
) -> None:
    """A pool that keeps no count of its own shows a warm connection once it is checked out."""
    import sqlalchemy.pool

    engine = create_engine(
        f"sqlite:///{tmp_path / 'warm.db'}", poolclass=getattr(sqlalchemy.pool, poolclass)
    )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        sqlprobe.attach(engine, registry=registry, name="warm")
        labels = {"engine": "warm"}
        conns = "sqlprobe_pool_connections"
        with engine.connect():
            assert registry.get_sample_value(conns, {**labels, "state": "used"}) == 1
        assert registry.get_sample_value(conns, {**labels, "state": "idle"}) == 1
    finally:
        engine.dispose()


def test_no_checkout_listener_on_a_queue_pool(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A QueuePool gets no checkout listener (it would slow every checkout); it keeps counts."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'nolistener.db'}", poolclass=QueuePool)
    try:
        sqlprobe.attach(engine, registry=registry, name="nolistener")
        assert len(engine.pool.dispatch.checkout) == 0
    finally:
        engine.dispose()


def test_connections_of_a_replaced_pool_no_longer_count(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """Two connections out count 2 used; after dispose() they no longer count, while out."""
    from sqlalchemy.pool import NullPool

    engine = create_engine(f"sqlite:///{tmp_path / 'replaced.db'}", poolclass=NullPool)
    try:
        sqlprobe.attach(engine, registry=registry, name="replaced")
        labels = {"engine": "replaced", "state": "used"}
        first, second = engine.connect(), engine.connect()
        assert registry.get_sample_value("sqlprobe_pool_connections", labels) == 2
        engine.dispose()
        assert registry.get_sample_value("sqlprobe_pool_connections", labels) == 0
        with engine.connect():
            assert registry.get_sample_value("sqlprobe_pool_connections", labels) == 1
        first.close()
        second.close()
    finally:
        engine.dispose()


def test_many_transactions_in_one_checkout_keep_the_pending_lists_bounded(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """Hundreds of commits and rollbacks on one checkout stay bounded and all count."""
    from sqlalchemy.pool import QueuePool

    from sqlprobe._hooks._pool import SETTLE_AT

    engine = create_engine(f"sqlite:///{tmp_path / 'many.db'}", poolclass=QueuePool)
    try:
        probe = sqlprobe.attach(engine, registry=registry, name="many")
        pending = probe._series.pending()
        assert pending is not None
        n = SETTLE_AT + 10
        with engine.connect() as conn:
            for end in ("commit", "rollback"):
                for _ in range(n):
                    conn.execute(text("SELECT 1"))
                    getattr(conn, end)()
                    assert all(len(values) < SETTLE_AT for values in pending)
        txn = "sqlprobe_transaction_duration_seconds_count"
        for outcome in ("commit", "rollback"):
            labels = {"engine": "many", "outcome": outcome}
            assert registry.get_sample_value(txn, labels) == n
            total = registry.get_sample_value(txn.replace("_count", "_sum"), labels) or 0.0
            assert 0 < total < 5.0
    finally:
        engine.dispose()


def test_a_return_conn_wrapper_of_the_application_still_runs(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A wrapper the application put on the pool's _return_conn runs at every check-in."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'wrapped.db'}", poolclass=QueuePool)
    pool = engine.pool
    returned: list[Any] = []
    unwrapped = pool._return_conn

    def _return_conn(record: Any) -> None:
        returned.append(record)
        unwrapped(record)

    pool._return_conn = _return_conn  # type: ignore[method-assign]
    try:
        sqlprobe.attach(engine, registry=registry, name="wrapped")
        for _ in range(2):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        assert len(returned) == 2 and all(r is not None for r in returned)
        count = registry.get_sample_value(
            "sqlprobe_pool_connection_use_seconds_count", {"engine": "wrapped"}
        )
        assert count == 2
    finally:
        engine.dispose()


def test_a_checkout_from_before_a_reattach_is_not_measured_at_check_in(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """Detached and attached again: the check-in and commit of an older checkout count nothing."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'again.db'}", poolclass=QueuePool)
    try:
        first = sqlprobe.attach(engine, registry=registry, name="before")
        conn = engine.connect()
        conn.begin()
        conn.execute(text("SELECT 1"))
        first.detach()
        sqlprobe.attach(engine, registry=registry, name="after")
        conn.commit()
        conn.close()
        labels = {"engine": "after"}
        use = "sqlprobe_pool_connection_use_seconds_count"
        txn = "sqlprobe_transaction_duration_seconds_count"
        assert registry.get_sample_value(use, labels) == 0
        assert registry.get_sample_value(txn, {**labels, "outcome": "commit"}) in (None, 0)
    finally:
        engine.dispose()


def test_a_commit_failing_outside_the_driver_is_no_failed_statement(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A COMMIT that raises something other than a DBAPI error counts no statement error."""
    engine = create_engine(f"sqlite:///{tmp_path / 'interrupted.db'}")
    commit = engine.dialect.do_commit

    def interrupted(connection: Any) -> None:
        raise RuntimeError("interrupted before the driver ran")

    engine.dialect.do_commit = interrupted  # type: ignore[method-assign]
    try:
        sqlprobe.attach(engine, registry=registry, name="interrupted")
        with pytest.raises(RuntimeError), engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        errors = [
            s
            for m in registry.collect()
            if m.name == "sqlprobe_query_errors"
            for s in m.samples
            if s.name == "sqlprobe_query_errors_total"
        ]
        assert errors == []
        labels = {"engine": "interrupted", "outcome": "rollback"}
        txn = "sqlprobe_transaction_duration_seconds_count"
        assert registry.get_sample_value(txn, labels) == 1
    finally:
        engine.dialect.do_commit = commit  # type: ignore[method-assign]
        engine.dispose()


@pytest.mark.parametrize("begun", [True, False])
def test_a_rollback_the_driver_refuses_counts_as_a_failed_rollback(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None, begun: bool
) -> None:
    """A ROLLBACK failing in the driver counts a ROLLBACK error, with or without a transaction."""
    import sqlite3

    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'norollback.db'}", poolclass=QueuePool)
    rollback = engine.dialect.do_rollback
    refuse = [False]

    def refusing(connection: Any) -> None:  # a driver whose ROLLBACK fails once
        if refuse[0]:
            refuse[0] = False
            raise sqlite3.OperationalError("rollback refused")
        rollback(connection)

    try:
        engine.dialect.do_rollback = refusing  # type: ignore[method-assign]
        probe = sqlprobe.attach(engine, registry=registry, name="norollback")
        conn = engine.connect()
        refuse[0] = True
        if begun:
            conn.execute(text("SELECT 1"))
            with pytest.raises(Exception, match="rollback refused"):
                conn.rollback()
        else:
            with pytest.raises(Exception, match="rollback refused"):
                engine.dialect.do_rollback(conn.connection)  # the pool's own reset
        conn.close()
        errors = {
            (s.labels["operation"], s.labels["error"]): s.value
            for m in registry.collect()
            if m.name == "sqlprobe_query_errors"
            for s in m.samples
            if s.name == "sqlprobe_query_errors_total"
        }
        assert errors == {("ROLLBACK", "OperationalError"): 1}
        failed = [s.statement for s in probe.statements() if s.operation == "ROLLBACK"]
        assert failed == ["ROLLBACK"]
        labels = {"engine": "norollback", "outcome": "rollback"}
        count = registry.get_sample_value("sqlprobe_transaction_duration_seconds_count", labels)
        assert count == (1 if begun else 0)
    finally:
        engine.dialect.do_rollback = rollback  # type: ignore[method-assign]
        engine.dispose()


def test_wrappers_the_application_put_on_the_pool_still_run(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """Wrappers on the pool instance's connect and recreate run under sqlprobe's."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'wrappers.db'}", poolclass=QueuePool)
    pool = engine.pool
    calls: list[str] = []
    connect, recreate = pool.connect, pool.recreate

    def counted_connect() -> Any:
        calls.append("connect")
        return connect()

    def counted_recreate() -> Any:
        calls.append("recreate")
        return recreate()

    pool.connect = counted_connect  # type: ignore[method-assign]
    pool.recreate = counted_recreate  # type: ignore[method-assign]
    try:
        sqlprobe.attach(engine, registry=registry, name="wrappers")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        assert calls == ["connect", "recreate"]
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        count = registry.get_sample_value(
            "sqlprobe_pool_checkout_wait_seconds_count", {"engine": "wrappers"}
        )
        assert count == 2
    finally:
        engine.dispose()


def test_a_connect_failing_outside_the_driver_is_no_connect_error(
    registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A creator raising something other than a DBAPI error counts no connect error."""
    import sqlite3

    failures = [RuntimeError("not the driver"), sqlite3.OperationalError("refused")]

    def creator() -> Any:
        raise failures.pop(0)

    engine = create_engine("sqlite://", creator=creator)
    try:
        sqlprobe.attach(engine, registry=registry, name="creator")
        for _ in range(2):
            with pytest.raises(Exception, match=r"not the driver|refused"):
                engine.connect()
        errors = {
            s.labels["error"]: s.value
            for m in registry.collect()
            for s in m.samples
            if s.name == "sqlprobe_pool_connect_errors_total"
        }
        assert errors == {"OperationalError": 1}
    finally:
        engine.dispose()


def test_a_failed_commit_is_statement_time_of_the_checkout(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """A COMMIT that fails after 50 ms counts in the unit's database time, not in idle time."""
    import sqlite3

    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'failslow.db'}", poolclass=QueuePool)
    commit = engine.dialect.do_commit

    def slow_failure(connection: Any) -> None:  # a driver whose COMMIT fails after 50 ms
        time.sleep(0.05)
        raise sqlite3.OperationalError("disk I/O error")

    engine.dialect.do_commit = slow_failure  # type: ignore[method-assign]
    try:
        sqlprobe.attach(engine, registry=registry, name="failslow")
        with sqlprobe.scope("failslow"), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            with pytest.raises(Exception, match="disk I/O error"):
                conn.commit()

        def value(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, {"engine": "failslow", **labels}) or 0.0

        use = value("sqlprobe_pool_connection_use_seconds_sum")
        idle = value("sqlprobe_pool_connection_idle_seconds_sum")
        db = value("sqlprobe_scope_db_seconds_sum", route="failslow")
        assert 0.05 <= db <= use
        assert idle == pytest.approx(use - db, abs=1e-6)
    finally:
        engine.dialect.do_commit = commit  # type: ignore[method-assign]
        engine.dispose()


def test_a_refused_connect_beside_otel_pool_metrics_counts_one_connect_error(
    registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """With OTel pool metrics too, a connect the database refuses is one connect error."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from sqlalchemy import exc as sa_exc

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    # Nothing listens on port 1: the driver's connect fails at once.
    engine = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:1/test", connect_args={"connect_timeout": 2}
    )
    try:
        sqlprobe.attach(engine, registry=registry, name="refused_otel", meter_provider=provider)
        for _ in range(2):
            with pytest.raises(sa_exc.OperationalError):
                engine.connect()
        labels = {"engine": "refused_otel", "error": "OperationalError"}
        assert registry.get_sample_value("sqlprobe_pool_connect_errors_total", labels) == 2
    finally:
        engine.dispose()
        provider.shutdown()


# ------------------------------------------------ pool hooks: the third run's survivors


def test_a_stale_connection_closed_after_a_pool_wide_invalidation_is_contained(
    tmp_path: Path,
) -> None:
    """A pool-wide invalidation: the stale connection closed later counts once, contained."""
    from sqlalchemy import event
    from sqlalchemy.pool import QueuePool

    from sqlprobe._hooks._pool import PoolHooks

    engine = create_engine(f"sqlite:///{tmp_path / 'stale.db'}", poolclass=QueuePool, pool_size=2)

    @event.listens_for(engine, "handle_error")
    def as_disconnect(context: Any) -> None:
        context.is_disconnect = True  # invalidates the pool: every older connection

    class FailsToCount(_PoolRecorder):
        def invalidated(self) -> None:
            raise RuntimeError("sink bug")

    stages: list[Any] = []
    recorder = _PoolRecorder(hold=60.0, idle_in_transaction=60.0)
    failing_sink = FailsToCount(hold=60.0, idle_in_transaction=60.0)
    for sink in (recorder, failing_sink):
        hooks = PoolHooks(engine, contain=stages.append, error_name=lambda exc: "E")
        undo = hooks.install(sink, sink, sink)  # type: ignore[arg-type]
        try:
            with engine.connect() as older, engine.connect() as failing:
                older.execute(text("SELECT 1"))
                time.sleep(0.01)  # the pool's invalidation time lies after older's connect
                with pytest.raises(Exception, match="no such table"):
                    failing.execute(text("SELECT * FROM missing"))
            assert len(stages) == (sink is failing_sink)  # the failing connection's
            with engine.connect() as conn, engine.connect() as other:
                conn.execute(text("SELECT 1"))  # the older one closed, then reopened
                other.execute(text("SELECT 1"))
        finally:
            undo()
            engine.dispose()
        assert stages == (["pool", "pool"] if sink is failing_sink else [])
        stages.clear()
    invalidated = [c for c in recorder.calls if c[0] == "invalidated"]
    assert len(invalidated) == 2  # the failing connection, and the older one at its close


def test_an_invalidated_connection_still_out_is_no_longer_in_a_transaction(
    tmp_path: Path,
) -> None:
    """A connection invalidated while out, in a transaction, leaves its hold outside one."""
    from sqlprobe._core._hold import in_transaction

    with _recording(tmp_path / "invalid.db") as (engine, hooks, stages, recorder):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            (hold,) = hooks.holders()
            assert in_transaction(hold)
            # The record's own invalidate (what a pool event handler may call): the
            # checkout stays out, its transaction is gone with the DBAPI connection.
            conn.connection._connection_record.invalidate()
            assert hooks.holders() == [hold]
            assert not in_transaction(hold)
            conn.invalidate()
        rollbacks = [c for c in recorder.calls if c[:2] == ("transaction", "rollback")]
        assert len(rollbacks) == 1
        assert 0.0 <= rollbacks[0][2] < 5.0  # counted at the invalidation, from the begin
        assert stages == []


def test_slots_emptied_in_a_replaced_queue_pool_do_not_count_against_the_new_one(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """An invalidated slot of the pool dispose() replaced leaves the new pool's idle alone."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'slots.db'}", poolclass=QueuePool)
    try:
        sqlprobe.attach(engine, registry=registry, name="slots")
        old = engine.pool  # kept, with its records, by a connection still out of it
        conn = engine.connect()
        engine.dispose()
        conn.invalidate()  # goes back to the old pool, emptied
        conn.close()
        with engine.connect() as new:
            new.execute(text("SELECT 1"))
        labels = {"engine": "slots", "state": "idle"}
        assert registry.get_sample_value("sqlprobe_pool_connections", labels) == 1
        assert old is not engine.pool
    finally:
        engine.dispose()


def test_connections_of_a_replaced_null_pool_are_skipped_not_stopped_at(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """With ten connections out of a replaced pool and ten of the new, ten count as used."""
    from sqlalchemy.pool import NullPool

    engine = create_engine(f"sqlite:///{tmp_path / 'mixed.db'}", poolclass=NullPool)
    try:
        sqlprobe.attach(engine, registry=registry, name="mixed")
        old = [engine.connect() for _ in range(10)]
        engine.dispose()
        new = [engine.connect() for _ in range(10)]
        # Records are held in a weak set: the first one iterated is an old one in all
        # but 1 of 184,756 orders, where stopping there would undercount.
        labels = {"engine": "mixed", "state": "used"}
        assert registry.get_sample_value("sqlprobe_pool_connections", labels) == 10
        for conn in old + new:
            conn.close()
    finally:
        engine.dispose()


@pytest.mark.parametrize("below", [True, False])
def test_a_checkout_under_an_inert_wrapper_goes_to_the_one_it_replaced(
    tmp_path: Path, registry: CollectorRegistry, below: bool
) -> None:
    """Detached under a later wrapper, sqlprobe's connect passes to the one it replaced."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'inert.db'}", poolclass=QueuePool)
    pool = engine.pool
    calls: list[str] = []
    before = pool.connect

    def applications() -> Any:
        calls.append("application")
        return before()

    if below:
        pool.connect = applications  # type: ignore[method-assign]
    probe = sqlprobe.attach(engine, registry=registry, name="inert")
    ours = pool.connect

    def later() -> Any:
        calls.append("later")
        return ours()

    pool.connect = later  # type: ignore[method-assign]
    probe.detach()
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 7")).scalar() == 7
        assert calls == (["later", "application"] if below else ["later"])
        count = registry.get_sample_value(
            "sqlprobe_pool_checkout_wait_seconds_count", {"engine": "inert"}
        )
        assert not count
    finally:
        engine.dispose()


def test_hundreds_of_checkouts_settle_their_waits_without_an_internal_error(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """300 checkouts: every wait counted, and settling the pending lists raises nothing."""
    from sqlalchemy.pool import QueuePool

    engine = create_engine(f"sqlite:///{tmp_path / 'settle.db'}", poolclass=QueuePool)
    try:
        sqlprobe.attach(engine, registry=registry, name="settle")
        for _ in range(300):
            with engine.connect():
                pass
        count = registry.get_sample_value(
            "sqlprobe_pool_checkout_wait_seconds_count", {"engine": "settle"}
        )
        assert count == 300
        errors = [
            s
            for m in registry.collect()
            if m.name == "sqlprobe_internal_errors"
            for s in m.samples
            if s.name.endswith("_total") and s.value
        ]
        assert errors == []
    finally:
        engine.dispose()


def test_holds_beyond_the_bound_are_measured_but_not_tracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At MAX_HOLDS checkouts out, a further one is not tracked; all are measured."""
    from sqlalchemy.pool import QueuePool

    from sqlprobe._hooks import _pool
    from sqlprobe._hooks._pool import PoolHooks

    monkeypatch.setattr(_pool, "MAX_HOLDS", 2)
    engine = create_engine(f"sqlite:///{tmp_path / 'bound.db'}", poolclass=QueuePool)
    stages: list[Any] = []
    hooks = PoolHooks(engine, contain=stages.append, error_name=lambda exc: "E")
    recorder = _PoolRecorder(hold=60.0, idle_in_transaction=60.0)
    undo = hooks.install(recorder, recorder, recorder)  # type: ignore[arg-type]
    try:
        out = [engine.connect() for _ in range(4)]
        assert len(hooks.holders()) == 2
        assert hooks.peak() == 2
        out[3].detach()  # an untracked checkout leaves the pool: its slot is empty
        for conn in out:
            conn.close()
        assert hooks.holders() == []
        assert len([c for c in recorder.calls if c[0] == "checkin"]) == 3
        assert hooks.snapshot() == (3, 0, 15)  # 4 slots back, one of them empty
        assert stages == []
    finally:
        undo()
        engine.dispose()


def test_holders_retries_a_copy_that_another_thread_disturbed(tmp_path: Path) -> None:
    """holders() copies again when the dictionary changed size during the copy."""
    engine, hooks, _ = _pool_hooks(tmp_path / "retry.db")

    class Disturbed(dict[int, Any]):
        tries = 0

        def values(self) -> Any:
            Disturbed.tries += 1
            if Disturbed.tries == 1:
                raise RuntimeError("dictionary changed size during iteration")
            return super().values()

    hooks._holds = Disturbed({1: ["hold"]})
    assert hooks.holders() == [["hold"]]
    assert Disturbed.tries == 2
    engine.dispose()


def test_after_fork_forgets_the_parents_checkouts(tmp_path: Path) -> None:
    """In a forked child the checkouts out in the parent are forgotten, the peak restarts."""
    with _recording(tmp_path / "fork.db") as (engine, hooks, stages, _):
        conn = engine.connect()
        assert len(hooks.holders()) == 1
        hooks.after_fork()
        assert hooks.holders() == []
        assert hooks.take_peak() == 0
        conn.close()
        assert stages == []


def test_commit_and_rollback_on_a_bare_dbapi_connection_pass_through(tmp_path: Path) -> None:
    """A dialect's COMMIT or ROLLBACK on a raw DBAPI connection runs; nothing is counted."""
    with _recording(tmp_path / "raw.db") as (engine, _, stages, recorder):
        raw = engine.dialect.connect(str(tmp_path / "raw.db"))
        raw.execute("CREATE TABLE r (v INTEGER PRIMARY KEY)")
        raw.execute("INSERT INTO r VALUES (1)")
        engine.dialect.do_commit(raw)
        raw.execute("INSERT INTO r VALUES (2)")
        engine.dialect.do_rollback(raw)
        assert raw.execute("SELECT v FROM r").fetchall() == [(1,)]
        assert [c for c in recorder.calls if c[0] != "pending"] == []
        raw.execute("PRAGMA foreign_keys = ON")
        raw.execute("CREATE TABLE c (r INTEGER REFERENCES r (v) DEFERRABLE INITIALLY DEFERRED)")
        raw.execute("INSERT INTO c VALUES (9)")
        with pytest.raises(engine.dialect.loaded_dbapi.IntegrityError):
            engine.dialect.do_commit(raw)  # refused: a failed COMMIT, and no transaction
        raw.close()
        assert [c for c in recorder.calls if c[0] != "pending"] == [
            ("statement_failed", "COMMIT", "IntegrityError")
        ]
        assert stages == []


def test_a_side_connection_is_set_up_like_the_applications_and_not_counted(
    tmp_path: Path,
) -> None:
    """side_connection: a new connection outside the pool, through the app's handlers only."""
    from sqlalchemy import event

    engine, hooks, stages = _pool_hooks(tmp_path / "side.db")
    seen: list[Any] = []
    records: list[Any] = []

    @event.listens_for(engine, "do_connect")
    def made(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        records.append(record)

    @event.listens_for(engine, "connect")
    def set_up(dbapi_connection: Any, record: Any) -> None:
        seen.append(dbapi_connection)
        record.info["set_up"] = True  # handlers keep per-connection state on the record
        records.append(record)
        dbapi_connection.execute("PRAGMA user_version = 42")

    recorder = _PoolRecorder(hold=60.0, idle_in_transaction=60.0)
    undo = hooks.install(recorder, recorder, recorder)  # type: ignore[arg-type]
    try:
        with engine.connect() as pooled:
            side = hooks.side_connection()
            try:
                assert side is not pooled.connection.dbapi_connection
                assert seen[-1] is side and len(seen) == 2
                assert side.execute("PRAGMA user_version").fetchone() == (42,)
                assert engine.pool.checkedout() == 1
                # do_connect and connect of the side connection saw one record of its own
                side_record = records[-1]
                assert records[-2] is side_record
                assert side_record is not pooled.connection._connection_record
                assert side_record.info == {"set_up": True}
            finally:
                side.close()
        assert len([c for c in recorder.calls if c[0] == "connected"]) == 1  # the pooled one

        def refuse(dbapi_connection: Any, record: Any) -> None:
            seen.append(dbapi_connection)
            raise RuntimeError("no such schema")

        event.listen(engine, "connect", refuse)
        with pytest.raises(RuntimeError, match="no such schema"):
            hooks.side_connection()
        with pytest.raises(Exception, match="closed"):
            seen[-1].execute("SELECT 1")  # closed by side_connection
        assert stages == []
    finally:
        undo()
        engine.dispose()


def test_a_side_connection_of_a_collected_engine_is_refused() -> None:
    """side_connection after the engine was garbage-collected raises, naming why."""
    import gc

    from sqlprobe._hooks._pool import PoolHooks

    engine = create_engine("sqlite://")
    hooks = PoolHooks(engine, contain=lambda stage: None, error_name=lambda exc: "E")
    del engine
    gc.collect()
    with pytest.raises(RuntimeError, match=r"^the engine is gone$"):
        hooks.side_connection()


def _stepping_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool hooks' clock moves one second at each reading."""
    import itertools

    from sqlprobe._hooks import _pool

    ticks = itertools.count(1000)
    monkeypatch.setattr(_pool, "perf_counter", lambda: float(next(ticks)))


def test_a_unit_of_work_adds_up_the_wait_and_time_of_each_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two checkouts in one scope: the unit's statement time and wait are their sums."""
    _stepping_clock(monkeypatch)
    with _recording(tmp_path / "sums.db") as (engine, _, stages, recorder):
        with sqlprobe.scope("two"):
            for _ in range(2):
                with engine.connect() as conn:  # waits 1 s (two readings)
                    conn.execute(text("SELECT 1"))  # its ROLLBACK takes 1 s
        units = [c for c in recorder.calls if c[0] == "unit"]
        assert units == [("unit", "two", 0, 2.0, 2.0, 200)]
        assert stages == []


def test_a_pool_reset_commit_is_neither_a_transaction_nor_statement_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pool_reset_on_return="commit": the reset COMMIT is the pool's, not the checkout's."""
    from sqlalchemy.pool import QueuePool

    from sqlprobe._hooks._pool import PoolHooks

    _stepping_clock(monkeypatch)
    engine = create_engine(
        f"sqlite:///{tmp_path / 'reset.db'}", poolclass=QueuePool, pool_reset_on_return="commit"
    )
    stages: list[Any] = []
    hooks = PoolHooks(engine, contain=stages.append, error_name=lambda exc: "E")
    recorder = _PoolRecorder(hold=1e9, idle_in_transaction=1e9)
    undo = hooks.install(recorder, recorder, recorder)  # type: ignore[arg-type]
    try:
        with engine.connect():
            pass
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        calls = [c for c in recorder.calls if c[0] in ("checkin", "idle", "transaction")]
        # First checkout: no transaction, so all of its use is idle. Second: one
        # transaction (begin, COMMIT start and end: 2 s), and only it is statement time.
        assert calls == [
            ("checkin", 1.0),
            ("idle", 1.0),
            ("transaction", "commit", 2.0),
            ("checkin", 4.0),
            ("idle", 3.0),
        ]
        assert stages == []
    finally:
        undo()
        engine.dispose()


def test_an_invalidation_without_a_transaction_is_no_internal_error(tmp_path: Path) -> None:
    """Invalidating a connection with no transaction open counts it, and nothing else."""
    with _recording(tmp_path / "notxn.db") as (engine, _, stages, recorder):
        with engine.connect() as conn:
            conn.invalidate()
        assert [c[0] for c in recorder.calls if c[0] in ("invalidated", "transaction")] == [
            "invalidated"
        ]
        assert stages == []


def test_no_checkin_listener_where_the_pool_returns_connections_itself(
    tmp_path: Path, registry: CollectorRegistry, detach_new_probes: None
) -> None:
    """On SQLAlchemy 2.x check-ins are seen through _return_conn: no checkin listener."""
    from sqlalchemy.pool import Pool

    assert callable(getattr(Pool, "_return_conn", None))
    engine = create_engine(f"sqlite:///{tmp_path / 'nocheckin.db'}")
    try:
        sqlprobe.attach(engine, registry=registry, name="nocheckin")
        assert len(engine.pool.dispatch.checkin) == 0
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        count = registry.get_sample_value(
            "sqlprobe_pool_connection_use_seconds_count", {"engine": "nocheckin"}
        )
        assert count == 1
    finally:
        engine.dispose()


def test_a_detached_connections_transactions_are_still_timed(tmp_path: Path) -> None:
    """A connection detached from its pool keeps its begin time on itself: timed."""
    with _recording(tmp_path / "detached_txn.db") as (engine, _, stages, recorder):
        with engine.connect() as conn:
            conn.detach()
            conn.execute(text("SELECT 1"))
            conn.commit()
            conn.execute(text("SELECT 2"))
            conn.rollback()
        outcomes = [c[1] for c in recorder.calls if c[0] == "transaction"]
        assert outcomes == ["commit", "rollback"]
        assert stages == []


def test_a_failing_unit_of_work_sink_is_contained_as_stage_pool(tmp_path: Path) -> None:
    """A hold sink that raises at the end of a unit of work is counted, as stage pool."""
    engine, hooks, stages = _pool_hooks(tmp_path / "unit_fails.db")

    class UnitFails(_PoolRecorder):
        def unit(self, *args: Any) -> None:
            raise RuntimeError("sink bug")

    recorder = UnitFails(hold=1e9, idle_in_transaction=1e9)
    undo = hooks.install(recorder, recorder, recorder)  # type: ignore[arg-type]
    try:
        with sqlprobe.scope("fails"), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert stages == ["pool"]
    finally:
        undo()
        engine.dispose()


def test_a_connection_checked_out_before_attach_and_detached_leaves_an_empty_slot(
    tmp_path: Path,
) -> None:
    """Detaching a connection checked out before attach (no hold) empties its slot."""
    engine, hooks, stages = _pool_hooks(tmp_path / "early.db")
    conn = engine.connect()
    recorder = _PoolRecorder(hold=60.0, idle_in_transaction=60.0)
    undo = hooks.install(recorder, recorder, recorder)  # type: ignore[arg-type]
    try:
        conn.detach()
        conn.close()
        assert hooks.snapshot() == (0, 0, 1)
        assert stages == []
    finally:
        undo()
        engine.dispose()
