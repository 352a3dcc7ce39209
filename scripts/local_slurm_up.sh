#!/usr/bin/env bash
# moe-launch: bring up a real Slurm cluster (munged + slurmctld + slurmd) on this host,
# idempotently, from a fresh Debian 12 machine: one node, or N emulated nodes (one slurmd
# each, `slurmd -N nI`, all at 127.0.0.1 on distinct ports).  Everything but the apt
# packages lives under $SLURM_LOCAL_BASE.  Daemons run as root.
#
#   SLURM_LOCAL_BASE   state/config/log dir     (default ${TMPDIR:-/tmp}/local-slurm)
#   SLURM_LOCAL_NODES  1 (default): one node named after this host;
#                      N > 1: emulated nodes n1..nN, each with all host CPUs and 1/N of its memory.
#                      Their names do not resolve: jobs must use NodeAddr (the job template does).
#                      Re-running with another N restarts the daemons with the new node set.
#   SLURM_LOCAL_CLEAN  1 = wipe job/node state before starting (fresh job ids)
#   SLURMCTLD_PORT / SLURMD_PORT                 (default 6817 / 6818)
#   SLURM_LOCAL_TIMEOUT seconds to wait for the node to be idle (default 60)
#   SLURM_LOCAL_PROCTRACK   linuxproc (default; a double-forked child of a job
#                           escapes scancel) | cgroup (proctrack/cgroup on the cgroup-v1
#                           freezer hierarchy only; creates /sys/fs/cgroup/freezer/slurm_<host>)
#   SLURM_LOCAL_ACCOUNTING  none (default): no slurmdbd; plain `sacct` fails,
#                           `sacct -c` reads the jobcomp/filetxt file.
#                           dbd: also install+run MariaDB (127.0.0.1:$SLURM_LOCAL_DB_PORT,
#                           default 3307) and slurmdbd (port $SLURMDBD_PORT, default 6819)
#                           so that `sacct` works as on a real cluster.
#
# After it returns 0:   source "$SLURM_LOCAL_BASE/env.sh"   (exports SLURM_CONF)
set -euo pipefail

BASE=${SLURM_LOCAL_BASE:-${TMPDIR:-/tmp}/local-slurm}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
NODES=${SLURM_LOCAL_NODES:-1}
ACCT=${SLURM_LOCAL_ACCOUNTING:-none}
PROCTRACK=${SLURM_LOCAL_PROCTRACK:-linuxproc}
DBD_PORT=${SLURMDBD_PORT:-6819}
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
CONF=$BASE/etc/slurm.conf
log() { echo "[local_slurm_up] $*" >&2; }
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { log "SLURM_LOCAL_NODES must be a number of nodes from 1 to 99, got '$NODES'"; exit 2; }

# ---------------------------------------------------------------- 1. packages
PKGS="slurmctld slurmd slurm-client munge"
[ "$ACCT" = dbd ] && PKGS="$PKGS slurmdbd mariadb-server"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null \
   || { [ "$ACCT" = dbd ] && { ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; }; }; then
  log "installing $PKGS from Debian"
  # Keep the packages' init scripts from starting system-wide daemons
  # (/etc/munge key, /etc/slurm config) during install: we start our own.
  tmp_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    tmp_policy=/usr/sbin/policy-rc.d
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
  [ -n "$tmp_policy" ] && rm -f "$tmp_policy"
fi

# ---------------------------------------------------------------- 2. layout
mkdir -p "$BASE"/{etc,log,run,spool/ctld,munge}
chmod 700 "$BASE/munge"       # munged: key dir must not be world readable
chmod 755 "$BASE/run"         # munged: socket dir must be o+x
if [ ! -s "$BASE/munge/munge.key" ]; then
  dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$BASE/munge/munge.key"
fi
if [ "${SLURM_LOCAL_CLEAN:-0}" = 1 ]; then
  rm -rf "$BASE"/spool/ctld/* "$BASE"/spool/node-* "$BASE"/log/jobcomp.txt
fi

# ---------------------------------------------------------------- 3. config
HOST=$(hostname -s)
# "NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=.."
NODELINE=$(slurmd -C | head -n1)
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODELINE")
MEM=$(( MEM * 9 / 10 / NODES ))  # leave headroom: more than detected => node INVAL
if [ "$NODES" = 1 ]; then
  NODELINES="$(sed "s/RealMemory=[0-9]*/RealMemory=$MEM/" <<<"$NODELINE") NodeAddr=127.0.0.1 State=UNKNOWN"
  NODENAMES=$HOST
else
  CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$NODELINE")
  NODELINES=""; NODENAMES=""
  for i in $(seq 1 "$NODES"); do
    NODELINES+="NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"$'\n'
    NODENAMES+="n$i "
  done
fi
if [ "$ACCT" = dbd ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# munge socket used for slurmctld<->slurmdbd (default would be /run/munge/munge.socket.2)
AccountingStoragePass=$BASE/run/munge.socket"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
cat > "$CONF.new" <<EOF
# generated by moe-launch scripts/local_slurm_up.sh
ClusterName=localtest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire also = delay before a requeued job may start again (default 120 s)
AuthInfo=socket=$BASE/run/munge.socket,cred_expire=10
StateSaveLocation=$BASE/spool/ctld
SlurmdSpoolDir=$BASE/spool/node-%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups: plain process tracking, no task binding/confinement
ProctrackType=proctrack/$PROCTRACK
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
EnforcePartLimits=ALL
ReturnToService=2
JobAcctGatherType=jobacct_gather/linux
$ACCT_LINES
# 'sacct -c' reads this file (works with or without slurmdbd)
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
$NODELINES
# Preemption as on shared clusters: jobs in 'urgent' requeue those in 'debug' (SIGTERM, then up to
# GraceTime seconds to checkpoint before SIGKILL); the launcher's preemption test uses it.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
if [ -f "$CONF" ] && ! cmp -s "$CONF" "$CONF.new" && [ -n "$(ls "$BASE"/run/slurm*.pid 2>/dev/null)" ]; then
  # a different node set or option: daemons read their config at start, so restart them
  log "configuration changed: restarting the cluster"
  SLURM_LOCAL_BASE=$BASE bash "$(dirname "$0")/local_slurm_down.sh"
fi
for n in $NODENAMES; do mkdir -p "$BASE/spool/node-$n"; done
mv "$CONF.new" "$CONF"
if [ "$PROCTRACK" = cgroup ]; then
  # only the freezer controller is used; no task/cgroup (it would move job
  # processes to other cgroups of the memory/cpuset hierarchies)
  printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n' > "$BASE/etc/cgroup.conf"
else
  rm -f "$BASE/etc/cgroup.conf"
fi
echo "export SLURM_CONF=$CONF" > "$BASE/env.sh"
export SLURM_CONF=$CONF

# ---------------------------------------------------------------- 4. daemons
# alive PIDFILE COMM: pid in file is running and is the expected program
alive() {
  local p; p=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$p" ] && [ -d "/proc/$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ]
}
t0=$(date +%s.%N)
if ! alive "$BASE/run/munged.pid" munged; then
  log "starting munged"
  munged --socket="$BASE/run/munge.socket" --key-file="$BASE/munge/munge.key" \
         --pid-file="$BASE/run/munged.pid" --log-file="$BASE/log/munged.log" \
         --seed-file="$BASE/munge/munged.seed"
fi
for _ in $(seq 50); do munge -S "$BASE/run/munge.socket" -n >/dev/null 2>&1 && break; sleep 0.1; done
if [ "$ACCT" = dbd ]; then
  mkdir -p "$BASE/db/data"
  if [ ! -d "$BASE/db/data/mysql" ]; then
    log "initialising MariaDB datadir"
    mariadb-install-db --no-defaults --user=root --datadir="$BASE/db/data" \
      --auth-root-authentication-method=normal --skip-test-db >"$BASE/log/mariadb-install.log" 2>&1
  fi
  if ! alive "$BASE/run/mariadbd.pid" mariadbd; then
    log "starting mariadbd on 127.0.0.1:$DB_PORT"
    setsid mariadbd --no-defaults --user=root --datadir="$BASE/db/data" \
      --socket="$BASE/run/mysqld.sock" --pid-file="$BASE/run/mariadbd.pid" \
      --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
      --innodb-buffer-pool-size=64M --log-error="$BASE/log/mariadbd.err" \
      </dev/null >/dev/null 2>&1 &
  fi
  for _ in $(seq 300); do
    mariadb --no-defaults -S "$BASE/run/mysqld.sock" -uroot -e 'select 1' >/dev/null 2>&1 && break; sleep 0.1
  done
  mariadb --no-defaults -S "$BASE/run/mysqld.sock" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; CREATE DATABASE IF NOT EXISTS slurm_acct_db; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  # slurmdbd has no -f: it reads slurmdbd.conf from the directory of $SLURM_CONF
  cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$BASE/run/munge.socket
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$BASE/etc/slurmdbd.conf"      # slurmdbd refuses a readable one
  if ! alive "$BASE/run/slurmdbd.pid" slurmdbd; then log "starting slurmdbd"; slurmdbd; fi
  for _ in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.1; done
fi
if ! alive "$BASE/run/slurmctld.pid" slurmctld; then
  log "starting slurmctld"
  slurmctld -f "$CONF"
fi
for n in $NODENAMES; do
  alive "$BASE/run/slurmd-$n.pid" slurmd && continue
  log "starting slurmd for node $n"
  if [ "$NODES" = 1 ]; then slurmd -f "$CONF"; else slurmd -f "$CONF" -N "$n"; fi
done

# ---------------------------------------------------------------- 5. wait idle
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
  states=$(sinfo -h -N -o "%N %T" 2>/dev/null || true)
  ready=$(awk '$2=="idle"||$2=="mixed"||$2=="allocated"' <<<"$states" | wc -l)
  [ "$ready" -ge "$NODES" ] && break
  awk '$2 ~ /^(down|drain|fail)/ {print $1}' <<<"$states" | while read -r nd; do
    scontrol update nodename="$nd" state=resume 2>/dev/null || true
  done
  if [ "$(date +%s)" -ge "$deadline" ]; then
    log "nodes not idle after ${TIMEOUT}s: $(tr '\n' ' ' <<<"$states"); see $BASE/log/"
    exit 1
  fi
  sleep 0.2
done
log "$NODES node(s) ready ($(echo $NODENAMES)) after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}') s;  export SLURM_CONF=$CONF"
