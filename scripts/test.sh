#!/usr/bin/env bash
# Everything the project checks: install, start the one-node SLURM cluster (as root),
# lint, the test suite (doctests included) and the documentation build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh test
if [ "$(id -u)" -eq 0 ]; then
    bash .ci/slurm-up.sh
fi
export LOGNAME="${LOGNAME:-$(id -un)}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
if [ -f docs/conf.py ]; then
    .venv/bin/python -m sphinx -W --keep-going -b html -q docs docs/_build/html
fi
