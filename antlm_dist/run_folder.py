"""The output folder of one training run, and its policy.

Layout::

    <run>/recipe.yaml     the resolved recipe
    <run>/run.json        versions, world size, ZeRO stage, sizes (written at start)
    <run>/metrics.jsonl   one record per line (see antlm_dist.metrics)
    <run>/tokenizer/      the run's tokenizer
    <run>/checkpoints/    see antlm_dist.checkpoint
    <run>/hf/chck_<N>M/   Hugging Face exports at the words-seen milestones (antlm_dist.words)
    <run>/cache/          packed-block cache (unless data.cache_dir is set)
    <run>/summary.json    final figures, written when the schedule completes
    <run>/plots/          loss, held-out loss, LR and tokens/s PNGs (see antlm_dist.plots)
    <run>/tensorboard/    event files when logging.tensorboard is on; <run>/wandb/ likewise
    <run>/PREEMPTED       the step at which a preemption signal stopped the run
    <run>/run.lock        flock held by the running launch (antlm_dist.run_lock)

A folder that holds a run (any of :data:`RUN_MARKERS`) is only reused with ``--resume``
(continue it) or ``--overwrite`` (replace it); except a run stopped during its first
checkpoint save, which has nothing complete to lose, so a plain restart replaces it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from antlm_dist.checkpoint import complete_tags, remove_stale_partials
from antlm_dist.config import ConfigError

RUN_MARKERS = ("run.json", "metrics.jsonl", "checkpoints")
PREEMPT_EXIT_CODE = 75
"""Exit status of a rank (and of antlm-train and antlm-study) that stopped on a preemption
signal after checkpointing: EX_TEMPFAIL, "try again", the run continues with ``--resume``."""
PREEMPTED_MARKER = "PREEMPTED"
"""Written into the run folder beside exit status 75, because torchrun reports any failed
worker as exit status 1: launch/slurm/antlm.sbatch requeues when it finds this file.
Removed when the next run in the folder starts."""
_OVERWRITTEN = RUN_MARKERS + ("tokenizer", "summary.json", "recipe.yaml", "logs", "plots", "tensorboard", "wandb", "hf")


class RunFolder:
    """Owns ``path``: the checks before a run, its start-up files and its end markers.

    Only rank 0 writes; every method that writes is a no-op on other ranks, except
    :meth:`prepare`, which is collective (a barrier).
    """

    def __init__(self, path: Path | str, rank: int = 0):
        self.path = Path(path)
        self.rank = rank

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse to mix runs: a folder holding another run needs --resume or --overwrite.

        Raises:
            ConfigError: naming the folder and both options.
        """
        out = self.path
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; give one")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output-dir {out} is a file; give a folder")
        holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
        if holds_run and not (resume or overwrite) and not self.stopped_before_first_checkpoint():
            raise ConfigError(
                f"--output-dir {out} already holds a run; pass --resume to continue it, --overwrite to "
                "replace it, or choose another folder"
            )
        if resume and not self.checkpoints.is_dir():
            raise ConfigError(f"--resume: {self.checkpoints} does not exist; start without --resume")
        if resume and not complete_tags(self.checkpoints):
            raise ConfigError(
                f"--resume: {self.checkpoints} holds no complete checkpoint (the first save was interrupted); "
                "start again without --resume (nothing complete is lost), or with --overwrite"
            )

    def stopped_before_first_checkpoint(self) -> bool:
        """The run in this folder began a checkpoint save but completed none, and did not finish."""
        return (self.checkpoints.is_dir() and not complete_tags(self.checkpoints)
                and not (self.path / "summary.json").exists())

    def prepare(self, overwrite: bool) -> None:
        """Collective: with ``overwrite`` (or after a run stopped during its first save) delete the
        previous run's files, create the folder, drop a stale preemption marker and the partial
        folders of interrupted saves (rank 0), then wait for every rank."""
        from antlm_dist.distributed import barrier  # imported here: the launcher's checks need no torch

        replaced = _OVERWRITTEN
        if self.rank == 0 and self.path.exists() and not overwrite and self.stopped_before_first_checkpoint():
            # nothing complete to keep: start afresh instead of mixing two runs' metrics; keep logs/,
            # where a requeued SLURM job is writing already
            overwrite, replaced = True, tuple(m for m in _OVERWRITTEN if m != "logs")
        if self.rank == 0 and overwrite and self.path.exists():
            for m in replaced:
                target = self.path / m
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        if self.rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / PREEMPTED_MARKER).unlink(missing_ok=True)
            remove_stale_partials(self.checkpoints)  # folders of saves a kill interrupted
        barrier()

    def write_start(self, recipe_yaml: str, run_info: dict) -> None:
        """``recipe.yaml`` and ``run.json`` (rank 0)."""
        if self.rank == 0:
            (self.path / "recipe.yaml").write_text(recipe_yaml)
            (self.path / "run.json").write_text(json.dumps(run_info, indent=1))

    def write_summary(self, summary: dict) -> None:
        """``summary.json`` (rank 0)."""
        if self.rank == 0:
            (self.path / "summary.json").write_text(json.dumps(summary, indent=1))

    def mark_preempted(self, step: int) -> None:
        """``PREEMPTED`` holding ``step`` (rank 0); the sbatch script requeues on it."""
        if self.rank == 0:
            (self.path / PREEMPTED_MARKER).write_text(f"{step}\n")
