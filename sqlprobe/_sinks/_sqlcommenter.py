"""sqlcommenter: tag each statement sent to the database with where it came from.

Follows the sqlcommenter specification (opentelemetry-sqlcommenter): the comment is
appended as ``<statement> /*key='value',...*/``; keys are sorted; keys and values are
URL-encoded as JavaScript's ``encodeURIComponent`` does, then ``'`` is escaped as
``\\'``. Database-side tools (pg_stat_statements with comments kept, Cloud SQL Query
Insights, MySQL's slow log, ``pg_stat_activity``) can then tie a query to its trace and
its route.

Modes (the ``sqlcommenter`` option):

* ``True``: ``action``, ``controller``, ``route`` from the open
  :func:`sqlprobe.scope` (its ``action``/``controller``/``route`` fields; the scope's
  *name* is not used, since it is free text), ``db_driver`` and ``framework``, and
  ``traceparent``/``tracestate`` (W3C trace context) of the span that is current when
  the statement runs. That is the application's span (an HTTP request, a job), or
  the OTel instrumentation's span where that instrumentation makes it current.
  sqlprobe's own statement span is created *after* the statement, timed with the same
  clock readings as the metrics, so it cannot be named before it exists; it is a child
  of the span in the comment, so the trace id always matches and the database's view
  of a query leads to its trace.
* ``"static"``: only ``db_driver`` and ``framework``, which are constant for the
  process: every execution of a statement sends the same text, so server-side
  prepared statements and plan caches (keyed by text, on MySQL especially) keep
  working. Per-request keys, traceparent above all, would defeat them.

A statement that already carries a comment (``--`` or ``/*`` anywhere, which also
catches a literal containing them: then the statement is simply left alone) is sent
unchanged, as the specification requires. A trailing ``;`` stays last. Where the
driver formats parameters with ``%`` (``format``/``pyformat`` paramstyles: psycopg,
PyMySQL, mysqlclient) the comment's ``%`` escapes are doubled when parameters go with
the statement, so the driver sends them as written.

Only the text sent to the driver changes: fingerprints, metrics and spans use the
original statement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from .._core._scope import current_scope

__all__ = ["build", "encode", "serialize"]

#: What ``encodeURIComponent`` leaves alone besides letters, digits and ``-_.~``.
_SAFE = "!*'()"
#: Distinct (route, controller, action) triples whose encoded form is remembered.
_SCOPE_CACHE_MAX = 256

#: ``() -> (traceparent, tracestate) or None``: the W3C trace context to put in comments.
TraceContextFn = Callable[[], "tuple[str, str] | None"]


def encode(text: str) -> str:
    """URL-encode like ``encodeURIComponent``, then escape ``'`` with a backslash."""
    return quote(text, safe=_SAFE).replace("'", "\\'")


def serialize(pairs: dict[str, str]) -> str:
    """The whole comment for ``pairs`` (empty values dropped), keys sorted; '' if none."""
    items = [f"{encode(k)}='{encode(v)}'" for k, v in sorted(pairs.items()) if v]
    return f"/*{','.join(items)}*/" if items else ""


def _append(statement: str, comment: str) -> str:
    if "--" in statement or "/*" in statement:
        return statement
    return _place(statement, comment)


def _place(statement: str, comment: str) -> str:
    if statement[-1:] in (";", " ", "\n", "\t"):
        stripped = statement.rstrip()
        if stripped.endswith(";"):
            return f"{stripped[:-1]} {comment};"
    return f"{statement} {comment}"


def _versioned(name: str, version: Any) -> str:
    return f"{name}:{version}" if isinstance(version, str) and version else name


def static_pairs(driver: str, dbapi: Any) -> dict[str, str]:
    """``db_driver`` and ``framework``: what is constant for the whole process."""
    import sqlalchemy

    return {
        "db_driver": _versioned(driver, getattr(dbapi, "__version__", None)),
        "framework": _versioned("sqlalchemy", sqlalchemy.__version__),
    }


def build(
    mode: object,
    *,
    driver: str,
    dbapi: Any,
    paramstyle: str,
    trace_context: TraceContextFn | None,
    on_error: Callable[[str], None],
) -> tuple[Callable[[str], str], Callable[[str], str]] | None:
    """The two comment functions (with parameters, without) for ``mode``, or None.

    Everything constant is serialized here, once; per statement ``True`` mode reads
    the scope and the trace context and joins a few strings. Both functions return
    the statement unchanged rather than raise (``on_error`` counts the failure).
    """
    if mode is False:
        return None
    percent = paramstyle in ("format", "pyformat")
    static = static_pairs(driver, dbapi)

    if mode == "static":
        comment = serialize(static)
        escaped = comment.replace("%", "%%") if percent else comment

        def static_with_params(statement: str) -> str:
            try:
                return _append(statement, escaped)
            except Exception:
                on_error("sqlcommenter")
                return statement

        def static_no_params(statement: str) -> str:
            try:
                return _append(statement, comment)
            except Exception:
                on_error("sqlcommenter")
                return statement

        return static_with_params, static_no_params

    # Keys in sorted order: action, controller, db_driver, framework, route,
    # traceparent, tracestate. The middle two are fixed; the rest are filled in.
    middle = ",".join(f"{encode(k)}='{encode(v)}'" for k, v in sorted(static.items()))
    scope_parts: dict[tuple[str | None, str | None, str | None], tuple[str, str]] = {}

    def scope_fragments(
        route: str | None, controller: str | None, action: str | None
    ) -> tuple[str, str]:
        key = (route, controller, action)
        parts = scope_parts.get(key)
        if parts is None:
            head = ""
            if action:
                head += f"action='{encode(action)}',"
            if controller:
                head += f"controller='{encode(controller)}',"
            tail = f",route='{encode(route)}'" if route else ""
            parts = (head, tail)
            if len(scope_parts) >= _SCOPE_CACHE_MAX:
                scope_parts.clear()
            scope_parts[key] = parts
        return parts

    def dynamic(statement: str, escape: bool) -> str:
        if "--" in statement or "/*" in statement:
            return statement
        scope = current_scope()
        if scope is not None:
            head, tail = scope_fragments(scope.route, scope.controller, scope.action)
        else:
            head = tail = ""
        if trace_context is not None:
            tc = trace_context()
            if tc is not None:
                traceparent, tracestate = tc
                tail += f",traceparent='{traceparent}'"
                if tracestate:
                    tail += f",tracestate='{encode(tracestate)}'"
        comment = f"/*{head}{middle}{tail}*/"
        if escape:
            comment = comment.replace("%", "%%")
        return _place(statement, comment)

    def dynamic_with_params(statement: str) -> str:
        try:
            return dynamic(statement, percent)
        except Exception:
            on_error("sqlcommenter")
            return statement

    def dynamic_no_params(statement: str) -> str:
        try:
            return dynamic(statement, False)
        except Exception:
            on_error("sqlcommenter")
            return statement

    return dynamic_with_params, dynamic_no_params
