#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for tests, CI and trying the sbatch scripts on a laptop.
#
#   sudo tools/slurm_local_cluster.sh start     # installs slurm-wlm + munge with apt-get if absent
#   export SLURM_CONF=/tmp/t2i-slurm/slurm.conf # what `start` prints; sbatch/squeue read it
#   sbatch --wait --ntasks 2 slurm/train_cpu.sbatch
#   sudo tools/slurm_local_cluster.sh stop
#
# Machines without systemd (containers, CI boxes) cannot use the Debian services, so this starts
# the three daemons by hand: munged (as user munge, on a socket of its own), slurmctld and
# slurmd (as root), with every file under T2I_SLURM_DIR (default /tmp/t2i-slurm). `start` is
# idempotent: a cluster that answers `scontrol ping` is left alone. The node gets
# max(2, nproc) CPUs so a two-task job runs on a two-core machine.
#
# Environment: T2I_SLURM_DIR (state), T2I_SLURM_PORT (slurmctld; slurmd uses the next port),
# T2I_SLURM_CPUS (CPUs of the node).
set -euo pipefail

STATE=${T2I_SLURM_DIR:-/tmp/t2i-slurm}
PORT=${T2I_SLURM_PORT:-6817}
NODE=$(hostname -s)
CPUS=${T2I_SLURM_CPUS:-$(( $(nproc) > 2 ? $(nproc) : 2 ))}
export SLURM_CONF="$STATE/slurm.conf"

die() { echo "slurm_local_cluster: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and this is not root"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get"
  echo "slurm_local_cluster: installing slurm-wlm and munge with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_munge_key() {
  local key="$STATE/munge/munge.key"
  [ -s "$key" ] && return
  head -c 1024 /dev/urandom >"$key"
  chown munge:munge "$key"
  chmod 0400 "$key"
}

write_slurm_conf() {
  cat >"$SLURM_CONF" <<EOF
# Written by tools/slurm_local_cluster.sh: a one-node cluster on localhost.
ClusterName=t2i-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (120 s by
# default); 10 s keeps the requeue tests short
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# no cgroups, no systemd: track processes by their parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# trust the CPU count below even on a machine with fewer cores
SlurmdParameters=config_overrides
KillWait=30
# finished jobs stay visible for 16 s: `sbatch --wait` then polls every 8 s (not every 32 s)
MinJobAge=16
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { scontrol ping 2>/dev/null | grep -q "UP"; }

start() {
  install_packages
  if [ -f "$SLURM_CONF" ] && running; then
    echo "export SLURM_CONF=$SLURM_CONF"
    return
  fi
  [ "$(id -u)" = 0 ] || die "starting slurmctld/slurmd needs root"
  stop >/dev/null 2>&1 || true
  mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/munge"
  chown munge:munge "$STATE/munge"
  chmod 0700 "$STATE/munge"
  write_munge_key
  runuser -u munge -- munged --force --socket="$STATE/munge/munge.socket" \
    --key-file="$STATE/munge/munge.key" --pid-file="$STATE/munge/munged.pid" \
    --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
  write_slurm_conf
  slurmctld -i   # -i: ignore state left by an earlier cluster in this folder
  slurmd
  for _ in $(seq 1 60); do
    if running && sinfo -h -o %t 2>/dev/null | grep -qE "^(idle|mix|alloc)"; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return
    fi
    sleep 0.5
  done
  tail -n 20 "$STATE"/slurmctld.log "$STATE"/slurmd.log >&2 || true
  die "the cluster did not come up (logs above, state in $STATE)"
}

stop_pidfile() {
  local pidfile=$1
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$pidfile"
}

stop() {
  stop_pidfile "$STATE/slurmd.pid"
  stop_pidfile "$STATE/slurmctld.pid"
  stop_pidfile "$STATE/munge/munged.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if running; then sinfo; else echo "not running"; exit 3; fi ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
