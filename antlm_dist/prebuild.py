"""``python -m antlm_dist.prebuild``: build DeepSpeed's CPU communication op now, at install time.

On a machine without CUDA, ``deepspeed.init_distributed`` loads ``deepspeed_shm_comm``
(DeepSpeed's shared-memory all-reduce), which pip does not build: the first run compiles it
(about a minute, several on busy cores) under a ``lock`` file in ``$TORCH_EXTENSIONS_DIR``
(by default ``<venv>/torch_extensions``, see :func:`antlm_dist.distributed.pick_device`)
while every other rank waits. ``launch/setup.sh`` runs this module after installing, so no
run waits for that build. On a CUDA machine there is nothing to build and it exits at once.

Exit status 0 when the op is built (or not needed), 1 when the build failed (the setup
script reports it and goes on: a run then builds the op itself).
"""
from __future__ import annotations

import os
import sys
import time


def prebuild_cpu_ops() -> str:
    """Build (or find already built) the CPU ops a run loads; returns one line saying what happened.

    Raises:
        RuntimeError: the compiler or ninja is missing, or the build failed (DeepSpeed's message).
    """
    import torch

    from antlm_dist.distributed import pick_device

    if torch.cuda.is_available():
        return "CUDA machine: DeepSpeed loads no CPU op at start-up, nothing to build"
    pick_device(0)  # the same DS_ACCELERATOR and TORCH_EXTENSIONS_DIR (the venv's) as a run
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    builder = ShareMemCommBuilder()
    t0 = time.perf_counter()
    builder.load(verbose=False)
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return f"{builder.NAME} ready in {root} ({time.perf_counter() - t0:.1f} s)"


def main() -> int:
    try:
        print(f"[prebuild] {prebuild_cpu_ops()}")
    except Exception as exc:  # noqa: BLE001 - any build failure is reported, and runs build it later
        print(f"[prebuild] could not build DeepSpeed's CPU op ({type(exc).__name__}: {exc}); the first run "
              "will build it instead (install a C++ compiler and ninja to build it here)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
