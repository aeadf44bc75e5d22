"""The objective schedule: which objective every optimizer step (and micro-batch) trains.

AntLM (Yu et al., "AntLM: Bridging Causal and Masked Language Models", BabyLM 2024)
alternates whole phases of causal (CLM) and masked (MLM) language modelling on one
backbone, written in epochs as ``4_CLM+16_MLM+4_CLM``. GPT-BERT (Charpentier & Samuel,
"GPT or BERT: why not both?", BabyLM 2024) mixes the objectives inside every step instead.
One notation covers both (terms joined by ``+``):

* ``N_OBJ``: N epochs of one objective, ``OBJ`` one of ``CLM``, ``MLM``, ``MNTP``;
* ``N_A:B=a:b``: N epochs in which the micro-batches are split between objectives A and
  B in the integer ratio a:b (lowest terms; two or more objectives), e.g.
  ``24_CLM:MNTP=1:15`` is GPT-BERT's mix and ``2_CLM+10_CLM:MLM:MNTP=1:2:1`` is valid too;
* an optional mask-rate suffix on a term with a masked objective: ``@0.2`` (constant) or
  ``@0.30..0.15`` (linear from the first to the last step of the phase). Without it a
  phase uses ``objective.mlm_probability``, or the run-long line to
  ``objective.mask_rate_end`` when that is set (:func:`mask_rate_at`).

Objectives (labels aligned to positions, see :mod:`antlm_dist.data.collators`): CLM is
causal, ``labels[t] = input_ids[t+1]``; MLM is bidirectional, the original token at a
selected t; MNTP (masked next-token prediction, GPT-BERT) is bidirectional with the
original token at t+1 on position t when t+1 was selected.

The phase is a pure function of the global optimizer step, and in a mixed phase the
objective of a micro-batch is a pure function of (step, global micro-batch index)
(:func:`objective_for_micro_batch`), so every rank computes both without communication;
ranks only *check* that they agree (:func:`check_phase_agreement`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

OBJECTIVES = ("CLM", "MLM", "MNTP")
MASKED_OBJECTIVES = ("MLM", "MNTP")
EXAMPLE = "4_CLM+16_MLM+4_CLM, 24_CLM:MNTP=1:15 or 4_CLM+20_MLM@0.30..0.15"
_NUMBER = r"\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"
_TERM = re.compile(r"^\s*(\d+)\s*_\s*([A-Za-z:]+)\s*(?:=\s*([\d:\s]+?))?\s*(?:@\s*(" + _NUMBER
                   + r")\s*(?:\.\.\s*(" + _NUMBER + r"))?)?\s*$")


class ScheduleError(ValueError):
    """``objective.schedule`` is malformed."""


class PhaseDesyncError(RuntimeError):
    """Ranks disagree about the phase of the current step."""


@dataclass(frozen=True)
class Phase:
    """One schedule term: ``epochs`` whole epochs of ``objective``.

    ``objective`` is ``CLM``, ``MLM`` or ``MNTP`` for a pure phase, or the mix's text
    (``CLM:MNTP=1:15``) for a mixed one, whose ``mix`` lists (objective, ratio weight)
    pairs. ``mask_rate`` is the phase's own (start, end) selection rate, or None.
    """

    objective: str
    epochs: int
    mix: tuple[tuple[str, int], ...] = ()
    mask_rate: tuple[float, float] | None = None

    @property
    def objectives(self) -> tuple[str, ...]:
        """The objectives the phase trains, in the order written."""
        return tuple(o for o, _ in self.mix) if self.mix else (self.objective,)


@dataclass(frozen=True)
class PhaseAt:
    """Where a global step falls: ``index`` into the schedule, its objective and epoch."""

    index: int
    objective: str
    epoch: int
    step_in_epoch: int
    phase_start_step: int
    phase_end_step: int  # exclusive
    mix: tuple[tuple[str, int], ...] = ()

    @property
    def causal(self) -> bool:
        """The attention mask of a pure phase: causal for CLM, bidirectional for MLM and MNTP.
        A mixed phase picks the mask per micro-batch (:func:`is_causal`)."""
        return is_causal(self.objective)


def is_causal(objective: str) -> bool:
    """True for CLM (causal mask), False for MLM and MNTP (bidirectional)."""
    return objective == "CLM"


def _refuse(term: str, why: str) -> ScheduleError:
    return ScheduleError(f"objective.schedule term {term.strip()!r}: {why}; valid schedules look like {EXAMPLE}")


def _objective(name: str, term: str) -> str:
    obj = name.strip().upper()
    if obj not in OBJECTIVES:
        raise _refuse(term, f"objective {name.strip()!r} is not one of {', '.join(OBJECTIVES)}")
    return obj


def _parse_mix(names: str, ratio: str, term: str) -> tuple[tuple[str, int], ...]:
    """``"CLM:MNTP"``, ``"1:15"`` -> (("CLM", 1), ("MNTP", 15)), checked."""
    objs = [_objective(n, term) for n in names.split(":")]
    if len(objs) < 2:
        raise _refuse(term, "a mixed phase names two or more objectives, e.g. 10_CLM:MNTP=1:15")
    if len(set(objs)) != len(objs):
        raise _refuse(term, "an objective appears twice in the mix")
    parts = [p.strip() for p in ratio.split(":")]
    if len(parts) != len(objs) or not all(p.isdigit() for p in parts):
        raise _refuse(term, f"the ratio needs one whole number per objective ({len(objs)}), e.g. 10_CLM:MNTP=1:15")
    weights = [int(p) for p in parts]
    if min(weights) < 1:
        raise _refuse(term, "every ratio weight must be at least 1")
    g = math.gcd(*weights)
    if g > 1:
        lowest = ":".join(str(w // g) for w in weights)
        raise _refuse(term, f"write the ratio in lowest terms ({lowest}); the realised ratio is exact over "
                            "every window of sum-of-weights micro-batches")
    return tuple(zip(objs, weights))


def _parse_rate(start: str | None, end: str | None, objectives: tuple[str, ...], term: str):
    if start is None:
        return None
    if not set(objectives) & set(MASKED_OBJECTIVES):
        raise _refuse(term, "a mask rate (@...) needs a masked objective (MLM or MNTP) in the term")
    rate = (float(start), float(end if end is not None else start))
    if not all(0.0 < r < 1.0 for r in rate):
        raise _refuse(term, "a mask rate must lie in (0, 1), e.g. @0.15 or @0.30..0.15")
    return rate


def parse_term(term: str) -> Phase:
    """One term of the notation (see the module docstring), e.g. ``"24_CLM:MNTP=1:15@0.3..0.15"``.

    Raises:
        ScheduleError: naming the term, what is wrong and showing a valid schedule.
    """
    m = _TERM.match(term)
    if not m:
        raise _refuse(term, "malformed; a term is <epochs>_<objective>, <epochs>_<A:B>=<a:b>, optionally "
                            "followed by @<rate> or @<start>..<end>")
    epochs, names, ratio, r0, r1 = m.groups()
    if int(epochs) <= 0:
        raise _refuse(term, "a phase needs at least 1 epoch")
    if ratio is None and ":" in names:
        raise _refuse(term, "a mixed phase needs its ratio, e.g. 10_CLM:MNTP=1:15")
    if ratio is not None:
        mix = _parse_mix(names, ratio, term)
        objective = ":".join(o for o, _ in mix) + "=" + ":".join(str(w) for _, w in mix)
    else:
        mix, objective = (), _objective(names, term)
    return Phase(objective, int(epochs), mix, _parse_rate(r0, r1, Phase(objective, 1, mix).objectives, term))


def parse_schedule(text: str) -> list[Phase]:
    """Parse a schedule, e.g. ``"4_CLM+16_MLM+4_CLM"``, ``"24_CLM"`` or ``"24_CLM:MNTP=1:15"``.

    A bare ``CLM`` is not accepted: every term needs a whole, positive number of epochs.

    Raises:
        ScheduleError: naming the bad term and showing a valid example.
    """
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError(f"objective.schedule is empty; write it like {EXAMPLE}")
    return [parse_term(term) for term in text.split("+")]


def format_term(p: Phase) -> str:
    """Inverse of :func:`parse_term` (canonical spelling: upper case, no spaces)."""
    rate = ""
    if p.mask_rate is not None:
        start, end = p.mask_rate
        rate = f"@{start!r}" if start == end else f"@{start!r}..{end!r}"
    return f"{p.epochs}_{p.objective}{rate}"


def format_schedule(phases: list[Phase]) -> str:
    """Inverse of :func:`parse_schedule`."""
    return "+".join(format_term(p) for p in phases)


def schedule_objectives(phases: list[Phase]) -> tuple[str, ...]:
    """Every objective the schedule trains, in :data:`OBJECTIVES` order."""
    used = {o for p in phases for o in p.objectives}
    return tuple(o for o in OBJECTIVES if o in used)


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
                phase_end_step=(start_epoch + phase.epochs) * steps_per_epoch, mix=phase.mix,
            )
        start_epoch += phase.epochs
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- mixed phases

@lru_cache(maxsize=64)
def mix_pattern(mix: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """The objective of each of the R = Σ weights slots of one period of a mix.

    Smooth weighted round robin: at each slot every objective gains its weight, the one
    with the largest credit (first written on ties) takes the slot and pays R. Each
    objective gets exactly its weight of slots per period, spread as evenly as the ratio
    allows (1:1 alternates; 1:15 puts the one CLM slot in the middle of the 16).
    """
    total = sum(w for _, w in mix)
    credit = [0] * len(mix)
    out = []
    for _ in range(total):
        credit = [c + w for c, (_, w) in zip(credit, mix)]
        best = max(range(len(mix)), key=lambda i: (credit[i], -i))
        credit[best] -= total
        out.append(mix[best][0])
    return tuple(out)


def objective_for_micro_batch(phase: PhaseAt, step: int, global_index: int, micro_batches_per_step: int) -> str:
    """The objective of global micro-batch ``global_index`` of optimizer ``step``.

    Global micro-batches of a step are numbered ``m × world + rank`` for accumulation step
    m (the sampler's layout), M = world × accumulation of them per step. Counting them from
    the start of the phase, c = (step - phase start) × M + global_index, the objective is
    slot ``c mod R`` of :func:`mix_pattern`. Pure in its arguments, so every rank and every
    resumed run computes the same assignment; the pattern has period R, so every R
    consecutive micro-batches of a phase (e.g. 16 for 1:15) hold exactly the requested
    ratio, whatever the world size and accumulation. A pure phase returns its objective.

    Raises:
        ValueError: ``global_index`` outside [0, M).
    """
    if not 0 <= global_index < micro_batches_per_step:
        raise ValueError(f"global micro-batch index {global_index} outside [0, {micro_batches_per_step})")
    if not phase.mix:
        return phase.objective
    pattern = mix_pattern(phase.mix)
    count = (step - phase.phase_start_step) * micro_batches_per_step + global_index
    return pattern[count % len(pattern)]


def step_assignment(phase: PhaseAt, step: int, micro_batches_per_step: int) -> tuple[str, ...]:
    """The objectives of all M global micro-batches of ``step`` (index ``m × world + rank``)."""
    return tuple(objective_for_micro_batch(phase, step, j, micro_batches_per_step)
                 for j in range(micro_batches_per_step))


def mask_rate_at(step: int, phases: list[Phase], steps_per_epoch: int, default: float,
                 run_end: float | None = None) -> float:
    """The masking (selection) rate of optimizer ``step``: a fraction in (0, 1).

    A phase with its own ``@start..end`` goes linearly from start at its first step to end
    at its last; otherwise, with ``run_end`` set, the rate goes linearly from ``default``
    at step 0 to ``run_end`` at the last step of the run (GPT-BERT: 0.30 -> 0.15);
    otherwise it is ``default`` (``objective.mlm_probability``).

    Raises:
        ValueError: ``step < 0`` or ``steps_per_epoch < 1`` (from :func:`phase_for_step`).
    """
    at = phase_for_step(step, phases, steps_per_epoch)
    own = phases[at.index].mask_rate
    if own is not None:
        (start, end), first, last = own, at.phase_start_step, at.phase_end_step - 1
    elif run_end is not None:
        start, end, first, last = default, run_end, 0, total_steps(phases, steps_per_epoch) - 1
    else:
        return default
    frac = min(max(step - first, 0) / max(last - first, 1), 1.0)
    return start + (end - start) * frac


def assignment_code(assignment: tuple[str, ...]) -> int:
    """A small integer fingerprint of a step's assignment, for the agreement check."""
    code = 0
    for obj in assignment:
        code = (code * 4 + OBJECTIVES.index(obj) + 1) % 1_000_000_007
    return code


def check_phase_agreement(phase: PhaseAt, phases: list[Phase], step: int, group=None, *,
                          local_index: int | None = None, assignment: tuple[str, ...] = ()) -> None:
    """All-rank check that every rank trains the same phase at ``step``.

    ``local_index`` is the phase index this rank believes (default ``phase.index``); the
    trainer's ``debug.fault_phase_rank`` passes a wrong one to test this check.
    ``assignment`` is this rank's objective for every global micro-batch of ``step`` (a
    mixed phase, :func:`step_assignment`); its :func:`assignment_code` is compared too.

    One all-reduce of a 4-vector (``-index``, ``index``, ``-code``, ``code``) with MAX gives
    min and max of the phase index and of the assignment code over ranks. When they differ,
    every rank gathers the per-rank indices and raises, so the whole job stops with the same
    message.

    Raises:
        PhaseDesyncError: naming the ranks and their phases.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    idx = phase.index if local_index is None else local_index
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    code = assignment_code(assignment)
    t = torch.tensor([-idx, idx, -code, code], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    lo, hi = -int(t[0]), int(t[1])
    if lo == hi and -int(t[2]) == int(t[3]):
        return
    if lo == hi:
        raise PhaseDesyncError(
            f"objective assignment desync at step {step} of phase {lo} ({phases[lo].objective}): ranks disagree "
            f"on the objectives of the step's micro-batches (this rank: {','.join(assignment)}). Every rank "
            "must use the same world size, gradient accumulation and schedule.")
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
