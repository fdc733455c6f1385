"""Configuration never takes an application down: bad SQLPROBE_* values warn and fall back.

Options passed in code are the developer's and still raise ValueError at attach; values
from the environment are the operator's and are reported once each on the standard
library logger ``sqlprobe``, with the default used instead.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.engine import Engine

import sqlprobe
from sqlprobe import _config

pytestmark = [pytest.mark.smoke, pytest.mark.usefixtures("detach_new_probes")]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with no SQLPROBE_* variable set and no warning given yet."""
    import os

    for name in list(os.environ):
        if name.startswith("SQLPROBE_") and not name.startswith("SQLPROBE_TEST_"):
            monkeypatch.delenv(name)
    _config._forget_warnings()
    yield
    _config._forget_warnings()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sqlprobe" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("SQLPROBE_SLOW_QUERY_MS", "soon", "a number of milliseconds"),
        ("SQLPROBE_SLOW_QUERY_MS", "-5", "a number of milliseconds"),
        ("SQLPROBE_SLOW_QUERY_MS", "nan", "a number of milliseconds"),
        ("SQLPROBE_CAPTURE_PARAMETERS", "sometimes", "1/0, true/false, yes/no, on/off"),
    ],
)
def test_bad_env_value_warns_and_uses_default(
    variable: str,
    value: str,
    accepted: str,
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A malformed SQLPROBE_* value logs one warning naming it and attach uses the default."""
    monkeypatch.setenv(variable, value)
    with caplog.at_level(logging.WARNING, logger="sqlprobe"):
        probe = sqlprobe.attach(sqlite_engine, registry=registry)
    assert probe.attached
    assert probe.options is not None
    assert probe.options.slow_query_threshold == 0.1
    assert probe.options.capture_parameters is False
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"{variable}={value!r}" in warnings[0]
    assert accepted in warnings[0]
    assert "using the default" in warnings[0]
    with sqlite_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert sum(s.calls for s in probe.statements()) == 1


def test_bad_env_value_warns_once_per_process(
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attaching again with the same bad value does not repeat the warning."""
    monkeypatch.setenv("SQLPROBE_SLOW_QUERY_MS", "soon")
    with caplog.at_level(logging.WARNING, logger="sqlprobe"):
        sqlprobe.attach(sqlite_engine, registry=registry).detach()
        sqlprobe.attach(sqlite_engine, registry=registry).detach()
    assert len(_warnings(caplog)) == 1


@pytest.mark.parametrize("value", ["maybe", "disabled", "2", "nein"])
def test_unrecognised_enabled_turns_sqlprobe_off(
    value: str,
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unrecognised SQLPROBE_ENABLED turns sqlprobe off, with a warning saying so."""
    monkeypatch.setenv("SQLPROBE_ENABLED", value)
    with caplog.at_level(logging.WARNING, logger="sqlprobe"):
        probe = sqlprobe.attach(sqlite_engine, registry=registry)
    assert not probe.attached
    assert not sqlite_engine.dialect.dispatch.do_execute
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"SQLPROBE_ENABLED={value!r}" in warnings[0]
    assert "1/0, true/false, yes/no, on/off" in warnings[0]
    assert "sqlprobe is off" in warnings[0]


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("1", True), ("on", True), (" Yes ", True), ("0", False), ("OFF", False), ("", True)],
)
def test_recognised_enabled_values(value: str, enabled: bool) -> None:
    """The documented values of SQLPROBE_ENABLED mean what they say; empty means unset."""
    assert _config.env_enabled({"SQLPROBE_ENABLED": value}) is enabled


@pytest.mark.parametrize(
    ("typo", "known"),
    [
        ("SQLPROBE_SLOW_QUERY", "SQLPROBE_SLOW_QUERY_MS"),
        ("SQLPROBE_ENABLE", "SQLPROBE_ENABLED"),
        ("SQLPROBE_METRIC_PORT", "SQLPROBE_METRICS_PORT"),
        ("SQLPROBE_CAPTURE_PARAMS", "SQLPROBE_CAPTURE_PARAMETERS"),
    ],
)
def test_unknown_variable_names_the_closest_known_one(
    typo: str,
    known: str,
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unknown SQLPROBE_* variable is reported with the closest known name."""
    monkeypatch.setenv(typo, "1")
    with caplog.at_level(logging.WARNING, logger="sqlprobe"):
        probe = sqlprobe.attach(sqlite_engine, registry=registry)
    assert probe.attached
    warnings = _warnings(caplog)
    assert warnings == [f"unknown environment variable {typo} ignored; did you mean {known}?"]


def test_unknown_variable_far_from_any_lists_them(caplog: pytest.LogCaptureFixture) -> None:
    """A name close to nothing lists the known variables; the test suite's own are ignored."""
    with caplog.at_level(logging.WARNING, logger="sqlprobe"):
        _config.check_environment({"SQLPROBE_XYZZY": "1", "SQLPROBE_TEST_PG_URL": "x"})
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "SQLPROBE_XYZZY" in warnings[0]
    assert all(var.name in warnings[0] for var in _config.ENVIRONMENT)


def test_code_options_still_raise(sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad option passed in code raises ValueError at attach, whatever the environment."""
    monkeypatch.setenv("SQLPROBE_SLOW_QUERY_MS", "soon")
    with pytest.raises(ValueError, match="slow_query_threshold"):
        sqlprobe.attach(sqlite_engine, slow_query_threshold=-1)
    with pytest.raises(ValueError, match="capture_parameters"):
        sqlprobe.attach(sqlite_engine, capture_parameters="yes")  # type: ignore[arg-type]


def test_threshold_above_a_minute_warns_about_seconds(
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """slow_query_threshold=250 is accepted but warns that the unit is seconds."""
    with caplog.at_level(logging.WARNING, logger="sqlprobe"):
        probe = sqlprobe.attach(sqlite_engine, registry=registry, slow_query_threshold=250)
    assert probe.options is not None and probe.options.slow_query_threshold == 250
    assert _warnings(caplog) == [
        "slow_query_threshold=250 is in seconds (4 minutes); did you mean 0.25?"
    ]


def test_threshold_of_a_minute_is_silent(
    sqlite_engine: Engine, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """60 seconds, a plausible batch-job threshold, gives no warning."""
    with caplog.at_level(logging.WARNING, logger="sqlprobe"):
        sqlprobe.attach(sqlite_engine, registry=registry, slow_query_threshold=60)
    assert _warnings(caplog) == []


def test_env_threshold_above_a_minute_warns_about_milliseconds(
    sqlite_engine: Engine,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLPROBE_SLOW_QUERY_MS=300000 is accepted with a warning that it means 5 minutes."""
    monkeypatch.setenv("SQLPROBE_SLOW_QUERY_MS", "300000")
    with caplog.at_level(logging.WARNING, logger="sqlprobe"):
        probe = sqlprobe.attach(sqlite_engine, registry=registry)
    assert probe.options is not None and probe.options.slow_query_threshold == 300
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert warnings[0].startswith("SQLPROBE_SLOW_QUERY_MS=300000 is in milliseconds (5 minutes)")


def test_bad_metrics_port_variable_uses_default(caplog: pytest.LogCaptureFixture) -> None:
    """A malformed SQLPROBE_METRICS_PORT gives 9464 and one warning."""
    with caplog.at_level(logging.WARNING, logger="sqlprobe"):
        assert _config.env_metrics_port({"SQLPROBE_METRICS_PORT": "abc"}) == 9464
        assert _config.env_metrics_port({"SQLPROBE_METRICS_PORT": "70000"}) == 9464
        assert _config.env_metrics_port({"SQLPROBE_METRICS_PORT": " 8000 "}) == 8000
    warnings = _warnings(caplog)
    assert len(warnings) == 2
    assert "SQLPROBE_METRICS_PORT='abc'" in warnings[0] and "0 to 65535" in warnings[0]


def test_warnings_reach_stderr_not_stdout() -> None:
    """Without any logging setup, the warning reaches stderr (logging's last resort), not stdout."""
    code = "import sqlalchemy, sqlprobe\nsqlprobe.attach(sqlalchemy.create_engine('sqlite://'))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PATH": "", "SQLPROBE_SLOW_QUERY_MS": "soon"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip() == (
        "SQLPROBE_SLOW_QUERY_MS='soon' ignored: expected a number of milliseconds, "
        "0 or more; using the default 100"
    )
