"""gunicorn settings for sqlprobe's multiprocess mode (see docs/multiprocess.md)."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import multiprocess

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WORKERS", "3"))
# PROMETHEUS_MULTIPROC_DIR must be set in the environment before gunicorn starts: it
# decides, when prometheus_client is imported, that values go to shared files.
raw_env = [f"PROMETHEUS_MULTIPROC_DIR={os.environ['PROMETHEUS_MULTIPROC_DIR']}"]


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges (pool connections) from the aggregate."""
    multiprocess.mark_process_dead(worker.pid)
