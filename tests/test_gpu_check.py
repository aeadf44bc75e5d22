"""``benchmarks/gpu_check.sh`` without CUDA: its dry mode (arguments, output folder, time
limit, summary), the summary's figures from hand-made stage results, and the kernel
checker's logic through the Triton interpreter."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from antlm_testutil import REPO, assert_ok

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
SUMMARY = REPO / "benchmarks" / "gpu_check_summary.py"
STAGES = ["env", "install", "kernels", "attention", "loss", "train"]


def _check(*args, env=None):
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=300, cwd=str(REPO))


def _stages(out) -> list[dict]:
    with open(out / "stages.tsv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_dry_run_records_every_stage_and_prints_one_summary(tmp_path):
    out = tmp_path / "check"
    proc = _check("--dry-run", "--out", out)
    assert_ok(proc)
    rows = _stages(out)
    assert [r["stage"] for r in rows] == STAGES
    assert {r["status"] for r in rows} == {"dry-run"}
    assert sum(int(r["budget_s"]) for r in rows) <= 600 - 10  # the default limit, less the summary's reserve
    assert "benchmarks/gpu_kernel_check.py" in rows[2]["command"] and "bench_attention.py" in rows[3]["command"]
    assert "--config babyllama-58m-antlm" in rows[5]["command"] and "--baselines eager,compiled" in rows[5]["command"]
    assert "usage" in (out / "kernels.log").read_text().lower()  # the dry run started each script (--help)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["passed"] and [s["stage"] for s in summary["stages"]] == STAGES
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(STAGES)  # header + one row per stage
    assert "PASSED: 6/6 stages recorded" in proc.stdout
    assert (out / "summary.md").read_text().startswith("# GPU check (dry run)")


def test_time_limit_cuts_the_last_stages(tmp_path):
    """The cuts of a dry run are the budgets' arithmetic alone, however long its checks take:
    a Python that starts 1.5 s late (a loaded machine) gives the same table."""
    out = tmp_path / "short"
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 1.5\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    proc = _check("--dry-run", "--no-install", "--out", out, "--time-limit", "200", env={"PYTHON": str(slow)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["stage"]: r for r in _stages(out)}
    assert "install" not in rows
    # 190 s left: env 15 + kernels 75 + attention 100 (cut from 150), then nothing
    assert [(s, rows[s]["status"], rows[s]["budget_s"]) for s in ("env", "kernels", "attention", "loss", "train")] == [
        ("env", "dry-run", "15"), ("kernels", "dry-run", "75"), ("attention", "dry-run", "100"),
        ("loss", "skipped", "0"), ("train", "skipped", "0")]
    assert "skipped: the time limit was spent" in proc.stdout and "NOT PASSED: 3/5" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument --bogus"),
    (["--time-limit", "10m"], "--time-limit 10m: give whole seconds"),
    (["--time-limit", "30"], "at least 60 seconds"),
    (["--out"], "--out needs a folder"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, args, message):
    proc = _check("--dry-run", "--out", tmp_path / "x", *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_a_real_run_without_cuda_is_refused(tmp_path):
    proc = _check("--out", tmp_path / "x")
    assert proc.returncode == 2 and "this check needs a CUDA machine" in proc.stderr and "--dry-run" in proc.stderr


def _write_stage_results(out):
    """Hand-made results of every stage, with figures whose summary is computed below."""
    (out / "antlm-bench").mkdir(parents=True)
    (out / "kernels.json").write_text(json.dumps({"records": [
        {"kernel": "attention", "ok": True}, {"kernel": "attention", "ok": True},
        {"kernel": "masked_token_loss", "ok": False}]}))

    def att(seq, causal, padding, tf, sf, tb, sb):
        return {"seq": seq, "causal": causal, "padding": padding, "triton_fwd_tflops": tf, "sdpa_fwd_tflops": sf,
                "triton_fwd_bwd_tflops": tb, "sdpa_fwd_bwd_tflops": sb}

    (out / "attention.json").write_text(json.dumps({"rows": [
        att(128, True, False, 10.0, 100.0, 10.0, 100.0),  # seq < 512: not counted
        att(512, True, False, 300.0, 250.0, 200.0, 250.0), att(2048, True, False, 500.0, 400.0, 450.0, 300.0),
        att(2048, True, True, 1.0, 100.0, 1.0, 100.0),  # padded: not counted
        att(512, False, False, 360.0, 300.0, 330.0, 300.0)]}))
    (out / "loss.json").write_text(json.dumps({"results": [
        {"size": "babyllama", "phase": "MLM", "variant": "naive (matmul + F.cross_entropy)", "speedup_vs_naive": 1.0},
        {"size": "babyllama", "phase": "MLM", "variant": "masked_token_loss (triton)", "speedup_vs_naive": 4.5},
        {"size": "large", "phase": "MLM", "variant": "masked_token_loss (triton)", "speedup_vs_naive": 9.0}]}))

    def rec(runner, label, tps, **kw):
        return {"runner": runner, "phase": "MLM", "label": label, "micro_batch": 128, "tokens_per_s_per_device": tps,
                "mfu": 0.375, "power_w": 500.0, "energy_j_per_step": 12.5, "speedup_vs_baseline": 2.0,
                "speedup_vs_compiled_baseline": 1.25, **kw}

    (out / "antlm-bench" / "bench.json").write_text(json.dumps({"records": [
        rec("antlm", "triton/triton/ZeRO-0", 1000.0, mfu=0.2), rec("antlm", "triton/triton/ZeRO-0/compiled", 2000.0),
        rec("baseline", "baseline: HF Llama + AdamW", 5000.0)]}))
    rows = ["stage\tstatus\texit\tseconds\tbudget_s\tlog\tcommand"]
    rows += [f"{s}\t{'timeout' if s == 'loss' else 'ok'}\t{124 if s == 'loss' else 0}\t3\t9\t{out}/{s}.log\tcmd {s}"
             for s in STAGES]
    (out / "stages.tsv").write_text("\n".join(rows) + "\n")


def test_summary_figures_from_stage_results(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check_summary as summary
    finally:
        sys.path.pop(0)
    _write_stage_results(tmp_path)
    assert summary.main([str(tmp_path)]) == 1  # a stage timed out
    printed = capsys.readouterr().out
    result = {s["stage"]: s for s in json.loads((tmp_path / "summary.json").read_text())["stages"]}
    assert result["kernels"]["result"] == "2/3 cases within 2 × torch's bf16 error; failing: masked_token_loss"
    # causal: fwd min(300/250, 500/400) = 1.20, fwd+bwd min(200/250, 450/300) = 0.80; bidirectional 1.20, 1.10
    assert result["attention"]["result"].endswith("causal fwd 1.20×, fwd+bwd 0.80×; bidirectional fwd 1.20×, "
                                                  "fwd+bwd 1.10×")
    assert result["loss"]["status"] == "timeout" and result["loss"]["result"] == (
        "vs naive, BabyLlama size: MLM masked_token_loss (triton) 4.50×")
    assert result["train"]["result"] == ("MLM triton/triton/ZeRO-0/compiled mb 128: 2,000 tok/s, MFU 37.5%, 500 W, "
                                         "12.5 J/step; 2.00× HF eager, 1.25× HF compiled")
    assert "NOT PASSED: 5/6 stages passed" in printed
    assert summary.main([str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_kernel_checker_runs_through_the_interpreter(tmp_path):
    """The checker's own logic on tiny fp32 cases (the interpreter computes bf16 wrongly)."""
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_kernel_check.py"), "--cpu-smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=str(REPO),
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_ok(proc)
    rep = json.loads(out.read_text())
    cases = {(r["kernel"], r.get("causal"), r.get("mask"), r.get("phase")) for r in rep["records"]}
    assert cases == {("attention", c, m, None) for c in (True, False) for m in ("none", "padding", "documents")} | {
        ("masked_token_loss", None, None, p) for p in ("CLM", "MLM")}
    for r in rep["records"]:
        assert r["ok"], r
        kernel_errors = [e["kernel"] for e in r["errors"].values()]
        assert max(kernel_errors) < 1e-5 and max(e["torch"] for e in r["errors"].values()) == 0.0
        assert max(kernel_errors) > 0  # rounding differs from torch's: the Triton path ran, not torch's
