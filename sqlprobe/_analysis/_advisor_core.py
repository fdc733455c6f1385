"""The synchronous core of index advice: one statement in, proven suggestions out.

`analyse()` reads the statement (`._advisor_sql`), looks up each table it filters,
joins or orders (`._advisor_schema`), drops what cannot help, and proves what is left
in the database's own way (`._advisor_plans`). `advise()` returns only the advice.

What never gets a suggestion:

- a table with fewer than ``min_rows`` rows (the planner's estimate on PostgreSQL and
  MySQL/MariaDB, a bounded count on SQLite);
- a boolean column, or one with at most ``min_distinct`` distinct values (PostgreSQL
  ``pg_stats``, where one value covering more than half the rows also counts as
  non-selective; elsewhere the distinct values among the first 10 000 rows);
- a ``LIKE`` whose pattern starts with a wildcard, or whose pattern is unknown;
- a table the plan already reads through an index, and a candidate whose columns are
  the leading columns of an existing index, primary key or unique constraint;
- a candidate that does not pass the dialect's proof (see `._advisor_plans`).

The connection is the advisor's own (never one of the application's): everything runs
in one transaction that is rolled back at the end, under a statement time limit when
``statement_timeout`` is given (PostgreSQL ``statement_timeout`` for the session, put
back to its previous value afterwards; MariaDB
``max_statement_time`` and MySQL ``max_execution_time`` for the session, reset to the
server default afterwards; SQLite a progress handler). No real index is ever created.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from .._core._fingerprint import analyze
from ._advisor_plans import (
    Proof,
    Trial,
    hypopg_available,
    pattern_ops,
    pg_distinct,
    pg_set,
    prove_mysql,
    prove_postgresql,
    prove_sqlite,
)
from ._advisor_schema import (
    SchemaCache,
    TableInfo,
    index_name,
    is_boolean,
    mapped_names,
    read_rows_estimate,
    render_alembic,
    render_ddl,
    render_model,
    sample_distinct,
)
from ._advisor_sql import candidates, read_statement, sqlglot_dialect

__all__ = ["Analysis", "IndexAdvice", "advise", "analyse", "validate_options"]


@dataclass(frozen=True)
class IndexAdvice:
    """One suggested index, with everything needed to apply it.

    ``proven`` is True when the database showed the index helps: on PostgreSQL the
    planner's cost with a hypothetical index (hypopg) fell by at least
    ``min_improvement`` times (``proof="hypopg"``); on SQLite the plan switched from
    SCAN to SEARCH with the index on an empty copy of the schema (``proof="plan"``: the
    planner would use it; the gain is not measured). It is False for suggestions read
    from a plan and statistics alone (PostgreSQL without hypopg: ``proof="statistics"``;
    MySQL/MariaDB: ``proof="plan"``).
    """

    table: str
    """The table, ``schema.table`` when the schema is not the connection's default."""
    columns: tuple[str, ...]
    name: str
    """The index name, ``ix_<table>_<columns>``."""
    ddl: str
    alembic: str
    model: str | None
    """``Order.user_id`` (composite: ``Order.user_id, Order.created_at``) when mapped."""
    model_change: str | None
    """``mapped_column(..., index=True)`` or ``Index("ix_...", Order.a, Order.b)``."""
    cost_before: float | None
    cost_after: float | None
    proven: bool
    proof: str
    """``hypopg``, ``plan`` or ``statistics``: how the suggestion was checked."""
    statement: str
    """The normalized statement (no values)."""
    fingerprint: str
    dialect: str
    source: str | None = None
    opclasses: dict[str, str] = field(default_factory=dict)

    @property
    def improvement(self) -> float | None:
        """cost_before / cost_after, when both are known."""
        if self.cost_before is None or not self.cost_after:
            return None
        return self.cost_before / self.cost_after


@dataclass
class Analysis:
    """The advice for one statement and, for each table without advice, why."""

    advice: list[IndexAdvice]
    notes: list[str]
    fingerprint: str
    statement: str


def validate_options(
    *,
    min_improvement: float,
    min_rows: int,
    min_distinct: int,
    max_candidates: int,
    statement_timeout: float | None,
) -> None:
    """Raise ValueError naming the first option out of range."""
    if not min_improvement >= 1.0:
        raise ValueError("min_improvement must be at least 1.0")
    if min_rows < 0:
        raise ValueError("min_rows must not be negative")
    if min_distinct < 0:
        raise ValueError("min_distinct must not be negative")
    if max_candidates < 1:
        raise ValueError("max_candidates must be at least 1")
    if statement_timeout is not None and not statement_timeout > 0:
        raise ValueError("statement_timeout must be positive (seconds) or None")


def set_progress_handler(fairy: Any, handler: Any, steps: int) -> None:
    """``set_progress_handler`` on a pool connection, pysqlite's or aiosqlite's.

    The adapter has no such method; aiosqlite's own connection has it as a coroutine,
    run on aiosqlite's thread (the sqlite3 connection belongs to it). The advisor's
    worker is inside SQLAlchemy's greenlet adapter then, where ``await_only`` runs it.
    """
    dbapi = fairy.dbapi_connection
    if hasattr(dbapi, "set_progress_handler"):
        dbapi.set_progress_handler(handler, steps)
        return
    driver = fairy.driver_connection
    if driver is not None and hasattr(driver, "set_progress_handler"):
        from sqlalchemy.util import await_only

        await_only(driver.set_progress_handler(handler, steps))


@contextlib.contextmanager
def _session(connection: Connection, system: str, timeout: float | None) -> Iterator[None]:
    """One transaction, rolled back at the end, with the statement time limit set."""
    if connection.in_transaction():
        connection.rollback()
    connection.begin()
    reset: str | None = None
    dbapi: Any = None
    try:
        if timeout is not None:
            if system == "postgresql":
                # A session setting put back afterwards, not SET LOCAL: the connection
                # may be in autocommit mode, where SET LOCAL does nothing.
                reset = pg_set(connection, "statement_timeout", f"{int(timeout * 1000)}ms")
            elif getattr(connection.dialect, "is_mariadb", False):
                connection.exec_driver_sql(f"SET SESSION max_statement_time = {float(timeout)}")
                reset = "SET SESSION max_statement_time = DEFAULT"
            elif system in ("mysql", "mariadb"):
                connection.exec_driver_sql(
                    f"SET SESSION max_execution_time = {int(timeout * 1000)}"
                )
                reset = "SET SESSION max_execution_time = DEFAULT"
            elif system == "sqlite":
                dbapi = connection.connection
                deadline = time.monotonic() + timeout
                set_progress_handler(dbapi, lambda: int(time.monotonic() > deadline), 1000)
        yield
    finally:
        try:
            connection.rollback()
        finally:
            if reset is not None:
                with contextlib.suppress(Exception):
                    connection.exec_driver_sql(reset)
                    connection.rollback()
            if dbapi is not None:
                set_progress_handler(dbapi, None, 0)


def analyse(
    connection: Connection,
    statement: str,
    parameters: Any = None,
    *,
    dialect_name: str | None = None,
    min_improvement: float = 10.0,
    min_rows: int = 1000,
    min_distinct: int = 10,
    max_candidates: int = 4,
    statement_timeout: float | None = None,
    schema_cache: SchemaCache | None = None,
    registries: Iterable[Any] | None = None,
    install_hypopg: bool = False,
    hypopg: bool = True,
    source: str | None = None,
) -> Analysis:
    """Index advice for ``statement`` and the reasons a table got none.

    ``parameters`` are the statement's parameters as the driver received them (the
    advisor binds them the same way, through the DBAPI cursor); ``None`` for a statement
    with literals, or for a normalized statement whose ``?`` placeholders have no values
    (PostgreSQL then plans it generically; SQLite binds NULLs, its plans do not depend
    on values; MySQL/MariaDB cannot plan it and give no advice).

    ``install_hypopg=True`` runs ``CREATE EXTENSION IF NOT EXISTS hypopg`` when the
    extension is not created in the database. It runs inside the advisor's transaction,
    which is rolled back, so nothing remains afterwards; it needs the privilege to
    create extensions (a superuser, or a trusted-extension setup) and the server
    package installed. Off by default: without it the advisor runs nothing but reads,
    EXPLAIN and hypothetical indexes.

    ``hypopg=False`` ignores hypopg even where it is installed (the plan and
    ``pg_stats`` fallback, ``proven=False``).
    """
    validate_options(
        min_improvement=min_improvement,
        min_rows=min_rows,
        min_distinct=min_distinct,
        max_candidates=max_candidates,
        statement_timeout=statement_timeout,
    )
    dialect = connection.dialect
    system = dialect_name or dialect.name
    if system == "mariadb":
        system = "mysql"
    shape = analyze(statement)
    result = Analysis([], [], shape.fingerprint, shape.normalized)
    if sqlglot_dialect(system) is None:
        result.notes.append(f"index advice is not supported on {system}")
        return result
    if (
        isinstance(parameters, (list, tuple))
        and parameters
        and isinstance(parameters[0], (list, tuple, dict))
    ):
        result.notes.append("executemany statements are not advised")
        return result
    cache = schema_cache if schema_cache is not None else SchemaCache()
    with _session(connection, system, statement_timeout):
        reading = read_statement(
            statement,
            parameters,
            system,
            paramstyle=dialect.paramstyle,
            resolve=lambda s, t, c: cache.has_column(connection, s, t, c),
        )
        if reading.reason is not None:
            result.notes.append(reading.reason)
            return result
        if system == "mysql" and parameters is None and reading.placeholders:
            result.notes.append("placeholders without values cannot be explained on MySQL")
            return result
        default_schema = inspect(connection).default_schema_name
        use_hypopg = (
            hypopg and system == "postgresql" and hypopg_available(connection, install_hypopg)
        )
        if system == "postgresql" and not use_hypopg:
            result.notes.append("hypopg is not installed: suggestions are unproven")
        trials: list[Trial] = []
        for use in reading.tables:
            label = f"{use.schema}.{use.name}" if use.schema else use.name
            if not (use.eq or use.range or use.prefix or use.join or use.order):
                result.notes.append(f"{label}: no predicate or ORDER BY an index could serve")
                continue
            if use.schema and system == "sqlite":
                result.notes.append(f"{label}: attached SQLite schemas are not advised")
                continue
            info = cache.table(connection, use.schema, use.name)
            if info is None:
                result.notes.append(f"{label}: no such table")
                continue
            if info.rows is None:
                info.rows = read_rows_estimate(connection, dialect, info)
            if info.rows is not None and info.rows < min_rows:
                result.notes.append(f"{label}: {info.rows:.0f} rows (fewer than {min_rows})")
                continue
            found = candidates(
                use,
                selective=lambda c, info=info: _selective(  # type: ignore[misc]
                    connection, system, info, c, min_distinct
                ),
                covered=info.covered,
                pattern_ops=lambda c, info=info: (  # type: ignore[misc]
                    pattern_ops(connection, info, c) if system == "postgresql" else None
                ),
                limit=max_candidates,
                implicit=info.implicit if system in ("sqlite", "mysql") else frozenset(),
            )
            if not found:
                result.notes.append(
                    f"{label}: no selective column an existing index does not already serve"
                )
                continue
            trials.append(Trial(use, info, found))
        if not trials:
            return result
        names = {
            c: index_name(t.use.name, c.columns, _max_name(dialect))
            for t in trials
            for c in t.candidates
        }
        if system == "postgresql":
            proofs = prove_postgresql(
                connection,
                statement,
                parameters,
                reading,
                trials,
                min_improvement=min_improvement,
                hypopg=use_hypopg,
                notes=result.notes,
            )
        elif system == "sqlite":
            proofs = prove_sqlite(
                connection, statement, parameters, reading, trials, names=names, notes=result.notes
            )
        else:
            proofs = prove_mysql(connection, statement, parameters, trials, notes=result.notes)
    for proof in proofs:
        result.advice.append(
            _render(
                proof,
                names[proof.candidate],
                connection,
                system,
                default_schema,
                registries,
                shape.normalized,
                shape.fingerprint,
                source,
            )
        )
    return result


def _max_name(dialect: Any) -> int:
    return int(getattr(dialect, "max_identifier_length", 63) or 63)


def _selective(
    connection: Connection, system: str, info: TableInfo, column: str, min_distinct: int
) -> bool:
    if column not in info.columns or is_boolean(info, column):
        return False
    if column not in info.distinct:
        if system == "postgresql":
            info.distinct[column] = pg_distinct(connection, info, column)
        else:
            info.distinct[column] = sample_distinct(connection, connection.dialect, info, column)
    distinct = info.distinct[column]
    return distinct is None or distinct > min_distinct


def _render(
    proof: Proof,
    name: str,
    connection: Connection,
    system: str,
    default_schema: str | None,
    registries: Iterable[Any] | None,
    statement: str,
    fingerprint: str,
    source: str | None,
) -> IndexAdvice:
    use = proof.trial.use
    schema = use.schema if use.schema and use.schema != default_schema else None
    columns = proof.candidate.columns
    ops = dict(proof.candidate.ops)
    mapped = mapped_names(
        schema, use.name, columns, default_schema=default_schema, registries=registries
    )
    model = change = None
    if mapped is not None:
        model, change = render_model(mapped[0], mapped[1], name, ops, columns)
    return IndexAdvice(
        table=f"{schema}.{use.name}" if schema else use.name,
        columns=columns,
        name=name,
        ddl=render_ddl(connection.dialect, name, schema, use.name, columns, ops),
        alembic=render_alembic(system, name, schema, use.name, columns, ops),
        model=model,
        model_change=change,
        cost_before=proof.cost_before,
        cost_after=proof.cost_after,
        proven=proof.proven,
        proof=proof.proof,
        statement=statement,
        fingerprint=fingerprint,
        dialect=system,
        source=source,
        opclasses=ops,
    )


def advise(
    connection: Connection,
    statement: str,
    parameters: Any = None,
    *,
    dialect_name: str | None = None,
    min_improvement: float = 10.0,
    min_rows: int = 1000,
    min_distinct: int = 10,
    max_candidates: int = 4,
    statement_timeout: float | None = None,
    schema_cache: SchemaCache | None = None,
    registries: Iterable[Any] | None = None,
    install_hypopg: bool = False,
    hypopg: bool = True,
    source: str | None = None,
) -> list[IndexAdvice]:
    """The proven (or, where a database cannot prove, plan-based) indexes for a statement.

    The options are those of `analyse()`; this returns its ``advice`` only.
    """
    return analyse(
        connection,
        statement,
        parameters,
        dialect_name=dialect_name,
        min_improvement=min_improvement,
        min_rows=min_rows,
        min_distinct=min_distinct,
        max_candidates=max_candidates,
        statement_timeout=statement_timeout,
        schema_cache=schema_cache,
        registries=registries,
        install_hypopg=install_hypopg,
        hypopg=hypopg,
        source=source,
    ).advice
