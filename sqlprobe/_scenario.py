"""The demo's application: users with orders, articles and shipments.

A small but typical SQLAlchemy ORM model, used by ``sqlprobe demo`` and by the
loading-strategy comparison. ``User.orders`` loads lazily (the default, and the
classic source of N+1 queries); ``User.articles`` is ``write_only`` (a collection too
large to load whole, queried explicitly). ``Shipment.tracking_number`` is the classic
missing index: looked up on every tracking page, declared without ``index=True``, so
each lookup reads the whole table (the demo's slow query, which index advice fixes).
Every column type is portable across SQLite, PostgreSQL and MySQL/MariaDB.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from sqlalchemy import ForeignKey, Numeric, String, func, insert, select, text, update
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    WriteOnlyMapped,
    mapped_column,
    relationship,
)

__all__ = [
    "SHIPMENTS",
    "Article",
    "Base",
    "Order",
    "Shipment",
    "User",
    "seed",
    "seed_shipments",
    "track_shipment",
    "tracking_number",
]

PRODUCTS = ("keyboard", "monitor", "mouse", "laptop", "headset", "webcam", "dock", "cable")


class Base(DeclarativeBase):
    """Declarative base of the demo schema."""


class User(Base):
    __tablename__ = "sqlprobe_demo_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    email: Mapped[str] = mapped_column(String(120), unique=True)
    active: Mapped[bool] = mapped_column(default=True)

    orders: Mapped[list[Order]] = relationship(back_populates="user", lazy="select")
    articles: WriteOnlyMapped[Article] = relationship(back_populates="author")

    def __repr__(self) -> str:
        return f"User(id={self.id}, name={self.name!r})"


class Order(Base):
    __tablename__ = "sqlprobe_demo_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("sqlprobe_demo_users.id"), index=True)
    product_name: Mapped[str] = mapped_column(String(100))
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    created_at: Mapped[datetime] = mapped_column()

    user: Mapped[User] = relationship(back_populates="orders")


class Article(Base):
    __tablename__ = "sqlprobe_demo_articles"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    author_id: Mapped[int] = mapped_column(ForeignKey("sqlprobe_demo_users.id"), index=True)

    author: Mapped[User] = relationship(back_populates="articles")


class Shipment(Base):
    __tablename__ = "sqlprobe_demo_shipments"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("sqlprobe_demo_orders.id"), index=True)
    # Looked up by the tracking page, yet not indexed: the demo's missing index.
    tracking_number: Mapped[str] = mapped_column(String(24))
    carrier: Mapped[str] = mapped_column(String(20))
    shipped_at: Mapped[datetime] = mapped_column()


def seed(
    session: Session,
    *,
    users: int = 50,
    orders_per_user: int = 5,
    articles_per_user: int = 2,
    rng: random.Random | None = None,
) -> None:
    """Insert a deterministic data set (same ``rng`` seed, same rows) and commit."""
    rng = rng or random.Random(42)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc).replace(tzinfo=None)
    people = [User(name=f"user{i}", email=f"user{i}@example.test") for i in range(users)]
    session.add_all(people)
    session.flush()
    for person in people:
        for _ in range(orders_per_user):
            session.add(
                Order(
                    user_id=person.id,
                    product_name=rng.choice(PRODUCTS),
                    amount=Decimal(rng.randint(100, 100_000)) / 100,
                    created_at=now - timedelta(days=rng.randint(0, 90)),
                )
            )
        for j in range(articles_per_user):
            session.add(Article(title=f"Notes {j} by {person.name}", author_id=person.id))
    session.commit()


def user_statistics(session: Session) -> list[tuple[int, str, int, Decimal | None]]:
    """Orders and money spent per user: one aggregate query with an outer join."""
    rows = session.execute(
        select(User.id, User.name, func.count(Order.id), func.sum(Order.amount))
        .outerjoin(Order)
        .group_by(User.id, User.name)
        .order_by(User.id)
    ).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def deactivate_idle_users(session: Session, since: datetime) -> int:
    """A bulk UPDATE: users with no order since ``since`` become inactive."""
    recent = select(Order.user_id).where(Order.created_at > since)
    result = session.execute(update(User).where(User.id.not_in(recent)).values(active=False))
    session.commit()
    return int(getattr(result, "rowcount", 0) or 0)


CARRIERS = ("ups", "dhl", "fedex", "usps", "dpd", "gls")


def tracking_number(n: int) -> str:
    """The ``n``-th shipment's tracking number (distinct per shipment, not sequential)."""
    return f"1Z{(n * 7_919) % 1_000_003:07d}{n % 97:02d}"


#: Shipments `seed_shipments` inserts by default.
SHIPMENTS = 20_000


#: Rows per INSERT of `seed_shipments`: each is a few milliseconds, never a slow query.
SEED_BATCH = 2_000

#: SQLite generates the rows itself: 20 000 of them in some tens of milliseconds, where
#: binding them one by one from Python takes over a second. The same values as
#: `tracking_number` and `CARRIERS` (``printf`` formats like Python's ``%07d``).
_SQLITE_SHIPMENTS = """
INSERT INTO sqlprobe_demo_shipments (order_id, tracking_number, carrier, shipped_at)
WITH RECURSIVE n(i) AS (SELECT :first UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :stop)
SELECT :min_id + i % :orders,
       printf('1Z%07d%02d', (i * 7919) % 1000003, i % 97),
       CASE i % 6 WHEN 0 THEN 'ups' WHEN 1 THEN 'dhl' WHEN 2 THEN 'fedex'
                  WHEN 3 THEN 'usps' WHEN 4 THEN 'dpd' ELSE 'gls' END,
       datetime('2026-01-01', '+' || i || ' minutes') || '.000000'
FROM n
"""


def seed_shipments(session: Session, *, shipments: int = SHIPMENTS) -> None:
    """Insert ``shipments`` parcels for the existing orders, `SEED_BATCH` per INSERT; commit.

    On SQLite the database generates the rows (`_SQLITE_SHIPMENTS`); elsewhere they are
    bound from Python in Core executemany INSERTs (no ORM object per row).
    """
    orders = list(session.scalars(select(Order.id).order_by(Order.id)))
    if not orders:
        return
    connection = session.connection()
    if connection.dialect.name == "sqlite" and orders == list(range(orders[0], orders[-1] + 1)):
        for first in range(0, shipments, SEED_BATCH):
            connection.execute(
                text(_SQLITE_SHIPMENTS),
                {
                    "first": first,
                    "stop": min(first + SEED_BATCH, shipments),
                    "min_id": orders[0],
                    "orders": len(orders),
                },
            )
        session.commit()
        return
    start = datetime(2026, 1, 1)
    rows = [
        {
            "order_id": orders[n % len(orders)],
            "tracking_number": tracking_number(n),
            "carrier": CARRIERS[n % len(CARRIERS)],
            "shipped_at": start + timedelta(minutes=n),
        }
        for n in range(shipments)
    ]
    table = Base.metadata.tables[Shipment.__tablename__]
    for first in range(0, len(rows), SEED_BATCH):
        connection.execute(insert(table), rows[first : first + SEED_BATCH])
    session.commit()


def track_shipment(session: Session, number: str) -> tuple[int, str] | None:
    """The tracking page: one shipment by its tracking number (a full scan without an index)."""
    row = session.execute(
        select(Shipment.id, Shipment.carrier).where(Shipment.tracking_number == number)
    ).one_or_none()
    return (row[0], row[1]) if row is not None else None
