"""Run ``antlm-train --config demo-cpu`` and record its per-step losses and peak memory.

Writes one JSON file: ``{"losses": {step: [phase, loss]}, "peak_rss_mib": {"launcher": ..,
"rank0": .., "rank1": ..}, "wall_s": ..}``. Peak resident memory (MiB) is sampled every
0.2 s with psutil for the launching process and for each rank process (the direct children
of torchrun; tokenisation worker processes a rank forks are not counted in its figure).

With ``--compare REF.json`` it also reports whether every step's loss equals the reference
bit for bit (floats in metrics.jsonl round-trip exactly through JSON) and exits 1 if not.
It measures; it is not a test.

    python benchmarks/demo_cpu_run.py --steps 160 --out results/demo_before.json
    python benchmarks/demo_cpu_run.py --steps 160 --out results/demo_after.json --compare results/demo_before.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def _sample_peaks(proc: subprocess.Popen, peaks: dict, done: threading.Event) -> None:
    """Record max RSS (bytes) of the launcher and of each torchrun child until ``done``."""
    root = psutil.Process(proc.pid)
    while not done.is_set():
        try:
            peaks["launcher"] = max(peaks.get("launcher", 0), root.memory_info().rss)
            for child in root.children(recursive=True):
                if "torch.distributed.run" not in " ".join(child.cmdline()):
                    continue
                for rank_proc in child.children():
                    rank = rank_proc.environ().get("RANK", "?")
                    key = f"rank{rank}"
                    peaks[key] = max(peaks.get(key, 0), rank_proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
        done.wait(0.2)


def run_demo(steps: int | None, out_dir: Path, extra: list[str]) -> dict:
    """One demo-cpu run into ``out_dir``; returns losses, peaks and wall time."""
    args = [sys.executable, "-m", "antlm_dist.cli", "--config", "demo-cpu", "--output-dir", str(out_dir),
            "--overwrite", *extra]
    if steps is not None:
        args.append(f"train.stop_at_step={steps}")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # fixed thread count: CPU matmul bits depend on it
    peaks: dict = {}
    done = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=str(REPO), env=env)
    sampler = threading.Thread(target=_sample_peaks, args=(proc, peaks, done), daemon=True)
    sampler.start()
    rc = proc.wait()
    done.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"antlm-train exited with status {rc}")
    losses = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "train":
            losses[str(rec["step"])] = [rec["phase"], rec["loss"]]
    return {"losses": losses, "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in sorted(peaks.items())},
            "wall_s": round(time.perf_counter() - t0, 1)}


def compare(result: dict, reference: dict) -> list[str]:
    """Differences between two runs' per-step (phase, loss), as lines; empty when bit-identical."""
    diffs = []
    for step, ref in reference["losses"].items():
        got = result["losses"].get(step)
        if got is not None and got != ref:
            diffs.append(f"step {step}: {got} != reference {ref}")
    if not set(result["losses"]) & set(reference["losses"]):
        diffs.append("no step in common with the reference")
    return diffs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="train.stop_at_step (default: the whole schedule)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--compare", default=None, help="reference JSON from an earlier run")
    p.add_argument("--run-dir", default=None, help="run folder (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="more dotted overrides for antlm-train")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(a.steps, Path(a.run_dir or Path(tmp) / "demo"), a.overrides)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"{len(result['losses'])} steps, peak RSS MiB {result['peak_rss_mib']}, {result['wall_s']} s")
    if a.compare:
        diffs = compare(result, json.loads(Path(a.compare).read_text()))
        print("bit-identical to the reference" if not diffs else "\n".join(["DIFFERENT:", *diffs[:20]]))
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
