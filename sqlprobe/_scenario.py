"""The demo's application: users with orders and articles.

A small but typical SQLAlchemy ORM model, used by ``sqlprobe demo`` and by the
loading-strategy comparison. ``User.orders`` loads lazily (the default, and the
classic source of N+1 queries); ``User.articles`` is ``write_only`` (a collection too
large to load whole, queried explicitly). Every column type is portable across
SQLite, PostgreSQL and MySQL/MariaDB.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from sqlalchemy import ForeignKey, Numeric, String, func, select, update
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    WriteOnlyMapped,
    mapped_column,
    relationship,
)

__all__ = ["Article", "Base", "Order", "User", "seed"]

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
