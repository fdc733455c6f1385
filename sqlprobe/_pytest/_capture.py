"""One test's capture: :class:`sqlprobe.testing.QueryCapture` plus what the plugin needs.

On top of the statements a capture keeps (transaction noise and first-connect queries
left out), the plugin wants to know whether sqlprobe saw *anything* during the test
(a budget checked against no statement at all is no check), and, for query snapshots,
the application line that first ran each statement shape. The line is found with the
same stack walk as the slow-query log, once per new shape per test, only when
snapshots are on.
"""

from __future__ import annotations

import sys
from typing import Any

from ..testing import QueryCapture, _Sink

__all__ = ["TestCapture"]


class _PluginSink(_Sink):
    def __init__(self, owner: TestCapture, sources: bool) -> None:
        super().__init__(owner.statements, include_noise=False)
        self.owner = owner
        self.finder: Any = None
        if sources:
            from .._core._frames import SourceFinder

            self.finder = SourceFinder()

    def on_statement(self, record: Any) -> None:
        owner = self.owner
        owner.seen += 1
        super().on_statement(record)
        finder = self.finder
        if finder is not None:
            fingerprint = record.shape.fingerprint
            if fingerprint not in owner.sources:
                owner.sources[fingerprint] = finder.source(sys._getframe(1))


class TestCapture(QueryCapture):
    """A capture of every attached engine that also counts noise and finds sources."""

    __test__ = False  # not a test class, whatever pytest's collection thinks of the name

    def __init__(self, *, sources: bool = False) -> None:
        super().__init__(None)
        #: Every statement a watched engine ran, noise and first-connect queries included.
        self.seen = 0
        #: fingerprint -> ``path.py:LINE in function`` of its first execution.
        self.sources: dict[str, str] = {}
        self._sink = _PluginSink(self, sources)

    @property
    def engines(self) -> list[str]:
        """The ``engine`` labels of the probes this capture watched."""
        return sorted(self._engine_names)
