"""``sqlprobe advise``: index advice for the statements a process runs, or a file's.

``sqlprobe advise --url URL --metrics-url http://host:9464/metrics`` reads the
``sqlprobe_statement_info`` series of a running process (parsed with prometheus_client's
text parser), takes its SELECT shapes with the most total time first
(``sqlprobe_statement_seconds_total``; ``--top``), and advises each on the database at
``--url``. ``--file FILE.sql`` reads statements separated by ``;`` instead (split with
sqlglot's tokenizer, so a ``;`` inside a string does not split).

The texts in /metrics are normalized: every value became a ``?`` placeholder. On
PostgreSQL they are planned as generic plans (``PREPARE`` with parameters of unknown
type, which PostgreSQL infers from their context; ``plan_cache_mode =
force_generic_plan``), so the advice holds for any value; a ``LIKE ?`` has no known
pattern and gets no prefix index. SQLite plans them with NULLs (its plan does not depend
on the values). MySQL/MariaDB cannot plan a statement without values: such statements
are reported as skipped. A text cut at the 200-character limit of ``statement_info`` is
skipped too. A file's statements carry their literals and are planned as written.

Errors (a bad URL, an unreachable server or database, an unreadable file) print one
line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["main"]

_WIDTH = 80
_INFO_LIMIT = 200


class _Failure(Exception):
    """A user-facing error: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own usage errors: status 2 too
        raise _Failure(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sqlprobe advise",
        description="Suggest indexes (proven where the database allows) for slow statements.",
    )
    parser.add_argument("--url", required=True, help="SQLAlchemy URL of the database to plan on")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--metrics-url", help="a running process's /metrics endpoint")
    source.add_argument("--file", help="a file of SQL statements separated by ';'")
    parser.add_argument("--engine", help="only statements of this engine label (/metrics)")
    parser.add_argument("--top", type=int, default=20, help="shapes with most total time")
    parser.add_argument("--min-improvement", type=float, default=10.0)
    parser.add_argument("--min-rows", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per statement")
    parser.add_argument(
        "--install-hypopg",
        action="store_true",
        help="CREATE EXTENSION hypopg for each analysis (rolled back afterwards)",
    )
    parser.add_argument("--verbose", action="store_true", help="say why a statement got none")
    return parser


def _metrics_statements(url: str, engine: str | None, top: int) -> list[tuple[str, str]]:
    """``(statement, note)`` pairs from /metrics, most total time first."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        raise _Failure(f"cannot read {url}: {exc}") from None
    texts: dict[tuple[str, str], str] = {}
    seconds: dict[tuple[str, str], float] = {}
    try:
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                key = (sample.labels.get("engine", ""), sample.labels.get("fingerprint", ""))
                if engine is not None and key[0] != engine:
                    continue
                if sample.name == "sqlprobe_statement_info":
                    if sample.labels.get("operation") == "SELECT":
                        texts[key] = sample.labels.get("statement", "")
                elif sample.name == "sqlprobe_statement_seconds_total":
                    seconds[key] = sample.value
    except ValueError as exc:
        raise _Failure(f"{url} is not a Prometheus text exposition: {exc}") from None
    if not texts:
        raise _Failure(f"{url} has no sqlprobe_statement_info series for a SELECT")
    ordered = sorted(texts, key=lambda k: -seconds.get(k, 0.0))[:top]
    out = []
    for key in ordered:
        text = texts[key]
        note = "cut at the statement_info length limit" if len(text) >= _INFO_LIMIT else ""
        out.append((text, note))
    return out


def _file_statements(path: str, dialect: str) -> list[tuple[str, str]]:
    from sqlglot import TokenType
    from sqlglot.dialects.dialect import Dialect
    from sqlglot.errors import SqlglotError

    from ._analysis._advisor_sql import sqlglot_dialect

    try:
        with open(path, encoding="utf-8") as handle:
            body = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise _Failure(f"cannot read {path}: {exc}") from None
    try:
        tokens = Dialect.get_or_raise(sqlglot_dialect(dialect) or "postgres").tokenize(body)
    except SqlglotError as exc:
        raise _Failure(f"cannot read the SQL in {path}: {exc}") from None
    statements: list[tuple[str, str]] = []
    start = 0
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            statements.append((body[start : token.start].strip(), ""))
            start = token.end + 1
    statements.append((body[start:].strip(), ""))
    return [s for s in statements if s[0]]


def _wrap(label: str, value: str) -> list[str]:
    lines = textwrap.wrap(
        value,
        width=_WIDTH,
        initial_indent=f"  {label:<10} ",
        subsequent_indent=" " * 13,
        break_long_words=True,
        break_on_hyphens=False,
    )
    return lines or [f"  {label}"]


def _print_advice(advice: Any, out: TextIO) -> None:
    if advice.proof == "hypopg" and advice.improvement is not None:
        how = (
            f"proven with hypopg: cost {advice.cost_before:.1f} -> {advice.cost_after:.1f}"
            f" ({advice.improvement:.0f}x)"
        )
    elif advice.proven:
        how = "proven: the plan switches from SCAN to SEARCH"
    else:
        how = f"unproven, from the {advice.proof}"
        if advice.cost_before is not None:
            how += f" (cost {advice.cost_before:.1f})"
    print(file=out)
    for line in textwrap.wrap(
        f"{advice.table} ({', '.join(advice.columns)}): {how}", width=_WIDTH, subsequent_indent="  "
    ):
        print(line, file=out)
    for label, value in (
        ("statement", advice.statement),
        ("ddl", advice.ddl),
        ("alembic", advice.alembic),
        ("model", f"{advice.model}: {advice.model_change}" if advice.model else None),
        ("source", advice.source),
    ):
        if value:
            for line in _wrap(label, value):
                print(line, file=out)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if args.top < 1:
        raise _Failure("--top must be at least 1")
    if args.min_improvement < 1:
        raise _Failure("--min-improvement must be at least 1")
    if args.timeout <= 0:
        raise _Failure("--timeout must be positive")
    try:
        engine = create_engine(args.url)
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:
        raise _Failure(f"bad --url: {exc}") from None
    try:
        system = engine.dialect.name
        if args.metrics_url:
            statements = _metrics_statements(args.metrics_url, args.engine, args.top)
        else:
            statements = _file_statements(args.file, system)
        if getattr(engine.dialect, "is_async", False):
            # An asyncio driver (postgresql+asyncpg://, sqlite+aiosqlite://...): the same
            # synchronous code, run through SQLAlchemy's greenlet adapter on a loop of
            # its own, as the advisor's worker does for an AsyncEngine.
            import asyncio

            from sqlalchemy.util import greenlet_spawn

            found = asyncio.run(
                greenlet_spawn(_advise_each, engine, statements, args, out, dispose=True)
            )
        else:
            found = _advise_each(engine, statements, args, out)
        print(f"\n{found} index suggestion(s) for {len(statements)} statement(s).", file=out)
        return 0
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run ``sqlprobe advise``; 0 on success, 2 on an error (one line on stderr)."""
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        return _run(args, out or sys.stdout)
    except _Failure as exc:
        print(f"sqlprobe advise: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # anything else is still one line, never a traceback
        first = (str(exc).splitlines() or [""])[0]
        print(f"sqlprobe advise: error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 2


def _advise_each(
    engine: Any,
    statements: list[tuple[str, str]],
    args: argparse.Namespace,
    out: TextIO,
    *,
    dispose: bool = False,
) -> int:
    """Advise each statement on one connection; the number of suggestions printed."""
    from sqlalchemy.exc import SQLAlchemyError

    from ._analysis._advisor import SchemaCache, analyse

    try:
        cache = SchemaCache()
        found = 0
        try:
            connection = engine.connect()
        except SQLAlchemyError as exc:
            first = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise _Failure(f"cannot connect to --url: {first}") from None
        with connection:
            for statement, note in statements:
                if note:
                    if args.verbose:
                        print(f"skipped: {note}: {statement[:60]}", file=out)
                    continue
                try:
                    result = analyse(
                        connection,
                        statement,
                        None,
                        min_improvement=args.min_improvement,
                        min_rows=args.min_rows,
                        statement_timeout=args.timeout,
                        schema_cache=cache,
                        install_hypopg=args.install_hypopg,
                    )
                except Exception as exc:  # one statement's failure does not end the run
                    cause = getattr(exc, "orig", None) or exc
                    first = (str(cause).splitlines() or [""])[0][:60]
                    print(f"\nskipped ({type(cause).__name__}: {first})", file=out)
                    for line in _wrap("statement", statement):
                        print(line, file=out)
                    if connection.in_transaction():
                        connection.rollback()
                    continue
                for advice in result.advice:
                    found += 1
                    _print_advice(advice, out)
                if args.verbose and not result.advice:
                    print(file=out)
                    for line in _wrap("no advice", result.statement):
                        print(line.lstrip(), file=out)
                    for note_text in result.notes:
                        for line in _wrap("why", note_text):
                            print(line, file=out)
        return found
    finally:
        if dispose:  # an async engine's pool is closed in the greenlet, on its loop
            engine.dispose()
