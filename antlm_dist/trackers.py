"""Experiment trackers: TensorBoard and Weights & Biases, fed by the records of metrics.jsonl.

Rank 0's :class:`~antlm_dist.metrics.MetricsWriter` hands every record it writes to the
trackers of :func:`build_trackers`, so the trackers see exactly the numbers in
metrics.jsonl, under names from :func:`scalars_of`:

- ``train`` records: ``train/<field>`` for every numeric field except ``step``, ``epoch`` and
  ``time`` (``loss``, ``accuracy``, ``lr``, ``tokens_per_s``, ``mfu``, ``grad_norm``,
  ``words_seen`` when present, every ``loss_<objective>``...), plus ``train/loss_<phase>``
  (e.g. ``train/loss_clm``) when the record carries no ``loss_<objective>`` field itself;
- ``eval`` records: ``eval/<field>`` (``eval/clm_loss``, ``eval/mlm_accuracy``...).

The x axis is the optimizer step. The libraries are imported only when a tracker is on;
:func:`check_trackers` names the missing package in preflight, before any rank starts.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

from antlm_dist.config import ConfigError, LoggingConfig

log = logging.getLogger("antlm_dist")

_SKIPPED_FIELDS = {"step", "epoch", "time"}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def scalars_of(kind: str, record: dict) -> dict[str, float]:
    """The tracker scalars of one metrics record (``{}`` for kinds other than train/eval).

    Args:
        kind: the record's ``type``.
        record: its fields; non-numeric and non-finite values are left out.
    """
    if kind not in ("train", "eval"):
        return {}
    out = {}
    for key, value in record.items():
        if key in _SKIPPED_FIELDS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    phase = record.get("phase")
    if kind == "train" and phase and "train/loss" in out and not any(k.startswith("loss_") for k in record):
        out[f"train/loss_{str(phase).lower()}"] = out["train/loss"]
    return out


def check_trackers(cfg: LoggingConfig) -> None:
    """Fail early when a tracker is on but its package is not installed.

    Raises:
        ConfigError: naming the recipe key and the install command.
    """
    wanted = [("logging.tensorboard=true", "tensorboard")] if cfg.tensorboard else []
    if cfg.wandb is not None:
        wanted.append(("logging.wandb", "wandb"))
    for key, package in wanted:
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{key} needs the {package} package, which is not installed; "
                              f"run  pip install 'antlm-dist[trackers]'  (or pip install {package}), or turn it off")


class TensorBoardTracker:
    """Scalars into ``<folder>/events.out.tfevents.*`` through ``torch.utils.tensorboard``."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def record(self, kind: str, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        if kind == "eval":
            self.writer.flush()  # evaluations are rare and worth seeing at once

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (offline by default: ``<run>/wandb/offline-run-*``, upload with ``wandb sync``)."""

    def __init__(self, folder: Path, cfg, name: str, config: dict):
        import wandb

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or name, mode=cfg.mode,
                              dir=str(folder), config=config)

    def record(self, kind: str, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of one run, fed one metrics record at a time (rank 0 only)."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def __call__(self, kind: str, record: dict) -> None:
        scalars = scalars_of(kind, record)
        if scalars and isinstance(record.get("step"), int):
            for tracker in self.trackers:
                tracker.record(kind, record["step"], scalars)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def build_trackers(cfg: LoggingConfig, run_dir: Path, name: str, config: dict) -> Trackers:
    """The trackers the recipe turns on: TensorBoard in ``run_dir/tensorboard``, W&B in
    ``run_dir/wandb``; ``config`` (the resolved recipe) is stored with the W&B run.

    Raises:
        ConfigError: see :func:`check_trackers`.
    """
    check_trackers(cfg)
    trackers = []
    if cfg.tensorboard:
        trackers.append(TensorBoardTracker(Path(run_dir) / "tensorboard"))
    if cfg.wandb is not None:
        (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)
        trackers.append(WandbTracker(Path(run_dir), cfg.wandb, name, config))
    if trackers:
        log.info("trackers: %s", ", ".join(type(t).__name__.removesuffix("Tracker") for t in trackers))
    return Trackers(trackers)
