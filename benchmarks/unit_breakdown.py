"""Where sqlprobe's cost per request unit goes: its hooks taken out one at a time.

    .venv/bin/python benchmarks/unit_breakdown.py [--rounds 61] [--batch 200]
    .venv/bin/python benchmarks/unit_breakdown.py --profile   # cProfile call counts
    .venv/bin/python benchmarks/unit_breakdown.py --direct    # each piece on its own

A request unit is what ``suite.py``'s request section times: check a connection out of
the QueuePool of a file SQLite database, begin, three primary-key SELECTs, commit,
check in. Every variant but the first is sqlprobe attached with its defaults (a fresh
registry, the N+1 event sent nowhere) with one piece removed after attach, so the
difference to the full attach is what that piece costs:

* the ``pool.connect`` wrapper (checkout wait; without it the use time is not
  measured either, so the checkin listener returns after its two ``info`` pops);
* the PoolEvents ``checkin`` listener (use time);
* the ``do_begin``/``do_commit``/``do_rollback`` wrappers (transaction duration);
* N+1 counting (the collector's per-statement callback, its per-transaction slot);
* the OpenTelemetry hook in ambient mode (installed because the package is importable;
  removed by attaching without it, which leaves the metrics-only statement listener);
* the three locked histogram updates of the pool and transaction series (replaced by
  a no-op call, so this is the bisect, the lock and the increments).

``--direct`` times each piece on the smallest loop that runs it, where the noise of a
whole unit (about +-20 us per round on a shared two-core machine) does not bury a
microsecond: a pool checkout and check-in cycle with each pool hook removed in turn,
the dialect's transaction methods called directly, and the per-statement callbacks
(N+1 counting, the ambient OpenTelemetry hook, the histogram update) called with a
real execution context.

Each variant is timed per unit and per statement (one open connection) in the same
interleaved rounds; *added* is the median over rounds of (variant - bare), and
*beyond 3 statements* is added per unit - 3 x added per statement. Times are the
thread's CPU time (see ``common.interleaved``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

import sqlprobe

sys.path.insert(0, os.path.dirname(__file__))
from common import QUERY, environment, interleaved, items, machine_noise, metadata, paired_median

UNIT_QUERIES = [select(items.c.id, items.c.name).where(items.c.id == k) for k in (1, 2, 3)]
QUIET = structlog.wrap_logger(structlog.ReturnLogger())


def _attach(engine: Engine, *, otel: bool = True, **options: Any) -> sqlprobe.Probe:
    from sqlprobe._sinks import _otel

    original = _otel.build
    if not otel:
        _otel.build = lambda ctx, **kw: _otel.OtelParts(None, None, lambda: None)  # type: ignore[assignment]
    try:
        return sqlprobe.attach(engine, registry=CollectorRegistry(), logger=QUIET, **options)
    finally:
        _otel.build = original  # type: ignore[assignment]


def _no_connect_wrapper(engine: Engine, probe: sqlprobe.Probe) -> None:
    del vars(engine.pool)["connect"]


def _no_checkin(engine: Engine, probe: sqlprobe.Probe) -> None:
    # Check-ins are seen through a wrapper of the pool's _return_conn (or, on a
    # SQLAlchemy without it, the checkin event).
    if vars(engine.pool).pop("_return_conn", None) is not None:
        return
    for fn in list(engine.pool.dispatch.checkin):
        if "PoolHooks" in getattr(fn, "__qualname__", ""):
            event.remove(engine, "checkin", fn)
            return
    raise RuntimeError("no check-in hook")


def _no_transaction_wrappers(engine: Engine, probe: sqlprobe.Probe) -> None:
    for name in ("do_begin", "do_commit", "do_rollback"):
        del vars(engine.dialect)[name]


def _no_nplusone(engine: Engine, probe: sqlprobe.Probe) -> None:
    # The unit step is bound into the collector at attach: attach again without it.
    probe.detach()
    _attach(engine, n_plus_one_threshold=0)


def _no_histograms(engine: Engine, probe: sqlprobe.Probe) -> None:
    # The pool hooks bind the series' pool-sink methods at attach: attach again while
    # they are no-ops (the bound methods keep them after the class is restored).
    from sqlprobe._sinks._prometheus import EngineSeries

    probe.detach()
    saved = {n: EngineSeries.__dict__[n] for n in ("checkout", "checkin", "transaction")}
    try:
        EngineSeries.checkout = EngineSeries.checkin = lambda self, seconds: None  # type: ignore[method-assign]
        EngineSeries.transaction = lambda self, outcome, seconds: None  # type: ignore[method-assign]
        _attach(engine)
    finally:
        for name, fn in saved.items():
            setattr(EngineSeries, name, fn)


def _no_unit_hooks(engine: Engine, probe: sqlprobe.Probe) -> None:
    _no_connect_wrapper(engine, probe)
    _no_checkin(engine, probe)
    _no_transaction_wrappers(engine, probe)


Setup = Callable[[Engine], Any]


def _defaults_without(remove: Callable[[Engine, sqlprobe.Probe], None]) -> Setup:
    def setup(engine: Engine) -> Any:
        probe = _attach(engine)
        remove(engine, probe)
        return probe

    return setup


VARIANTS: list[tuple[str, Setup | None]] = [
    ("bare", None),
    ("defaults", lambda engine: _attach(engine)),
    ("defaults - pool.connect wrapper", _defaults_without(_no_connect_wrapper)),
    ("defaults - checkin listener", _defaults_without(_no_checkin)),
    ("defaults - do_begin/commit/rollback wrappers", _defaults_without(_no_transaction_wrappers)),
    ("defaults - N+1 counting", _defaults_without(_no_nplusone)),
    ("defaults - ambient OTel hook", lambda engine: _attach(engine, otel=False)),
    ("defaults - pool/tx histogram updates", _defaults_without(_no_histograms)),
    ("defaults - all per-unit hooks", _defaults_without(_no_unit_hooks)),
    (
        "metrics only (n_plus_one_threshold=0)",
        lambda engine: _attach(engine, n_plus_one_threshold=0),
    ),
]


def _database(tmp: str) -> str:
    url = f"sqlite:///{tmp}/bench.db"
    seed = create_engine(url)
    metadata.create_all(seed)
    with seed.begin() as conn:
        conn.execute(items.insert(), [{"id": i, "name": f"n{i}"} for i in range(1, 101)])
    seed.dispose()
    return url


def _unit_fn(engine: Engine) -> Callable[[int], None]:
    def unit(n: int) -> None:
        begin = engine.begin
        for _ in range(n):
            with begin() as c:
                for q in UNIT_QUERIES:
                    c.execute(q).all()

    return unit


def profile(url: str, units: int = 3000) -> None:
    """cProfile call counts per unit, bare against defaults, sqlprobe's functions listed."""
    per: dict[str, tuple[int, pstats.Stats]] = {}
    for name, setup in (("bare", None), ("defaults", VARIANTS[1][1])):
        engine = create_engine(url, poolclass=QueuePool)
        if setup is not None:
            setup(engine)
        unit = _unit_fn(engine)
        unit(200)
        prof = cProfile.Profile()
        prof.enable()
        unit(units)
        prof.disable()
        stats = pstats.Stats(prof)
        per[name] = (stats.total_calls, stats)  # type: ignore[attr-defined]
        engine.dispose()
    bare_calls, defaults_calls = per["bare"][0], per["defaults"][0]
    print(
        f"Python function calls per unit: bare {bare_calls / units:.1f}, defaults "
        f"{defaults_calls / units:.1f} (+{(defaults_calls - bare_calls) / units:.1f})"
    )
    print()
    print("sqlprobe's functions under cProfile (its overhead inflates the times):")
    print()
    print("| function | calls per unit | own µs per unit (profiled) |")
    print("|---|---:|---:|")
    stats = per["defaults"][1]
    rows = []
    for (filename, line, func), (_cc, nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if f"{os.sep}sqlprobe{os.sep}" in filename:
            rows.append((nc / units, tt / units, f"{os.path.basename(filename)}:{line} {func}"))
    for calls, own, where in sorted(rows, key=lambda r: -r[1]):
        print(f"| {where} | {calls:.2f} | {own * 1e6:.2f} |")
    print()
    print("Every function (builtins too) called more often per unit with sqlprobe attached:")
    print()
    print("| function | bare calls per unit | defaults calls per unit |")
    print("|---|---:|---:|")

    def counts(stats: pstats.Stats) -> dict[str, float]:
        out: dict[str, float] = {}
        for (filename, line, func), row in stats.stats.items():  # type: ignore[attr-defined]
            where = f"{os.path.basename(filename)}:{line} {func}" if line else func
            out[where] = out.get(where, 0.0) + row[1] / units
        return out

    bare, defaults = counts(per["bare"][1]), counts(per["defaults"][1])
    extra = sorted(((defaults[k] - bare.get(k, 0.0), k) for k in defaults), key=lambda r: -r[0])
    for more, where in extra:
        if more >= 0.5:
            print(f"| {where} | {bare.get(where, 0.0):.2f} | {defaults[where]:.2f} |")


def _table(title: str, samples: dict[str, list[float]], base: str, per: str) -> None:
    print(f"#### {title}")
    print()
    print(f"| variant | µs per {per} (median) | min | added vs {base!r} (paired median) |")
    print("|---|---:|---:|---:|")
    for name, values in samples.items():
        print(
            f"| {name} | {statistics.median(values) * 1e6:.3f} | {min(values) * 1e6:.3f} | "
            f"{paired_median(values, samples[base]) * 1e6:+.3f} |"
        )
    print()


def direct(url: str, rounds: int) -> None:
    """Each per-unit piece on its own loop (see the module docstring)."""
    from sqlprobe._analysis._nplusone import SLOT

    # 1. Checkout + check-in cycle: engine.pool.connect().close() (with the reset's
    #    do_rollback), with the pool hooks of a default attach removed in turn.
    cycles: list[tuple[str, Callable[[int], None], int]] = []
    keep: list[Any] = []
    for name, setup in [
        ("bare", None),
        ("defaults", VARIANTS[1][1]),
        ("defaults - pool.connect wrapper", _defaults_without(_no_connect_wrapper)),
        ("defaults - checkin listener", _defaults_without(_no_checkin)),
        ("defaults - do_begin/commit/rollback wrappers", VARIANTS[4][1]),
        ("defaults - pool/tx histogram updates", VARIANTS[7][1]),
        ("defaults - all per-unit hooks", VARIANTS[8][1]),
    ]:
        engine = create_engine(url, poolclass=QueuePool)
        if setup is not None:
            setup(engine)
        keep.append(engine)

        def cycle(n: int, engine: Engine = engine) -> None:
            connect = engine.pool.connect
            for _ in range(n):
                connect().close()

        cycle(500)
        cycles.append((name, cycle, 500))
    _table(
        "Pool checkout + check-in (`pool.connect().close()`, reset-on-return included)",
        interleaved(cycles, rounds),
        "bare",
        "cycle",
    )

    # 2. An empty unit: with engine.begin(): pass (checkout, begin, commit, check-in).
    empties: list[tuple[str, Callable[[int], None], int]] = []
    for name, setup in [
        ("bare", None),
        ("defaults", VARIANTS[1][1]),
        ("defaults - pool.connect wrapper", _defaults_without(_no_connect_wrapper)),
        ("defaults - checkin listener", _defaults_without(_no_checkin)),
        ("defaults - do_begin/commit/rollback wrappers", VARIANTS[4][1]),
        ("defaults - pool/tx histogram updates", VARIANTS[7][1]),
        ("defaults - all per-unit hooks", VARIANTS[8][1]),
    ]:
        engine = create_engine(url, poolclass=QueuePool)
        if setup is not None:
            setup(engine)
        keep.append(engine)

        def empty_unit(n: int, engine: Engine = engine) -> None:
            begin = engine.begin
            for _ in range(n):
                with begin():
                    pass

        empty_unit(500)
        empties.append((name, empty_unit, 500))
    _table(
        "Empty unit (`with engine.begin(): pass`: checkout, begin, commit, check-in)",
        interleaved(empties, rounds),
        "bare",
        "unit",
    )

    # 3. The dialect's transaction methods on a checked-out connection.
    txns: list[tuple[str, Callable[[int], None], int]] = []
    for name, setup in [("bare", None), ("defaults", VARIANTS[1][1])]:
        engine = create_engine(url, poolclass=QueuePool)
        if setup is not None:
            setup(engine)
        fairy = engine.raw_connection()
        keep.append((engine, fairy))

        def txn(n: int, dialect: Any = engine.dialect, fairy: Any = fairy) -> None:
            begin, commit, rollback = dialect.do_begin, dialect.do_commit, dialect.do_rollback
            for _ in range(n):
                begin(fairy)
                commit(fairy)
                rollback(fairy)  # the pool's reset-on-return after a commit

        txn(500)
        txns.append((name, txn, 2000))
    _table(
        "`do_begin` + `do_commit` + `do_rollback` (as after a commit) called directly",
        interleaved(txns, rounds),
        "bare",
        "transaction",
    )

    # 4. Per-statement callbacks with a real execution context, and one histogram update.
    engine = create_engine(url, poolclass=QueuePool)
    probe = _attach(engine)
    conn = engine.connect()
    conn.begin()
    result = conn.execute(UNIT_QUERIES[0])
    result.all()
    context = result.context
    statement = context.statement
    collector = probe.collector
    assert collector is not None
    entry = collector._cache.get(statement) or collector._miss(statement)
    shape = entry[0]
    detector = collector.unit
    assert detector is not None
    trace = collector.trace
    assert trace is not None
    series = probe._series
    root = context.root_connection
    perf = time.perf_counter

    def nothing(n: int) -> None:
        for _ in range(n):
            pass

    def nplusone_same(n: int) -> None:
        for _ in range(n):
            detector(shape, statement, context, None)

    def nplusone_new(n: int) -> None:
        slots = root.__dict__
        for _ in range(n):
            slots.pop(SLOT, None)
            detector(shape, statement, context, None)

    def ambient(n: int) -> None:
        start = perf()
        for _ in range(n):
            trace(shape, start, 0.0001, 0, context, None)

    def histogram(n: int) -> None:
        observe = series.checkin
        for _ in range(n):
            observe(0.0001)

    cursor = context.cursor
    # The collector's timed hook around a driver call that does nothing.
    observe_statement = collector.timed(lambda *_args: None, batched=False)

    def collector_observe(n: int) -> None:
        for _ in range(n):
            observe_statement(cursor, statement, None, context)

    def accumulators(n: int) -> None:
        record = series.observe
        stats = entry[1]
        for _ in range(n):
            record(stats, 0.0001, 1, None)

    def clock_pair(n: int) -> None:
        for _ in range(n):
            perf()
            perf()

    calls: list[tuple[str, Callable[[int], None], int]] = [
        ("empty loop", nothing, 20000),
        ("N+1 callback, slot of this transaction exists", nplusone_same, 20000),
        ("N+1 callback, first SELECT of a transaction (new slot)", nplusone_new, 20000),
        ("ambient OTel trace() (no lookup due)", ambient, 20000),
        ("EngineSeries.checkin (one locked histogram update)", histogram, 20000),
        ("collector.timed hook (all of it, N+1 callback included)", collector_observe, 20000),
        ("EngineSeries.observe (the statement accumulators)", accumulators, 20000),
        ("two perf_counter() reads", clock_pair, 20000),
    ]
    _table(
        "Callbacks called directly (the loop's own cost is the empty loop)",
        interleaved(calls, rounds),
        "empty loop",
        "call",
    )
    conn.close()
    probe.detach()
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=61)
    parser.add_argument("--batch", type=int, default=200, help="units per batch")
    parser.add_argument("--profile", action="store_true", help="cProfile call counts only")
    parser.add_argument("--direct", action="store_true", help="each piece on its own loop")
    parser.add_argument("--json", help="also write every sample (seconds) to this file")
    args = parser.parse_args(argv)
    print(environment())
    print(machine_noise())
    print()
    with tempfile.TemporaryDirectory(prefix="sqlprobe-bench-") as tmp:
        url = _database(tmp)
        if args.profile:
            profile(url)
            return 0
        if args.direct:
            direct(url, args.rounds)
            print(machine_noise())
            return 0
        runs: list[tuple[str, Callable[[int], None], int]] = []
        held = []
        for name, setup in VARIANTS:
            engine = create_engine(url, poolclass=QueuePool)
            probe = setup(engine) if setup is not None else None
            conn = engine.connect()
            held.append((engine, conn, probe))
            unit = _unit_fn(engine)

            def statement(n: int, conn: Any = conn) -> None:
                execute = conn.execute
                for _ in range(n):
                    execute(QUERY).all()

            unit(100)
            statement(200)
            runs.append((f"unit|{name}", unit, args.batch))
            runs.append((f"stmt|{name}", statement, args.batch * 5))
        samples = interleaved(runs, args.rounds)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(samples, f)
        for engine, conn, _probe in held:
            conn.close()
            engine.dispose()

    bare_u, bare_s = samples["unit|bare"], samples["stmt|bare"]
    full_u, full_s = samples["unit|defaults"], samples["stmt|defaults"]
    print(f"{args.rounds} rounds × ({args.batch} units + {args.batch * 5} statements)")
    print()
    print(
        "| variant | unit µs | added per unit µs | added per statement µs "
        "| beyond 3 statements µs | the piece's share per unit µs |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, _ in VARIANTS:
        u, s = samples[f"unit|{name}"], samples[f"stmt|{name}"]
        au, as_ = paired_median(u, bare_u), paired_median(s, bare_s)
        share = paired_median(full_u, u) if name.startswith("defaults - ") else None
        print(
            f"| {name} | {statistics.median(u) * 1e6:.1f} | {au * 1e6:+.2f} | "
            f"{as_ * 1e6:+.2f} | {(au - 3 * as_) * 1e6:+.2f} | "
            + (f"{share * 1e6:+.2f}" if share is not None else "")
            + " |"
        )
    print()
    print(
        "*share*: the median over rounds of (defaults - variant), what removing the piece "
        f"saved per unit; bare statement {statistics.median(bare_s) * 1e6:.2f} µs, defaults "
        f"+{paired_median(full_s, bare_s) * 1e6:.2f} µs per statement."
    )
    print()
    print(machine_noise())
    return 0


if __name__ == "__main__":
    sys.exit(main())
