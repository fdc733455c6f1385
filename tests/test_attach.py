"""attach(), Probe and detach(): idempotence, several engines, options, environment."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

import sqlprobe

from .conftest import sample, total

pytestmark = pytest.mark.smoke

CALLS = "sqlprobe_statement_calls_total"


def _run(engine: Engine, sql: str = "SELECT 1", times: int = 1) -> None:
    with engine.connect() as conn:
        for _ in range(times):
            conn.execute(text(sql))


def test_attach_counts_statements(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """Every executed statement is counted once under its engine label."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    _run(sqlite_engine, times=7)
    assert probe.name == "sqlite:///:memory:"
    assert total(registry, CALLS, engine="sqlite:///:memory:") == 7
    probe.detach()


def test_second_attach_returns_same_probe(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """A second attach() returns the existing probe and nothing is counted twice."""
    first = sqlprobe.attach(sqlite_engine, registry=registry)
    second = sqlprobe.attach(sqlite_engine, registry=registry)
    assert first is second
    _run(sqlite_engine, times=3)
    assert total(registry, CALLS) == 3
    first.detach()


def test_detach_removes_every_listener(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """After detach() no sqlprobe listener is left on the engine, its dialect or its pool."""

    def listeners() -> dict[str, int]:
        out: dict[str, int] = {}
        for target in (sqlite_engine.dialect, sqlite_engine.pool, sqlite_engine):
            for name in dir(target.dispatch):
                if name.startswith("_"):
                    continue
                coll = getattr(target.dispatch, name, None)
                if coll is not None and hasattr(coll, "__len__"):
                    out[f"{type(target).__name__}.{name}"] = len(coll)
        return out

    before = listeners()
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    during = listeners()
    assert during != before
    probe.detach()
    assert listeners() == before
    assert not probe.attached
    _run(sqlite_engine)
    assert total(registry, CALLS) == 0
    probe.detach()  # a second detach is harmless


def test_attach_after_detach_counts_again(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """A detached engine can be attached again, and then counts once per statement."""
    sqlprobe.attach(sqlite_engine, registry=registry).detach()
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    _run(sqlite_engine, times=2)
    assert total(registry, CALLS) == 2
    probe.detach()


def test_several_engines_have_separate_labels(registry: CollectorRegistry) -> None:
    """Two engines are counted under their own names; name= replaces the URL label."""
    a = create_engine("sqlite://")
    b = create_engine("sqlite://")
    pa = sqlprobe.attach(a, registry=registry, name="orders-db")
    pb = sqlprobe.attach(b, registry=registry, name="users-db")
    _run(a, times=2)
    _run(b, times=5)
    assert total(registry, CALLS, engine="orders-db") == 2
    assert total(registry, CALLS, engine="users-db") == 5
    pa.detach()
    pb.detach()


def test_engines_sharing_a_name_add_up(registry: CollectorRegistry) -> None:
    """Engines given the same name share their series; detaching one keeps the other's."""
    a = create_engine("sqlite://")
    b = create_engine("sqlite://")
    pa = sqlprobe.attach(a, registry=registry, name="shared")
    pb = sqlprobe.attach(b, registry=registry, name="shared")
    _run(a, times=2)
    _run(b, times=3)
    assert total(registry, CALLS, engine="shared") == 5
    pa.detach()
    _run(b)
    assert total(registry, CALLS, engine="shared") == 6
    pb.detach()


def test_label_never_contains_credentials(registry: CollectorRegistry) -> None:
    """The engine label is dialect://host:port/database, without user or password."""
    engine = create_engine("postgresql+psycopg://alice:s3cr3t-pw@db.internal:6543/shop")
    probe = sqlprobe.attach(engine, registry=registry)
    assert probe.name == "postgresql://db.internal:6543/shop"
    probe.detach()


def test_last_detach_keeps_the_totals_in_the_registry(sqlite_engine: Engine) -> None:
    """When the last probe on a registry detaches, its series and totals stay registered."""
    registry = CollectorRegistry()
    probe = sqlprobe.attach(sqlite_engine, registry=registry, name="last")
    _run(sqlite_engine, times=2)
    probe.detach()
    assert total(registry, CALLS, engine="last") == 2
    assert any(m.name == "sqlprobe_pool_connects" for m in registry.collect())


def test_dropped_engine_keeps_its_totals_and_releases_its_share() -> None:
    """An engine garbage-collected without detach() keeps its totals; its probe goes."""
    from sqlprobe import _state

    registry = CollectorRegistry()
    engine = create_engine("sqlite://")
    probe = sqlprobe.attach(engine, registry=registry, name="short-lived")
    _run(engine)
    assert total(registry, CALLS, engine="short-lived") == 1
    engine.dispose()
    del engine
    gc.collect()
    assert total(registry, CALLS, engine="short-lived") == 1  # the scrape ran the clean-up
    assert not probe.attached
    assert probe not in _state.probes.values()


def test_global_attach_watches_new_engines(registry: CollectorRegistry) -> None:
    """attach() without an engine attaches every later engine; detach() undoes it."""
    probe = sqlprobe.attach(registry=registry)
    try:
        engine = create_engine("sqlite://")
        _run(engine, times=4)
        assert [p.engine for p in probe.probes] == [engine]
        assert total(registry, CALLS, engine="sqlite:///:memory:") == 4
        assert sqlprobe.attach(engine, registry=registry) is probe.probes[0]
    finally:
        probe.detach()
    later = create_engine("sqlite://")
    _run(later)
    assert total(registry, CALLS) == 4  # the totals stay, the later engine is not counted
    assert "do_execute" not in vars(later.dialect)


async def test_async_engine_is_attached_through_its_sync_engine(
    async_pg_engine: Any, registry: CollectorRegistry
) -> None:
    """attach() accepts an AsyncEngine, keeps it as probe.engine and counts its statements."""
    probe = sqlprobe.attach(async_pg_engine, registry=registry)
    assert probe.engine is async_pg_engine
    assert sqlprobe.attach(async_pg_engine.sync_engine, registry=registry) is probe
    async with async_pg_engine.connect() as conn:
        for _ in range(3):
            await conn.execute(text("SELECT 1 AS sqlprobe_async_probe"))
    mine = [s for s in probe.statements() if "sqlprobe_async_probe" in s.statement]
    assert [s.calls for s in mine] == [3]
    assert probe.name == "postgresql://127.0.0.1:5432/test"
    probe.detach()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slow_query_threshold": -1}, "slow_query_threshold must be >= 0"),
        ({"slow_query_threshold": "fast"}, "slow_query_threshold must be a number"),
        ({"sqlcommenter": "sometimes"}, "sqlcommenter must be False, True or 'static'"),
        ({"registry": object()}, "registry must be a prometheus_client.CollectorRegistry"),
        ({"max_fingerprints": 0}, "max_fingerprints must be >= 1"),
        ({"n_plus_one_threshold": -2}, "n_plus_one_threshold must be >= 0"),
        ({"capture_parameters": "yes"}, "capture_parameters must be True or False"),
        ({"buckets": [1.0, 0.5]}, "buckets must be strictly increasing"),
        ({"buckets": []}, "buckets must contain at least one"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"tracer_provider": 42}, "tracer_provider must have a get_tracer() method"),
        ({"logger": "sqlprobe"}, "logger must be a structlog-style logger"),
    ],
)
def test_bad_options_fail_at_attach(
    sqlite_engine: Engine, kwargs: dict[str, Any], message: str
) -> None:
    """A bad option raises ValueError at attach time, saying which option and why."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sqlprobe.attach(sqlite_engine, **kwargs)
    assert not sqlite_engine.dialect.dispatch.do_execute


def test_attach_rejects_non_engines() -> None:
    """Something that is not an Engine or AsyncEngine is refused with TypeError."""
    with pytest.raises(TypeError, match="Engine or AsyncEngine"):
        sqlprobe.attach("sqlite://")


def test_env_disables_sqlprobe(
    sqlite_engine: Engine, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLPROBE_ENABLED=0 makes attach() a no-op returning a detached probe."""
    monkeypatch.setenv("SQLPROBE_ENABLED", "0")
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    assert not probe.attached
    _run(sqlite_engine)
    assert total(registry, CALLS) == 0
    assert not sqlite_engine.dialect.dispatch.do_execute


def test_env_overrides_defaults_not_code(
    sqlite_engine: Engine, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLPROBE_SLOW_QUERY_MS replaces the default threshold; an explicit argument still wins."""
    monkeypatch.setenv("SQLPROBE_SLOW_QUERY_MS", "250")
    monkeypatch.setenv("SQLPROBE_CAPTURE_PARAMETERS", "true")
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    assert probe.options is not None
    assert probe.options.slow_query_threshold == 0.25
    assert probe.options.capture_parameters is True
    probe.detach()
    probe = sqlprobe.attach(sqlite_engine, registry=registry, slow_query_threshold=0.05)
    assert probe.options is not None
    assert probe.options.slow_query_threshold == 0.05
    probe.detach()


def test_slow_counter_exists_at_zero_from_attach(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """The slow-query counters are exported at 0 before any statement ran."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry)
    value = registry.get_sample_value(
        "sqlprobe_slow_queries_total", {"engine": probe.name or "", "operation": "SELECT"}
    )
    assert value == 0.0
    probe.detach()


def test_slow_queries_are_counted(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """A statement at or over the threshold counts in sqlprobe_slow_queries_total by operation."""
    probe = sqlprobe.attach(sqlite_engine, registry=registry, slow_query_threshold=0)
    _run(sqlite_engine, times=3)
    labels = {"engine": probe.name or "", "operation": "SELECT"}
    assert sample(registry, "sqlprobe_slow_queries_total", **labels) == 3
    probe.detach()


def test_import_does_no_work() -> None:
    """Importing sqlprobe or its pytest plugin imports neither SQLAlchemy nor prometheus_client."""
    import subprocess
    import sys

    code = (
        "import sys, sqlprobe, sqlprobe.pytest_plugin\n"
        "heavy = [m for m in ('sqlalchemy', 'prometheus_client', 'structlog')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(sqlprobe.attach) and 'sqlalchemy' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_engine_collected_while_sqlprobe_holds_a_lock() -> None:
    """An engine collected inside one of sqlprobe's locks queues its clean-up: no deadlock."""
    from sqlprobe import _state

    registry = CollectorRegistry()
    engine = create_engine("sqlite://")
    probe = sqlprobe.attach(engine, registry=registry, name="gc-in-lock")
    _run(engine)
    exporter = _state.exporter_for(registry)
    del engine
    with exporter.lock, _state.lock:
        gc.collect()  # the engine's finalizers run here and must not take these locks
    assert probe.attached  # queued, not run inside the locks
    assert total(registry, CALLS, engine="gc-in-lock") == 1  # the scrape ran the clean-up
    assert not probe.attached
