"""The ``sqlprobe`` command line: ``sqlprobe demo`` and friends.

Every mistake in the command line or its environment is reported in one line that
names the argument and what it accepts, with exit status 2 (argparse's convention),
never with a traceback: the parser's type functions check each value (a database URL
is parsed and its driver imported before anything runs), and the errors that can only
show later (the database refuses the connection, the /metrics port is taken) are
raised as :class:`UsageError` and reported the same way.

``sqlprobe demo`` runs a small but typical SQLAlchemy application (users with orders,
articles and shipments: lazy and eager relationship loading, aggregates, a bulk
update, a transaction that rolls back, a slow lookup that an index fixes and one
failing statement) with sqlprobe attached in one line (index advice on), serves
/metrics while it runs, and prints the top statements by total time and the index
advice when it stops. It runs on an embedded SQLite file unless ``--url`` names
another database.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

__all__ = ["UsageError", "main"]

DEFAULT_SQLITE_FILE = "sqlprobe-demo.db"
DEFAULT_TOP_URL = "http://127.0.0.1:9464/metrics"

DESCRIPTION = (
    "sqlprobe: query-performance profiling and observability for SQLAlchemy. "
    "'sqlprobe demo' runs a small application with sqlprobe attached and shows what it measures; "
    "'sqlprobe top' watches any sqlprobe /metrics endpoint live; "
    "'sqlprobe run -- COMMAND' runs a program with sqlprobe attached, without code changes."
)
URL_FORMS = "dialect[+driver]://[user[:password]@]host[:port]/database, e.g. sqlite:///demo.db"


class UsageError(Exception):
    """A user error found after parsing, reported as ``argument ARG: message`` (exit 2)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"argument {argument}: {message}")
        self.argument = argument


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> Any:
        first = message.splitlines()[0] if message else "invalid arguments"
        self.exit(2, f"{self.prog}: error: {first} (see '{self.prog} --help')\n")


def _need_rich() -> Any:
    try:
        import rich
    except ImportError:  # pragma: no cover - exercised only without the extra
        print(
            "sqlprobe: error: the command line needs rich: pip install 'sqlprobe[cli]'",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return rich


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _database_url(raw: str) -> str:
    """argparse type of ``--url``: a URL SQLAlchemy parses, whose driver is installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(raw)
    except ArgumentError:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a database URL; expected {URL_FORMS}"
        ) from None
    shown = url.render_as_string(hide_password=True)
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise argparse.ArgumentTypeError(
            f"{shown}: SQLAlchemy has no dialect {url.drivername!r} (sqlite, postgresql, "
            "mysql, mariadb, mssql and oracle are built in; others come from their own "
            "packages)"
        ) from None
    if getattr(dialect, "is_async", False):
        raise argparse.ArgumentTypeError(
            f"{shown}: the demo needs a synchronous driver, {url.drivername!r} is asyncio "
            "(e.g. postgresql+psycopg, mysql+pymysql, sqlite)"
        )
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        missing = getattr(exc, "name", None) or _first_line(exc)
        raise argparse.ArgumentTypeError(
            f"{shown}: the driver of {url.drivername!r} is not installed (no module "
            f"{missing!r}); install it with pip, or choose another driver"
        ) from None
    return raw


def _port(raw: str) -> int:
    """argparse type of ``--port``."""
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected a port number from 0 to 65535 (0 picks a free port), got {raw!r}"
        )
    return port


def _iterations(raw: str) -> int:
    """argparse type of ``--iterations``."""
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {raw!r}")
    return count


def _duration(raw: str) -> float:
    """argparse type of ``--duration``."""
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds, 0 or more (0 runs until Ctrl-C), got {raw!r}"
        )
    return seconds


def _metrics_url(raw: str) -> str:
    """argparse type of ``sqlprobe top URL``."""
    from ._top import normalize_url

    try:
        return normalize_url(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an http(s) URL or HOST:PORT, e.g. {DEFAULT_TOP_URL}, got {raw!r}"
        ) from None


def _interval(raw: str) -> float:
    """argparse type of ``--interval``."""
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not math.isfinite(seconds) or seconds < 0.1:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, 0.1 or more, got {raw!r}")
    return seconds


def _milliseconds(raw: str) -> float:
    """argparse type of ``--slow-query-ms``."""
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not math.isfinite(ms) or ms < 0:
        raise argparse.ArgumentTypeError(
            f"expected a number of milliseconds, 0 or more, got {raw!r}"
        )
    return ms


def _address(raw: str) -> str:
    """argparse type of ``--addr``: anything non-empty; binding tells the rest."""
    if not raw.strip():
        raise argparse.ArgumentTypeError("expected a host name or IP address, got ''")
    return raw.strip()


class _ConsoleLogger:
    """A structlog-compatible logger printing rendered events above the progress bar."""

    def __init__(self, console: Any) -> None:
        self._console = console

    def msg(self, message: str) -> None:
        self._console.print(message, markup=False, highlight=False)

    debug = info = warning = error = critical = exception = msg


#: The slow-query and N+1 logs let this many events through per scope and statement a
#: minute (docs/logging.md); the demo says so when it reaches that many.
LOG_RATE_LIMIT = 5


class _ShortRenderer:
    """One short line per event: the fields that tell what happened and where.

    sqlprobe's events carry everything (engine, fingerprint, trace ids...) for machines;
    a person watching the demo needs the event, what it is about and the line of code.
    It also says when an event kind reaches the log's rate limit, so that the quiet
    that follows is not mistaken for the problem going away.
    """

    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "n_plus_one": ("relationship", "count", "scope", "suggestion", "source", "suppressed"),
        "slow_query": ("duration_ms", "statement", "error", "source", "suppressed"),
        "index_advice": ("table", "columns", "ddl", "proven", "source"),
    }

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str, str], int] = {}

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> str:
        name = str(event.get("event", ""))
        fields = self.FIELDS.get(name)
        stamp = event.get("timestamp", "")
        if fields is None:
            rest = " ".join(
                f"{k}={v!r}" for k, v in event.items() if k not in ("event", "timestamp")
            )
            return f"{stamp} {name} {rest}".rstrip()
        parts = [f"{stamp} {name}"]
        for key in fields:
            value = event.get(key)
            if value in (None, "", 0) and key in ("suppressed", "error", "relationship"):
                continue
            if key == "duration_ms" and isinstance(value, (int, float)):
                value = f"{value:.0f}"
            if key == "source":
                parts.append(f"source={value}")
            elif isinstance(value, str) and (" " in value or not value):
                parts.append(f"{key}={value!r}")
            else:
                parts.append(f"{key}={value}")
        line = " ".join(parts)
        key3 = (name, str(event.get("scope", "")), str(event.get("fingerprint", "")))
        self.seen[key3] = self.seen.get(key3, 0) + 1
        if self.seen[key3] == LOG_RATE_LIMIT:
            line += (
                f"\n{stamp} note: that is {LOG_RATE_LIMIT} {name} events for this statement "
                f"in {event.get('scope') or 'this scope'}; the log holds back further ones for "
                "a minute (the next says how many it held back); the metrics count every one"
            )
        return line


@dataclass
class _Findings:
    """What the demo found, gathered while it runs, for the summary at the end."""

    texts: dict[str, str] = field(default_factory=dict)
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    n_plus_one: dict[str, tuple[Any, int]] = field(default_factory=dict)
    #: ``index_advice`` events, as logged (the advisor's worker thread appends).
    advice: list[dict[str, Any]] = field(default_factory=list)
    #: Fingerprints of SELECTs from a table that ran over ``threshold`` seconds.
    slow_selects: set[str] = field(default_factory=set)
    threshold: float = 0.1

    def collect_advice(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """A structlog processor keeping a copy of each ``index_advice`` event."""
        if event.get("event") == "index_advice":
            self.advice.append(dict(event))
        return event

    def take(self, capture: Any) -> None:
        """Move a capture's records into the findings (and empty it: memory stays flat)."""
        for record in capture.statements:
            self.texts.setdefault(record.fingerprint, record.statement)
            if record.error:
                key = (record.fingerprint, record.error)
                self.failures[key] = self.failures.get(key, 0) + 1
            elif (
                record.operation == "SELECT" and record.table and record.duration >= self.threshold
            ):
                self.slow_selects.add(record.fingerprint)
        del capture.statements[:]
        for detection in capture.n_plus_one:
            first, count = self.n_plus_one.get(detection.fingerprint, (detection, 0))
            self.n_plus_one[detection.fingerprint] = (first, count + 1)
        del capture.n_plus_one[:]


@dataclass
class DemoResult:
    """What one demo run did (returned for tests; printed by the CLI)."""

    iterations: int
    statements: int
    elapsed: float
    port: int | None


def _slow_sql(dialect_name: str) -> str | None:
    """A deliberately slow statement for a database server, None on SQLite.

    On SQLite the slow query is the tracking lookup (see `_scale_sqlite`); a server
    cannot be slowed down the same way and scans the demo's shipments in a millisecond
    or two, so it also runs a sleep.
    """
    if dialect_name == "postgresql":
        return "SELECT pg_sleep(0.15)"
    if dialect_name in ("mysql", "mariadb"):
        return "SELECT SLEEP(0.15)"
    return None


#: The demo's SQLite connections pause `SCALE_PAUSE` seconds every `SCALE_STEPS` virtual
#: machine instructions once the workload starts (see `_scale_sqlite`).
SCALE_STEPS = 8_000
SCALE_PAUSE = 0.025


def _scale_sqlite(engine: Any, scaled: dict[str, bool]) -> None:
    """Make the demo's SQLite as slow per row as a production-sized table would be.

    SQLite reads the demo's 20 000 shipments in a few milliseconds, where a table of
    millions of rows takes seconds; seeding millions would take the demo minutes. A
    progress handler on each connection is called every `SCALE_STEPS` instructions of
    SQLite's virtual machine and, while ``scaled["on"]`` is true, pauses from its second
    call within one execution on: a statement's time grows with the work it does. The
    full scan behind the missing index on ``tracking_number`` (about 60 000
    instructions) takes about 175 ms; an index lookup and every other statement of the
    demo (5 000 instructions at most) never pause. The first call is free because
    SQLite counts instructions over all the executions of a cached statement, so a
    small statement run often reaches `SCALE_STEPS` now and then.

    The index advisor's connections are opened like the application's, so they get the
    handler too, and replace it with their time limit while they analyse.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _register(dbapi_connection: Any, record: Any) -> None:
        calls = record.info["sqlprobe_demo_steps"] = [0]

        def pause() -> int:
            calls[0] += 1
            if calls[0] > 1 and scaled["on"]:
                time.sleep(SCALE_PAUSE)
            return 0  # carry on

        dbapi_connection.set_progress_handler(pause, SCALE_STEPS)

    @event.listens_for(engine, "before_cursor_execute")
    def _restart(conn: Any, *_args: Any) -> None:
        calls = conn.connection.info.get("sqlprobe_demo_steps")
        if calls is not None:
            calls[0] = 0


#: Seconds the end-of-run summary waits for the index advisor to finish its analyses.
ADVICE_WAIT = 3.0


def run_demo(
    url: str | None,
    *,
    duration: float,
    iterations: int | None,
    port: int | None,
    addr: str,
    console: Any,
    slow_every: int = 25,
    reset: bool = True,
) -> DemoResult:
    """Run the demo workload until ``duration`` seconds or ``iterations`` pass, or Ctrl-C."""
    import structlog
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from sqlalchemy import create_engine, select, text
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.orm import Session, joinedload, selectinload

    import sqlprobe

    from ._scenario import (
        SHIPMENTS,
        Article,
        Base,
        Order,
        Shipment,
        User,
        deactivate_idle_users,
        seed,
        seed_shipments,
        track_shipment,
        tracking_number,
        user_statistics,
    )

    if url is None:
        url = f"sqlite:///{DEFAULT_SQLITE_FILE}"
    engine = create_engine(url, pool_pre_ping=True)
    scaled = {"on": False}
    scaled_db = engine.dialect.name == "sqlite"
    if scaled_db:
        _scale_sqlite(engine, scaled)
    check_connection(engine)

    findings = _Findings()
    logger = structlog.wrap_logger(
        _ConsoleLogger(console),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            findings.collect_advice,
            _ShortRenderer(),
        ],
    )
    # The one line an application adds (index advice needs the advice extra, sqlglot):
    advice = importlib.util.find_spec("sqlglot") is not None
    probe = sqlprobe.attach(engine, name="demo", logger=logger, index_advice=advice)
    if probe.options is not None:
        findings.threshold = probe.options.slow_query_threshold

    server = None
    if port is not None:
        try:
            server = sqlprobe.start_http_server(port=port, addr=addr)
        except (OSError, ValueError) as exc:
            probe.detach()
            engine.dispose()
            argument = "--addr" if "address" in str(exc) else "--port"
            raise UsageError(argument, str(exc)) from None
        console.print(f"Serving Prometheus metrics at [bold]{server.url}[/bold]")

    if reset:
        Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        if session.scalar(select(User.id).limit(1)) is None:
            seed(session)
        if session.scalar(select(Shipment.id).limit(1)) is None:
            # A server would scan 20 000 rows in a few milliseconds anyway (only SQLite
            # is scaled, see _scale_sqlite) and takes seconds to insert them.
            seed_shipments(session, shipments=SHIPMENTS if scaled_db else SHIPMENTS // 10)
    scaled["on"] = True

    server_slow = _slow_sql(engine.dialect.name)
    slow_sql = text(server_slow) if server_slow is not None else None
    stop = {"now": False}

    def on_sigint(_sig: int, _frame: FrameType | None) -> None:
        stop["now"] = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_term = signal.signal(signal.SIGTERM, on_sigint)

    # Each page is a unit of work (a request) that gives its connection back at the end,
    # as a web request does: the per-route metrics count each page under its route.
    def n_plus_one_page(session: Session) -> None:
        with sqlprobe.scope("GET /users"):
            for user in session.scalars(select(User).order_by(User.id).limit(20)):
                _ = len(user.orders)  # lazy load: one SELECT per user
            session.commit()

    def eager_pages(session: Session) -> None:
        with sqlprobe.scope("GET /users?include=orders"):
            users = session.scalars(
                select(User).options(selectinload(User.orders)).order_by(User.id).limit(20)
            ).all()
            _ = sum(len(u.orders) for u in users)
            session.commit()
        with sqlprobe.scope("GET /orders/recent"):
            recent = session.scalars(
                select(Order)
                .options(joinedload(Order.user))
                .order_by(Order.created_at.desc())
                .limit(10)
            ).all()
            _ = [o.user.name for o in recent]
            session.commit()

    def articles(session: Session) -> None:
        user = session.get(User, 1)
        if user is not None:
            session.scalars(user.articles.select().order_by(Article.id)).all()

    def rolled_back(session: Session) -> None:
        try:
            with session.begin_nested():
                session.add(
                    Order(user_id=1, product_name="gift", amount=0, created_at=datetime(2026, 1, 1))
                )
                session.flush()
                raise _Cancelled("payment declined")
        except _Cancelled:
            pass  # the savepoint is rolled back; the order's transaction goes on and commits

    def tracking_page(session: Session) -> None:
        with sqlprobe.scope("GET /track"):
            # The slow query an index fixes. Customers track their latest parcels, the
            # last rows of the table: SQLite reads nearly all of it before the first row
            # comes back (sqlprobe times the driver's execute, which ends there).
            latest = (SHIPMENTS if scaled_db else SHIPMENTS // 10) - 1 - done % 100
            track_shipment(session, tracking_number(latest))

    def failing(session: Session) -> None:
        try:
            session.execute(text("SELECT no_such_column FROM sqlprobe_demo_users"))
        except DBAPIError:
            session.rollback()

    steps: list[Callable[[Session], object]] = [
        n_plus_one_page,
        eager_pages,
        user_statistics,
        articles,
        rolled_back,
    ]

    from .testing import capture

    started = time.monotonic()
    done = 0
    recorder = capture(engine)
    recorder.__enter__()
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("[bold]sqlprobe demo[/bold]"),
            TextColumn("{task.completed} iterations · {task.fields[statements]} statements"),
            TextColumn("{task.fields[found]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            total = iterations if iterations is not None else None
            task = progress.add_task("demo", total=total, statements=0, found="")
            while not stop["now"]:
                if iterations is not None and done >= iterations:
                    break
                if iterations is None and duration and time.monotonic() - started >= duration:
                    break
                with Session(engine) as session:
                    slow_turn = done % slow_every == 0
                    if slow_turn:
                        # First in the iteration: with a threshold low enough to make
                        # every SELECT slow, it is still among the first shapes the
                        # advisor's rate limit (10 a minute) lets through.
                        tracking_page(session)
                    for step in steps:
                        step(session)
                    if slow_turn:
                        if slow_sql is not None:
                            session.execute(slow_sql)  # the deliberately slow query
                        failing(session)  # and the failing one (its transaction rolls back)
                        deactivate_idle_users(session, datetime(2026, 1, 1) - timedelta(days=30))
                    session.commit()
                done += 1
                findings.take(recorder)
                progress.update(
                    task,
                    completed=done,
                    statements=sum(s.calls for s in probe.statements()),
                    found=(
                        f"· {sum(n for _, n in findings.n_plus_one.values())} N+1 · "
                        f"{sum(findings.failures.values())} errors"
                    ),
                )
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        elapsed = time.monotonic() - started
        recorder.__exit__(None, None, None)
        findings.take(recorder)
        if advice:
            _wait_for_advice(findings)
        stats = probe.statements()
        _print_table(console, stats, findings)
        _print_findings(console, stats, findings, probe, server, probe.options)
        statements = sum(s.calls for s in stats)
        probe.detach()
        if server is not None:
            server.close()
        engine.dispose()
    return DemoResult(done, statements, elapsed, server.port if server else None)


class _Cancelled(Exception):
    pass


def _wait_for_advice(findings: _Findings) -> None:
    """Give the advisor's worker up to `ADVICE_WAIT` seconds for the slow SELECTs it has.

    The worker analyses a slow shape some milliseconds after it ran, and a short run
    (``--iterations 1``) can end sooner. The wait ends as soon as every slow SELECT
    shape of the run has advice, so the demo's usual run does not wait at all.
    """
    deadline = time.monotonic() + ADVICE_WAIT
    while findings.slow_selects and time.monotonic() < deadline:
        if findings.slow_selects <= {a.get("fingerprint") for a in findings.advice}:
            return
        time.sleep(0.05)


def check_connection(engine: Any) -> None:
    """Connect once, so that a database that refuses is reported as a ``--url`` error."""
    from sqlalchemy.exc import DBAPIError

    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        engine.dispose()
        shown = engine.url.render_as_string(hide_password=True)
        raise UsageError(
            "--url", f"cannot connect to {shown}: {type(exc.orig).__name__}: {_first_line(exc)}"
        ) from None


def _print_table(console: Any, stats: Sequence[Any], findings: _Findings, limit: int = 10) -> None:
    """The top statements by total time; full normalized text, wrapped, never cut."""
    from rich.table import Table

    n_plus_one = set(findings.n_plus_one)
    failing = {fp for fp, _error in findings.failures}
    table = Table(title="Top statements by total time", title_justify="left", expand=True)
    table.add_column("calls", justify="right", no_wrap=True)
    table.add_column("total ms", justify="right", no_wrap=True)
    table.add_column("mean ms", justify="right", no_wrap=True)
    table.add_column("statement (normalized)", overflow="fold", ratio=1)
    # Only what the workload ran (the capture saw it, with its full text): the schema
    # set-up before it is not what the demo is about.
    for s in [s for s in stats if s.fingerprint in findings.texts][:limit]:
        marks = []
        if s.fingerprint in n_plus_one:
            marks.append("N+1")
        if s.fingerprint in failing:
            marks.append("error")
        if s.mean_seconds >= 0.1:
            marks.append("slow")
        text = findings.texts.get(s.fingerprint, s.statement)
        table.add_row(
            str(s.calls),
            f"{s.total_seconds * 1000:.1f}",
            f"{s.mean_seconds * 1000:.2f}",
            f"[{', '.join(marks)}] {text}" if marks else text,
        )
    console.print(table, markup=False)


def _print_findings(
    console: Any,
    stats: Sequence[Any],
    findings: _Findings,
    probe: Any,
    server: Any,
    options: Any,
) -> None:
    """What the demo found, and what to do next: plain wrapped text, readable when piped."""
    import textwrap

    from prometheus_client import REGISTRY
    from rich.rule import Rule

    from ._analysis._holds import pool_advice

    def say(text: str = "", indent: int = 0) -> None:
        # Wrapped between words (never inside a name), so a statement is whole when piped.
        lines = textwrap.wrap(
            text,
            width=max(40, console.width),
            initial_indent=" " * indent,
            subsequent_indent=" " * indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
        for line in lines or [""]:
            console.print(line, markup=False, highlight=False, soft_wrap=True)

    name = probe.name or ""
    threshold = options.slow_query_threshold if options is not None else 0.1
    console.print(Rule("What sqlprobe found", align="left"))
    if findings.n_plus_one:
        for first, count in sorted(findings.n_plus_one.values(), key=lambda v: -v[1]):
            what = f"the relationship {first.relationship}" if first.relationship else "a query"
            say(f"N+1: {what}, {count} times in {first.scope!r} (at {first.source})")
            say(f"statement, run once per parent: {first.statement}", 4)
            say(f"fix: {first.suggestion}", 4)
    else:
        say("N+1: none detected")
    slow = [s for s in stats if s.mean_seconds >= threshold]
    for s in slow[:3]:
        say(
            f"slow: {s.calls} call(s), mean {s.mean_seconds * 1000:.0f} ms "
            f"(threshold {threshold * 1000:.0f} ms):"
        )
        say(findings.texts.get(s.fingerprint, s.statement), 4)
    if not slow:
        say(f"slow: no statement over {threshold * 1000:.0f} ms on average")
    _print_advice(say, stats, findings, options)
    for (fingerprint, error), count in sorted(findings.failures.items(), key=lambda kv: -kv[1]):
        say(f"failed: {count} time(s) with {error}:")
        say(findings.texts.get(fingerprint, fingerprint), 4)
    if not findings.failures:
        say("failed: no statement")

    def sample(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, {"engine": name, **labels}) or 0.0

    checkouts = sample("sqlprobe_pool_checkout_wait_seconds_count")
    waited = sample("sqlprobe_pool_checkout_wait_seconds_sum")
    timeouts = sample("sqlprobe_pool_checkout_timeouts_total")
    mean_wait = f", mean wait {waited / checkouts * 1000:.2f} ms" if checkouts else ""
    say(f"pool: {checkouts:.0f} checkouts{mean_wait}, {timeouts:.0f} timeouts")
    pool: Any = getattr(probe.engine, "pool", None)
    size = pool.size() if callable(getattr(pool, "size", None)) else None
    overflow = getattr(pool, "_max_overflow", None)
    say(
        pool_advice(
            peak=probe.pool_peak,
            pool_size=size if isinstance(size, int) else None,
            max_overflow=overflow if isinstance(overflow, int) else None,
            timeouts=int(timeouts),
            mean_wait=waited / checkouts if checkouts else 0.0,
        )
    )
    commits = sample("sqlprobe_transaction_duration_seconds_count", outcome="commit")
    rollbacks = sample("sqlprobe_transaction_duration_seconds_count", outcome="rollback")
    say(f"transactions: {commits:.0f} committed, {rollbacks:.0f} rolled back")

    console.print(Rule("Next", align="left"))
    say("In your application, one line after creating the engine:")
    say("import sqlprobe; sqlprobe.attach(engine); sqlprobe.start_http_server()", 4)
    say("or, without changing its code: sqlprobe run -- python app.py")
    say("Watch a running application: sqlprobe top 127.0.0.1:9464")
    say("Dashboards and alerts: docker compose up --build in the repository, then open")
    say("Grafana at http://localhost:3000 (dashboards 'sqlprobe / Queries' and '... pool')", 4)
    say("Docs: the repository's docs/ (mkdocs serve): configuration, metrics, runbooks")
    if server is not None:
        say(f"(this run served its metrics at {server.url})")


def _print_advice(
    say: Callable[..., None], stats: Sequence[Any], findings: _Findings, options: Any
) -> None:
    """The index advice of the run: what to create, in SQL, in the model, in a migration."""
    if options is None or not options.index_advice:
        say("index advice: off (pip install 'sqlprobe[advice]' to see what index to add)")
        return
    if not findings.advice:
        say("index advice: none (no slow SELECT that an index would fix)")
        return
    means = {s.fingerprint: s.mean_seconds for s in stats}
    for event in findings.advice:
        columns = ", ".join(event.get("columns") or ())
        proof = {
            "hypopg": "proven: the planner's cost with a hypothetical index (hypopg)",
            "plan": (
                "proven: the plan switches from a table scan to a search of the index"
                if event.get("proven")
                else "unproven: read from the plan (a full table scan)"
            ),
            "statistics": "unproven: read from the plan and the column statistics",
        }.get(str(event.get("proof")), "proven" if event.get("proven") else "unproven")
        say(f"index advice: {event.get('table')} ({columns}), {proof}")
        say(f"for: {event.get('statement')}", 4)
        say(f"ddl: {event.get('ddl')}", 4)
        if event.get("model"):
            say(f"model: {event['model']}", 4)
        say(f"alembic: {event.get('alembic')}", 4)
        before, after = event.get("cost_before"), event.get("cost_after")
        if before is not None and after:
            say(f"cost: {before:.1f} -> {after:.1f} ({before / after:.0f}x less)", 4)
        mean = means.get(str(event.get("fingerprint")))
        if mean is not None:
            note = "" if before is not None else "; the planner gives no cost on this database"
            say(f"now: {mean * 1000:.0f} ms per call without the index{note}", 4)
        if event.get("source"):
            say(f"at: {event['source']}", 4)


def _version() -> str:
    import platform

    import sqlalchemy

    from . import __version__

    return (
        f"sqlprobe {__version__} (SQLAlchemy {sqlalchemy.__version__}, "
        f"Python {platform.python_version()})"
    )


class _VersionAction(argparse.Action):
    """``--version``, importing SQLAlchemy only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        print(_version())
        parser.exit(0)


def _parser() -> argparse.ArgumentParser:
    from ._config import env_metrics_addr, env_metrics_port

    parser = _Parser(prog="sqlprobe", description=DESCRIPTION)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run a demo SQLAlchemy application with sqlprobe attached",
        description=(
            "Run a typical SQLAlchemy workload with sqlprobe attached, serve /metrics "
            "while it runs, and print the top statements when it ends (Ctrl-C stops it)."
        ),
    )
    demo.add_argument(
        "--url",
        type=_database_url,
        help=f"database URL (default: an embedded SQLite file, ./{DEFAULT_SQLITE_FILE}; "
        "with --compare-loading, a temporary one)",
    )
    demo.add_argument(
        "--duration",
        type=_duration,
        default=30.0,
        metavar="SECONDS",
        help="seconds to run (default 30; 0 runs until Ctrl-C or SIGTERM)",
    )
    demo.add_argument(
        "--iterations",
        type=_iterations,
        default=None,
        metavar="N",
        help="stop after N iterations instead (N >= 1)",
    )
    port = env_metrics_port()
    demo.add_argument(
        "--port",
        type=_port,
        default=port,
        help=f"port for /metrics (default {port}, set by SQLPROBE_METRICS_PORT; "
        "0 picks a free one)",
    )
    addr = env_metrics_addr()
    demo.add_argument(
        "--addr",
        type=_address,
        default=addr,
        help=f"address for /metrics (default {addr}, set by SQLPROBE_METRICS_ADDR)",
    )
    demo.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    demo.add_argument(
        "--compare-loading",
        action="store_true",
        help="instead of the workload, measure each relationship loading strategy",
    )
    top = sub.add_parser(
        "top",
        help="live view of a sqlprobe /metrics endpoint",
        description=(
            "Scrape a sqlprobe /metrics endpoint every few seconds and show statements, "
            "errors and slow statements per second, the statements that take the most time, "
            "latency percentiles per operation, N+1 detections and the connection pools. "
            "Ctrl-C quits."
        ),
    )
    top.add_argument(
        "url",
        nargs="?",
        type=_metrics_url,
        default=DEFAULT_TOP_URL,
        metavar="URL",
        help=f"the endpoint (default {DEFAULT_TOP_URL}; HOST:PORT is enough)",
    )
    top.add_argument(
        "--interval",
        type=_interval,
        default=2.0,
        metavar="SECONDS",
        help="seconds between scrapes (default 2)",
    )
    top.add_argument(
        "--limit", type=_iterations, default=8, metavar="N", help="statements shown (default 8)"
    )
    top.add_argument(
        "--once",
        action="store_true",
        help="print one view (two scrapes an interval apart) and exit; for pipes and scripts",
    )
    # Parsed by sqlprobe._advise_cli (main() hands it the rest of the line); listed here
    # so that `sqlprobe --help` names it.
    sub.add_parser(
        "advise",
        help="suggest indexes for the statements of a running process or a SQL file",
        add_help=False,
    )
    run = sub.add_parser(
        "run",
        help="run a Python program with sqlprobe attached to every engine",
        usage="sqlprobe run [options] -- COMMAND [ARGS ...]",
        description=(
            "Run COMMAND (python, gunicorn, uvicorn, flask, ...) with sqlprobe attached to "
            "every SQLAlchemy engine it creates and /metrics served, without changing its "
            "code. SQLPROBE_* variables configure sqlprobe as usual. Pre-fork servers "
            "(gunicorn, uwsgi, uvicorn --workers) get Prometheus multiprocess mode."
        ),
    )
    run.add_argument(
        "--port",
        type=_port,
        default=port,
        help=f"port for /metrics (default {port}, set by SQLPROBE_METRICS_PORT; "
        "0 picks a free one)",
    )
    run.add_argument(
        "--addr",
        type=_address,
        default=addr,
        help=f"address for /metrics (default {addr}, set by SQLPROBE_METRICS_ADDR)",
    )
    run.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    run.add_argument(
        "--multiprocess",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Prometheus multiprocess mode (default: on for gunicorn, uwsgi and uvicorn --workers)",
    )
    run.add_argument(
        "--slow-query-ms",
        type=_milliseconds,
        default=None,
        metavar="MS",
        help="slow-query threshold in milliseconds (sets SQLPROBE_SLOW_QUERY_MS)",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND", help=argparse.SUPPRESS)
    return parser


def _setup_logging() -> Callable[[], None]:
    """Send sqlprobe's warnings to stderr, one line each; returns the undo.

    The command line is an application, so it may say where sqlprobe's own warnings go
    (the library never does). Undone on return, for callers of :func:`main` in-process.
    """
    log = logging.getLogger("sqlprobe")
    if log.handlers or logging.getLogger().handlers:
        return lambda: None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sqlprobe: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False

    def undo() -> None:
        log.removeHandler(handler)
        log.propagate = True

    return undo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sqlprobe`` console script; returns the exit status.

    Argument errors exit through argparse (``SystemExit(2)``); errors found later are
    returned as 2, after one line on stderr.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["advise"]:
        from ._advise_cli import main as advise

        return advise(arguments[1:])
    undo_logging = _setup_logging()
    try:
        args = _parser().parse_args(arguments)
        return _run(args)
    except UsageError as exc:
        print(f"sqlprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        undo_logging()


def _run(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run_command(args)
    _need_rich()
    from rich.console import Console

    console = Console()
    if args.command == "demo":
        if args.compare_loading:
            from sqlalchemy import create_engine

            from . import _loading

            if args.url is None:
                # A database of its own, seeded afresh: the demo's file holds another
                # data set (50 users), and the documented figures are for 200.
                with tempfile.TemporaryDirectory(prefix="sqlprobe-loading-") as tmp:
                    url = f"sqlite:///{Path(tmp) / 'loading.db'}"
                    console.print(_loading.render(_loading.run_comparison(url)))
                return 0
            engine = create_engine(args.url)
            check_connection(engine)
            engine.dispose()
            console.print(_loading.render(_loading.run_comparison(args.url)))
            return 0
        result = run_demo(
            args.url,
            duration=args.duration,
            iterations=args.iterations,
            port=None if args.no_metrics else args.port,
            addr=args.addr,
            console=console,
        )
        console.print(
            f"{result.iterations} iterations, {result.statements} statements "
            f"in {result.elapsed:.1f} s"
        )
        return 0
    if args.command == "top":
        from . import _top

        return _top.run(
            args.url, interval=args.interval, once=args.once, console=console, limit=args.limit
        )
    return 2  # pragma: no cover - argparse rejects unknown commands


def _run_command(args: argparse.Namespace) -> int:
    from . import _run

    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if command[:1] and command[0].startswith("-"):
        raise UsageError(
            "COMMAND", f"unknown option {command[0]!r} (options go before --, the command after)"
        )
    try:
        return _run.run(
            command,
            serve=not args.no_metrics,
            addr=args.addr,
            port=args.port,
            multiprocess=args.multiprocess,
            slow_query_ms=args.slow_query_ms,
        )
    except _run.RunError as exc:
        raise UsageError(exc.argument, str(exc)) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
