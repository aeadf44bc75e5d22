"""Run under torchrun with 2 ranks: one DeepSpeed optimizer step with gradient accumulation
under ZeRO-<stage>, checked against a float64 single-large-batch gradient.

With SGD(lr=1), no clipping and no weight decay, (params_before - params_after) is the
applied gradient. The reference is ∇ of (Σ loss over the whole global batch) / N_global,
computed in float64 on one process from the same blocks and masks.

``step_check.py <stage> mixed``: one step of the mixed phase ``CLM:MLM:MNTP=1:1:2`` (4 global
micro-batches: 2 ranks × 2 accumulation steps), whose reference is ∇ of
Σ_k (a_k / Σ a) · S_k / N_k with S_k, N_k the summed loss and target count of objective k
over the whole global batch.
"""
import sys

import torch

from antlm_dist.config import load_recipe
from antlm_dist.data.collators import MLMCollator
from antlm_dist.data.sampler import DistributedResumableSampler
from antlm_dist.distributed import build_ds_config, init_distributed, world_info
from antlm_dist.model import build_model
from antlm_dist.trainer import global_batch_step


def _setup(stage: int, *extra: str):
    """The tiny recipe, the process group, the model's initial state and a DeepSpeed engine
    with SGD(lr=1) (plain SGD makes the applied step equal the gradient)."""
    import deepspeed

    recipe = load_recipe(None, [
        "model.vocab_size=64", "model.hidden_size=32", "model.intermediate_size=48", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "model.max_position_embeddings=32", "data.seq_len=16",
        "train.micro_batch_size=3", "train.gradient_accumulation_steps=2", "train.grad_clip=0",
        f"distributed.deepspeed_config=zero{stage}.json", *extra,
    ])
    device = torch.device("cpu")
    init_distributed(recipe, device)
    rank, world = world_info()
    torch.manual_seed(0)
    model = build_model(recipe.model)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    ds_cfg = build_ds_config(recipe, world, device)
    ds_cfg["zero_allow_untested_optimizer"] = True
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    return recipe, device, rank, world, init_state, engine


def main(stage: int) -> None:
    import deepspeed

    recipe, device, rank, world, init_state, engine = _setup(stage)

    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(5, 64, (24, 16), generator=g)
    collator = MLMCollator(mask_id=4, pad_id=0, eos_id=2, special_ids=[0, 1, 2, 3, 4], vocab_size=64, seed=3,
                           mlm_probability=0.3)
    samplers = [DistributedResumableSampler(24, 3, 2, world, r, seed=5) for r in range(world)]
    all_micro = [[collator(blocks[torch.as_tensor(ids)], ids, 0) for ids in s.micro_batches(0)] for s in samplers]
    counts = [b.num_targets for mb in all_micro for b in mb]
    assert len(set(counts)) > 1, counts  # unequal target counts make the normalisation matter

    loss_total, n_global, _ = global_batch_step(engine, all_micro[rank], causal=False, device=device)
    assert n_global == sum(counts), (n_global, counts)

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        applied = {k: (init_state[k] - p.detach()).double() for k, p in params.items()}

    ref_model = build_model(recipe.model).double()
    ref_model.load_state_dict({k: v.double() for k, v in init_state.items()})
    ref_loss = 0.0
    per_mb_mean = {k: torch.zeros_like(v) for k, v in applied.items()}
    for mb in (b for r in all_micro for b in r):
        logits = ref_model(mb.input_ids, mb.attention_mask, causal=False)  # (B, T, V) float64
        mb_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb.labels.flatten(), reduction="sum")
        ref_loss = ref_loss + mb_loss
        # the biased alternative: a mean per micro-batch, averaged
        grads = torch.autograd.grad(mb_loss / mb.num_targets, list(ref_model.parameters()), retain_graph=True)
        for (k, _), gr in zip(ref_model.named_parameters(), grads):
            per_mb_mean[k] += gr / len(counts)
    ref_grads = torch.autograd.grad(ref_loss / sum(counts), list(ref_model.parameters()))
    ref = {k: gr for (k, _), gr in zip(ref_model.named_parameters(), ref_grads)}

    num = sum(((applied[k] - ref[k]) ** 2).sum() for k in ref) ** 0.5
    den = sum((ref[k] ** 2).sum() for k in ref) ** 0.5
    biased = sum(((per_mb_mean[k] - ref[k]) ** 2).sum() for k in ref) ** 0.5 / den
    rel = float(num / den)
    assert abs(loss_total - float(ref_loss)) / float(ref_loss) < 1e-5, (loss_total, float(ref_loss))
    assert rel < 1e-5, f"relative L2 error {rel:.2e} of the applied gradient"
    assert biased > 1e-3, f"the per-micro-batch mean differs by only {biased:.2e}: the test would not discriminate"
    print(f"OK rank {rank} stage {stage}: rel err {rel:.2e} (per-micro-batch mean would give {float(biased):.2e})")


def _rel_err(applied: dict, ref: dict) -> float:
    num = sum(((applied[k] - ref[k]) ** 2).sum() for k in ref) ** 0.5
    return float(num / sum((ref[k] ** 2).sum() for k in ref) ** 0.5)


def main_mixed(stage: int) -> None:
    """The mixed step against the float64 gradient of the per-objective formula."""
    import deepspeed

    from antlm_dist.data.collators import CLMCollator
    from antlm_dist.data.pipeline import BatchPrefetcher
    from antlm_dist.mixing import collators_for, mixed_batch_step, mixed_loss
    from antlm_dist.schedule import is_causal, parse_schedule

    recipe, device, rank, world, init_state, engine = _setup(stage, "objective.schedule=1_CLM:MLM:MNTP=1:1:2")

    blocks = torch.randint(5, 64, (24, 16), generator=torch.Generator().manual_seed(1))
    collators = collators_for(CLMCollator(eos_id=2, pad_id=0), MLMCollator(
        mask_id=4, pad_id=0, eos_id=2, special_ids=[0, 1, 2, 3, 4], vocab_size=64, seed=3, mlm_probability=0.3))
    phases = parse_schedule(recipe.objective.schedule)
    per_rank = []  # every rank's (objective, batch) pairs, collated as the trainer does
    for r in range(world):
        sampler = DistributedResumableSampler(24, 3, 2, world, r, seed=5)
        (_, _, micro), = list(BatchPrefetcher(blocks, sampler, collators, phases, sampler.steps_per_epoch, 0, 1))
        per_rank.append(micro)
    every = [pair for micro in per_rank for pair in micro]
    assert sorted(o for o, _ in every) == ["CLM", "MLM", "MNTP", "MNTP"], every

    per, = mixed_batch_step(engine, per_rank[rank], objectives=("CLM", "MLM", "MNTP"), device=device)
    assert {o: v["weight"] for o, v in per.items()} == {"CLM": 0.25, "MLM": 0.25, "MNTP": 0.5}

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        applied = {k: (init_state[k] - p.detach()).double() for k, p in params.items()}

    ref_model = build_model(recipe.model).double()
    ref_model.load_state_dict({k: v.double() for k, v in init_state.items()})
    share = {"CLM": 1 / 4, "MLM": 1 / 4, "MNTP": 2 / 4}  # the ratio's shares, written out
    s_k = {o: 0.0 for o in share}
    n_k = {o: 0 for o in share}
    for o, mb in every:
        logits = ref_model(mb.input_ids, mb.attention_mask, causal=is_causal(o))  # (B, T, V) float64
        s_k[o] = s_k[o] + torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb.labels.flatten(), reduction="sum")
        n_k[o] += mb.num_targets
    ref_loss = sum(share[o] * s_k[o] / n_k[o] for o in share)
    ref_grads = torch.autograd.grad(ref_loss, list(ref_model.parameters()), retain_graph=True)
    ref = {k: gr for (k, _), gr in zip(ref_model.named_parameters(), ref_grads)}
    pooled = torch.autograd.grad(sum(s_k.values()) / sum(n_k.values()), list(ref_model.parameters()))
    biased = _rel_err({k: g for (k, _), g in zip(ref_model.named_parameters(), pooled)}, ref)
    rel = _rel_err(applied, ref)
    assert {o: v["targets"] for o, v in per.items()} == n_k, (per, n_k)
    ref_value = float(ref_loss.detach())
    assert abs(mixed_loss(per) - ref_value) / ref_value < 1e-5, (mixed_loss(per), ref_value)
    assert rel < 1e-5, f"relative L2 error {rel:.2e} of the applied gradient"
    assert biased > 1e-3, f"one pooled normalisation differs by only {biased:.2e}: the test would not discriminate"
    print(f"OK rank {rank} stage {stage} mixed: rel err {rel:.2e} (one pooled normalisation would give {biased:.2e})")


if __name__ == "__main__":
    if sys.argv[2:] == ["mixed"]:
        main_mixed(int(sys.argv[1]))
    else:
        main(int(sys.argv[1]))
