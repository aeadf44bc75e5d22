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

This module is the only one that knows the layout: the trainer, ``antlm-export`` and
``launch/slurm/antlm.sbatch`` (through ``python -m antlm_dist.checkpoint latest RUN``)
all go through it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from antlm_dist.distributed import barrier, world_info

TAG_PREFIX = "step"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that belongs to a different run."""


@dataclasses.dataclass(frozen=True)
class ClientState:
    """What the trainer stores beside DeepSpeed's files (``client_state.json``).

    step: optimizer steps done. sampler: :meth:`DistributedResumableSampler.state_dict`
    (epoch, position in samples, global batch). schedule: ``objective.schedule`` as
    formatted by :func:`antlm_dist.schedule.format_schedule`. tokenizer_hash: sha256 hex of
    the run's ``tokenizer.json``. world_size: ranks that wrote it. recipe: the resolved
    recipe as a dict. words_seen: words of training text consumed (:mod:`antlm_dist.words`);
    None in checkpoints written before words were counted.
    """

    step: int
    sampler: dict
    schedule: str
    tokenizer_hash: str
    world_size: int
    recipe: dict
    words_seen: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "ClientState":
        """Raises CheckpointError naming ``where`` and the missing keys."""
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise CheckpointError(f"{where} lacks {', '.join(missing)}; it was not written by this antlm-train")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint: ``ckpt_dir / tag``, inside the run folder ``run_dir``."""

    ckpt_dir: Path
    tag: str
    run_dir: Path

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag


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


def resolve_checkpoint(path: Path | str) -> CheckpointRef:
    """Resolve a run folder, its ``checkpoints/`` folder or one tag folder.

    Args:
        path: ``<run>``, ``<run>/checkpoints`` (→ the latest complete tag) or
            ``<run>/checkpoints/stepNNNNNNNN``.

    Raises:
        CheckpointError: the path does not exist, is an incomplete tag, or holds no
            complete checkpoint.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"--checkpoint {p}: no such folder; give a run folder, its checkpoints/ or a step folder")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name.startswith(TAG_PREFIX) and (p / "client_state.json").is_file():
        if not (p / "COMPLETE").is_file():
            raise CheckpointError(f"--checkpoint {p} is incomplete (no COMPLETE marker); the save was interrupted")
        return CheckpointRef(p.parent, p.name, p.parent.parent)
    tag = latest_tag(p)
    if tag is None:
        raise CheckpointError(
            f"--checkpoint {p}: no complete checkpoint (stepNNNNNNNN/ with COMPLETE) there; "
            "give a run folder, its checkpoints/ or a step folder"
        )
    return CheckpointRef(p, tag, p.parent)


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: ClientState | dict,
                    keep_last: int = 0) -> Path:
    """Collective: every rank must call it. Returns the final tag folder.

    ``client_state`` (a :class:`ClientState`, or any JSON-serialisable dict) is stored
    beside the DeepSpeed files and also passed to DeepSpeed's own ``client_state``.
    """
    if isinstance(client_state, ClientState):
        client_state = client_state.to_dict()
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


def read_client_state(ckpt_dir: Path, tag: str | None = None) -> tuple[str, ClientState]:
    """(tag, client state) of ``tag`` or the latest complete checkpoint.

    Raises:
        CheckpointError: none complete, no ``client_state.json``, or one missing fields.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"no complete checkpoint under {ckpt_dir}")
    f = ckpt_dir / tag / "client_state.json"
    if not f.is_file():
        raise CheckpointError(f"{f} is missing; this is not a checkpoint written by antlm-train")
    return tag, ClientState.from_dict(json.loads(f.read_text()), str(f))


def check_resume(state: ClientState, tag: str, *, global_batch: int, micro_batch_size: int,
                 gradient_accumulation_steps: int, world_size: int, schedule: str, tok_hash: str) -> bool:
    """The one compatibility check of a checkpoint against the run that resumes it.

    The global batch, the schedule and the tokenizer must match; the world size may differ.

    Returns:
        True when the world size differs, so the engine must load the universal form
        (``"checkpoint": {"load_universal": true}``, see :func:`universal_tag`).

    Raises:
        CheckpointError: naming the differing setting, both values and the fix.
    """
    saved_batch = state.sampler["global_batch"]
    if saved_batch != global_batch:
        per_step = micro_batch_size * world_size
        hint = (f"set train.gradient_accumulation_steps={saved_batch // per_step}" if saved_batch % per_step == 0
                else "choose train.micro_batch_size and train.gradient_accumulation_steps to match")
        raise CheckpointError(
            f"checkpoint {tag} was trained with a global batch of {saved_batch} sequences (world size "
            f"{state.world_size}) but this run has {global_batch} (train.micro_batch_size "
            f"{micro_batch_size} × train.gradient_accumulation_steps {gradient_accumulation_steps} × world "
            f"size {world_size}); the global batch must stay constant across resumes: {hint}"
        )
    if state.schedule != schedule:
        raise CheckpointError(
            f"checkpoint {tag} was trained with schedule {state.schedule!r} but the recipe says "
            f"{schedule!r}; resume with the same objective.schedule"
        )
    if state.tokenizer_hash != tok_hash:
        raise CheckpointError(f"checkpoint {tag} used another tokenizer (hash {state.tokenizer_hash[:12]}…)")
    return state.world_size != world_size


def optimizer_partitions(ckpt_dir: Path, tag: str) -> str | None:
    """Which partitioned optimizer states ``tag`` holds: ``"zero"`` (``zero_pp_rank_*``,
    written under ZeRO 1–3), ``"bf16"`` (``bf16_zero_pp_rank_*``, DeepSpeed's bf16
    optimizer under ZeRO-0) or None (a ZeRO-0 fp32 checkpoint keeps its optimizer in the
    model-states file). :func:`universal_tag` converts the first two only."""
    folder = Path(ckpt_dir) / tag
    if any(folder.glob("zero_pp_rank_*optim_states.pt")):
        return "zero"
    if any(folder.glob("bf16_zero_pp_rank_*optim_states.pt")):
        return "bf16"
    return None


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


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    """``python -m antlm_dist.checkpoint latest PATH``: print the latest complete checkpoint
    folder of a run (or of its ``checkpoints/``) and exit 0, or exit 1 when there is none.

    Launch scripts use it instead of reading the layout themselves.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m antlm_dist.checkpoint",
                                description="Query the checkpoint layout of an antlm-train run folder.")
    sub = p.add_subparsers(dest="command", required=True)
    latest = sub.add_parser("latest", help="print the newest complete checkpoint; exit 1 when there is none")
    latest.add_argument("path", help="a run folder or its checkpoints/ folder")
    args = p.parse_args(argv)
    try:
        ref = resolve_checkpoint(args.path)
    except CheckpointError as exc:
        print(f"no checkpoint: {exc}", file=sys.stderr)
        return 1
    print(ref.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
