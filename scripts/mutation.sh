#!/usr/bin/env bash
# Mutation testing (mutmut): mutates the modules listed under [tool.mutmut] source_paths in
# pyproject.toml, runs the tests named there against each mutant, and writes the
# survivors to mutation-survivors.txt. Long: not part of the default suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/mutmut ] || .venv/bin/python -m pip install -q --disable-pip-version-check 'mutmut>=3.3'
rm -rf mutants
.venv/bin/mutmut run || true
.venv/bin/mutmut results 2>/dev/null | tee mutation-survivors.txt
echo "survivors: $(grep -c survived mutation-survivors.txt || true) (details: .venv/bin/mutmut show NAME)"
