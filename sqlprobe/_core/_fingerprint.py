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
and its cost is not bounded on hostile input). Every regex below runs in linear time
(no ambiguous nested repetition), and each unterminated construct (string, comment,
quoted name) consumes the rest of the text instead of being retried.
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


# Python 3.10 has no possessive quantifiers, so linearity comes from shape: after each
# quantifier either nothing can fail (unterminated constructs run to the end) or the
# next element is a character the quantified class excludes; alternations are disjoint.
# Every branch starts with a literal character or a small class so `re` skips the
# characters that cannot start one; lookbehinds sit after that first character for the
# same reason. Names, keywords, punctuation and whitespace never match, so the Python
# callback in `_tokenize` runs once per literal, parameter, comment or quoted name, and
# numbers and whitespace are left to C-level passes after it.
_LEXEMES = r"""
    --[^\n]*
    |/\*(?![+!]).*?(?:\*/|\Z)
    |'(?:[^'\\]+|''|\\.?)*'?
    |"[^"]*(?:""[^"]*)*"?
    |`[^`]*(?:``[^`]*)*`?
    |\[(?<![\w$\])]\[)(?![0-9?$:%'+\-.\s\]])[^\[\]]*\]
    |\$(?<![\w$?]\$)(?:[0-9]+|(?P<tag>(?:[^\W\d]\w*)?)\$(?:(?!\$(?P=tag)\$).)*(?:\$(?P=tag)\$)?)
    |%(?:\([^()%\s]*\)[sbt]|[sbt%])
    |:(?<![\w:?]:)(?:[^\W\d]\w*|[0-9]+)
"""
# Numbers (hex included) are replaced after the literals, on the text the later passes
# see, so that normalizing twice gives the same result as normalizing once.
_NUMBER = (
    r"[0-9](?<![\w$][0-9])"
    r"(?:(?<=0)[xX][0-9a-fA-F]+|[0-9]*(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)(?![\w$])"
)
_TOKEN = re.compile(_LEXEMES, re.VERBOSE | re.DOTALL)
_NUMBERS = re.compile(_NUMBER)
# `_NUMBERS.sub` tries a match at every digit, and most digits of generated SQL sit
# inside names (users_1_id, param_2, c12_5) where the lookbehind rejects them, one
# attempt each. For ASCII text `_replace_numbers` finds the few digits that follow a
# non-name character from a translated copy instead (name characters -> "a",
# digits -> "0", the rest -> " ": a number can only start at " 0").
_NAME_SHAPE = str.maketrans(
    {
        **{chr(c): " " for c in range(128)},
        **{c: "a" for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_$"},
        **{c: "0" for c in "0123456789"},
    }
)
_NUMBER_START = re.compile(" 0")
# A quoted name holding digits or whitespace is swapped out while the number and
# whitespace passes run: MARK + its index in private-use "digits" + MARK.
_NEEDS_CARE = re.compile(r"[\s0-9]")
# Past this many such names in one statement, later ones are normalized like code: a
# bound on the per-name work for hostile input, not a limit real statements reach.
_MAX_KEPT = 1000
_MARK_CANDIDATES = tuple(chr(code) for code in range(0xF8FF, 0xF8F7, -1))
_INDEX_DIGITS = str.maketrans("0123456789", "".join(chr(0xE100 + d) for d in range(10)))
_INDEX_DIGITS_BACK = str.maketrans({chr(0xE100 + d): str(d) for d in range(10)})

_KEPT_FIRST = frozenset('%"`[')
# The last character of a string literal's prefix; MySQL's introducer is _charset.
_INTRODUCER = re.compile(r"_[A-Za-z0-9]+\Z")
_PREFIX_LAST = frozenset("&0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Keywords are matched from their first letter, as a class (so `re` skips to candidate
# letters) followed by a lookbehind that rules out a longer word.
_IN = r"[iI](?<![\w$][iI])[nN] ?(?P<open>\()"
_ARRAY = r"[aA](?<![\w$][aA])[rR][rR][aA][yY] ?(?P<open>\[)"
# An element of an IN list or ARRAY literal: a placeholder, maybe signed, maybe cast.
_ELEMENT = r"[-+]?\?(?:::[A-Za-z_]\w*(?:\[\])?)?"
_IN_LIST = re.compile(_IN + rf" ?(?P<first>{_ELEMENT})")
_IN_TUPLE = re.compile(_IN + r" ?(?P<first>\([^()]*\))")
_ARRAY_LIST = re.compile(_ARRAY + rf" ?(?P<first>{_ELEMENT})")
# Further elements are skipped in bounded chunks: one unbounded repetition that fails
# at the end of a huge list (an unterminated one) would backtrack over all of it.
_MORE_ELEMENTS = re.compile(rf"(?: ?, ?{_ELEMENT}){{1,4096}}")
# Lists of up to 64 elements go in one substitution; what is left over after it (a
# longer or unterminated list) goes through `_collapse_lists`.
# (A group may not open the pattern, or `re` stops skipping to candidate letters: the
# keyword's first letter is captured by a lookbehind instead.)
_SHORT_IN_LIST = re.compile(
    r"[iI](?<=(?P<i>[iI]))(?<![\w$][iI])(?P<n>[nN] ?)\( ?"
    rf"(?P<first>{_ELEMENT})(?: ?, ?{_ELEMENT}){{0,63}} ?\)"
)
_LONG_IN_LIST = re.compile(rf"[iI](?<![\w$][iI])[nN] ?\( ?{_ELEMENT} ?,")
# Big statements collapse IN lists of still-unreplaced numbers first, which spares the
# number pass most of a huge list; the result is the same as collapsing afterwards.
_RAW_ELEMENT = (
    r"[-+]?(?:\?|[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?(?![\w$]))(?:::[A-Za-z_]\w*(?:\[\])?)?"
)
_RAW_IN_LIST = re.compile(_IN + rf" ?(?P<first>{_RAW_ELEMENT})")
_RAW_MORE_ELEMENTS = re.compile(rf"(?: ?, ?{_RAW_ELEMENT}){{1,4096}}")
_PLAIN_CHUNK = ", ?" * 1024 + ","
_CLOSE_PAREN = re.compile(r" ?\)")
_CLOSE_BRACKET = re.compile(r" ?\]")
_VALUES = re.compile(
    r"[vV](?<![\w$][vV])[aA][lL][uU][eE][sS] ?\("
    r"(?P<row>(?:[^()]|\([^()]*\))*\))(?: ?, ?\((?P=row))+"
)
# Whitespace runs in big statements (small ones use str.split, which is faster there):
# runs holding a tab, newline or other non-space first, then runs of spaces.
_NON_SPACE_WHITESPACE = re.compile(r"[^\S ]\s*")
_SPACES = re.compile(r"  +")
_SPLIT_LIMIT = 65_536

_NAME_PART = r"""(?:"[^"]*(?:""[^"]*)*"|`[^`]*(?:``[^`]*)*`|\[[^\[\]]*\]|[^\W\d][\w$]*)"""
_NAME_PARTS = re.compile(_NAME_PART)
_NAME = rf"(?P<name>{_NAME_PART}(?: ?\. ?{_NAME_PART}){{0,2}})"

_SAVEPOINT_NAME = re.compile(
    rf"^(\(* ?(?:savepoint|release(?: savepoint)?|rollback(?: work| transaction)? to"
    rf"(?: savepoint)?) ){_NAME_PART}",
    re.IGNORECASE,
)

_FIRST_WORD = re.compile(r"[\s(]*([A-Za-z_]\w*)")
_MAIN_VERB = re.compile(
    r"[sSiIuUdDvVmM](?<![\w$].)(?:(?<=[sS])[eE][lL][eE][cC][tT]|(?<=[iI])[nN][sS][eE][rR][tT]"
    r"|(?<=[uU])[pP][dD][aA][tT][eE]|(?<=[dD])[eE][lL][eE][tT][eE]"
    r"|(?<=[vV])[aA][lL][uU][eE][sS]|(?<=[mM])[eE][rR][gG][eE])(?![\w$])"
)
_FROM = re.compile(
    r"[fF][rR][oO][mM](?<![\w$][fF][rR][oO][mM])(?![\w$]) ?(?:[oO][nN][lL][yY] )?(?:(\()|"
    + _NAME
    + ")"
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
    kept: list[str] = []
    prefixes: list[str] = []
    marks: str | None = None  # found on first need; "" when the text leaves none free

    def replace(m: re.Match[str]) -> str:
        nonlocal marks
        token = m.group()
        first = token[0]
        if first == "'":
            at = m.start()
            if at and text[at - 1] in _PREFIX_LAST:
                prefix = _string_prefix(text, at)
                if prefix:
                    if marks is None:
                        marks = _marks(text)
                    if marks:
                        prefixes.append(prefix)
                        return f"{marks[1]}?"
            return "?"
        if first in _KEPT_FIRST:
            if first == "%":
                return token if token == "%%" else "?"
            if _NEEDS_CARE.search(token) is None or len(kept) == _MAX_KEPT:
                return token
            if marks is None:
                marks = _marks(text)
            if not marks:
                return token
            kept.append(token)
            return f"{marks[0]}{str(len(kept) - 1).translate(_INDEX_DIGITS)}{marks[0]}"
        return " " if first in "-/" else "?"

    text = _TOKEN.sub(replace, text)
    if prefixes and marks:
        text = _drop_prefixes(text, marks[1], prefixes)
    if len(text) >= _SPLIT_LIMIT:
        text = _collapse_lists(text, _RAW_IN_LIST, "(", _CLOSE_PAREN, _RAW_MORE_ELEMENTS)
    text = _replace_numbers(text)
    if len(text) < _SPLIT_LIMIT:
        text = " ".join(text.split())
    else:
        text = _SPACES.sub(" ", _NON_SPACE_WHITESPACE.sub(" ", text)).strip()
    if kept and marks:
        text = re.sub(
            f"{marks[0]}([^{marks[0]}]*){marks[0]}",
            lambda m: kept[int(m.group(1).translate(_INDEX_DIGITS_BACK))],
            text,
        )
    return text


def _replace_numbers(text: str) -> str:
    """``_NUMBERS.sub("?", text)``, faster on ASCII text (see ``_NAME_SHAPE``)."""
    if not text.isascii():
        return _NUMBERS.sub("?", text)
    # A leading " " stands for the start of the text, where a number may also begin;
    # it shifts the shape by one, so a match at shape index i is a digit at text[i].
    shape = " " + text.translate(_NAME_SHAPE)
    parts: list[str] = []
    last = 0
    match = _NUMBERS.match
    for candidate in _NUMBER_START.finditer(shape):
        at = candidate.start()
        if at < last:
            continue
        m = match(text, at)
        if m is not None:
            parts.append(text[last:at])
            parts.append("?")
            last = m.end()
    if not parts:
        return text
    parts.append(text[last:])
    return "".join(parts)


def _string_prefix(text: str, quote_at: int) -> str:
    """The prefix (``E``, ``N``, ``X``, ``B``, ``U&``, ``_charset``) before a quote, or ""."""
    last = text[quote_at - 1]
    if last in "eEnNbBxX":
        start = quote_at - 1
    elif last == "&":
        start = quote_at - 2
        if start < 0 or text[start] not in "uU":
            return ""
    else:
        m = _INTRODUCER.search(text, max(quote_at - 32, 0), quote_at)
        if m is None:
            return ""
        start = m.start()
    if start and (text[start - 1].isalnum() or text[start - 1] in "_$"):
        return ""
    return text[start:quote_at]


def _marks(text: str) -> str:
    """Two private-use characters absent from `text`, or "" if there are not two."""
    absent = "".join(c for c in _MARK_CANDIDATES if c not in text)
    return absent[:2] if len(absent) >= 2 else ""


def _drop_prefixes(text: str, mark: str, prefixes: list[str]) -> str:
    """Cut the prefix (``E``, ``N``, ``_utf8mb4``...) before each string literal flagged by
    ``mark``, when the text before the flag still ends with it."""
    pieces = text.split(mark)
    for i, prefix in enumerate(prefixes):
        if pieces[i].endswith(prefix):
            pieces[i] = pieces[i][: len(pieces[i]) - len(prefix)]
    return "".join(pieces)


def _collapse(text: str) -> str:
    """Collapse IN lists, ARRAY literals and repeated VALUES rows to one element.

    Each pass starts where its keyword first appears (found with ``str.find``, which is
    far cheaper per character than a regular expression scanning for a candidate
    letter): in a typical statement the IN list comes after a long select list.
    """
    if "?" not in text:
        return text
    lowered = _lower(text)
    at = _first(lowered, "in (", "in(")
    if at >= 0:
        # One character before the keyword stays in the slice for the lookbehind.
        start = max(at - 1, 0)
        text = text[:start] + _SHORT_IN_LIST.sub(_short_in_list, text[start:])
        if _LONG_IN_LIST.search(text, start) is not None:
            text = _collapse_lists(text, _IN_LIST, "(", _CLOSE_PAREN, search_from=start)
        if text.find("((", start) >= 0 or text.find("( (", start) >= 0:
            text = _collapse_lists(text, _IN_TUPLE, "(", _CLOSE_PAREN, search_from=start)
        lowered = _lower(text)
    at = lowered.find("values")
    if at >= 0:
        start = max(at - 1, 0)
        text = text[:start] + _VALUES.sub(_first_row, text[start:])
        lowered = _lower(text)
    at = lowered.find("array")
    if at >= 0:
        text = _collapse_lists(text, _ARRAY_LIST, "[", _CLOSE_BRACKET, search_from=at)
    return text


#: ASCII letters to lowercase (the keywords searched for are ASCII).
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _lower(text: str) -> str:
    """``text`` lowercased with every index kept, for finding keywords in ``text``.

    ``str.lower`` is fast, but one character lowercases to two (U+0130, ``İ``, to
    ``i̇``), which would shift every later index; when the length changed, only the
    ASCII letters are lowercased instead (slower, and rare).
    """
    lowered = text.lower()
    return lowered if len(lowered) == len(text) else text.translate(_ASCII_LOWER)


def _first(lowered: str, word: str, other: str) -> int:
    """The first index of ``word`` or ``other`` in ``lowered``, or -1."""
    a = lowered.find(word)
    b = lowered.find(other)
    return a if b < 0 or 0 <= a < b else b


def _short_in_list(m: re.Match[str]) -> str:
    # A function, not a "\g<...>" template: re expands templates in Python, slower.
    return f"{m['i']}{m['n']}({m['first']})"


def _collapse_lists(
    text: str,
    start: re.Pattern[str],
    opening: str,
    closing: re.Pattern[str],
    more_elements: re.Pattern[str] = _MORE_ELEMENTS,
    search_from: int = 0,
) -> str:
    """Replace each list that `start` finds (group ``first``: its first element) by that element.

    Lists are looked for from index ``search_from`` on.
    """
    parts: list[str] = []
    pos = 0
    for m in start.finditer(text, search_from):
        if m.start() < pos:
            continue
        first = m.group("first")
        end = m.end()
        if first[0] == "(":
            more = re.compile(rf"(?: ?, ?{re.escape(first)}){{1,4096}}")
        else:
            more = more_elements
        while True:
            # Long lists of bare placeholders are skipped by string comparison.
            while text.startswith(_PLAIN_CHUNK, end):
                end += len(_PLAIN_CHUNK) - 1
            chunk = more.match(text, end)
            if chunk is None:
                break
            end = chunk.end()
        close = closing.match(text, end)
        if close is None:
            continue
        parts.append(text[pos : m.start("open")])
        parts.append(f"{opening}{first}{close.group().strip()}")
        pos = close.end()
    if not parts:
        return text
    parts.append(text[pos:])
    return "".join(parts)


def _first_row(m: re.Match[str]) -> str:
    """``VALUES (row), (row), ...`` as written up to its first row, then that row."""
    return m.group()[: m.end("row") - m.start()]


def _normalize(text: str) -> tuple[str, str, int]:
    """Return (normalized text, operation, index of the main verb in it)."""
    text = _collapse(_tokenize(text))
    if text.endswith(";"):
        text = text.rstrip("; ")
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
    # The scan starts at the first "from" (a str.find is cheaper than the regex's own
    # search for a candidate letter); parentheses are still counted from `pos`.
    first_from = _lower(text).find("from", pos)
    if first_from < 0:
        return ""
    best = ""
    best_depth = 0
    depth = 0
    for seen, m in enumerate(_FROM.finditer(text, first_from)):
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


#: Statements longer than this are normalized from their first ``NORMALIZE_LIMIT``
#: characters only, marked as truncated. Normalization costs about 0.1-0.2 µs per
#: character on literal-dense text; the bound keeps a multi-megabyte statement (a
#: huge IN list, a bulk INSERT written out by hand) well under a second, and such
#: statements differ, if at all, in a tail that is almost always more of the same.
NORMALIZE_LIMIT = 512 * 1024

#: What a statement the normalizer fails on is reported as: never its raw text, which
#: could carry literals. A failure here is a bug, counted by nothing but this shape.
UNPARSED = "/* sqlprobe: statement could not be normalized */"


def analyze(statement: str) -> Shape:
    """Return the `Shape` of `statement`: fingerprint, normalized text, operation, table.

    Never raises: bytes are decoded as UTF-8 with replacement, other objects are passed
    through ``str()``, and an internal failure yields the :data:`UNPARSED` shape (never
    the raw text, which may hold literals). Cost is linear in the length of the text and
    bounded by :data:`NORMALIZE_LIMIT`.
    """
    text = _coerce(statement)
    truncated = len(text) > NORMALIZE_LIMIT
    if truncated:
        text = text[:NORMALIZE_LIMIT]
    try:
        normalized, operation, verb_at = _normalize(text)
        table = _table(normalized, operation, verb_at)
    except Exception:
        normalized, operation, table = UNPARSED, "OTHER", ""
    if truncated:
        normalized += " /* truncated */"
    return Shape(_fingerprint(normalized), normalized, operation, table)
