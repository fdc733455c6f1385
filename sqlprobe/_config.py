"""Options of :func:`sqlprobe.attach`, their validation and environment overrides.

Every option is checked once, when ``attach`` is called, and a bad value raises
``ValueError`` with a message that names the option and says what is wrong. The
statement path never looks at an option again: it reads the decisions that were
made here (see ``_hooks`` and ``_collector``).

Precedence: an explicit keyword argument wins, then the ``SQLPROBE_*`` environment
variable, then the built-in default. Environment variables exist for operators who
cannot touch the application's code; they replace defaults, not the code's choices.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry

__all__ = ["DEFAULT_BUCKETS", "Options", "SqlcommenterMode", "build_options", "env_enabled"]

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
    max_fingerprints: int
    sqlcommenter: SqlcommenterMode
    explain: bool
    buckets: tuple[float, ...]


def env_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``SQLPROBE_ENABLED`` leaves sqlprobe on (anything but a false-ish value)."""
    env = os.environ if environ is None else environ
    raw = env.get("SQLPROBE_ENABLED")
    if raw is None or raw.strip() == "":
        return True
    return _parse_bool("SQLPROBE_ENABLED", raw)


def _parse_bool(what: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{what} must be one of 1/0, true/false, yes/no, on/off; got {raw!r}")


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
    """Validate ``attach`` keyword arguments, filling gaps from the environment and defaults."""
    env = os.environ if environ is None else environ
    unknown = set(kwargs) - set(Options.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")

    def pick(key: str, env_key: str | None, default: Any, parse: Any = None) -> Any:
        if key in kwargs:
            return kwargs[key]
        if env_key is not None:
            raw = env.get(env_key)
            if raw is not None and raw.strip() != "":
                return parse(env_key, raw)
        return default

    def parse_ms(env_key: str, raw: str) -> float:
        try:
            ms = float(raw)
        except ValueError:
            raise ValueError(f"{env_key} must be a number of milliseconds, got {raw!r}") from None
        return _check_number(env_key, ms, allow_zero=True) / 1000.0

    threshold = _check_number(
        "slow_query_threshold",
        pick("slow_query_threshold", "SQLPROBE_SLOW_QUERY_MS", 0.1, parse_ms),
        allow_zero=True,
    )
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
        max_fingerprints=_check_int(
            "max_fingerprints",
            kwargs.get("max_fingerprints", 500),
            minimum=1,
            maximum=MAX_FINGERPRINTS_LIMIT,
        ),
        sqlcommenter=_check_sqlcommenter(kwargs.get("sqlcommenter", False)),
        explain=_check_bool("explain", kwargs.get("explain", False)),
        buckets=_check_buckets(kwargs.get("buckets", DEFAULT_BUCKETS)),
    )
