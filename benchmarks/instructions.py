"""sqlprobe's cost in CPU instructions, which a busy machine cannot blur.

    .venv/bin/python benchmarks/instructions.py [--variants bare,metrics,default]

Wall and CPU times on a shared two-core machine swing by a factor of three within a
minute (``common.machine_noise``), which buries differences of a microsecond unless a
run is long and the machine quiet. ``valgrind --tool=callgrind`` counts the
instructions a process executes instead: the count is the same, run after run, whatever
else the machine does (``PYTHONHASHSEED`` and the garbage collector are pinned, so the
interpreter does the same work each time). Instructions are not microseconds, but an
added share of instructions is a good estimate of an added share of CPU time for code
that, like this, is interpreter overhead rather than memory traffic.

Each variant runs the loops of ``suite.py``'s request section (a request unit:
checkout from the QueuePool of a file SQLite database, begin, three primary-key
SELECTs, commit, check-in; and a primary-key SELECT on an open connection) twice, with
``LOW`` and ``HIGH`` iterations, in separate processes under callgrind; the difference
divided by ``HIGH - LOW`` is the count per iteration, free of start-up and set-up.
The same statement on an in-memory SQLite database (the reference loop of the
per-statement targets) runs too. The report gives instructions per unit and per
statement, the added count over bare SQLAlchemy, the ratio, and the unit's cost beyond
its three statements.

What makes the count repeatable (each of these was seen to move it by 10-30k
instructions per unit from one invocation to the next on a loaded machine):

* only the loop is counted: the worker starts with instrumentation off
  (``--instr-atstart=no``; imports and set-up run uninstrumented and fast), the parent
  switches it on with ``callgrind_control`` once the worker is ready, and the loop
  runs inside ``itertools.dropwhile`` so that ``--toggle-collect=dropwhile_next``
  collects exactly the iterations, not the worker's waiting before and after;
* callgrind slows the program about 50x, so every time threshold is stretched alike
  (the ambient span interval, the slow-query, pool-hold, idle-in-transaction and
  pool-wait thresholds): otherwise a statement or a checkout crosses one by chance
  when the machine is busy, and its slow path is counted;
* the pool-hold watchdog thread is stopped in the worker: it wakes by wall time
  (every 0.25-5 s, nothing per unit), so under callgrind it would run 50x as often;
* each worker reads a copy of the database file of its own, and the processes run one
  at a time by default (``--jobs 1``): two workers reading one SQLite file at once
  counted differently from one alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import dropwhile

HERE = os.path.dirname(os.path.abspath(__file__))
LOW, HIGH = 200, 1200
SLOWDOWN = 50
LOOPS = ("unit", "statement", "memory")
VARIANTS = {
    "bare": "bare SQLAlchemy",
    "floor": "bare + the pool hook points, empty (suite._hooks_floor)",
    "metrics": "sqlprobe metrics only (no pool hooks)",
    "pool": "sqlprobe + pool/tx metrics",
    "default": "sqlprobe defaults (+ N+1)",
    "otel": "otel-instrumentation-sqlalchemy (no SDK spans exported)",
}


def worker(variant: str, loop: str, n: int, path: str, flag: str) -> None:
    """Run one loop ``n`` times in this process (the part callgrind counts)."""
    import gc

    sys.path.insert(0, HERE)
    import suite
    from sqlalchemy import create_engine
    from sqlalchemy.pool import QueuePool

    url = f"sqlite:///{path}"
    setup = {
        "bare": suite._bare,
        "floor": suite._hooks_floor,
        "metrics": suite._metrics_only,
        "pool": suite._metrics_pool,
        "default": suite._default,
    }.get(variant)
    if variant == "otel":
        from opentelemetry.sdk.trace import TracerProvider

        setup = suite._otel_instrumentation(TracerProvider(), False)
    assert setup is not None
    # The ambient span lookup (exemplars) happens once per AMBIENT_INTERVAL of wall
    # time: how many statements share one depends on how fast the machine runs the
    # counted process, which under callgrind and with other work on the machine varies
    # by a factor of several. Only the first statement looks: the count is of the
    # statements between two looks, which are all but one in 10 ms at full speed.
    from sqlprobe._sinks import _otel

    _otel.AMBIENT_INTERVAL = float("inf")
    stretched = {
        "slow_query_threshold": 0.1 * SLOWDOWN,
        "pool_hold_threshold": 1.0 * SLOWDOWN,
        "idle_in_transaction_threshold": 0.5 * SLOWDOWN,
        "pool_wait_threshold": 1.0 * SLOWDOWN,
    }
    if loop == "memory":
        url = "sqlite://"
    # In-memory SQLite keeps SQLAlchemy's default pool (one connection per thread), so
    # the table made here is the one the loop reads.
    engine = create_engine(url) if loop == "memory" else create_engine(url, poolclass=QueuePool)
    if loop == "memory":
        suite._fill(engine)
    # An older sqlprobe (PYTHONPATH=another checkout) may lack some of the options.
    import inspect

    import sqlprobe

    known = inspect.signature(sqlprobe.attach).parameters
    suite.ATTACH_OPTIONS.update({k: v for k, v in stretched.items() if k in known})
    # --options: attach options of every sqlprobe variant (a knock-out, e.g. a threshold).
    suite.ATTACH_OPTIONS.update(json.loads(os.environ.get("SQLPROBE_BENCH_OPTIONS", "{}")))
    teardown = setup(engine)
    import sqlprobe._state

    watchdog = getattr(sqlprobe._state, "watchdog", None)  # None before the pool watchdog
    if watchdog is not None:
        watchdog.at_exit()
    queries = suite.UNIT_QUERIES
    query = suite.QUERY
    # Warm every cache (SQLAlchemy's compiled cache, sqlprobe's shapes) first.
    with engine.begin() as c:
        for q in queries:
            c.execute(q).all()
    conn = engine.connect()
    conn.execute(query).all()
    gc.collect()
    gc.disable()
    if loop == "memory":
        loop = "statement"
    if loop == "unit":
        begin = engine.begin

        def one(_i: int) -> bool:
            with begin() as c:
                for q in queries:
                    c.execute(q).all()
            return True

    else:
        execute = conn.execute

        def one(_i: int) -> bool:
            execute(query).all()
            return True

    # The parent switches instrumentation on while this waits, and collects only
    # inside ``dropwhile_next`` (--toggle-collect): the loop, not the waiting.
    print("READY", flush=True)
    _wait_for(flag)
    for _ in dropwhile(one, range(n)):
        pass
    print("DONE", flush=True)
    _wait_for(flag + ".off")
    conn.close()
    teardown()


def _wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.001)


_slot = threading.local()
_slots = itertools.count()


def count(variant: str, loop: str, n: int, path: str) -> int:
    """Instructions of one worker process's loop under callgrind."""
    with tempfile.TemporaryDirectory() as scratch:
        # The same path in every run (a random one would change the URL's length and
        # hash, and with them the work done), of its own for each worker running at once.
        if not hasattr(_slot, "n"):
            _slot.n = next(_slots)
        tmp = os.path.join(tempfile.gettempdir(), f"sqlprobe-instructions-{_slot.n}")
        os.makedirs(tmp, exist_ok=True)
        out = os.path.join(scratch, "callgrind.out")
        flag = os.path.join(scratch, "go")
        try:
            shutil.copyfile(path, os.path.join(tmp, "bench.db"))
            path = os.path.join(tmp, "bench.db")
            env = {**os.environ, "PYTHONHASHSEED": "0"}
            worker = subprocess.Popen(
                [
                    "valgrind",
                    "--tool=callgrind",
                    "--instr-atstart=no",
                    "--toggle-collect=dropwhile_next",
                    f"--callgrind-out-file={out}",
                    sys.executable,
                    __file__,
                    "--worker",
                    variant,
                    loop,
                    str(n),
                    path,
                    flag,
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            assert worker.stdout is not None
            control = ["callgrind_control", "-i"]
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}
            assert worker.stdout.readline().strip() == "READY", "the worker did not start"
            subprocess.run([*control, "on", str(worker.pid)], **quiet)  # type: ignore[call-overload]
            open(flag, "w").close()
            assert worker.stdout.readline().strip() == "DONE", "the worker did not finish"
            subprocess.run([*control, "off", str(worker.pid)], **quiet)  # type: ignore[call-overload]
            open(flag + ".off", "w").close()
            if worker.wait() != 0:
                raise RuntimeError(f"worker {variant} {loop} {n} failed")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a fixed name: leave nothing behind
        with open(out) as f:
            text = f.read()
    match = re.search(r"^totals:\s+(\d+)", text, re.M)
    assert match, "no instruction total in callgrind's output"
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--options", default="", help="JSON attach options for the sqlprobe variants"
    )
    parser.add_argument("--loops", default=",".join(LOOPS), help="of: " + ",".join(LOOPS))
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        variant, loop, n, path, flag = args.worker
        worker(variant, loop, int(n), path, flag)
        return 0
    names = [v for v in args.variants.split(",") if v]
    if args.options:
        json.loads(args.options)  # fail here, not in every worker
        os.environ["SQLPROBE_BENCH_OPTIONS"] = args.options
    loops = [loop for loop in LOOPS if loop in args.loops.split(",")]
    if names[0] != "bare":
        names.insert(0, "bare")
    sys.path.insert(0, HERE)
    import suite
    from sqlalchemy import create_engine
    from sqlalchemy.pool import QueuePool

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.db")
        seed = create_engine(f"sqlite:///{path}", poolclass=QueuePool)
        suite._fill(seed)
        seed.dispose()
        # One run of each variant first, outside callgrind: it writes every module's
        # bytecode cache, which the counted runs would otherwise race to write (a
        # compile costs millions of instructions, more than the differences measured).
        warm = os.path.join(tmp, "warm")
        for name in (warm, warm + ".off"):
            open(name, "w").close()
        for v in names:
            subprocess.run(
                [sys.executable, __file__, "--worker", v, "unit", "1", path, warm],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        jobs = [(v, loop, n) for v in names for loop in loops for n in (LOW, HIGH)]
        with ThreadPoolExecutor(args.jobs) as pool:
            totals = dict(zip(jobs, pool.map(lambda j: count(*j, path), jobs), strict=True))
    per = {
        (v, loop): (totals[(v, loop, HIGH)] - totals[(v, loop, LOW)]) / (HIGH - LOW)
        for v in names
        for loop in loops
    }
    if "unit" in loops and "statement" in loops:
        _units(names, per)
    if "memory" in loops:
        _memory(names, per)
    return 0


def _units(names: list[str], per: dict[tuple[str, str], float]) -> None:
    bare_u, bare_s = per[("bare", "unit")], per[("bare", "statement")]
    print(f"instructions per iteration (callgrind; {LOW} and {HIGH} iterations)\n")
    print("file SQLite (QueuePool): a request unit, and a statement on an open connection\n")
    print(
        "| variant | per unit | added per unit | ratio | per statement "
        "| added per statement | ratio | added beyond 3 statements |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in names:
        u, s = per[(v, "unit")], per[(v, "statement")]
        du, ds = u - bare_u, s - bare_s
        print(
            f"| {VARIANTS[v]} | {u:,.0f} | {du:+,.0f} | {u / bare_u:.3f} | {s:,.0f} "
            f"| {ds:+,.0f} | {s / bare_s:.3f} | {du - 3 * ds:+,.0f} |"
        )


def _memory(names: list[str], per: dict[tuple[str, str], float]) -> None:
    bare_m = per[("bare", "memory")]
    print("\nin-memory SQLite: a primary-key SELECT on an open connection\n")
    print("| variant | per statement | added | ratio |")
    print("|---|---:|---:|---:|")
    for v in names:
        m = per[(v, "memory")]
        print(f"| {VARIANTS[v]} | {m:,.0f} | {m - bare_m:+,.0f} | {m / bare_m:.3f} |")


if __name__ == "__main__":
    raise SystemExit(main())
