"""Process group, DeepSpeed config resolution and engine construction.

The recipe owns batch sizes and precision; the DeepSpeed JSON owns the ZeRO stage,
offload and communication. The JSON leaves batch fields ``"auto"`` and this module fills
them; a concrete JSON value that contradicts the recipe stops the run at start-up with an
error naming both files.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from antlm_dist.config import ConfigError, Recipe
from antlm_dist.ds_json import read_ds_json


# ----------------------------------------------------------------------------- process group

def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment (1 process if unset)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def pick_device(local_rank: int) -> torch.device:
    """This rank's device: ``cuda:<local_rank>`` when CUDA is present, else the CPU.

    On CPU it also tells DeepSpeed (before its first import) to use its CPU accelerator and
    where its prebuilt CPU op lives (:func:`torch_extensions_root`), and silences the
    deprecation warning torch emits for DeepSpeed's all-gather call.
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(torch_extensions_root())
    prefer_interpreter_ninja()
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    return torch.device("cpu")


def prefer_interpreter_ninja() -> Path | None:
    """Put the interpreter's own ``bin`` folder first on ``PATH`` when it holds ``ninja``.

    Why: torch builds DeepSpeed's CPU op with whichever ``ninja`` comes first on ``PATH``,
    and two ninja versions write incompatible ``.ninja_log`` formats (v5 for Debian's 1.11,
    v7 for pip's 1.13), each discarding the other's log and rebuilding everything. Without
    this, ``launch/setup.sh`` (the venv's python, venv not activated: the system's ninja)
    prebuilds the op and the first run in an activated venv (pip's ninja) builds it again.

    Returns:
        The ``ninja`` now found first, or ``None`` when the interpreter's folder has none
        (``PATH`` is then left as it was).
    """
    own = Path(sys.executable).parent / "ninja"
    if not (own.is_file() and os.access(own, os.X_OK)):
        return None
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != own.parent]
    os.environ["PATH"] = os.pathsep.join([str(own.parent), *parts])
    return own


STALE_BUILD_LOCK_S = 600.0
"""Age (seconds) after which a torch-extension build lock counts as abandoned; a build of
DeepSpeed's CPU shared-memory op takes well under a minute."""


class StaleBuildLockError(ValueError):
    """A torch-extension build lock that no build holds any more (see :func:`check_build_locks`)."""


def check_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> None:
    """Refuse to start when a JIT build lock of a torch extension was left behind.

    DeepSpeed builds some ops on first use (on CPU, its shared-memory all-reduce) through
    ``torch.utils.cpp_extension``, which guards each build with a ``lock`` file in
    ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). A rank killed during
    that build leaves the file behind, and every later run then waits on it forever,
    silently. A lock older than ``max_age_s`` seconds is reported instead.

    Raises:
        StaleBuildLockError: naming the lock file, its age and the command that removes it.
    """
    for lock, age in _build_locks():
        if age > max_age_s:
            raise StaleBuildLockError(
                f"{lock} is a torch-extension build lock left {age / 60:.0f} minutes ago, most likely by a "
                f"process killed while building {lock.parent.name}; a new run would wait on it forever. "
                f"If no build is running on this machine, remove it (rm {lock}) and start again."
            )


def torch_extensions_root() -> Path:
    """Where DeepSpeed's JIT-built ops live for a run: ``$TORCH_EXTENSIONS_DIR`` when set, else
    ``<venv>/torch_extensions`` inside a venv (where ``launch/setup.sh`` prebuilt them, see
    :mod:`antlm_dist.prebuild`), else torch's default ``~/.cache/torch_extensions/py311_cpu``."""
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if sys.prefix != sys.base_prefix:  # a venv of its own: no rebuilds for other venvs' DeepSpeed sources
        return Path(sys.prefix) / "torch_extensions"
    return Path(get_default_build_root())


def _build_locks() -> list[tuple[Path, float]]:
    """(lock file, age in seconds) of every torch-extension build lock that exists now."""
    root = torch_extensions_root()  # torch builds each op into <root>/<op>
    if not root.is_dir():
        return []
    now, out = time.time(), []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            out.append((lock, now - lock.stat().st_mtime))
        except FileNotFoundError:  # a build finished meanwhile
            continue
    return out


BUILD_LOCK_REPORT_S = 3.0
"""A build lock older than this (seconds) is reported while a rank starts DeepSpeed."""


@contextlib.contextmanager
def reporting_build_locks(interval_s: float = 1.0, report_after_s: float = BUILD_LOCK_REPORT_S):
    """While the body runs, a thread reports every torch-extension build lock older than
    ``report_after_s`` seconds (path, age, the op and the fix), again each minute it stays.

    DeepSpeed's start-up builds or loads its CPU op under such a lock, and a rank that waits
    on it shows nothing else; with this, a run never waits silently.
    """
    log = logging.getLogger("antlm_dist")
    stop, reported = threading.Event(), {}

    def watch():
        while not stop.wait(interval_s):
            for lock, age in _build_locks():
                if age >= report_after_s and time.monotonic() - reported.get(lock, -1e9) >= 60:
                    reported[lock] = time.monotonic()
                    log.warning("waiting on %s, a torch-extension build lock %.0f s old: %s is being built, here or "
                                "by another process; if no build runs on this machine, remove it (rm %s)",
                                lock, age, lock.parent.name, lock)

    thread = threading.Thread(target=watch, name="antlm-build-lock-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def init_distributed(recipe: Recipe, device: torch.device) -> None:
    """Start the process group: nccl on CUDA, gloo on CPU, timeout from the recipe.

    A dead peer makes the survivors' next collective fail after at most
    ``distributed.timeout_minutes`` instead of NCCL's default 30 minutes.
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    backend = recipe.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        # Surface a hung or failed NCCL collective as an error instead of a silent hang.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # no launcher: one rank in this process
        # a free port rather than torch's usual 29500, so one-rank runs side by side do not collide
        os.environ["MASTER_PORT"] = str(free_port())
    with reporting_build_locks():  # on CPU DeepSpeed loads (or builds) its shared-memory op here
        deepspeed.init_distributed(
            dist_backend=backend, verbose=False,
            timeout=datetime.timedelta(minutes=recipe.distributed.timeout_minutes),
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it; another process may take it
    before it is bound again, which a rendezvous then reports as ``EADDRINUSE``)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the initialised group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a short list of numbers over ranks in one float64 all-reduce."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- DeepSpeed config

def resolve_precision(recipe: Recipe, device: torch.device) -> str:
    p = recipe.train.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


def build_ds_config(recipe: Recipe, world_size: int, device: torch.device, recipe_source: str = "the recipe") -> dict:
    """Load the DeepSpeed JSON and fill its ``"auto"`` fields from the recipe: the batch and
    clipping fields in :func:`antlm_dist.ds_json.read_ds_json` (no torch), the precision
    sections here (they depend on ``device``).

    Raises:
        ConfigError: unreadable JSON, or a concrete value that contradicts the recipe
            (naming the JSON file, the recipe and both values).
    """
    path, cfg = read_ds_json(recipe, world_size, recipe_source)  # torch-free part: file, stage, batch fields
    t = recipe.train
    precision = resolve_precision(recipe, device)
    for key, want in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = cfg.setdefault(key, {"enabled": "auto"})
        have = section.get("enabled", "auto")
        if have == "auto":
            section["enabled"] = want
        elif bool(have) != want:
            raise ConfigError(
                f"{path} sets {key}.enabled={have} but {recipe_source} resolves train.precision to "
                f"{precision}; set {key}.enabled to \"auto\" or change train.precision"
            )
    if "optimizer" in cfg:
        params = cfg["optimizer"].setdefault("params", {})
        fills = {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps,
                 "weight_decay": t.weight_decay}
        for k, v in fills.items():
            if params.get(k, "auto") == "auto":
                params[k] = v
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# ----------------------------------------------------------------------------- optimizer and engine

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and embeddings, not norms or biases (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_adamw(params, t) -> torch.optim.AdamW:
    """torch AdamW (Loshchilov & Hutter 2019, decoupled weight decay) with the recipe's
    ``train`` hyper-parameters; ``fused=True`` when ``train.optim`` is ``adamw_torch_fused``.
    The fused kernel updates every tensor of a group in one pass instead of ~10 elementwise
    passes per parameter: on CPU at BabyLlama-58M, 0.07 s instead of 0.31 s per step (one thread).

    Args:
        params: parameter groups (:func:`param_groups`); fp32, bf16 or fp16 tensors on CPU or CUDA.
        t: the recipe's :class:`~antlm_dist.config.TrainConfig`.

    Raises:
        RuntimeError: from torch, when ``fused`` meets a parameter on a device or of a dtype its
            kernel does not support.
    """
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             fused=True if t.optim == "adamw_torch_fused" else None)


def build_engine(model: torch.nn.Module, recipe: Recipe, ds_config: dict, total_steps: int):
    """``deepspeed.initialize`` with torch AdamW (:func:`build_adamw`, no op compile) and a cosine LambdaLR.

    When the JSON has its own ``optimizer`` section, DeepSpeed builds that optimizer and
    only the LR schedule comes from here.

    Returns:
        The DeepSpeed engine.
    """
    import deepspeed

    t = recipe.train
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = build_adamw(param_groups(model, t.weight_decay), t)
    fn = lr_lambda(total_steps, t.warmup_steps, t.min_lr_ratio)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, fn)

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer,
        model_parameters=None if optimizer is not None else param_groups(model, t.weight_decay),
        lr_scheduler=scheduler, config=ds_config,
    )
    skip_single_rank_allreduce(engine)
    return engine


def skip_single_rank_allreduce(engine) -> bool:
    """Turn off the engine's gradient all-reduce when it has nothing to reduce.

    Why: under ZeRO-0 DeepSpeed all-reduces gradients through ``buffered_allreduce_fallback``,
    which copies every gradient into flat buckets (``torch.cat``) and back, even with one
    rank; at BabyLlama-58M on CPU that is ~0.15 s of a ~3.5 s step. With one rank the
    all-reduce (an average over one rank) is the identity, so the gradients are bit-identical
    without it. ZeRO 1–3 reduce inside their own optimizer and are left as they are.

    Args:
        engine: the ``DeepSpeedEngine`` that ``deepspeed.initialize`` returned.

    Returns:
        True when the all-reduce was turned off (ZeRO-0 on a world of one rank).
    """
    if engine.zero_optimization_stage() != 0 or engine.world_size != 1:
        return False
    engine.enable_backward_allreduce = False
    return True
