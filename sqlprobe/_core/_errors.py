"""The class name an application receives for a failed statement."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ERROR_CACHE_MAX", "error_namer"]

#: Exception classes whose name is remembered per engine.
ERROR_CACHE_MAX = 64


def error_namer(dialect: Any) -> Callable[[BaseException], str]:
    """A function giving the class name the application receives for an exception.

    sqlprobe sees a failed statement inside the driver call, before SQLAlchemy wraps
    the driver's exception. For a DBAPI error the application receives SQLAlchemy's
    wrapper, which SQLAlchemy picks as the first class in the driver exception's MRO
    whose name is a ``sqlalchemy.exc.DBAPIError`` subclass (else ``DBAPIError``); any
    other exception reaches the application unchanged and keeps its own class name.
    The result is the ``error`` label of ``sqlprobe_query_errors_total`` and the
    span's ``error.type``. Cached per exception class (bounded).
    """
    dbapi_error = getattr(getattr(dialect, "loaded_dbapi", None), "Error", None)
    names: dict[type, str] = {}

    def error_type(exc: BaseException) -> str:
        cls = type(exc)
        name = names.get(cls)
        if name is not None:
            return name
        name = cls.__name__
        if isinstance(dbapi_error, type) and isinstance(exc, dbapi_error):
            from sqlalchemy import exc as sa_exc

            name = "DBAPIError"
            for base in cls.__mro__:
                wrapper = getattr(sa_exc, base.__name__, None)
                if isinstance(wrapper, type) and issubclass(wrapper, sa_exc.DBAPIError):
                    name = wrapper.__name__
                    break
        if len(names) < ERROR_CACHE_MAX:
            names[cls] = name
        return name

    return error_type
