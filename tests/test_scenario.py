"""The demo's data: SQLite generates the shipments the Python path would insert."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from sqlprobe._scenario import (
    CARRIERS,
    SHIPMENTS,
    Base,
    Order,
    Shipment,
    seed,
    seed_shipments,
    track_shipment,
    tracking_number,
)


def test_sqlite_generated_shipments_equal_the_python_formula(tmp_path: Path) -> None:
    """On SQLite the generated rows are exactly tracking_number(), CARRIERS and the minute
    offsets, for the seeded orders in turn; the latest parcel is found by its number."""
    engine = create_engine(f"sqlite:///{tmp_path / 'demo.db'}")
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as session:
            seed(session)
            seed_shipments(session)
            orders = list(session.scalars(select(Order.id).order_by(Order.id)))
            got = [
                (s.order_id, s.tracking_number, s.carrier, s.shipped_at)
                for s in session.scalars(select(Shipment).order_by(Shipment.id))
            ]
            expected = [
                (
                    orders[n % len(orders)],
                    tracking_number(n),
                    CARRIERS[n % len(CARRIERS)],
                    datetime(2026, 1, 1) + timedelta(minutes=n),
                )
                for n in range(SHIPMENTS)
            ]
            assert got == expected
            assert len({row[1] for row in got}) == SHIPMENTS
            assert track_shipment(session, tracking_number(SHIPMENTS - 1)) is not None
    finally:
        engine.dispose()
