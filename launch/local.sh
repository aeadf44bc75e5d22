#!/usr/bin/env bash
# One machine, N local ranks: torchrun --standalone around `python -m antlm_dist.train`.
# Arguments go to antlm-train unchanged, e.g.
#   bash launch/local.sh --config demo-cpu --output-dir runs/demo
#   ANTLM_NPROC_PER_NODE=8 bash launch/local.sh --config babyllama-58m-antlm --output-dir runs/58m --resume
# Knobs (env): ANTLM_NPROC_PER_NODE (GPUs on this machine, or 2 without GPUs),
# ANTLM_VENV (the project's .venv), OMP_NUM_THREADS (1).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${ANTLM_VENV:-$ROOT/.venv}
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC_PER_NODE=${ANTLM_NPROC_PER_NODE:-${GPUS:-0}}
[ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$VENV/bin/torchrun" --standalone --nproc_per_node="$NPROC_PER_NODE" -m antlm_dist.train "$@"
