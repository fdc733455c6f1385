"""``sqlprobe top``: a live terminal view of any sqlprobe ``/metrics`` endpoint.

It scrapes the endpoint every ``interval`` seconds, parses the exposition with
prometheus_client's own parser, and shows what changed between the last two scrapes:
statements, errors and slow statements per second, the statement shapes that took the
most time (with their mean latency and full normalized text), p50/p95/p99 per operation
from the latency histogram (the same interpolation as PromQL's ``histogram_quantile``),
N+1 detections, and the connection pools. A multiprocess (gunicorn) endpoint works the
same: its exposition is already the sum over the workers.

Nothing here is on an application's path: it is a client of the exposition format, and
reads only the metric names of the documented contract.
"""

from __future__ import annotations

import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_URL", "Snapshot", "fetch", "normalize_url", "parse", "quantile", "render"]

DEFAULT_URL = "http://127.0.0.1:9464/metrics"
QUANTILES = (0.5, 0.95, 0.99)

Shape = tuple[str, str]  # (engine, fingerprint)


@dataclass
class Snapshot:
    """The sqlprobe series of one scrape, keyed by their labels."""

    at: float
    calls: dict[Shape, float] = field(default_factory=dict)
    seconds: dict[Shape, float] = field(default_factory=dict)
    info: dict[Shape, tuple[str, str, str]] = field(default_factory=dict)
    errors: dict[tuple[str, str, str], float] = field(default_factory=dict)
    slow: dict[tuple[str, str], float] = field(default_factory=dict)
    buckets: dict[tuple[str, str], dict[float, float]] = field(default_factory=dict)
    n_plus_one: dict[tuple[str, str, str], float] = field(default_factory=dict)
    pool: dict[str, dict[str, float]] = field(default_factory=dict)
    waits: dict[str, float] = field(default_factory=dict)
    wait_seconds: dict[str, float] = field(default_factory=dict)
    timeouts: dict[str, float] = field(default_factory=dict)


def normalize_url(raw: str) -> str:
    """``host:port`` and ``http://host:port`` are completed to ``.../metrics``."""
    url = raw.strip()
    if "://" not in url:
        url = f"http://{url}"
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest or rest.startswith("/"):
        raise ValueError(raw)
    if "/" not in rest:
        url = f"{url}/metrics"
    return url


def fetch(url: str, timeout: float = 5.0) -> str:
    """The exposition text at ``url``; ``OSError`` (with a short reason) when unreachable."""
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise OSError(getattr(reason, "strerror", None) or str(reason)) from exc
    return body.decode("utf-8", "replace")


def parse(text: str, at: float | None = None) -> Snapshot:
    """Read the sqlprobe families of an exposition (other families are ignored).

    Raises ``ValueError`` when the text is not the Prometheus exposition format.
    """
    from prometheus_client.parser import text_string_to_metric_families

    snap = Snapshot(at=time.monotonic() if at is None else at)

    def add(into: dict[Any, float], key: Any, value: float) -> None:
        into[key] = into.get(key, 0.0) + value

    for family in text_string_to_metric_families(text):
        if not family.name.startswith("sqlprobe_"):
            continue
        for sample in family.samples:
            labels, value, name = sample.labels, float(sample.value), sample.name
            engine = labels.get("engine", "")
            if name == "sqlprobe_statement_calls_total":
                add(snap.calls, (engine, labels.get("fingerprint", "")), value)
            elif name == "sqlprobe_statement_seconds_total":
                add(snap.seconds, (engine, labels.get("fingerprint", "")), value)
            elif name == "sqlprobe_statement_info":
                snap.info[(engine, labels.get("fingerprint", ""))] = (
                    labels.get("operation", ""),
                    labels.get("table", ""),
                    labels.get("statement", ""),
                )
            elif name == "sqlprobe_query_errors_total":
                key = (engine, labels.get("operation", ""), labels.get("error", ""))
                add(snap.errors, key, value)
            elif name == "sqlprobe_slow_queries_total":
                add(snap.slow, (engine, labels.get("operation", "")), value)
            elif name == "sqlprobe_query_duration_seconds_bucket":
                per = snap.buckets.setdefault((engine, labels.get("operation", "")), {})
                le = float(labels.get("le", "+Inf"))
                per[le] = per.get(le, 0.0) + value
            elif name == "sqlprobe_n_plus_one_total":
                key = (engine, labels.get("fingerprint", ""), labels.get("relationship", ""))
                add(snap.n_plus_one, key, value)
            elif name == "sqlprobe_pool_connections":
                state = snap.pool.setdefault(engine, {})
                kind = labels.get("state", "")
                state[kind] = state.get(kind, 0.0) + value
            elif name == "sqlprobe_pool_max_connections":
                snap.pool.setdefault(engine, {})["max"] = value
            elif name == "sqlprobe_pool_checkout_wait_seconds_count":
                add(snap.waits, engine, value)
            elif name == "sqlprobe_pool_checkout_wait_seconds_sum":
                add(snap.wait_seconds, engine, value)
            elif name == "sqlprobe_pool_checkout_timeouts_total":
                add(snap.timeouts, engine, value)
    return snap


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile(q, ...)`` of cumulative bucket counts; None without observations."""
    bounds = sorted(buckets.items())
    if not bounds or not math.isinf(bounds[-1][0]):
        return None
    total = bounds[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in bounds:
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bound: the best known is that bound
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _delta(cur: dict[Any, float], prev: dict[Any, float] | None) -> dict[Any, float]:
    """Increase of each counter since ``prev`` (a counter that went down was reset)."""
    if prev is None:
        return dict(cur)
    out = {}
    for key, value in cur.items():
        before = prev.get(key, 0.0)
        out[key] = value - before if value >= before else value
    return out


def _bucket_delta(
    cur: dict[tuple[str, str], dict[float, float]],
    prev: dict[tuple[str, str], dict[float, float]] | None,
) -> dict[tuple[str, str], dict[float, float]]:
    if prev is None:
        return cur
    out = {}
    for key, per in cur.items():
        before = prev.get(key, {})
        if any(v < before.get(le, 0.0) for le, v in per.items()):
            out[key] = dict(per)  # reset
        else:
            out[key] = {le: v - before.get(le, 0.0) for le, v in per.items()}
    return out


#: sqlprobe_statement_info carries at most this many characters of a statement.
INFO_TEXT_LIMIT = 200


def _statement(snap: Snapshot, key: Shape) -> str:
    """The normalized text of a shape, marked when the exported label was cut."""
    text = snap.info.get(key, ("", "", ""))[2]
    if not text:
        return f"(fingerprint {key[1]})"
    return f"{text}…" if len(text) >= INFO_TEXT_LIMIT else text


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:,.0f}"


def _rate(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:,.1f}"


def render(
    cur: Snapshot, prev: Snapshot | None, url: str, *, limit: int = 10, interval: float = 2.0
) -> Any:
    """The rich renderable of one refresh: rates over ``prev``..``cur``, else totals."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    window = cur.at - prev.at if prev is not None else 0.0
    per_second = window > 0
    scale = 1.0 / window if per_second else 1.0
    unit = "/s" if per_second else " total"

    calls = _delta(cur.calls, prev.calls if prev else None)
    seconds = _delta(cur.seconds, prev.seconds if prev else None)
    errors = _delta(cur.errors, prev.errors if prev else None)
    slow = _delta(cur.slow, prev.slow if prev else None)
    n1 = _delta(cur.n_plus_one, prev.n_plus_one if prev else None)
    waits = _delta(cur.waits, prev.waits if prev else None)
    wait_seconds = _delta(cur.wait_seconds, prev.wait_seconds if prev else None)
    buckets = _bucket_delta(cur.buckets, prev.buckets if prev else None)

    total_calls = sum(calls.values())
    total_errors = sum(errors.values())
    total_slow = sum(slow.values())

    def share(part: float) -> str:
        return f" ({100 * part / total_calls:.1f} %)" if total_calls else ""

    when = time.strftime("%H:%M:%S")
    span = f"last {window:.1f} s" if per_second else "totals since start; rates next refresh"
    header = Text.assemble(
        ("sqlprobe top", "bold"), f"  {url}  {when}  ({span}, every {interval:g} s)"
    )
    summary = Text.assemble(
        ("statements", "bold"),
        f" {_rate(total_calls * scale)}{unit}   ",
        ("errors", "bold red" if total_errors else "bold"),
        f" {_rate(total_errors * scale)}{unit}{share(total_errors)}   ",
        ("slow", "bold yellow" if total_slow else "bold"),
        f" {_rate(total_slow * scale)}{unit}{share(total_slow)}",
    )

    shapes = Table(title=f"Top statements by time ({span})", title_justify="left", expand=True)
    shapes.add_column(f"time{'/s' if per_second else ' s'}", justify="right", no_wrap=True)
    shapes.add_column(f"calls{unit}", justify="right", no_wrap=True)
    shapes.add_column("mean ms", justify="right", no_wrap=True)
    engines = {key[0] for key in cur.calls}
    single = next(iter(engines)) if len(engines) == 1 else None
    shapes.add_column(
        f"statement (normalized) on {single}" if single else "engine · statement (normalized)",
        overflow="fold",
        ratio=1,
    )
    ranked = sorted(
        (k for k in seconds if calls.get(k, 0.0) > 0), key=lambda k: seconds[k], reverse=True
    )
    for key in ranked[:limit]:
        engine, fingerprint = key
        statement = _statement(cur, key)
        n = calls[key]
        shapes.add_row(
            f"{seconds[key] * scale:.3f}",
            _rate(n * scale),
            _ms(seconds[key] / n if n else None),
            Text(statement) if single else Text.assemble((f"{engine} ", "dim"), statement),
        )
    if not ranked:
        shapes.add_row("-", "-", "-", Text("no statements in this window", style="dim"))

    latency = Table(title="Latency by operation (ms)", title_justify="left", expand=True)
    latency.add_column("engine", overflow="fold", ratio=1)
    latency.add_column("operation", no_wrap=True)
    latency.add_column(f"stmts{unit}", justify="right", no_wrap=True)
    for q in QUANTILES:
        latency.add_column(f"p{q * 100:g}", justify="right", no_wrap=True)
    for (engine, operation), per in sorted(buckets.items()):
        count = per.get(math.inf, 0.0)
        if count <= 0:
            continue
        latency.add_row(
            engine,
            operation,
            _rate(count * scale),
            *(_ms(quantile(q, per)) for q in QUANTILES),
        )

    parts: list[Any] = [header, summary, shapes, latency]
    # Pools before the N+1 list: a short table that a short terminal should still show.

    if cur.pool:
        pool = Table(title="Connection pools", title_justify="left", expand=True)
        pool.add_column("engine", overflow="fold", ratio=1)
        for name in ("in use", "idle", "max", f"checkouts{unit}", "wait ms", "timeouts"):
            pool.add_column(name, justify="right", no_wrap=True)
        for engine, state in sorted(cur.pool.items()):
            checkouts = waits.get(engine, 0.0)
            pool.add_row(
                engine,
                f"{state.get('used', 0.0):.0f}",
                f"{state.get('idle', 0.0):.0f}",
                f"{state['max']:.0f}" if "max" in state else "-",
                _rate(checkouts * scale),
                _ms(wait_seconds.get(engine, 0.0) / checkouts if checkouts else None),
                f"{cur.timeouts.get(engine, 0.0):.0f}",
            )
        parts.append(pool)
    if cur.n_plus_one:
        plus = Table(
            title=f"N+1 detections: {sum(cur.n_plus_one.values()):.0f} in all, "
            f"+{sum(n1.values()):.0f} {'in this window' if per_second else 'so far'}",
            title_justify="left",
            expand=True,
        )
        plus.add_column("total", justify="right", no_wrap=True)
        plus.add_column("new", justify="right", no_wrap=True)
        plus.add_column("relationship", no_wrap=True)
        plus.add_column("statement", overflow="fold", ratio=1)
        for key, total in sorted(cur.n_plus_one.items(), key=lambda kv: -kv[1])[:limit]:
            engine, fingerprint, relationship = key
            text = _statement(cur, (engine, fingerprint))
            plus.add_row(f"{total:.0f}", f"+{n1.get(key, 0.0):.0f}", relationship or "-", text)
        parts.append(plus)

    return Group(*parts)


def unreachable(url: str, reason: str, attempt: int, interval: float) -> Any:
    """What the screen shows while the endpoint cannot be scraped."""
    from rich.text import Text

    return Text.assemble(
        ("sqlprobe top", "bold"),
        f"  {url}\n",
        ("cannot reach the endpoint", "bold red"),
        f": {reason}\nretrying every {interval:g} s (attempt {attempt}); Ctrl-C quits",
    )


def run(
    url: str,
    *,
    interval: float,
    once: bool,
    console: Any,
    limit: int = 10,
    iterations: int | None = None,
) -> int:
    """Refresh the view until Ctrl-C (or ``iterations`` refreshes); ``once`` prints one frame.

    With ``once``, two scrapes ``interval`` apart are taken and their rates printed; an
    endpoint that cannot be scraped is then an error (exit status 1). Live, it is shown
    on screen and retried.
    """
    if once:
        try:
            first = parse(fetch(url))
            time.sleep(interval)
            second = parse(fetch(url))
        except (OSError, ValueError) as exc:
            print(f"sqlprobe top: error: cannot read {url}: {exc}", file=sys.stderr)
            return 1
        console.print(render(second, first, url, limit=limit, interval=interval))
        return 0

    from rich.live import Live

    prev: Snapshot | None = None
    attempt = 0
    done = 0
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while iterations is None or done < iterations:
            started = time.monotonic()
            try:
                cur = parse(fetch(url))
            except (OSError, ValueError) as exc:
                attempt += 1
                prev = None
                live.update(unreachable(url, str(exc), attempt, interval), refresh=True)
            else:
                attempt = 0
                live.update(render(cur, prev, url, limit=limit, interval=interval), refresh=True)
                prev = cur
            done += 1
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return 0
