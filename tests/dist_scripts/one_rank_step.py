"""Run under torchrun with 1 rank: ZeRO-0 steps without DeepSpeed's gradient all-reduce
equal the steps with it, bit for bit, and the all-reduce really is skipped.

``one_rank_step.py fp32|bf16`` (bf16: DeepSpeed's BF16_Optimizer with fp32 master weights).
Two engines start from the same weights: one as :func:`antlm_dist.distributed.build_engine`
leaves it (all-reduce off on one rank), the reference with DeepSpeed's all-reduce turned back
on. Both take the same three optimizer steps (2 micro-batches each, clipping and AdamW).
"""
import sys

import torch

from antlm_dist.config import load_recipe
from antlm_dist.data.collators import MLMCollator
from antlm_dist.distributed import build_ds_config, build_engine, init_distributed, world_info
from antlm_dist.model import build_model
from antlm_dist.trainer import global_batch_step


def _engine(recipe, init_state, device, allreduce: bool):
    model = build_model(recipe.model)
    model.load_state_dict(init_state)
    cfg = build_ds_config(recipe, 1, device)
    cfg["zero_optimization"] = {"stage": 0}
    engine = build_engine(model, recipe, cfg, total_steps=10)
    assert engine.enable_backward_allreduce is False  # what build_engine does on one rank
    engine.enable_backward_allreduce = allreduce
    calls = []
    original = engine.allreduce_gradients
    engine.allreduce_gradients = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    return engine, calls


def main(precision: str) -> None:
    recipe = load_recipe(None, [f"train.precision={precision}",
        "model.vocab_size=64", "model.hidden_size=32", "model.intermediate_size=48", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "model.max_position_embeddings=32", "data.seq_len=16",
        "train.micro_batch_size=3", "train.gradient_accumulation_steps=2", "train.grad_clip=0.5",
        "train.warmup_steps=0", "train.lr=1e-2",
    ])
    device = torch.device("cpu")
    init_distributed(recipe, device)
    assert world_info()[1] == 1
    torch.manual_seed(0)
    init_state = {k: v.clone() for k, v in build_model(recipe.model).state_dict().items()}
    skipped, skipped_calls = _engine(recipe, init_state, device, allreduce=False)
    reference, reference_calls = _engine(recipe, init_state, device, allreduce=True)

    collator = MLMCollator(mask_id=4, pad_id=0, eos_id=2, special_ids=[0, 1, 2, 3, 4], vocab_size=64, seed=3,
                           mlm_probability=0.3)
    blocks = torch.randint(5, 64, (18, 16), generator=torch.Generator().manual_seed(1))
    for step in range(3):
        micro = [collator(blocks[6 * step + 3 * i: 6 * step + 3 * i + 3], list(range(3 * i, 3 * i + 3)), step)
                 for i in range(2)]
        got = global_batch_step(skipped, micro, causal=step != 1, device=device)
        want = global_batch_step(reference, micro, causal=step != 1, device=device)
        assert got == want, (step, got, want)
        for (name, p), (_, q) in zip(skipped.module.named_parameters(), reference.module.named_parameters()):
            assert torch.equal(p, q), f"step {step + 1}: {name} differs by {(p - q).abs().max().item():.3e}"
    moved = max((p.detach() - init_state[n]).abs().max().item() for n, p in skipped.module.named_parameters())
    assert moved > 1e-3, moved  # the steps really changed the weights
    # DeepSpeed calls it after every backward (it reduces only at the accumulation boundary)
    assert skipped_calls == [] and len(reference_calls) == 6, (skipped_calls, reference_calls)
    print(f"OK one rank, {precision}: 3 ZeRO-0 steps bit-identical without the all-reduce "
          f"({len(reference_calls)} calls skipped)")


if __name__ == "__main__":
    main(sys.argv[1])
