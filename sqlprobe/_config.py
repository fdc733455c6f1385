"""Options of :func:`sqlprobe.attach`, their validation and environment overrides.

Every option is checked once, when ``attach`` is called, and a bad value raises
``ValueError`` with a message that names the option and says what is wrong. The
statement path never looks at an option again: it reads the decisions that were
made here (see ``_hooks`` and ``_collector``).

Precedence: an explicit keyword argument wins, then the ``SQLPROBE_*`` environment
variable, then the built-in default. Environment variables exist for operators who
cannot touch the application's code; they replace defaults, not the code's choices.

A bad environment value never takes the application down: options passed in code are
the developer's and raise, but an environment variable is set by an operator, often
far from the code and at deploy time, so a malformed one logs a single warning (on the
standard library logger ``sqlprobe``, naming the variable and what it accepts) and the
default is used. The off switch is the exception to "use the default": an
unrecognised ``SQLPROBE_ENABLED`` turns sqlprobe off, because whoever set it wanted to
change something and "off" is the only other state. An unknown ``SQLPROBE_*`` name
(a typo) is reported with the closest known one.

This module keeps one piece of process-wide state: the set of warnings already given,
so that each bad value is reported once per process however many engines attach.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_METRICS_ADDR",
    "DEFAULT_METRICS_PORT",
    "ENVIRONMENT",
    "EnvVar",
    "Options",
    "SqlcommenterMode",
    "build_options",
    "check_environment",
    "env_enabled",
    "env_metrics_addr",
    "env_metrics_port",
    "logger",
]

#: Where sqlprobe's own warnings go: the standard library's logging, so they follow the
#: application's logging setup (and reach stderr through logging's last-resort handler
#: when there is none).
logger = logging.getLogger("sqlprobe")

DEFAULT_METRICS_ADDR = "127.0.0.1"
DEFAULT_METRICS_PORT = 9464
SLOW_QUERY_THRESHOLD_DEFAULT = 0.1
#: Above this many seconds a slow-query threshold is most likely milliseconds by mistake.
SLOW_QUERY_THRESHOLD_PLAUSIBLE = 60.0
_BOOLEANS = "1/0, true/false, yes/no, on/off"

SqlcommenterMode = Literal[False, True, "static"]

#: Duration buckets in seconds; they start at 100 µs because a primary-key lookup on a
#: warm database is well under a millisecond and a histogram that starts at 5 ms (the
#: prometheus_client default) would put all of them in its first bucket.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_UNSET: Any = object()

#: Most shapes a single engine may export; a bound on the label cardinality an
#: application can create by accident (string-built SQL) or an attacker by design.
MAX_FINGERPRINTS_LIMIT = 100_000
#: Most ``route`` label values a single engine may export (the per-route histograms).
MAX_ROUTES_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Options:
    """The validated options of one probe; immutable once built."""

    name: str | None
    registry: CollectorRegistry
    tracer_provider: Any
    meter_provider: Any
    logger: Any
    slow_query_threshold: float
    capture_parameters: bool
    n_plus_one_threshold: int
    n_plus_one_relationship_threshold: int
    max_fingerprints: int
    sqlcommenter: SqlcommenterMode
    explain: bool
    index_advice: bool
    buckets: tuple[float, ...]
    pool_hold_threshold: float = 1.0
    idle_in_transaction_threshold: float = 0.5
    pool_wait_threshold: float = 1.0
    max_routes: int = 200


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One ``SQLPROBE_*`` environment variable: its default, what it accepts, what it does."""

    name: str
    default: str
    accepted: str
    meaning: str


#: Every environment variable sqlprobe reads (the documentation's configuration
#: reference is checked against this table by the tests).
ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar(
        "SQLPROBE_ENABLED",
        "1",
        _BOOLEANS,
        "0 turns attach() into a no-op returning a detached probe; any value that is not "
        "recognised also turns sqlprobe off",
    ),
    EnvVar(
        "SQLPROBE_SLOW_QUERY_MS",
        "100",
        "a number of milliseconds, 0 or more",
        "default of slow_query_threshold, in milliseconds",
    ),
    EnvVar(
        "SQLPROBE_CAPTURE_PARAMETERS",
        "0",
        _BOOLEANS,
        "default of capture_parameters",
    ),
    EnvVar(
        "SQLPROBE_METRICS_ADDR",
        DEFAULT_METRICS_ADDR,
        "a host name or IP address",
        "address start_http_server() and the CLI bind when none is given",
    ),
    EnvVar(
        "SQLPROBE_METRICS_PORT",
        str(DEFAULT_METRICS_PORT),
        "an integer from 0 to 65535 (0 picks a free port)",
        "port start_http_server() and the CLI bind when none is given",
    ),
)
_KNOWN = {var.name: var for var in ENVIRONMENT}
#: Names the project's own test suite uses; not configuration, never reported.
_RESERVED_PREFIXES = ("SQLPROBE_TEST_",)

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(key: tuple[str, str], message: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(message)


def _forget_warnings() -> None:
    """Let every warning be given again (for tests)."""
    with _warned_lock:
        _warned.clear()


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Warn once about each ``SQLPROBE_*`` variable sqlprobe does not know (likely a typo)."""
    env = os.environ if environ is None else environ
    for name in env:
        if not name.startswith("SQLPROBE_") or name in _KNOWN:
            continue
        if name.startswith(_RESERVED_PREFIXES):
            continue
        # Compared without the shared prefix, which would make every name look close.
        suffixes = {known.removeprefix("SQLPROBE_"): known for known in _KNOWN}
        close = difflib.get_close_matches(name.removeprefix("SQLPROBE_"), suffixes, n=1)
        hint = f"did you mean {suffixes[close[0]]}?" if close else f"known: {', '.join(_KNOWN)}"
        _warn_once(("unknown", name), f"unknown environment variable {name} ignored; {hint}")


def _env_value(env: Mapping[str, str], name: str, parse: Callable[[str], Any]) -> Any:
    """The parsed value of ``name``; None when unset, empty or malformed (with a warning)."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return parse(raw.strip())
    except ValueError:
        var = _KNOWN[name]
        _warn_once(
            (name, raw),
            f"{name}={raw!r} ignored: expected {var.accepted}; using the default {var.default}",
        )
        return None


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _parse_ms(raw: str) -> float:
    ms = float(raw)
    if math.isnan(ms) or math.isinf(ms) or ms < 0:
        raise ValueError(raw)
    return ms / 1000.0


def _parse_port(raw: str) -> int:
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError(raw)
    return port


def env_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``SQLPROBE_ENABLED`` leaves sqlprobe on.

    Unset or empty: on. A recognised false value (0, false, no, off): off. Anything
    else that is not a recognised true value is taken as "off" too, with a warning:
    the operator who set the off switch meant to change something.
    """
    env = os.environ if environ is None else environ
    raw = env.get("SQLPROBE_ENABLED")
    if raw is None or raw.strip() == "":
        return True
    try:
        return _parse_bool(raw)
    except ValueError:
        _warn_once(
            ("SQLPROBE_ENABLED", raw),
            f"SQLPROBE_ENABLED={raw!r} is not one of {_BOOLEANS}; sqlprobe is off",
        )
        return False


def env_metrics_port(environ: Mapping[str, str] | None = None) -> int:
    """``SQLPROBE_METRICS_PORT``, or 9464 when unset or malformed (with a warning)."""
    env = os.environ if environ is None else environ
    check_environment(env)
    port = _env_value(env, "SQLPROBE_METRICS_PORT", _parse_port)
    return DEFAULT_METRICS_PORT if port is None else int(port)


def env_metrics_addr(environ: Mapping[str, str] | None = None) -> str:
    """``SQLPROBE_METRICS_ADDR``, or 127.0.0.1 when unset or empty."""
    env = os.environ if environ is None else environ
    raw = env.get("SQLPROBE_METRICS_ADDR", "").strip()
    return raw or DEFAULT_METRICS_ADDR


def _duration_words(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:g} seconds"
    if seconds < 5400:
        minutes = round(seconds / 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours = round(seconds / 3600)
    return f"{hours} hour{'s' if hours != 1 else ''}"


def _check_bool(what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return value


def _check_number(what: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return number


def _check_int(what: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{what} must be <= {maximum}, got {value!r}")
    return value


def _check_buckets(value: object) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"buckets must be a sequence of increasing numbers, got {value!r}")
    bounds: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or math.isnan(item):
            raise ValueError(f"buckets must contain only numbers, got {item!r}")
        bounds.append(float(item))
    if bounds and math.isinf(bounds[-1]) and bounds[-1] > 0:
        bounds.pop()  # +Inf is always added; accept it written out
    if not bounds:
        raise ValueError("buckets must contain at least one finite upper bound")
    if any(b <= 0 for b in bounds):
        raise ValueError(f"buckets must be positive, got {value!r}")
    if any(b2 <= b1 for b1, b2 in itertools.pairwise(bounds)):
        raise ValueError(f"buckets must be strictly increasing, got {value!r}")
    return tuple(bounds)


def _check_name(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"name must be a non-empty string, got {value!r}")
    if len(value) > 200:
        raise ValueError(f"name must be at most 200 characters, got {len(value)}")
    return value


def _check_sqlcommenter(value: object) -> SqlcommenterMode:
    if value is False or value is True or value == "static":
        return value
    raise ValueError(f"sqlcommenter must be False, True or 'static', got {value!r}")


def _check_registry(value: object) -> CollectorRegistry:
    if value is None:
        from prometheus_client import REGISTRY

        return REGISTRY
    if not isinstance(value, CollectorRegistry):
        raise ValueError(
            f"registry must be a prometheus_client.CollectorRegistry, got {type(value).__name__}"
        )
    return value


def _check_provider(what: str, value: object, method: str) -> object:
    if value is not None and not callable(getattr(value, method, None)):
        raise ValueError(f"{what} must have a {method}() method, got {type(value).__name__}")
    return value


def _check_logger(value: object) -> object:
    if value is not None and not callable(getattr(value, "warning", None)):
        raise ValueError(f"logger must be a structlog-style logger, got {type(value).__name__}")
    return value


def build_options(kwargs: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Options:
    """Validate ``attach`` keyword arguments, filling gaps from the environment and defaults.

    A bad keyword argument raises ``ValueError``; a bad environment value logs a warning
    and the default is used (see the module docstring).
    """
    env = os.environ if environ is None else environ
    unknown = set(kwargs) - set(Options.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")
    check_environment(env)

    def pick(key: str, env_key: str, default: Any, parse: Callable[[str], Any]) -> Any:
        if key in kwargs:
            return kwargs[key]
        value = _env_value(env, env_key, parse)
        return default if value is None else value

    threshold = _check_number(
        "slow_query_threshold",
        pick(
            "slow_query_threshold",
            "SQLPROBE_SLOW_QUERY_MS",
            SLOW_QUERY_THRESHOLD_DEFAULT,
            _parse_ms,
        ),
        allow_zero=True,
    )
    if threshold > SLOW_QUERY_THRESHOLD_PLAUSIBLE:
        if "slow_query_threshold" in kwargs:
            message = (
                f"slow_query_threshold={threshold:g} is in seconds "
                f"({_duration_words(threshold)}); did you mean {threshold / 1000:g}?"
            )
        else:
            message = (
                f"SQLPROBE_SLOW_QUERY_MS={threshold * 1000:g} is in milliseconds "
                f"({_duration_words(threshold)}); only statements slower than that are logged"
            )
        _warn_once(("slow_query_threshold", repr(threshold)), message)
    return Options(
        name=_check_name(kwargs.get("name")),
        registry=_check_registry(kwargs.get("registry")),
        tracer_provider=_check_provider(
            "tracer_provider", kwargs.get("tracer_provider"), "get_tracer"
        ),
        meter_provider=_check_provider("meter_provider", kwargs.get("meter_provider"), "get_meter"),
        logger=_check_logger(kwargs.get("logger")),
        slow_query_threshold=threshold,
        capture_parameters=_check_bool(
            "capture_parameters",
            pick("capture_parameters", "SQLPROBE_CAPTURE_PARAMETERS", False, _parse_bool),
        ),
        n_plus_one_threshold=_check_int(
            "n_plus_one_threshold", kwargs.get("n_plus_one_threshold", 5), minimum=0
        ),
        n_plus_one_relationship_threshold=_check_int(
            "n_plus_one_relationship_threshold",
            kwargs.get("n_plus_one_relationship_threshold", 2),
            minimum=2,
        ),
        max_fingerprints=_check_int(
            "max_fingerprints",
            kwargs.get("max_fingerprints", 500),
            minimum=1,
            maximum=MAX_FINGERPRINTS_LIMIT,
        ),
        sqlcommenter=_check_sqlcommenter(kwargs.get("sqlcommenter", False)),
        explain=_check_bool("explain", kwargs.get("explain", False)),
        index_advice=_check_bool("index_advice", kwargs.get("index_advice", False)),
        buckets=_check_buckets(kwargs.get("buckets", DEFAULT_BUCKETS)),
        pool_hold_threshold=_check_number(
            "pool_hold_threshold", kwargs.get("pool_hold_threshold", 1.0), allow_zero=True
        ),
        idle_in_transaction_threshold=_check_number(
            "idle_in_transaction_threshold",
            kwargs.get("idle_in_transaction_threshold", 0.5),
            allow_zero=True,
        ),
        pool_wait_threshold=_check_number(
            "pool_wait_threshold", kwargs.get("pool_wait_threshold", 1.0), allow_zero=True
        ),
        max_routes=_check_int(
            "max_routes", kwargs.get("max_routes", 200), minimum=1, maximum=MAX_ROUTES_LIMIT
        ),
    )
