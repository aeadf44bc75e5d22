"""Benchmark the Triton flash attention against torch SDPA and FlexAttention.

On a GPU (one run, well under 4 minutes on an H200): bf16, 16k tokens per batch
(batch = 16384 // seq), 8 heads, head_dim 64, seq 128 / 512 / 2048, causal and
bidirectional, with and without key padding. For each case it

* checks correctness: the kernel's and torch's bf16 outputs and gradients against an
  fp32 torch reference (relative L2 errors are reported, nothing is asserted);
* times forward and forward+backward with ``triton.testing.do_bench`` (median, 20th
  and 80th percentile ms) for
  the kernel, SDPA (flash backend where it applies: no mask; the default backend with a
  boolean mask otherwise) and compiled FlexAttention (reported as unavailable or
  skipped when it cannot run or the time budget is spent);
* reports TFLOP/s with the usual attention count: forward 4·B·H·S²·D, halved for causal,
  backward 2.5x forward (so forward+backward is 3.5x). Padded cases use the same
  nominal count.

It prints a Markdown table and writes JSON to ``--out``.

``--cpu-smoke`` runs a tiny fp32 version on CPU through the Triton interpreter (timed
with ``time.perf_counter``; ``do_bench`` does not run there) so the script itself can be
tested. Run it as ``python benchmarks/bench_attention.py`` (with antlm-dist installed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_attention.json", help="JSON output path")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run through the Triton interpreter")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq per case")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="after this many seconds, optional baselines (FlexAttention) are skipped")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    return parser.parse_args(argv)


def _load_kernel_module():
    """Import the installed kernel (after ``--cpu-smoke`` has set TRITON_INTERPRET)."""
    import importlib

    return importlib.import_module("antlm_dist.kernels.flash_attention")


def _rel_err(actual, expected) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _attention_flops(batch, heads, seq_len, head_dim, causal) -> float:
    flops = 4.0 * batch * heads * seq_len * seq_len * head_dim
    return flops / 2 if causal else flops


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
        args.tokens, args.heads, args.head_dim, args.seqs = 64, 2, 32, [16, 33]
    import torch
    import torch.nn.functional as F

    fa = _load_kernel_module()
    start_s = time.perf_counter()
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    if not on_gpu and not args.cpu_smoke:
        print("no CUDA device: run with --cpu-smoke for the tiny interpreter version", file=sys.stderr)
        return 2
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32

    if on_gpu:
        import triton.testing

        def time_ms(fn, grad_to_none=None):
            """(median, p20, p80) in ms."""
            return tuple(float(x) for x in triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]))
    else:

        def time_ms(fn, grad_to_none=None):
            fn()  # warm-up (interpreter setup)
            samples = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
            samples.sort()
            return samples[1], samples[0], samples[2]

    flex_attention = create_block_mask = None
    flex_status = "skipped: --no-flex" if args.no_flex else ("skipped: cpu smoke" if not on_gpu else "")
    if not flex_status:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention as _flex

            flex_attention = torch.compile(_flex, dynamic=False)
            # Every case brings its own mask_mod, hence a recompile; keep them compiled
            # rather than falling back to eager flex after the default limit of 8.
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 64)
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            flex_status = f"unavailable: {type(exc).__name__}: {exc}"[:200]

    def sdpa_call(q, k, v, causal, kpm):
        if kpm is None:
            if on_gpu:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fa.flash_attention_ref(q, k, v, causal=causal, key_padding_mask=kpm)

    rows = []
    for seq_len in args.seqs:
        batch = max(1, args.tokens // seq_len)
        for padded in (False, True):
            for causal in (True, False):
                row = dict(seq=seq_len, batch=batch, heads=args.heads, head_dim=args.head_dim,
                           dtype=str(dtype).replace("torch.", ""), causal=causal, padding=padded)
                gen = torch.Generator().manual_seed(seq_len * 4 + 2 * padded + causal)
                shape = (batch, args.heads, seq_len, args.head_dim)
                q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
                           for _ in range(3))
                do = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                kpm = None
                if padded:
                    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=gen)
                    kpm = (torch.arange(seq_len)[None, :] < lengths[:, None]).to(device)
                kwargs = dict(causal=causal, key_padding_mask=kpm)

                # Closures bind this case's tensors as defaults: the names are deleted at
                # the end of each case to free memory before the next one.
                def fwd_bwd(fn, *inputs, do=do):
                    out = fn(*inputs)
                    return (out, *torch.autograd.grad(out, inputs, do))

                # Correctness against an fp32 (GPU) or float64 (CPU smoke) reference; the
                # errors are reported, not asserted.
                ref_dtype = torch.float32 if on_gpu else torch.float64
                q32, k32, v32 = (t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v))
                ref = fwd_bwd(lambda a, b, c: fa.flash_attention_ref(a, b, c, **kwargs), q32, k32, v32)
                ours = fwd_bwd(lambda a, b, c: fa.flash_attention(a, b, c, backend="triton", **kwargs), q, k, v)
                torch_out = fwd_bwd(lambda a, b, c: sdpa_call(a, b, c, causal, kpm), q, k, v)
                for name, a, b, want in zip(("out", "dq", "dk", "dv"), ours, torch_out, ref):
                    row[f"err_{name}_triton"] = _rel_err(a, want)
                    row[f"err_{name}_torch"] = _rel_err(b, want)
                del ref, ours, torch_out, q32, k32, v32

                fwd_flops = _attention_flops(batch, args.heads, seq_len, args.head_dim, causal)
                candidates = {
                    "triton": lambda q=q, k=k, v=v: fa.flash_attention(q, k, v, backend="triton", **kwargs),
                    "sdpa": lambda q=q, k=k, v=v: sdpa_call(q, k, v, causal, kpm),
                }
                row["sdpa_backend"] = ("flash" if on_gpu else "default") if kpm is None else "boolean mask (default)"
                if flex_attention is not None and time.perf_counter() - start_s < args.budget_s:
                    try:
                        lengths_dev = kpm.sum(-1) if kpm is not None else None

                        def mask_mod(b, h, q_idx, kv_idx):
                            allowed = q_idx >= 0
                            if causal:
                                allowed = allowed & (q_idx >= kv_idx)
                            if lengths_dev is not None:
                                allowed = allowed & (kv_idx < lengths_dev[b])
                            return allowed

                        block_mask = create_block_mask(mask_mod, batch if padded else None, None, seq_len, seq_len,
                                                       device=device)
                        candidates["flex"] = lambda q=q, k=k, v=v: flex_attention(q, k, v, block_mask=block_mask)
                        row["flex_status"] = "ok"
                    except Exception as exc:  # noqa: BLE001
                        row["flex_status"] = f"error: {type(exc).__name__}: {exc}"[:200]
                else:
                    row["flex_status"] = flex_status or "skipped: time budget"
                for name, fn in list(candidates.items()):
                    try:
                        fwd_ms = time_ms(fn)

                        def train_step(fn=fn, do=do):
                            fn().backward(do)

                        fwd_bwd_ms = time_ms(train_step, grad_to_none=[q, k, v])
                    except Exception as exc:  # noqa: BLE001 - a baseline failing is a result
                        row[f"{name}_status"] = f"error: {type(exc).__name__}: {exc}"[:200]
                        continue
                    for label, (median, p20, p80), flops in (("fwd", fwd_ms, fwd_flops), ("fwd_bwd", fwd_bwd_ms, 3.5 * fwd_flops)):
                        row[f"{name}_{label}_ms"] = median
                        row[f"{name}_{label}_ms_p20"] = p20
                        row[f"{name}_{label}_ms_p80"] = p80
                        row[f"{name}_{label}_tflops"] = flops / (median * 1e-3) / 1e12
                rows.append(row)
                del q, k, v, do, candidates
                if on_gpu:
                    torch.cuda.empty_cache()

    def cell(row, key):
        value = row.get(key)
        if not isinstance(value, float):
            return "–"
        return f"{value:.1f}" if value >= 1 else f"{value:.2g}"

    header = ("| seq | batch | causal | padding | triton fwd | sdpa fwd | flex fwd | triton fwd+bwd | "
              "sdpa fwd+bwd | flex fwd+bwd | max err triton | max err torch |")
    lines = [
        f"TFLOP/s, {rows[0]['dtype'] if rows else dtype}, H={args.heads}, D={args.head_dim}, "
        f"{'GPU: ' + torch.cuda.get_device_name() if on_gpu else 'CPU smoke (interpreter)'}",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for row in rows:
        err_triton = max(row[f"err_{n}_triton"] for n in ("out", "dq", "dk", "dv"))
        err_torch = max(row[f"err_{n}_torch"] for n in ("out", "dq", "dk", "dv"))
        lines.append(
            f"| {row['seq']} | {row['batch']} | {row['causal']} | {row['padding']} | "
            f"{cell(row, 'triton_fwd_tflops')} | {cell(row, 'sdpa_fwd_tflops')} | {cell(row, 'flex_fwd_tflops')} | "
            f"{cell(row, 'triton_fwd_bwd_tflops')} | {cell(row, 'sdpa_fwd_bwd_tflops')} | "
            f"{cell(row, 'flex_fwd_bwd_tflops')} | {err_triton:.2e} | {err_torch:.2e} |"
        )
    notes = sorted({row.get("flex_status", "") for row in rows} - {"ok", ""})
    notes += sorted({row[key] for row in rows for key in row if key.endswith("_status") and key != "flex_status"})
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    print("\n".join(lines))
    report = dict(
        device=torch.cuda.get_device_name() if on_gpu else f"cpu ({platform.processor() or platform.machine()})",
        torch=torch.__version__,
        triton=getattr(__import__("triton"), "__version__", "n/a") if fa.HAS_TRITON else "n/a",
        mode="gpu" if on_gpu else "cpu-smoke",
        flops_note="forward 4*B*H*S^2*D (halved if causal); forward+backward 3.5x forward; padded cases nominal",
        wall_s=time.perf_counter() - start_s,
        rows=rows,
    )
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"\nwrote {args.out} ({report['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
