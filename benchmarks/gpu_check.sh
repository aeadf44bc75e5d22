#!/usr/bin/env bash
# One-shot GPU check, unattended, within a time limit (default 600 s):
#   env        nvidia-smi and versions
#   install    the package with its `gpu` extra (liger-kernel) when it is not importable yet
#   kernels    both Triton kernels at training sizes in bf16 against fp32 references, fwd + bwd
#   attention  TFLOP/s of the Triton attention against SDPA's flash backend (and FlexAttention)
#   loss       the masked-token loss against the naive head + cross-entropy and F.linear_cross_entropy
#   train      antlm-bench on BabyLlama-58M, CLM and MLM, compiled and eager, both HF baselines,
#              with MFU, power and energy (NVML)
# Every stage writes its log and JSON under one folder and runs under `timeout`; a stage that
# fails or times out is recorded and the next one starts. The end prints one summary table
# (benchmarks/gpu_check_summary.py) and writes summary.md and summary.json beside the results.
#
# Usage: bash benchmarks/gpu_check.sh [--out DIR] [--time-limit SECONDS] [--no-install] [--dry-run]
#   --dry-run   check the plumbing without CUDA: arguments, output folder, the commands each
#               stage would run, and the summary (every stage recorded as "dry-run").
# Environment: PYTHON (default .venv/bin/python, else python3).
# Exit status: 0 when every stage ran and passed, 1 when one failed or timed out, 2 on bad usage.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="runs/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)"
TIME_LIMIT=600
DRY_RUN=0
INSTALL=1
SUMMARY_RESERVE_S=10  # kept back for the summary

usage() { sed -n '2,/^# Exit status/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT=$2; shift 2 ;;
    --time-limit) [ $# -ge 2 ] || die "--time-limit needs a number of seconds"; TIME_LIMIT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$TIME_LIMIT" in ''|*[!0-9]*) die "--time-limit $TIME_LIMIT: give whole seconds, e.g. 600" ;; esac
[ "$TIME_LIMIT" -ge 60 ] || die "--time-limit $TIME_LIMIT: at least 60 seconds"

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3) || die "no python3 on PATH; set PYTHON"
fi
mkdir -p "$OUT" || die "cannot create --out $OUT"
OUT=$(cd "$OUT" && pwd)
touch "$OUT/.write-test" 2>/dev/null && rm -f "$OUT/.write-test" || die "--out $OUT is not writable"
if [ "$DRY_RUN" = 0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  die "no nvidia-smi: this check needs a CUDA machine (use --dry-run to check the plumbing here)"
fi

START=$(date +%s)
STAGES="$OUT/stages.tsv"
printf 'stage\tstatus\texit\tseconds\tbudget_s\tlog\tcommand\n' > "$STAGES"
echo "gpu_check: writing into $OUT (time limit ${TIME_LIMIT} s$([ "$DRY_RUN" = 1 ] && echo ', dry run'))"

DRY_SPENT=0  # a dry run counts each stage's whole budget as spent, so the table shows what the limit cuts

# run_stage NAME BUDGET_S COMMAND [DRY_COMMAND]: run COMMAND (in the repository root) under `timeout`,
# for at most BUDGET_S seconds and never past the time limit; append a row to stages.tsv. A dry run
# runs DRY_COMMAND instead (e.g. the script's --help, to check that it starts).
run_stage() {
  local name=$1 budget=$2 cmd=$3 dry_cmd=${4:-true} log="$OUT/$1.log"
  local elapsed=$(( $(date +%s) - START ))
  # a dry run counts budgets only (DRY_SPENT), not the seconds its --help checks took, so the
  # cuts it shows are those of a real run and do not move with the machine's load
  [ "$DRY_RUN" = 1 ] && elapsed=0
  local left=$(( TIME_LIMIT - SUMMARY_RESERVE_S - elapsed - DRY_SPENT ))
  [ "$budget" -le "$left" ] || budget=$left
  local status rc=0 t0 t1
  t0=$(date +%s)
  if [ "$budget" -lt 5 ]; then
    status=skipped; budget=0; echo "skipped: the time limit is spent" > "$log"
  elif [ "$DRY_RUN" = 1 ]; then
    { echo "would run: $cmd"; (cd "$ROOT" && timeout 60 bash -c "$dry_cmd"); } > "$log" 2>&1
    rc=$?
    status=$([ $rc = 0 ] && echo dry-run || echo failed)
    DRY_SPENT=$(( DRY_SPENT + budget ))
  else
    (cd "$ROOT" && timeout --kill-after=10 "$budget" bash -c "$cmd") > "$log" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  fi
  t1=$(date +%s)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((t1 - t0))" "$budget" "$log" "$cmd" >> "$STAGES"
  echo "gpu_check: $name: $status ($((t1 - t0)) s)"
}

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run_stage env 15 "nvidia-smi; \"$PY\" -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())' | tee \"$OUT/env.txt\""
if [ "$INSTALL" = 1 ]; then
  run_stage install 100 "\"$PY\" -c 'import antlm_dist, liger_kernel' 2>/dev/null || { bash launch/setup.sh && .venv/bin/python -m pip install -q -e '.[gpu]'; }"
  # a fresh machine has the package only in the .venv that setup.sh made
  if [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; fi
fi
KERNELS="\"$PY\" benchmarks/gpu_kernel_check.py"
ATTENTION="\"$PY\" benchmarks/bench_attention.py"
LOSS="\"$PY\" benchmarks/bench_masked_token_loss.py"
TRAIN="\"$PY\" -m antlm_dist.bench.cli"
run_stage kernels 75 "$KERNELS --out \"$OUT/kernels.json\"" "$KERNELS --help"
run_stage attention 150 "$ATTENTION --out \"$OUT/attention.json\" --seqs 128 512 2048 --budget-s 100" "$ATTENTION --help"
run_stage loss 60 "$LOSS --sizes babyllama,large --out \"$OUT/loss.json\"" "$LOSS --help"
run_stage train 190 "$TRAIN --config babyllama-58m-antlm --out \"$OUT/antlm-bench\" --micro-batch 32,128 --steps 8 \
--warmup 3 --zero 0 --compile off,on --baselines eager,compiled" "$TRAIN --help"

"$PY" "$ROOT/benchmarks/gpu_check_summary.py" "$OUT" $([ "$DRY_RUN" = 1 ] && echo --dry-run)
rc=$?
echo "gpu_check: done in $(( $(date +%s) - START )) s; results in $OUT"
exit $rc
