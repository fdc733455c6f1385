"""The ORM hook: marks relationship loads so the N+1 detector can name them.

SQLAlchemy's ORM tells its ``do_orm_execute`` session event which statements are
relationship loads (``ORMExecuteState.is_relationship_load``) and along which path
(``loader_strategy_path``: ``User -> User.orders``). While any probe has N+1 detection
on, one listener on the ``Session`` class (so every Session, including the one inside
each ``AsyncSession``, is seen) adds an execution option holding that path; the
statement's execution context carries it down to the statement hook, where the
detector reads it only when it reports. The process-wide count of probes that need the
listener is kept in ``_state``; this module only adds and removes it.
"""

from __future__ import annotations

from typing import Any

from .._core._records import RELATIONSHIP_OPTION

__all__ = ["install_orm_hook", "remove_orm_hook"]


def _on_orm_execute(state: Any) -> None:
    try:
        if state.is_relationship_load:
            path = state.loader_strategy_path
            if path is not None:
                state.update_execution_options(
                    **{RELATIONSHIP_OPTION: (path, state.lazy_loaded_from is not None)}
                )
    except Exception:  # naming is best effort; never disturb the ORM
        pass


def install_orm_hook() -> None:
    """Listen on the Session class (idempotent)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    if not event.contains(Session, "do_orm_execute", _on_orm_execute):
        event.listen(Session, "do_orm_execute", _on_orm_execute)


def remove_orm_hook() -> None:
    """Stop listening on the Session class (idempotent)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    if event.contains(Session, "do_orm_execute", _on_orm_execute):
        event.remove(Session, "do_orm_execute", _on_orm_execute)
