"""Atomic DeepSpeed checkpoints with client state, and finding the latest complete one.

Layout under ``<output_dir>/checkpoints``::

    step00000120/          one DeepSpeed tag (model, optimizer, scheduler states)
        client_state.json  step, epoch, sampler position, schedule, tokenizer hash, recipe
        rng_rank<r>.pt     per-rank torch/python RNG states
        MANIFEST.json      size and checksum of every file above, the ZeRO stage and world size
        COMPLETE           written last
        universal/         only after a resume at another world size: the same state in
                           DeepSpeed's universal format (see :func:`universal_tag`)
    latest                 the newest complete tag (DeepSpeed's own pointer format)

Every rank writes into ``<tag>.tmp``; then the ranks hash the files (each a share) and
rank 0 writes ``MANIFEST.json`` atomically, renames the folder to ``<tag>``, writes
``COMPLETE`` and replaces ``latest`` atomically (write + ``os.replace``). A crash at any
point leaves the previous ``latest`` checkpoint untouched; a failed write (a full disk)
removes the partial folder and says why. ``--resume`` verifies the newest checkpoint
against its manifest and falls back to the newest intact one (:func:`select_resume_tag`).

This module is the only one that knows the layout: the trainer, ``antlm-export`` and
``launch/slurm/antlm.sbatch`` (through ``python -m antlm_dist.checkpoint latest RUN``)
all go through it.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import random
import shutil
import sys
from pathlib import Path

# torch and antlm_dist.distributed are imported where used: the launcher's run-folder checks
# (complete_tags) must not wait for torch

TAG_PREFIX = "step"
MANIFEST = "MANIFEST.json"
_TAG_RE = re.compile(rf"^{TAG_PREFIX}\d{{8}}$")
log = logging.getLogger("antlm_dist")


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


def pointer_problem(ckpt_dir: Path) -> str | None:
    """What is wrong with ``<ckpt_dir>/latest`` (garbage, or naming no complete tag), or None."""
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.is_file():
        return None
    raw = pointer.read_bytes()[:200]
    text = raw.decode("utf-8", "replace").strip()
    if not _TAG_RE.match(text):
        return f"{pointer} holds {raw[:40]!r}, not a checkpoint tag; it is ignored and the tag folders are scanned"
    if not (Path(ckpt_dir) / text / "COMPLETE").is_file():
        return f"{pointer} names {text}, which is not complete; it is ignored and the tag folders are scanned"
    return None


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete tag, or None. Scans the tag folders when ``latest`` is stale or
    garbage (and logs that, see :func:`pointer_problem`)."""
    ckpt_dir = Path(ckpt_dir)
    problem = pointer_problem(ckpt_dir)
    if problem is None and (ckpt_dir / "latest").is_file():
        return (ckpt_dir / "latest").read_text().strip()
    if problem:
        log.warning("%s", problem)
    tags = complete_tags(ckpt_dir)
    return tags[-1].name if tags else None


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Tag folders holding a ``COMPLETE`` marker, oldest first (tags sort by step)."""
    return sorted(p for p in Path(ckpt_dir).glob(f"{TAG_PREFIX}*")
                  if _TAG_RE.match(p.name) and (p / "COMPLETE").is_file())


def remove_stale_partials(ckpt_dir: Path) -> list[Path]:
    """Delete what interrupted saves left: ``<tag>.tmp`` folders, ``latest.tmp<pid>`` files and
    ``<tag>/universal.tmp``. Call it only when no save is running (rank 0, at start-up).

    Returns:
        The removed paths.
    """
    ckpt_dir = Path(ckpt_dir)
    stale = [*ckpt_dir.glob(f"{TAG_PREFIX}*.tmp"), *ckpt_dir.glob("latest.tmp*"),
             *ckpt_dir.glob(f"{TAG_PREFIX}*/{UNIVERSAL_SUBDIR}.tmp")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


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


# ----------------------------------------------------------------------------- manifest

def _hash_name() -> str:
    """xxh3-128 (the ``xxhash`` package, a dependency of ``datasets``): a non-cryptographic
    checksum several times faster than sha256, enough to catch truncation and corruption;
    sha256 where it is missing."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def file_checksum(path: Path, name: str) -> str:
    """Hex digest of the file at ``path`` with ``name`` (``xxh3_128`` or a hashlib name)."""
    if name == "xxh3_128":
        import xxhash

        h = xxhash.xxh3_128()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, name).hexdigest()


def _checkpoint_files(folder: Path) -> list[str]:
    """Files of a tag folder (relative POSIX paths, sorted) that its manifest covers."""
    skip = {MANIFEST, "COMPLETE"}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                  and p.name not in skip and p.relative_to(folder).parts[0] not in (UNIVERSAL_SUBDIR,
                                                                                     UNIVERSAL_SUBDIR + ".tmp"))


def _gather(obj) -> list:
    """``obj`` of every rank (all_gather_object), or ``[obj]`` without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _hash_share(folder: Path, names: list[str], algo: str) -> dict:
    """Collective: every rank hashes ``names[rank::world]``; returns {name: [bytes, hex]} of all."""
    from antlm_dist.distributed import world_info

    rank, world = world_info()
    mine = {n: [(folder / n).stat().st_size, file_checksum(folder / n, algo)] for n in names[rank::world]}
    merged: dict = {}
    for part in _gather(mine):
        merged.update(part)
    return merged


def read_manifest(folder: Path) -> dict | None:
    """The parsed ``MANIFEST.json`` of a tag folder, or None when the folder has none.

    Raises:
        CheckpointError: the manifest exists but is not valid (naming the file).
    """
    f = Path(folder) / MANIFEST
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        assert isinstance(data["files"], dict) and isinstance(data["hash"], str)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise CheckpointError(f"{f} is damaged ({type(exc).__name__}); the checkpoint cannot be verified") from exc
    return data


def verify_checkpoint(folder: Path) -> str | None:
    """Collective: check every file of a complete tag folder against its manifest.

    Sizes are compared first (cheap); the checksums are split across the ranks. A folder
    written before manifests existed is only checked for a readable ``client_state.json``.

    Returns:
        None when intact, else what is damaged, naming the file (the same on every rank).
    """
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except CheckpointError as exc:
        return str(exc)
    if manifest is None:
        try:
            json.loads((folder / "client_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{folder / 'client_state.json'} is unreadable ({type(exc).__name__})"
        return None
    problems = []
    for name, (size, _) in sorted(manifest["files"].items()):
        p = folder / name
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != size:
            problems.append(f"{p} has {p.stat().st_size} bytes, the manifest records {size} (truncated or overwritten)")
    if problems:
        return "; ".join(problems)
    got = _hash_share(folder, sorted(manifest["files"]), manifest["hash"])
    bad = [n for n in sorted(manifest["files"]) if got[n][1] != manifest["files"][n][1]]
    return "; ".join(f"{folder / n} does not match its {manifest['hash']} checksum" for n in bad) or None


# ----------------------------------------------------------------------------- saving

NO_SPACE = "No space left on device"


def _write_error(exc: BaseException, folder: Path) -> str:
    """One line for a failed checkpoint write; a full disk is named as such even when torch's
    stream writer hides ENOSPC behind ``basic_ios::clear: iostream error``."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in chain) or NO_SPACE in str(exc)
    if not full and "iostream error" in str(exc):
        try:
            full = shutil.disk_usage(folder if folder.exists() else folder.parent).free < (64 << 20)
        except OSError:
            pass
    return f"{NO_SPACE} ({exc})" if full else f"{type(exc).__name__}: {exc}"


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of a tag folder: its manifest's total, else the sizes of its files."""
    try:
        manifest = read_manifest(folder)
    except CheckpointError:
        manifest = None
    if manifest:
        return sum(size for size, _ in manifest["files"].values())
    return sum((Path(folder) / n).stat().st_size for n in _checkpoint_files(Path(folder)))


def _space_problem(ckpt_dir: Path, tag: str) -> str | None:
    """Rank 0: a message when the disk has less room than the last checkpoint took."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    need, free = checkpoint_bytes(tags[-1]), shutil.disk_usage(ckpt_dir).free
    if need <= free:
        return None
    return (f"{NO_SPACE} for checkpoint {tag}: the last one ({tags[-1].name}) took {need / 2**30:.2f} GiB but "
            f"only {free / 2**30:.2f} GiB are free under {ckpt_dir}; free space, lower checkpoint.keep_last or "
            f"move --output-dir, then continue with --resume ({tags[-1].name} stays latest)")


def _stop_if_failed(errors: list, ckpt_dir: Path, tag: str, rank: int) -> None:
    """After a gather of per-rank errors: on any, rank 0 removes the partial folders, every rank raises."""
    errors = [(r, e) for r, e in enumerate(errors) if e]
    if not errors:
        return
    if rank == 0:
        shutil.rmtree(ckpt_dir / (tag + ".tmp"), ignore_errors=True)
        if not (ckpt_dir / tag / "COMPLETE").is_file():
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    keep = latest_tag(ckpt_dir)
    r, e = errors[0]
    raise CheckpointError(f"saving checkpoint {tag} failed on rank {r}: {e}; removed the partial {tag}.tmp, "
                          f"{'latest stays ' + keep if keep else 'no complete checkpoint exists yet'}")


def _finish_on_rank0(ckpt_dir: Path, tag: str, hashes: dict, algo: str, extra: dict, keep_last: int) -> None:
    """Manifest (last file, atomic), rename to the final tag, ``COMPLETE``, ``latest``, pruning."""
    tmp, final = ckpt_dir / (tag + ".tmp"), ckpt_dir / tag
    manifest = {"format": 1, "tag": tag, "hash": algo, **extra, "files": hashes}
    _atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(final / "COMPLETE", "ok\n")
    _atomic_write(ckpt_dir / "latest", tag)
    if keep_last > 0:
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: ClientState | dict,
                    keep_last: int = 0, zero_stage: int | None = None) -> Path:
    """Collective: every rank must call it. Returns the final tag folder.

    ``client_state`` (a :class:`ClientState`, or any JSON-serialisable dict) is stored
    beside the DeepSpeed files and also passed to DeepSpeed's own ``client_state``.
    ``zero_stage`` is recorded in the manifest, so a resume can refuse another stage before
    loading anything.

    Raises:
        CheckpointError: on every rank, when the disk has less free space than the last
            checkpoint took, or when any rank's write failed ("No space left on device" for
            ENOSPC); the partial folder is removed and ``latest`` is unchanged.
    """
    if isinstance(client_state, ClientState):
        client_state = client_state.to_dict()
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for_step(step)
    final, tmp = ckpt_dir / tag, ckpt_dir / (tag + ".tmp")
    import torch

    from antlm_dist.distributed import world_info

    rank, world = world_info()
    if (final / "COMPLETE").is_file():
        return final  # this exact step is already saved and complete
    problem = None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        problem = _space_problem(ckpt_dir, tag)
    _stop_if_failed(_gather(problem), ckpt_dir, tag, rank)  # also the barrier before the first write
    error = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"antlm": client_state}, save_latest=False)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            (tmp / "client_state.json").write_text(json.dumps(client_state, indent=1))
    except (OSError, RuntimeError) as exc:
        error = _write_error(exc, tmp)
    _stop_if_failed(_gather(error), ckpt_dir, tag, rank)
    algo = _hash_name()
    hashes = _hash_share(tmp, _checkpoint_files(tmp), algo)  # each rank hashes a share of the files
    error = None
    if rank == 0:
        try:
            _finish_on_rank0(ckpt_dir, tag, hashes, algo, {"zero_stage": zero_stage, "world_size": world}, keep_last)
        except OSError as exc:
            error = _write_error(exc, tmp)
    _stop_if_failed(_gather(error), ckpt_dir, tag, rank)
    return final


def select_resume_tag(ckpt_dir: Path, requested: str | None = None) -> str:
    """Collective: the checkpoint to resume from, verified against its manifest.

    Without ``requested``: the newest complete tag that is intact; each damaged newer one
    is logged with the damaged file, and the next older one is tried.

    Args:
        requested: an explicit tag (``step00000120``) or tag folder; it must be intact.

    Raises:
        CheckpointError: the requested tag is absent, incomplete or damaged; or no complete
            checkpoint is intact (each problem listed, with the fix).
    """
    ckpt_dir = Path(ckpt_dir)
    if requested:
        tag = Path(requested).name
        if not (ckpt_dir / tag / "COMPLETE").is_file():
            have = ", ".join(p.name for p in complete_tags(ckpt_dir)) or "none"
            raise CheckpointError(f"--resume {requested}: no complete checkpoint {tag} under {ckpt_dir} "
                                  f"(complete: {have})")
        problem = verify_checkpoint(ckpt_dir / tag)
        if problem:
            raise CheckpointError(f"--resume {requested}: checkpoint {tag} is damaged: {problem}")
        return tag
    if pointer_problem(ckpt_dir):
        log.warning("%s", pointer_problem(ckpt_dir))
    damaged = []
    for folder in reversed(complete_tags(ckpt_dir)):
        problem = verify_checkpoint(folder)
        if problem is None:
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", folder.name)
            return folder.name
        log.warning("checkpoint %s is damaged: %s; trying the next older one", folder.name, problem)
        damaged.append(f"{folder.name}: {problem}")
    if not damaged:
        raise CheckpointError(f"--resume: {ckpt_dir} holds no complete checkpoint (the first save was interrupted?); "
                              "start again without --resume, or with --overwrite")
    raise CheckpointError(f"--resume: no intact checkpoint under {ckpt_dir} ({'; '.join(damaged)}); "
                          "start again with --overwrite")


def check_zero_stage(ckpt_dir: Path, tag: str, stage: int) -> None:
    """Refuse, before any load, a checkpoint written under another ZeRO stage.

    DeepSpeed's loaders assume the stage that wrote the files (a bare ``AssertionError``
    from its state-dict factory otherwise). Its universal format does not bridge stages
    either: a ZeRO-2 checkpoint converted with ``ds_to_universal`` and loaded under ZeRO-3
    fails the same way in DeepSpeed 0.19.8 (it looks for ZeRO-3 model-state files the
    conversion does not write). Checkpoints without a manifest record no stage and pass.

    Raises:
        CheckpointError: naming both stages and the fix.
    """
    manifest = read_manifest(Path(ckpt_dir) / tag)
    saved = manifest.get("zero_stage") if manifest else None
    if saved is not None and saved != stage:
        raise CheckpointError(
            f"checkpoint {tag} was written under ZeRO stage {saved} but this run uses ZeRO stage {stage}; a "
            f"ZeRO stage cannot change across a resume: resume with distributed.deepspeed_config=zero{saved}.json "
            f"(or a JSON with zero_optimization.stage={saved}), or export the weights (antlm-export) and start a new run"
        )


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
    from antlm_dist.distributed import barrier, world_info

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
    import torch

    from antlm_dist.distributed import world_info

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
    folder = Path(args.path) / "checkpoints" if (Path(args.path) / "checkpoints").is_dir() else Path(args.path)
    problem = pointer_problem(folder) if folder.is_dir() else None
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    try:
        ref = resolve_checkpoint(args.path)
    except CheckpointError as exc:
        print(f"no checkpoint: {exc}", file=sys.stderr)
        return 1
    print(ref.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
