"""What a study runs: schedules × seeds of one recipe, validated before anything starts.

Every run of a study gets the same recipe and overrides; only ``objective.schedule`` and
``train.seed`` differ. With equal total epochs the runs also share the number of
optimizer steps and so the learning-rate schedule (warm-up and cosine decay are in steps),
which is the comparison the AntLM paper makes (Yu et al., BabyLM 2024, Table 1).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from antlm_dist.config import load_recipe, parse_overrides
from antlm_dist.schedule import format_schedule, parse_schedule, total_epochs

PLAN_FILE = "study_plan.json"


class StudyError(ValueError):
    """A study's arguments are invalid, or ``--out`` holds a study with other settings."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: a schedule (normalised, e.g. ``1_CLM+4_MLM+1_CLM``) and a seed."""

    schedule: str
    seed: int

    @property
    def key(self) -> str:
        """Folder of the run inside ``--out``: ``<schedule>/seed<k>``."""
        return f"{self.schedule}/seed{self.seed}"


@dataclass
class StudyPlan:
    """The shared settings of a study and its runs.

    ``config`` is a recipe name or path; ``overrides`` are dotted ``section.key=value``
    strings given to every run (the study adds ``objective.schedule``, ``train.seed`` and,
    unless given, ``data.cache_dir``). BLiMP is scored from ``blimp`` (a folder of
    ``*.jsonl``; ``None`` skips BLiMP) with ``blimp_limit`` pairs per file for CLM scoring
    and ``pll_limit`` for PLL scoring (``None``: all).
    """

    config: str
    overrides: list[str]
    schedules: list[str]
    seeds: list[int]
    blimp: str | None
    blimp_limit: int | None = None
    pll_limit: int | None = None
    blimp_prefix: str = "eos"
    blimp_batch_size: int = 256
    nproc_per_node: int | None = None
    runs: list[RunSpec] = field(init=False)

    def __post_init__(self) -> None:
        # seed-major: a study stopped part-way has every schedule at the first seeds
        self.runs = [RunSpec(s, k) for k in self.seeds for s in self.schedules]

    def shared_settings(self) -> dict:
        """What must not change between a study and its rerun (schedules and seeds may)."""
        d = asdict(self)
        for k in ("schedules", "seeds", "runs", "nproc_per_node"):
            d.pop(k)
        return d

    def run_overrides(self, run: RunSpec, cache_dir: Path) -> list[str]:
        """The overrides antlm-train gets for ``run``: the study's, then schedule and seed."""
        extra = [] if any(key == "data.cache_dir" for key, _ in parse_overrides(self.overrides)) \
            else [f"data.cache_dir={cache_dir}"]
        return [*self.overrides, *extra, f"objective.schedule={run.schedule}", f"train.seed={run.seed}"]


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,2,3"`` → [1, 2, 3] (no duplicates, each ≥ 0).

    Raises:
        StudyError: naming ``what`` (e.g. ``--seeds``) and showing a valid example.
    """
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StudyError(f"{what} {text!r}: give comma-separated integers, e.g. {what} 1,2") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise StudyError(f"{what} {text!r}: give distinct integers >= 0, e.g. {what} 1,2")
    return values


def default_schedules(recipe_schedule: str) -> list[str]:
    """The recipe's schedule and the two single-objective baselines with its epochs."""
    phases = parse_schedule(recipe_schedule)
    epochs = total_epochs(phases)
    return list(dict.fromkeys([format_schedule(phases), f"{epochs}_CLM", f"{epochs}_MLM"]))


def normalise_schedules(text: str | None, recipe_schedule: str, allow_unequal_epochs: bool) -> list[str]:
    """Parse ``--schedules`` (comma-separated, paper notation) and check equal epochs.

    Args:
        text: e.g. ``"1_CLM+4_MLM+1_CLM,6_CLM,6_MLM"``; ``None`` means
            :func:`default_schedules` of the recipe.
        allow_unequal_epochs: accept schedules whose total epochs differ.

    Raises:
        StudyError: an empty or duplicated schedule, a malformed one (the parser's message),
            or unequal total epochs (listing each schedule's epochs).
    """
    if text is None:
        return default_schedules(recipe_schedule)
    items = [s.strip() for s in text.split(",")]
    if not items or any(not s for s in items):
        raise StudyError(f"--schedules {text!r}: give comma-separated schedules, e.g. "
                         "--schedules 1_CLM+4_MLM+1_CLM,6_CLM,6_MLM")
    try:
        phases = [parse_schedule(s) for s in items]
    except ValueError as exc:
        raise StudyError(f"--schedules: {exc}") from None
    names = [format_schedule(p) for p in phases]
    if len(set(names)) != len(names):
        raise StudyError(f"--schedules {text!r} lists a schedule twice")
    epochs = {n: total_epochs(p) for n, p in zip(names, phases)}
    if len(set(epochs.values())) > 1 and not allow_unequal_epochs:
        listed = ", ".join(f"{n} = {e}" for n, e in epochs.items())
        raise StudyError(
            f"--schedules: total epochs differ ({listed}); a fair comparison trains every schedule for the "
            "same number of epochs (and so the same learning-rate schedule). Make them equal, or pass "
            "--allow-unequal-epochs")
    return names


def check_plan(plan: StudyPlan) -> None:
    """Validate every run's recipe (the trainer's own checks) and the BLiMP folder, so
    that nothing is trained when any part of the study is invalid.

    Raises:
        ConfigError, StudyError, BlimpFormatError: the first problem found.
    """
    for run in plan.runs:
        load_recipe(plan.config, plan.run_overrides(run, Path("cache")))
    if plan.blimp is not None:
        from antlm_dist.eval.blimp import read_blimp

        read_blimp(plan.blimp, 1)  # one pair per file: the folder exists and parses


def write_or_check_plan(plan: StudyPlan, out: Path) -> None:
    """Record the shared settings in ``<out>/study_plan.json``, or check them on a rerun.

    Raises:
        StudyError: ``out`` holds a study whose shared settings differ (names the keys).
    """
    path = out / PLAN_FILE
    now = plan.shared_settings()
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            raise StudyError(
                f"--out {out} holds a study with other settings ({', '.join(changed)} differ: "
                + "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
                + "); use another --out, or pass --overwrite to start again")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(now, indent=1))
    tmp.replace(path)
