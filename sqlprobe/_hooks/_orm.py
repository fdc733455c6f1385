"""The ORM hook: tells the N+1 detector which Session a connection is working for.

The Session is a unit of work of its own for N+1 detection (from first use to close,
across its commits: a job loop that commits per item is one unit, not one per item).
The statement hook sees only the ``Connection``; SQLAlchemy does not say which Session
drives it. While any probe has N+1 detection on, one ``after_begin`` listener on the
``Session`` class (so every Session is seen, including the one inside each
``AsyncSession``) stores a weak reference to the Session on each connection the
Session begins a transaction on (:data:`~sqlprobe._core._scope.SESSION_SLOT`). That is
one call per Session transaction and nothing per ORM execution: no ``do_orm_execute``
listener (which alone costs 7-8 µs on every ORM execution); the relationship a
repeated statement loads is found from its execution context, and only when a repeat
is detected (``_analysis._nplusone``). The process-wide count of probes that need the
listener is kept in ``_state``; this module only adds and removes it.
"""

from __future__ import annotations

import weakref
from typing import Any

from .._core._scope import SESSION_SLOT

__all__ = ["install_orm_hook", "remove_orm_hook"]


def _on_after_begin(session: Any, transaction: Any, connection: Any) -> None:
    try:
        ref = session.__dict__.get(SESSION_SLOT)
        if ref is None:
            ref = session.__dict__[SESSION_SLOT] = weakref.ref(session)
        connection.__dict__[SESSION_SLOT] = ref
    except Exception:  # best effort; never disturb the ORM
        pass


def install_orm_hook() -> None:
    """Listen on the Session class (idempotent)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    if not event.contains(Session, "after_begin", _on_after_begin):
        event.listen(Session, "after_begin", _on_after_begin)


def remove_orm_hook() -> None:
    """Stop listening on the Session class (idempotent)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    if event.contains(Session, "after_begin", _on_after_begin):
        event.remove(Session, "after_begin", _on_after_begin)
