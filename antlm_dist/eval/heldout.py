"""Held-out CLM and MLM (and MNTP) loss on a corpus's ``.dev`` blocks, shared by the trainer and CLI.

CLM: mean next-token cross-entropy (nats) over every position with a label, and its
perplexity exp(loss). MLM: mean cross-entropy and top-1 accuracy over the selected
positions, with masks drawn from a fixed evaluation seed so evaluations are comparable.
A tqdm bar over the batches shows on rank 0 when a terminal watches
(:func:`antlm_dist.progress.bar_wanted`).
"""
from __future__ import annotations

import logging
import math

import torch

from antlm_dist.distributed import all_reduce_sum, world_info
from antlm_dist.kernels.masked_token_loss import IGNORE_INDEX
from antlm_dist.progress import bar_wanted, make_bar
from antlm_dist.seeding import EVAL_EPOCH

log = logging.getLogger("antlm_dist")


@torch.no_grad()
def evaluate_objective(model, blocks: torch.Tensor, collator, micro_batch_size: int, device) -> dict:
    """Loss (and accuracy) of one objective over ``blocks`` (N, T), sharded over ranks.

    Collective under a process group: every rank runs the same number of forward passes
    (ZeRO-3 gathers parameters collectively); padding batches carry no labels.

    Args:
        model: the DeepSpeed engine or the bare module; called as
            ``model(input_ids, attention_mask, labels, causal=..., segment_ids=...)``.
        blocks: (N, T) dev blocks: a :class:`~antlm_dist.data.blocks.PackedBlocks` or an int64
            tensor; indexing it with a list of ids gives an int64 (B, T) tensor.
        collator: a CLM or MLM collator (its ``causal`` attribute picks the mask).

    Returns:
        ``{"loss": nats per target, "accuracy": top-1 fraction, "targets": count,
        "ppl": exp(loss)}``.
    """
    rank, world = world_info()
    n = blocks.shape[0]
    per_rank = math.ceil(n / world) if n else 0
    n_batches = math.ceil(per_rank / micro_batch_size) if per_rank else 0
    ids_all = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    totals = [0.0, 0.0, 0.0]
    bar = make_bar(n_batches, f"eval {'CLM' if collator.causal else 'MLM'}", "batch", leave=False,
                   disable=rank != 0 or not bar_wanted())
    for b in range(n_batches):
        ids = ids_all[b * micro_batch_size : (b + 1) * micro_batch_size]
        real = len(ids)
        if real == 0:  # this rank ran out: a dummy batch keeps collectives in step
            ids = [0]
        batch = collator(blocks[torch.as_tensor(ids)], ids, EVAL_EPOCH)
        if real == 0:
            batch.labels.fill_(IGNORE_INDEX)
        batch = batch.to(device)
        out = model(batch.input_ids, batch.attention_mask, batch.labels, causal=collator.causal,
                    segment_ids=batch.segment_ids)
        totals[0] += float(out.loss_sum)
        totals[1] += float(out.n_targets)
        totals[2] += float(out.n_correct)
        bar.update(1)
    bar.close()
    loss_sum, count, correct = all_reduce_sum(totals, device)
    loss = loss_sum / count if count else float("nan")
    return {"loss": loss, "accuracy": correct / count if count else float("nan"),
            "targets": int(count), "ppl": math.exp(loss) if count and loss < 50 else float("inf")}


def evaluate_heldout(model, blocks: torch.Tensor, clm_collator, mlm_collator, micro_batch_size: int, device,
                     extra: dict | None = None) -> dict:
    """Both objectives: ``{"clm": {...}, "mlm": {...}}`` (see :func:`evaluate_objective`),
    plus one entry per ``extra`` collator (e.g. ``{"mntp": collator}``, masked next-token
    prediction, bidirectional: the label at t is the original token at t+1 where t+1 was
    selected).

    Logs one line before it starts; a bar over the batches shows on a terminal (rank 0)."""
    log.info("held-out evaluation: %d blocks, %s, micro-batch %d", blocks.shape[0],
             " and ".join(["CLM", "MLM", *(k.upper() for k in extra or {})]), micro_batch_size)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return {
            "clm": evaluate_objective(model, blocks, clm_collator, micro_batch_size, device),
            "mlm": evaluate_objective(model, blocks, mlm_collator, micro_batch_size, device),
            **{name: evaluate_objective(model, blocks, c, micro_batch_size, device) for name, c in (extra or {}).items()},
        }
    finally:
        if was_training:
            model.train()
