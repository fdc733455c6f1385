#!/usr/bin/env bash
# Mutation testing (mutmut), per target: `bash scripts/mutation.sh [TARGET...]` (default:
# every target). Targets are the [tool.mutmut.targets.*] tables of pyproject.toml: the
# modules to mutate and the tests to run against their mutants. Each target runs in
# build/mutation/TARGET and writes its survivors, with diffs, to
# mutation-survivors-TARGET.txt. Long: not part of the default suite. The machine is
# shared, so one worker by default (MUTATION_WORKERS=2 or --workers 2 for two).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/mutmut ] || .venv/bin/python -m pip install -q --disable-pip-version-check 'mutmut>=3.8,<3.9'
exec .venv/bin/python scripts/mutation.py "$@"
