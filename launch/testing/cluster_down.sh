#!/usr/bin/env bash
# Tear down the cluster of cluster_up.sh: cancel its jobs, stop the daemons it recorded
# (by PID, from <dir>/pids), delete its namespaces, bridge and /etc/hosts lines.
# Safe to run twice, and after a failed bring-up.
set -uo pipefail
DIR=${ANTLM_CLUSTER_DIR:-/tmp/antlm-slurm}
HOSTS_TAG="# antlm-slurm test cluster"
say() { echo "[cluster_down] $*" >&2; }

if [ ! -f "$DIR/pids" ]; then
  say "nothing recorded in $DIR/pids"
  exit 0
fi
if [ -f "$DIR/slurm.conf" ]; then
  export SLURM_CONF=$DIR/slurm.conf
  # A plain cancel: SIGTERM, then SIGKILL after KillWait, so jobs can clean up.
  timeout 10 scancel --user "$(id -un)" >/dev/null 2>&1
  for _ in $(seq 80); do
    [ -z "$(timeout 5 squeue -h -t running,completing 2>/dev/null)" ] && break
    sleep 0.5
  done
fi
# Daemons first (newest first), then namespaces and the bridge.
tac "$DIR/pids" | while read -r kind what; do
  case $kind in
    munged|slurmctld|slurmd)
      if kill -0 "$what" 2>/dev/null; then
        kill -TERM "$what" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$what" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$what" 2>/dev/null && kill -KILL "$what" 2>/dev/null
      fi ;;
  esac
done
tac "$DIR/pids" | while read -r kind what; do
  case $kind in
    netns) ip netns del "$what" 2>/dev/null ;;
    bridge) ip link del "$what" 2>/dev/null ;;
  esac
done
sed -i "/$HOSTS_TAG\$/d" /etc/hosts
rm -f "$DIR/pids" "$DIR/env.sh"
say "down (logs kept in $DIR/log)"
