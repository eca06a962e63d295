#!/usr/bin/env bash
# The main job: realign a functional series held in memory, show the motion found
# against the truth (two pictures), then rerun: the second run runs nothing, the third,
# after one voxel of volume 5 changed in memory, reruns only what depends on it.
# Arguments go to workflows/realign.py (see --help); without any, --runs 3 --perturb 5.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh" demo
[ $# -eq 0 ] && set -- --runs 3 --perturb 5
exec "$root/.venv/bin/python" "$root/workflows/realign.py" "$@"
