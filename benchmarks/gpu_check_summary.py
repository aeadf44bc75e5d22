"""The summary of one ``benchmarks/gpu_check.sh`` folder: one table, ``summary.md`` and ``summary.json``.

Reads ``stages.tsv`` (stage, status, exit code, seconds, budget, log, command) and the
results each stage wrote beside it, and gives one line per stage:

* kernels: cases within 2 × torch's bf16 error (``kernels.json``);
* attention: the Triton kernel's TFLOP/s ÷ SDPA's (flash backend, unpadded cases), the
  lowest over sequences ≥ 512, per mode, forward and forward + backward (``attention.json``);
* loss: speed-ups of the masked-token loss and ``F.linear_cross_entropy`` over the naive
  head + cross-entropy at the BabyLlama size (``loss.json``);
* train: per phase, the best AntLM tokens/s, its MFU, power and energy per step, and the
  ratios to the eager and compiled HF baselines (``antlm-bench/bench.json``).

Usage: ``python benchmarks/gpu_check_summary.py DIR [--dry-run]``. Exit status 0 when every
stage passed (or, with ``--dry-run``, when every stage was recorded), else 1; 2 when
``DIR`` has no ``stages.tsv``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

STAGES = ("env", "install", "kernels", "attention", "loss", "train")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kernels_result(out: Path) -> str:
    rep = _load(out / "kernels.json")
    if not rep:
        return "no kernels.json"
    ok = sum(r["ok"] for r in rep["records"])
    bad = [r for r in rep["records"] if not r["ok"]]
    return f"{ok}/{len(rep['records'])} cases within 2 × torch's bf16 error" + (
        f"; failing: {', '.join(r['kernel'] for r in bad[:3])}" if bad else "")


def attention_result(out: Path) -> str:
    rep = _load(out / "attention.json")
    if not rep:
        return "no attention.json"
    parts = []
    for causal in (True, False):
        rows = [r for r in rep["rows"] if r["causal"] == causal and not r["padding"] and r["seq"] >= 512]
        ratios = {}
        for kind in ("fwd", "fwd_bwd"):
            vals = [r[f"triton_{kind}_tflops"] / r[f"sdpa_{kind}_tflops"] for r in rows
                    if r.get(f"triton_{kind}_tflops") and r.get(f"sdpa_{kind}_tflops")]
            ratios[kind] = min(vals) if vals else None
        fmt = {k: "–" if v is None else f"{v:.2f}×" for k, v in ratios.items()}
        parts.append(f"{'causal' if causal else 'bidirectional'} fwd {fmt['fwd']}, fwd+bwd {fmt['fwd_bwd']}")
    return "Triton ÷ SDPA-flash TFLOP/s (lowest, seq ≥ 512): " + "; ".join(parts)


def loss_result(out: Path) -> str:
    rep = _load(out / "loss.json")
    if not rep:
        return "no loss.json"
    parts = []
    for r in rep["results"]:
        if r["size"] == "babyllama" and r["variant"] != "naive (matmul + F.cross_entropy)" and r.get("speedup_vs_naive"):
            parts.append(f"{r['phase']} {r['variant']} {r['speedup_vs_naive']:.2f}×")
    return "vs naive, BabyLlama size: " + ("; ".join(parts) or "no timings")


def train_result(out: Path) -> str:
    rep = _load(out / "antlm-bench" / "bench.json")
    if not rep:
        return "no antlm-bench/bench.json"
    parts = []
    for phase in ("CLM", "MLM"):
        ours = [r for r in rep["records"] if r["runner"] == "antlm" and r["phase"] == phase]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["tokens_per_s_per_device"])
        power = "" if best.get("power_w") is None else f", {best['power_w']:.0f} W, {best['energy_j_per_step']:.1f} J/step"
        ratios = ", ".join(f"{best[k]:.2f}× {name}" for k, name in (("speedup_vs_baseline", "HF eager"),
                                                                     ("speedup_vs_compiled_baseline", "HF compiled"))
                           if best.get(k) is not None)
        parts.append(f"{phase} {best['label']} mb {best['micro_batch']}: {best['tokens_per_s_per_device']:,.0f} tok/s, "
                     f"MFU {100 * best['mfu']:.1f}%{power}; {ratios}")
    return "; ".join(parts) or "no AntLM records"


RESULTS = {"kernels": kernels_result, "attention": attention_result, "loss": loss_result, "train": train_result}


def summarize(out: Path, dry_run: bool) -> tuple[list[dict], bool]:
    """(one row per stage of ``stages.tsv``, whether the check passed)."""
    with open(out / "stages.tsv", encoding="utf-8", newline="") as handle:
        stages = list(csv.DictReader(handle, delimiter="\t"))
    rows = []
    for s in stages:
        result = ""
        if s["status"] == "dry-run":
            result = "would run: " + s["command"]
        elif s["status"] == "skipped":
            result = "skipped: the time limit was spent"
        elif s["stage"] in RESULTS:
            result = RESULTS[s["stage"]](out)
        elif s["status"] != "ok":
            result = f"see {s['log']}"
        rows.append({"stage": s["stage"], "status": s["status"], "exit": int(s["exit"]), "seconds": int(s["seconds"]),
                     "budget_s": int(s["budget_s"]), "result": result, "log": s["log"]})
    wanted = {"dry-run"} if dry_run else {"ok"}
    passed = bool(rows) and all(r["status"] in wanted for r in rows)
    return rows, passed


def table(rows: list[dict]) -> str:
    lines = ["| stage | status | seconds (budget) | result |", "|---|---|---:|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} ({r['budget_s']}) | {r['result'].replace('|', '/')} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the gpu_check.sh output folder")
    p.add_argument("--dry-run", action="store_true", help="the stages were recorded, not run")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not (out / "stages.tsv").is_file():
        print(f"gpu_check_summary: {out / 'stages.tsv'} is missing; run benchmarks/gpu_check.sh first", file=sys.stderr)
        return 2
    rows, passed = summarize(out, args.dry_run)
    text = table(rows)
    (out / "summary.md").write_text(f"# GPU check{' (dry run)' if args.dry_run else ''}\n\n{text}\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"dry_run": args.dry_run, "passed": passed, "stages": rows},
                                                 indent=1), encoding="utf-8")
    print(text)
    print(f"{'PASSED' if passed else 'NOT PASSED'}: {sum(r['status'] in ('ok', 'dry-run') for r in rows)}/{len(rows)} "
          f"stages {'recorded' if args.dry_run else 'passed'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
