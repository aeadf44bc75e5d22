"""Check both Triton kernels at training sizes in bf16 against float32 references.

For each case the kernel's bf16 output and every gradient, and torch's own bf16 result
(SDPA for attention; matmul + ``F.cross_entropy`` for the loss), are compared with a
float32 torch reference computed from the same bf16 inputs. A case passes when the
kernel's relative L2 error is at most ``2 × torch's bf16 error + 1e-3`` (STYLE.md,
convention 5: a bf16 kernel should be about as exact as torch in bf16).

Cases (GPU sizes):

* attention (FlashAttention-2, Dao 2023): 16,384 tokens per batch, 8 heads, head dim 64,
  sequences 128 / 512 / 2048, causal and bidirectional, plain and with key padding
  (the last quarter of every second row) and packed documents; forward and backward.
* masked-token loss: BabyLlama size (B × T = 32 × 128, H 512, V 16,000), CLM (every
  row a target but the last of each sequence) and MLM (15 % of rows); forward and
  backward to hidden and weight.

``--cpu-smoke`` runs tiny fp32 cases through the Triton interpreter (set before the
kernels are imported), so the script's own logic can be exercised without a GPU.
Writes JSON to ``--out``, prints a Markdown table; exit status 1 when a case fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_kernel_check.json", help="JSON output path")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 cases on CPU through the Triton interpreter")
    p.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 2048], help="attention sequence lengths")
    return p.parse_args(argv)


def _rel_err(actual, expected) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _verdict(kernel_err: float, torch_err: float) -> bool:
    return kernel_err <= 2.0 * torch_err + 1e-3


def _grads(fn, inputs, grad_out):
    """(output, [d input]) of ``fn(*inputs)`` for the upstream gradient ``grad_out``."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


def attention_cases(fa, device, dtype, seqs, tokens, heads, head_dim):
    """One record per (seq, causal, mask) case; see the module docstring."""
    import torch

    records = []
    for seq in seqs:
        batch = max(1, tokens // seq)
        gen = torch.Generator(device=device).manual_seed(seq)
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, generator=gen).to(dtype) for _ in range(3))
        do = torch.randn(batch, heads, seq, head_dim, device=device, generator=gen).to(dtype)
        pad = torch.ones(batch, seq, dtype=torch.bool, device=device)
        pad[1::2, seq - seq // 4:] = False
        docs = (torch.arange(seq, device=device) * 3 // seq).expand(batch, seq).contiguous()
        for causal in (True, False):
            for mask_name, kw in (("none", {}), ("padding", {"key_padding_mask": pad}),
                                  ("documents", {"segment_ids": docs})):
                def run(backend, cast):
                    def f(q_, k_, v_):
                        return fa.flash_attention(q_.to(cast), k_.to(cast), v_.to(cast), causal=causal,
                                                  backend=backend, **kw)
                    return _grads(f, (q, k, v), do.to(cast))

                ref_o, ref_g = run("torch", torch.float32)  # the torch path has the kernel's mask semantics
                ker_o, ker_g = run("triton", dtype)
                tor_o, tor_g = run("torch", dtype)
                errs = {name: (_rel_err(a, r), _rel_err(b, r)) for name, a, b, r in
                        zip(("o", "dq", "dk", "dv"), (ker_o, *ker_g), (tor_o, *tor_g), (ref_o, *ref_g))}
                records.append({"kernel": "attention", "seq": seq, "batch": batch, "causal": causal,
                                "mask": mask_name, "errors": {k_: {"kernel": a, "torch": b}
                                                              for k_, (a, b) in errs.items()},
                                "ok": all(_verdict(a, b) for a, b in errs.values())})
    return records


def loss_cases(mtl, device, dtype, rows, hidden, vocab):
    """CLM and MLM cases of the masked-token loss; see the module docstring."""
    import torch

    records = []
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(rows, hidden, device=device, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, device=device, generator=gen) * hidden ** -0.5).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    for phase, keep in (("CLM", torch.arange(rows, device=device) % 128 != 127),
                        ("MLM", torch.rand(rows, device=device, generator=gen) < 0.15)):
        lab = labels.masked_fill(~keep, -100)
        grad = torch.tensor(1.0 / max(int(keep.sum()), 1), device=device)

        def run(backend, cast):
            def f(h_, w_):
                return mtl.masked_token_loss(h_.to(cast), w_.to(cast), lab, reduction="sum", backend=backend)[0]
            return _grads(f, (h, w), grad.to(torch.float32))

        ref_l, ref_g = run("torch", torch.float32)
        ker_l, ker_g = run("triton", dtype)
        tor_l, tor_g = run("torch", dtype)
        errs = {name: (_rel_err(a, r), _rel_err(b, r)) for name, a, b, r in
                zip(("loss", "dhidden", "dweight"), (ker_l, *ker_g), (tor_l, *tor_g), (ref_l, *ref_g))}
        records.append({"kernel": "masked_token_loss", "phase": phase, "rows": rows, "targets": int(keep.sum()),
                        "errors": {k: {"kernel": a, "torch": b} for k, (a, b) in errs.items()},
                        "ok": all(_verdict(a, b) for a, b in errs.values())})
    return records


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit decorators run
    import importlib

    import torch

    fa = importlib.import_module("antlm_dist.kernels.flash_attention")
    mtl = importlib.import_module("antlm_dist.kernels.masked_token_loss")
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32  # the interpreter computes bf16 wrongly
        sizes = dict(seqs=[16], tokens=32, heads=2, head_dim=16), dict(rows=256, hidden=16, vocab=50)
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        sizes = dict(seqs=args.seqs, tokens=16384, heads=8, head_dim=64), dict(rows=32 * 128, hidden=512, vocab=16000)
    else:
        print("gpu_kernel_check: no CUDA device (use --cpu-smoke to run the script's logic on CPU)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    records = attention_cases(fa, device, dtype, **sizes[0]) + loss_cases(mtl, device, dtype, **sizes[1])
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
              "dtype": str(dtype), "torch": torch.__version__, "seconds": time.perf_counter() - t0,
              "records": records, "ok": all(r["ok"] for r in records)}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    print("| kernel | case | worst kernel rel. error | torch's | ok |\n|---|---|---:|---:|---|")
    for r in records:
        case = (f"seq {r['seq']} {'causal' if r['causal'] else 'bidirectional'} mask={r['mask']}"
                if r["kernel"] == "attention" else f"{r['phase']} {r['targets']} targets")
        worst = max(r["errors"].values(), key=lambda e: e["kernel"])
        print(f"| {r['kernel']} | {case} | {worst['kernel']:.2e} | {worst['torch']:.2e} | {'yes' if r['ok'] else 'NO'} |")
    print(f"{sum(r['ok'] for r in records)}/{len(records)} cases within 2 × torch's error; wrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
