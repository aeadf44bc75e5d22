"""Benchmark the masked-token loss (LM head + cross-entropy, forward + backward).

Variants, each timed as loss forward + backward to d(hidden) and d(weight):

* ``naive``: ``masked_token_loss_ref``, i.e. ``hidden @ weight.T`` then
  ``F.cross_entropy`` with ignore_index; the baseline of every ratio.
* ``F.linear_cross_entropy``: torch's own op with ``options=None`` (its
  reference path) and with ``LinearCrossEntropyOptions()`` (its chunked
  path); "n/a" where the installed torch lacks them.
* ``masked_token_loss``: this repository's kernel; the torch path on CPU, the
  Triton path on CUDA.

Phases: CLM (every position is a target) and MLM (15 % of positions, uniformly
at random). Sizes: ``babyllama`` (B x T = 32 x 128, H 512, V 16,000) and
``large`` (8 x 2048, H 2048, V 32,000).

Measurements:

* time: median, 20th and 80th percentile of ``--repeats`` timed calls after
  ``--warmup`` calls, in ms (CUDA: synchronised around each call). The
  variants run round-robin, one call each per round, so that load from other
  processes on a shared machine spreads over all of them.
* peak extra memory, MiB: memory allocated during one forward + backward above
  what was allocated before it (inputs excluded, the returned gradients and
  every temporary included). CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus ``memory_allocated`` before. CPU: a
  separate, untimed call under ``torch.profiler.profile(profile_memory=True)``;
  the profiler records every CPU allocator allocation and free with its size
  and time, and the peak of their running sum is the high-water mark of live
  tensor bytes. (It counts tensor storage, not allocator caching or RSS.)
* head TFLOP/s: useful LM-head work, 6 * H * V FLOPs per target row, over the
  median time (a method that computes ignored rows gets no credit for them).

Prints a Markdown table and writes JSON to ``--out``. Asserts nothing.

    python benchmarks/bench_masked_token_loss.py --sizes babyllama --out bench_mtl.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from antlm_dist.kernels.masked_token_loss import masked_token_loss, masked_token_loss_ref
from antlm_dist.telemetry.memory import cpu_peak_allocated_bytes

SIZES = {
    "babyllama": {"batch": 32, "seq": 128, "hidden": 512, "vocab": 16_000},
    "large": {"batch": 8, "seq": 2048, "hidden": 2048, "vocab": 32_000},
}
PHASES = {"clm": 1.0, "mlm": 0.15}
MIB = 2**20


def make_inputs(size, target_frac, dtype, device, seed=0):
    """hidden (B, T, H), weight (V, H), labels (B, T) with 1 - target_frac of them -100."""
    g = torch.Generator().manual_seed(seed)
    b, t, h, v = size["batch"], size["seq"], size["hidden"], size["vocab"]
    hidden = torch.randn(b, t, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    if target_frac < 1.0:
        labels[torch.rand(b, t, generator=g) >= target_frac] = -100
    return hidden, weight, labels.to(device)


def variants(device):
    """name -> fn(hidden, weight, labels) returning the summed loss, or None when unavailable."""
    backend = "triton" if device.type == "cuda" else "torch"

    def naive(hidden, weight, labels):
        return masked_token_loss_ref(hidden, weight, labels)[0]

    def ours(hidden, weight, labels):
        return masked_token_loss(hidden, weight, labels, backend=backend)[0]

    has_lce = hasattr(F, "linear_cross_entropy")
    has_opts = has_lce and hasattr(torch.nn, "LinearCrossEntropyOptions")

    def lce(hidden, weight, labels, options=None):
        h = hidden.reshape(-1, hidden.shape[-1])
        return F.linear_cross_entropy(h, weight, labels.reshape(-1), reduction="sum", ignore_index=-100, options=options)

    def lce_chunked(hidden, weight, labels):
        return lce(hidden, weight, labels, options=torch.nn.LinearCrossEntropyOptions())

    return {
        "naive (matmul + F.cross_entropy)": naive,
        "F.linear_cross_entropy": lce if has_lce else None,
        "F.linear_cross_entropy chunked": lce_chunked if has_opts else None,
        f"masked_token_loss ({backend})": ours,
    }


def fwd_bwd(fn, hidden, weight, labels):
    loss = fn(hidden, weight, labels)
    return torch.autograd.grad(loss, (hidden, weight))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fns, args, device, warmup, repeats):
    """{name: (median, p20, p80) ms}. Variants are timed round-robin, one call each per round,
    so that load from other processes on a shared machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fwd_bwd(fn, *args)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fwd_bwd(fn, *args)
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        out[name] = (statistics.median(ts), q[0], q[3])
    return out


def peak_extra_bytes(fn, args, device):
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fwd_bwd(fn, *args)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return cpu_peak_allocated_bytes(lambda: fwd_bwd(fn, *args))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="babyllama,large", help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--phases", default="clm,mlm", help="comma list of: clm, mlm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench_masked_token_loss.json", help="JSON results file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    load_before = os.getloadavg()
    results = []
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        for phase in args.phases.split(","):
            hidden, weight, labels = make_inputs(size, PHASES[phase], dtype, device)
            n_targets = int((labels != -100).sum())
            available = {name: fn for name, fn in variants(device).items() if fn is not None}
            timings = time_ms(available, (hidden, weight, labels), device, args.warmup, args.repeats)
            naive_row = None
            for name, fn in variants(device).items():
                row = {"size": size_name, "phase": phase, "variant": name, "dtype": str(dtype).replace("torch.", ""),
                       "targets": n_targets, **size}
                if fn is None:
                    row.update(median_ms=None, p20_ms=None, p80_ms=None, peak_extra_mib=None)
                else:
                    med, p20, p80 = timings[name]
                    row.update(median_ms=med, p20_ms=p20, p80_ms=p80,
                               peak_extra_mib=peak_extra_bytes(fn, (hidden, weight, labels), device) / MIB)
                    # useful work: the LM head on target rows, 6 * H * V FLOPs per row (fwd + bwd)
                    row["head_tflops"] = 6 * size["hidden"] * size["vocab"] * n_targets / (med * 1e-3) / 1e12
                if naive_row is None:
                    naive_row = row
                if row["median_ms"] is not None:
                    row["speedup_vs_naive"] = naive_row["median_ms"] / row["median_ms"]
                    row["mem_vs_naive"] = row["peak_extra_mib"] / naive_row["peak_extra_mib"]
                results.append(row)
                print(f"  {size_name} {phase} {name}: {row['median_ms']} ms, {row['peak_extra_mib']} MiB", flush=True)
            del hidden, weight, labels

    print()
    print(f"device {device} ({platform.processor() or platform.machine()}), dtype {dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}, load average before/after "
          f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print()
    print("| size | phase | variant | median ms (p20-p80) | head TFLOP/s | peak extra MiB | speed-up vs naive | memory vs naive |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["median_ms"] is None:
            print(f"| {r['size']} | {r['phase']} | {r['variant']} | n/a | n/a | n/a | n/a | n/a |")
            continue
        print(f"| {r['size']} | {r['phase']} | {r['variant']} | {r['median_ms']:.0f} ({r['p20_ms']:.0f}-{r['p80_ms']:.0f}) "
              f"| {r['head_tflops']:.3f} | {r['peak_extra_mib']:.1f} | {r['speedup_vs_naive']:.2f}x | {r['mem_vs_naive']:.3f} |")
    meta = {"device": str(device), "dtype": str(dtype), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "warmup": args.warmup, "repeats": args.repeats,
            "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
            "memory_method": "cuda max_memory_allocated delta" if device.type == "cuda"
            else "torch.profiler allocation events, peak of running sum"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
