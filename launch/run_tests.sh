#!/usr/bin/env bash
# Quickstart 2: install if needed, then run the whole test suite (CPU; Triton kernels run
# under TRITON_INTERPRET=1). Extra arguments go to pytest, e.g.  bash launch/run_tests.sh -k schedule
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${ANTLM_VENV:-$ROOT/.venv}/bin/python" -m pytest -v --tb=short -ra "$@"
