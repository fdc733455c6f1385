"""What the advisor knows of the schema: columns, existing indexes, sizes, ORM mappings.

`SchemaCache` reads tables with SQLAlchemy's inspector on the advisor's own connection
and keeps what it read per ``(schema, table)`` for `SchemaCache.ttl` seconds, at most
`SchemaCache.size` tables (least recently used first out), so an index created after a
suggestion is seen again within minutes and memory stays bounded.

The rendering helpers turn a chosen index into the three things a user can paste: the
DDL, the Alembic operation and the change to the mapped class. Mapped classes are found
through SQLAlchemy's registries (every ``DeclarativeBase`` / ``registry()`` the process
has created): nothing of the application is imported.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import inspect, text, types
from sqlalchemy.engine import Connection, Dialect

__all__ = [
    "SchemaCache",
    "TableInfo",
    "index_name",
    "mapped_names",
    "render_alembic",
    "render_ddl",
    "render_model",
]

_SAMPLE_ROWS = 10_000


@dataclass
class TableInfo:
    """One table as the advisor sees it."""

    schema: str | None
    name: str
    columns: dict[str, Any]
    """Column name to its SQLAlchemy type."""
    indexes: list[tuple[str, ...]]
    """Column lists of the primary key, unique constraints and indexes."""
    rows: float | None = None
    distinct: dict[str, float | None] = field(default_factory=dict)
    collations: dict[str, str | None] = field(default_factory=dict)
    implicit: frozenset[str] = frozenset()
    """The primary key columns (secondary indexes of SQLite and InnoDB end with them)."""

    def covered(self, columns: tuple[str, ...]) -> bool:
        """Whether an existing index starts with exactly these columns."""
        n = len(columns)
        return any(tuple(ix[:n]) == columns for ix in self.indexes if len(ix) >= n)


class SchemaCache:
    """Bounded, expiring per-table cache of what the inspector and statistics say."""

    def __init__(self, *, size: int = 256, ttl: float = 300.0) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        if ttl < 0:
            raise ValueError("ttl must not be negative")
        self.size = size
        self.ttl = ttl
        self._tables: OrderedDict[tuple[str | None, str], tuple[float, TableInfo | None]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self.clock: Callable[[], float] = time.monotonic

    def table(self, connection: Connection, schema: str | None, name: str) -> TableInfo | None:
        """The table, read (or re-read after ``ttl``) with the inspector; None if absent."""
        key = (schema, name)
        now = self.clock()
        with self._lock:
            hit = self._tables.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                self._tables.move_to_end(key)
                return hit[1]
        info = _read_table(connection, schema, name)
        with self._lock:
            self._tables[key] = (now, info)
            self._tables.move_to_end(key)
            while len(self._tables) > self.size:
                self._tables.popitem(last=False)
        return info

    def has_column(
        self, connection: Connection, schema: str | None, name: str, column: str
    ) -> bool:
        info = self.table(connection, schema, name)
        return info is not None and column in info.columns


def _read_table(connection: Connection, schema: str | None, name: str) -> TableInfo | None:
    inspector = inspect(connection)
    if not inspector.has_table(name, schema=schema):
        return None
    columns = {c["name"]: c["type"] for c in inspector.get_columns(name, schema=schema)}
    indexes: list[tuple[str, ...]] = []
    pk = inspector.get_pk_constraint(name, schema=schema).get("constrained_columns") or []
    if pk:
        indexes.append(tuple(pk))
    for unique in inspector.get_unique_constraints(name, schema=schema):
        indexes.append(tuple(c for c in unique["column_names"] if c is not None))
    for index in inspector.get_indexes(name, schema=schema):
        cols = index.get("column_names") or []
        # An expression or partial index serves other statements; only plain ones cover.
        partial = index.get("dialect_options", {}).get("postgresql_where")
        if cols and all(c is not None for c in cols) and not partial:
            indexes.append(tuple(c for c in cols if c is not None))
    return TableInfo(schema, name, columns, indexes, implicit=frozenset(pk))


def is_boolean(info: TableInfo, column: str) -> bool:
    """Whether the column's type is a boolean (MySQL's ``TINYINT(1)`` included)."""
    kind = info.columns.get(column)
    if isinstance(kind, types.Boolean):
        return True
    return type(kind).__name__ == "TINYINT" and getattr(kind, "display_width", None) == 1


def quote_table(dialect: Dialect, schema: str | None, name: str) -> str:
    prep = dialect.identifier_preparer
    return f"{prep.quote_schema(schema)}.{prep.quote(name)}" if schema else prep.quote(name)


def sample_distinct(
    connection: Connection, dialect: Dialect, info: TableInfo, column: str
) -> float | None:
    """Distinct values of ``column`` among the first rows read (at most 10 000)."""
    prep = dialect.identifier_preparer
    col = prep.quote(column)
    table = quote_table(dialect, info.schema, info.name)
    sql = f"SELECT COUNT(DISTINCT {col}) FROM (SELECT {col} FROM {table} LIMIT {_SAMPLE_ROWS}) s"
    value = connection.exec_driver_sql(sql).scalar()
    return float(value) if value is not None else None


def index_name(table: str, columns: Iterable[str], max_length: int = 63) -> str:
    """``ix_<table>_<columns>``, shortened with a hash suffix beyond ``max_length``."""
    name = "_".join(["ix", table, *columns])
    if len(name) <= max_length:
        return name
    digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
    return f"{name[: max_length - 9]}_{digest}"


def render_ddl(
    dialect: Dialect,
    name: str,
    schema: str | None,
    table: str,
    columns: tuple[str, ...],
    ops: dict[str, str],
) -> str:
    """The CREATE INDEX statement; CONCURRENTLY on PostgreSQL (no write lock)."""
    prep = dialect.identifier_preparer
    cols = ", ".join(prep.quote(c) + (f" {ops[c]}" if c in ops else "") for c in columns)
    concurrently = "CONCURRENTLY " if dialect.name == "postgresql" else ""
    target = quote_table(dialect, schema, table)
    return f"CREATE INDEX {concurrently}{prep.quote(name)} ON {target} ({cols})"


def render_alembic(
    dialect_name: str,
    name: str,
    schema: str | None,
    table: str,
    columns: tuple[str, ...],
    ops: dict[str, str],
) -> str:
    """The Alembic operation for a migration."""
    args = [_py(name), _py(table), "[" + ", ".join(_py(c) for c in columns) + "]"]
    if schema:
        args.append(f"schema={_py(schema)}")
    if ops:
        args.append(f"postgresql_ops={_py_ops(ops)}")
    if dialect_name == "postgresql":
        args.append("postgresql_concurrently=True")
    return f"op.create_index({', '.join(args)})"


def _py(value: str) -> str:
    """A Python string literal in double quotes (the style of Alembic's templates)."""
    return json.dumps(value)


def _py_ops(ops: dict[str, str]) -> str:
    return "{" + ", ".join(f"{_py(c)}: {_py(o)}" for c, o in ops.items()) + "}"


def _registries() -> list[Any]:
    from sqlalchemy.orm import mapperlib

    every = getattr(mapperlib, "_all_registries", None)
    if every is not None:
        return list(every())
    return list(getattr(mapperlib, "_mapper_registries", ()))


def mapped_names(
    schema: str | None,
    table: str,
    columns: tuple[str, ...],
    *,
    default_schema: str | None,
    registries: Iterable[Any] | None = None,
) -> tuple[str, list[str]] | None:
    """``(class name, [attribute names])`` of the mapper of ``table``, if one maps it.

    The base mapper of an inheritance hierarchy wins (the class that owns the table).
    """
    wanted = schema if schema and schema != default_schema else None
    for reg in _registries() if registries is None else registries:
        for mapper in list(reg.mappers):
            local = mapper.local_table
            if getattr(local, "name", None) != table:
                continue
            local_schema = getattr(local, "schema", None)
            if (local_schema if local_schema != default_schema else None) != wanted:
                continue
            if mapper.inherits is not None and mapper.inherits.local_table is local:
                continue
            attributes: list[str] = []
            for column in columns:
                found = [c for c in local.columns if c.name == column]
                if not found:
                    return None
                try:
                    attributes.append(mapper.get_property_by_column(found[0]).key)
                except Exception:
                    return None
            return mapper.class_.__name__, attributes
    return None


def render_model(
    cls: str, attributes: list[str], name: str, ops: dict[str, str], columns: tuple[str, ...]
) -> tuple[str, str]:
    """``(model, change)``: ``Order.user_id`` and how to declare the index on the class."""
    refs = [f"{cls}.{a}" for a in attributes]
    if len(refs) == 1 and not ops:
        return refs[0], "mapped_column(..., index=True)"
    extra = f", postgresql_ops={_py_ops(ops)}" if ops else ""
    return ", ".join(refs), f"Index({_py(name)}, {', '.join(refs)}{extra})"


def read_rows_estimate(connection: Connection, dialect: Dialect, info: TableInfo) -> float | None:
    """The planner's row count (PostgreSQL, MySQL) or a bounded count (SQLite)."""
    if dialect.name == "postgresql":
        value = connection.execute(
            text(
                "SELECT CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples END"
                " FROM pg_class c WHERE c.oid = to_regclass(:t)"
            ),
            {"t": quote_table(dialect, info.schema, info.name)},
        ).scalar()
        if value is not None:
            return float(value)
    elif dialect.name in ("mysql", "mariadb"):
        value = connection.execute(
            text(
                "SELECT table_rows FROM information_schema.tables"
                " WHERE table_schema = COALESCE(:s, DATABASE()) AND table_name = :t"
            ),
            {"s": info.schema, "t": info.name},
        ).scalar()
        if value is not None and float(value) > 0:
            return float(value)
    table = quote_table(dialect, info.schema, info.name)
    limit = 1_000_000
    value = connection.exec_driver_sql(
        f"SELECT COUNT(*) FROM (SELECT 1 FROM {table} LIMIT {limit}) s"
    ).scalar()
    return float(value) if value is not None else None
