"""``sqlprobe demo --compare-loading``: the loading strategies, measured.

Tutorials rank SQLAlchemy's relationship loading strategies with words ("Moderate",
"Good", "Excellent"). This runs one workload (list N users with their orders, the demo's
``User.orders``) under each strategy on a real database and measures it:

* ``statements``: statements executed (``sqlprobe.testing.capture``, noise excluded);
* ``db time``: the time the driver spent executing them (sqlprobe's own timing of
  ``cursor.execute``; drivers that stream results, like SQLite's, do part of the work
  later, while rows are fetched, and that part is in wall time only);
* ``rows``: rows the database sent back (rows fetched from DBAPI cursors);
* ``wall time``: the whole workload, best of ``repeat`` runs after one warm-up run
  (SQL compilation caches are warm, as in a running application);
* ``peak memory``: peak of Python allocations during a separate run under
  ``tracemalloc`` (kept out of the timed runs, which it would slow down).

The strategies, applied as loader options on the same query (``select(User)`` ordered
by id, limited to ``users``):

* ``lazy (select)``: the default; one SELECT per user when ``user.orders`` is touched;
* ``joined``: one SELECT with a LEFT OUTER JOIN (user columns repeated per order);
* ``selectin``: a second SELECT with ``WHERE user_id IN (...)`` (500 ids per batch);
* ``subquery``: a second SELECT joining a subquery that repeats the first query;
* ``raise``: ``raiseload``; touching ``user.orders`` raises, so the loop stops at the
  first user: the N+1 becomes an error during development (the row says so);
* ``write_only``: ``orders`` mapped ``lazy="write_only"`` (a second mapping of the same
  tables, private to this module); a write-only collection is read with an explicit
  ``user.orders.select()``, one statement per user.

Rows are counted on an engine this module creates for the run: an
``after_cursor_execute`` listener gives SQLAlchemy a wrapper of the DBAPI cursor that
counts rows as they are fetched and changes nothing else. It exists only in this
measurement (sqlprobe itself never listens to ConnectionEvents: see ``_hooks``).

Data: the demo schema (``sqlprobe._scenario``). Missing tables are created; an empty
users table is seeded (``users`` users with ``orders_per_user`` orders each); existing
data is used as it is, and the table title says how much there was.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    WriteOnlyMapped,
    joinedload,
    lazyload,
    raiseload,
    relationship,
    selectinload,
    subqueryload,
)

from ._probe import engine_label
from ._scenario import Base, Order, User, seed

__all__ = ["STRATEGIES", "Row", "render", "run_comparison", "workload"]

STRATEGIES: tuple[str, ...] = (
    "lazy (select)",
    "joined",
    "selectin",
    "subquery",
    "raise",
    "write_only",
)


class Row(NamedTuple):
    """One strategy's measurements."""

    strategy: str
    statements: int
    db_seconds: float
    rows: int
    wall_seconds: float
    peak_bytes: int
    orders_seen: int
    """Orders the workload read (0 for ``raise``, which stops at the first access)."""
    note: str
    database: str
    """The ``engine`` label of the database (no credentials)."""
    users: int
    """Users the workload listed."""


# -- write_only: the same tables, mapped with a write-only collection --------------------


class _WriteOnlyBase(DeclarativeBase):
    pass


class _WriteOnlyOrder(_WriteOnlyBase):
    __table__ = Order.__table__

    id: Mapped[int]
    user_id: Mapped[int]


class _WriteOnlyUser(_WriteOnlyBase):
    __table__ = User.__table__

    id: Mapped[int]
    # Read-only here: the demo's own mapping (User.orders / Order.user) writes these rows.
    orders: WriteOnlyMapped[_WriteOnlyOrder] = relationship(_WriteOnlyOrder, viewonly=True)


# -- the workload ---------------------------------------------------------------------------

_OPTIONS: dict[str, Callable[[], Any]] = {
    "lazy (select)": lambda: lazyload(User.orders),
    "joined": lambda: joinedload(User.orders),
    "selectin": lambda: selectinload(User.orders),
    "subquery": lambda: subqueryload(User.orders),
    "raise": lambda: raiseload(User.orders),
}


def workload(session: Session, strategy: str, users: int) -> int:
    """List ``users`` users and read each one's orders; returns the orders read.

    ``raise`` stops at the first access (``InvalidRequestError``) and returns 0.
    """
    if strategy == "write_only":
        seen = 0
        writers = select(_WriteOnlyUser).order_by(_WriteOnlyUser.id).limit(users)
        for writer in session.scalars(writers).all():
            seen += len(session.scalars(writer.orders.select()).all())
        return seen
    option = _OPTIONS[strategy]()
    query = select(User).order_by(User.id).limit(users).options(option)
    result = session.scalars(query)
    if strategy == "joined":
        result = result.unique()
    seen = 0
    try:
        for user in result.all():
            seen += len(user.orders)
    except InvalidRequestError:
        return 0
    return seen


# -- rows fetched: a counting DBAPI wrapper ----------------------------------------------


class _Counter:
    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows = 0


class _CountingCursor:
    """A DBAPI cursor that counts the rows fetched through it."""

    def __init__(self, cursor: Any, counter: _Counter) -> None:
        object.__setattr__(self, "_cursor", cursor)
        object.__setattr__(self, "_counter", counter)

    def fetchone(self) -> Any:
        row = self._cursor.fetchone()
        if row is not None:
            self._counter.rows += 1
        return row

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        rows = self._cursor.fetchmany(*args, **kwargs)
        self._counter.rows += len(rows)
        return rows

    def fetchall(self) -> Any:
        rows = self._cursor.fetchall()
        self._counter.rows += len(rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        for row in self._cursor:
            self._counter.rows += 1
            yield row

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cursor, name, value)


def _counting_engine(url: str, counter: _Counter) -> Engine:
    engine = create_engine(url)
    if engine.dialect.is_async:
        engine.dispose()
        raise ValueError(
            "--compare-loading needs a synchronous driver URL "
            "(e.g. postgresql+psycopg://, mysql+pymysql://, sqlite:///file.db)"
        )

    # Measurement only: a ConnectionEvents listener on this private engine (never on an
    # application's) hands SQLAlchemy a counting wrapper of the cursor it fetches from.
    @event.listens_for(engine, "after_cursor_execute")
    def wrap(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if context is not None and cursor.description is not None:
            context.cursor = _CountingCursor(cursor, counter)

    return engine


# -- the run ----------------------------------------------------------------------------------


def _prepare(engine: Engine, users: int, orders_per_user: int) -> int:
    """Create missing tables, seed an empty users table; return the users to list."""
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        present = session.scalar(select(func.count()).select_from(User)) or 0
        if present == 0:
            seed(session, users=users, orders_per_user=orders_per_user, articles_per_user=0)
            present = users
    return min(users, present)


def run_comparison(
    url: str,
    *,
    users: int = 200,
    orders_per_user: int = 5,
    repeat: int = 3,
    strategies: tuple[str, ...] = STRATEGIES,
) -> list[Row]:
    """Run the workload under each strategy on the database at ``url``; one Row each."""
    from .testing import capture

    if users < 1 or orders_per_user < 0 or repeat < 1:
        raise ValueError("users and repeat must be >= 1 and orders_per_user >= 0")
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"unknown strategies: {', '.join(sorted(unknown))}")
    counter = _Counter()
    engine = _counting_engine(url, counter)
    label = engine_label(engine.url)
    out: list[Row] = []
    try:
        listed = _prepare(engine, users, orders_per_user)
        with capture(engine):  # attach once, outside the measurements
            for strategy in strategies:
                out.append(_measure(engine, counter, strategy, listed, repeat, label))
    finally:
        engine.dispose()
    return out


def _measure(
    engine: Engine, counter: _Counter, strategy: str, users: int, repeat: int, label: str
) -> Row:
    from .testing import capture

    with Session(engine) as session:  # warm-up: compile caches, pool connection
        workload(session, strategy, users)
    best = float("inf")
    for i in range(repeat):
        with Session(engine) as session:
            if i == 0:
                counter.rows = 0
                with capture(engine) as q:
                    start = time.perf_counter()
                    seen = workload(session, strategy, users)
                    elapsed = time.perf_counter() - start
                rows = counter.rows
            else:
                start = time.perf_counter()
                workload(session, strategy, users)
                elapsed = time.perf_counter() - start
        best = min(best, elapsed)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        with Session(engine) as session:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            workload(session, strategy, users)
            peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not tracing:
            tracemalloc.stop()
    note = ""
    if strategy == "raise":
        note = "raises at first access"
    elif strategy == "write_only":
        note = ".select() per user"
    return Row(
        strategy=strategy,
        statements=len(q),
        db_seconds=q.total_duration,
        rows=rows,
        wall_seconds=best,
        peak_bytes=max(peak, 0),
        orders_seen=seen,
        note=note,
        database=label,
        users=users,
    )


def render(rows: list[Row], title: str | None = None) -> Any:
    """A ``rich`` Table of the measurements."""
    from rich.table import Table

    if title is None and rows:
        first = rows[0]
        title = f"Loading {first.users} users and their orders on {first.database}"
    table = Table(title=title)
    table.add_column("strategy")
    table.add_column("statements", justify="right")
    table.add_column("db time (ms)", justify="right")
    table.add_column("rows", justify="right")
    table.add_column("wall time (ms)", justify="right")
    table.add_column("peak memory (KiB)", justify="right")
    table.add_column("orders read", justify="right")
    table.add_column("note")
    for r in rows:
        table.add_row(
            r.strategy,
            str(r.statements),
            f"{r.db_seconds * 1000:.2f}",
            str(r.rows),
            f"{r.wall_seconds * 1000:.2f}",
            f"{r.peak_bytes / 1024:.0f}",
            str(r.orders_seen),
            r.note,
        )
    return table
