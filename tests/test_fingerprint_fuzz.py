"""Property and bound tests for statement fingerprints: total, deterministic, linear."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlprobe._core._fingerprint import OPERATIONS, analyze, normalize

HEX16 = re.compile(r"[0-9a-f]{16}")
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOAK = settings(max_examples=20_000, deadline=None)

# Fragments that exercise every lexer branch, glued in any order.
FRAGMENTS = st.sampled_from(
    [
        "SELECT",
        "select",
        "INSERT INTO",
        "UPDATE",
        "DELETE FROM",
        "WITH",
        "VALUES",
        "IN",
        "FROM",
        "WHERE",
        "AS",
        "SAVEPOINT",
        "ROLLBACK TO",
        "ARRAY",
        " ",
        "\n",
        "\t",
        "(",
        ")",
        "[",
        "]",
        ",",
        ";",
        ".",
        "=",
        "-",
        "+",
        "*",
        "/",
        "%",
        ":",
        "::",
        "?",
        "$",
        "$$",
        "'",
        "''",
        '"',
        "`",
        "\\",
        "--",
        "/*",
        "*/",
        "/*+",
        "E'",
        "N'",
        "0x",
        "1",
        "2.5",
        "1e3",
        "%s",
        "%(a)s",
        "%%",
        ":name",
        "$1",
        "$tag$",
        "t1",
        "col_2",
        '"q 1"',
        "[x y]",
        "é",
        "\x00",
        "\ud800",
    ]
)
SQLISH = st.lists(FRAGMENTS, max_size=40).map("".join)
TEXTS = st.one_of(st.text(), SQLISH)


def check(shape_source: object) -> None:
    shape = analyze(shape_source)  # type: ignore[arg-type]
    assert HEX16.fullmatch(shape.fingerprint)
    assert shape.operation in OPERATIONS
    assert isinstance(shape.normalized, str) and isinstance(shape.table, str)


@FAST
@given(TEXTS)
def test_never_raises_on_text(text: str) -> None:
    """Any text, lone surrogates and NULs included, yields a well-formed shape."""
    check(text)


@FAST
@given(st.binary(), st.sampled_from(["surrogateescape", "replace"]))
def test_never_raises_on_decoded_bytes(data: bytes, errors: str) -> None:
    """Arbitrary bytes, decoded leniently or passed as bytes, yield a well-formed shape."""
    check(data.decode("utf-8", errors))
    check(data)


@FAST
@given(TEXTS)
def test_deterministic(text: str) -> None:
    """The same text always gives the same shape."""
    assert analyze(text) == analyze(text)


@FAST
@given(TEXTS)
def test_normalize_is_idempotent(text: str) -> None:
    """Normalizing normalized text changes nothing, so it keeps its fingerprint."""
    once = normalize(text)
    assert normalize(once) == once
    assert analyze(once).fingerprint == analyze(text).fingerprint


@FAST
@given(SQLISH)
def test_no_newlines_or_runs_of_spaces_outside_quotes(text: str) -> None:
    """Whitespace outside quoted names is collapsed and the text is stripped."""
    out = normalize(text)
    if not any(q in text for q in '"`['):
        assert out == out.strip()
        assert "\n" not in out and "  " not in out


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


LITERALS = st.one_of(
    st.integers(min_value=0).map(str),
    st.decimals(min_value=0, max_value=10**6, allow_nan=False, places=3).map(str),
    st.text(max_size=20).map(sql_string),
    st.sampled_from(["%s", "?", ":p", "%(p)s", "$1", "$$x$$", "0xAB", "1e5", "E'x'"]),
)
TEMPLATES = st.sampled_from(
    [
        "SELECT a, b FROM t WHERE a = {} AND b > {}",
        "SELECT * FROM t WHERE a IN ({}, {}) AND c = {}",
        "INSERT INTO t (a, b) VALUES ({}, {})",
        "UPDATE t SET a = {} WHERE id = {} -- a comment",
        "DELETE FROM t WHERE a < {} /* a comment */ AND b = {}",
        "SELECT f({}, {}) FROM t LIMIT {}",
    ]
)


@FAST
@given(TEMPLATES, st.data())
def test_literal_values_do_not_change_the_fingerprint(template: str, data: st.DataObject) -> None:
    """Filling one template with different literals and parameters gives one fingerprint."""
    slots = template.count("{}")
    a = template.format(*data.draw(st.lists(LITERALS, min_size=slots, max_size=slots)))
    b = template.format(*data.draw(st.lists(LITERALS, min_size=slots, max_size=slots)))
    assert analyze(a).fingerprint == analyze(b).fingerprint, (normalize(a), normalize(b))


@FAST
@given(st.integers(min_value=1, max_value=300), st.integers(min_value=1, max_value=300))
def test_list_lengths_do_not_change_the_fingerprint(m: int, n: int) -> None:
    """IN lists and VALUES batches of any lengths share one fingerprint."""

    def statement(k: int) -> str:
        rows = ", ".join(f"({i}, 'v{i}')" for i in range(k))
        ids = ", ".join(str(i) for i in range(k))
        return f"INSERT INTO t (a, b) VALUES {rows}; SELECT * FROM t WHERE a IN ({ids})"

    assert analyze(statement(m)).fingerprint == analyze(statement(n)).fingerprint


# The bounds below are on this process's CPU time (time.process_time), not wall-clock
# time, so that other work on a shared CI machine cannot make them flaky.
TEN_MB = 10_000_000
TWO_MB = 2_000_000
# Big statements that are one or a few tokens, or whose tokens the regexes handle alone.
HOSTILE = {
    "huge IN list": "SELECT * FROM t WHERE id IN (" + ", ".join(["12345"] * (TEN_MB // 7)) + ")",
    "unterminated IN list": "SELECT 1 WHERE x IN (" + "?, " * (TEN_MB // 3),
    "huge string literal": "SELECT '" + "some text, it''s long " * (TEN_MB // 22) + "'",
    "unterminated string": "SELECT '" + "a" * TEN_MB,
    "unterminated comment": "SELECT /*" + "*" * TEN_MB,
    "garbage bytes": bytes(range(256)).decode("latin-1") * (TEN_MB // 256),
    "open parentheses": "WITH x AS " + "(" * TEN_MB,
    "balanced parentheses": "SELECT " + "(" * (TEN_MB // 2) + ")" * (TEN_MB // 2),
    "brackets": "[a" * (TEN_MB // 2),
    "dollars": "$a" * (TEN_MB // 2),
    "percent": "%(" * (TEN_MB // 2),
    "hex prefixes": "0x" * (TEN_MB // 2),
    "huge VALUES": "INSERT INTO t VALUES " + ", ".join(["(?, ?)"] * (TEN_MB // 8)),
    "nested VALUES": "INSERT INTO t VALUES " + "(" * (TEN_MB // 2) + "?" + "), (?" * (TEN_MB // 8),
    "many selects in WITH": "WITH x AS (" + "select " * (TEN_MB // 7),
    "many FROMs": "SELECT " + "from (" * (TEN_MB // 6),
    "whitespace": " \t\n" * (TEN_MB // 3),
    "semicolons": "SELECT 1" + "; " * (TEN_MB // 2),
}
# Statements made of millions of tiny tokens: each costs a Python call, so the bound is
# per 2 MB (still linear: no case may go quadratic).
DENSE = {
    "escape-dense string": "SELECT '" + "a''b\\'" * (TWO_MB // 7) + "'",
    "backslash-dense unterminated string": "SELECT '" + "a\\" * (TWO_MB // 2),
    "quotes": "'" * TWO_MB,
    "double quotes": '"' * TWO_MB,
    "colons": ":" * TWO_MB,
    "digits and dots": "1." * (TWO_MB // 2),
    "many strings": "E'a' " * (TWO_MB // 5),
    "many quoted names": '"a 1" ' * (TWO_MB // 6),
    "many comments": "/*a*/" * (TWO_MB // 5),
    "many parameters": "$1," * (TWO_MB // 3),
    "literal INSERT": "INSERT INTO t VALUES " + ", ".join(["(12, 'ab')"] * (TWO_MB // 12)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_ten_megabytes_in_under_a_second(name: str) -> None:
    """A hostile 10 MB statement is analyzed in under a second."""
    statement = HOSTILE[name]
    started = time.process_time()
    shape = analyze(statement)
    elapsed = time.process_time() - started
    assert shape.operation in OPERATIONS
    assert elapsed < 1.0, f"{name}: {elapsed:.2f}s"


@pytest.mark.parametrize("name", sorted(DENSE))
def test_dense_two_megabytes_in_under_a_second(name: str) -> None:
    """A 2 MB statement of tiny tokens is analyzed in under a second."""
    statement = DENSE[name]
    started = time.process_time()
    shape = analyze(statement)
    elapsed = time.process_time() - started
    assert shape.operation in OPERATIONS
    assert elapsed < 1.0, f"{name}: {elapsed:.2f}s"


@pytest.mark.soak
@SOAK
@given(TEXTS)
def test_soak_never_raises_and_is_idempotent(text: str) -> None:
    """Long run: any text yields a shape and normalization is idempotent."""
    check(text)
    once = normalize(text)
    assert normalize(once) == once
