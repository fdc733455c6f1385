"""Units of work: ``sqlprobe.scope(...)``.

A scope names what the application is doing (``"GET /users/{id}"``, a job name) for
everything sqlprobe reports while it is open: N+1 detection counts repeats per scope,
the slow-query log and sqlcommenter's ``route``/``controller``/``action`` read it. It
lives in a ``ContextVar``, so it follows threads and asyncio tasks (and SQLAlchemy's
greenlets, which inherit the context of the task that started them).

Units of work for N+1 detection
-------------------------------
The N+1 detector counts repeats per unit of work, the innermost of:

1. an open scope: :func:`sqlprobe.scope`, the middleware's request scope, or the
   per-test unit of :func:`per_test_unit` (a scope opened inside another one is innermost,
   so requests inside a test count on their own);
2. the ORM ``Session`` that runs the statement, from its first use to ``close()`` (or
   ``expunge_all()``, which ``close()`` calls), across its commits;
3. the connection's transaction.

The Session is known on the statement path through :data:`SESSION_SLOT`: the ORM hook
(``_hooks._orm``) stores a weak reference to the Session on each ``Connection`` the
Session begins a transaction on (one ``after_begin`` event per transaction, nothing per
ORM execution), and the detector reads it from the statement's connection.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any, TypeVar, cast

__all__ = [
    "SESSION_SLOT",
    "Scope",
    "current_scope",
    "current_scope_getter",
    "per_test_unit",
    "scope",
]

F = TypeVar("F", bound=Callable[..., Any])

#: The attribute of a ``Connection`` (and of a ``Session``, to reuse it) holding a weak
#: reference to the ORM Session that began the connection's current transaction.
SESSION_SLOT = "_sqlprobe_session"

_current: ContextVar[Scope | None] = ContextVar("sqlprobe_scope", default=None)


class Scope:
    """One open unit of work; also a context manager and a decorator.

    ``state`` is scratch space for sqlprobe's features (N+1 repeat counts), created
    with the scope and dropped with it, so nothing outlives the unit of work. Features
    that report once per unit of work (the per-route statement and pool histograms)
    register a function with :meth:`on_exit`; it runs when the scope ends.
    """

    __slots__ = ("_exits", "_tokens", "action", "controller", "name", "route", "state")

    def __init__(
        self,
        name: str,
        *,
        route: str | None = None,
        controller: str | None = None,
        action: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"scope name must be a non-empty string, got {name!r}")
        self.name = name
        self.route = route
        self.controller = controller
        self.action = action
        self.state: dict[Any, Any] = {}
        self._tokens: list[Token[Scope | None]] = []
        self._exits: list[Callable[[Scope], None]] | None = None

    def __enter__(self) -> Scope:
        self.state = {}
        self._tokens.append(_current.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        token = self._tokens.pop()
        try:
            _current.reset(token)
        except ValueError:
            # Exited in another context than it was entered in (a generator moved
            # between tasks): clear it rather than raise into the application.
            _current.set(None)
        self.finish()
        self.state = {}

    def label(self) -> str:
        """The ``route`` label of this unit of work's metrics: the scope's name.

        A request scope answers with its route template instead of the path (see
        ``sqlprobe.middleware``), so ids in paths never become label values.
        """
        return self.name

    def on_exit(self, fn: Callable[[Scope], None]) -> None:
        """Call ``fn(scope)`` once when this unit of work ends (never raises into it)."""
        if self._exits is None:
            self._exits = [fn]
        else:
            self._exits.append(fn)

    def finish(self) -> None:
        """Run the :meth:`on_exit` functions now (a request scope ends without ``with``)."""
        exits, self._exits = self._exits, None
        if exits:
            for fn in exits:
                try:
                    fn(self)
                except Exception:  # a feature's report must never break the application
                    continue

    def __call__(self, fn: F) -> F:
        """Use the scope as a decorator: each call of ``fn`` runs in a fresh scope."""
        name, route, controller, action = self.name, self.route, self.controller, self.action

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with Scope(name, route=route, controller=controller, action=action):
                    return await fn(*args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with Scope(name, route=route, controller=controller, action=action):
                return fn(*args, **kwargs)

        return cast(F, wrapper)

    def __repr__(self) -> str:
        return f"<sqlprobe.scope {self.name!r}>"


def scope(
    name: str,
    *,
    route: str | None = None,
    controller: str | None = None,
    action: str | None = None,
) -> Scope:
    """Open a unit of work named ``name`` (``with sqlprobe.scope("GET /users"):``).

    Also usable as a decorator (``@sqlprobe.scope("nightly-report")``). ``route``,
    ``controller`` and ``action`` feed sqlcommenter; ``route`` defaults to nothing.
    """
    return Scope(name, route=route, controller=controller, action=action)


def current_scope() -> Scope | None:
    """The innermost open scope of this thread or task, if any."""
    return _current.get()


def current_scope_getter() -> Callable[[], Scope | None]:
    """:func:`current_scope` without the function call around the ContextVar (hot path)."""
    return _current.get


def per_test_unit(name: str) -> Scope:
    """The unit of work of one test (the pytest plugin's per-test unit).

    Enter it around the test's call (``with per_test_unit(item.nodeid):``): every statement
    of the test counts in it, across Sessions and transactions, except those inside a
    scope opened within it (a request through the middleware, an explicit
    :func:`sqlprobe.scope`), which count in that innermost scope alone. Detections
    report ``name`` as their scope. It is a plain :class:`Scope` with no
    ``route``/``controller``/``action``, so sqlcommenter adds nothing for it.
    """
    return Scope(name)
