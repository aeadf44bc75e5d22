#!/usr/bin/env bash
# Write a DeepSpeed hostfile ("<host> slots=<N>" per line) for `deepspeed --hostfile`.
#   bash launch/hostfile.sh OUT [HOST ...]
# Hosts: the arguments, else the nodes of the current Slurm job
# (`scontrol show hostnames $SLURM_JOB_NODELIST`). Slots per host: ANTLM_SLOTS, else
# SLURM_GPUS_ON_NODE, else 1. Examples:
#   ANTLM_SLOTS=2 bash launch/hostfile.sh /tmp/hostfile localhost
#   deepspeed --hostfile /tmp/hostfile --no_ssh_check --master_addr 127.0.0.1 \
#     "$(which antlm-train)" --config demo-cpu --output-dir runs/ds
# Inside a Slurm allocation (inside sbatch), without ssh between nodes, start one launcher per node:
#   bash launch/hostfile.sh hostfile
#   srun --ntasks-per-node=1 bash -c 'exec deepspeed --hostfile hostfile --no_ssh --node_rank=$SLURM_NODEID \
#     --master_addr=$(head -n1 hostfile | cut -d" " -f1) "$(which antlm-train)" --config demo-cpu --output-dir runs/ds'
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 OUT [HOST ...]   (hosts default to the Slurm job's nodes)" >&2
  exit 2
fi
out=$1
shift
slots=${ANTLM_SLOTS:-${SLURM_GPUS_ON_NODE:-1}}
[ "$slots" -gt 0 ] || slots=1
if [ $# -gt 0 ]; then
  hosts=("$@")
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  echo "$0: give hosts, or run inside a Slurm job (SLURM_JOB_NODELIST is unset)" >&2
  exit 2
fi
tmp="$out.tmp$$"
for h in "${hosts[@]}"; do
  echo "$h slots=$slots"
done > "$tmp"
mv "$tmp" "$out"
