"""Proving a candidate index, one way per database.

PostgreSQL with hypopg (``proof="hypopg"``, ``proven=True``)
    The planner's total cost of the statement is read with ``EXPLAIN (FORMAT JSON)``,
    then again after ``hypopg_create_index()`` adds the candidate as a hypothetical
    index (visible to this session's planner only; nothing is built or written), and
    ``hypopg_reset()`` removes it. A candidate counts only if the new plan uses it and
    the cost falls by at least ``min_improvement`` times; of the candidates that count,
    the cheapest plan wins, the narrower index when two plans are within 20 %.

PostgreSQL without hypopg (``proof="statistics"``, ``proven=False``)
    The plan must read the table with a ``Seq Scan`` whose ``Filter`` names the column,
    and the planner's own row estimate for that scan (which comes from ``pg_stats``:
    ``n_distinct``, ``most_common_freqs``, histograms) must keep at most 1 % of the
    table's rows. ``cost_before`` is the plan's cost; ``cost_after`` is unknown (None).

SQLite (``proof="plan"``, ``proven=True`` in this sense only)
    SQLite has no planner costs to compare and no hypothetical indexes. The schema
    (every ``CREATE TABLE``/``INDEX``/``VIEW`` in ``sqlite_master``, and
    ``sqlite_stat1`` when the database has one) is copied into an empty in-memory
    database, the candidate index is created there, and ``EXPLAIN QUERY PLAN`` of the
    same statement must switch from ``SCAN table`` (on the real database) to
    ``SEARCH table USING INDEX candidate`` (on the copy). That proves the planner would
    use the index; it does not measure a gain, so ``cost_before``/``cost_after`` are
    None.

MySQL / MariaDB (``proof="plan"``, ``proven=False``)
    ``EXPLAIN`` must show the table read with ``type=ALL`` and no key; the first
    candidate (its columns' distinct counts already checked) is suggested unproven:
    neither database offers hypothetical indexes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from ._advisor_schema import TableInfo, quote_table
from ._advisor_sql import Candidate, Reading, TableUse

__all__ = [
    "Proof",
    "Trial",
    "pg_set",
    "prove_mysql",
    "prove_postgresql",
    "prove_sqlite",
    "run",
]

#: Without hypopg, the planner's estimate must keep at most this part of the table.
FALLBACK_MAX_FRACTION = 0.01
_WITHIN = 1.2
_names = itertools.count(1)


@dataclass
class Trial:
    """A table with its candidates, as the advisor hands them to a proof."""

    use: TableUse
    info: TableInfo
    candidates: list[Candidate]


@dataclass
class Proof:
    """The chosen index for one table and what supports it."""

    trial: Trial
    candidate: Candidate
    proof: str
    proven: bool
    cost_before: float | None = None
    cost_after: float | None = None


def run(connection: Connection, sql: str, parameters: Any = None) -> list[Any]:
    """Rows of ``sql`` through the DBAPI cursor, as the application's driver ran it.

    Without parameters the text goes to ``cursor.execute(sql)`` alone, so a driver with
    a ``format``/``pyformat`` paramstyle does not read the ``%`` of ``LIKE 'a%'`` as a
    placeholder (SQLAlchemy's ``exec_driver_sql`` always passes parameters). Driver
    errors are raised as SQLAlchemy's `DBAPIError` subclasses, as ``execute`` would.
    """
    dbapi = connection.connection.dbapi_connection
    assert dbapi is not None
    error = connection.dialect.loaded_dbapi.Error
    cursor = dbapi.cursor()
    try:
        if parameters is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, parameters)
        rows = cursor.fetchall() if cursor.description is not None else []
        names = [d[0] for d in cursor.description or ()]
    except error as exc:  # raised as SQLAlchemy raises driver errors
        raise DBAPIError.instance(sql, parameters, exc, error) from exc
    finally:
        cursor.close()
    return [dict(zip(names, r, strict=True)) for r in rows]


# -- PostgreSQL ---------------------------------------------------------------------


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    stack = [plan]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.get("Plans", ()))


def _names_of(use: TableUse) -> set[str]:
    return {use.name, *use.aliases}


def _pg_reads(plan: dict[str, Any], use: TableUse) -> list[dict[str, Any]]:
    names = _names_of(use)
    return [
        n
        for n in _nodes(plan)
        if n.get("Relation Name") == use.name or (n.get("Alias") in names and "Relation Name" in n)
    ]


def _pg_uses_index(plan: dict[str, Any], use: TableUse) -> bool:
    reads = _pg_reads(plan, use)
    return bool(reads) and all(n.get("Node Type") != "Seq Scan" for n in reads)


def pg_set(connection: Connection, name: str, value: str) -> str:
    """Set a session setting; returns the statement that puts the old value back."""
    old = connection.execute(text("SELECT current_setting(:n)"), {"n": name}).scalar()
    connection.execute(text("SELECT set_config(:n, :v, false)"), {"n": name, "v": value})
    return f"SELECT set_config('{name}', '{str(old).replace(chr(39), chr(39) * 2)}', false)"


class _PgExplain:
    """EXPLAIN of one statement: with the driver's parameters, or as a generic plan.

    With parameters (what the application's driver received), the statement text and
    the parameters go through the same DBAPI cursor call as the application's, so every
    paramstyle and type adaptation is the driver's own and the planner sees the values
    (a custom plan, as the application's statement got). Without values (normalized
    texts from /metrics, whose placeholders are ``?``), the text is prepared with
    ``$1``... parameters of unknown type (PostgreSQL infers each from its context) and
    explained as a generic plan (``plan_cache_mode = force_generic_plan``, ``EXECUTE``
    with NULLs, which a generic plan does not look at). A prepared statement keeps its
    plan, and a hypothetical index does not invalidate it, so each EXPLAIN prepares
    afresh under a new name and deallocates it.
    """

    def __init__(
        self, connection: Connection, statement: str, parameters: Any, reading: Reading
    ) -> None:
        self.connection = connection
        self.statement = statement
        self.parameters = parameters
        self.reading = reading
        self.generic = parameters is None and reading.placeholders > 0
        self.prepared: set[str] = set()
        self.reset: str | None = None
        if self.generic:
            self.reset = pg_set(connection, "plan_cache_mode", "force_generic_plan")

    def close(self) -> None:
        if self.reset is not None:
            self.connection.exec_driver_sql(self.reset)

    def clean_up_after_error(self, hypopg: bool) -> None:
        """After a failed statement: end the transaction, drop what the session kept.

        Prepared statements, hypothetical indexes and settings are session state that a
        rollback does not undo; the connection may go back to a pool.
        """
        self.connection.rollback()
        statements = [f"DEALLOCATE {name}" for name in sorted(self.prepared)]
        if hypopg:
            statements.append("SELECT hypopg_reset()")
        if self.reset is not None:
            statements.append(self.reset)
        for statement in statements:
            try:
                run(self.connection, statement)
            except Exception:
                self.connection.rollback()
        self.prepared.clear()

    def __call__(self) -> dict[str, Any]:
        if not self.generic:
            rows = run(self.connection, "EXPLAIN (FORMAT JSON) " + self.statement, self.parameters)
        else:
            name = f"sqlprobe_advise_{next(_names)}"
            run(self.connection, f"PREPARE {name} AS {self.reading.numbered}")
            self.prepared.add(name)
            nulls = ", ".join(["NULL"] * self.reading.placeholders)
            rows = run(self.connection, f"EXPLAIN (FORMAT JSON) EXECUTE {name}({nulls})")
            run(self.connection, f"DEALLOCATE {name}")
            self.prepared.discard(name)
        raw = next(iter(rows[0].values()))
        full = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        plan: dict[str, Any] = full[0]["Plan"]
        return plan


def hypopg_available(connection: Connection, install: bool) -> bool:
    """Whether hypopg is usable; with ``install``, try ``CREATE EXTENSION`` first.

    The extension is created in a savepoint of the advisor's transaction, which is
    rolled back at the end of the analysis: hypopg is usable for this analysis only and
    nothing is left in the database.
    """
    have = connection.exec_driver_sql(
        "SELECT 1 FROM pg_extension WHERE extname = 'hypopg'"
    ).scalar()
    if have or not install:
        return bool(have)
    try:
        with connection.begin_nested():
            connection.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS hypopg")
    except Exception:
        return False
    return True


def pattern_ops(connection: Connection, info: TableInfo, column: str) -> str | None:
    """The operator class a LIKE 'prefix%' index needs on this column, None if none.

    With the C (or POSIX) collation a plain B-tree serves LIKE prefixes; with any other
    collation PostgreSQL needs ``text_pattern_ops`` (``varchar_pattern_ops`` for
    ``varchar``, ``bpchar_pattern_ops`` for ``char``).
    """
    if column not in info.collations:
        row = connection.execute(
            text(
                "SELECT COALESCE(NULLIF(co.collname, 'default'), d.datcollate),"
                " format_type(a.atttypid, NULL)"
                " FROM pg_attribute a"
                " LEFT JOIN pg_collation co ON co.oid = a.attcollation"
                " CROSS JOIN pg_database d"
                " WHERE d.datname = current_database()"
                " AND a.attrelid = to_regclass(:t) AND a.attname = :c"
            ),
            {"t": quote_table(connection.dialect, info.schema, info.name), "c": column},
        ).first()
        ops: str | None = None
        if row is not None and row[0] not in ("C", "POSIX"):
            ops = {
                "text": "text_pattern_ops",
                "character varying": "varchar_pattern_ops",
                "character": "bpchar_pattern_ops",
            }.get(str(row[1]))
        info.collations[column] = ops
    return info.collations[column]


def pg_distinct(connection: Connection, info: TableInfo, column: str) -> float | None:
    """Distinct values from ``pg_stats`` (None before ANALYZE); a dominant value counts."""
    row = connection.execute(
        text(
            "SELECT n_distinct, most_common_freqs FROM pg_stats"
            " WHERE schemaname = COALESCE(:s, current_schema())"
            " AND tablename = :t AND attname = :c"
        ),
        {"s": info.schema, "t": info.name, "c": column},
    ).first()
    if row is None or row[0] is None:
        return None
    n = float(row[0])
    if n < 0:
        n = -n * (info.rows or 0.0)
    freqs = [float(f) for f in (row[1] or ())]
    if freqs and max(freqs) > 0.5:
        # One value covers most rows: an index can only ever help for the rare ones.
        return min(n, 2.0)
    return n


def _hypothetical_ddl(connection: Connection, info: TableInfo, candidate: Candidate) -> str:
    prep = connection.dialect.identifier_preparer
    ops = dict(candidate.ops)
    cols = ", ".join(prep.quote(c) + (f" {ops[c]}" if c in ops else "") for c in candidate.columns)
    return f"CREATE INDEX ON {quote_table(connection.dialect, info.schema, info.name)} ({cols})"


def prove_postgresql(
    connection: Connection,
    statement: str,
    parameters: Any,
    reading: Reading,
    trials: list[Trial],
    *,
    min_improvement: float,
    hypopg: bool,
    notes: list[str],
) -> list[Proof]:
    """Hypothetical-index costs with hypopg, else the plan and ``pg_stats``."""
    explain = _PgExplain(connection, statement, parameters, reading)
    try:
        proofs = _prove_postgresql(explain, connection, trials, min_improvement, hypopg, notes)
    except BaseException:
        explain.clean_up_after_error(hypopg)
        raise
    explain.close()
    return proofs


def _prove_postgresql(
    explain: _PgExplain,
    connection: Connection,
    trials: list[Trial],
    min_improvement: float,
    hypopg: bool,
    notes: list[str],
) -> list[Proof]:
    before = explain()
    cost_before = float(before.get("Total Cost", 0.0))
    out: list[Proof] = []
    for trial in trials:
        label = trial.use.name
        if _pg_uses_index(before, trial.use):
            notes.append(f"{label}: the plan already uses an index")
            continue
        if not hypopg:
            proof = _pg_fallback(before, trial, cost_before)
            if proof is None:
                notes.append(f"{label}: no selective filter on a sequential scan")
            else:
                out.append(proof)
            continue
        kept: list[tuple[float, Candidate]] = []
        for candidate in trial.candidates:
            name = connection.execute(
                text("SELECT indexname FROM hypopg_create_index(:ddl)"),
                {"ddl": _hypothetical_ddl(connection, trial.info, candidate)},
            ).scalar()
            after = explain()
            connection.exec_driver_sql("SELECT hypopg_reset()")
            used = any(n.get("Index Name") == name for n in _nodes(after))
            cost = float(after.get("Total Cost", cost_before))
            if used and cost > 0 and cost_before / cost >= min_improvement:
                kept.append((cost, candidate))
            elif used and cost > 0:
                notes.append(
                    f"{label} ({', '.join(candidate.columns)}): cost {cost_before:.1f} ->"
                    f" {cost:.1f}, less than {min_improvement:g}x"
                )
            else:
                notes.append(f"{label} ({', '.join(candidate.columns)}): the planner ignores it")
        if not kept:
            continue
        best = min(c for c, _ in kept)
        close = [(len(c.columns), cost, c) for cost, c in kept if cost <= best * _WITHIN]
        _, cost, chosen = min(close, key=lambda t: (t[0], t[1]))
        out.append(Proof(trial, chosen, "hypopg", True, cost_before, cost))
    return out


def _pg_fallback(plan: dict[str, Any], trial: Trial, cost_before: float) -> Proof | None:
    rows = trial.info.rows or 0.0
    for node in _pg_reads(plan, trial.use):
        if node.get("Node Type") != "Seq Scan" or not node.get("Filter") or rows <= 0:
            continue
        if float(node.get("Plan Rows", rows)) / rows > FALLBACK_MAX_FRACTION:
            continue
        words = set(
            "".join(ch if ch.isalnum() or ch == "_" else " " for ch in node["Filter"]).split()
        )
        for candidate in trial.candidates:
            if all(c in words for c in candidate.columns):
                return Proof(trial, candidate, "statistics", False, cost_before, None)
    return None


# -- SQLite -------------------------------------------------------------------------


def _sqlite_scans(details: list[str], use: TableUse) -> tuple[bool, bool]:
    """(scanned without an index, read through an index) for one table."""
    names = _names_of(use)
    scanned = indexed = False
    for detail in details:
        words = detail.split()
        if len(words) < 2:
            continue
        target = words[2] if words[1] == "TABLE" and len(words) > 2 else words[1]
        if target not in names:
            continue
        if words[0] == "SCAN" and "INDEX" not in words:
            scanned = True
        elif "INDEX" in words or words[0] == "SEARCH":
            indexed = True
    return scanned, indexed


def _sqlite_details(cursor: Any, statement: str, parameters: Any) -> list[str]:
    # execute() then fetchall() on the cursor itself: SQLAlchemy's aiosqlite adapter
    # returns aiosqlite's cursor from execute(), whose fetchall() is a coroutine.
    cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters or ())
    return [str(r[3]) for r in cursor.fetchall()]


#: Application functions `_copy_details` stands in for, at most, per statement.
MAX_STAND_INS = 8


def _copy_details(copy: sqlite3.Connection, statement: str, parameters: Any) -> list[str]:
    """The plan on the schema copy, with a stand-in for each application SQL function.

    The application's connections may have functions its ``connect`` handlers register
    (``create_function``); the copy is a fresh ``sqlite3`` connection without them, and
    SQLite will not even plan a statement that calls an unknown function. Planning
    never calls a function, so a stand-in of any arity (returning NULL) gives the same
    plan.
    """
    for _ in range(MAX_STAND_INS + 1):
        try:
            return _sqlite_details(copy.cursor(), statement, parameters)
        except sqlite3.OperationalError as exc:
            name = str(exc).partition("no such function: ")[2].strip()
            if not name or not name.replace("_", "").isalnum():
                raise
            copy.create_function(name, -1, lambda *_args: None)
    raise sqlite3.OperationalError("too many unknown functions")


def _schema_copy(connection: Connection) -> sqlite3.Connection:
    copy = sqlite3.connect(":memory:")
    ddl = connection.exec_driver_sql(
        "SELECT type, sql FROM sqlite_master WHERE sql IS NOT NULL"
        " AND name NOT LIKE 'sqlite_%' ORDER BY CASE type WHEN 'table' THEN 0"
        " WHEN 'index' THEN 1 ELSE 2 END"
    ).all()
    for kind, sql in ddl:
        if kind == "trigger":
            continue
        with contextlib.suppress(sqlite3.Error):  # a virtual table whose module is absent
            copy.execute(sql)
    has_stats = connection.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'"
    ).scalar()
    if has_stats:
        stats = connection.exec_driver_sql("SELECT tbl, idx, stat FROM sqlite_stat1").all()
        copy.execute("ANALYZE")
        copy.execute("DELETE FROM sqlite_stat1")
        copy.executemany("INSERT INTO sqlite_stat1 VALUES (?, ?, ?)", [tuple(r) for r in stats])
        copy.execute("ANALYZE sqlite_schema")
    return copy


def prove_sqlite(
    connection: Connection,
    statement: str,
    parameters: Any,
    reading: Reading,
    trials: list[Trial],
    *,
    names: dict[Candidate, str],
    notes: list[str],
) -> list[Proof]:
    """The plan switch from SCAN to SEARCH on an empty in-memory copy of the schema."""
    if parameters is None and reading.placeholders:
        parameters = (None,) * reading.placeholders
    real = connection.connection.dbapi_connection
    assert real is not None
    cursor = real.cursor()
    try:
        before = _sqlite_details(cursor, statement, parameters)
    finally:
        cursor.close()
    out: list[Proof] = []
    copy = _schema_copy(connection)
    try:
        for trial in trials:
            scanned, indexed = _sqlite_scans(before, trial.use)
            if indexed or not scanned:
                notes.append(f"{trial.use.name}: the plan already uses an index")
                continue
            for candidate in trial.candidates:
                name = names[candidate]
                cols = ", ".join(f'"{c}"' for c in candidate.columns)
                copy.execute(f'CREATE INDEX "{name}" ON "{trial.use.name}" ({cols})')
                try:
                    after = _copy_details(copy, statement, parameters)
                finally:
                    copy.execute(f'DROP INDEX "{name}"')
                if any(d.startswith("SEARCH") and f"INDEX {name}" in d for d in after):
                    out.append(Proof(trial, candidate, "plan", True))
                    break
            else:
                notes.append(f"{trial.use.name}: no candidate turns the SCAN into a SEARCH")
    finally:
        copy.close()
    return out


# -- MySQL / MariaDB ----------------------------------------------------------------


def prove_mysql(
    connection: Connection,
    statement: str,
    parameters: Any,
    trials: list[Trial],
    *,
    notes: list[str],
) -> list[Proof]:
    """``type=ALL`` with no key in EXPLAIN: the first candidate, unproven."""
    rows = run(connection, "EXPLAIN " + statement, parameters)
    out: list[Proof] = []
    for trial in trials:
        names = _names_of(trial.use)
        mine = [r for r in rows if r.get("table") in names]
        if not mine:
            notes.append(f"{trial.use.name}: not in the plan")
            continue
        if any(r.get("key") for r in mine) or not any(r.get("type") == "ALL" for r in mine):
            notes.append(f"{trial.use.name}: the plan already uses an index")
            continue
        out.append(Proof(trial, trial.candidates[0], "plan", False))
    return out
