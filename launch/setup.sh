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
OPS_STAMP="$VENV/.antlm-ops-built"
want=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)

if ! { [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; }; then
  start=$(date +%s)
  echo "[setup] creating $VENV and installing antlm-dist with its dependencies; about 2 to 5 minutes and 2.5 GB" >&2
  echo "[setup]   step 1/3: $TORCH_SPEC first (the CPU wheel, ~200 MB), so nothing pulls a multi-GB CUDA build" >&2
  echo "[setup]   step 2/3: deepspeed (built from source, pure Python), transformers, datasets, tokenizers," \
       "triton, matplotlib, pytest and the rest of pyproject.toml" >&2
  echo "[setup]   step 3/3: DeepSpeed's CPU communication op (C++, about a minute), so that no run waits for it" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
  # pip's own lines (Collecting / Downloading / Installing) show what is happening; "already
  # satisfied" lines are dropped so a refresh stays short.
  "${PIP[@]}" "$TORCH_SPEC" 2>&1 | { grep -v "^Requirement already satisfied" || true; } >&2
  echo "[setup] step 1/3 done after $(( $(date +%s) - start )) s" >&2
  "${PIP[@]}" -e "$ROOT[dev]" 2>&1 | { grep -v "^Requirement already satisfied" || true; } >&2
  echo "$want" > "$STAMP"
  rm -f "$OPS_STAMP"
  echo "[setup] step 2/3 done after $(( $(date +%s) - start )) s" >&2
fi
# DeepSpeed's CPU communication op, built once here so that no run waits for its build; runs
# find it in $VENV/torch_extensions (or $TORCH_EXTENSIONS_DIR when set). A failed build is
# reported and the first run builds it instead.
if [ ! -f "$OPS_STAMP" ]; then
  ops_start=$(date +%s)
  if "$VENV/bin/python" -m antlm_dist.prebuild >&2; then
    echo "${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}" > "$OPS_STAMP"
    echo "[setup] step 3/3 done in $(( $(date +%s) - ops_start )) s" >&2
  fi
fi
