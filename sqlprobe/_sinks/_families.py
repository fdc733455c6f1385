"""Every Prometheus metric family sqlprobe exports, in one table.

The single-process exporter, the multiprocess exporter, ``describe()`` (and so a
filtered scrape, ``/metrics?name[]=...``) and the documentation test all read
:data:`FAMILIES`; a family's name, type, labels, help text and buckets are written
here and nowhere else. Names are given without the ``_total`` suffix that
prometheus_client adds to counters.

Buckets: ``duration`` families use the probe's ``buckets`` (default
:data:`DEFAULT_BUCKETS`, 100 µs to 10 s); ``pool`` families use the probe's ``buckets``
when given, else the default extended to 30, 60 and 300 s, because pool waits reach
``pool_timeout`` (30 s by default) and connections are held for as long as a request
or a job runs; ``count`` families count statements, not seconds (the
statements per unit of work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .._config import DEFAULT_BUCKETS

__all__ = [
    "BY_NAME",
    "COUNT_BUCKETS",
    "FAMILIES",
    "POOL_BUCKETS",
    "Family",
    "buckets_for",
]

#: Pool and transaction histogram buckets unless the probe was given ``buckets``.
POOL_BUCKETS: tuple[float, ...] = (*DEFAULT_BUCKETS, 30.0, 60.0, 300.0)
#: Buckets of histograms that count statements per unit of work.
COUNT_BUCKETS: tuple[float, ...] = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)

Kind = Literal["counter", "gauge", "histogram"]
BucketKind = Literal["duration", "pool", "count"]
#: prometheus_client's multiprocess aggregation of a gauge across worker processes.
GaugeMode = Literal["max", "livesum", "mostrecent"]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: what Prometheus sees of it."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    buckets: BucketKind | None = None
    multiprocess_mode: GaugeMode | None = None

    @property
    def exposed_name(self) -> str:
        """The name users see: ``..._total`` for a counter, else the family name."""
        return f"{self.name}_total" if self.kind == "counter" else self.name

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The names of its samples (what ``/metrics?name[]=`` selects)."""
        if self.kind == "histogram":
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_count", "_sum"))
        return (self.exposed_name,)


def _c(name: str, labels: tuple[str, ...], help: str) -> Family:
    return Family(name, "counter", labels, help)


def _h(name: str, labels: tuple[str, ...], help: str, buckets: BucketKind) -> Family:
    return Family(name, "histogram", labels, help, buckets)


def _g(name: str, labels: tuple[str, ...], help: str, mode: GaugeMode) -> Family:
    return Family(name, "gauge", labels, help, None, mode)


E = ("engine",)

#: Every family, in the order of the metrics documentation.
FAMILIES: tuple[Family, ...] = (
    _h("sqlprobe_query_duration_seconds", (*E, "operation"),
       "Time of each statement's execution.", "duration"),
    _c("sqlprobe_statement_calls", (*E, "fingerprint"), "Executions per statement shape."),
    _c("sqlprobe_statement_seconds", (*E, "fingerprint"),
       "Total execution time per statement shape."),
    _c("sqlprobe_statement_rows", (*E, "fingerprint"),
       "Rows the driver reported per statement shape (UPDATE, DELETE, MERGE)."),
    _g("sqlprobe_statement_info", (*E, "fingerprint", "operation", "table", "statement"),
       "The normalized text of a statement shape, to join on by fingerprint.", "max"),
    _c("sqlprobe_query_errors", (*E, "operation", "error"),
       "Failed statements by the exception class the application received."),
    _c("sqlprobe_slow_queries", (*E, "operation"), "Statements over the slow-query threshold."),
    _c("sqlprobe_n_plus_one", (*E, "fingerprint", "relationship"),
       "N+1 detections: a SELECT shape repeated per item in one unit of work."),
    _h("sqlprobe_pool_checkout_wait_seconds", E,
       "Time spent waiting for a connection from the pool.", "pool"),
    _h("sqlprobe_pool_connection_use_seconds", E,
       "Time a connection stayed checked out.", "pool"),
    _h("sqlprobe_pool_connection_idle_seconds", E,
       "Per check-in: the part of the checked-out time in which no statement ran.", "pool"),
    _h("sqlprobe_pool_connect_seconds", E, "Time to open a new DBAPI connection.", "pool"),
    _g("sqlprobe_pool_connections", (*E, "state"),
       "Connections now in the pool, by state (idle, used).", "livesum"),
    _g("sqlprobe_pool_max_connections", E,
       "Most connections the pool opens at once (pool_size + max_overflow).", "livesum"),
    _g("sqlprobe_pool_peak_connections", E,
       "The most connections in use at once since the previous scrape.", "livesum"),
    _c("sqlprobe_pool_checkout_timeouts", E,
       "Checkouts that gave up with the pool's TimeoutError."),
    _c("sqlprobe_pool_connects", E, "DBAPI connections opened."),
    _c("sqlprobe_pool_invalidations", E,
       "Connections invalidated (errors, failed pre-ping, soft invalidation)."),
    _c("sqlprobe_pool_connect_errors", (*E, "error"),
       "New DBAPI connections that failed (the database refused or was unreachable)."),
    _h("sqlprobe_transaction_duration_seconds", (*E, "outcome"),
       "Begin to end of a transaction, by outcome (commit, rollback).", "pool"),
    _h("sqlprobe_scope_statements", (*E, "route"),
       "Statements per unit of work (sqlprobe.scope(), a request), by route.", "count"),
    _h("sqlprobe_scope_db_seconds", (*E, "route"),
       "Statement time per unit of work, by route.", "pool"),
    _h("sqlprobe_scope_pool_wait_seconds", (*E, "route"),
       "Pool checkout wait per unit of work, by route.", "pool"),
    _g("sqlprobe_index_advice_info", (*E, "table", "columns", "proven"),
       "An index the advisor suggests (index_advice=True); proven: checked by the planner.",
       "max"),
    _c("sqlprobe_internal_errors", ("stage",), "Failures inside sqlprobe that were contained."),
)  # fmt: skip

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def buckets_for(family: Family, buckets: tuple[float, ...]) -> tuple[float, ...]:
    """The bucket bounds of a histogram family for a probe with ``buckets``."""
    if family.buckets == "pool":
        return POOL_BUCKETS if buckets == DEFAULT_BUCKETS else buckets
    if family.buckets == "count":
        return COUNT_BUCKETS
    return buckets
