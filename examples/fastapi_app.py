"""A FastAPI application with sqlprobe: metrics, a scope per request, N+1 detection.

Run it (needs ``pip install fastapi uvicorn``)::

    uvicorn examples.fastapi_app:create_app --factory
    curl localhost:8000/users          # an N+1: watch the n_plus_one warning
    curl localhost:8000/users/eager    # the same data in two statements
    curl localhost:8000/metrics        # sqlprobe_n_plus_one_total and friends

or ``python examples/fastapi_app.py`` to send those requests in-process (no server) and
print what sqlprobe logged.

The N+1 event names the request's route (``GET /users``, ``GET /orders/recent/{limit}``)
as its ``scope``, the relationship (``User.orders``) and the fix
(``selectinload(User.orders)``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import ForeignKey, String, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)
from sqlalchemy.pool import StaticPool

import sqlprobe
from sqlprobe.middleware import SqlprobeASGIMiddleware


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    orders: Mapped[list[Order]] = relationship(back_populates="user")  # lazy="select"


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    product: Mapped[str] = mapped_column(String(50))
    user: Mapped[User] = relationship(back_populates="orders")


def make_engine(url: str = "sqlite://", users: int = 20) -> Engine:
    """An engine with the schema and ``users`` users of 3 orders each."""
    options: dict[str, Any] = {}
    if url == "sqlite://":  # one shared in-memory database for every thread
        options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    engine = create_engine(url, **options)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            User(name=f"user{i}", orders=[Order(product=f"item{j}") for j in range(3)])
            for i in range(users)
        )
        session.commit()
    return engine


def create_app(engine: Engine | None = None, **attach_options: Any) -> FastAPI:
    """The application; ``attach_options`` go to ``sqlprobe.attach`` (registry, logger...)."""
    engine = engine or make_engine()
    sqlprobe.attach(engine, **attach_options)

    app = FastAPI()
    app.add_middleware(SqlprobeASGIMiddleware)
    registry = attach_options.get("registry") or REGISTRY

    # A route, not app.mount("/metrics", make_asgi_app()): a mount answers /metrics with
    # a 307 redirect to /metrics/, which curl and some scrapers do not follow.
    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/users")
    def users() -> list[dict[str, Any]]:
        # One SELECT for the users, then one per user for its orders: an N+1.
        with Session(engine) as session:
            return [
                {"name": u.name, "orders": len(u.orders)}
                for u in session.scalars(select(User).order_by(User.id))
            ]

    @app.get("/users/eager")
    def users_eager() -> list[dict[str, Any]]:
        with Session(engine) as session:
            query = select(User).order_by(User.id).options(selectinload(User.orders))
            return [{"name": u.name, "orders": len(u.orders)} for u in session.scalars(query)]

    @app.get("/orders/recent/{limit}")
    async def recent_orders(limit: int) -> list[dict[str, Any]]:
        # Each order's user loaded on its own: an N+1 on the many-to-one Order.user.
        with Session(engine) as session:
            orders = session.scalars(select(Order).where(Order.id % 3 == 0).limit(limit))
            return [{"product": o.product, "user": o.user.name} for o in orders]

    return app


def main() -> None:
    """Send a few requests in-process and print sqlprobe's N+1 events."""
    import asyncio

    import httpx
    import structlog
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    app = create_app(registry=registry, logger=structlog.get_logger("sqlprobe"))

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for path in ("/users", "/users/eager", "/orders/recent/10"):
                response = await client.get(path)
                print(path, response.status_code)
            metrics = (await client.get("/metrics")).text
        print(*(line for line in metrics.splitlines() if "n_plus_one_total{" in line), sep="\n")

    asyncio.run(run())


if __name__ == "__main__":
    main()
