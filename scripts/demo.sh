#!/usr/bin/env bash
# The main job: realign a mean functional image computed in memory to an anatomical
# image, twice. The second run writes no image file and runs no tool.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh" demo
exec "$root/.venv/bin/python" "$root/workflows/realign.py" "$@"
