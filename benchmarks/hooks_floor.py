"""What a hook costs before it does any work: SQLAlchemy's events against plain wrappers.

    .venv/bin/python benchmarks/hooks_floor.py [--rounds 101]

Every variant is a bare engine with one empty hook added, nothing of sqlprobe's:

* a ``do_execute`` DialectEvents listener that calls the dialect's ``do_execute`` and
  returns True (what sqlprobe's statement hook does, minus its work);
* a function shadowing ``do_execute`` on the engine's dialect *instance* that calls the
  class's method (SQLAlchemy calls ``self.dialect.do_execute``, so an instance
  attribute is seen);
* a PoolEvents ``checkin`` listener that does nothing;
* a PoolEvents ``checkout`` listener that does nothing;
* a function shadowing ``connect`` on the pool instance that calls the class's method;
* functions shadowing ``do_begin``/``do_commit``/``do_rollback`` on the dialect instance.

Each hook is timed on the smallest loop that runs it, in interleaved rounds (a whole
request unit's round-to-round noise on a shared machine is larger than these costs):
the statement hooks per primary-key SELECT on SQLite in-memory (one open connection);
the pool and transaction hooks per ``pool.connect().close()`` cycle and per empty unit
``with engine.begin(): pass`` on a file SQLite database with its QueuePool. *added* is
the median over rounds of (variant - bare) in the same round. Times are the thread's
CPU time (see ``common.interleaved``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

sys.path.insert(0, os.path.dirname(__file__))
from common import QUERY, environment, interleaved, items, machine_noise, metadata, paired_median


def _bare(engine: Engine) -> None:
    pass


def _execute_listener(engine: Engine) -> None:
    do_execute = engine.dialect.do_execute

    def on_do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        do_execute(cursor, statement, parameters, context)
        return True

    event.listen(engine, "do_execute", on_do_execute)


def _execute_wrapper(engine: Engine) -> None:
    dialect = engine.dialect
    original = type(dialect).do_execute

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        original(dialect, cursor, statement, parameters, context)

    dialect.do_execute = do_execute  # type: ignore[method-assign]


def _checkin_listener(engine: Engine) -> None:
    def on_checkin(dbapi_connection: Any, record: Any) -> None:
        pass

    event.listen(engine, "checkin", on_checkin)


def _checkout_listener(engine: Engine) -> None:
    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        pass

    event.listen(engine, "checkout", on_checkout)


def _connect_wrapper(engine: Engine) -> None:
    pool = engine.pool
    original = type(pool).connect

    def connect() -> Any:
        return original(pool)

    pool.connect = connect  # type: ignore[method-assign]


def _transaction_wrappers(engine: Engine) -> None:
    dialect = engine.dialect
    cls = type(dialect)
    for name in ("do_begin", "do_commit", "do_rollback"):
        original = getattr(cls, name)

        def wrapper(dbapi_connection: Any, original: Any = original) -> None:
            original(dialect, dbapi_connection)

        setattr(dialect, name, wrapper)


VARIANTS: list[tuple[str, Callable[[Engine], None]]] = [
    ("bare", _bare),
    ("do_execute DialectEvents listener", _execute_listener),
    ("do_execute wrapper on the dialect instance", _execute_wrapper),
    ("checkin PoolEvents listener (empty)", _checkin_listener),
    ("checkout PoolEvents listener (empty)", _checkout_listener),
    ("connect wrapper on the pool instance", _connect_wrapper),
    ("do_begin/do_commit/do_rollback wrappers on the dialect instance", _transaction_wrappers),
]


def _table(title: str, samples: dict[str, list[float]], per: str) -> None:
    bare = samples["bare"]
    print(f"#### {title}")
    print()
    print(f"| hook | µs per {per} (median) | min | added (paired median) | interquartile range |")
    print("|---|---:|---:|---:|---|")
    for name, values in samples.items():
        diffs = sorted(x - y for x, y in zip(values, bare, strict=True))
        q1, q3 = diffs[len(diffs) // 4], diffs[(3 * len(diffs)) // 4]
        print(
            f"| {name} | {statistics.median(values) * 1e6:.3f} | {min(values) * 1e6:.3f} | "
            f"{paired_median(values, bare) * 1e6:+.3f} | {q1 * 1e6:+.2f} to {q3 * 1e6:+.2f} |"
        )
    print()


def _seed(url: str) -> None:
    seed = create_engine(url)
    metadata.create_all(seed)
    with seed.begin() as conn:
        conn.execute(items.delete())
        conn.execute(items.insert(), [{"id": i, "name": f"n{i}"} for i in range(1, 101)])
    seed.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--json", help="also write every sample (seconds) to this file")
    args = parser.parse_args(argv)
    print(environment())
    print(machine_noise())
    print()
    all_samples: dict[str, dict[str, list[float]]] = {}
    keep: list[Any] = []

    # Per statement: SQLite in-memory, one open connection, the suite's primary-key SELECT.
    runs: list[tuple[str, Callable[[int], None], int]] = []
    for name, setup in VARIANTS[:3]:
        engine = create_engine("sqlite://")
        metadata.create_all(engine)
        with engine.begin() as c:
            c.execute(items.insert(), [{"id": i, "name": f"n{i}"} for i in range(1, 11)])
        setup(engine)
        conn = engine.connect()
        keep.append((engine, conn))

        def statement(n: int, conn: Any = conn) -> None:
            execute = conn.execute
            for _ in range(n):
                execute(QUERY).all()

        statement(500)
        runs.append((name, statement, 500))
    all_samples["statement"] = samples = interleaved(runs, args.rounds)
    _table("Per statement (SQLite in-memory, one connection)", samples, "statement")

    with tempfile.TemporaryDirectory(prefix="sqlprobe-bench-") as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        _seed(url)
        pool_variants = [VARIANTS[0], *VARIANTS[3:]]
        # Per checkout: pool.connect().close(), the reset-on-return rollback included.
        runs = []
        for name, setup in pool_variants:
            engine = create_engine(url, poolclass=QueuePool)
            setup(engine)
            keep.append(engine)

            def cycle(n: int, engine: Engine = engine) -> None:
                connect = engine.pool.connect
                for _ in range(n):
                    connect().close()

            cycle(500)
            runs.append((name, cycle, 500))
        all_samples["checkout"] = samples = interleaved(runs, args.rounds)
        _table("Per checkout (file SQLite, QueuePool: `pool.connect().close()`)", samples, "cycle")

        # Per empty unit: with engine.begin(): pass (checkout, begin, commit, check-in).
        runs = []
        for name, setup in pool_variants:
            engine = create_engine(url, poolclass=QueuePool)
            setup(engine)
            keep.append(engine)

            def empty_unit(n: int, engine: Engine = engine) -> None:
                begin = engine.begin
                for _ in range(n):
                    with begin():
                        pass

            empty_unit(500)
            runs.append((name, empty_unit, 500))
        all_samples["empty unit"] = samples = interleaved(runs, args.rounds)
        _table(
            "Per empty unit (file SQLite, QueuePool: `with engine.begin(): pass`)",
            samples,
            "unit",
        )
        for held in keep:
            if isinstance(held, tuple):
                held[1].close()
                held = held[0]
            held.dispose()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_samples, f)
    print(f"{args.rounds} interleaved rounds; times are the thread's CPU time.")
    print(machine_noise())
    return 0


if __name__ == "__main__":
    sys.exit(main())
