#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# torch==2.13.0 is installed FIRST: an unpinned torch would pull a multi-GB CUDA build
# on a CPU machine. Override with ANTLM_TORCH_SPEC (e.g. "torch==2.13.0" from a CUDA index).
# Re-runs are cheap: nothing is installed while pyproject.toml is unchanged.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${ANTLM_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${ANTLM_TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.antlm-installed"
want=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)

OPS_STAMP="$VENV/.antlm-ops-built"

if ! { [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; }; then
  echo "[setup] installing into $VENV (torch first: $TORCH_SPEC)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
  echo "$want" > "$STAMP"
  rm -f "$OPS_STAMP"
fi
# DeepSpeed's CPU communication op, built once here so that no run waits for its build; runs
# find it in $VENV/torch_extensions (or $TORCH_EXTENSIONS_DIR when set). A failed build is
# reported and the first run builds it instead.
if [ ! -f "$OPS_STAMP" ] && "$VENV/bin/python" -m antlm_dist.prebuild >&2; then
  echo "${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}" > "$OPS_STAMP"
fi
