"""sqlprobe's benchmark suite: every figure of benchmarks/RESULTS.md, in one run.

    .venv/bin/python benchmarks/suite.py --write benchmarks/RESULTS.md
    .venv/bin/python benchmarks/suite.py --quick          # a short smoke run

Sections:

1. Per-statement cost, variants interleaved round by round (bare SQLAlchemy; sqlprobe
   metrics only; + pool and transaction metrics; + spans; + sqlcommenter;
   opentelemetry-instrumentation-sqlalchemy without and with its commenter), on SQLite
   in-memory and PostgreSQL, Core and ORM, sync and async (asyncpg). Spans use the same
   SDK set-up for both tools: a TracerProvider with a BatchSpanProcessor and an exporter
   that drops everything.
2. Checkout + statement (a connection from the pool per statement), where the pool
   metrics do their work.
3. Request unit: check a connection out of a QueuePool, begin, three primary-key
   SELECTs, commit, check in; on a file SQLite database and on PostgreSQL, interleaved
   round by round with the single-statement loop on the same engines, so that the
   cost beyond three statements' own comes from one run.
4. Fingerprinting: a new 1 KB statement; a cached lookup.
5. /metrics scrape time with 500 shapes on each of 3 engines.
6. Memory after 1,000,000 distinct literal-laden statement shapes.
7. Throughput with 1, 2, 4 and 8 threads against PostgreSQL, bare vs attached.

Medians everywhere; min and max where they mean something. ``--only request`` (a comma
list of section names) runs some sections alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import bindparam, create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session
from sqlalchemy.pool import QueuePool

import sqlprobe

sys.path.insert(0, os.path.dirname(__file__))
import contextlib

from common import PG_URL, QUERY, environment, items, machine_noise, metadata

PG_ASYNC_URL = PG_URL.replace("+psycopg", "+asyncpg")


class _Base(DeclarativeBase):
    pass


class Item(_Base):
    __table__ = items
    id: Mapped[int]
    name: Mapped[str]


ORM_QUERY = select(Item).where(Item.id == 1)
#: Extra ``attach()`` options of the sqlprobe variants (``instructions.py`` stretches
#: the time thresholds under callgrind with it); empty for every timed run.
ATTACH_OPTIONS: dict[str, Any] = {}


# -- variants ---------------------------------------------------------------------------

Teardown = Callable[[], None]


@dataclass
class Variant:
    name: str
    setup: Callable[[Any], Teardown]
    #: Run after each timed batch, untimed: the span variants drain their provider's
    #: batch queue here, so that exporting one variant's spans never lands in the next
    #: variant's timing (which favoured whichever variant followed a span-less one).
    settle: Callable[[], Any] | None = None


def _tracer_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class NullExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    # A queue large enough that no span is dropped between exports at full speed.
    provider.add_span_processor(
        BatchSpanProcessor(NullExporter(), max_queue_size=1 << 16, schedule_delay_millis=200)
    )
    return provider


def _with_parent(provider: Any) -> Callable[[], Any]:
    """A sampled parent span, as in a traced request, so every variant makes its spans."""
    tracer = provider.get_tracer("bench")
    return lambda: tracer.start_as_current_span("request")


def _bare(engine: Any) -> Teardown:
    return lambda: None


def _hooks_floor(engine: Any) -> Teardown:
    """The least that exact checkout-wait, use and transaction times can cost.

    No sqlprobe: the same hook points its pool metrics use (the pool instance's
    ``connect`` and ``_return_conn``, the dialect instance's ``do_begin``,
    ``do_commit`` and ``do_rollback``), each with the smallest body that still measures
    its value exactly (clock reads, one store on the connection record, one append).
    What sqlprobe's pool hooks cost beyond this is theirs; this much is the price of the
    hook points themselves.
    """
    pool, dialect = engine.pool, engine.dialect
    cls_connect, cls_return = type(pool).connect, type(pool)._return_conn
    begin, commit, rollback = dialect.do_begin, dialect.do_commit, dialect.do_rollback
    waits: list[float] = []
    uses: list[float] = []
    txns: list[float] = []
    clock = time.perf_counter

    def connect() -> Any:
        start = clock()
        conn = cls_connect(pool)
        now = clock()
        waits.append(now - start)
        conn._connection_record.__dict__["_floor_out"] = now
        if len(waits) > 4096:
            del waits[:], uses[:], txns[:]
        return conn

    def _return_conn(record: Any) -> None:
        out = record.__dict__.pop("_floor_out", None)
        if out is not None:
            uses.append(clock() - out)
        cls_return(pool, record)

    def do_begin(connection: Any) -> None:
        connection._connection_record.__dict__["_floor_txn"] = clock()
        begin(connection)

    def ended(original: Callable[[Any], None]) -> Callable[[Any], None]:
        def end(connection: Any) -> None:
            begun = connection._connection_record.__dict__.pop("_floor_txn", None)
            original(connection)
            if begun is not None:
                txns.append(clock() - begun)

        return end

    vars(pool).update(connect=connect, _return_conn=_return_conn)
    vars(dialect).update(do_begin=do_begin, do_commit=ended(commit), do_rollback=ended(rollback))

    def teardown() -> None:
        for name in ("connect", "_return_conn"):
            vars(pool).pop(name, None)
        for name in ("do_begin", "do_commit", "do_rollback"):
            vars(dialect).pop(name, None)

    return teardown


def _metrics_only(engine: Any) -> Teardown:
    # The suite measures the pool hooks' share separately: take them off here only.
    probe = sqlprobe.attach(
        engine, **ATTACH_OPTIONS, registry=CollectorRegistry(), n_plus_one_threshold=0
    )
    for name in ("connect", "recreate", "_return_conn"):
        vars(engine.pool).pop(name, None)
    for name in ("do_begin", "do_commit", "do_rollback"):
        vars(engine.dialect).pop(name, None)
    for fn in list(engine.pool.dispatch.checkin):
        if "PoolHooks" in getattr(fn, "__qualname__", ""):
            event.remove(engine, "checkin", fn)
    return probe.detach


def _metrics_pool(engine: Any) -> Teardown:
    probe = sqlprobe.attach(
        engine, **ATTACH_OPTIONS, registry=CollectorRegistry(), n_plus_one_threshold=0
    )
    return probe.detach


def _default(engine: Any) -> Teardown:
    import structlog

    # A benchmark loop repeats one SELECT in a transaction: N+1 detection reports it
    # (once); the event goes nowhere so that only its cost is measured.
    quiet = structlog.wrap_logger(structlog.ReturnLogger())
    probe = sqlprobe.attach(engine, **ATTACH_OPTIONS, registry=CollectorRegistry(), logger=quiet)
    return probe.detach


def _spans(provider: Any, commenter: bool | str = False) -> Callable[[Any], Teardown]:
    def setup(engine: Any) -> Teardown:
        probe = sqlprobe.attach(
            engine,
            registry=CollectorRegistry(),
            **ATTACH_OPTIONS,
            tracer_provider=provider,
            sqlcommenter=commenter,
            n_plus_one_threshold=0,
        )
        return probe.detach

    return setup


def _otel_instrumentation(provider: Any, commenter: bool) -> Callable[[Any], Teardown]:
    def setup(engine: Any) -> Teardown:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        instrumentor = SQLAlchemyInstrumentor()
        # The instrumentor is a process-wide singleton that silently ignores a second
        # instrument() call; clear its flag so each variant's engine is instrumented.
        instrumentor._is_instrumented_by_opentelemetry = False
        sync = getattr(engine, "sync_engine", engine)
        instrumentor.instrument(
            engine=sync,
            tracer_provider=provider,
            enable_commenter=commenter,
            skip_dep_check=True,
        )

        def teardown() -> None:
            # uninstrument() removes every engine's listeners at once (a class-level
            # list); later teardowns then find nothing to remove.
            instrumentor._is_instrumented_by_opentelemetry = True
            with contextlib.suppress(Exception):
                instrumentor.uninstrument()

        return teardown

    return setup


#: Per-engine ``do_orm_execute`` listeners for the Sessions of the ORM modes.
_SESSION_LISTENERS: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = (
    weakref.WeakKeyDictionary()
)


def _default_orm_listener(engine: Any) -> Teardown:
    """Defaults plus an empty ``do_orm_execute`` listener: what naming cost before.

    The listener goes on this variant's Session only (``_SESSION_LISTENERS``, read by the ORM
    modes of :func:`per_statement`): on the Session class it would slow every variant.
    """
    teardown = _default(engine)

    def listener(state: Any) -> None:
        pass

    _SESSION_LISTENERS[engine] = listener
    return teardown


def orm_unit_step(rounds: int, batch: int) -> str:
    """The N+1 unit step alone, called on a real ORM primary-key statement's context.

    The loop tables above carry the machine's noise (tens of µs per round when other
    work shares the cores); this times the detector's own per-statement work in the
    state of the primary-key loop (a Session unit, the shape already reported), against
    an empty call with the same arguments, in interleaved rounds of thread CPU time.
    """
    import structlog

    engine = create_engine("sqlite://")
    _fill(engine)
    quiet = structlog.wrap_logger(structlog.ReturnLogger())
    probe = sqlprobe.attach(engine, **ATTACH_OPTIONS, registry=CollectorRegistry(), logger=quiet)
    seen: list[tuple[Any, Any, Any]] = []

    def grab(conn: Any, cursor: Any, statement: Any, params: Any, context: Any, many: Any) -> None:
        seen.append((statement, context, params))

    session = Session(engine)
    query = select(Item).where(Item.id == bindparam("id"))
    for i in range(1, 11):  # past both thresholds: the steady state of the loop
        session.execute(query, {"id": i}).scalars().all()
    event.listen(engine, "after_cursor_execute", grab)
    session.execute(query, {"id": 11}).scalars().all()
    event.remove(engine, "after_cursor_execute", grab)
    statement, context, params = seen[-1]
    collector = probe.collector
    assert collector is not None and collector.unit is not None
    unit = collector.unit
    shape = collector._cache[statement][0]

    def empty(shape: Any, statement: Any, context: Any, parameters: Any) -> None:
        pass

    samples: dict[str, list[float]] = {"unit": [], "empty": []}
    clock = time.thread_time
    for _ in range(rounds):
        for name, fn in (("unit", unit), ("empty", empty)):
            start = clock()
            for _ in range(batch):
                fn(shape, statement, context, params)
            samples[name].append((clock() - start) / batch)
    session.close()
    probe.detach()
    engine.dispose()
    added = statistics.median(a - b for a, b in zip(samples["unit"], samples["empty"], strict=True))
    return (
        f"The N+1 unit step alone on an ORM primary-key statement's context (a Session "
        f"unit, steady state; {rounds}×{batch} calls against an empty call): "
        f"**{added * 1e6:+.2f} µs** per statement."
    )


def orm_variants() -> list[Variant]:
    """The ORM section's variants: N+1 detection's own cost on the ORM path."""
    return [
        Variant("bare", _bare),
        Variant("sqlprobe metrics only", _metrics_only),
        Variant("sqlprobe + pool/tx metrics", _metrics_pool),
        Variant("sqlprobe defaults (+ N+1)", _default),
        Variant("defaults + an empty do_orm_execute listener", _default_orm_listener),
    ]


def variants(with_otel: bool) -> list[Variant]:
    out = [
        Variant("bare", _bare),
        Variant("sqlprobe metrics only", _metrics_only),
        Variant("sqlprobe + pool/tx metrics", _metrics_pool),
        Variant("sqlprobe defaults (+ N+1)", _default),
    ]
    if with_otel:
        provider = _tracer_provider()
        flush = provider.force_flush
        out += [
            Variant("sqlprobe + spans", _spans(provider), flush),
            Variant("sqlprobe + spans + sqlcommenter", _spans(provider, True), flush),
            Variant(
                "otel-instrumentation-sqlalchemy", _otel_instrumentation(provider, False), flush
            ),
            Variant(
                "otel-instrumentation-sqlalchemy + commenter",
                _otel_instrumentation(provider, True),
                flush,
            ),
        ]
    return out


def _baseline_variant(path: str) -> Variant:
    """``sqlprobe defaults`` of another checkout (``--baseline DIR``), loaded beside this one.

    The other checkout's package is imported under the name ``sqlprobe_baseline`` (its
    modules import each other relatively), so the code before and after a change are
    timed in the same interleaved rounds of one run.
    """
    import importlib.util

    package = os.path.join(os.path.abspath(path), "sqlprobe")
    spec = importlib.util.spec_from_file_location(
        "sqlprobe_baseline",
        os.path.join(package, "__init__.py"),
        submodule_search_locations=[package],
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sqlprobe_baseline"] = module
    spec.loader.exec_module(module)

    def setup(engine: Any) -> Teardown:
        import structlog

        quiet = structlog.wrap_logger(structlog.ReturnLogger())
        probe = module.attach(engine, registry=CollectorRegistry(), logger=quiet)
        return probe.detach  # type: ignore[no-any-return]

    return Variant(f"baseline {os.path.basename(os.path.abspath(path))}: defaults", setup)


def _otel_available() -> bool:
    try:
        import opentelemetry.instrumentation.sqlalchemy
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


# -- per-statement -----------------------------------------------------------------------


@dataclass
class Series:
    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def _fill(engine: Engine) -> None:
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(items.insert(), [{"id": i, "name": f"n{i}"} for i in range(1, 101)])


def _session(engine: Engine) -> Session:
    session = Session(engine)
    listener = _SESSION_LISTENERS.get(engine)
    if listener is not None:
        event.listen(session, "do_orm_execute", listener)
    return session


def per_statement(
    url: str,
    vs: list[Variant],
    *,
    mode: str,
    rounds: int,
    batch: int,
    parent: Any = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Series]:
    """Median seconds per statement for each variant, interleaved round by round.

    ``clock`` is wall time by default; the ORM section passes the thread's CPU time,
    which other processes on a loaded machine do not inflate.
    """
    in_memory = url == "sqlite://"
    if not in_memory:
        seed = create_engine(url)
        _fill(seed)
        seed.dispose()
    runners: list[tuple[Variant, Callable[[int], None], Teardown]] = []
    for v in vs:
        engine = create_engine(url)
        if in_memory:
            _fill(engine)
        teardown = v.setup(engine)
        if mode == "core":
            conn = engine.connect()

            def run(n: int, conn: Any = conn) -> None:
                execute = conn.execute
                for _ in range(n):
                    execute(QUERY).all()

            close: Callable[[], None] = conn.close
        elif mode == "orm":
            session = _session(engine)

            def run(n: int, session: Session = session) -> None:
                execute = session.execute
                for _ in range(n):
                    execute(ORM_QUERY).scalars().all()
                    session.expunge_all()

            close = session.close
        elif mode == "orm-pk":
            # The ORM primary-key loop of an application: one Session, a different id
            # each time (the rows stay in the identity map; execute() still runs SQL).
            session = _session(engine)
            query = select(Item).where(Item.id == bindparam("id"))

            def run(n: int, session: Session = session, query: Any = query) -> None:
                execute = session.execute
                for i in range(n):
                    execute(query, {"id": i % 100 + 1}).scalars().all()

            close = session.close
        elif mode == "checkout":

            def run(n: int, engine: Engine = engine) -> None:
                for _ in range(n):
                    with engine.connect() as c:
                        c.execute(QUERY).all()

            close = lambda: None  # noqa: E731
        else:
            raise ValueError(mode)
        run(200)

        def done(
            teardown: Teardown = teardown, close: Any = close, engine: Engine = engine
        ) -> None:
            close()
            teardown()
            engine.dispose()

        runners.append((v, run, done))
    results = {v.name: Series(v.name) for v in vs}
    perf = clock
    gc.disable()
    try:
        for r in range(rounds):
            # Each round starts one variant later, so that no variant always runs
            # first after the collection below (or always after the same neighbour).
            k = r % len(runners)
            for v, run, _ in runners[k:] + runners[:k]:
                if parent is not None:
                    with parent():
                        start = perf()
                        run(batch)
                        elapsed = perf() - start
                else:
                    start = perf()
                    run(batch)
                    elapsed = perf() - start
                if v.settle is not None:
                    v.settle()
                results[v.name].samples.append(elapsed / batch)
            gc.enable()
            gc.collect()
            gc.disable()
    finally:
        gc.enable()
        for _, _, done in runners:
            done()
    return [results[v.name] for v in vs]


def per_statement_async(
    url: str, vs: list[Variant], *, rounds: int, batch: int, parent: Any = None
) -> list[Series]:
    """The same for an AsyncEngine (asyncpg)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    seed = create_engine(PG_URL)
    _fill(seed)
    seed.dispose()

    async def main() -> list[Series]:
        runners = []
        for v in vs:
            engine = create_async_engine(url)
            teardown = v.setup(engine)
            conn = await engine.connect()
            for _ in range(200):
                (await conn.execute(QUERY)).all()
            runners.append((v, engine, conn, teardown))
        results = {v.name: Series(v.name) for v in vs}
        perf = time.perf_counter
        for r in range(rounds):
            k = r % len(runners)
            for v, _e, conn, _t in runners[k:] + runners[:k]:
                ctx = parent() if parent is not None else None
                if ctx is not None:
                    ctx.__enter__()
                start = perf()
                for _ in range(batch):
                    (await conn.execute(QUERY)).all()
                elapsed = perf() - start
                if ctx is not None:
                    ctx.__exit__(None, None, None)
                if v.settle is not None:
                    v.settle()
                results[v.name].samples.append(elapsed / batch)
        for _v, engine, conn, teardown in runners:
            await conn.close()
            teardown()
            await engine.dispose()
        return [results[v.name] for v in vs]

    return asyncio.run(main())


# -- request unit ------------------------------------------------------------------------

#: The three statements of a request unit: one shape, three keys (compiled once, so
#: SQLAlchemy's statement cache serves all three as the single-statement loop's does).
UNIT_QUERIES = [select(items.c.id, items.c.name).where(items.c.id == k) for k in (1, 2, 3)]


def request_unit(
    url: str, vs: list[Variant], *, rounds: int, batch: int, parent: Any = None
) -> tuple[list[Series], list[Series]]:
    """Seconds per request unit and per statement for each variant, in the same rounds.

    A unit is what a web request does with the database: ``with engine.begin()`` checks
    a connection out of the engine's QueuePool and begins, three primary-key SELECTs
    run, the commit and the check-in follow. Each variant's engine also keeps one
    connection open for the single-statement loop (as in the per-statement tables),
    and each round times a batch of units and a batch of statements per variant, so
    the unit's cost beyond its three statements is a difference of figures measured
    under the same conditions. The unit only reads, so a file database never syncs.
    """
    seed = create_engine(url, poolclass=QueuePool)
    _fill(seed)
    seed.dispose()
    queries = UNIT_QUERIES
    runners: list[tuple[Variant, Callable[[int], None], Callable[[int], None], Teardown]] = []
    for v in vs:
        engine = create_engine(url, poolclass=QueuePool)
        teardown = v.setup(engine)
        conn = engine.connect()

        def unit(n: int, engine: Engine = engine) -> None:
            begin = engine.begin
            for _ in range(n):
                with begin() as c:
                    for q in queries:
                        c.execute(q).all()

        def statement(n: int, conn: Any = conn) -> None:
            execute = conn.execute
            for _ in range(n):
                execute(QUERY).all()

        unit(100)
        statement(200)

        def done(teardown: Teardown = teardown, conn: Any = conn, engine: Engine = engine) -> None:
            conn.close()
            teardown()
            engine.dispose()

        runners.append((v, unit, statement, done))
    units = {v.name: Series(v.name) for v in vs}
    statements = {v.name: Series(v.name) for v in vs}
    # A statement costs about a fifth of a unit: five times as many take about as long.
    sbatch = batch * 5
    # CPU time of this thread, not wall time: see common.interleaved. On PostgreSQL it
    # leaves out the server's work and the waits on it, which sqlprobe does not add to.
    perf = time.thread_time
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(runners)
            for v, run_units, run_statements, _ in runners[k:] + runners[:k]:
                for run, n, into in (
                    (run_units, batch, units),
                    (run_statements, sbatch, statements),
                ):
                    ctx = parent() if parent is not None else contextlib.nullcontext()
                    with ctx:
                        start = perf()
                        run(n)
                        elapsed = perf() - start
                    if v.settle is not None:
                        v.settle()
                    into[v.name].samples.append(elapsed / n)
            gc.enable()
            gc.collect()
            gc.disable()
    finally:
        gc.enable()
        for *_, finish in runners:
            finish()
    return [units[v.name] for v in vs], [statements[v.name] for v in vs]


def request_table(title: str, units: list[Series], statements: list[Series]) -> str:
    bare_u, bare_s = units[0], statements[0]
    out = [
        f"#### {title}",
        "",
        "| variant | unit µs | added µs per unit | ratio | added µs per statement "
        "| added beyond 3 statements µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for u, s in zip(units, statements, strict=True):
        added_u, added_s = _paired(u, bare_u), _paired(s, bare_s)
        out.append(
            f"| {u.name} | {u.median * 1e6:.1f} | {added_u * 1e6:+.2f} | "
            f"{1 + added_u / bare_u.median:.3f} | {added_s * 1e6:+.2f} | "
            f"{(added_u - 3 * added_s) * 1e6:+.2f} |"
        )
    out += [
        "",
        "Times are the benchmark thread's CPU time (`time.thread_time`; on PostgreSQL the "
        "client's share only). *unit*: check out of the QueuePool, begin, three primary-key "
        "SELECTs, commit, check in. *added*: the median over rounds of (variant − bare) in "
        "the same round; *ratio*: 1 + added / bare; per statement from the "
        "single-statement loop (one open connection) on the same engines in the same rounds "
        f"(bare: {bare_s.median * 1e6:.2f} µs). *beyond 3 statements*: added per unit − "
        "3 × added per statement, i.e. what checkout, transaction and check-in hooks cost.",
    ]
    return "\n".join(out)


def _reachable(url: str) -> bool:
    try:
        engine = create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception:
        return False
    return True


def _paired(a: Series, b: Series) -> float:
    """Median over rounds of ``a - b``: both ran in the same round, seconds apart.

    On PostgreSQL one round can be 30 % slower than the next (the server shares the
    two cores), which swamps a difference of medians; a per-round difference cancels
    that drift, since every variant of a round runs under the same conditions.
    """
    return statistics.median(x - y for x, y in zip(a.samples, b.samples, strict=True))


def table(title: str, rows: list[Series]) -> str:
    bare = rows[0]
    out = [
        f"#### {title}",
        "",
        "| variant | median µs | min µs | max µs | added µs | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by: dict[str, Series] = {r.name: r for r in rows}
    for r in rows:
        out.append(
            f"| {r.name} | {r.median * 1e6:.2f} | {min(r.samples) * 1e6:.2f} | "
            f"{max(r.samples) * 1e6:.2f} | {_paired(r, bare) * 1e6:+.2f} | "
            f"{r.median / bare.median:.3f} |"
        )
    out += [
        "",
        "*added*: the median over rounds of (variant − bare) in the same round.",
    ]
    spans, inst = by.get("sqlprobe + spans"), by.get("otel-instrumentation-sqlalchemy")
    if spans is None or inst is None:
        return "\n".join(out)
    ours, theirs = _paired(spans, bare), _paired(inst, bare)
    out.append("")
    out.append(
        f"Spans: sqlprobe adds {ours * 1e6:.2f} µs, the OTel instrumentation "
        f"{theirs * 1e6:.2f} µs: **{ours / theirs:.2f}×** (target ≤ 0.6×)."
    )
    spans_c = by.get("sqlprobe + spans + sqlcommenter")
    inst_c = by.get("otel-instrumentation-sqlalchemy + commenter")
    if spans_c is not None and inst_c is not None:
        ours_c, theirs_c = _paired(spans_c, bare), _paired(inst_c, bare)
        out.append(
            f"With sqlcommenter: sqlprobe adds {ours_c * 1e6:.2f} µs, the instrumentation "
            f"{theirs_c * 1e6:.2f} µs: **{ours_c / theirs_c:.2f}×** in total."
        )
        own, their_own = _paired(spans_c, spans), _paired(inst_c, inst)
        if their_own > 0:
            out.append(
                f"The commenter's own cost (on top of spans): sqlprobe {own * 1e6:+.2f} µs, "
                f"the instrumentation {their_own * 1e6:+.2f} µs: "
                f"**{own / their_own:.2f}×** (target ≤ 0.3×)."
            )
    return "\n".join(out)


# -- fingerprinting, scrape, memory, threads -------------------------------------------


def fingerprinting(n: int) -> str:
    from sqlprobe._core._fingerprint import analyze

    def statement(i: int) -> str:
        cols = ", ".join(f"t.col_{j} AS c{j}_{i}" for j in range(20))
        sql = (
            f"SELECT {cols} FROM orders_{i % 7} AS t WHERE t.id IN ({i}, {i + 1}, {i + 2}) "
            f"AND t.note = 'customer {i} said ''hello''' AND t.amount > {i}.25 "
            f"ORDER BY t.created_at DESC LIMIT 50"
        )
        return (sql + " " * 1024)[:1024]

    texts = [statement(i) for i in range(n)]
    # In rounds, with the median of the round medians reported: this machine's CPU
    # slows down by up to 1.8x in bursts (see "machine noise" above). The rounds run
    # back to back: a pause between them (tried) lets the CPU idle, and the first
    # statements after it ran about 1.5x slower, every round.
    new: list[float] = []
    round_medians: list[float] = []
    size = max(1, n // 15)
    for k in range(0, n, size):
        times = []
        for t in texts[k : k + size]:
            start = time.perf_counter()
            analyze(t)
            times.append(time.perf_counter() - start)
        new += times
        round_medians.append(statistics.median(times))

    registry = CollectorRegistry()
    engine = create_engine("sqlite://")
    probe = sqlprobe.attach(engine, registry=registry)
    collector = probe.collector
    assert collector is not None
    hot = texts[0]
    collector.entry(hot)
    cached: list[float] = []
    for _ in range(21):
        start = time.perf_counter()
        for _ in range(10_000):
            collector.entry(hot)
        cached.append((time.perf_counter() - start) / 10_000)
    probe.detach()
    return (
        "#### Fingerprinting\n\n"
        "| case | median µs | min µs | max µs | target |\n|---|---:|---:|---:|---|\n"
        f"| new 1 KB statement (normalize + hash) | {statistics.median(round_medians) * 1e6:.1f} | "
        f"{min(new) * 1e6:.1f} | {max(new) * 1e6:.1f} | ≤ 30 µs |\n"
        f"| cached statement (cache lookup) | {statistics.median(cached) * 1e6:.3f} | "
        f"{min(cached) * 1e6:.3f} | {max(cached) * 1e6:.3f} | ≤ 0.5 µs |"
    )


def scrape(shapes: int = 500, engines: int = 3) -> str:
    registry = CollectorRegistry()
    probes = []
    for e in range(engines):
        engine = create_engine("sqlite://")
        probes.append((engine, sqlprobe.attach(engine, registry=registry, name=f"db{e}")))
        with engine.connect() as conn:
            for i in range(shapes):
                conn.exec_driver_sql(f"SELECT {i} AS col_{i}")
    body = generate_latest(registry)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    times = []
    for _ in range(31):
        start = time.perf_counter()
        generate_latest(registry)
        times.append(time.perf_counter() - start)
    for engine, probe in probes:
        probe.detach()
        engine.dispose()
    return (
        "#### /metrics scrape\n\n"
        f"{engines} engines × {shapes} shapes: {series} series, {len(body) / 1024:.0f} KiB; "
        f"`generate_latest` median **{statistics.median(times) * 1e3:.1f} ms** "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}; target ≤ 50 ms)."
    )


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 1024 / 1024


def memory(n: int) -> str:
    registry = CollectorRegistry()
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    probe = sqlprobe.attach(engine, registry=registry)
    gc.collect()
    before = _rss_mb()
    start = time.perf_counter()
    with engine.connect() as conn:
        for i in range(n):
            conn.exec_driver_sql(f"SELECT {i} AS c_{i}, 'secret-{i}' AS note_{i}, {i}.5 AS x")
    elapsed = time.perf_counter() - start
    gc.collect()
    after = _rss_mb()
    assert probe.collector is not None
    entries, chars = probe.collector.cache_size()
    stats = probe.statements()
    other = next((s.calls for s in stats if s.fingerprint == "_other"), 0)
    probe.detach()
    engine.dispose()
    return (
        "#### Memory under distinct shapes\n\n"
        f"{n:,} distinct statement shapes (each with literals) through one engine in "
        f"{elapsed:.0f} s: RSS {before:.1f} → {after:.1f} MB, growth "
        f"**{after - before:.1f} MB** (target ≤ 50 MB); text cache {entries} entries / "
        f"{chars / 1024:.0f} KiB; {len(stats) - (1 if other else 0)} shapes exported, "
        f"{other:,} statements counted under `_other`."
    )


class _Workers:
    """``threads`` threads that stay connected to ``engine`` and run in timed slices.

    Keeping the threads and connections across slices means a slice measures only
    statements (no thread start, pool checkout or transaction begin in the window).
    """

    def __init__(self, engine: Engine, threads: int) -> None:
        self.threads = threads
        self.start = threading.Barrier(threads + 1)
        self.finish = threading.Barrier(threads + 1)
        self.deadline = 0.0
        self.counts = [0] * threads
        self.quit = False
        self.pool = [
            threading.Thread(target=self._work, args=(engine, k), daemon=True)
            for k in range(threads)
        ]
        for t in self.pool:
            t.start()

    def _work(self, engine: Engine, k: int) -> None:
        with engine.connect() as conn:
            conn.execute(QUERY).all()
            while True:
                self.start.wait()
                if self.quit:
                    return
                n = 0
                while time.monotonic() < self.deadline:
                    for _ in range(10):
                        conn.execute(QUERY).all()
                    n += 10
                self.counts[k] = n
                self.finish.wait()

    def slice(self, seconds: float) -> float:
        """Statements per second, all threads together, over one slice."""
        t0 = time.monotonic()
        self.deadline = t0 + seconds
        self.start.wait()
        self.finish.wait()
        return sum(self.counts) / (time.monotonic() - t0)

    def close(self) -> None:
        self.quit = True
        self.start.wait()
        for t in self.pool:
            t.join()


def throughput(url: str, seconds: float, pairs: int) -> str:
    """Bare vs attached (defaults) throughput in alternating slices, per thread count.

    Throughput on two cores shared with PostgreSQL drifts by ±10 % from one second to
    the next, far more than the effect measured, so the two engines run in many short
    alternating slices (ABBA order, cancelling drift) and the table gives the median
    of the per-pair ratios with its interquartile range.
    """
    import structlog

    bare = create_engine(url, pool_size=8)
    _fill(bare)
    attached = create_engine(url, pool_size=8)
    quiet = structlog.wrap_logger(structlog.ReturnLogger())
    probe = sqlprobe.attach(attached, registry=CollectorRegistry(), logger=quiet)
    lines = [
        "#### Throughput against PostgreSQL (statements/s, all threads together)",
        "",
        f"{pairs} alternating pairs of {seconds:g} s slices per thread count; sqlprobe "
        "with its defaults (N+1 detection and pool metrics on).",
        "",
        "| threads | bare (median) | attached (median) | attached / bare, median of pairs "
        "| interquartile range |",
        "|---:|---:|---:|---:|---|",
    ]
    for threads in (1, 2, 4, 8):
        b_workers, a_workers = _Workers(bare, threads), _Workers(attached, threads)
        b_rates: list[float] = []
        a_rates: list[float] = []
        for p in range(pairs):
            if p % 2 == 0:
                b_rates.append(b_workers.slice(seconds))
                a_rates.append(a_workers.slice(seconds))
            else:
                a_rates.append(a_workers.slice(seconds))
                b_rates.append(b_workers.slice(seconds))
        b_workers.close()
        a_workers.close()
        ratios = sorted(a / b for a, b in zip(a_rates, b_rates, strict=True))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        lines.append(
            f"| {threads} | {statistics.median(b_rates):,.0f} | "
            f"{statistics.median(a_rates):,.0f} | {statistics.median(ratios):.3f} | "
            f"{q1:.3f}–{q3:.3f} |"
        )
    probe.detach()
    attached.dispose()
    bare.dispose()
    return "\n".join(lines)


SECTIONS = ("statements", "orm", "request", "async", "fp", "scrape", "memory", "threads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sqlprobe benchmark suite")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write")
    parser.add_argument("--skip", default="", help="comma list of sections: " + ",".join(SECTIONS))
    parser.add_argument(
        "--only", default="", help="comma list of sections to run (default: all but --skip)"
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="another checkout whose sqlprobe defaults join the request section's variants",
    )
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    unknown = (skip | only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if only:
        skip |= set(SECTIONS) - only
    q = args.quick
    rounds, batch = (5, 300) if q else (31, 2000)
    with_otel = _otel_available()
    vs = variants(with_otel)
    parent = None
    if with_otel:
        from opentelemetry.sdk.trace import TracerProvider

        parent = _with_parent(TracerProvider())

    out = [
        "# Benchmark results",
        "",
        environment(),
        machine_noise(),
        "",
        "Command: `"
        + " ".join(["python", "benchmarks/suite.py", *(argv if argv is not None else sys.argv[1:])])
        + "`",
        "",
    ]

    def emit(text: str) -> None:
        print(text, flush=True)
        print(flush=True)
        out.append(text)
        out.append("")

    if "statements" not in skip:
        emit("### Per statement (primary-key SELECT; spans under a sampled parent span)")
        emit(
            table(
                f"SQLite in-memory, Core ({rounds}×{batch})",
                per_statement(
                    "sqlite://", vs, mode="core", rounds=rounds, batch=batch, parent=parent
                ),
            )
        )
        emit(
            table(
                f"SQLite in-memory, ORM ({rounds}×{batch // 2})",
                per_statement(
                    "sqlite://", vs, mode="orm", rounds=rounds, batch=batch // 2, parent=parent
                ),
            )
        )
        pr, pb = max(5, rounds), max(200, batch // 4)
        emit(
            table(
                f"PostgreSQL psycopg, Core ({pr}×{pb})",
                per_statement(PG_URL, vs, mode="core", rounds=pr, batch=pb, parent=parent),
            )
        )
        emit(
            table(
                f"PostgreSQL psycopg, ORM ({pr}×{pb // 2})",
                per_statement(PG_URL, vs, mode="orm", rounds=pr, batch=pb // 2, parent=parent),
            )
        )
        emit(
            table(
                f"SQLite in-memory, checkout + statement ({rounds}×{batch // 2})",
                per_statement(
                    "sqlite://", vs[:4], mode="checkout", rounds=rounds, batch=batch // 2
                ),
            )
        )
    if "orm" not in skip:
        # N+1 detection on the ORM path (issue 16): defaults against metrics only, and
        # the empty do_orm_execute listener that naming the relationship used to need.
        emit("### ORM loops, N+1 detection's cost (no parent span; thread CPU time)")
        ovs = orm_variants()
        orounds, obatch = (7, 100) if q else (101, 200)
        for title, mode in (
            ("primary-key loop, a new id each time, one Session", "orm-pk"),
            ("one primary key, expunge_all() after each", "orm"),
        ):
            rows = per_statement(
                "sqlite://", ovs, mode=mode, rounds=orounds, batch=obatch, clock=time.thread_time
            )
            by = {r.name: r for r in rows}
            metrics, defaults = by["sqlprobe metrics only"], by["sqlprobe defaults (+ N+1)"]
            pool = by["sqlprobe + pool/tx metrics"]
            listener = by["defaults + an empty do_orm_execute listener"]
            emit(
                table(f"SQLite in-memory, ORM {title} ({orounds}×{obatch})", rows)
                + "\n\n"
                + f"Paired per round, per statement: defaults over metrics only "
                f"**{_paired(defaults, metrics) * 1e6:+.2f} µs** (target ≤ +3 µs); "
                f"N+1 detection alone (defaults over pool/tx metrics) "
                f"{_paired(defaults, pool) * 1e6:+.2f} µs; an empty do_orm_execute "
                f"listener on top of the defaults {_paired(listener, defaults) * 1e6:+.2f} µs."
            )
        emit(orm_unit_step(orounds, 2000))
    if "request" not in skip:
        # sqlprobe's variants and the instrumentation, as an application would run them.
        keep = {
            "bare",
            "sqlprobe metrics only",
            "sqlprobe + pool/tx metrics",
            "sqlprobe defaults (+ N+1)",
            "otel-instrumentation-sqlalchemy",
        }
        rvs = [v for v in vs if v.name in keep]
        # What the hook points alone cost: the floor under any exact pool metric.
        rvs.insert(1, Variant("empty pool hooks (no sqlprobe)", _hooks_floor))
        if args.baseline:
            rvs.insert(len(rvs) - 1 if with_otel else len(rvs), _baseline_variant(args.baseline))
        rr, rb = (5, 100) if q else (41, 200)
        emit("### Per request unit (checkout, begin, 3 primary-key SELECTs, commit, checkin)")
        with tempfile.TemporaryDirectory(prefix="sqlprobe-bench-") as tmp:
            units, stmts = request_unit(
                f"sqlite:///{tmp}/bench.db", rvs, rounds=rr, batch=rb, parent=parent
            )
        emit(request_table(f"SQLite file, QueuePool ({rr}×{rb})", units, stmts))
        if _reachable(PG_URL):
            pb = max(50, rb // 4)
            units, stmts = request_unit(PG_URL, rvs, rounds=rr, batch=pb, parent=parent)
            emit(request_table(f"PostgreSQL psycopg, QueuePool ({rr}×{pb})", units, stmts))
        else:
            emit(f"PostgreSQL at {PG_URL} not reachable: no PostgreSQL row.")
    if "async" not in skip:
        pr, pb = max(5, rounds), max(200, batch // 4)
        emit(
            table(
                f"PostgreSQL asyncpg (AsyncEngine), Core ({pr}×{pb})",
                per_statement_async(PG_ASYNC_URL, vs, rounds=pr, batch=pb, parent=parent),
            )
        )
    if "fp" not in skip:
        emit(fingerprinting(300 if q else 3000))
    if "scrape" not in skip:
        emit(scrape())
    if "memory" not in skip:
        emit(memory(50_000 if q else 1_000_000))
    if "threads" not in skip:
        emit(throughput(PG_URL, 0.25 if q else 0.4, 6 if q else 40))
    if args.write:
        with open(args.write, "w") as f:
            f.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
