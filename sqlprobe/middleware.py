"""ASGI and WSGI middleware: one :func:`sqlprobe.scope` per HTTP request.

Plain ASGI and WSGI, so they fit FastAPI, Starlette, Flask, Django and anything else
that speaks either protocol::

    app.add_middleware(SqlprobeASGIMiddleware)             # FastAPI / Starlette
    app.wsgi_app = SqlprobeWSGIMiddleware(app.wsgi_app)    # Flask

Each request runs inside a scope named ``"METHOD route"`` (``"GET /users/{user_id}"``)
whose ``route`` is the route template. N+1 detection counts repeats per request and
reports the scope's name; other parts of sqlprobe (the slow-query log, sqlcommenter's
``route``) read the same ``current_scope()``.

The route template
------------------
A middleware runs before the framework has routed the request, so the template is
not known when the scope opens. The scope therefore resolves its ``name`` and
``route`` when they are first read (which is when a statement is reported, inside the
endpoint) and keeps the answer once found:

* ASGI: Starlette and FastAPI put the matched route in the ASGI scope dictionary
  (``scope["route"]``) after routing; its ``path_format`` (``/users/{user_id}``) is the
  template, prefixed with the path of any ``Mount`` it sits under.
* WSGI: Flask exposes the matched rule as ``flask.request.url_rule`` inside the request;
  its ``rule`` (``/users/<int:user_id>``) is the template.
* Anything else: pass ``route=`` a function of the ASGI scope / WSGI environ that
  returns the template or None. Until a template is known, the route is the request
  path (so a name may carry ids; it is only ever a log field, never a metric label).

The per-route metrics (``sqlprobe_scope_*{route}``) use :meth:`RequestScope.label`:
``"METHOD template"`` once a template is known, ``"METHOD _unmatched"`` for a request
no route matched (a 404, or a framework sqlprobe cannot read), never the path itself.
Methods outside the standard HTTP set are labelled ``OTHER``.

Only ``http`` requests get a scope; lifespan and websocket traffic passes through.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

from ._core._scope import Scope, _current

__all__ = ["RequestScope", "SqlprobeASGIMiddleware", "SqlprobeWSGIMiddleware"]

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]
RouteLookup = Callable[[], "str | None"]

#: HTTP methods that appear as themselves in a metric label (others: ``OTHER``).
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
#: The route of a request whose template is not known.
UNMATCHED = "_unmatched"


class RequestScope(Scope):
    """A scope for one request whose route template is looked up when first needed.

    ``name`` is ``"METHOD route"``; ``route`` is the template once ``lookup`` returns
    one, the request path until then. Assigning either fixes it.
    """

    __slots__ = ("_fixed_name", "_fixed_route", "_lookup", "_method", "_path")

    def __init__(self, method: str, path: str, lookup: RouteLookup | None = None) -> None:
        self._method = method
        self._path = path
        self._lookup = lookup
        self._fixed_name: str | None = None
        self._fixed_route: str | None = None
        super().__init__(f"{method} {path}")
        self._fixed_name = None  # the base class assigned name; keep it dynamic

    @property
    def route(self) -> str:
        fixed = self._fixed_route
        if fixed is not None:
            return fixed
        lookup = self._lookup
        if lookup is not None:
            try:
                template = lookup()
            except Exception:
                template = None
            if template:
                self._fixed_route = template
                return template
        return self._path

    @route.setter
    def route(self, value: str | None) -> None:
        self._fixed_route = value

    @property
    def name(self) -> str:
        fixed = self._fixed_name
        return fixed if fixed is not None else f"{self._method} {self.route}"

    @name.setter
    def name(self, value: str) -> None:
        self._fixed_name = value

    def label(self) -> str:
        """``"METHOD template"``, or ``"METHOD _unmatched"``: never the raw path."""
        fixed = self._fixed_name
        if fixed is not None:
            return fixed
        if self._fixed_route is None:
            _ = self.route  # looks the template up (and keeps it) if it can be known now
        method = self._method if self._method in HTTP_METHODS else "OTHER"
        return f"{method} {self._fixed_route or UNMATCHED}"


def _asgi_route(scope: MutableMapping[str, Any], root_path: str) -> str | None:
    route = scope.get("route")
    if route is None:
        return None
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    # Under a Mount, the router added the mount's path to root_path; the app's own
    # root_path (a proxy prefix) was there before the request reached us.
    current = scope.get("root_path", "")
    prefix = current[len(root_path) :] if current.startswith(root_path) else ""
    return prefix + template


class SqlprobeASGIMiddleware:
    """ASGI middleware opening a :class:`RequestScope` around each HTTP request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        route: Callable[[MutableMapping[str, Any]], str | None] | None = None,
    ) -> None:
        self.app = app
        self.route = route

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        custom = self.route
        root_path = scope.get("root_path", "") or ""

        def lookup() -> str | None:
            if custom is not None:
                found = custom(scope)
                if found:
                    return found
            return _asgi_route(scope, root_path)

        method = scope.get("method", "GET")
        path = root_path + (scope.get("path") or "/")
        with RequestScope(method, path, lookup):
            await self.app(scope, receive, send)


def _flask_route() -> str | None:
    flask = sys.modules.get("flask")
    if flask is None or not flask.has_request_context():
        return None
    rule = flask.request.url_rule
    template = getattr(rule, "rule", None)
    return template if isinstance(template, str) else None


class _ScopedIterable:
    """The response body, iterated inside the request's scope; ``close`` ends it."""

    def __init__(self, body: Iterable[bytes], scope: RequestScope) -> None:
        self._body = body
        self._iter: Iterator[bytes] | None = None
        self._scope = scope

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        token = _current.set(self._scope)
        try:
            if self._iter is None:
                self._iter = iter(self._body)
            return next(self._iter)
        finally:
            _current.reset(token)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is None:
            self._scope.finish()
            return
        token = _current.set(self._scope)
        try:
            close()
        finally:
            _current.reset(token)
            self._scope.finish()  # the request is over: its per-route totals are final


class SqlprobeWSGIMiddleware:
    """WSGI middleware opening a :class:`RequestScope` around each request.

    The scope covers the application call and the iteration of the response body (a
    streamed body that queries the database is part of the same request).
    """

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        *,
        route: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> None:
        self.app = app
        self.route = route

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        custom = self.route

        def lookup() -> str | None:
            if custom is not None:
                found = custom(environ)
                if found:
                    return found
            return _flask_route()

        method = environ.get("REQUEST_METHOD") or "GET"
        path = (environ.get("SCRIPT_NAME") or "") + (environ.get("PATH_INFO") or "/")
        request_scope = RequestScope(method, path, lookup)
        token = _current.set(request_scope)
        try:
            body = self.app(environ, start_response)
        except BaseException:
            request_scope.finish()
            raise
        finally:
            _current.reset(token)
        return _ScopedIterable(body, request_scope)
