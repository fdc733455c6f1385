"""What the plugin does for a run (:class:`Settings`) and for one test (:class:`Policy`).

Settings come from the command line and the ini file and are validated once, at
configure time (a bad value is a ``pytest.UsageError``). A test's policy merges those
settings with its ``@pytest.mark.sqlprobe(...)`` markers (the closest marker wins per
key; ``allow_n_plus_one`` lists add up) and, where sqlprobe owns it, the older
``@pytest.mark.max_queries(N)``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["LEGACY_MARKER", "MARKER", "MODES", "Policy", "Settings", "policy_for"]

MARKER = "sqlprobe"
LEGACY_MARKER = "max_queries"
MODES = ("fail", "warn", "off")
#: Keys ``@pytest.mark.sqlprobe(...)`` accepts.
MARKER_KEYS = frozenset(
    {"max_queries", "max_time", "allow_n_plus_one", "n_plus_one", "allow_no_queries", "snapshot"}
)


@dataclass(frozen=True)
class Settings:
    """The run's options, validated."""

    n_plus_one: str = "off"
    summary: bool = False
    snapshot: bool = False
    snapshot_update: bool = False
    baseline: Path | None = None
    baseline_update: bool = False
    sarif: Path | None = None
    verify_fixes: bool = False
    #: Whether sqlprobe owns ``@pytest.mark.max_queries`` (no other plugin registered it).
    legacy_marker: bool = True

    @property
    def capture_all(self) -> bool:
        """Whether every test is captured (else only the marked ones)."""
        return (
            self.n_plus_one != "off"
            or self.summary
            or self.snapshot
            or self.snapshot_update
            or self.baseline_update
            or self.sarif is not None
            or self.verify_fixes
        )

    @classmethod
    def from_config(cls, config: pytest.Config, *, legacy_marker: bool) -> Settings:
        mode = config.getoption("sqlprobe_n_plus_one") or config.getini("sqlprobe_n_plus_one")
        mode = str(mode or "off").strip().lower()
        if mode not in MODES:
            raise pytest.UsageError(
                f"sqlprobe_n_plus_one must be one of fail, warn, off; got {mode!r}"
            )
        baseline = config.getoption("sqlprobe_baseline") or config.getini("sqlprobe_baseline")
        baseline_update = bool(config.getoption("sqlprobe_baseline_update"))
        if baseline_update and not baseline:
            raise pytest.UsageError(
                "--sqlprobe-baseline-update needs the file: --sqlprobe-baseline=PATH "
                "(or the sqlprobe_baseline ini key)"
            )
        sarif = config.getoption("sqlprobe_sarif")
        root = config.rootpath
        return cls(
            n_plus_one=mode,
            summary=bool(config.getoption("sqlprobe_summary") or config.getini("sqlprobe_summary")),
            snapshot=bool(
                config.getoption("sqlprobe_snapshot") or config.getini("sqlprobe_snapshot")
            ),
            snapshot_update=bool(config.getoption("sqlprobe_snapshot_update")),
            baseline=_path(root, baseline) if baseline else None,
            baseline_update=baseline_update,
            sarif=_path(root, sarif) if sarif else None,
            verify_fixes=bool(config.getoption("sqlprobe_verify_fixes")),
            legacy_marker=legacy_marker,
        )


def _path(root: Path, value: Any) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


@dataclass
class Policy:
    """What is checked for one test."""

    max_queries: int | None = None
    max_time: float | None = None
    n_plus_one: str = "off"
    allow_n_plus_one: tuple[str, ...] = ()
    allow_all_n_plus_one: bool = False
    allow_no_queries: bool = False
    snapshot: bool = True
    #: Where each budget came from, for the failure message.
    spelled: dict[str, str] = field(default_factory=dict)

    @property
    def budgeted(self) -> bool:
        return self.max_queries is not None or self.max_time is not None

    def allows(self, relationship: str, fingerprint: str) -> bool:
        """Whether the marker accepts an N+1 on this relationship (or statement shape)."""
        if self.allow_all_n_plus_one:
            return True
        return any(
            (relationship and fnmatch.fnmatchcase(relationship, pattern)) or pattern == fingerprint
            for pattern in self.allow_n_plus_one
        )


def _bad(item: pytest.Item, message: str) -> BaseException:
    # The test fails, with the plain message and no traceback (like pytest.fail).
    return pytest.fail.Exception(f"{item.nodeid}: {message}", pytrace=False)


def _count(item: pytest.Item, value: Any, spelled: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(item, f"{spelled} takes a non-negative integer, got {value!r}")
    return value


def policy_for(item: pytest.Item, settings: Settings) -> Policy | None:
    """The test's policy, or None when nothing is to be checked for it."""
    policy = Policy(n_plus_one=settings.n_plus_one)
    marked = False
    seen: set[str] = set()
    for marker in item.iter_markers(MARKER):  # closest first
        marked = True
        if marker.args:
            raise _bad(
                item,
                "@pytest.mark.sqlprobe takes keyword arguments only "
                "(e.g. @pytest.mark.sqlprobe(max_queries=3))",
            )
        unknown = sorted(set(marker.kwargs) - MARKER_KEYS)
        if unknown:
            raise _bad(
                item,
                f"@pytest.mark.sqlprobe got unknown argument(s) {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(MARKER_KEYS))}",
            )
        for key, value in marker.kwargs.items():
            if key == "allow_n_plus_one":
                _allow(item, policy, value)
                continue
            if key in seen:
                continue  # a closer marker set it
            seen.add(key)
            if key == "max_queries":
                if value is not None:
                    policy.max_queries = _count(item, value, "sqlprobe(max_queries=...)")
                    policy.spelled["max_queries"] = f"@pytest.mark.sqlprobe(max_queries={value})"
            elif key == "max_time":
                if value is not None:
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                        raise _bad(
                            item, f"sqlprobe(max_time=...) takes seconds (>= 0), got {value!r}"
                        )
                    policy.max_time = float(value)
                    policy.spelled["max_time"] = f"@pytest.mark.sqlprobe(max_time={value})"
            elif key == "n_plus_one":
                mode = str(value).strip().lower()
                if mode not in MODES:
                    raise _bad(
                        item, f"sqlprobe(n_plus_one=...) is fail, warn or off, got {value!r}"
                    )
                policy.n_plus_one = mode
            elif key == "allow_no_queries":
                policy.allow_no_queries = bool(value)
            elif key == "snapshot":
                policy.snapshot = bool(value)
    if settings.legacy_marker and "max_queries" not in seen:
        legacy = item.get_closest_marker(LEGACY_MARKER)
        if legacy is not None:
            marked = True
            value = legacy.args[0] if legacy.args else legacy.kwargs.get("n")
            policy.max_queries = _count(item, value, f"@pytest.mark.{LEGACY_MARKER}")
            policy.spelled["max_queries"] = f"@pytest.mark.{LEGACY_MARKER}({value})"
    if not marked and not settings.capture_all:
        return None
    return policy


def _allow(item: pytest.Item, policy: Policy, value: Any) -> None:
    if value is True:
        policy.allow_all_n_plus_one = True
        return
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(v, str) and v for v in value
    ):
        raise _bad(
            item,
            "sqlprobe(allow_n_plus_one=...) takes True or a list of relationships "
            f'(e.g. ["User.orders"]), got {value!r}',
        )
    policy.allow_n_plus_one = (*policy.allow_n_plus_one, *sorted(value))


def marked(item: pytest.Item, settings: Settings) -> bool:
    """Whether the test carries a marker of sqlprobe's."""
    if item.get_closest_marker(MARKER) is not None:
        return True
    return settings.legacy_marker and item.get_closest_marker(LEGACY_MARKER) is not None
