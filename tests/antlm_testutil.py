"""Helpers shared by the tests: paths, the tiny recipe, and subprocess runners.

Imported as ``from antlm_testutil import ...`` (a unique module name, so it never clashes
with a ``conftest`` module of a sub-folder).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from antlm_dist.distributed import free_port  # noqa: F401 - the tests' rendezvous ports

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Small enough for 2 CPU ranks on 2 cores: 4 optimizer steps per epoch.
TINY = [
    "model.vocab_size=512", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.max_position_embeddings=64",
    "data.seq_len=32", "data.max_train_blocks=64", "data.max_eval_blocks=16", "data.num_proc=1",
    "train.micro_batch_size=4", "train.gradient_accumulation_steps=2", "train.warmup_steps=2",
    "train.lr=3e-3", "eval.micro_batch_size=8", "objective.schedule=1_CLM+1_MLM+1_CLM",
    "checkpoint.keep_last=0",
]


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (the shared data folder is optional); this test needs it")
    return p


def tiny_args_for(tokenizer: Path, cache: Path) -> list[str]:
    """The tiny recipe's overrides with a pre-trained tokenizer and a shared data cache."""
    return TINY + [f"tokenizer.path={tokenizer}", f"data.cache_dir={cache}"]


def run_cli(args: list[str], *, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``antlm-train`` in a subprocess (it starts its own ranks); output captured."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "antlm_dist.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(REPO))


def run_torchrun(script: Path, args: list[str], nproc: int = 2, timeout: float = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env["OMP_NUM_THREADS"] = "1"
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=str(REPO))


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-6000:]}"


def train_losses(run_dir: Path) -> dict[int, tuple[str, float]]:
    """{step: (phase, loss)} of a run's ``metrics.jsonl`` training records (the last per step)."""
    from antlm_dist.metrics import read_metrics

    return {r["step"]: (r["phase"], r["loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl", "train")}


# ----------------------------------------------------------------------------- Triton without a GPU

_SM90_COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

for spec in json.loads(sys.argv[1]):
    kernel = autotuned = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    while not isinstance(kernel, JITFunction):  # an autotuned kernel wraps the JIT function
        kernel = kernel.fn
    # every autotune config of the kernel, or one build with 4 warps and 3 stages
    configs = [(c.kwargs, {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in autotuned.configs] \
        if spec.get("autotune_configs") else [({}, {"num_warps": 4, "num_stages": 3})]
    for blocks, options in configs:
        const = {**spec["constants"], **blocks}
        sig = {name: "constexpr" if name in const else spec["types"].get(name, "i32") for name in kernel.arg_names}
        try:
            src = ASTSource(kernel, sig, {(list(sig).index(k),): v for k, v in const.items()})
        except Exception as exc:  # this Triton's ASTSource API differs: nothing to check here
            print("ASTSource API:", exc)
            sys.exit(77)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm.get("cubin"), f"{spec['kernel']} {blocks}: no cubin"
print("compiled")
"""


def assert_compile_for_sm90(specs: list[dict], cache_dir: Path) -> None:
    """Lower Triton kernels through the CUDA backend and ptxas for sm_90, with no GPU.

    Each spec: ``{"module", "kernel", "types": {arg: "*fp32" | "fp32" | ...},
    "constants": {arg: value}, "autotune_configs": bool}``; arguments named in neither
    are ``i32``. With ``autotune_configs`` the kernel is built once per config of its
    ``@triton.autotune`` list (block sizes, warps, stages), as a GPU would. Runs in a
    subprocess with ``TRITON_INTERPRET=0``; skips when this Triton's compiler API differs
    or ptxas is missing.
    """
    import json

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(cache_dir))
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE_SCRIPT, json.dumps(specs)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    if "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]

