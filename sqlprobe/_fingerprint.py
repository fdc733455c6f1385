"""Statement fingerprints: normalize SQL text, hash its shape, name its operation and table.

`analyze()` turns a statement into a `Shape`. Statements that differ only in literal
values, parameter values, the length of an ``IN`` list or the number of ``VALUES`` rows
share one normalized text and therefore one fingerprint; statements that differ in
shape (columns, tables, operators, clause order) do not.

Normalization rules, applied in one left-to-right pass plus a few collapsing passes:

- String literals become ``?``: ``'...'`` (``''`` and backslash escapes both honoured,
  so MySQL's ``'it\\'s'`` is one literal), with their prefixes ``E'...'``, ``N'...'``,
  ``X'...'``, ``B'...'``, ``U&'...'`` and MySQL charset introducers (``_utf8mb4'...'``);
  dollar-quoted strings (``$$...$$``, ``$tag$...$tag$``) too. Because backslashes
  escape, a standard-SQL literal that *ends* in a backslash (``'C:\\'``) swallows what
  follows it; the statement still normalizes, to a coarser shape.
- Numeric literals (``42``, ``3.14``, ``1e-3``, ``0x1F``) become ``?`` (``.5`` becomes
  ``.?``, and a sign stays an operator: ``-?``); digits that are part of a name (``t1``,
  ``col_2``, ``sa_savepoint_1``) are kept.
- Every paramstyle becomes ``?``: qmark ``?``, ``%s``, ``%(name)s`` (psycopg's ``%b``/``%t``
  too; ``%%`` is kept), ``:name`` and ``:1`` (the ``::type`` cast is kept), and ``$1``.
  SQLite's rare ``?NNN`` becomes ``??``.
- ``IN (?, ?, ...)`` (elements may carry a cast, as psycopg and asyncpg statements do:
  ``IN (?::INTEGER, ...)``), ``IN ((?, ?), (?, ?), ...)`` and ``ARRAY[?, ?, ...]``
  collapse to their first element; ``VALUES (...), (...), ...`` collapses to its first row
  when the rows are alike (SQLAlchemy's insertmanyvalues batches, including PostgreSQL's
  sentinel form ``FROM (VALUES (...), ...) AS imp_sen(...)``, whose counters are
  literals).
- Comments (``-- ...`` and ``/* ... */``, sqlcommenter's ``/*traceparent='...'*/``
  included) are removed. Optimizer hints and MySQL executable comments (``/*+ ...*/``,
  ``/*! ...*/``) change what runs, so they are kept and normalized like code. MySQL's
  ``#`` comments are not recognised: ``#`` is an operator in PostgreSQL.
- Whitespace runs become one space; the result is stripped, and trailing ``;`` dropped.
- Savepoint names become ``?`` (``SAVEPOINT ?``, ``RELEASE SAVEPOINT ?``,
  ``ROLLBACK TO SAVEPOINT ?``).

Deliberately *not* normalized: keyword and identifier case (kept as written: SQLAlchemy
emits one spelling per construct, and folding case needs a keyword list per dialect),
and quoted identifiers (``"col"``, ```col```, ``[col]``) which are names, not literals.
MySQL in its default mode reads ``"..."`` as a string; we read it as an identifier and
accept that such a string keeps its value in the normalized text.

`operation` is the statement's verb, mapped into `OPERATIONS`: ``WITH ...`` takes the
verb of the main statement after its CTEs; ``START TRANSACTION`` is BEGIN; ``END`` is
COMMIT; ``ABORT`` and ``ROLLBACK TO SAVEPOINT`` are ROLLBACK; ``REPLACE`` and ``UPSERT``
are INSERT; ``DESCRIBE``/``DESC`` are SHOW; ``RESET`` is SET; ``EXEC``/``EXECUTE`` are CALL;
anything else is OTHER.

`table` is the main table with quotes stripped and schema qualification kept
(``public.users``), or ``""``: the INSERT/REPLACE/MERGE target, the UPDATE target, the
DELETE FROM target, the CREATE/ALTER/DROP TABLE (or INDEX ... ON) target, the TRUNCATE
target, and for SELECT the table of the shallowest FROM that names one (so
``SELECT ... FROM (SELECT ... FROM users) AS anon_1`` gives ``users``).

The tokenizer is hand-written on purpose: no maintained library normalizes every
dialect's SQL at this speed (sqlparse, the obvious candidate, is roughly 100x slower
and its cost is not bounded on hostile input). Every regex below is linear: possessive
quantifiers, no nested unbounded repetition, and each unterminated construct (string,
comment, quoted name) consumes the rest of the text instead of being retried.
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

__all__ = ["OPERATIONS", "Shape", "analyze", "normalize"]

OPERATIONS: frozenset[str] = frozenset(
    {
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "CREATE",
        "ALTER",
        "DROP",
        "TRUNCATE",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT",
        "RELEASE",
        "SET",
        "SHOW",
        "EXPLAIN",
        "CALL",
        "PRAGMA",
        "OTHER",
    }
)


class Shape(NamedTuple):
    """What a statement is, without its values."""

    fingerprint: str
    """16 lowercase hex characters: blake2b (8 bytes) of `normalized`, stable everywhere."""
    normalized: str
    """The normalized statement text, full length."""
    operation: str
    """One of `OPERATIONS`."""
    table: str
    """The main table as written, quotes stripped, ``schema.table`` kept; ``""`` if none."""


# Every branch starts with a literal character or a small class so `re` skips the
# characters that cannot start one; lookbehinds sit after that first character for the
# same reason. Names, keywords, punctuation and whitespace never match, so the Python
# loop in `_tokenize` runs once per literal, parameter, comment or quoted name.
_LEXEMES = r"""
    --[^\n]*+
    |/\*(?![+!])(?:[^*]++|\*(?!/))*+(?:\*/|\Z)
    |'(?:[^'\\]++|''|\\.?)*+'?
    |"[^"]*+(?:""[^"]*+)*+"?
    |`[^`]*+(?:``[^`]*+)*+`?
    |\[(?<![\w$\])]\[)(?![0-9?$:%'+\-.\s\]])[^\[\]]*+\]
    |\$(?<![\w$]\$)(?:[0-9]++|(?P<tag>(?:[^\W\d]\w*+)?)\$(?:(?!\$(?P=tag)\$).)*+(?:\$(?P=tag)\$)?)
    |%(?:\([^()%\s]*+\)[sbt]|[sbt%])
    |:(?<![\w:]:)(?:[^\W\d]\w*+|[0-9]++)
    |0[xX](?<![\w$]0[xX])[0-9a-fA-F]++(?![\w$])
"""
_NUMBER = r"[0-9](?<![\w$][0-9])[0-9]*+(?:\.[0-9]*+)?(?:[eE][-+]?[0-9]++)?(?![\w$])"
_TOKEN = re.compile(_LEXEMES, re.VERBOSE | re.DOTALL)
_NUMBERS = re.compile(_NUMBER)
# The careful variant, for statements whose quoted names hold digits or whitespace that
# the fast path's later passes would rewrite: numbers and whitespace are lexemes here.
_TOKEN_ALL = re.compile(
    _LEXEMES + r"|(?P<ws>\s++)|(?P<number>" + _NUMBER + ")", re.VERBOSE | re.DOTALL
)
_NEEDS_CARE = re.compile(r"[\s0-9]")

# A string literal's prefix, looked for just before its opening quote.
_STRING_PREFIX = re.compile(r"(?<![\w$])(?:[eEnNbBxX]|[uU]&|_[A-Za-z0-9]++)\Z")
_PREFIX_LAST = frozenset("&0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

_IN = r"\((?:(?<=\b[iI][nN] \()|(?<=\b[iI][nN]\())"
# An element of an IN list or ARRAY literal: a placeholder, maybe signed, maybe cast.
_ELEMENT = r"[-+]?\?(?:::[A-Za-z_]\w*+(?:\[\])?)?"
_IN_LIST = re.compile(_IN + rf" ?({_ELEMENT})(?: ?, ?{_ELEMENT})*+ ?\)")
_IN_TUPLES = re.compile(_IN + r" ?(\([^()]*+\))(?: ?, ?\1)*+ ?\)")
_ARRAY = re.compile(
    r"\[(?:(?<=\b[aA][rR][rR][aA][yY]\[)|(?<=\b[aA][rR][rR][aA][yY] \[))"
    rf" ?({_ELEMENT})(?: ?, ?{_ELEMENT})*+ ?\]"
)
_VALUES = re.compile(
    r"\((?:(?<=\b[vV][aA][lL][uU][eE][sS] \()|(?<=\b[vV][aA][lL][uU][eE][sS]\())"
    r"((?:[^()]++|\([^()]*+\))*+\))(?: ?, ?\(\1)++"
)

_NAME_PART = r"""(?:"[^"]*+(?:""[^"]*+)*+"|`[^`]*+(?:``[^`]*+)*+`|\[[^\[\]]*+\]|[^\W\d][\w$]*+)"""
_NAME_PARTS = re.compile(_NAME_PART)
_NAME = rf"(?P<name>{_NAME_PART}(?: ?\. ?{_NAME_PART}){{0,2}})"

_SAVEPOINT_NAME = re.compile(
    rf"^(\(* ?(?:savepoint|release(?: savepoint)?|rollback(?: work| transaction)? to"
    rf"(?: savepoint)?) ){_NAME_PART}",
    re.IGNORECASE,
)

_FIRST_WORD = re.compile(r"[\s(]*+([A-Za-z_]\w*+)")
_MAIN_VERB = re.compile(
    r"(?:select|insert|update|delete|values)(?<![\w$]\w{6})(?![\w$])"
    r"|merge(?<![\w$]merge)(?![\w$])",
    re.IGNORECASE,
)
_FROM = re.compile(
    r"[fF][rR][oO][mM](?<![\w$][fF][rR][oO][mM]) ?(?:[oO][nN][lL][yY] )?(?:(\()|" + _NAME + ")"
)
_VERBS: dict[str, str] = {op: op for op in OPERATIONS if op != "OTHER"}
_VERBS.update(
    {
        "START": "BEGIN",
        "END": "COMMIT",
        "ABORT": "ROLLBACK",
        "REPLACE": "INSERT",
        "UPSERT": "INSERT",
        "DESCRIBE": "SHOW",
        "DESC": "SHOW",
        "RESET": "SET",
        "EXEC": "CALL",
        "EXECUTE": "CALL",
        "VALUES": "SELECT",
        "TABLE": "SELECT",
    }
)

_TARGETS: dict[str, re.Pattern[str]] = {
    "INSERT": re.compile(
        r"(?:insert|replace|upsert) (?:(?:low_priority|delayed|high_priority|ignore|or \w+) )*"
        r"(?:into )?" + _NAME,
        re.IGNORECASE,
    ),
    "UPDATE": re.compile(
        r"update (?:(?:only|low_priority|ignore|or \w+) )*" + _NAME, re.IGNORECASE
    ),
    "DELETE": re.compile(
        r"delete (?:(?:low_priority|quick|ignore) )*from (?:only )?" + _NAME, re.IGNORECASE
    ),
    "MERGE": re.compile(r"merge (?:into )?" + _NAME, re.IGNORECASE),
    "TRUNCATE": re.compile(r"truncate (?:table )?(?:only )?" + _NAME, re.IGNORECASE),
    "DDL": re.compile(
        r"(?:create|alter|drop) (?:or replace )?(?:(?:global|local) )?"
        r"(?:(?:temp|temporary|unlogged) )?(?:table\b|(?:unique )?index\b.*? on (?:only )?)"
        r" ?(?:if (?:not )?exists )?" + _NAME,
        re.IGNORECASE,
    ),
}
_DDL = frozenset({"CREATE", "ALTER", "DROP"})

# Bound on the candidates looked at to find a WITH statement's verb or a SELECT's table:
# past it the answer is "OTHER" or "" rather than time spent on a hostile statement.
_MAX_CANDIDATES = 10_000


def _tokenize(text: str) -> str:
    """Replace literals and parameters by ``?``, comments by a space; collapse whitespace."""
    parts: list[str] = []
    append = parts.append
    pos = 0
    for m in _TOKEN.finditer(text):
        token = m.group()
        first = token[0]
        if first in '"`[':
            if _NEEDS_CARE.search(token) is not None:
                return _tokenize_carefully(text)
            continue
        if token == "%%":
            continue
        start = m.start()
        if start > pos:
            append(text[pos:start])
        pos = m.end()
        if first == "'":
            _drop_string_prefix(parts, text, start)
            append("?")
        elif first == "-" or first == "/":
            append(" ")
        else:
            append("?")
    if parts:
        append(text[pos:])
        text = "".join(parts)
    return " ".join(_NUMBERS.sub("?", text).split())


def _tokenize_carefully(text: str) -> str:
    """`_tokenize` for statements with quoted names the fast path would rewrite."""
    parts: list[str] = []
    append = parts.append
    pos = 0
    for m in _TOKEN_ALL.finditer(text):
        token = m.group()
        first = token[0]
        if first in '"`[' or token == "%%":
            continue
        start = m.start()
        if start > pos:
            append(text[pos:start])
        pos = m.end()
        if first == "'":
            _drop_string_prefix(parts, text, start)
            append("?")
        elif m.lastgroup == "ws" or first == "-" or first == "/":
            if parts and parts[-1] != " ":
                append(" ")
        else:
            append("?")
    append(text[pos:])
    return "".join(parts).strip(" ")


def _drop_string_prefix(parts: list[str], text: str, quote_at: int) -> None:
    if quote_at and text[quote_at - 1] in _PREFIX_LAST and parts:
        chunk = parts[-1]
        prefix = _STRING_PREFIX.search(chunk, max(len(chunk) - 64, 0))
        if prefix is not None:
            parts[-1] = chunk[: prefix.start()]


def _collapse(text: str) -> str:
    """Collapse IN lists, ARRAY literals and repeated VALUES rows to one element."""
    if "?" not in text:
        return text
    lowered = text.lower()
    if "in (" in lowered or "in(" in lowered:
        text = _IN_LIST.sub(r"(\1)", text)
        text = _IN_TUPLES.sub(r"(\1)", text)
    if "values" in lowered:
        text = _VALUES.sub(r"(\1", text)
    if "array" in lowered:
        text = _ARRAY.sub(r"[\1]", text)
    return text


def _normalize(text: str) -> tuple[str, str, int]:
    """Return (normalized text, operation, index of the main verb in it)."""
    text = _collapse(_tokenize(text))
    while text.endswith(";"):
        text = text[:-1].rstrip()
    operation, verb_at = _operation(text)
    if operation in ("SAVEPOINT", "RELEASE", "ROLLBACK"):
        text = _SAVEPOINT_NAME.sub(r"\1?", text, count=1)
    return text, operation, verb_at


def _operation(text: str) -> tuple[str, int]:
    m = _FIRST_WORD.match(text)
    if m is None:
        return "OTHER", 0
    word = m.group(1).upper()
    if word == "WITH":
        return _main_verb(text, m.end())
    return _VERBS.get(word, "OTHER"), m.start(1)


def _main_verb(text: str, pos: int) -> tuple[str, int]:
    """Find the first statement verb outside the parentheses of a WITH clause's CTEs."""
    depth = 0
    for seen, m in enumerate(_MAIN_VERB.finditer(text, pos)):
        if seen == _MAX_CANDIDATES:
            break
        at = m.start()
        depth += text.count("(", pos, at) - text.count(")", pos, at)
        pos = at
        if depth <= 0:
            return _VERBS[m.group().upper()], at
    return "OTHER", 0


def _unquote(name: str) -> str:
    pieces: list[str] = []
    for part in _NAME_PARTS.findall(name):
        if part[0] == '"':
            part = part[1:-1].replace('""', '"')
        elif part[0] == "`":
            part = part[1:-1].replace("``", "`")
        elif part[0] == "[":
            part = part[1:-1]
        pieces.append(part)
    return ".".join(pieces)


def _table(text: str, operation: str, verb_at: int) -> str:
    if operation == "SELECT":
        return _select_table(text, verb_at)
    pattern = _TARGETS.get("DDL" if operation in _DDL else operation)
    if pattern is None:
        return ""
    m = pattern.match(text, verb_at)
    return _unquote(m.group("name")) if m else ""


def _select_table(text: str, pos: int) -> str:
    """The table of the shallowest FROM that names one (a derived table stands for its own)."""
    best = ""
    best_depth = 0
    depth = 0
    for seen, m in enumerate(_FROM.finditer(text, pos)):
        if seen == _MAX_CANDIDATES:
            break
        at = m.start()
        depth += text.count("(", pos, at) - text.count(")", pos, at)
        pos = at
        if depth < 0:
            break
        name = m.group("name")
        if name is not None and (not best or depth < best_depth):
            best, best_depth = name, depth
            if depth == 0:
                break
    return _unquote(best) if best else ""


def _coerce(statement: object) -> str:
    if isinstance(statement, str):
        return statement
    if isinstance(statement, (bytes, bytearray, memoryview)):
        return bytes(statement).decode("utf-8", "replace")
    try:
        return str(statement)
    except Exception:
        return type(statement).__name__


def _fingerprint(normalized: str) -> str:
    data = normalized.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def normalize(statement: str) -> str:
    """Return the normalized text of `statement` (see the module docstring); never raises."""
    return analyze(statement).normalized


def analyze(statement: str) -> Shape:
    """Return the `Shape` of `statement`: fingerprint, normalized text, operation, table.

    Never raises: bytes are decoded as UTF-8 with replacement, other objects are passed
    through ``str()``, and an internal failure yields a shape of the whitespace-collapsed
    text with operation OTHER. Cost is linear in the length of the text.
    """
    text = _coerce(statement)
    try:
        normalized, operation, verb_at = _normalize(text)
        table = _table(normalized, operation, verb_at)
    except Exception:
        normalized, operation, table = " ".join(text.split()), "OTHER", ""
    return Shape(_fingerprint(normalized), normalized, operation, table)
