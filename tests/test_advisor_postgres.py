"""Index advice on PostgreSQL: a corpus of slow shapes on 100k+ row tables, proven with hypopg.

Each suggested index is then created for real (with the advice's own DDL) and the
statement's execution time (EXPLAIN ANALYZE, best of three) must fall at least 10x.
"""

from __future__ import annotations

import datetime
import decimal
import json
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from sqlalchemy import ForeignKey, create_engine, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlprobe._analysis._advisor import IndexAdvice, SchemaCache, advise, analyse
from sqlprobe._analysis._advisor_core import _session
from sqlprobe._core._fingerprint import analyze

from .conftest import PG_URL, _need

pytestmark = pytest.mark.postgres


class Base(DeclarativeBase):
    pass


class AdvUser(Base):
    __tablename__ = "adv_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(unique=True)
    name: Mapped[str]
    active: Mapped[bool]


class AdvOrder(Base):
    __tablename__ = "adv_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("adv_users.id"))
    status: Mapped[int]
    product_id: Mapped[int]
    shop_id: Mapped[int]
    region: Mapped[int]
    category: Mapped[int]
    created_at: Mapped[datetime.datetime]


class AdvInvoice(Base):
    __tablename__ = "adv_invoices"
    __table_args__: ClassVar[dict[str, str]] = {"schema": "adv_schema"}
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[int] = mapped_column("customer_id")


_SETUP = """
DROP SCHEMA IF EXISTS adv_schema CASCADE;
DROP TABLE IF EXISTS adv_items, adv_orders, adv_users, adv_events, adv_tiny CASCADE;
CREATE EXTENSION IF NOT EXISTS hypopg;
CREATE TABLE adv_users (
    id serial PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL,
    active boolean NOT NULL);
INSERT INTO adv_users (email, name, active)
    SELECT 'user' || i || '@example.org', 'name' || i, mod(i, 2) = 0
    FROM generate_series(1, 100000) i;
CREATE TABLE adv_orders (
    id serial PRIMARY KEY, user_id int NOT NULL REFERENCES adv_users (id),
    status int NOT NULL, product_id int NOT NULL, shop_id int NOT NULL,
    region int NOT NULL, category int NOT NULL, amount numeric(10, 2) NOT NULL,
    created_at timestamptz NOT NULL);
INSERT INTO adv_orders (user_id, status, product_id, shop_id, region, category, amount, created_at)
    SELECT 1 + mod(i * 7, 100000), mod(i, 5), mod(i * 31, 10007), mod(i * 13, 1009),
           mod(i, 97), mod(i / 97, 89), mod(i * 7919, 100000) / 100.0,
           timestamptz '2026-01-01' + i * interval '1 minute'
    FROM generate_series(1, 200000) i;
CREATE TABLE adv_items (
    id serial PRIMARY KEY, order_id int NOT NULL REFERENCES adv_orders (id),
    sku text NOT NULL, qty int NOT NULL);
INSERT INTO adv_items (order_id, sku, qty)
    SELECT 1 + mod(i * 3, 200000), 'sku-' || mod(i * 17, 50021), 1 + mod(i, 4)
    FROM generate_series(1, 200000) i;
CREATE TABLE adv_events (
    id serial PRIMARY KEY, device_id int NOT NULL, ts timestamptz NOT NULL, kind int NOT NULL);
INSERT INTO adv_events (device_id, ts, kind)
    SELECT mod(i, 2003), timestamptz '2026-01-01' + i * interval '1 second', mod(i, 3)
    FROM generate_series(1, 200000) i;
CREATE TABLE adv_tiny (id serial PRIMARY KEY, code text NOT NULL);
INSERT INTO adv_tiny (code) SELECT 'code' || i FROM generate_series(1, 50) i;
CREATE SCHEMA adv_schema;
CREATE TABLE adv_schema.adv_invoices (id serial PRIMARY KEY, customer_id int NOT NULL);
INSERT INTO adv_schema.adv_invoices (customer_id)
    SELECT mod(i * 11, 20011) FROM generate_series(1, 100000) i;
-- Statistics of every row, not of a random 30,000-row sample: the planner's estimates,
-- and with them the advice, are then the same in every run.
SET default_statistics_target = 1000;
ANALYZE adv_users, adv_orders, adv_items, adv_events, adv_tiny, adv_schema.adv_invoices;
RESET default_statistics_target;
"""

_TEARDOWN = """
DROP SCHEMA IF EXISTS adv_schema CASCADE;
DROP TABLE IF EXISTS adv_items, adv_orders, adv_users, adv_events, adv_tiny CASCADE;
"""


def _script(connection: Connection, script: str) -> None:
    dbapi = connection.connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    try:
        cursor.execute(script)
    finally:
        cursor.close()


@pytest.fixture(scope="module")
def corpus() -> Iterator[Engine]:
    """The corpus tables, created once for the module (8-12 s here), dropped afterwards."""
    _need(5432, "PostgreSQL")
    engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        _script(connection, _SETUP)
    yield engine
    with engine.connect() as connection:
        _script(connection, _TEARDOWN)
    engine.dispose()


@pytest.fixture
def conn(corpus: Engine) -> Iterator[Connection]:
    """A connection of the advisor's own."""
    with corpus.connect() as connection:
        yield connection


def _collation_ops(connection: Connection) -> dict[str, str]:
    collate = connection.exec_driver_sql(
        "SELECT datcollate FROM pg_database WHERE datname = current_database()"
    ).scalar()
    return {} if collate in ("C", "POSIX") else {"name": "text_pattern_ops"}


T0 = datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc)

# (id, statement, parameters, table, columns)
SHAPES: list[tuple[str, str, dict[str, Any], str, tuple[str, ...]]] = [
    (
        "equality",
        "SELECT * FROM adv_orders WHERE adv_orders.product_id = %(p)s",
        {"p": 42},
        "adv_orders",
        ("product_id",),
    ),
    (
        "range",
        "SELECT * FROM adv_events WHERE adv_events.ts >= %(a)s AND adv_events.ts < %(b)s",
        {"a": T0, "b": T0 + datetime.timedelta(seconds=30)},
        "adv_events",
        ("ts",),
    ),
    (
        "equality_order_by",
        "SELECT * FROM adv_orders WHERE shop_id = %(s)s ORDER BY created_at DESC LIMIT 10",
        {"s": 7},
        "adv_orders",
        ("shop_id", "created_at"),
    ),
    (
        "join_key",
        "SELECT u.email, o.amount FROM adv_users AS u JOIN adv_orders AS o"
        " ON o.user_id = u.id WHERE u.email = %(e)s",
        {"e": "user77@example.org"},
        "adv_orders",
        ("user_id",),
    ),
    (
        "two_equalities",
        "SELECT * FROM adv_orders WHERE region = %(r)s AND category = %(c)s",
        {"r": 5, "c": 11},
        "adv_orders",
        ("region", "category"),
    ),
    (
        "foreign_key",
        "SELECT * FROM adv_items WHERE adv_items.order_id = %(o)s",
        {"o": 1234},
        "adv_items",
        ("order_id",),
    ),
    (
        "like_prefix",
        "SELECT * FROM adv_users WHERE adv_users.name LIKE %(p)s",
        {"p": "name4242%"},
        "adv_users",
        ("name",),
    ),
    (
        "in_list",
        "SELECT * FROM adv_items WHERE sku IN (%(a)s, %(b)s, %(c)s)",
        {"a": "sku-1", "b": "sku-2", "c": "sku-3"},
        "adv_items",
        ("sku",),
    ),
    (
        "between",
        "SELECT id FROM adv_orders WHERE amount BETWEEN %(lo)s AND %(hi)s",
        {"lo": decimal.Decimal("10.00"), "hi": decimal.Decimal("10.04")},
        "adv_orders",
        ("amount",),
    ),
    (
        "equality_range",
        "SELECT * FROM adv_events WHERE device_id = %(d)s AND ts > %(t)s",
        {"d": 5, "t": T0 + datetime.timedelta(hours=12)},
        "adv_events",
        ("device_id", "ts"),
    ),
    (
        "schema_qualified",
        "SELECT * FROM adv_schema.adv_invoices WHERE customer_id = %(c)s",
        {"c": 99},
        "adv_schema.adv_invoices",
        ("customer_id",),
    ),
    (
        "cte",
        "WITH mine AS (SELECT * FROM adv_orders WHERE user_id = %(u)s) SELECT count(*) FROM mine",
        {"u": 321},
        "adv_orders",
        ("user_id",),
    ),
]


def _execution_ms(connection: Connection, statement: str, parameters: Any) -> float:
    """The best of three server-side execution times (EXPLAIN ANALYZE), in ms."""
    best = float("inf")
    for _ in range(3):
        dbapi = connection.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        try:
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
            raw = cursor.fetchone()[0]
        finally:
            cursor.close()
        plan = json.loads(raw) if isinstance(raw, str) else raw
        best = min(best, float(plan[0]["Execution Time"]))
    return best


@pytest.mark.parametrize(
    ("statement", "parameters", "table", "columns"),
    [s[1:] for s in SHAPES],
    ids=[s[0] for s in SHAPES],
)
def test_corpus_shape_gets_its_index_and_it_is_10x_faster(
    conn: Connection,
    statement: str,
    parameters: dict[str, Any],
    table: str,
    columns: tuple[str, ...],
) -> None:
    """Each slow shape gets the right index, proven by hypopg, and applying it is 10x faster."""
    result = analyse(conn, statement, parameters, statement_timeout=5.0, schema_cache=SchemaCache())
    assert [(a.table, a.columns) for a in result.advice] == [(table, columns)], result.notes
    advice = result.advice[0]
    assert advice.proven is True and advice.proof == "hypopg"
    assert advice.cost_before is not None and advice.cost_after is not None
    assert advice.cost_before / advice.cost_after >= 10.0
    assert advice.fingerprint == analyze(statement).fingerprint
    assert advice.statement == analyze(statement).normalized
    assert advice.ddl.startswith(f"CREATE INDEX CONCURRENTLY {advice.name} ON {table} (")

    before = _execution_ms(conn, statement, parameters)
    conn.exec_driver_sql(advice.ddl)
    try:
        conn.exec_driver_sql(f"ANALYZE {table}")
        after = _execution_ms(conn, statement, parameters)
    finally:
        conn.exec_driver_sql(
            f"DROP INDEX {table.rsplit('.', 1)[0] + '.' if '.' in table else ''}{advice.name}"
        )
    print(
        f"{table} {columns}: cost {advice.cost_before:.1f} -> {advice.cost_after:.1f},"
        f" execution {before:.3f} ms -> {after:.3f} ms ({before / after:.0f}x)"
    )
    assert before / after >= 10.0, (before, after)


def test_like_prefix_uses_pattern_ops_unless_the_collation_is_c(conn: Connection) -> None:
    """A LIKE 'prefix%' index carries text_pattern_ops under a non-C collation."""
    statement = "SELECT * FROM adv_users WHERE name LIKE %(p)s"
    (advice,) = analyse(conn, statement, {"p": "name4242%"}, registries=[Base.registry]).advice
    ops = _collation_ops(conn)
    assert advice.opclasses == ops
    if ops:
        assert advice.ddl.endswith("(name text_pattern_ops)")
        assert 'postgresql_ops={"name": "text_pattern_ops"}' in advice.alembic
        assert advice.model_change == (
            'Index("ix_adv_users_name", AdvUser.name, postgresql_ops={"name": "text_pattern_ops"})'
        )


@pytest.mark.parametrize(
    ("statement", "parameters", "why"),
    [
        ("SELECT * FROM adv_users WHERE email = %(e)s", {"e": "user5@example.org"}, "index"),
        ("SELECT * FROM adv_users WHERE active = %(a)s", {"a": True}, "selective"),
        ("SELECT * FROM adv_orders WHERE status = %(s)s", {"s": 3}, "selective"),
        ("SELECT * FROM adv_tiny WHERE code = %(c)s", {"c": "code7"}, "rows"),
        ("SELECT * FROM adv_users WHERE name LIKE %(p)s", {"p": "%4242"}, "predicate"),
        ("SELECT * FROM adv_users WHERE name LIKE 'abc%%' OR id = 3", None, "predicate"),
    ],
    ids=["already_indexed", "boolean", "few_values", "tiny_table", "leading_wildcard", "or"],
)
def test_no_suggestion(conn: Connection, statement: str, parameters: Any, why: str) -> None:
    """Indexed, boolean, few-valued, tiny-table and leading-wildcard statements get none."""
    result = analyse(conn, statement, parameters)
    assert result.advice == []
    assert any(why in note for note in result.notes), result.notes


def test_orm_models_single_composite_and_schema_qualified(conn: Connection) -> None:
    """The mapped attribute, the model change and the Alembic operation name the ORM model."""
    reg = [Base.registry]
    (single,) = analyse(
        conn, "SELECT * FROM adv_orders WHERE product_id = %(p)s", {"p": 1}, registries=reg
    ).advice
    assert single.model == "AdvOrder.product_id"
    assert single.model_change == "mapped_column(..., index=True)"
    assert single.alembic == (
        'op.create_index("ix_adv_orders_product_id", "adv_orders", ["product_id"],'
        " postgresql_concurrently=True)"
    )
    (composite,) = analyse(
        conn,
        "SELECT * FROM adv_orders WHERE region = %(r)s AND category = %(c)s",
        {"r": 1, "c": 2},
        registries=reg,
    ).advice
    assert composite.model == "AdvOrder.region, AdvOrder.category"
    assert composite.model_change == (
        'Index("ix_adv_orders_region_category", AdvOrder.region, AdvOrder.category)'
    )
    assert composite.alembic == (
        'op.create_index("ix_adv_orders_region_category", "adv_orders",'
        ' ["region", "category"], postgresql_concurrently=True)'
    )
    (qualified,) = analyse(
        conn, "SELECT * FROM adv_schema.adv_invoices WHERE customer_id = 5", None, registries=reg
    ).advice
    assert qualified.table == "adv_schema.adv_invoices"
    assert qualified.model == "AdvInvoice.customer"
    assert qualified.ddl == (
        "CREATE INDEX CONCURRENTLY ix_adv_invoices_customer_id"
        " ON adv_schema.adv_invoices (customer_id)"
    )
    assert qualified.alembic == (
        'op.create_index("ix_adv_invoices_customer_id", "adv_invoices", ["customer_id"],'
        ' schema="adv_schema", postgresql_concurrently=True)'
    )


def test_models_are_found_through_every_registry_by_default(conn: Connection) -> None:
    """Without registries=, the mapper is found among all SQLAlchemy registries."""
    (advice,) = analyse(conn, "SELECT * FROM adv_items WHERE order_id = 7").advice
    assert advice.model is None  # adv_items has no mapped class
    (mapped,) = analyse(conn, "SELECT * FROM adv_orders WHERE user_id = 7").advice
    assert mapped.model == "AdvOrder.user_id"


def test_an_existing_index_on_the_leading_columns_is_never_suggested_again(
    conn: Connection,
) -> None:
    """After the index exists, the same statement gets no suggestion (cache expired)."""
    statement = "SELECT * FROM adv_items WHERE qty = 3 AND order_id = %(o)s"
    (advice,) = analyse(conn, statement, {"o": 5}).advice
    assert advice.columns == ("order_id",)
    conn.exec_driver_sql("CREATE INDEX adv_items_order_qty ON adv_items (order_id, qty)")
    try:
        result = analyse(conn, statement, {"o": 5}, schema_cache=SchemaCache())
        assert result.advice == []
        assert result.notes
    finally:
        conn.exec_driver_sql("DROP INDEX adv_items_order_qty")


def test_normalized_statement_is_advised_with_a_generic_plan(conn: Connection) -> None:
    """A /metrics text with ? placeholders is planned generically (PREPARE) and advised."""
    result = analyse(conn, "SELECT * FROM adv_items WHERE order_id = ? LIMIT ?", None)
    assert [a.columns for a in result.advice] == [("order_id",)]
    assert result.advice[0].proven
    left = conn.exec_driver_sql(
        "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'sqlprobe_advise_%%'"
    ).scalar()
    assert left == 0


def test_without_hypopg_advice_comes_from_plan_and_statistics(conn: Connection) -> None:
    """hypopg=False: a Seq Scan with a selective filter gives unproven advice; few values none."""
    (advice,) = analyse(
        conn, "SELECT * FROM adv_orders WHERE product_id = %(p)s", {"p": 3}, hypopg=False
    ).advice
    assert advice.columns == ("product_id",)
    assert advice.proven is False and advice.proof == "statistics"
    assert advice.cost_before is not None and advice.cost_after is None
    # status: 5 values over 200,000 rows (region, 97 values, sits at the 1 % line and
    # flips with ANALYZE's sample).
    none = analyse(conn, "SELECT * FROM adv_orders WHERE status = %(s)s", {"s": 3}, hypopg=False)
    assert none.advice == []


def test_session_sets_and_undoes_the_statement_timeout(conn: Connection) -> None:
    """The advisor's statement_timeout holds inside an analysis and is gone after it."""
    default = conn.exec_driver_sql("SHOW statement_timeout").scalar()
    conn.rollback()
    with _session(conn, "postgresql", 1.5):
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "1500ms"
    assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == default


def test_hypothetical_indexes_never_become_real(conn: Connection) -> None:
    """After an analysis, no index was created and no hypothetical index is left."""
    count = "SELECT count(*) FROM pg_indexes WHERE tablename = 'adv_orders'"
    indexes = conn.exec_driver_sql(count).scalar()
    assert [a.columns for a in advise(conn, "SELECT * FROM adv_orders WHERE product_id = 9")] == [
        ("product_id",)
    ]
    assert conn.exec_driver_sql(count).scalar() == indexes
    assert conn.execute(text("SELECT count(*) FROM hypopg_list_indexes")).scalar() == 0


def test_advice_type_is_complete(conn: Connection) -> None:
    """IndexAdvice carries statement, fingerprint, dialect, source and improvement."""
    (advice,) = analyse(
        conn, "SELECT * FROM adv_orders WHERE product_id = 9", source="app.py:3 in view"
    ).advice
    assert isinstance(advice, IndexAdvice)
    assert advice.dialect == "postgresql" and advice.source == "app.py:3 in view"
    assert advice.statement == "SELECT * FROM adv_orders WHERE product_id = ?"
    assert advice.improvement is not None and advice.improvement >= 10


def test_advise_cli_on_metrics_uses_generic_plans(corpus: Engine) -> None:
    """`sqlprobe advise --metrics-url` on PostgreSQL proves ? statements with generic plans."""
    import io

    from sqlprobe._advise_cli import main

    from .test_advisor_cli import serve

    url, server = serve(
        [
            ("f1", "SELECT", "SELECT * FROM adv_orders WHERE adv_orders.product_id = ?", 5.0),
            ("f2", "SELECT", "SELECT * FROM adv_users WHERE adv_users.name LIKE ?", 4.0),
            ("f3", "SELECT", "SELECT * FROM adv_items WHERE order_id IN (?::INTEGER)", 3.0),
        ]
    )
    out = io.StringIO()
    try:
        assert main(["--url", PG_URL, "--metrics-url", url, "--verbose"], out=out) == 0
    finally:
        server.shutdown()  # type: ignore[attr-defined]
    text = out.getvalue()
    assert "adv_orders (product_id): proven with hypopg: cost" in text
    assert "CREATE INDEX CONCURRENTLY ix_adv_orders_product_id ON adv_orders" in text
    assert "adv_items (order_id): proven with hypopg" in text  # the ?::INTEGER cast
    assert "2 index suggestion(s) for 3 statement(s)." in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_a_failing_explain_leaves_no_session_state(conn: Connection) -> None:
    """A statement whose EXPLAIN fails raises; no prepared statement or setting is left."""
    from sqlalchemy.exc import DBAPIError

    conn.exec_driver_sql(
        "CREATE FUNCTION adv_fails(int) RETURNS int AS 'SELECT 1 / 0' LANGUAGE sql IMMUTABLE"
    )
    try:
        mode = conn.exec_driver_sql("SHOW plan_cache_mode").scalar()
        with pytest.raises(DBAPIError):
            analyse(
                conn,
                "SELECT * FROM adv_orders WHERE product_id = ? AND adv_fails(1) = ?",
                statement_timeout=2.0,
            )
        assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == mode
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "0"
        prepared = "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'sqlprobe%%'"
        assert conn.exec_driver_sql(prepared).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM hypopg_list_indexes")).scalar() == 0
    finally:
        conn.exec_driver_sql("DROP FUNCTION adv_fails(int)")


def test_worker_on_postgresql_reports_proven_advice(corpus: Engine) -> None:
    """IndexAdvisor on PostgreSQL: a submitted slow statement comes back as proven advice."""
    import threading

    from sqlprobe._analysis._advisor import IndexAdvisor

    got: list[IndexAdvice] = []
    done = threading.Event()

    def on_advice(advice: IndexAdvice) -> None:
        got.append(advice)
        done.set()

    advisor = IndexAdvisor(corpus.connect, "postgresql", on_advice=on_advice, contain=print)
    try:
        statement = "SELECT * FROM adv_items WHERE adv_items.order_id = %(o)s"
        assert advisor.submit(statement, {"o": 3}, analyze(statement).fingerprint, "a.py:1")
        assert done.wait(30)
    finally:
        advisor.close()
    assert [(a.columns, a.proven, a.source) for a in got] == [(("order_id",), True, "a.py:1")]


def test_install_hypopg_uses_the_extension_and_leaves_nothing(corpus: Engine) -> None:
    """Without the extension: unproven advice; install_hypopg=True proves it, nothing remains."""
    from sqlalchemy.engine import make_url

    with corpus.connect() as admin:
        admin.exec_driver_sql("DROP DATABASE IF EXISTS adv_nohypo")
        admin.exec_driver_sql("CREATE DATABASE adv_nohypo")
    engine = create_engine(make_url(PG_URL).set(database="adv_nohypo"))
    try:
        with engine.begin() as c:
            c.exec_driver_sql("CREATE TABLE adv_t (id serial PRIMARY KEY, k int NOT NULL)")
            c.exec_driver_sql(
                "INSERT INTO adv_t (k) SELECT mod(i * 7, 20011) FROM generate_series(1, 50000) i"
            )
            c.exec_driver_sql("ANALYZE adv_t")
        statement = "SELECT * FROM adv_t WHERE k = 5"
        with engine.connect() as c:
            (plain,) = analyse(c, statement).advice
            assert (plain.columns, plain.proven, plain.proof) == (("k",), False, "statistics")
            result = analyse(c, statement)
            assert any("hypopg is not installed" in note for note in result.notes)
            (proven,) = analyse(c, statement, install_hypopg=True).advice
            assert (proven.columns, proven.proven, proven.proof) == (("k",), True, "hypopg")
            installed = "SELECT count(*) FROM pg_extension WHERE extname = 'hypopg'"
            assert c.exec_driver_sql(installed).scalar() == 0
    finally:
        engine.dispose()
        with corpus.connect() as admin:
            admin.exec_driver_sql("DROP DATABASE IF EXISTS adv_nohypo")
