"""Objective mixing inside one optimizer step: collation by assignment, and the mixed loss.

In a mixed phase (e.g. ``24_CLM:MNTP=1:15``, GPT-BERT's mix; Charpentier & Samuel,
BabyLM 2024) the M = world × accumulation global micro-batches of a step get their
objectives from :func:`antlm_dist.schedule.objective_for_micro_batch`. Each rank collates
its own micro-batches with the collator of their objective (:func:`collate_step`), and
:func:`mixed_batch_step` trains them.

The mixed loss of one step (objectives k; S_k the summed cross-entropy in nats over the
targets of objective k in the whole global batch, all ranks and all accumulation steps;
N_k their count; M_k the global micro-batches of objective k)::

    L = Σ_k w_k · S_k / N_k,    w_k = M_k / M

w_k equals the ratio share a_k / Σ a whenever Σ a divides M (GPT-BERT's 16 ranks for
1:15), and it is what GPT-BERT's average of per-rank means gives: every micro-batch
weighs 1/M, and inside an objective every target weighs the same. With fewer micro-batches
per step than the ratio needs, the shares hold over every Σ a consecutive micro-batches
(:mod:`antlm_dist.schedule`). A step of one objective reduces to S / N, the pure phases'
normalisation (:func:`antlm_dist.trainer.global_batch_step`).
"""
from __future__ import annotations

import torch

from antlm_dist.distributed import all_reduce_sum, world_info
from antlm_dist.schedule import MASKED_OBJECTIVES, is_causal, objective_for_micro_batch


def collators_for(clm, mlm) -> dict:
    """``{"CLM", "MLM", "MNTP"}`` collators: MNTP is the MLM collator (token or span
    masking) with ``next_position`` targets (the label at t is the original token at t+1
    where t+1 was selected)."""
    return {"CLM": clm, "MLM": mlm, "MNTP": mlm.variant(mlm_target="next_position")}


def collate_step(blocks, sampler, collators: dict, phase, step: int, mask_rate: float | None = None) -> list:
    """This rank's micro-batches of optimizer ``step``.

    Args:
        blocks: training blocks; ``blocks[ids]`` is an int64 (B, T) tensor.
        sampler: :class:`~antlm_dist.data.sampler.DistributedResumableSampler`.
        collators: ``{objective: collator}`` (:func:`collators_for`).
        phase: :class:`~antlm_dist.schedule.PhaseAt` of ``step``.
        mask_rate: the step's selection rate for masked objectives (fraction in (0, 1)), or
            None for the collators' own (``objective.mlm_probability``).

    Returns:
        A pure phase: a list of :class:`~antlm_dist.data.collators.Batch`, one per
        accumulation step. A mixed phase: a list of ``(objective, Batch)`` pairs; micro-batch
        m of rank r is global micro-batch ``m × world + r``.
    """
    def collator(objective):
        c = collators[objective]
        return c.variant(mlm_probability=mask_rate) if mask_rate is not None and objective in MASKED_OBJECTIVES else c

    ids_per_micro = sampler.micro_batches(step)
    if not phase.mix:
        c = collator(phase.objective)
        return [c(blocks[ids], ids, phase.epoch) for ids in ids_per_micro]
    world, n_micro = sampler.world_size, sampler.world_size * len(ids_per_micro)
    objectives = [objective_for_micro_batch(phase, step, m * world + sampler.rank, n_micro)
                  for m in range(len(ids_per_micro))]
    chosen = {o: collator(o) for o in set(objectives)}
    return [(o, chosen[o](blocks[ids], ids, phase.epoch)) for o, ids in zip(objectives, ids_per_micro)]


def mixed_batch_step(engine, micro_batches, *, objectives: tuple[str, ...], device, extra=()) -> tuple:
    """Forward/backward every micro-batch of one mixed optimizer step, then step the engine.

    Applies the gradient of L = Σ_k (M_k / M) · S_k / N_k (module docstring). One all-reduce
    before the first backward gives N_k and M_k; a micro-batch of objective k then has its
    summed loss scaled by M_k / N_k, and DeepSpeed's mean over M = world × accumulation
    micro-batches makes the sum exact.

    Args:
        engine: DeepSpeed engine whose module returns a ``LossOutput``.
        micro_batches: this rank's ``(objective, Batch)`` pairs (:func:`collate_step`), as
            many as the engine's ``gradient_accumulation_steps``.
        objectives: the phase's objectives (fixes the order of the per-objective sums).
        extra: further numbers to sum over ranks in the closing all-reduce, or a callable
            returning them, called after the last micro-batch, just before that all-reduce.

    Returns:
        ``({objective: {"loss_sum": nats, "targets": N_k, "correct": top-1 hits,
        "weight": M_k / M}}, *summed extras)``, all global.

    Raises:
        ValueError: the number of micro-batches differs from the accumulation steps, or a
            micro-batch's objective is not one of ``objectives``.
    """
    _, world = world_info()
    gas = engine.gradient_accumulation_steps()
    if len(micro_batches) != gas:
        raise ValueError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps={gas}")
    k_of = {o: i for i, o in enumerate(objectives)}
    unknown = [o for o, _ in micro_batches if o not in k_of]
    if unknown:
        raise ValueError(f"micro-batch objective {unknown[0]!r} is not one of the phase's {objectives}")
    local = [0.0] * (2 * len(objectives))  # (targets per objective, micro-batches per objective)
    for o, b in micro_batches:
        local[k_of[o]] += b.num_targets
        local[len(objectives) + k_of[o]] += 1
    reduced = all_reduce_sum(local, device)
    n_k, m_k = reduced[:len(objectives)], reduced[len(objectives):]
    sums = torch.zeros(len(objectives), 2, dtype=torch.float64, device=device)  # (loss, hits), read once
    for o, batch in micro_batches:
        k = k_of[o]
        batch = batch.to(device)
        res = engine(batch.input_ids, batch.attention_mask, batch.labels, causal=is_causal(o),
                     segment_ids=batch.segment_ids)
        engine.backward(res.loss_sum * (m_k[k] / max(n_k[k], 1.0)))
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        sums[k, 0] += res.loss_sum.detach().double()
        sums[k, 1] += res.n_correct.double()
    extra = extra() if callable(extra) else extra  # read after the compute: a signal during it counts
    totals = all_reduce_sum([*sums.flatten().tolist(), *extra], device)
    per = {o: {"loss_sum": totals[2 * k], "targets": n_k[k], "correct": totals[2 * k + 1],
               "weight": m_k[k] / (world * gas)} for o, k in k_of.items()}
    return (per, *totals[2 * len(objectives):])


def mixed_loss(per_objective: dict) -> float:
    """L = Σ_k w_k · S_k / N_k of :func:`mixed_batch_step`'s sums (objectives without
    targets contribute nothing)."""
    return sum(v["weight"] * v["loss_sum"] / v["targets"] for v in per_objective.values() if v["targets"])


def objective_fields(per_objective: dict) -> dict:
    """Step-record fields ``<obj>_loss`` (nats per target), ``<obj>_targets`` and
    ``<obj>_accuracy`` (top-1 fraction), NaN-free: an objective without targets in the
    step gets None for its loss and accuracy."""
    out = {}
    for o, v in per_objective.items():
        n = v["targets"]
        name = o.lower()
        out[f"{name}_loss"] = v["loss_sum"] / n if n else None
        out[f"{name}_targets"] = int(n)
        out[f"{name}_accuracy"] = v["correct"] / n if n else None
    return out
