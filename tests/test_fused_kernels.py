"""``model.fused_kernels``: liger-kernel's RMSNorm, SwiGLU and RoPE against our torch modules.

liger-kernel's kernels are Triton; without a GPU they run only through the Triton
interpreter, which must be switched on before the kernels are defined, so each check runs
in a subprocess with ``TRITON_INTERPRET=1`` and small shapes. Under Triton 3.9's interpreter
liger's RMSNorm and SwiGLU kernels stop with ``AttributeError: 'float' object has no
attribute 'to'`` (a scalar inside the kernel), so those two are compared on CUDA only;
RoPE runs in the interpreter. The reference is always our torch path.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from antlm_dist.config import ConfigError, ModelConfig, load_recipe
from antlm_dist.model import build_model
from antlm_dist.model.fused import liger_installed, resolve_fused_kernels

from antlm_testutil import REPO

needs_liger = pytest.mark.skipif(not liger_installed(), reason="liger-kernel is not installed (pip install '.[gpu]')")
ON_CUDA = torch.cuda.is_available()
INTERPRETER_FAILS = ("liger-kernel's RMSNorm and SwiGLU kernels fail in the Triton 3.9 interpreter "
                     "(AttributeError: 'float' object has no attribute 'to'); checked on CUDA only")

# Compares one op, liger against our torch path, forward and backward, in fp32; prints OK.
_CHECK = r"""
import sys, torch
from antlm_dist.model import fused
from antlm_dist.model.llama import rope_cos_sin
op, device = sys.argv[1], sys.argv[2]
gen = torch.Generator().manual_seed(0)
def leaf(*shape):
    return torch.randn(*shape, generator=gen).to(device).requires_grad_(True)
if op == "rms_norm":
    x, w = leaf(3, 5, 24), leaf(24)
    inputs, run = (x, w), lambda impl, x, w: (fused.rms_norm(x, w, 1e-6, impl),)
elif op == "swiglu":
    inputs, run = (leaf(3, 5, 40), leaf(3, 5, 40)), lambda impl, g, u: (fused.swiglu(g, u, impl),)
else:
    cos, sin = rope_cos_sin(7, 16, 10000.0, device, torch.float32)
    inputs = (leaf(2, 4, 7, 16), leaf(2, 2, 7, 16))
    run = lambda impl, q, k: fused.rope(q.clone(), k.clone(), cos, sin, impl)
results = {}
for impl in ("torch", "liger"):
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = run(impl, *xs)
    sum((o * (i + 1.5)).sum() for i, o in enumerate(outs)).backward()
    results[impl] = [o.detach() for o in outs] + [x.grad for x in xs]
for got, want in zip(results["liger"], results["torch"]):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
print("OK", op, len(results["torch"]))
"""


@needs_liger
@pytest.mark.parametrize("op", ["rope", "rms_norm", "swiglu"])
def test_liger_op_matches_our_torch_path(op):
    if ON_CUDA:
        env, device = dict(os.environ), "cuda"
    elif op != "rope":
        pytest.skip(INTERPRETER_FAILS)
    else:
        env, device = dict(os.environ, TRITON_INTERPRET="1"), "cpu"
    proc = subprocess.run([sys.executable, "-c", _CHECK, op, device], capture_output=True, text=True, env=env,
                          timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"OK {op}")


def test_auto_is_torch_on_cpu_and_liger_on_cpu_is_refused(monkeypatch):
    assert resolve_fused_kernels("auto", "cpu") == "torch"
    assert resolve_fused_kernels("torch", "cuda") == "torch"
    model = build_model(ModelConfig(vocab_size=20, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                    num_attention_heads=2, attention="sdpa", loss="torch"), device="cpu")
    impls = {type(m).__name__: m.fused_impl for m in model.modules() if hasattr(m, "fused_impl")}
    assert impls == {"RMSNorm": "torch", "LlamaMLP": "torch", "LlamaAttention": "torch"}
    if liger_installed():
        with pytest.raises(ConfigError, match="CUDA only; this run is on cpu"):
            resolve_fused_kernels("liger", "cpu")
    monkeypatch.setattr("antlm_dist.model.fused.liger_installed", lambda: False)
    assert resolve_fused_kernels("auto", "cuda") == "torch"
    with pytest.raises(ConfigError, match=r"pip install 'antlm-dist\[gpu\]'"):
        resolve_fused_kernels("liger", "cuda")
    with pytest.raises(ConfigError, match="model.fused_kernels=liger is for model.arch=llama"):
        load_recipe("ltg-bert-demo-cpu", ["model.fused_kernels=liger"])
    with pytest.raises(ConfigError, match="model.fused_kernels='fast' is not allowed"):
        load_recipe("demo-cpu", ["model.fused_kernels=fast"])
