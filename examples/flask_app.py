"""A Flask application with sqlprobe: metrics, a scope per request, N+1 detection.

Run it::

    flask --app examples.flask_app:create_app run
    curl localhost:5000/users          # an N+1: watch the n_plus_one warning
    curl localhost:5000/users/eager    # the same data in two statements
    curl localhost:5000/metrics

or ``python examples/flask_app.py`` to send those requests in-process (Flask's test
client, no server) and print what sqlprobe logged.

The N+1 event names the request's route (``GET /users``,
``GET /orders/recent/<int:limit>``) as its ``scope``, the relationship and the fix.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
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
from sqlprobe.middleware import SqlprobeWSGIMiddleware


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


def create_app(engine: Engine | None = None, **attach_options: Any) -> Flask:
    """The application; ``attach_options`` go to ``sqlprobe.attach`` (registry, logger...)."""
    engine = engine or make_engine()
    sqlprobe.attach(engine, **attach_options)
    registry = attach_options.get("registry") or REGISTRY

    app = Flask(__name__)
    app.wsgi_app = SqlprobeWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]

    @app.get("/users")
    def users() -> ResponseReturnValue:
        # One SELECT for the users, then one per user for its orders: an N+1.
        with Session(engine) as session:
            query = select(User).order_by(User.id)
            return jsonify(
                [{"name": u.name, "orders": len(u.orders)} for u in session.scalars(query)]
            )

    @app.get("/users/eager")
    def users_eager() -> ResponseReturnValue:
        with Session(engine) as session:
            query = select(User).order_by(User.id).options(selectinload(User.orders))
            return jsonify(
                [{"name": u.name, "orders": len(u.orders)} for u in session.scalars(query)]
            )

    @app.get("/orders/recent/<int:limit>")
    def recent_orders(limit: int) -> ResponseReturnValue:
        # Each order's user loaded on its own: an N+1 on the many-to-one Order.user.
        with Session(engine) as session:
            orders = session.scalars(select(Order).where(Order.id % 3 == 0).limit(limit))
            return jsonify([{"product": o.product, "user": o.user.name} for o in orders])

    @app.get("/metrics")
    def metrics() -> ResponseReturnValue:
        return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}

    return app


def main() -> None:
    """Send a few requests in-process and print sqlprobe's N+1 counter."""
    import structlog
    from prometheus_client import CollectorRegistry

    app = create_app(registry=CollectorRegistry(), logger=structlog.get_logger("sqlprobe"))
    client = app.test_client()
    for path in ("/users", "/users/eager", "/orders/recent/10"):
        print(path, client.get(path).status_code)
    text = client.get("/metrics").get_data(as_text=True)
    print(*(line for line in text.splitlines() if "n_plus_one_total{" in line), sep="\n")


if __name__ == "__main__":
    main()
