"""Reading statements for index advice: placeholders of every paramstyle, predicates, candidates."""

from __future__ import annotations

from typing import Any

import pytest

from sqlprobe._analysis._advisor_sql import Candidate, TableUse, candidates, read_statement


def _uses(
    statement: str, parameters: Any = None, dialect: str = "postgresql", **kw: Any
) -> dict[str, TableUse]:
    reading = read_statement(statement, parameters, dialect, **kw)
    assert reading.reason is None, reading.reason
    return {u.name: u for u in reading.tables}


@pytest.mark.parametrize(
    ("dialect", "paramstyle", "statement", "parameters"),
    [
        (
            "postgresql",
            "pyformat",
            "SELECT * FROM t WHERE a = %(x)s AND b LIKE %(p)s",
            {"x": 1, "p": "ab%"},
        ),
        ("postgresql", "format", "SELECT * FROM t WHERE a = %s AND b LIKE %s", (1, "ab%")),
        ("postgresql", "numeric_dollar", "SELECT * FROM t WHERE a = $1 AND b LIKE $2", (1, "ab%")),
        ("sqlite", "qmark", "SELECT * FROM t WHERE a = ? AND b LIKE ?", (1, "ab%")),
        ("sqlite", "named", "SELECT * FROM t WHERE a = :x AND b LIKE :p", {"x": 1, "p": "ab%"}),
        ("mysql", "format", "SELECT * FROM t WHERE a = %s AND b LIKE %s", (1, "ab%")),
        (
            "mysql",
            "pyformat",
            "SELECT * FROM t WHERE a = %(x)s AND b LIKE %(p)s",
            {"x": 1, "p": "ab%"},
        ),
    ],
)
def test_every_paramstyle_parses_and_binds_the_like_pattern(
    dialect: str, paramstyle: str, statement: str, parameters: Any
) -> None:
    """Each paramstyle parses in its dialect and the LIKE value is matched to its placeholder."""
    t = _uses(statement, parameters, dialect, paramstyle=paramstyle)["t"]
    assert (t.eq, t.prefix) == (["a"], ["b"])


def test_sqlalchemy_psycopg_casts_on_placeholders() -> None:
    """SQLAlchemy's psycopg form ``%(p)s::VARCHAR`` still binds the LIKE pattern."""
    t = _uses(
        "SELECT t.id FROM t WHERE t.a = %(a_1)s::INTEGER AND t.b LIKE %(b_1)s::VARCHAR",
        {"a_1": 1, "b_1": "ab%"},
        paramstyle="pyformat",
    )["t"]
    assert (t.eq, t.prefix) == (["a"], ["b"])


def test_leading_wildcard_unknown_pattern_and_escaped_percent() -> None:
    """'%x' and an unbound pattern give no prefix; pyformat's '%%' literal is one '%'."""
    t = _uses(
        "SELECT * FROM t WHERE a LIKE %(p)s AND b LIKE ?", {"p": "%x"}, paramstyle="pyformat"
    )["t"]
    assert t.prefix == []
    t = _uses("SELECT * FROM t WHERE a LIKE 'ab%%'", {}, paramstyle="pyformat")["t"]
    assert t.prefix == ["a"]
    t = _uses("SELECT * FROM t WHERE a LIKE '%%ab'", {}, paramstyle="pyformat")["t"]
    assert t.prefix == []


def test_joins_aliases_order_by_and_subqueries() -> None:
    """Join keys go to both tables, aliases resolve, ORDER BY and subquery scopes are read."""
    uses = _uses(
        "SELECT o.id FROM orders AS o JOIN users u ON u.id = o.user_id"
        " WHERE o.created_at > ? AND o.status IN (?, ?) AND u.name = ?"
        " AND o.total BETWEEN ? AND ? ORDER BY o.created_at DESC"
        " LIMIT (SELECT max(n) FROM limits WHERE limits.k = ?)"
    )
    assert uses["orders"].join == ["user_id"] and uses["users"].join == ["id"]
    assert uses["orders"].eq == ["status"]
    assert uses["orders"].range == ["created_at", "total"]
    assert uses["orders"].order == ["created_at"]
    assert uses["users"].eq == ["name"]
    assert uses["limits"].eq == ["k"]


def test_or_functions_and_null_tests_are_ignored() -> None:
    """OR branches, lower(col) and IS NULL give no columns."""
    t = _uses("SELECT * FROM t WHERE (a = 1 OR b = 2) AND lower(c) = 'x' AND d IS NULL")["t"]
    assert (t.eq, t.range, t.prefix) == ([], [], [])


def test_unqualified_columns_resolve_through_the_schema() -> None:
    """With two tables, an unqualified column goes to the table that has it."""
    uses = _uses(
        "SELECT * FROM a JOIN b ON a.id = b.a_id WHERE flavour = 1",
        resolve=lambda schema, table, column: (table, column) == ("b", "flavour"),
    )
    assert uses["b"].eq == ["flavour"] and uses["a"].eq == []


@pytest.mark.parametrize(
    ("statement", "reason"),
    [
        ("UPDATE t SET a = 1 WHERE b = 2", "not a SELECT"),
        ("SELECT 1; SELECT 2", "not one statement"),
        ("SELECT * FROM t WHERE a = 1 FOR UPDATE", "locking"),
        ("SELEC nonsense ((", "could not be parsed"),
        ("SELECT * FROM t WHERE a IN (" + "1, " * 10_000 + "1)", "longer than"),
    ],
)
def test_statements_that_are_not_advised(statement: str, reason: str) -> None:
    """Non-SELECTs, several statements, locking reads and garbage give a reason, no tables."""
    reading = read_statement(statement, None, "postgresql")
    assert reading.reason is not None and reason in reading.reason
    assert reading.tables == []


def test_generic_numbering_keeps_casts() -> None:
    """Normalized ? placeholders become $1.. in order, a ?::INTEGER cast included."""
    reading = read_statement(
        "SELECT * FROM t WHERE a IN (?::INTEGER) AND b = ? LIMIT ?", None, "postgresql"
    )
    assert reading.numbered == "SELECT * FROM t WHERE a IN ($1::INTEGER) AND b = $2 LIMIT $3"
    assert reading.placeholders == 3


def test_candidates_order_and_coverage() -> None:
    """Equalities first then one range/order column; covered and non-selective ones dropped."""
    use = TableUse(None, "t", eq=["a", "flag", "b"], range=["ts"], order=["ts"], join=["fk"])
    found = candidates(
        use,
        selective=lambda c: c != "flag",
        covered=lambda cols: cols == ("b",),
        pattern_ops=lambda c: None,
        limit=10,
    )
    assert [c.columns for c in found] == [("a", "b", "ts"), ("a", "ts"), ("a",), ("ts",), ("fk",)]
    limited = candidates(
        use,
        selective=lambda c: True,
        covered=lambda cols: False,
        pattern_ops=lambda c: None,
        limit=2,
    )
    assert len(limited) == 2


def test_prefix_candidates_carry_pattern_ops() -> None:
    """A LIKE-prefix column gets the operator class pattern_ops names for it."""
    use = TableUse(None, "users", prefix=["name"])
    (found,) = candidates(
        use,
        selective=lambda c: True,
        covered=lambda cols: False,
        pattern_ops=lambda c: "text_pattern_ops",
        limit=4,
    )
    assert found == Candidate(("name",), (("name", "text_pattern_ops"),), "prefix")
