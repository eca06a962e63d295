#!/usr/bin/env bash
# Everything the project checks: install, start the one-node SLURM cluster (as root),
# lint, nipype's own interface suite twice (as shipped, then with every interface class
# replaced by its image-aware class), the test suite (doctests included) and the
# documentation build.
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
# nipype's interface suite (its tests and doctests, its own pytest.ini), each run in a
# temporary directory of its own: the suite leaves files behind in its data folder.
suite=$(mktemp -d)
nipype_ini=$(.venv/bin/python -c 'import nipype, os; print(os.path.join(os.path.dirname(nipype.__file__), "pytest.ini"))')
run_nipype_suite() {  # name, then extra pytest arguments
    local name=$1
    shift
    mkdir -p "$suite/$name"
    TMPDIR="$suite/$name" FSLOUTPUTTYPE=NIFTI_GZ NIPYPE_NO_ET=1 .venv/bin/python -m pytest \
        -c "$nipype_ini" --pyargs nipype.interfaces -q -p no:cacheprovider \
        --junitxml="$suite/$name.xml" "$@" >"$suite/$name.log" 2>&1 || true
}
run_nipype_suite shipped
run_nipype_suite wrapped -p tests.nipype_suite.plugin
.venv/bin/python tests/nipype_suite/compare.py "$suite/shipped.xml" "$suite/wrapped.xml"

# our own suite last: its closing line is the one that counts
.venv/bin/python -m pytest "$@"
if [ -f docs/conf.py ]; then
    .venv/bin/python -m sphinx -W --keep-going -b html -q docs docs/_build/html
fi
