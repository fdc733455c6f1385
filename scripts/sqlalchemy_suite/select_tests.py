"""pytest plugin: keep only the tests whose node ids are listed in a file.

The confirmation re-run of ``scripts/sqlalchemy-suite.sh`` uses it (``-p select_tests``
with this directory on ``PYTHONPATH``): SQLAlchemy generates its per-backend test
classes during collection, so their node ids cannot be given on the command line.
The file is named by ``SQLPROBE_SA_SUITE_SELECT``, one node id per line.
"""

from __future__ import annotations

import os
from typing import Any


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    path = os.environ.get("SQLPROBE_SA_SUITE_SELECT")
    if not path:
        return
    with open(path, encoding="utf-8") as f:
        wanted = {line.strip() for line in f if line.strip()}
    keep = [item for item in items if item.nodeid in wanted]
    drop = [item for item in items if item.nodeid not in wanted]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
