"""Atomic DeepSpeed checkpoints with client state, and finding the latest complete one.

Layout under ``<output_dir>/checkpoints``::

    step00000120/          one DeepSpeed tag (model, optimizer, scheduler states)
        client_state.json  step, epoch, sampler position, schedule, tokenizer hash, recipe
        rng_rank<r>.pt     per-rank torch/python RNG states
        COMPLETE           written last
        universal/         only after a resume at another world size: the same state in
                           DeepSpeed's universal format (see :func:`universal_tag`)
    latest                 the newest complete tag (DeepSpeed's own pointer format)

Every rank writes into ``<tag>.tmp``; after a barrier rank 0 renames it to ``<tag>``,
writes ``COMPLETE`` and then replaces ``latest`` atomically (write + ``os.replace``). A
crash at any point leaves the previous ``latest`` checkpoint untouched.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from antlm_dist.distributed import barrier, world_info

TAG_PREFIX = "step"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that belongs to a different run."""


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete tag, or None. Falls back to scanning if ``latest`` is stale."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / "COMPLETE").is_file():
            return tag
    tags = _complete_tags(ckpt_dir)
    return tags[-1].name if tags else None


def _complete_tags(ckpt_dir: Path) -> list[Path]:
    """Tag folders holding a ``COMPLETE`` marker, oldest first (tags sort by step)."""
    return sorted(p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if (p / "COMPLETE").is_file())


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int = 0) -> Path:
    """Collective: every rank must call it. Returns the final tag folder.

    ``client_state`` must be JSON-serialisable; it is stored beside the DeepSpeed files
    and also passed to DeepSpeed's own ``client_state``.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for_step(step)
    final = ckpt_dir / tag
    rank, _ = world_info()
    if (final / "COMPLETE").is_file():
        return final  # this exact step is already saved and complete
    tmp_tag = tag + ".tmp"
    if rank == 0:
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"antlm": client_state}, save_latest=False)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, ckpt_dir / tmp_tag / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        (ckpt_dir / tmp_tag / "client_state.json").write_text(json.dumps(client_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(ckpt_dir / tmp_tag, final)
        _atomic_write(final / "COMPLETE", "ok\n")
        _atomic_write(ckpt_dir / "latest", tag)
        if keep_last > 0:
            for old in _complete_tags(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_client_state(ckpt_dir: Path, tag: str | None = None) -> tuple[str, dict]:
    """(tag, client_state) of ``tag`` or the latest complete checkpoint.

    Raises:
        CheckpointError: none complete.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"no complete checkpoint under {ckpt_dir}")
    return tag, json.loads((ckpt_dir / tag / "client_state.json").read_text())


UNIVERSAL_SUBDIR = "universal"


def universal_tag(ckpt_dir: Path, tag: str) -> str:
    """Collective: convert ``tag`` to DeepSpeed's universal format once; returns the tag to load.

    A universal checkpoint stores each parameter's fp32 weights and Adam moments whole,
    so a run can resume at another data-parallel world size. The conversion
    (``deepspeed.checkpoint.ds_to_universal``) runs on rank 0 in a subprocess into
    ``<tag>/universal`` (atomically renamed) and is reused by later resumes; every rank
    must then build its engine with ``"checkpoint": {"load_universal": true}``.

    Raises:
        CheckpointError: the conversion failed (its output is included).
    """
    import subprocess
    import sys

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / tag / UNIVERSAL_SUBDIR
    rank, _ = world_info()
    error = ""
    if rank == 0 and not (final / "COMPLETE").is_file():
        tmp = final.with_name(UNIVERSAL_SUBDIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, final)
            _atomic_write(final / "COMPLETE", "ok\n")
        else:
            error = (proc.stdout + proc.stderr)[-3000:]
    barrier()
    if not (final / "COMPLETE").is_file():
        raise CheckpointError(f"converting {ckpt_dir / tag} to a universal checkpoint failed "
                              f"(deepspeed.checkpoint.ds_to_universal){': ' + error if error else ''}")
    return f"{tag}/{UNIVERSAL_SUBDIR}"


def load_checkpoint(engine, ckpt_dir: Path, tag: str, *, load_optimizer_states: bool = True) -> None:
    """Collective: restore model, optimizer and LR scheduler states, and this rank's RNG.

    Raises:
        CheckpointError: DeepSpeed could not load the tag.
    """
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer_states,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    rank, _ = world_info()
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
