"""``sqlprobe run -- COMMAND``: instrument a Python program without changing its code.

Like ``opentelemetry-instrument``, the runner starts ``COMMAND`` with a directory of
its own first on ``PYTHONPATH``. That directory holds a ``sitecustomize`` module, which
Python imports at start-up in every interpreter that inherits the variable, and a JSON
file with the runner's settings. The module calls :func:`bootstrap`, which does what an
application would do by hand:

* ``sqlprobe.attach()`` without an engine, so that every engine the program creates is
  attached (configured by the ``SQLPROBE_*`` variables, as usual);
* ``sqlprobe.start_http_server()`` on the runner's address and port. Only one process
  of the command can hold the port: the first one to start binds it (the runner checked
  that it was free), and the others, such as pre-fork workers, find it taken and leave
  it to that one;

then it hands over to the application's own ``sitecustomize``, if there is one further
down the path, so that nothing the environment already did is lost.

Pre-fork servers (gunicorn, uWSGI, ``uvicorn --workers``) get prometheus_client's
multiprocess mode: the runner sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory
before the command starts, the workers write their values there, and the process that
serves ``/metrics`` sums them. ``--multiprocess`` asks for it with other commands.

The command is looked up on ``PATH`` with the bin directory of sqlprobe's own Python
first (as if its virtualenv were activated), so ``python``, ``gunicorn`` or ``flask``
mean the ones installed beside sqlprobe. The runner forwards SIGINT and SIGTERM to the
command, returns its exit status, and removes its directories when the command ends.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

__all__ = ["RunError", "RunSettings", "bootstrap", "run"]

SETTINGS_FILE = "sqlprobe-run.json"
PRE_FORK_SERVERS = ("gunicorn", "uwsgi")

# The generated sitecustomize: self-contained, so that a Python without sqlprobe still
# runs the command (uninstrumented, with one line saying why) and still gets its own
# sitecustomize.
SITECUSTOMIZE = '''\
"""Written by `sqlprobe run`: attach sqlprobe, then run the next sitecustomize."""

import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.abspath(__file__))
try:
    from sqlprobe._run import bootstrap as _bootstrap
except Exception as _exc:  # another interpreter, without sqlprobe
    _sys.stderr.write(
        f"sqlprobe run: sqlprobe cannot be imported by {_sys.executable} ({_exc}); "
        "this process runs without it\\n"
    )
else:
    _bootstrap(_os.path.join(_here, "sqlprobe-run.json"))

_rest = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]
_spec = _machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
    _module = _util.module_from_spec(_spec)
    _sys.modules["sitecustomize"] = _module
    _spec.loader.exec_module(_module)
'''


class RunError(Exception):
    """A user error of ``sqlprobe run``: ``argument`` names what to fix."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


@dataclass(frozen=True)
class RunSettings:
    """What :func:`bootstrap` reads in each process of the command."""

    serve: bool
    addr: str
    port: int


def _pre_fork(command: Sequence[str]) -> bool:
    name = Path(command[0]).name
    if name in PRE_FORK_SERVERS:
        return True
    return name == "uvicorn" and any(
        a == "--workers" or a.startswith("--workers=") for a in command
    )


def _reserve(addr: str, port: int) -> int:
    """Check that ``addr:port`` can be bound now; returns the port (a free one for 0)."""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RunError("--addr", f"address {addr!r} does not resolve ({exc.strerror})") from None
    family, kind, proto, _name, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RunError(
                    "--port",
                    f"cannot serve /metrics on {addr}:{port}: port {port} is already in use "
                    "(choose another port, or 0 for a free one)",
                ) from None
            raise RunError(
                "--addr", f"cannot serve /metrics on {addr}:{port}: {exc.strerror or exc}"
            ) from None
        bound: int = probe.getsockname()[1]
        return bound


def run(
    command: Sequence[str],
    *,
    serve: bool,
    addr: str,
    port: int,
    multiprocess: bool | None = None,
    slow_query_ms: float | None = None,
) -> int:
    """Run ``command`` instrumented; returns its exit status (128 + N for signal N)."""
    if not command:
        raise RunError("COMMAND", "expected a command to run after --, e.g. -- python app.py")
    # The interpreter's own bin directory first, as if its virtualenv were activated:
    # `sqlprobe run -- python app.py` (or gunicorn, flask...) then means the Python that
    # has sqlprobe, not whichever comes first on PATH.
    path = os.pathsep.join(
        p for p in (str(Path(sys.executable).parent), os.environ.get("PATH", "")) if p
    )
    executable = shutil.which(command[0], path=path)
    if executable is None:
        raise RunError("COMMAND", f"{command[0]!r} is not an executable on PATH")
    if serve:
        port = _reserve(addr, port)
    if multiprocess is None:
        multiprocess = _pre_fork(command)

    boot = Path(tempfile.mkdtemp(prefix="sqlprobe-run-"))
    env = dict(os.environ, PATH=path)
    try:
        (boot / "sitecustomize.py").write_text(SITECUSTOMIZE)
        settings = RunSettings(serve=serve, addr=addr, port=port)
        (boot / SETTINGS_FILE).write_text(json.dumps(asdict(settings)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(boot), env.get("PYTHONPATH", "")) if p)
        if multiprocess:
            prom = boot / "prometheus"
            prom.mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
        if slow_query_ms is not None:
            env["SQLPROBE_SLOW_QUERY_MS"] = f"{slow_query_ms:g}"
        if serve:
            host = f"[{addr}]" if ":" in addr else addr
            mode = " (multiprocess: the sum of all workers)" if multiprocess else ""
            print(f"sqlprobe run: /metrics at http://{host}:{port}/metrics{mode}", file=sys.stderr)
        child = subprocess.Popen([executable, *command[1:]], env=env)

        def forward(signum: int, _frame: FrameType | None) -> None:
            if child.poll() is None:
                child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                try:
                    code = child.wait()
                    break
                except KeyboardInterrupt:  # pragma: no cover - forwarded, keep waiting
                    continue
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        shutil.rmtree(boot, ignore_errors=True)
    return 128 - code if code < 0 else code


def bootstrap(settings_path: str) -> None:
    """In a process of the command: attach sqlprobe to every engine, maybe serve /metrics.

    Never raises: a failure is one line on stderr and the program runs on.
    """
    try:
        with open(settings_path, encoding="utf-8") as f:
            settings = RunSettings(**json.load(f))
        import sqlprobe

        sqlprobe.attach()
    except Exception as exc:
        print(f"sqlprobe run: not attached in process {os.getpid()}: {exc}", file=sys.stderr)
        return
    if not settings.serve:
        return
    from ._server import MetricsServerError

    try:
        sqlprobe.start_http_server(port=settings.port, addr=settings.addr)
    except MetricsServerError as exc:
        if exc.errno != errno.EADDRINUSE:
            print(f"sqlprobe run: {exc}", file=sys.stderr)
        # In use: another process of this command (the one started first) serves it.
    except Exception as exc:
        print(f"sqlprobe run: cannot serve /metrics: {exc}", file=sys.stderr)
