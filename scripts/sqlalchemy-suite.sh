#!/usr/bin/env bash
# SQLAlchemy's own test suite, run twice: bare, and with sqlprobe attached to every
# engine; then the sets of failing tests are compared (docs/reliability.md).
#
#   scripts/sqlalchemy-suite.sh [--subset ci|full|postgresql] [--venv DIR] [pytest args]
#
# The tests come from the sdist of the SQLAlchemy version installed in the virtualenv
# (default .venv), downloaded once into $SQLPROBE_SA_CACHE (default .cache/sqlalchemy-suite,
# git-ignored) and run against the *installed* library (PYTHONNOUSERSITE=1 stops the
# suite's conftest.py from putting the sdist's lib/ first), with SQLAlchemy's own pytest
# plugin. The attached run has scripts/sqlalchemy_suite/attached on PYTHONPATH, whose
# sitecustomize.py calls sqlprobe.attach() with a fresh registry before anything else.
# Extra arguments go to every pytest run (e.g. -k, -x, or test paths instead of the
# subset's). Exit status: 0 identical failure sets, 1 some test fails only attached,
# 2 the comparison is incomplete (see compare.py).
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
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --subset) subset=${2:?--subset needs a value}; shift 2 ;;
    --subset=*) subset=${1#--subset=}; shift ;;
    --venv) venv=${2:?--venv needs a value}; shift 2 ;;
    --venv=*) venv=${1#--venv=}; shift ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
    "$py" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
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

host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with psycopg.connect(host=host, port=port, user="postgres", dbname="postgres",
                     autocommit=True) as conn:
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
user_paths=0
for a in "${pytest_args[@]}"; do
  case "$a" in test/*|test|*.py|*::*) user_paths=1 ;; esac
done

out="$cache/runs/$subset"
rm -rf "$out"
mkdir -p "$out"
attached_path="$root/scripts/sqlalchemy_suite/attached"

run() { # run LABEL PART OPTIONS PATHS
  local run=$1 part=$2 opts=$3 tests=$4 start end rc
  local -a cmd=("$py" -m pytest -p no:cacheprovider --maxfail=1000000
    -o junit_family=xunit1 --junitxml="$out/$run-$part.xml")
  # shellcheck disable=SC2206
  [ -n "$opts" ] && cmd+=($opts)
  [ ${#pytest_args[@]} -gt 0 ] && cmd+=("${pytest_args[@]}")
  # shellcheck disable=SC2206
  [ $user_paths = 0 ] && cmd+=($tests)
  [ "$subset" = postgresql ] && fresh_pg_database
  log "$run run, $part: pytest ${opts:+$opts }$([ $user_paths = 0 ] && echo "$tests" || echo "(your paths)")"
  start=$(date +%s.%N)
  set +e
  if [ "$run" = attached ]; then
    (cd "$sdist" && PYTHONNOUSERSITE=1 PYTHONPATH="$attached_path${PYTHONPATH:+:$PYTHONPATH}" \
      SQLPROBE_SA_SUITE_MARKER="$out/marker-$part.jsonl" "${cmd[@]}") >"$out/$run-$part.log" 2>&1
  else
    (cd "$sdist" && PYTHONNOUSERSITE=1 "${cmd[@]}") >"$out/$run-$part.log" 2>&1
  fi
  rc=$?
  set -e
  end=$(date +%s.%N)
  echo "$rc" >"$out/$run-$part.rc"
  awk "BEGIN { printf \"%.1f\\n\", $end - $start }" >"$out/$run-$part.seconds"
  echo "   $(grep -E '^=+ .* in [0-9.]+s' "$out/$run-$part.log" | tail -1 || true) (log: $out/$run-$part.log)"
}

for i in "${!labels[@]}"; do
  echo "${options[$i]:+${options[$i]} }$([ $user_paths = 0 ] && echo "${paths[$i]}" || echo "${pytest_args[*]}")" \
    >"$out/${labels[$i]}.args"
  run bare "${labels[$i]}" "${options[$i]}" "${paths[$i]}"
  run attached "${labels[$i]}" "${options[$i]}" "${paths[$i]}"
done

"$py" "$root/scripts/sqlalchemy_suite/compare.py" --root "$sdist" --out "$out" \
  --title "SQLAlchemy $version test suite, subset $subset: bare vs sqlprobe.attach() on every engine" \
  "${labels[@]}"
