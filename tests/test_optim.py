"""The optimizer and the single-rank step (:func:`antlm_dist.distributed.build_adamw`,
:func:`~antlm_dist.distributed.skip_single_rank_allreduce`), and the ninja that builds
DeepSpeed's CPU op (:func:`~antlm_dist.distributed.prefer_interpreter_ninja`)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from antlm_dist.config import ConfigError, load_recipe
from antlm_dist.distributed import build_adamw, param_groups, prefer_interpreter_ninja

from antlm_testutil import REPO, assert_ok, run_torchrun


def _adamw_float64(params64, grads, steps, lr, betas, eps, decays):
    """AdamW (Loshchilov & Hutter 2019, Alg. 2, with bias correction) written out in float64."""
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params64]
    v = [torch.zeros_like(p) for p in params64]
    for t in range(1, steps + 1):
        for i, p in enumerate(params64):
            g = grads[t - 1][i].double()
            p.mul_(1 - lr * decays[i])
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return params64


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_adamw_matches_a_float64_loop(optim):
    """Both implementations follow the update rule within fp32 rounding over 6 steps, with
    weight decay on matrices only (the trainer's parameter groups)."""
    recipe = load_recipe("demo-cpu", [f"train.optim={optim}", "train.lr=1e-2", "train.weight_decay=0.1"])
    t = recipe.train
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.LayerNorm(40), torch.nn.Linear(40, 7))
    start = [p.detach().double().clone() for p in model.parameters()]
    opt = build_adamw(param_groups(model, t.weight_decay), t)
    assert bool(opt.defaults["fused"]) == (optim == "adamw_torch_fused")
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(6)]
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        opt.step()
    decays = [t.weight_decay if p.dim() >= 2 else 0.0 for p in model.parameters()]
    ref = _adamw_float64([s.clone() for s in start], grads, 6, t.lr, (t.adam_beta1, t.adam_beta2), t.adam_eps, decays)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
    moved = max((p.detach().double() - s).abs().max().item() for p, s in zip(model.parameters(), start))
    assert moved > 0.03  # six steps of lr 1e-2 moved the weights: the comparison is not of the start


def test_optim_default_and_bad_value():
    assert load_recipe(None).train.optim == "adamw_torch_fused"
    assert load_recipe("demo-cpu").train.optim == "adamw_torch"  # keeps the recorded demo losses
    with pytest.raises(ConfigError, match="train.optim='adam' is not allowed; use one of: adamw_torch_fused, adamw_torch"):
        load_recipe(None, ["train.optim=adam"])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_rank_zero0_skips_the_allreduce_bit_for_bit(precision):
    """torchrun, 1 rank: three ZeRO-0 steps without DeepSpeed's all-reduce equal the steps
    with it (every parameter ``torch.equal``), and the all-reduce is never called."""
    proc = run_torchrun(REPO / "tests" / "dist_scripts" / "one_rank_step.py", [precision], nproc=1, timeout=300)
    assert_ok(proc)
    assert (f"OK one rank, {precision}: 3 ZeRO-0 steps bit-identical without the all-reduce (6 calls skipped)"
            in proc.stdout)


def test_the_interpreters_ninja_comes_first(monkeypatch, tmp_path):
    """With another ninja first on PATH (as in a venv that is not activated), the
    interpreter's own ninja is moved in front of it, so the setup's prebuild and every run
    build DeepSpeed's CPU op with the same ninja and share its build log."""
    own = Path(sys.executable).parent / "ninja"
    if not own.is_file():
        pytest.skip(f"{own} is absent: this interpreter has no ninja of its own (pip install ninja)")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\necho 1.0.0\n")
    (other / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(other), str(own.parent), "/usr/bin", "/bin"]))
    assert shutil.which("ninja") == str(other / "ninja")
    assert prefer_interpreter_ninja() == own
    assert shutil.which("ninja") == str(own)
    assert os.environ["PATH"].split(os.pathsep).count(str(own.parent)) == 1
