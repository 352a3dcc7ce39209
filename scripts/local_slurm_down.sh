#!/usr/bin/env bash
# Stop the daemons started by scripts/local_slurm_up.sh, by their PID files only.
# Running jobs are cancelled first: slurmstepd processes outlive slurmd.
set -uo pipefail
BASE=${SLURM_LOCAL_BASE:-${TMPDIR:-/tmp}/local-slurm}
export SLURM_CONF=$BASE/etc/slurm.conf
log() { echo "[local_slurm_down] $*" >&2; }

alive() {
  local p; p=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$p" ] && [ -d "/proc/$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ]
}
stop() {  # stop PIDFILE COMM
  local f=$1 comm=$2 p
  if alive "$f" "$comm"; then
    p=$(cat "$f"); log "stopping $comm pid $p"
    kill -TERM "$p"
    for _ in $(seq 100); do [ -d "/proc/$p" ] || break; sleep 0.1; done
    if [ -d "/proc/$p" ]; then log "$comm $p still alive, SIGKILL"; kill -KILL "$p"; fi
  fi
  rm -f "$f"
}

if alive "$BASE/run/slurmctld.pid" slurmctld && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
  log "cancelling jobs"; scancel --full $(squeue -h -o %i) 2>/dev/null || true
  for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
fi
for f in "$BASE"/run/slurmd*.pid; do [ -e "$f" ] && stop "$f" slurmd; done
stop "$BASE/run/slurmctld.pid" slurmctld   # its child slurmscriptd exits with it
stop "$BASE/run/slurmdbd.pid"  slurmdbd
stop "$BASE/run/mariadbd.pid"  mariadbd
stop "$BASE/run/munged.pid"    munged
# remove the (now empty) freezer cgroups left by proctrack/cgroup, if any
d=/sys/fs/cgroup/freezer/slurm_$(hostname -s)
if [ -d "$d" ] && grep -q '^ProctrackType=proctrack/cgroup' "$SLURM_CONF" 2>/dev/null; then
  find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
fi
exit 0
