"""The AntLM phase schedule: which objective every optimizer step trains.

AntLM (Yu et al., "AntLM: Bridging Causal and Masked Language Models", BabyLM 2024)
alternates whole phases of causal (CLM) and masked (MLM) language modelling on one
backbone, written in epochs as ``4_CLM+16_MLM+4_CLM``. The phase is a pure function of
the global optimizer step, so every rank computes it without communication; ranks only
*check* that they agree (:func:`check_phase_agreement`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

OBJECTIVES = ("CLM", "MLM")
_TERM = re.compile(r"^\s*(\d+)\s*_\s*([A-Za-z]+)\s*$")


class ScheduleError(ValueError):
    """``objective.schedule`` is malformed."""


class PhaseDesyncError(RuntimeError):
    """Ranks disagree about the phase of the current step."""


@dataclass(frozen=True)
class Phase:
    """One schedule term: ``epochs`` whole epochs of ``objective`` ("CLM" or "MLM")."""

    objective: str
    epochs: int


@dataclass(frozen=True)
class PhaseAt:
    """Where a global step falls: ``index`` into the schedule, its objective and epoch."""

    index: int
    objective: str
    epoch: int
    step_in_epoch: int
    phase_start_step: int
    phase_end_step: int  # exclusive

    @property
    def causal(self) -> bool:
        """The attention mask of the phase: causal for CLM, bidirectional for MLM."""
        return self.objective == "CLM"


def parse_schedule(text: str) -> list[Phase]:
    """Parse the paper's notation, e.g. ``"4_CLM+16_MLM+4_CLM"``; also ``"24_CLM"``.

    A bare ``CLM`` or ``MLM`` is not accepted: every term needs a whole, positive number
    of epochs.

    Raises:
        ScheduleError: naming the bad term and showing a valid example.
    """
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError("objective.schedule is empty; write it like 4_CLM+16_MLM+4_CLM")
    phases = []
    for term in text.split("+"):
        m = _TERM.match(term)
        if not m:
            raise ScheduleError(
                f"objective.schedule term {term.strip()!r} is malformed; each term is "
                f"<epochs>_<CLM|MLM>, e.g. 4_CLM+16_MLM+4_CLM"
            )
        epochs, objective = int(m.group(1)), m.group(2).upper()
        if objective not in OBJECTIVES:
            raise ScheduleError(
                f"objective.schedule term {term.strip()!r}: objective {m.group(2)!r} is not CLM or MLM"
            )
        if epochs <= 0:
            raise ScheduleError(
                f"objective.schedule term {term.strip()!r}: a phase needs at least 1 epoch"
            )
        phases.append(Phase(objective, epochs))
    return phases


def format_schedule(phases: list[Phase]) -> str:
    """Inverse of :func:`parse_schedule`."""
    return "+".join(f"{p.epochs}_{p.objective}" for p in phases)


def total_epochs(phases: list[Phase]) -> int:
    return sum(p.epochs for p in phases)


def total_steps(phases: list[Phase], steps_per_epoch: int) -> int:
    """Optimizer steps of the whole schedule."""
    return total_epochs(phases) * steps_per_epoch


def phase_for_step(step: int, phases: list[Phase], steps_per_epoch: int) -> PhaseAt:
    """The phase that global optimizer step ``step`` (0-based) trains.

    Pure function of its arguments. Steps past the end map to the last phase.

    Raises:
        ValueError: ``step < 0`` or ``steps_per_epoch < 1``.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    epoch = step // steps_per_epoch
    start_epoch = 0
    for i, phase in enumerate(phases):
        if epoch < start_epoch + phase.epochs or i == len(phases) - 1:
            return PhaseAt(
                index=i, objective=phase.objective, epoch=epoch,
                step_in_epoch=step - epoch * steps_per_epoch,
                phase_start_step=start_epoch * steps_per_epoch,
                phase_end_step=(start_epoch + phase.epochs) * steps_per_epoch,
            )
        start_epoch += phase.epochs
    raise AssertionError("unreachable")


def check_phase_agreement(phase: PhaseAt, phases: list[Phase], step: int, group=None, *,
                          local_index: int | None = None) -> None:
    """All-rank check that every rank trains the same phase at ``step``.

    ``local_index`` is the phase index this rank believes (default ``phase.index``); the
    trainer's ``debug.fault_phase_rank`` passes a wrong one to test this check.

    One all-reduce of a 2-vector (``-index``, ``index``) with MAX gives min and max of the
    phase index over ranks. When they differ, every rank gathers the per-rank indices and
    raises, so the whole job stops with the same message.

    Raises:
        PhaseDesyncError: naming the ranks and their phases.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    idx = phase.index if local_index is None else local_index
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor([-idx, idx], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    lo, hi = -int(t[0]), int(t[1])
    if lo == hi:
        return
    world = dist.get_world_size(group)
    gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([idx], dtype=torch.int64, device=device), group=group)

    def describe(i: int) -> str:
        if 0 <= i < len(phases):
            return f"phase {i} ({phases[i].objective})"
        return f"phase {i} (outside the schedule)"

    per_rank = ", ".join(f"rank {r}: {describe(int(g))}" for r, g in enumerate(gathered))
    raise PhaseDesyncError(
        f"phase desync at step {step}: ranks disagree between {describe(lo)} and {describe(hi)} "
        f"[{per_rank}]. Every rank must run schedule {format_schedule(phases)!r} with the same "
        "steps per epoch; check that all ranks use the same recipe, corpus and checkpoint."
    )
