#!/usr/bin/env bash
# SQLAlchemy's own test suite, run twice: bare, and with sqlprobe attached to every
# engine; then the sets of failing tests are compared (docs/reliability.md).
#
#   scripts/sqlalchemy-suite.sh [--subset ci|full|postgresql] [--venv DIR] [--no-rerun]
#                               [pytest args]
#
# The tests come from the sdist of the SQLAlchemy version installed in the virtualenv
# (default .venv), downloaded once into $SQLPROBE_SA_CACHE (default .cache/sqlalchemy-suite,
# git-ignored) and run against the *installed* library (PYTHONNOUSERSITE=1 stops the
# suite's conftest.py from putting the sdist's lib/ first), with SQLAlchemy's own pytest
# plugin. The attached run has scripts/sqlalchemy_suite/attached on PYTHONPATH, whose
# sitecustomize.py calls sqlprobe.attach() with a fresh registry before anything else.
# Extra arguments go to every pytest run (e.g. -k, -x, or test paths instead of the
# subset's). A test that fails in one run only is run again, alone, bare and attached
# (up to $SQLPROBE_SA_RERUN_MAX, default 300; --no-rerun skips this); it counts only if
# the re-run shows the same difference, otherwise it is listed as not reproduced.
# Exit status: 0 identical failure sets, 1 some test fails only attached, 2 the
# comparison is incomplete (see scripts/sqlalchemy_suite/compare.py).
#
# Subsets:
#   ci          test/engine, and test/sql without test_types.py and test_operators.py, on
#               SQLite (pysqlite); about 3 minutes for both runs
#   full        test/base test/engine test/sql test/orm test/ext test/dialect on SQLite,
#               then test/ext/asyncio with --dbdriver=aiosqlite
#   postgresql  test/engine and test/dialect/postgresql on postgresql+psycopg, then
#               test/ext/asyncio on postgresql+psycopg_async, in a database of its own
#               ($SQLPROBE_SA_PG_DB, default sqla_suite, created afresh before each run,
#               with the schemas test_schema and test_schema_2) on
#               $SQLPROBE_SA_PG_HOST:$SQLPROBE_SA_PG_PORT (127.0.0.1:5432) as user postgres
# test/aaa_profiling is in no subset: it counts Python function calls, which an attached
# listener changes by design.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

subset=ci
venv=.venv
rerun=1
rerun_max=${SQLPROBE_SA_RERUN_MAX:-300}
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --subset) subset=${2:?--subset needs a value}; shift 2 ;;
    --subset=*) subset=${1#--subset=}; shift ;;
    --venv) venv=${2:?--venv needs a value}; shift 2 ;;
    --venv=*) venv=${1#--venv=}; shift ;;
    --no-rerun) rerun=0; shift ;;
    -h|--help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) pytest_args+=("$1"); shift ;;
  esac
done
case "$subset" in ci|full|postgresql) ;; *) echo "unknown subset: $subset (ci, full, postgresql)" >&2; exit 2 ;; esac
venv=$(cd "$venv" && pwd)
py="$venv/bin/python"
[ -x "$py" ] || { echo "no virtualenv at $venv" >&2; exit 2; }

log() { printf '== %s\n' "$*"; }

version=$("$py" -c 'import sqlalchemy; print(sqlalchemy.__version__)')
cache=${SQLPROBE_SA_CACHE:-$root/.cache/sqlalchemy-suite}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
sdist="$cache/sqlalchemy-$version"
if [ ! -f "$sdist/test/conftest.py" ]; then
  log "SQLAlchemy $version sdist into $cache"
  tarball=$(ls "$cache"/sqlalchemy-"$version".tar.gz 2>/dev/null || true)
  if [ -z "$tarball" ]; then
    # --no-binary for SQLAlchemy alone: with :all:, pip would also build the sdist's
    # build requirements (Cython) from source to prepare its metadata, for minutes.
    "$py" -m pip download -q --disable-pip-version-check --no-binary sqlalchemy --no-deps \
      -d "$cache" "sqlalchemy==$version" 2>&1 | { grep -v '^WARNING: Location' || true; }
    tarball="$cache/sqlalchemy-$version.tar.gz"
  fi
  tmp=$(mktemp -d "$cache/unpack.XXXXXX")
  tar -xzf "$tarball" -C "$tmp"
  rm -rf "$sdist"
  mv "$tmp/sqlalchemy-$version" "$sdist"
  rmdir "$tmp"
fi

log "test requirements into $venv"
reqs=("pytest>=7,<10" greenlet aiosqlite)
[ "$subset" = postgresql ] && reqs+=("psycopg[binary]>=3")
"$py" -m pip install -q --disable-pip-version-check "${reqs[@]}" 2>&1 \
  | { grep -v '^WARNING: Location' || true; }

pg_host=${SQLPROBE_SA_PG_HOST:-127.0.0.1}
pg_port=${SQLPROBE_SA_PG_PORT:-5432}
pg_db=${SQLPROBE_SA_PG_DB:-sqla_suite}
fresh_pg_database() {
  "$py" - "$pg_host" "$pg_port" "$pg_db" <<'EOF'
import sys
import psycopg
from psycopg import sql

import time

host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for attempt in range(120):  # a shared server may be restarting: wait up to 2 minutes
    try:
        conn = psycopg.connect(host=host, port=port, user="postgres", dbname="postgres",
                               autocommit=True)
        break
    except psycopg.OperationalError:
        if attempt == 119:
            raise
        time.sleep(1)
with conn:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
with psycopg.connect(host=host, port=port, user="postgres", dbname=name,
                     autocommit=True) as conn:
    for schema in ("test_schema", "test_schema_2"):
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    for extension in ("hstore", "citext"):
        try:
            conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(
                sql.Identifier(extension)))
        except psycopg.Error:
            pass
EOF
}

# Parts: label, SQLAlchemy options, test paths (extra paths in pytest_args replace them).
labels=()
options=()
paths=()
add_part() { labels+=("$1"); options+=("$2"); paths+=("$3"); }
case "$subset" in
  ci)
    add_part sqlite "" "test/engine test/sql --ignore=test/sql/test_types.py --ignore=test/sql/test_operators.py"
    ;;
  full)
    add_part sqlite "" "test/base test/engine test/sql test/orm test/ext test/dialect"
    add_part aiosqlite "--dbdriver=aiosqlite" "test/ext/asyncio"
    ;;
  postgresql)
    pg_url="postgresql+psycopg://postgres@$pg_host:$pg_port/$pg_db"
    pg_async_url="postgresql+psycopg_async://postgres@$pg_host:$pg_port/$pg_db"
    add_part psycopg "--dburi=$pg_url" "test/engine test/dialect/postgresql"
    add_part psycopg_async "--dburi=$pg_async_url" "test/ext/asyncio"
    ;;
esac
is_path() { case "$1" in test/*|test|*.py|*::*) return 0 ;; *) return 1 ;; esac; }
user_paths=0
for a in ${pytest_args[@]+"${pytest_args[@]}"}; do is_path "$a" && user_paths=1; done

out="$cache/runs/$subset"
rm -rf "$out"
mkdir -p "$out"
attached_path="$root/scripts/sqlalchemy_suite/attached"
select_path="$root/scripts/sqlalchemy_suite"

# run NAME PART OPTIONS PATHS [SELECTION]: NAME is bare, attached, rerun-bare or
# rerun-attached; a SELECTION file (node ids) restricts the run to those tests.
run() {
  local name=$1 part=$2 opts=$3 tests=$4 selection=${5:-} start end rc a
  # The other query plugins of the test requirements (queryspy, pytest-queryguard) listen
  # on every engine and session: kept out, the runs measure SQLAlchemy and sqlprobe only.
  local -a cmd=("$py" -m pytest -p no:cacheprovider -p no:queryguard -p no:queryspy
    --maxfail=1000000 -o junit_family=xunit1 --junitxml="$out/$name-$part.xml")
  local -a env=(PYTHONNOUSERSITE=1)
  local pypath=${PYTHONPATH:-}
  # shellcheck disable=SC2206
  [ -n "$opts" ] && cmd+=($opts)
  if [ -n "$selection" ]; then
    for a in ${pytest_args[@]+"${pytest_args[@]}"}; do is_path "$a" || cmd+=("$a"); done
    # shellcheck disable=SC2207
    cmd+=(-p select_tests $(sed 's/::.*//' "$selection" | sort -u))
    env+=(SQLPROBE_SA_SUITE_SELECT="$selection")
    pypath="$select_path${pypath:+:$pypath}"
  else
    [ ${#pytest_args[@]} -gt 0 ] && cmd+=("${pytest_args[@]}")
    # shellcheck disable=SC2206
    [ $user_paths = 0 ] && cmd+=($tests)
  fi
  if [ "${name%attached}" != "$name" ]; then
    pypath="$attached_path${pypath:+:$pypath}"
    env+=(SQLPROBE_SA_SUITE_MARKER="$out/marker-${name%attached}$part.jsonl")
  fi
  [ -n "$pypath" ] && env+=(PYTHONPATH="$pypath")
  [ "$subset" = postgresql ] && fresh_pg_database
  if [ -n "$selection" ]; then
    log "$name, $part: the $(wc -l <"$selection") test(s) that failed in one run only"
  else
    log "$name run, $part: pytest ${opts:+$opts }$([ $user_paths = 0 ] && echo "$tests" || echo "${pytest_args[*]}")"
  fi
  start=$(date +%s.%N)
  set +e
  (cd "$sdist" && env "${env[@]}" "${cmd[@]}") >"$out/$name-$part.log" 2>&1
  rc=$?
  set -e
  end=$(date +%s.%N)
  echo "$rc" >"$out/$name-$part.rc"
  awk "BEGIN { printf \"%.1f\\n\", $end - $start }" >"$out/$name-$part.seconds"
  echo "   $(grep -E '^=+ .* in [0-9.]+s' "$out/$name-$part.log" | tail -1 || true) (log: $out/$name-$part.log)"
}

compare() {
  "$py" "$root/scripts/sqlalchemy_suite/compare.py" --root "$sdist" --out "$out" "$@"
}

for i in "${!labels[@]}"; do
  part=${labels[$i]}
  echo "${options[$i]:+${options[$i]} }$([ $user_paths = 0 ] && echo "${paths[$i]}" || echo "${pytest_args[*]}")" \
    >"$out/$part.args"
  run bare "$part" "${options[$i]}" "${paths[$i]}"
  run attached "$part" "${options[$i]}" "${paths[$i]}"
  # Confirm each difference once, both ways, so that a timing test that failed under
  # load in one run only is reported as not reproduced instead of failing the check.
  compare --differences "$part" >"$out/differences-$part.txt"
  n=$(wc -l <"$out/differences-$part.txt")
  if [ "$rerun" = 1 ] && [ "$n" -gt 0 ] && [ "$n" -le "$rerun_max" ]; then
    run rerun-bare "$part" "${options[$i]}" "" "$out/differences-$part.txt"
    run rerun-attached "$part" "${options[$i]}" "" "$out/differences-$part.txt"
  fi
done

compare --title "SQLAlchemy $version test suite, subset $subset: bare vs sqlprobe.attach() on every engine" \
  "${labels[@]}"
