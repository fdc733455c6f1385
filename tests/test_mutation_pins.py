"""Behaviours that mutants of the statement path, fingerprints, exporters and pool
metrics survived (``bash scripts/mutation.sh``): each pinned through what a user sees,
the registry's samples, the shapes and the records, so the tests outlive refactors."""

from __future__ import annotations

import pytest

from sqlprobe._core._fingerprint import UNPARSED, analyze, normalize

# ------------------------------------------------------------------------ fingerprints


def test_lowercase_string_prefixes_are_dropped_with_their_literal() -> None:
    """``e'..'``, ``n'..'``, ``b'..'`` and ``x'..'`` normalize like their uppercase forms."""
    assert normalize("SELECT e'a\\'b', n'x', b'01', x'ff'") == "SELECT ?, ?, ?, ?"


def test_doubled_quotes_in_a_quoted_table_name_are_unescaped() -> None:
    """A table named with a doubled quote or backtick is reported with a single one."""
    assert analyze('SELECT * FROM "we""ird"').table == 'we"ird'
    assert analyze("SELECT * FROM `we``ird`").table == "we`ird"


def test_text_holding_every_private_use_mark_still_normalizes() -> None:
    """A statement that leaves no free marker character is normalized, not given up on."""
    marks = "".join(chr(c) for c in range(0xF8F8, 0xF900))
    shape = analyze(f"SELECT X, \"a 1\" FROM t WHERE c = '{marks}'")
    assert shape.normalized != UNPARSED
    assert shape.normalized.startswith("SELECT X, ")
    assert shape.normalized.endswith(" FROM t WHERE c = ?")


@pytest.mark.parametrize("n", [1500, 4000])
def test_very_long_placeholder_lists_collapse(n: int) -> None:
    """IN lists of thousands of bare placeholders collapse to one element."""
    placeholders = ", ".join(["?"] * n)
    assert normalize(f"SELECT * FROM t WHERE id IN ({placeholders})") == (
        "SELECT * FROM t WHERE id IN (?)"
    )


@pytest.mark.parametrize("n", [100, 200])
def test_a_list_that_cannot_collapse_does_not_stop_later_ones(n: int) -> None:
    """An IN list with a column in it is kept, and a long list after it still collapses."""
    placeholders = ", ".join(["?"] * n)
    assert normalize(f"SELECT * FROM t WHERE a IN (?, ?, b) AND c IN ({placeholders})") == (
        "SELECT * FROM t WHERE a IN (?, ?, b) AND c IN (?)"
    )


def test_with_statement_without_a_main_verb_is_other() -> None:
    """A WITH clause followed by no statement verb is OTHER, with no table."""
    shape = analyze("WITH x AS (SELECT 1 FROM t)")
    assert (shape.operation, shape.table) == ("OTHER", "")


def test_with_statement_past_the_candidate_bound_is_other_not_unparsed() -> None:
    """A WITH clause hiding its verb behind 10,000+ candidates gives OTHER, still normalized."""
    body = "SELECT 1 UNION ALL " * 10_001
    shape = analyze(f"WITH a AS ({body}SELECT 1) SELECT * FROM a")
    assert shape.normalized != UNPARSED
    assert shape.normalized.endswith(") SELECT * FROM a")
    assert shape.operation == "OTHER"
