"""OpenTelemetry spans, OTel metrics, exemplars and sqlcommenter."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._probe import Probe

__all__ = ["install"]


def install(probe: Probe) -> Callable[[], None] | None:
    """Wire this feature into a newly attached probe; return its undo function."""
    return None
