#!/usr/bin/env bash
# Bring up a throw-away Slurm cluster of ANTLM_CLUSTER_NODES nodes (default 2) on this
# machine, to try launch/slurm/antlm.sbatch on a laptop and to test it in CI.
#
#   sudo bash launch/testing/cluster_up.sh        # prints: source <dir>/env.sh
#   source /tmp/antlm-slurm/env.sh                # SLURM_CONF, ANTLM_SLURM_CLUSTER=1
#   sinfo; sbatch --nodes 2 launch/slurm/antlm.sbatch ...
#   sudo bash launch/testing/cluster_down.sh
#
# Needs root and Debian's `slurmctld slurmd slurm-client munge` (+ iproute2, util-linux).
# Each node gets its own network namespace, address (10.77.0.N), and hostname (nodeN)
# via `nsenter --net=... unshare --uts` (not `ip netns exec`: it remounts /sys, which
# breaks slurmd). Where namespaces are not permitted, every slurmd runs on 127.0.0.1 on
# its own port instead (ANTLM_CLUSTER_MODE=loopback forces that).
#
# Knobs (env): ANTLM_CLUSTER_DIR (/tmp/antlm-slurm), ANTLM_CLUSTER_NODES (2),
# ANTLM_CLUSTER_MODE (auto | netns | loopback), ANTLM_CLUSTER_SUBNET (10.77.0),
# ANTLM_SLURMCTLD_PORT (6817), ANTLM_SLURM_KILL_WAIT (30).
# Every daemon's PID is recorded in <dir>/pids; cluster_down.sh stops exactly those.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${ANTLM_CLUSTER_DIR:-/tmp/antlm-slurm}
NODES=${ANTLM_CLUSTER_NODES:-2}
MODE=${ANTLM_CLUSTER_MODE:-auto}
SUBNET=${ANTLM_CLUSTER_SUBNET:-10.77.0}
CTL_PORT=${ANTLM_SLURMCTLD_PORT:-6817}
BRIDGE=antlm-br0
HOSTS_TAG="# antlm-slurm test cluster"

say() { echo "[cluster_up] $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (daemons run as root/munge; namespaces and /etc/hosts need it)"
for tool in slurmctld slurmd munged sinfo; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install slurmctld slurmd slurm-client munge"
done
if [ -f "$DIR/pids" ]; then
  die "$DIR/pids exists: a cluster is up (or was not torn down); run launch/testing/cluster_down.sh first"
fi

# ---- mode: try one namespace; fall back to loopback where that is not permitted
if [ "$MODE" = auto ]; then
  MODE=loopback
  if command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null \
      && ip netns add antlm-probe 2>/dev/null; then
    ip netns del antlm-probe
    if ip link add antlm-probe type bridge 2>/dev/null; then
      ip link del antlm-probe
      MODE=netns
    fi
  fi
fi
say "mode $MODE, $NODES nodes, state in $DIR"

mkdir -p "$DIR"/{state,spool,run,log,munge}
: > "$DIR/pids"

# ---- munge: our own key and socket, so a system munged (if any) is left alone
chown munge:munge "$DIR/munge"
chmod 755 "$DIR/munge"
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$DIR/munge/munge.key"
chmod 400 "$DIR/munge/munge.key"
runuser -u munge -- munged --foreground --force --key-file="$DIR/munge/munge.key" \
  --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
  --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" > "$DIR/log/munged.out" 2>&1 &
echo "munged $!" >> "$DIR/pids"
for _ in $(seq 50); do [ -S "$DIR/munge/munge.socket" ] && break; sleep 0.1; done
[ -S "$DIR/munge/munge.socket" ] || die "munged did not start; see $DIR/munge/munged.log"

# ---- network: a bridge in this namespace, one veth pair per node namespace
if [ "$MODE" = netns ]; then
  CTL_ADDR=$SUBNET.254
  ip link add "$BRIDGE" type bridge
  ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  echo "bridge $BRIDGE" >> "$DIR/pids"
  for n in $(seq "$NODES"); do
    ns=antlm-node$n
    ip netns add "$ns"
    echo "netns $ns" >> "$DIR/pids"
    ip link add "antlm-v$n" type veth peer name "antlm-v${n}p"
    ip link set "antlm-v${n}p" netns "$ns"
    ip link set "antlm-v$n" master "$BRIDGE"
    ip link set "antlm-v$n" up
    nsenter --net="/run/netns/$ns" ip link set lo up
    nsenter --net="/run/netns/$ns" ip addr add "$SUBNET.$n/24" dev "antlm-v${n}p"
    nsenter --net="/run/netns/$ns" ip link set "antlm-v${n}p" up
  done
else
  CTL_ADDR=127.0.0.1
fi

# ---- names: nodeN resolves everywhere (the namespaces share this /etc/hosts)
sed -i "/$HOSTS_TAG\$/d" /etc/hosts
for n in $(seq "$NODES"); do
  if [ "$MODE" = netns ]; then addr=$SUBNET.$n; else addr=127.0.0.1; fi
  echo "$addr node$n $HOSTS_TAG" >> /etc/hosts
done

# ---- slurm.conf
CONF=$DIR/slurm.conf
sed -e "s|@DIR@|$DIR|g" -e "s|@CTL_HOST@|$(hostname -s)|g" -e "s|@CTL_ADDR@|$CTL_ADDR|g" \
    -e "s|@CTL_PORT@|$CTL_PORT|g" -e "s|@KILL_WAIT@|${ANTLM_SLURM_KILL_WAIT:-30}|g" \
    "$HERE/slurm.conf.in" > "$CONF"
CPUS=$(nproc)
for n in $(seq "$NODES"); do
  if [ "$MODE" = netns ]; then
    echo "NodeName=node$n NodeAddr=$SUBNET.$n CPUs=$CPUS State=UNKNOWN" >> "$CONF"
  else
    echo "NodeName=node$n NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$((6820 + n)) CPUs=$CPUS State=UNKNOWN" >> "$CONF"
  fi
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$CONF"

# ---- daemons, in the foreground of background jobs so that $! is the daemon itself
slurmctld -D -i -f "$CONF" > "$DIR/log/slurmctld.out" 2>&1 &
echo "slurmctld $!" >> "$DIR/pids"
for n in $(seq "$NODES"); do
  mkdir -p "$DIR/spool/node$n"
  if [ "$MODE" = netns ]; then
    # nsenter and unshare exec (no fork), so $! is slurmd's PID.
    nsenter --net="/run/netns/antlm-node$n" unshare --uts \
      sh -c "hostname node$n; exec slurmd -D -f '$CONF' -N node$n" > "$DIR/log/slurmd.node$n.out" 2>&1 &
  else
    slurmd -D -f "$CONF" -N "node$n" > "$DIR/log/slurmd.node$n.out" 2>&1 &
  fi
  echo "slurmd $!" >> "$DIR/pids"
done

cat > "$DIR/env.sh" <<ENV
# source me: point Slurm's client commands at the test cluster
export SLURM_CONF=$CONF
export ANTLM_SLURM_CLUSTER=1
export ANTLM_SLURM_CLUSTER_MODE=$MODE
ENV
export SLURM_CONF=$CONF
for _ in $(seq 100); do
  idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
  [ "$idle" -ge "$NODES" ] && break
  sleep 0.2
done
sinfo -N >&2 || true
[ "$idle" -ge "$NODES" ] || die "only $idle of $NODES nodes idle after 20 s; logs in $DIR/log"
say "up: source $DIR/env.sh"
