"""Where a statement came from: the first application frame on the stack.

The walk runs only for statements that are already slow (the slow-query sinks), never
on the statement path, so its cost (tens of microseconds) is paid a few times a minute
at most, not per statement.

Which frames are *not* the application's
----------------------------------------
A frame is skipped when its file belongs to:

* sqlprobe itself or SQLAlchemy (by package directory, so editable installs count);
* the standard library (under ``sysconfig``'s ``stdlib``/``platstdlib`` paths but not
  in a ``site-packages``/``dist-packages`` directory below them, plus frozen modules);
* a package in :data:`LIBRARY_PACKAGES` (database drivers, greenlet, the integrations
  that wrap SQLAlchemy calls), recognised by the top-level name of the frame's module.

Code generated with ``exec`` (SQLAlchemy's decorators) has a file name like
``<string>``; it is judged by its module name alone.

Async engines
-------------
With an ``AsyncEngine``/``AsyncSession`` the statement runs inside a greenlet that
SQLAlchemy's ``greenlet_spawn`` started from the application's coroutine: the
greenlet's own stack ends at the sync function it runs and holds only SQLAlchemy
frames. ``greenlet_spawn`` created that greenlet with the coroutine's greenlet as its
*parent*, and the parent is suspended inside ``greenlet_spawn`` (in ``switch()``), so
``parent.gr_frame`` is that frame and its ``f_back`` chain runs through SQLAlchemy's
async wrappers up to the application's coroutine. When a greenlet's stack holds no
application frame, the walk continues in its parent's suspended stack.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import threading
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from ._hold import describe_code

__all__ = ["DEMO_MODULES", "FRAMES_BY_MODULE_NAME", "LIBRARY_PACKAGES", "SourceFinder"]

#: Modules of sqlprobe that are application code: ``sqlprobe demo``'s workload.
DEMO_MODULES = ("cli.py", "_scenario.py", "_loading.py")

#: Top-level packages whose frames never count as the application's: database
#: drivers, greenlet, and libraries that call SQLAlchemy on the application's behalf.
LIBRARY_PACKAGES: frozenset[str] = frozenset(
    {
        "sqlalchemy",
        "sqlprobe",
        "greenlet",
        "gevent",
        "eventlet",
        "psycopg",
        "psycopg2",
        "psycopg_pool",
        "psycopg_binary",
        "asyncpg",
        "pymysql",
        "MySQLdb",
        "mysql",
        "mariadb",
        "aiomysql",
        "asyncmy",
        "aiosqlite",
        "pysqlite2",
        "oracledb",
        "cx_Oracle",
        "pyodbc",
        "pymssql",
        "aioodbc",
        "pg8000",
        "opentelemetry",
        "structlog",
        "flask_sqlalchemy",
        "sqlmodel",
    }
)

#: Frames inspected per greenlet, and greenlet hops, before the walk gives up.
MAX_FRAMES = 256
MAX_GREENLET_HOPS = 8

#: ``sys._getframemodulename`` (Python 3.12+): a frame's module without a frame object.
_getframemodulename: Callable[[int], str | None] | None = getattr(sys, "_getframemodulename", None)
#: Whether :meth:`SourceFinder.locate_caller` skips library frames by module name.
FRAMES_BY_MODULE_NAME = _getframemodulename is not None

#: Decisions cached per file name; cleared when full (the set of loaded files is
#: small in practice, the bound is for the pathological case).
MAX_CACHED_FILES = 4096


def _package_dir(module: Any) -> str:
    return os.path.dirname(os.path.abspath(str(module.__file__))) + os.sep


@functools.cache
def _stdlib_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    # sysconfig expands its path templates on every call (about 3 ms): once per process.
    roots: set[str] = set()
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.abspath(path) + os.sep)
            roots.add(os.path.realpath(path) + os.sep)
    return tuple(roots), (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


class SourceFinder:
    """Finds ``path.py:LINE in function`` of the first application frame.

    Built once per probe at attach time (the package directories, the stdlib paths and
    greenlet's ``getcurrent`` are looked up here, not per call).
    """

    def __init__(self) -> None:
        import sqlalchemy

        # The package directory: this file lives in sqlprobe/_core/.
        own = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
        self._own_dirs = (own, _package_dir(sqlalchemy))
        # sqlprobe's demo is an application in its own right: its workload's frames are
        # the ones a slow_query or n_plus_one event should point at.
        self._demo_files = frozenset(
            os.path.abspath(os.path.join(own, name)) for name in DEMO_MODULES
        )
        self._stdlib, self._site_markers = _stdlib_dirs()
        self._cache: dict[str, bool] = {}
        self._lock = threading.Lock()
        # greenlet is looked up when a source is wanted, and only if something already
        # imported it (SQLAlchemy's asyncio support does): sqlprobe must not import it.
        self._getcurrent: Callable[[], Any] | None = None
        #: code objects judged a library's, and the application's (the checkout path's
        #: cache: a code object belongs to one file and module, so the decision holds
        #: for all its frames); bounded together by MAX_CACHED_FILES
        self._libraries: set[CodeType] = set()
        self._applications: set[CodeType] = set()
        #: module name -> whether it is a library's (Python 3.12+, locate_caller)
        self._modules: dict[str, bool] = {}

    def is_library(self, frame: FrameType) -> bool:
        """Whether ``frame`` belongs to sqlprobe, SQLAlchemy, the stdlib or a driver."""
        filename = frame.f_code.co_filename
        module = frame.f_globals.get("__name__")
        top = module.partition(".")[0] if isinstance(module, str) else ""
        if filename.startswith("<"):
            return filename.startswith("<frozen") or top in LIBRARY_PACKAGES
        cached = self._cache.get(filename)
        if cached is not None:
            return cached
        decision = self._decide(filename, top)
        with self._lock:
            if len(self._cache) >= MAX_CACHED_FILES:
                self._cache.clear()
            self._cache[filename] = decision
        return decision

    def _decide(self, filename: str, top: str) -> bool:
        path = os.path.abspath(filename)
        if path in self._demo_files:
            return False
        if top in LIBRARY_PACKAGES:
            return True
        if path.startswith(self._own_dirs):
            return True
        if path.startswith(self._stdlib):
            return not any(marker in path for marker in self._site_markers)
        return False

    def application_frame(self, frame: FrameType | None) -> FrameType | None:
        """The first application frame from ``frame`` outwards, crossing greenlets."""
        if self._getcurrent is None:
            module = sys.modules.get("greenlet")
            if module is not None:
                self._getcurrent = module.getcurrent
        greenlet = self._getcurrent() if self._getcurrent is not None else None
        hops = 0
        while True:
            steps = 0
            while frame is not None and steps < MAX_FRAMES:
                if not self.is_library(frame):
                    return frame
                frame = frame.f_back
                steps += 1
            parent = getattr(greenlet, "parent", None)
            if parent is None or hops >= MAX_GREENLET_HOPS:
                return None
            greenlet = parent
            frame = getattr(parent, "gr_frame", None)
            hops += 1

    def locate(self, frame: FrameType | None) -> tuple[CodeType | None, int]:
        """The code object and instruction offset of the first application frame.

        ``(None, 0)`` when no frame is the application's; ``_hold.line_of`` turns the
        offset into the line.

        The same walk as :meth:`application_frame`, for every pool checkout, so it is
        kept to a few bytecodes per frame: code objects already judged to be a
        library's are in one set (a membership test per frame, no path work), the
        application's in another, and only a code object seen for the first time is
        judged (:meth:`_learn`). Only the code object and the offset are kept, never
        the frame, so nothing of the caller's locals outlives the call. Lines and names
        are resolved when an event is written (:func:`~._hold.describe_code`).
        """
        libraries = self._libraries
        applications = self._applications
        greenlet: Any = None
        hops = 0
        while True:
            while frame is not None:
                code = frame.f_code
                if code in libraries:
                    frame = frame.f_back
                elif code in applications or not self._learn(frame):
                    return code, frame.f_lasti
                else:
                    frame = frame.f_back
            # No application frame in this greenlet's stack: an AsyncEngine's checkout
            # runs in the greenlet SQLAlchemy spawned; continue in its parent's stack.
            if hops == 0:
                if self._getcurrent is None:
                    module = sys.modules.get("greenlet")
                    if module is None:
                        return None, 0
                    self._getcurrent = module.getcurrent
                greenlet = self._getcurrent()
            parent = getattr(greenlet, "parent", None)
            if parent is None or hops >= MAX_GREENLET_HOPS:
                return None, 0
            greenlet = parent
            frame = getattr(parent, "gr_frame", None)
            hops += 1

    def locate_caller(self, depth: int) -> tuple[CodeType | None, int]:
        """:meth:`locate` from the frame ``depth`` levels above the caller of this method.

        On Python 3.12 and later, the frames between are skipped by their module's name
        (``sys._getframemodulename``, which reads the interpreter's frames without
        making a frame object of each): a module judged a library's once, by its file,
        is skipped without a frame object, and only the application's frame is made
        into one (``sys._getframe``) and checked by its code object as :meth:`locate`
        does. A frame whose module cannot be named (module-level code, a module not in
        ``sys.modules``) ends the skipping; :meth:`locate` carries on from there. On
        Python 3.11 this is :meth:`locate` of ``sys._getframe(depth + 1)``.
        """
        d = depth + 1  # this method's own frame is 0
        modulename = _getframemodulename
        if modulename is not None:
            modules = self._modules
            while True:
                name = modulename(d)  # None: module-level code, or past the stack's end
                if name is None:
                    break
                library = modules.get(name)
                if library is None:
                    library = self._judge_module(name)
                if not library:
                    break
                d += 1
        try:
            frame: FrameType | None = sys._getframe(d)
        except ValueError:  # past the end of this stack: locate() crosses greenlets
            frame = None
        return self.locate(frame)

    def _judge_module(self, name: str) -> bool:
        """Whether module ``name`` is a library's, by its file (False: look at the frame)."""
        module = sys.modules.get(name)
        filename = getattr(module, "__file__", None)
        if not isinstance(filename, str) or filename.startswith("<"):
            return False  # undecided here: the frame itself is judged by locate()
        decision = self._decide(filename, name.partition(".")[0])
        with self._lock:
            if len(self._modules) >= MAX_CACHED_FILES:
                self._modules.clear()
            self._modules[name] = decision
        return decision

    def _learn(self, frame: FrameType) -> bool:
        """Judge a code object seen for the first time; True when it is a library's."""
        library = self.is_library(frame)
        with self._lock:
            if len(self._libraries) + len(self._applications) >= MAX_CACHED_FILES:
                self._libraries.clear()
                self._applications.clear()
            (self._libraries if library else self._applications).add(frame.f_code)
        return library

    def source(self, frame: FrameType | None) -> str:
        """``path.py:LINE in function`` (relative to the cwd when under it), or ``""``."""
        found = self.application_frame(frame)
        if found is None:
            return ""
        return describe(found)


def describe(frame: FrameType) -> str:
    """``path.py:LINE in function`` of one frame; the path is relative to the cwd if under it."""
    return describe_code(frame.f_code, frame.f_lineno or 0)


def caller_frame() -> FrameType:
    """The frame of whoever called the caller of this function."""
    return sys._getframe(2)
