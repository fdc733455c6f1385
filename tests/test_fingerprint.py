"""Statement fingerprints: normalization, shape equality, operation and table extraction."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlprobe._core._fingerprint import OPERATIONS, Shape, analyze, normalize

pytestmark = pytest.mark.smoke

HEX16 = re.compile(r"[0-9a-f]{16}")


def fp(statement: str) -> str:
    return analyze(statement).fingerprint


# --------------------------------------------------------------------------- normalization


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("SELECT * FROM t WHERE a = 'x'", "SELECT * FROM t WHERE a = ?"),
        ("SELECT 'it''s', 'a\\'b', ''", "SELECT ?, ?, ?"),
        ("SELECT E'a\\'b', N'x', X'ff', B'01', U&'d', _utf8mb4'z'", "SELECT ?, ?, ?, ?, ?, ?"),
        ("SELECT 42, 3.14, 1e-3, 2.5E+10, 0x1F, 1.", "SELECT ?, ?, ?, ?, ?, ?"),
        ("SELECT -1, a-1", "SELECT -?, a-?"),
        ("SELECT t1.col_2, x9 FROM t1", "SELECT t1.col_2, x9 FROM t1"),
        ("SELECT $$ a 'b' $$, $fn$ x $$ y $fn$", "SELECT ?, ?"),
        ("SELECT a FROM t WHERE a = ? AND b = %s", "SELECT a FROM t WHERE a = ? AND b = ?"),
        ("SELECT %(name)s, %(other_1)s, %b, %t", "SELECT ?, ?, ?, ?"),
        ("SELECT :name, :x_1, :1", "SELECT ?, ?, ?"),
        ("SELECT $1, $2::INTEGER", "SELECT ?, ?::INTEGER"),
        ("SELECT a::int, b::text[] FROM t", "SELECT a::int, b::text[] FROM t"),
        (
            "SELECT a FROM t WHERE b LIKE 'x%%' AND c %% 2 = 0",
            "SELECT a FROM t WHERE b LIKE ? AND c %% ? = ?",
        ),
        ("SELECT ':not_a_param', '--no', '/*no*/'", "SELECT ?, ?, ?"),
        (
            'SELECT "col 1", "a""b", `x 2`, [my col] FROM "T"',
            'SELECT "col 1", "a""b", `x 2`, [my col] FROM "T"',
        ),
        ('SELECT "a  b"\n\tFROM t', 'SELECT "a  b" FROM t'),
        ("SELECT a -- trailing\nFROM t", "SELECT a FROM t"),
        ("/* lead */ SELECT a/*mid*/FROM t", "SELECT a FROM t"),
        (
            "SELECT a FROM t /*traceparent='00-0af7651916cd43dd8448eb211c80319c-"
            "b7ad6b7169203331-01',route='%%2Fusers'*/",
            "SELECT a FROM t",
        ),
        ("SELECT /*+ INDEX(t i) */ a FROM t", "SELECT /*+ INDEX(t i) */ a FROM t"),
        ("  SELECT\n\n  a ,\tb\r\nFROM t ;  ", "SELECT a , b FROM t"),
        ("SELECT a FROM t WHERE a IN (1, 2, 3)", "SELECT a FROM t WHERE a IN (?)"),
        ("SELECT a FROM t WHERE a NOT IN ('x','y')", "SELECT a FROM t WHERE a NOT IN (?)"),
        (
            "SELECT a FROM t WHERE a in(?::INTEGER, ?::INTEGER)",
            "SELECT a FROM t WHERE a in(?::INTEGER)",
        ),
        (
            "SELECT a FROM t WHERE (a, b) IN ((1, 2), (3, 4))",
            "SELECT a FROM t WHERE (a, b) IN ((?, ?))",
        ),
        (
            "SELECT a FROM t WHERE a IN (SELECT b FROM u)",
            "SELECT a FROM t WHERE a IN (SELECT b FROM u)",
        ),
        ("SELECT ARRAY[1, 2, 3]", "SELECT ARRAY[?]"),
        ("SELECT f(1, 2, 3)", "SELECT f(?, ?, ?)"),
        (
            "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), (3, 'z')",
            "INSERT INTO t (a, b) VALUES (?, ?)",
        ),
        ("INSERT INTO t (a) VALUES (?, now()), (?, now())", "INSERT INTO t (a) VALUES (?, now())"),
        ("SAVEPOINT sa_savepoint_7", "SAVEPOINT ?"),
        ("RELEASE SAVEPOINT sa_savepoint_3", "RELEASE SAVEPOINT ?"),
        ("ROLLBACK TO SAVEPOINT sa_savepoint_12", "ROLLBACK TO SAVEPOINT ?"),
        ("SELECT 'unterminated", "SELECT ?"),
        ("SELECT a /* unterminated", "SELECT a"),
        ('SELECT "unterminated', 'SELECT "unterminated'),
        ("", ""),
    ],
)
def test_normalize_table(statement: str, expected: str) -> None:
    """Each statement normalizes to exactly the documented text."""
    assert normalize(statement) == expected


def test_normalized_is_full_length() -> None:
    """The normalized text is never truncated."""
    statement = "SELECT " + ", ".join(f"c{i}" for i in range(2000)) + " FROM t"
    assert normalize(statement) == statement


# ------------------------------------------------------------------------- same / different


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("SELECT * FROM t WHERE a = 1", "SELECT * FROM t WHERE a = 2"),
        ("SELECT * FROM t WHERE a = 'x'", "SELECT * FROM t WHERE a = 'a much longer value'"),
        ("SELECT * FROM t WHERE a = 1.5", "SELECT * FROM t WHERE a = 7"),
        ("SELECT * FROM t WHERE a = $1", "SELECT * FROM t WHERE a = $17"),
        ("SELECT * FROM t WHERE a = :x", "SELECT * FROM t WHERE a = :y_2"),
        ("SELECT * FROM t WHERE a = %(a_1)s", "SELECT * FROM t WHERE a = %(a_2)s"),
        ("SELECT * FROM t WHERE a IN (1)", "SELECT * FROM t WHERE a IN (1, 2, 3, 4, 5, 6)"),
        ("SELECT * FROM t WHERE a IN (?)", "SELECT * FROM t WHERE a IN (?, ?, ?)"),
        ("INSERT INTO t (a) VALUES (?)", "INSERT INTO t (a) VALUES (?), (?), (?)"),
        ("SELECT a FROM t", "SELECT a FROM t -- why"),
        ("SELECT a FROM t", "/* controller='x',traceparent='00-1-2-01' */ SELECT a FROM t"),
        ("SELECT a FROM t", "SELECT a\n  FROM t"),
        ("SAVEPOINT sa_savepoint_1", "SAVEPOINT sa_savepoint_2"),
        ("SELECT $a$x$a$", "SELECT $$other$$"),
    ],
)
def test_same_shape_same_fingerprint(a: str, b: str) -> None:
    """Statements that differ only in values, list lengths, comments or spacing share one."""
    assert fp(a) == fp(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("SELECT a FROM t", "SELECT b FROM t"),
        ("SELECT a FROM t", "SELECT a FROM u"),
        ("SELECT a FROM t WHERE a = 1", "SELECT a FROM t WHERE a > 1"),
        ("SELECT a FROM t WHERE a = 1 AND b = 2", "SELECT a FROM t WHERE a = 1 OR b = 2"),
        ("SELECT a FROM t ORDER BY a LIMIT 1", "SELECT a FROM t LIMIT 1 ORDER BY a"),
        ("SELECT a::int FROM t", "SELECT a::text FROM t"),
        ("SELECT a FROM t1", "SELECT a FROM t2"),
        ("SELECT col_1 FROM t", "SELECT col_2 FROM t"),
        ('SELECT "x 1" FROM t', 'SELECT "x 2" FROM t'),
        ("INSERT INTO t (a) VALUES (?)", "INSERT INTO t (a, b) VALUES (?, ?)"),
        ("SELECT f(?, ?)", "SELECT f(?, ?, ?)"),
        ("SELECT a FROM t WHERE a IN (?)", "SELECT a FROM t WHERE a = ?"),
    ],
)
def test_different_shape_different_fingerprint(a: str, b: str) -> None:
    """Statements that differ in columns, tables, operators or clause order do not."""
    assert fp(a) != fp(b)


def test_fingerprint_is_blake2b_of_normalized_text() -> None:
    """The fingerprint is the 8-byte blake2b hex digest of the normalized UTF-8 text."""
    shape = analyze("SELECT a FROM t WHERE b = 'é' AND c = 1")
    expected = hashlib.blake2b(shape.normalized.encode("utf-8"), digest_size=8).hexdigest()
    assert shape.fingerprint == expected
    assert HEX16.fullmatch(shape.fingerprint)


def test_fingerprint_is_pinned() -> None:
    """A known statement keeps a known fingerprint, release after release."""
    assert (
        fp("SELECT a FROM t WHERE b = 1")
        == hashlib.blake2b(b"SELECT a FROM t WHERE b = ?", digest_size=8).hexdigest()
    )


def test_fingerprint_is_stable_across_processes() -> None:
    """Another interpreter with a different hash seed computes the same fingerprints."""
    statements = [
        "SELECT a FROM t WHERE b IN (1, 2, 3)",
        "INSERT INTO t (a) VALUES ('x'), ('y')",
        "SAVEPOINT sa_savepoint_1",
    ]
    code = (
        "import sys; from sqlprobe._core._fingerprint import analyze\n"
        "for line in sys.stdin.read().split('\\x00'): print(analyze(line).fingerprint)\n"
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        out = subprocess.run(
            [sys.executable, "-c", code],
            input="\x00".join(statements),
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=60,
        ).stdout.split()
        assert out == [fp(s) for s in statements]


# ---------------------------------------------------------------------- operation and table


@pytest.mark.parametrize(
    ("statement", "operation", "table"),
    [
        ("SELECT a FROM users WHERE id = 1", "SELECT", "users"),
        ("select a from public.users", "SELECT", "public.users"),
        ('SELECT a FROM "public"."User Table"', "SELECT", "public.User Table"),
        ("SELECT a FROM `db`.`t`", "SELECT", "db.t"),
        ("SELECT a FROM [dbo].[t]", "SELECT", "dbo.t"),
        ("SELECT 1", "SELECT", ""),
        ("SELECT fromage, from_x FROM cheese", "SELECT", "cheese"),
        ("SELECT (SELECT count(*) FROM orders) FROM users", "SELECT", "users"),
        ("SELECT anon_1.a FROM (SELECT a FROM users) AS anon_1", "SELECT", "users"),
        ("(SELECT a FROM t1) UNION (SELECT a FROM t2)", "SELECT", "t1"),
        ("  /* c */ ( SELECT 1 )", "SELECT", ""),
        ("INSERT INTO orders (a) VALUES (1)", "INSERT", "orders"),
        ("INSERT IGNORE INTO orders (a) VALUES (1)", "INSERT", "orders"),
        ("INSERT OR REPLACE INTO orders (a) VALUES (1)", "INSERT", "orders"),
        ("REPLACE INTO orders (a) VALUES (1)", "INSERT", "orders"),
        ("UPSERT INTO orders (a) VALUES (1)", "INSERT", "orders"),
        ("UPDATE users SET a = 1", "UPDATE", "users"),
        ("UPDATE ONLY s.users SET a = 1", "UPDATE", "s.users"),
        ("DELETE FROM users WHERE id = 1", "DELETE", "users"),
        ("MERGE INTO target t USING src s ON t.id = s.id", "MERGE", "target"),
        ("CREATE TABLE IF NOT EXISTS foo (a int)", "CREATE", "foo"),
        ("CREATE TEMPORARY TABLE foo (a int)", "CREATE", "foo"),
        ("CREATE UNIQUE INDEX ix_a ON foo (a)", "CREATE", "foo"),
        ("CREATE VIEW v AS SELECT 1", "CREATE", ""),
        ("ALTER TABLE foo ADD COLUMN b int", "ALTER", "foo"),
        ("DROP TABLE IF EXISTS foo", "DROP", "foo"),
        ("TRUNCATE TABLE foo", "TRUNCATE", "foo"),
        ("TRUNCATE foo", "TRUNCATE", "foo"),
        ("BEGIN", "BEGIN", ""),
        ("START TRANSACTION", "BEGIN", ""),
        ("COMMIT", "COMMIT", ""),
        ("END", "COMMIT", ""),
        ("ROLLBACK", "ROLLBACK", ""),
        ("ROLLBACK TO SAVEPOINT sp", "ROLLBACK", ""),
        ("SAVEPOINT sp", "SAVEPOINT", ""),
        ("RELEASE SAVEPOINT sp", "RELEASE", ""),
        ("SET search_path TO x", "SET", ""),
        ("SHOW server_version", "SHOW", ""),
        ("DESCRIBE `test`.`t`", "SHOW", ""),
        ("EXPLAIN ANALYZE SELECT 1", "EXPLAIN", ""),
        ("CALL proc(1)", "CALL", ""),
        ('PRAGMA main.table_info("t")', "PRAGMA", ""),
        ("WITH x AS (SELECT a FROM t) SELECT a FROM x", "SELECT", "x"),
        (
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) "
            "INSERT INTO t (n) SELECT n FROM c",
            "INSERT",
            "t",
        ),
        ("WITH d AS (DELETE FROM a RETURNING *) UPDATE b SET x = 1", "UPDATE", "b"),
        ("with x as (select 1) delete from t", "DELETE", "t"),
        ("GRANT ALL ON t TO u", "OTHER", ""),
        ("", "OTHER", ""),
        ("???", "OTHER", ""),
    ],
)
def test_operation_and_table(statement: str, operation: str, table: str) -> None:
    """The verb maps into OPERATIONS and the main table is named without quotes."""
    shape = analyze(statement)
    assert (shape.operation, shape.table) == (operation, table)
    assert shape.operation in OPERATIONS


def test_operations_set() -> None:
    """OPERATIONS is exactly the documented set of twenty."""
    documented = """SELECT INSERT UPDATE DELETE MERGE CREATE ALTER DROP TRUNCATE BEGIN COMMIT
        ROLLBACK SAVEPOINT RELEASE SET SHOW EXPLAIN CALL PRAGMA OTHER"""
    assert frozenset(documented.split()) == OPERATIONS


@pytest.mark.parametrize(
    "value", [b"SELECT 1", bytearray(b"SELECT 1"), b"\xff\xfe SELECT 1", 42, None, object()]
)
def test_non_str_input_never_raises(value: Any) -> None:
    """Bytes are decoded with replacement and other objects are str()-ed, never raising."""
    shape = analyze(value)
    assert isinstance(shape, Shape)
    assert HEX16.fullmatch(shape.fingerprint)


def test_bytes_match_text() -> None:
    """A statement given as UTF-8 bytes has the fingerprint of the same text."""
    assert fp(b"SELECT 'x' FROM t") == fp("SELECT 'y' FROM t")  # type: ignore[arg-type]


def test_str_failure_never_raises() -> None:
    """An object whose str() raises still gets a shape."""

    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert analyze(Hostile()).operation == "OTHER"  # type: ignore[arg-type]


# ------------------------------------------------- statements compiled by real SQLAlchemy dialects

meta = sa.MetaData()
users = sa.Table(
    "users",
    meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(50)),
    sa.Column("age", sa.Integer),
)

_pg: Any = postgresql  # the psycopg and asyncpg dialect classes are not annotated
DIALECTS: dict[str, Callable[[], Dialect]] = {
    "sqlite-qmark": lambda: sqlite.pysqlite.dialect(),
    "sqlite-named": lambda: sqlite.pysqlite.dialect(paramstyle="named"),
    "psycopg-pyformat": lambda: _pg.psycopg.dialect(),
    "psycopg-format": lambda: _pg.psycopg.dialect(paramstyle="format"),
    "asyncpg-dollar": lambda: _pg.asyncpg.dialect(),
    "pymysql-pyformat": lambda: mysql.pymysql.dialect(),
    "pymysql-format": lambda: mysql.pymysql.dialect(paramstyle="format"),
}
PARAM_MARKERS = re.compile(r"%s|%\(|\$\d|(?<![:\w]):[a-z_]")


def compiled(statement: Any, dialect: Dialect, **kw: Any) -> str:
    return str(
        statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True, **kw})
    )


@pytest.fixture(params=sorted(DIALECTS))
def dialect(request: pytest.FixtureRequest) -> Dialect:
    """Each DBAPI paramstyle SQLAlchemy emits."""
    return DIALECTS[request.param]()


def test_dialect_select_in_lists_share_a_fingerprint(dialect: Dialect) -> None:
    """An expanding IN of any length compiles to one shape with no parameter markers left."""
    shapes = {
        analyze(compiled(sa.select(users).where(users.c.id.in_(list(range(n)))), dialect))
        for n in (1, 2, 5, 40)
    }
    assert len({s.fingerprint for s in shapes}) == 1
    (shape,) = {(s.normalized, s.operation, s.table) for s in shapes}
    assert not PARAM_MARKERS.search(shape[0]), shape[0]
    assert shape[1:] == ("SELECT", "users")


def test_dialect_literal_binds_share_a_fingerprint(dialect: Dialect) -> None:
    """Statements with values rendered inline share the shape of other values."""
    a = sa.select(users).where(users.c.name == "bob", users.c.age > 3, users.c.id.in_([1, 2]))
    b = sa.select(users).where(users.c.name == "o'neil", users.c.age > 70, users.c.id.in_([9]))
    assert fp(compiled(a, dialect, literal_binds=True)) == fp(
        compiled(b, dialect, literal_binds=True)
    )


@pytest.mark.parametrize(
    ("build", "operation"),
    [
        (lambda: users.insert().values(name="a", age=1), "INSERT"),
        (lambda: users.insert().values(name="a").returning(users.c.id), "INSERT"),
        (lambda: users.update().where(users.c.id == 5).values(age=2), "UPDATE"),
        (lambda: users.delete().where(users.c.age < 3), "DELETE"),
        (
            lambda: sa.text("SELECT * FROM users WHERE name = 'x' AND age > 3 AND id = :id"),
            "SELECT",
        ),
    ],
)
def test_dialect_dml(dialect: Dialect, build: Callable[[], Any], operation: str) -> None:
    """DML and text() statements from every dialect name their operation and table."""
    shape = analyze(compiled(build(), dialect))
    assert (shape.operation, shape.table) == (operation, "users")
    assert not PARAM_MARKERS.search(shape.normalized), shape.normalized
    assert "'" not in shape.normalized


def test_dialect_cte(dialect: Dialect) -> None:
    """A SELECT over a CTE is a SELECT whose values are normalized."""
    recent = sa.select(users.c.id).where(users.c.age > 60).cte("recent")
    stmt = sa.select(recent.c.id).where(recent.c.id > 10)
    shape = analyze(compiled(stmt, dialect))
    assert shape.normalized.startswith("WITH recent AS (SELECT")
    assert "60" not in shape.normalized and "10" not in shape.normalized
    assert (shape.operation, shape.table) == ("SELECT", "recent")


def test_dialect_multirow_values(dialect: Dialect) -> None:
    """A multi-row VALUES insert has the shape of any other row count."""
    one = users.insert().values([{"name": "a", "age": 1}])
    many = users.insert().values([{"name": str(i), "age": i} for i in range(7)])
    assert fp(compiled(one, dialect)) == fp(compiled(many, dialect))


# ------------------------------------------------------ statements captured from real drivers


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "fp_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    qty: Mapped[int] = mapped_column(default=0)


def _work(session: Session) -> None:
    for n in (3, 8):
        session.add_all([Item(name=f"n{i}", qty=i) for i in range(n)])
        session.flush()
    with session.begin_nested():
        session.add(Item(name="nested"))
    nested = session.begin_nested()
    session.add(Item(name="gone"))
    session.flush()
    nested.rollback()
    for ids in ([1, 2, 3], [1, 2, 3, 4, 5, 6]):
        session.execute(sa.select(Item).where(Item.id.in_(ids))).all()
    hot = sa.select(Item.id).where(Item.qty > 2).cte("hot")
    session.execute(sa.select(hot.c.id)).all()
    session.rollback()


@pytest.fixture
def capture() -> Iterator[Callable[[Engine], list[str]]]:
    """Attach a before_cursor_execute listener that records every statement sent."""
    attached: list[tuple[Engine, Callable[..., None]]] = []

    def start(engine: Engine) -> list[str]:
        seen: list[str] = []

        def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            seen.append(statement)

        event.listen(engine, "before_cursor_execute", listener)
        attached.append((engine, listener))
        return seen

    yield start
    for engine, listener in attached:
        event.remove(engine, "before_cursor_execute", listener)


def _check_captured(statements: list[str]) -> None:
    shapes = [analyze(s) for s in statements if "fp_items" in s or "SAVEPOINT" in s]
    by_op: dict[str, set[str]] = {}
    for shape in shapes:
        assert not PARAM_MARKERS.search(shape.normalized), shape.normalized
        by_op.setdefault(shape.operation, set()).add(shape.normalized)
    # Two batches of different sizes, the nested single insert: at most three INSERT shapes.
    inserts = {n for n in by_op["INSERT"] if "nested" not in n}
    assert 1 <= len(inserts) <= 2, inserts
    assert {s.table for s in shapes if s.operation == "INSERT"} == {"fp_items"}
    selects_in = {n for n in by_op["SELECT"] if " IN (" in n}
    assert len(selects_in) == 1, selects_in
    assert by_op["SAVEPOINT"] == {"SAVEPOINT ?"}
    assert by_op["RELEASE"] == {"RELEASE SAVEPOINT ?"}
    assert by_op["ROLLBACK"] == {"ROLLBACK TO SAVEPOINT ?"}
    assert any(n.startswith("WITH hot AS") for n in by_op["SELECT"])


def _run_sync(engine: Engine, capture: Callable[[Engine], list[str]]) -> list[str]:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    try:
        seen = capture(engine)
        with Session(engine) as session:
            _work(session)
        return seen
    finally:
        Base.metadata.drop_all(engine)


def test_captured_sqlite(sqlite_engine: Engine, capture: Callable[[Engine], list[str]]) -> None:
    """Real sqlite3 statements (qmark, savepoints, IN, CTE) normalize to stable shapes."""
    _check_captured(_run_sync(sqlite_engine, capture))


@pytest.mark.postgres
def test_captured_psycopg(pg_engine: Engine, capture: Callable[[Engine], list[str]]) -> None:
    """Real psycopg statements, insertmanyvalues sentinel batches included, share shapes."""
    seen = _run_sync(pg_engine, capture)
    _check_captured(seen)
    assert any("imp_sen" in s for s in seen)


@pytest.mark.mariadb
def test_captured_pymysql(mysql_engine: Engine, capture: Callable[[Engine], list[str]]) -> None:
    """Real pymysql statements, multi-row VALUES batches included, share shapes."""
    seen = _run_sync(mysql_engine, capture)
    _check_captured(seen)
    batches = [s for s in seen if s.count("), (") >= 2 and s.startswith("INSERT")]
    assert batches and len({fp(s) for s in batches}) == 1


@pytest.mark.postgres
async def test_captured_asyncpg(
    async_pg_engine: Any, pg_engine: Engine, capture: Callable[[Engine], list[str]]
) -> None:
    """Real asyncpg statements ($1 style) have the fingerprints psycopg's statements have."""
    async with async_pg_engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    try:
        seen = capture(async_pg_engine.sync_engine)
        from sqlalchemy.ext.asyncio import AsyncSession

        async with AsyncSession(async_pg_engine) as session:
            await session.run_sync(_work)
    finally:
        async with async_pg_engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
    _check_captured(seen)
    pg_seen = _run_sync(pg_engine, capture)
    ours = {fp(s) for s in seen if "fp_items" in s}
    theirs = {fp(s) for s in pg_seen if "fp_items" in s}
    assert ours == theirs


def test_internal_failure_never_exposes_the_raw_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """If normalization itself fails, the shape is a fixed placeholder, not the raw SQL."""
    from sqlprobe._core import _fingerprint

    def broken(text: str) -> tuple[str, str, int]:
        raise RuntimeError("bug")

    monkeypatch.setattr(_fingerprint, "_normalize", broken)
    shape = _fingerprint.analyze("SELECT 'secret-SENTINEL' FROM t")
    assert "SENTINEL" not in shape.normalized
    assert shape.normalized == _fingerprint.UNPARSED
    assert shape.operation == "OTHER"


def test_huge_statements_are_normalized_from_a_bounded_prefix() -> None:
    """Past NORMALIZE_LIMIT characters the tail is dropped: bounded cost, stable shape."""
    from sqlprobe._core._fingerprint import NORMALIZE_LIMIT

    def big(n: int) -> str:
        return "SELECT * FROM t WHERE id IN (" + ", ".join(str(i) for i in range(n)) + ")"

    a, b = analyze(big(300_000)), analyze(big(400_000))
    assert len(big(300_000)) > NORMALIZE_LIMIT
    assert a.fingerprint == b.fingerprint
    assert a.normalized.endswith("/* truncated */")
    assert a.operation == "SELECT"
    assert a.table == "t"


@pytest.mark.parametrize(
    "text",
    [
        "1",
        "x1",
        "1 + 2",
        "f(1,2)",
        "a.5",
        "$1 2",
        "c0_5 1e5 1.5e-3 .5 0x1F 0X1g",
        "users_1.id = 10 AND param_2 < 3.",
        "é1 ≥2 \u00a03",  # non-ASCII: the regular expression alone decides
        "",
    ],
)
def test_number_pass_matches_the_plain_regex(text: str) -> None:
    """The translated-shape number pass replaces exactly what the number regex does."""
    from sqlprobe._core._fingerprint import _NUMBERS, _replace_numbers

    assert _replace_numbers(text) == _NUMBERS.sub("?", text)


def test_number_pass_matches_the_plain_regex_on_random_text() -> None:
    """On 20,000 random strings of name, digit and punctuation characters, both agree."""
    import random

    from sqlprobe._core._fingerprint import _NUMBERS, _replace_numbers

    rnd = random.Random(20261125)
    alphabet = "ab_$1 0.9x,(e-+E)\n'?é"
    for _ in range(20_000):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 24)))
        assert _replace_numbers(text) == _NUMBERS.sub("?", text), repr(text)


@pytest.mark.parametrize(
    ("statement", "normalized", "table"),
    [
        ("SELECT İİ FROM t WHERE a IN (1, 2)", "SELECT İİ FROM t WHERE a IN (?)", "t"),
        ("SELECT İ, ARRAY[1, 2, 3] FROM t", "SELECT İ, ARRAY[?] FROM t", "t"),
        ("SELECT x AS İİİ FROM t WHERE (a, b) IN ((1, 2), (3, 4))", None, "t"),
        ("INSERT INTO İ VALUES (1, 2), (3, 4)", "INSERT INTO İ VALUES (?, ?)", "İ"),
    ],
)
def test_a_character_that_lowercases_to_two_shifts_no_keyword(
    statement: str, normalized: str | None, table: str
) -> None:
    """Text with İ (U+0130, two characters lowercased) collapses lists and finds tables."""
    shape = analyze(statement)
    if normalized is not None:
        assert shape.normalized == normalized
    else:
        assert shape.normalized.endswith("IN ((?, ?))")
    assert shape.table == table
