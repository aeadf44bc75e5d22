#!/usr/bin/env bash
# Quickstart 1: install if needed, then train the demo-cpu recipe (2 local ranks, ZeRO-2,
# CLM and MLM phases) on the bundled corpus into runs/demo. Extra arguments are passed to
# antlm-train, e.g.  bash launch/demo.sh train.lr=1e-3
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
exec "${ANTLM_VENV:-$ROOT/.venv}/bin/antlm-train" --config demo-cpu --output-dir "${ANTLM_OUTPUT_DIR:-$ROOT/runs/demo}" --overwrite "$@"
