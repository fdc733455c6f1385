"""What a statement asks of each table: the columns an index could serve.

The statement is read with sqlglot in the database's dialect (no regular expressions
over SQL). Driver placeholders are first renamed, token by token with sqlglot's own
tokenizer, to named ones (``:sqlprobe_p1``...), so every paramstyle parses in every
dialect and each placeholder can be matched to its value: qmark ``?``, format ``%s``,
pyformat ``%(name)s``, numeric ``$1`` and named ``:name``.

Per table of each SELECT scope (subqueries and CTE bodies are scopes of their own) the
reader collects, from the top-level ``AND`` terms of ``WHERE`` and of ``JOIN ... ON``:

- equality columns: ``col = value`` and ``col IN (values)`` where the value does not
  reference a column of the same scope;
- range columns: ``<``, ``<=``, ``>``, ``>=``, ``BETWEEN``;
- prefix columns: ``col LIKE 'abc%'`` whose pattern (a literal, or the bound value of a
  placeholder) starts with at least one ordinary character; a leading wildcard, an
  unknown pattern and ``ILIKE`` give nothing;
- join keys: ``a.x = b.y`` between two tables of the scope (each side is a key of its
  table);
- ORDER BY columns, when every ORDER BY term is a plain column of the same table.

Terms under ``OR`` or ``NOT``, columns wrapped in functions or casts (``lower(email)``:
that would need an expression index) and ``IS NULL`` tests are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlglot
from sqlglot import TokenType, exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.optimizer.scope import Scope, traverse_scope

__all__ = ["Candidate", "Reading", "TableUse", "candidates", "read_statement", "sqlglot_dialect"]

_DIALECTS = {"postgresql": "postgres", "sqlite": "sqlite", "mysql": "mysql", "mariadb": "mysql"}
_MARK = "sqlprobe_p"
#: Longer statements are not parsed (parsing cost grows with length).
MAX_STATEMENT = 20_000
_RANGE = (exp.GT, exp.GTE, exp.LT, exp.LTE)


def sqlglot_dialect(dialect_name: str) -> str | None:
    """The sqlglot dialect for a SQLAlchemy dialect name, None when unsupported."""
    return _DIALECTS.get(dialect_name)


@dataclass
class TableUse:
    """The columns one table is filtered, joined and ordered on, in order of appearance."""

    schema: str | None
    name: str
    aliases: set[str] = field(default_factory=set)
    eq: list[str] = field(default_factory=list)
    range: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)
    join: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    def add(self, kind: str, column: str) -> None:
        seen: list[str] = getattr(self, kind)
        if column not in seen:
            seen.append(column)


@dataclass(frozen=True)
class Candidate:
    """One index to try: its columns, in order, and PostgreSQL operator classes by column."""

    columns: tuple[str, ...]
    ops: tuple[tuple[str, str], ...] = ()
    kind: str = "eq"


@dataclass
class Reading:
    """A statement read for advice: its tables, placeholder count, and why not if empty."""

    tables: list[TableUse]
    placeholders: int
    numbered: str
    """The statement with its placeholders as ``$1``... (PostgreSQL generic plans)."""
    reason: str | None = None


def _rename_placeholders(text: str, dialect: str) -> tuple[str, str, list[str | int]]:
    """``text`` with every placeholder named (for parsing) and numbered (for PREPARE).

    Returns the named text, the ``$n`` text and, per placeholder in order, its key in the
    parameters: an int for positional styles, the name for named ones.
    """
    tokens = Dialect.get_or_raise(dialect).tokenize(text)
    named: list[str] = []
    numbered: list[str] = []
    keys: list[str | int] = []
    pos = 0
    i = 0
    positional = 0

    def emit(start: int, end: int, key: str | int) -> None:
        nonlocal pos
        named.append(text[pos:start])
        numbered.append(text[pos:start])
        mark = len(keys) + 1
        named.append(f":{_MARK}{mark}")
        numbered.append(f"${mark}")
        keys.append(key)
        pos = end + 1

    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.token_type == TokenType.PLACEHOLDER and tok.text == "?":
            emit(tok.start, tok.end, positional)
            positional += 1
        elif tok.text == "?::":  # ``?::INTEGER``: sqlglot reads ``?::`` as one operator
            emit(tok.start, tok.start, positional)
            positional += 1
        elif (
            tok.token_type == TokenType.MOD
            and nxt is not None
            and nxt.start == tok.end + 1
            and nxt.token_type == TokenType.VAR
            and nxt.text == "s"
        ):
            emit(tok.start, nxt.end, positional)
            positional += 1
            i += 1
        elif (
            tok.token_type == TokenType.MOD
            and i + 4 < len(tokens)
            and tokens[i + 1].token_type == TokenType.L_PAREN
            and tokens[i + 1].start == tok.end + 1
            and tokens[i + 3].token_type == TokenType.R_PAREN
            and tokens[i + 4].text == "s"
            and tokens[i + 4].start == tokens[i + 3].end + 1
        ):
            emit(tok.start, tokens[i + 4].end, tokens[i + 2].text)
            i += 4
        elif tok.token_type == TokenType.PARAMETER and nxt is not None and nxt.text.isdigit():
            emit(tok.start, nxt.end, int(nxt.text) - 1)
            i += 1
        elif tok.token_type == TokenType.COLON and nxt is not None and nxt.start == tok.end + 1:
            prev = tokens[i - 1] if i else None
            if nxt.text.isdigit():
                emit(tok.start, nxt.end, int(nxt.text) - 1)
                i += 1
            elif (
                nxt.token_type == TokenType.VAR
                and not (prev is not None and prev.token_type == TokenType.COLON)
                and nxt.text != _MARK
            ):
                emit(tok.start, nxt.end, nxt.text)
                i += 1
        i += 1
    named.append(text[pos:])
    numbered.append(text[pos:])
    return "".join(named), "".join(numbered), keys


def _value(
    node: Any, keys: Sequence[str | int], parameters: Any, pyformat: bool
) -> tuple[bool, Any]:
    """(known, value) of a literal or a bound placeholder (under casts: ``%(p)s::VARCHAR``)."""
    while isinstance(node, (exp.Cast, exp.Paren)):
        node = node.this
    if isinstance(node, exp.Literal):
        value = node.this
        if node.is_string and pyformat:
            value = value.replace("%%", "%")
        return True, value
    if isinstance(node, exp.Placeholder) and isinstance(node.this, str):
        name = node.this
        if not name.startswith(_MARK) or parameters is None:
            return False, None
        try:
            key = keys[int(name[len(_MARK) :]) - 1]
            if isinstance(key, int):
                if isinstance(parameters, Mapping):
                    return False, None
                return True, parameters[key]
            if isinstance(parameters, Mapping):
                return key in parameters, parameters.get(key)
        except (ValueError, IndexError, KeyError, TypeError):
            pass
    return False, None


def _is_prefix(pattern: Any, escape: str | None) -> bool:
    """A LIKE pattern that starts with at least one ordinary character."""
    if not isinstance(pattern, str) or not pattern:
        return False
    if escape and pattern.startswith(escape):
        return len(pattern) > 1
    return pattern[0] not in "%_"


def _conjuncts(node: Any) -> list[Any]:
    if node is None:
        return []
    node = node.unnest()
    if isinstance(node, exp.And):
        return [*_conjuncts(node.left), *_conjuncts(node.right)]
    return [node]


def _plain_column(node: Any) -> exp.Column | None:
    if node is None:
        return None
    node = node.unnest()
    return node if isinstance(node, exp.Column) and not isinstance(node.this, exp.Star) else None


def _references_columns(node: Any) -> bool:
    return any(True for _ in node.find_all(exp.Column))


class _ScopeReader:
    def __init__(
        self,
        scope: Scope,
        tables: dict[tuple[str | None, str], TableUse],
        resolve: Callable[[str | None, str, str], bool],
        keys: Sequence[str | int],
        parameters: Any,
        pyformat: bool,
    ) -> None:
        self.sources: dict[str, TableUse] = {}
        self.resolve = resolve
        self.keys = keys
        self.parameters = parameters
        self.pyformat = pyformat
        for alias, source in scope.sources.items():
            if isinstance(source, exp.Table) and source.name:
                key = (source.db or None, source.name)
                use = tables.setdefault(key, TableUse(schema=key[0], name=key[1]))
                use.aliases.add(alias)
                self.sources[alias] = use

    def table_of(self, column: exp.Column) -> TableUse | None:
        if column.table:
            return self.sources.get(column.table)
        if len(self.sources) == 1:
            return next(iter(self.sources.values()))
        owners = [u for u in self.sources.values() if self.resolve(u.schema, u.name, column.name)]
        return owners[0] if len(owners) == 1 else None

    def term(self, node: Any) -> None:
        if isinstance(node, (exp.EQ, *_RANGE)):
            left, right = node.left, node.right
            lcol, rcol = _plain_column(left), _plain_column(right)
            kind = "eq" if isinstance(node, exp.EQ) else "range"
            if lcol is not None and rcol is not None:
                ltab, rtab = self.table_of(lcol), self.table_of(rcol)
                if kind == "eq" and ltab is not None and rtab is not None and ltab is not rtab:
                    ltab.add("join", lcol.name)
                    rtab.add("join", rcol.name)
                return
            column, other = (lcol, right) if lcol is not None else (rcol, left)
            if column is None or _references_columns(other):
                return
            use = self.table_of(column)
            if use is not None:
                use.add(kind, column.name)
        elif isinstance(node, exp.In):
            column = _plain_column(node.this)
            if column is None or node.args.get("query") is not None:
                return
            if any(_references_columns(e) for e in node.expressions):
                return
            use = self.table_of(column)
            if use is not None:
                use.add("eq", column.name)
        elif isinstance(node, exp.Between):
            column = _plain_column(node.this)
            use = self.table_of(column) if column is not None else None
            if use is not None and column is not None:
                use.add("range", column.name)
        elif isinstance(node, (exp.Like, exp.Escape)):
            escape: str | None = None
            if isinstance(node, exp.Escape):
                known, esc = _value(node.expression, self.keys, self.parameters, self.pyformat)
                escape = esc if known and isinstance(esc, str) else None
                node = node.this
                if not isinstance(node, exp.Like):
                    return
            column = _plain_column(node.this)
            if column is None:
                return
            known, pattern = _value(node.expression, self.keys, self.parameters, self.pyformat)
            if known and _is_prefix(pattern, escape):
                use = self.table_of(column)
                if use is not None:
                    use.add("prefix", column.name)

    def order(self, order: Any) -> None:
        if order is None:
            return
        columns = [_plain_column(o.this) for o in order.expressions]
        if not columns or any(c is None for c in columns):
            return
        owners = {id(self.table_of(c)) for c in columns if c is not None}
        use = self.table_of(columns[0]) if columns[0] is not None else None
        if use is None or len(owners) != 1:
            return
        for column in columns:
            if column is not None:
                use.add("order", column.name)


def read_statement(
    statement: str,
    parameters: Any,
    dialect_name: str,
    *,
    paramstyle: str | None = None,
    resolve: Callable[[str | None, str, str], bool] | None = None,
) -> Reading:
    """The tables of ``statement`` and the columns each is filtered, joined, ordered on.

    ``resolve(schema, table, column)`` answers whether a table has a column; it places an
    unqualified column when a scope has several tables.
    """
    dialect = sqlglot_dialect(dialect_name)
    if len(statement) > MAX_STATEMENT:
        return Reading([], 0, statement, f"longer than {MAX_STATEMENT} characters")
    if dialect is None:
        return Reading([], 0, statement, f"index advice is not supported on {dialect_name}")
    try:
        named, numbered, keys = _rename_placeholders(statement, dialect)
        trees = [t for t in sqlglot.parse(named, read=dialect) if t is not None]
    except (sqlglot.errors.SqlglotError, RecursionError, ValueError):
        return Reading([], 0, statement, "the statement could not be parsed")
    if len(trees) != 1:
        return Reading([], len(keys), numbered, "not one statement")
    tree = trees[0]
    if not isinstance(tree, (exp.Select, exp.Union, exp.With)) and not (
        isinstance(tree, exp.Query)
    ):
        return Reading([], len(keys), numbered, f"not a SELECT ({type(tree).__name__.upper()})")
    if tree.find(exp.Lock) is not None or tree.find(exp.Into) is not None:
        return Reading([], len(keys), numbered, "locking or SELECT INTO statement")
    pyformat = paramstyle in ("format", "pyformat") and parameters is not None
    tables: dict[tuple[str | None, str], TableUse] = {}
    try:
        scopes = traverse_scope(tree)
    except (sqlglot.errors.SqlglotError, RecursionError):
        return Reading([], len(keys), numbered, "the statement could not be parsed")
    for scope in scopes:
        reader = _ScopeReader(
            scope, tables, resolve or (lambda s, t, c: False), keys, parameters, pyformat
        )
        select = scope.expression
        if not isinstance(select, exp.Select):
            continue
        where = select.args.get("where")
        for term in _conjuncts(where.this if where is not None else None):
            reader.term(term)
        for join in select.args.get("joins") or ():
            for term in _conjuncts(join.args.get("on")):
                reader.term(term)
        reader.order(select.args.get("order"))
    return Reading(list(tables.values()), len(keys), numbered)


def candidates(
    use: TableUse,
    *,
    selective: Callable[[str], bool],
    covered: Callable[[tuple[str, ...]], bool],
    pattern_ops: Callable[[str], str | None],
    limit: int,
    implicit: frozenset[str] = frozenset(),
) -> list[Candidate]:
    """Indexes worth trying for one table, most specific first, at most ``limit``.

    Equality columns come first (the selective ones: ``selective(column)`` drops booleans
    and columns with a handful of values), then one range, prefix or ORDER BY column: the
    order a B-tree serves them in. Single-column candidates follow for each equality
    column, the first range or prefix column, each join key, and the ORDER BY column of a
    statement without filters on the table. A candidate whose columns are the leading
    columns of an existing index (``covered``) is never tried. ``implicit`` names
    columns every secondary index already ends with (the primary key of a SQLite rowid
    table or of an InnoDB table): they are never appended.
    """
    eq = [c for c in use.eq if selective(c)]
    tail: tuple[str, str] | None = None
    for kind in ("range", "prefix"):
        for column in getattr(use, kind):
            if column not in eq and column not in implicit and selective(column):
                tail = (kind, column)
                break
        if tail is not None:
            break
    if tail is None and use.order and use.order[0] not in eq and use.order[0] not in implicit:
        tail = ("order", use.order[0])
    out: list[Candidate] = []

    def add(columns: tuple[str, ...], kind: str) -> None:
        ops = tuple((c, op) for c in columns if c in use.prefix and (op := pattern_ops(c)))
        candidate = Candidate(columns, ops, kind)
        if columns and candidate not in out and not covered(columns):
            out.append(candidate)

    if len(eq) >= 2:
        add(tuple(eq[:3]) + ((tail[1],) if tail else ()), "composite")
    if eq and tail is not None:
        add((eq[0], tail[1]), "composite")
    for column in eq:
        add((column,), "eq")
    if tail is not None and (tail[0] != "order" or not (use.eq or use.range or use.prefix)):
        add((tail[1],), tail[0])
    for column in use.join:
        if selective(column):
            add((column,), "join")
    return out[:limit]
