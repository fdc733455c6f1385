"""EXPLAIN plans for slow SELECTs, captured off the application's thread.

With ``attach(explain=True)``, each ``slow_query`` event the rate limiter lets through
for a SELECT on PostgreSQL, MySQL/MariaDB or SQLite carries a ``plan``:

``{"node", "cost", "rows", "seq_scans", "full", "cached"}``
    ``node`` is the top plan node (PostgreSQL's node type such as ``Seq Scan``;
    MySQL/MariaDB's access type of the first table such as ``ALL``; SQLite's first
    EXPLAIN QUERY PLAN line such as ``SCAN big``); ``cost`` and ``rows`` the planner's
    estimates (None where the database gives none: SQLite, MariaDB's total cost);
    ``seq_scans`` the tables read by a full sequential scan (PostgreSQL ``Seq Scan``,
    MySQL/MariaDB access type ``ALL``, SQLite ``SCAN table``); ``full`` the whole plan
    as the database returned it (PostgreSQL ``EXPLAIN (FORMAT JSON)``, MySQL/MariaDB
    ``EXPLAIN FORMAT=JSON``, SQLite's EXPLAIN QUERY PLAN rows). A plan embeds the
    literal and parameter values of the statement (``Filter: (v = 'x')``), so unless
    ``capture_parameters=True`` every string in ``full`` is normalized like the
    statement text (values become ``?``). A ``full`` larger than
    :data:`PLAN_MAX_CHARS` once serialized is left out (``full_omitted`` says so).
    ``cached`` is True when the plan was taken less than :data:`PLAN_TTL` seconds ago
    for the same fingerprint and reused.

``{"reason": "..."}``
    when there is no plan, and why: not a SELECT, an executemany, parameters that are
    not plain scalars, several statements, ``FOR UPDATE``/``FOR SHARE``/``INTO``, a
    function with side effects, an in-memory SQLite database (another connection
    sees a different database), the queue or the rate limit was full, or EXPLAIN
    failed (the exception class and SQLSTATE/error number only: database messages
    quote values).

Only plain ``EXPLAIN`` runs (never ``ANALYZE``, which would execute the statement
again). It runs on one worker thread per engine, started at the first slow SELECT, on
its own DBAPI connection, opened outside the application's pool but set up like the
application's connections (the same URL, ``connect_args``, ``creator`` and
``do_connect`` handlers, and the pool's ``connect`` event handlers, where applications
set ``search_path`` or session variables), and closed after each plan. The
application's pool is never used: an EXPLAIN must not take a connection the
application is waiting for, run inside its transaction, or change its session state.
One extra connection at most, for the duration of one EXPLAIN, is the cost. The
connection's statement timeout is :data:`EXPLAIN_TIMEOUT` (PostgreSQL
``statement_timeout``, MariaDB ``max_statement_time``, MySQL ``max_execution_time``,
SQLite a progress handler). The worker replays the statement text and the raw
parameters the driver received, through the DBAPI cursor, so the paramstyle is the
driver's own. For an async driver (asyncpg, aiomysql, aiosqlite) the worker runs the
same DBAPI calls through SQLAlchemy's greenlet adapter on an event loop of its own.

When the event is emitted
-------------------------
A statement that gets a plan is logged by the worker once the plan is ready (usually
a few milliseconds later), as one ``slow_query`` event with the plan inside; the
event is logged in a copy of the application's context (``contextvars``), so
structlog's bound context variables and the OTel context are those of the statement.
Every other event (no plan possible, queue full, cached plan) is logged at once on
the application's thread. One event per statement, never two. At interpreter exit the
worker is given up to :data:`EXPLAIN_TIMEOUT` seconds to finish what is queued, so a
batch job that ends right after its slow statement still logs it with its plan.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import decimal
import json
import queue
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .._core._fingerprint import normalize
from .._core._ratelimit import RateLimiter
from .._core._records import AttachContext, StatementRecord

__all__ = [
    "EXPLAINS_PER_INTERVAL",
    "EXPLAIN_QUEUE_SIZE",
    "EXPLAIN_TIMEOUT",
    "PLAN_MAX_CHARS",
    "PLAN_TTL",
    "Explainer",
    "skip_reason",
    "summarize",
]

#: Statements waiting for the worker; a full queue logs the event at once, without plan.
EXPLAIN_QUEUE_SIZE = 32
#: Statement timeout of one EXPLAIN (seconds).
EXPLAIN_TIMEOUT = 2.0
#: EXPLAINs per engine per ``PLAN_TTL`` seconds; a fingerprint's plan is reused that long.
EXPLAINS_PER_INTERVAL = 30
PLAN_TTL = 60.0
#: Plans kept for reuse (by fingerprint), and the largest full plan put in an event.
MAX_CACHED_PLANS = 256
PLAN_MAX_CHARS = 32_768

_SUPPORTED = frozenset({"postgresql", "mysql", "mariadb", "sqlite"})
_SCALARS = (
    str,
    int,
    float,
    bool,
    bytes,
    decimal.Decimal,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    uuid.UUID,
)
_LOCKING = re.compile(
    r"\bfor (?:no key )?update\b|\bfor (?:key )?share\b|\block in share mode\b|\binto\b",
    re.IGNORECASE,
)
_SIDE_EFFECTS = re.compile(
    r"\b(?:nextval|setval|pg_advisory\w*|pg_try_advisory\w*|pg_terminate_backend"
    r"|pg_cancel_backend|pg_reload_conf|pg_read\w*|set_config|dblink\w*|lo_\w+|get_lock"
    r"|release_lock|release_all_locks|sleep|benchmark|load_file) ?\(",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?\Z")
_SQLITE_SCAN = re.compile(r"SCAN (?:TABLE )?([^\s(][^\s]*)(.*)\Z")


def _plain(params: Any) -> bool:
    if params is None:
        return True
    if isinstance(params, dict) or hasattr(params, "keys"):
        values = params.values()
    elif isinstance(params, (list, tuple)):
        values = params
    else:
        return False
    return all(v is None or isinstance(v, _SCALARS) for v in values)


def skip_reason(record: StatementRecord) -> str | None:
    """Why a slow statement cannot be explained safely, or None if it can."""
    shape = record.shape
    if shape.operation != "SELECT":
        return f"not a SELECT ({shape.operation})"
    if record.batch_size > 0:
        return "executemany is not explained"
    text = shape.normalized
    if ";" in text:
        return "several statements"
    if _LOCKING.search(text):
        return "locking or SELECT INTO statement"
    if _SIDE_EFFECTS.search(text):
        return "calls a function with side effects"
    if not _plain(record.parameters):
        return "parameters are not plain scalars"
    return None


# -- plan summaries ------------------------------------------------------------------


def _pg_summary(full: Any) -> dict[str, Any]:
    if isinstance(full, str):
        full = json.loads(full)
    top = full[0]["Plan"]
    scans: list[str] = []
    stack = [top]
    while stack:
        node = stack.pop()
        if node.get("Node Type") == "Seq Scan" and node.get("Relation Name"):
            name = node["Relation Name"]
            if name not in scans:
                scans.append(name)
        stack.extend(reversed(node.get("Plans", ())))
    return {
        "node": top.get("Node Type"),
        "cost": top.get("Total Cost"),
        "rows": top.get("Plan Rows"),
        "seq_scans": scans,
        "full": full,
    }


def _mysql_tables(node: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        table = node.get("table")
        if isinstance(table, dict) and "table_name" in table:
            out.append(table)
        for value in node.values():
            _mysql_tables(value, out)
    elif isinstance(node, list):
        for value in node:
            _mysql_tables(value, out)


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _mysql_summary(full: Any) -> dict[str, Any]:
    if isinstance(full, (str, bytes)):
        full = json.loads(full)
    block = full.get("query_block", {})
    tables: list[dict[str, Any]] = []
    _mysql_tables(block, tables)
    scans: list[str] = []
    for table in tables:
        if table.get("access_type") == "ALL" and table["table_name"] not in scans:
            scans.append(table["table_name"])
    first = tables[0] if tables else {}
    cost = block.get("cost_info", {}).get("query_cost") or block.get("cost")
    rows = first.get("rows", first.get("rows_examined_per_scan"))
    node = first.get("access_type") or block.get("message") or block.get("table", {}).get("message")
    return {
        "node": node,
        "cost": _number(cost),
        "rows": _number(rows),
        "seq_scans": scans,
        "full": full,
    }


def _sqlite_summary(rows: list[Any]) -> dict[str, Any]:
    full = [{"id": r[0], "parent": r[1], "detail": r[3]} for r in rows]
    scans: list[str] = []
    for row in full:
        match = _SQLITE_SCAN.match(str(row["detail"]))
        if (
            match
            and "USING" not in match.group(2)
            and match.group(1) != "CONSTANT"
            and match.group(1) not in scans
        ):
            scans.append(match.group(1))
    return {
        "node": full[0]["detail"] if full else None,
        "cost": None,
        "rows": None,
        "seq_scans": scans,
        "full": full,
    }


def summarize(system: str, result: Any) -> dict[str, Any]:
    """The plan summary of an EXPLAIN result (``result`` as the driver returned it)."""
    if system == "postgresql":
        return _pg_summary(result[0][0])
    if system in ("mysql", "mariadb"):
        return _mysql_summary(result[0][0])
    return _sqlite_summary(result)


def _scrub(value: Any) -> Any:
    """A plan with every literal value in its strings replaced by ``?``."""
    if isinstance(value, str):
        return value if _NUMBER.match(value) else normalize(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _failure(exc: BaseException) -> str:
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if code is None and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]  # pymysql / mysqlclient error number
    suffix = f" ({code})" if code is not None else ""
    return f"EXPLAIN failed: {type(exc).__name__}{suffix}"


# -- the worker ---------------------------------------------------------------------

_STOP = object()


class Explainer:
    """One engine's EXPLAIN worker: a bounded queue, one thread, a plan cache."""

    def __init__(
        self,
        ctx: AttachContext,
        *,
        connect: Callable[[], Any],
        capture_parameters: bool,
        in_memory: bool,
    ) -> None:
        """``connect()`` opens a new DBAPI connection set up like the application's."""
        self.system = ctx.info.system
        self.logger = ctx.logger
        self.internal_error = ctx.contain
        self.raw_plans = capture_parameters
        self._connect = connect
        self.is_async = bool(getattr(ctx.dialect, "is_async", False))
        self.unsupported = self._unsupported(in_memory)
        self.prefix, self.setup = self._statements()
        self.queue: queue.Queue[Any] = queue.Queue(EXPLAIN_QUEUE_SIZE)
        self.thread: threading.Thread | None = None
        self.closed = False
        self._lock = threading.Lock()
        self._plans: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self.clock: Callable[[], float] = time.monotonic
        self._limiter = RateLimiter(
            per_key=EXPLAINS_PER_INTERVAL,
            total=EXPLAINS_PER_INTERVAL,
            interval=PLAN_TTL,
            max_keys=1,
            clock=lambda: self.clock(),
        )

    def after_fork(self) -> None:
        """In a forked child (gunicorn --preload): the queue is there, the thread is not."""
        self.queue = queue.Queue(EXPLAIN_QUEUE_SIZE)
        self.thread = None
        self._lock = threading.Lock()

    def _unsupported(self, in_memory: bool) -> str | None:
        if self.system not in _SUPPORTED:
            return f"EXPLAIN is not supported on {self.system}"
        if self.system == "sqlite" and in_memory:
            return "in-memory SQLite database (not visible to another connection)"
        return None

    def _statements(self) -> tuple[str, tuple[str, ...]]:
        if self.system == "postgresql":
            ms = int(EXPLAIN_TIMEOUT * 1000)
            return "EXPLAIN (FORMAT JSON) ", (f"SET statement_timeout = {ms}",)
        if self.system == "mariadb":
            return "EXPLAIN FORMAT=JSON ", (f"SET SESSION max_statement_time = {EXPLAIN_TIMEOUT}",)
        if self.system == "mysql":
            ms = int(EXPLAIN_TIMEOUT * 1000)
            return "EXPLAIN FORMAT=JSON ", (f"SET SESSION max_execution_time = {ms}",)
        return "EXPLAIN QUERY PLAN ", ()

    # -- application thread -----------------------------------------------------------

    def submit(self, record: StatementRecord, event: dict[str, Any]) -> None:
        """Log ``event`` with a plan: now if none can be had, else from the worker."""
        reason = self.unsupported or skip_reason(record)
        if reason is None:
            cached = self._cached(record.shape.fingerprint)
            if cached is not None:
                event["plan"] = cached
                self.logger.warning("slow_query", **event)
                return
            job = (
                contextvars.copy_context(),
                event,
                record.statement,
                record.parameters,
                record.shape.fingerprint,
            )
            try:
                self._start()
                self.queue.put_nowait(job)
                return
            except queue.Full:
                reason = "explain queue full"
            except RuntimeError:
                reason = "explain worker unavailable"
        event["plan"] = {"reason": reason}
        self.logger.warning("slow_query", **event)

    def _cached(self, fingerprint: str) -> dict[str, Any] | None:
        with self._lock:
            hit = self._plans.get(fingerprint)
            if hit is None or self.clock() - hit[0] >= PLAN_TTL:
                return None
            return {**hit[1], "cached": True}

    def _start(self) -> None:
        if self.thread is not None:
            return
        with self._lock:
            if self.closed:
                raise RuntimeError("closed")
            if self.thread is None:
                thread = threading.Thread(target=self._run, name="sqlprobe-explain", daemon=True)
                thread.start()
                self.thread = thread

    def at_exit(self) -> None:
        """At interpreter exit: plan and log what is queued, then stop (bounded wait)."""
        self._stop(EXPLAIN_TIMEOUT + 1.0, plan_queued=True)

    def close(self, timeout: float = EXPLAIN_TIMEOUT + 1.0) -> None:
        """Stop the worker; queued events are still logged (with reason ``detached``)."""
        self._stop(timeout, plan_queued=False)

    def _stop(self, timeout: float, *, plan_queued: bool) -> None:
        with self._lock:
            self.closed = not plan_queued
            thread = self.thread
        if thread is None:
            return
        while True:
            try:
                self.queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if not thread.is_alive():
                    break
        thread.join(timeout)

    # -- worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        loop: Any = None
        try:
            while True:
                job = self.queue.get()
                if job is _STOP:
                    return
                ctx, event, statement, parameters, fingerprint = job
                try:
                    if self.closed:
                        plan: dict[str, Any] = {"reason": "probe detached"}
                    else:
                        if self.is_async and loop is None:
                            import asyncio

                            loop = asyncio.new_event_loop()
                        plan = self._plan(statement, parameters, fingerprint, loop)
                    event["plan"] = plan
                    ctx.run(self.logger.warning, "slow_query", **event)
                except Exception:
                    self.internal_error("explain")
        finally:
            if loop is not None:
                loop.close()

    def _plan(self, statement: str, parameters: Any, fingerprint: str, loop: Any) -> dict[str, Any]:
        cached = self._cached(fingerprint)
        if cached is not None:
            return cached
        now = self.clock()
        if self._limiter.admit("explain") is None:
            return {"reason": "explain rate limited"}
        try:
            if loop is not None:
                from sqlalchemy.util import greenlet_spawn

                result = loop.run_until_complete(
                    greenlet_spawn(self._explain, statement, parameters)
                )
            else:
                result = self._explain(statement, parameters)
        except Exception as exc:
            return {"reason": _failure(exc)}
        try:
            plan = summarize(self.system, result)
            full = plan["full"] if self.raw_plans else _scrub(plan["full"])
            size = len(json.dumps(full, default=str))
            if size > PLAN_MAX_CHARS:
                del plan["full"]
                plan["full_omitted"] = f"plan of {size} characters (limit {PLAN_MAX_CHARS})"
            else:
                plan["full"] = full
        except Exception:
            self.internal_error("explain")
            return {"reason": "could not read the plan"}
        plan["cached"] = False
        with self._lock:
            self._plans[fingerprint] = (now, plan)
            self._plans.move_to_end(fingerprint)
            while len(self._plans) > MAX_CACHED_PLANS:
                self._plans.popitem(last=False)
        return plan

    def _explain(self, statement: str, parameters: Any) -> Any:
        """Run EXPLAIN on a fresh DBAPI connection set up like the application's."""
        connection = self._connect()
        try:
            if self.system == "sqlite" and hasattr(connection, "set_progress_handler"):
                deadline = time.monotonic() + EXPLAIN_TIMEOUT
                connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
            cursor = connection.cursor()
            try:
                for setup in self.setup:
                    cursor.execute(setup)
                text = self.prefix + statement
                if parameters is None:
                    cursor.execute(text)
                else:
                    cursor.execute(text, parameters)
                rows = cursor.fetchall()
            finally:
                cursor.close()
            with contextlib.suppress(Exception):  # the connection is closed next anyway
                connection.rollback()
            return rows
        finally:
            connection.close()
