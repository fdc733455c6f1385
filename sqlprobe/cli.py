"""The ``sqlprobe`` command: ``sqlprobe demo`` and friends.

``sqlprobe demo`` runs a small but typical SQLAlchemy application (users with orders
and articles: lazy and eager relationship loading, aggregates, a bulk update, a
transaction that rolls back, one deliberately slow query and one failing statement)
with sqlprobe attached in one line, serves /metrics while it runs, and prints the top
statements by total time when it stops. It runs on an embedded SQLite file unless
``--url`` names another database.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

__all__ = ["main"]

DEFAULT_SQLITE_FILE = "sqlprobe-demo.db"


def _need_rich() -> Any:
    try:
        import rich
    except ImportError:  # pragma: no cover - exercised only without the extra
        sys.exit("sqlprobe demo needs rich for its output: pip install 'sqlprobe[cli]'")
    return rich


class _ConsoleLogger:
    """A structlog-compatible logger printing rendered events above the progress bar."""

    def __init__(self, console: Any) -> None:
        self._console = console

    def msg(self, message: str) -> None:
        self._console.print(message, markup=False, highlight=False, soft_wrap=True)

    debug = info = warning = error = critical = exception = msg


@dataclass
class DemoResult:
    """What one demo run did (returned for tests; printed by the CLI)."""

    iterations: int
    statements: int
    elapsed: float
    port: int | None


def _slow_sql(dialect_name: str) -> str:
    if dialect_name == "postgresql":
        return "SELECT pg_sleep(0.15)"
    if dialect_name in ("mysql", "mariadb"):
        return "SELECT SLEEP(0.15)"
    return "SELECT sqlprobe_sleep(0.15)"


def _install_sqlite_sleep(engine: Any) -> None:
    from sqlalchemy import event

    # SQLite has no sleep function: give the demo's connections one, so that the
    # deliberately slow query is slow in the database, as it would be elsewhere.
    @event.listens_for(engine, "connect")
    def _register(dbapi_connection: Any, _record: Any) -> None:
        def sleep(seconds: float) -> int:
            time.sleep(seconds)
            return 1

        dbapi_connection.create_function("sqlprobe_sleep", 1, sleep)


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
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from sqlalchemy import create_engine, select, text
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.orm import Session, joinedload, selectinload

    import sqlprobe

    from ._scenario import Article, Base, Order, User, deactivate_idle_users, seed, user_statistics

    if url is None:
        url = f"sqlite:///{DEFAULT_SQLITE_FILE}"
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        _install_sqlite_sleep(engine)

    logger = structlog.wrap_logger(
        _ConsoleLogger(console),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=console.is_terminal),
        ],
    )
    # The one line an application adds:
    probe = sqlprobe.attach(engine, name="demo", logger=logger)

    server = None
    if port is not None:
        try:
            server = sqlprobe.start_http_server(port=port, addr=addr)
        except OSError as exc:
            probe.detach()
            raise SystemExit(f"cannot serve /metrics on {addr}:{port}: {exc}") from None
        console.print(f"Serving Prometheus metrics at [bold]{server.url}[/bold]")

    if reset:
        Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        if session.scalar(select(User.id).limit(1)) is None:
            seed(session)

    slow_sql = text(_slow_sql(engine.dialect.name))
    stop = {"now": False}

    def on_sigint(_sig: int, _frame: FrameType | None) -> None:
        stop["now"] = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_term = signal.signal(signal.SIGTERM, on_sigint)

    def n_plus_one_page(session: Session) -> None:
        with sqlprobe.scope("GET /users"):
            for user in session.scalars(select(User).order_by(User.id).limit(20)):
                _ = len(user.orders)  # lazy load: one SELECT per user

    def eager_pages(session: Session) -> None:
        with sqlprobe.scope("GET /users?include=orders"):
            users = session.scalars(
                select(User).options(selectinload(User.orders)).order_by(User.id).limit(20)
            ).all()
            _ = sum(len(u.orders) for u in users)
        with sqlprobe.scope("GET /orders/recent"):
            recent = session.scalars(
                select(Order)
                .options(joinedload(Order.user))
                .order_by(Order.created_at.desc())
                .limit(10)
            ).all()
            _ = [o.user.name for o in recent]

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
            pass
        session.rollback()

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

    started = time.monotonic()
    done = 0
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("[bold]sqlprobe demo[/bold]"),
            BarColumn(),
            TextColumn("{task.completed} iterations · {task.fields[statements]} statements"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            total = iterations if iterations is not None else None
            task = progress.add_task("demo", total=total, statements=0)
            while not stop["now"]:
                if iterations is not None and done >= iterations:
                    break
                if iterations is None and duration and time.monotonic() - started >= duration:
                    break
                with Session(engine) as session:
                    for step in steps:
                        step(session)
                    if done % slow_every == 0:
                        session.execute(slow_sql)  # the deliberately slow query
                        failing(session)  # and the failing one
                        deactivate_idle_users(session, datetime(2026, 1, 1) - timedelta(days=30))
                    session.commit()
                done += 1
                progress.update(
                    task,
                    completed=done,
                    statements=sum(s.calls for s in probe.statements()),
                )
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        elapsed = time.monotonic() - started
        stats = probe.statements()
        _print_table(console, stats)
        statements = sum(s.calls for s in stats)
        probe.detach()
        if server is not None:
            server.close()
        engine.dispose()
    return DemoResult(done, statements, elapsed, server.port if server else None)


class _Cancelled(Exception):
    pass


def _print_table(console: Any, stats: Sequence[Any], limit: int = 10) -> None:
    from rich.table import Table

    table = Table(title="Top statements by total time", title_justify="left")
    table.add_column("calls", justify="right", no_wrap=True, min_width=5)
    table.add_column("total ms", justify="right", no_wrap=True, min_width=8)
    table.add_column("mean ms", justify="right", no_wrap=True, min_width=7)
    table.add_column("rows", justify="right", no_wrap=True, min_width=5)
    table.add_column("fingerprint", style="dim", no_wrap=True, min_width=16)
    table.add_column(
        "statement (normalized)",
        no_wrap=True,
        overflow="ellipsis",
        max_width=max(20, min(90, console.width - 64)),
    )
    for s in stats[:limit]:
        table.add_row(
            str(s.calls),
            f"{s.total_seconds * 1000:.1f}",
            f"{s.mean_seconds * 1000:.3f}",
            str(s.rows),
            s.fingerprint,
            s.statement,
        )
    console.print(table)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqlprobe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
        help=f"database URL (default: an embedded SQLite file, ./{DEFAULT_SQLITE_FILE})",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds to run (default 30; 0 runs until Ctrl-C or SIGTERM)",
    )
    demo.add_argument(
        "--iterations", type=int, default=None, help="stop after this many iterations instead"
    )
    demo.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("SQLPROBE_METRICS_PORT", "9464")),
        help="port for /metrics (default 9464; 0 picks a free one)",
    )
    demo.add_argument(
        "--addr",
        default=os.environ.get("SQLPROBE_METRICS_ADDR", "127.0.0.1"),
        help="address for /metrics (default 127.0.0.1)",
    )
    demo.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    demo.add_argument(
        "--compare-loading",
        action="store_true",
        help="instead of the workload, measure each relationship loading strategy",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sqlprobe`` console script."""
    args = _parser().parse_args(argv)
    _need_rich()
    from rich.console import Console

    console = Console()
    if args.command == "demo":
        if args.duration < 0:
            console.print("--duration must be >= 0")
            return 2
        if args.compare_loading:
            from . import _loading

            url = args.url or f"sqlite:///{DEFAULT_SQLITE_FILE}"
            rows = _loading.run_comparison(url)
            console.print(_loading.render(rows))
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
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    with suppress(KeyboardInterrupt):
        sys.exit(main())
