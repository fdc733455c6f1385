"""Containment: a failure inside sqlprobe is counted, logged rarely, and goes no further.

Every hook, sink and analysis runs its work inside ``try``/``except Exception`` and
calls the engine's :class:`Containment` from the ``except`` block. The application
never sees the exception: its statement, result and transaction are untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ._ratelimit import RateLimiter

__all__ = ["INTERNAL_ERROR_LOG_INTERVAL", "Containment"]

#: An ``internal_error`` event per stage at most this often (seconds).
INTERNAL_ERROR_LOG_INTERVAL = 60.0


class Containment:
    """``contain(stage)`` of one engine: count the failure, log it once per stage per minute.

    ``count`` adds one to ``sqlprobe_internal_errors_total{stage}`` (the metrics sink's
    counter, injected at attach). The log event names only the exception class and
    where it was raised: a traceback renderer that shows locals would otherwise put
    statement parameters into the log.
    """

    def __init__(self, engine: str, count: Callable[[str], None], logger: Any) -> None:
        self.engine = engine
        self.count = count
        self.logger = logger
        self.limiter = RateLimiter(
            per_key=1, total=1_000_000, interval=INTERNAL_ERROR_LOG_INTERVAL, max_keys=256
        )

    def __call__(self, stage: str) -> None:
        try:
            self.count(stage)
            if self.limiter.admit(stage) is None:
                return
            exc = sys.exc_info()[1]
            where = ""
            tb = exc.__traceback__ if exc is not None else None
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None:
                code = tb.tb_frame.f_code
                where = f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name}"
            self.logger.error(
                "internal_error",
                stage=stage,
                engine=self.engine,
                error=type(exc).__name__ if exc is not None else "",
                where=where,
            )
        except Exception:  # containment itself must never raise
            pass
