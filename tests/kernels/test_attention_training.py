"""A tiny model trained a few steps with attention=triton (interpreter) matches attention=sdpa.

Both phases (CLM: causal, MLM: bidirectional), with and without packed-document
segments. Each variant starts from the same weights and sees the same batches, stepped
by plain torch AdamW; the per-step losses must agree within 1e-4.
"""
import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

import pytest
import torch

import antlm_dist.kernels as kernels_pkg
from antlm_dist.config import ModelConfig
from antlm_dist.data.collators import CLMCollator, MLMCollator
from antlm_dist.model import build_model

fa = importlib.import_module("antlm_dist.kernels.flash_attention")
if fa.HAS_TRITON and not fa.BUILT_FOR_INTERPRETER and fa._interpreting() and not torch.cuda.is_available():
    fa = importlib.reload(fa)  # imported earlier without the interpreter: rebuild
    importlib.reload(kernels_pkg)

pytestmark = pytest.mark.skipif(not (fa.HAS_TRITON and (fa.BUILT_FOR_INTERPRETER or torch.cuda.is_available())),
                                reason="needs triton with CUDA or TRITON_INTERPRET=1")

V, PAD, BOS, EOS, UNK, MASK = 128, 0, 1, 2, 3, 4


def _losses(attention: str, document_mask: bool, steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=64, attention=attention, loss="torch")
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(5, V, (steps * 2, 4, 40), generator=g)
    blocks[..., ::9] = EOS  # document boundaries inside each block
    clm = CLMCollator(eos_id=EOS, pad_id=PAD, document_mask=document_mask)
    mlm = MLMCollator(mask_id=MASK, pad_id=PAD, eos_id=EOS, special_ids=[PAD, BOS, EOS, UNK, MASK], vocab_size=V,
                      seed=2, document_mask=document_mask)
    out = []
    for i in range(steps * 2):
        collator = clm if i < steps else mlm  # a CLM phase, then an MLM phase
        batch = collator(blocks[i], list(range(4)), 0)
        res = model(batch.input_ids, batch.attention_mask, batch.labels, causal=collator.causal,
                    segment_ids=batch.segment_ids)
        loss = res.loss_sum / res.n_targets
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


@pytest.mark.parametrize("document_mask", [False, True])
def test_triton_attention_trains_like_sdpa(document_mask):
    ref = _losses("sdpa", document_mask)
    got = _losses("triton", document_mask)
    assert len(got) == 6
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= 1e-4, (step, a, b)
    # the losses move, so equality is not trivial
    assert max(ref) - min(ref) > 1e-2
