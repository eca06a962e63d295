#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by .ci/slurm-up.sh: slurmd, slurmctld,
# slurmdbd, mariadbd and munged.
# Harmless when nothing is running. Set SLURM_DOWN_KEEP_MUNGE=1 to leave munged.
set -u

stop() {  # stop <exact process name> [seconds]: SIGTERM, wait (10 s), then SIGKILL
    local name="$1" wait="${2:-10}"
    pgrep -x "$name" >/dev/null || return 0
    echo "[slurm-down] stopping $name"
    pkill -TERM -x "$name" || true
    for _ in $(seq 1 $(( wait * 2 ))); do
        pgrep -x "$name" >/dev/null || return 0
        sleep 0.5
    done
    echo "[slurm-down] $name still running; sending SIGKILL"
    pkill -KILL -x "$name" || true
}

# cancel our jobs first so slurmd has no steps left behind
if command -v scancel >/dev/null && pgrep -x slurmctld >/dev/null; then
    scancel --user=root >/dev/null 2>&1 || true
fi
stop slurmd
stop slurmctld
stop slurmdbd  # after slurmctld, which sends it the last job records
stop mariadbd 60  # SIGTERM is a clean shutdown; give InnoDB time to flush
if [ -z "${SLURM_DOWN_KEEP_MUNGE:-}" ]; then
    stop munged
fi
echo "[slurm-down] done"
exit 0
