#!/usr/bin/env bash
# The whole test suite, from nothing: system packages, services, virtualenvs, lint,
# types, tests (SQLAlchemy 2.1, then a smoke subset on 2.0). CI runs exactly this
# (.ci/run); README tells developers to run it too. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '\n== %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

log "system packages"
need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need_apt+=(prometheus-alertmanager)
command -v tmux >/dev/null || need_apt+=(tmux)  # `sqlprobe top` is tested in a terminal
# hypopg (hypothetical indexes) for the index advisor's tests, for the installed server.
pg_major=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1 || true)
if [ -n "$pg_major" ] && [ ! -f "/usr/share/postgresql/$pg_major/extension/hypopg.control" ]; then
  need_apt+=("postgresql-$pg_major-hypopg")
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
promtool --version | head -1

log "services"
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
fi
if ! mysqladmin -h 127.0.0.1 -uroot status >/dev/null 2>&1; then
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
fi
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p 5432 && mysqladmin -h 127.0.0.1 -uroot status >/dev/null 2>&1 && break
  sleep 1
done
pg_isready -h 127.0.0.1 -p 5432
mysqladmin -h 127.0.0.1 -uroot status

PY=${PYTHON:-python3}
log "virtualenv (.venv, SQLAlchemy 2.1)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' -r requirements-dev.txt 2>&1 \
  | { grep -v '^WARNING: Location' || true; }
.venv/bin/python -c 'import sqlalchemy, sys; print("python", sys.version.split()[0], "sqlalchemy", sqlalchemy.__version__)'

log "lint and types"
.venv/bin/ruff check sqlprobe tests benchmarks examples dashboards
.venv/bin/ruff format --check sqlprobe tests benchmarks examples dashboards
.venv/bin/mypy
.venv/bin/lint-imports

log "docs (mkdocs build --strict)"
docs_out=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$docs_out/site"
rm -rf "$docs_out"

log "tests (SQLAlchemy 2.1)"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
[ $rc -eq 5 ] && { echo "pytest collected no tests"; exit 1; }
[ $rc -ne 0 ] && exit $rc

# SQLAlchemy's own engine and sql tests, bare and with sqlprobe attached to every engine
# (docs/reliability.md): fails when a test fails only attached. Runs with the whole suite
# (no pytest arguments); SQLPROBE_SA_SUITE=0 skips it, =1 forces it.
sa_suite=${SQLPROBE_SA_SUITE:-}
[ -z "$sa_suite" ] && { [ $# -eq 0 ] && sa_suite=1 || sa_suite=0; }
if [ "$sa_suite" = 1 ]; then
  log "SQLAlchemy's own tests, bare and attached (scripts/sqlalchemy-suite.sh --subset ci)"
  scripts/sqlalchemy-suite.sh --subset ci
fi

log "smoke tests (SQLAlchemy 2.0)"
[ -x .venv-sa20/bin/python ] || "$PY" -m venv .venv-sa20
.venv-sa20/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' -r requirements-dev.txt 'sqlalchemy[asyncio]>=2.0,<2.1' 2>&1 \
  | { grep -v '^WARNING: Location' || true; }
.venv-sa20/bin/python -c 'import sqlalchemy; print("sqlalchemy", sqlalchemy.__version__)'
.venv-sa20/bin/python -m pytest -q -p no:cacheprovider -m "smoke and not soak"

# Python 3.12+ finds the checkout's application frame by module name
# (sys._getframemodulename), a path Python 3.11 cannot take: its tests run there too,
# where an interpreter of 3.12 or later is on the machine.
py312=""
pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for candidate in python3.12 python3.13 "$pyenv_root"/versions/3.12*/bin/python3 "$pyenv_root"/versions/3.13*/bin/python3; do
  if "$candidate" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; then
    py312=$candidate
    break
  fi
done
if [ -n "$py312" ]; then
  log "pool, slow-query and N+1 tests ($py312, SQLAlchemy 2.1)"
  [ -x .venv-py312/bin/python ] || "$py312" -m venv .venv-py312
  .venv-py312/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' -r requirements-dev.txt 2>&1 \
    | { grep -v '^WARNING: Location' || true; }
  .venv-py312/bin/python -c 'import sys, sqlalchemy; print("python", sys.version.split()[0], "sqlalchemy", sqlalchemy.__version__)'
  .venv-py312/bin/python -m pytest -q -p no:cacheprovider -m "not soak" \
    tests/test_pool_hold.py tests/test_pool.py tests/test_slowlog.py tests/test_slowlog_async.py tests/test_nplusone.py
else
  echo "no Python 3.12 or later on this machine: its frame path is tested by emulation only"
fi
