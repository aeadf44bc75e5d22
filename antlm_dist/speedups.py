"""Start-up choices that make the training step cheaper without changing what it computes.

* :func:`resolve_compile` / :func:`compile_layers`: ``train.compile`` compiles every
  transformer block with ``torch.compile`` (TorchInductor; Ansel et al. 2024, "PyTorch 2"),
  one block at a time as torchtitan does. The blocks share one code object, so one
  compiled graph serves every layer; the attention mode (``causal``) is a Python bool,
  hence a guard, and each mode compiles once (at most one recompilation per mode, more
  only when a padding or document mask appears). The embedding, the masked-token loss
  (whose row count depends on the data) and the optimizer stay eager.
* :func:`single_rank_ds_config`: on one rank, ZeRO partitioning has nothing to
  partition; stages 1–3 then only copy gradients and parameters into flat buffers. The
  run uses ZeRO stage 0 unless the JSON offloads (offload is the reason to keep a stage
  on one device) or ``distributed.single_rank_zero0`` is false.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil

import torch
import torch.nn as nn

from antlm_dist.config import ConfigError, Recipe

log = logging.getLogger("antlm_dist")

_CXX_CANDIDATES = ("g++", "clang++", "c++")


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor's CPU backend would call (``$CXX`` first), or None."""
    for name in filter(None, (os.environ.get("CXX"), *_CXX_CANDIDATES)):
        found = shutil.which(name)
        if found:
            return found
    return None


def resolve_compile(recipe: Recipe, device: torch.device, zero: int) -> tuple[bool, str]:
    """Whether to compile the transformer blocks, and why, for ``train.compile``.

    ``None`` (auto) compiles on CUDA under ZeRO 0–2 and stays eager elsewhere: on CPU the
    compiled step is faster (``docs/benchmarks.md``) but its losses differ from the eager
    ones in the last bits, and ``demo-cpu`` keeps its recorded eager losses bit for bit;
    a short CPU run also spends more time compiling than it saves.

    Args:
        recipe: the validated recipe.
        device: the device the model runs on.
        zero: the ZeRO stage the engine will run (after :func:`single_rank_ds_config`).

    Returns:
        (compile, reason for the log line).

    Raises:
        ConfigError: ``train.compile=true`` under ZeRO-3 (its parameter gathering hooks run
            inside every block's forward, which the compiled graph would bypass), or on a
            CPU without a C++ compiler (Inductor writes and builds C++ there).
    """
    wanted = recipe.train.compile
    if wanted is False:
        return False, "train.compile=false"
    if zero >= 3:
        if wanted:
            raise ConfigError(
                "train.compile=true is not supported under ZeRO-3 (DeepSpeed gathers each partitioned parameter "
                "in hooks around every module's forward, which a compiled block skips); use a ZeRO-0/1/2 JSON in "
                "distributed.deepspeed_config or set train.compile=false")
        return False, "auto: eager under ZeRO-3"
    if device.type == "cpu":
        if wanted and cxx_compiler() is None:
            raise ConfigError(
                "train.compile=true on CPU needs a C++ compiler for TorchInductor (none of $CXX, g++, clang++, c++ "
                "is on PATH); install one (apt-get install g++) or set train.compile=false")
        if not wanted:
            return False, "auto: eager on CPU (bit-identical to the recorded demo-cpu losses; set train.compile=true)"
    return True, "train.compile=true" if wanted else f"auto: compiled on {device.type}"


def compile_layers(model: nn.Module) -> int:
    """Compile, in place, every block of each ``layers`` ``nn.ModuleList`` of ``model``
    (Llama ``model.layers``, LTG-BERT ``transformer.layers``) with ``torch.compile``.

    ``nn.Module.compile`` keeps the parameters and their names, so state dicts,
    checkpoints and DeepSpeed's parameter groups are unchanged. Must run before
    ``deepspeed.initialize``.

    Returns:
        The number of blocks compiled (0 when the model has no ``layers`` list).
    """
    n = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, nn.ModuleList):
            for block in module:
                block.compile()
                n += 1
    return n


def single_rank_ds_config(ds_config: dict, world_size: int, recipe: Recipe) -> tuple[dict, str | None]:
    """The DeepSpeed config a run of ``world_size`` ranks should use.

    With one rank, and neither an offload section nor ``distributed.single_rank_zero0:
    false``, a copy of ``ds_config`` with ``zero_optimization`` reduced to stage 0 (the
    other ZeRO keys only tune partitioning and communication); otherwise ``ds_config``
    itself.

    Returns:
        (config, a start-up message when the stage was changed, else None).
    """
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload = any(zero.get(k, {}).get("device", "none") not in (None, "none")
                  for k in ("offload_optimizer", "offload_param"))
    if world_size != 1 or stage == 0 or offload or not recipe.distributed.single_rank_zero0:
        return ds_config, None
    cfg = copy.deepcopy(ds_config)
    cfg["zero_optimization"] = {"stage": 0}
    return cfg, (f"one rank: ZeRO stage 0 instead of the JSON's stage {stage} (nothing to partition; "
                 "set distributed.single_rank_zero0=false to keep it)")
