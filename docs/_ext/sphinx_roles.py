"""A griffe extension for the API reference: Sphinx roles in docstrings become code.

sqlprobe's docstrings cross-reference with Sphinx roles (``:meth:`Probe.detach```),
which Markdown would show literally. This rewrites each role to inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|exc|obj|const):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Replace ``:role:`target``` with ```target``` in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
