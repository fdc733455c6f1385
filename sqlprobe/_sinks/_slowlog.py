"""Slow-query events: source location, trace ids, redacted parameters, rate limiting.

:class:`SlowQueryLog` is a *slow-only* record sink of the collector, so none of this
module runs for a statement under ``slow_query_threshold``: fast statements pay
nothing. For each slow statement (successful or failed) it logs one ``slow_query``
warning through the probe's logger with these fields::

    engine, operation, table, fingerprint, statement, duration_ms, threshold_ms, rows,
    source, trace_id, span_id, parameters, plan, suppressed, error

* ``statement`` is the normalized text (no literal or parameter values), cut to
  :data:`STATEMENT_MAX_CHARS` characters with a trailing ``...``.
* ``rows`` is the driver's row count, None when it reported none (or the statement
  failed).
* ``source`` is ``path.py:LINE in function`` of the application frame that issued the
  statement (see ``_frames``), ``""`` when no frame on the stack is the application's.
* ``trace_id``/``span_id`` (lowercase hex) appear only when a valid span is active:
  the span sqlprobe's OTel sink made for the statement, else the current span of any
  other instrumentation.
* ``parameters`` appears only with ``capture_parameters=True``; see :func:`redact`.
* ``plan`` appears only with ``explain=True``; see ``_explain``.
* ``error`` (the exception class name) appears only for a failed statement.
* ``suppressed`` is how many events of this fingerprint the rate limiter dropped since
  the last one it let through.

Rate limiting
-------------
At most :data:`EVENTS_PER_FINGERPRINT` events per fingerprint and
:data:`EVENTS_PER_ENGINE` events in total per engine in each
:data:`RATE_INTERVAL`-second window; a dropped event adds one to its fingerprint's
``suppressed`` count, reported (and reset) on that fingerprint's next event. The
per-fingerprint table holds at most :data:`MAX_TRACKED_FINGERPRINTS` entries; beyond
that the entry seen least recently is evicted (with its unreported count). These are
module constants for now, not options.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

from .._core._frames import SourceFinder
from .._core._ratelimit import RateLimiter
from .._core._records import AttachContext, StatementRecord

__all__ = [
    "EVENTS_PER_ENGINE",
    "EVENTS_PER_FINGERPRINT",
    "MAX_TRACKED_FINGERPRINTS",
    "RATE_INTERVAL",
    "STATEMENT_MAX_CHARS",
    "SlowQueryLog",
    "redact",
]

#: Longest normalized statement text in an event (characters).
STATEMENT_MAX_CHARS = 1000
#: Events per fingerprint, and per engine, in one window of ``RATE_INTERVAL`` seconds.
EVENTS_PER_FINGERPRINT = 5
EVENTS_PER_ENGINE = 100
RATE_INTERVAL = 60.0
#: Fingerprints whose rate state is kept at once.
MAX_TRACKED_FINGERPRINTS = 1000

#: Longest parameter value kept (characters of its text), and rows of an
#: executemany batch shown.
PARAMETER_MAX_CHARS = 200
PARAMETER_MAX_ROWS = 5
PARAMETER_MAX_ITEMS = 100
REDACTED = "[REDACTED]"

#: Parameter names whose values are never logged (case-insensitive substrings, with
#: ``_`` and ``-`` ignored so that ``api_key``, ``api-key`` and ``APIKey`` all match).
SENSITIVE_WORDS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "apikey",
    "auth",
    "credential",
    "privatekey",
    "cookie",
    "session",
    "signature",
    "ssn",
    "cardnumber",
    "cvv",
)
_SENSITIVE = re.compile("|".join(SENSITIVE_WORDS))
_SEPARATORS = str.maketrans("", "", "_-")


def sensitive(name: object) -> bool:
    """Whether a parameter name looks like it holds a secret."""
    return (
        isinstance(name, str) and _SENSITIVE.search(name.lower().translate(_SEPARATORS)) is not None
    )


def _value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{type(value).__name__} of {len(value)} bytes>"
    text = value if isinstance(value, str) else repr(value)
    if len(text) > PARAMETER_MAX_CHARS:
        return f"{text[:PARAMETER_MAX_CHARS]}...(+{len(text) - PARAMETER_MAX_CHARS} chars)"
    return text


def _row(params: Any, names: list[str] | None, redact_all: bool) -> Any:
    if isinstance(params, dict) or hasattr(params, "keys"):
        out: dict[str, Any] = {}
        for i, key in enumerate(params.keys()):
            if i >= PARAMETER_MAX_ITEMS:
                out["..."] = f"+{len(params) - PARAMETER_MAX_ITEMS} more"
                break
            out[str(key)] = REDACTED if redact_all or sensitive(key) else _value(params[key])
        return out
    if isinstance(params, (list, tuple)):
        items: list[Any] = []
        for i, item in enumerate(params):
            if i >= PARAMETER_MAX_ITEMS:
                items.append(f"...+{len(params) - PARAMETER_MAX_ITEMS} more")
                break
            hidden = redact_all or (names is not None and sensitive(names[i]))
            items.append(REDACTED if hidden else _value(item))
        return items
    return REDACTED if redact_all else _value(params)


def redact(parameters: Any, batch: bool, names: list[str] | None, statement: str) -> Any:
    """The parameters as they may appear in a log event.

    Named parameters (dicts) keep their keys; values of sensitive-looking keys become
    ``[REDACTED]``. Positional parameters keep their positions; a position is redacted
    when its bind name (from the compiled statement, ``names``) is sensitive. When the
    names are unknown (raw SQL, expanded IN lists) and the statement text mentions a
    sensitive word, every positional value is redacted. Long values are cut to
    :data:`PARAMETER_MAX_CHARS` characters, bytes become their length, other objects
    their ``repr``. An executemany batch shows its first :data:`PARAMETER_MAX_ROWS`
    rows and a count of the rest.
    """
    if parameters is None or (batch and not parameters):
        return parameters
    redact_all = False
    first = parameters[0] if batch and isinstance(parameters, (list, tuple)) else parameters
    if names is None and isinstance(first, (list, tuple)):
        redact_all = _SENSITIVE.search(statement.lower().translate(_SEPARATORS)) is not None
    if batch and isinstance(parameters, (list, tuple)):
        rows = [_row(p, names, redact_all) for p in parameters[:PARAMETER_MAX_ROWS]]
        if len(parameters) > PARAMETER_MAX_ROWS:
            rows.append(f"...+{len(parameters) - PARAMETER_MAX_ROWS} more rows")
        return rows
    return _row(parameters, names, redact_all)


def _bind_names(context: Any, parameters: Any, batch: bool) -> list[str] | None:
    """Positional bind names from the compiled statement, when they line up."""
    compiled = getattr(context, "compiled", None)
    names = getattr(compiled, "positiontup", None)
    if not names:
        return None
    row = parameters[0] if batch and parameters else parameters
    if isinstance(row, (list, tuple)) and len(row) == len(names):
        return [str(n) for n in names]
    return None


def _span_getter() -> Callable[[], Any] | None:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
        return None

    def current() -> Any:
        return trace.get_current_span().get_span_context()

    return current


class SlowQueryLog:
    """The slow-only sink that turns slow statements into ``slow_query`` events."""

    stage = "slowlog"

    def __init__(
        self,
        ctx: AttachContext,
        *,
        threshold: float,
        capture_parameters: bool,
        explainer: Any = None,
    ) -> None:
        self.logger = ctx.logger
        self.threshold_ms = round(threshold * 1000.0, 3)
        self.capture_parameters = capture_parameters
        self.limiter = RateLimiter(
            EVENTS_PER_FINGERPRINT, EVENTS_PER_ENGINE, RATE_INTERVAL, MAX_TRACKED_FINGERPRINTS
        )
        self.finder = SourceFinder()
        self.current_span = _span_getter()
        #: The EXPLAIN worker (``submit(record, event)``), or None (``explain=False``).
        self.explainer = explainer
        #: ``advice_for(fingerprint)``: the index advice known for a shape, or None
        #: (set when ``index_advice=True``); it becomes the event's ``index_advice``.
        self.advice_for: Any = None

    def on_statement(self, record: StatementRecord) -> None:
        suppressed = self.limiter.admit(record.shape.fingerprint)
        if suppressed is None:
            return
        event = self.event(record, sys._getframe(1))
        event["suppressed"] = suppressed
        if self.advice_for is not None:
            advice = self.advice_for(record.shape.fingerprint)
            if advice is not None:
                event["index_advice"] = advice
        if record.error is not None:
            event["error"] = type(record.error).__name__
        explainer = self.explainer
        if explainer is None:
            self.logger.warning("slow_query", **event)
        else:
            explainer.submit(record, event)

    def event(self, record: StatementRecord, frame: Any) -> dict[str, Any]:
        """The fields of a ``slow_query`` event, without ``suppressed`` and ``plan``."""
        shape = record.shape
        statement = shape.normalized
        if len(statement) > STATEMENT_MAX_CHARS:
            statement = statement[: STATEMENT_MAX_CHARS - 3] + "..."
        event: dict[str, Any] = {
            "engine": record.engine,
            "operation": shape.operation,
            "table": shape.table,
            "fingerprint": shape.fingerprint,
            "statement": statement,
            "duration_ms": round(record.duration * 1000.0, 3),
            "threshold_ms": self.threshold_ms,
            "rows": record.rows if record.rows >= 0 else None,
            "source": self.finder.source(frame),
        }
        span = record.span
        if span is None and self.current_span is not None:
            span = self.current_span()
        if span is not None and getattr(span, "is_valid", False):
            event["trace_id"] = format(span.trace_id, "032x")
            event["span_id"] = format(span.span_id, "016x")
        if self.capture_parameters:
            batch = record.batch_size > 0
            names = _bind_names(record.context, record.parameters, batch)
            event["parameters"] = redact(record.parameters, batch, names, shape.normalized)
        return event
