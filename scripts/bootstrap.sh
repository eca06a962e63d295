#!/usr/bin/env bash
# Install what nipype_nibtrack needs on a fresh Debian machine: the external tools
# (apt-get, when run as root) and the package itself in .venv.
#   scripts/bootstrap.sh demo   elastix, and the package with its demo extra
#                               (nilearn's brain template, matplotlib for the pictures)
#   scripts/bootstrap.sh test   also mrtrix3, slurm-wlm, munge, slurmdbd, mariadb-server,
#                               and the demo/test/docs/pydra extras
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=${1:-demo}
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
command -v elastix >/dev/null || missing+=(elastix)
if [ "$mode" = test ]; then
    command -v mrconvert >/dev/null || missing+=(mrtrix3)
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)  # accounting, for sacct
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    # the optional C kernel (nipype_nibtrack/_gather.c): CI tests it built
    command -v cc >/dev/null || missing+=(gcc)
    "${PYTHON:-python3}" -c 'import os, sysconfig, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || missing+=(python3-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "[bootstrap] apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    elif [ "$mode" = demo ] && ! command -v flirt >/dev/null; then
        echo "[bootstrap] missing: ${missing[*]}. Install with: sudo apt-get install ${missing[*]}" >&2
        exit 1
    else
        echo "[bootstrap] missing (tests needing them skip outside CI): ${missing[*]}." \
            "Install with: sudo apt-get install ${missing[*]}" >&2
    fi
fi

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    echo "[bootstrap] creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
extras="[demo]"
# pydra: pinned pre-releases, no --pre needed
[ "$mode" = test ] && extras="[demo,test,docs,pydra]"
echo "[bootstrap] pip install -e .$extras"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root$extras"
