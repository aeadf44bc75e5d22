"""The backbone against Hugging Face LlamaForCausalLM (causal) and an unmasked reference (bidirectional)."""
import math

import pytest
import torch
import torch.nn.functional as F

from antlm_dist.config import ModelConfig
from antlm_dist.model import build_model

transformers = pytest.importorskip("transformers")


def _cfg(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, attention="sdpa")
    base.update(kw)
    return ModelConfig(**base)


def _hf(cfg: ModelConfig):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False,
    )
    return transformers.LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_causal_logits_equal_hf_llama(kv_heads):
    torch.manual_seed(0)
    cfg = _cfg(num_key_value_heads=kv_heads)
    ours = build_model(cfg).eval()
    hf = _hf(cfg)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    # and back: HF's names load into ours strictly
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if "rotary" not in k}, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids, causal=True)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-5


def _bidirectional_reference(model, ids):
    """Straightforward float64 forward with no attention mask, written from the Llama equations."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    H, N = cfg.hidden_size, cfg.num_attention_heads
    K = cfg.num_key_value_heads or N
    D = H // N
    T = ids.shape[1]

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = pos[:, None] * inv[None]  # (T, D/2)
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # (B, n, T, D), half-split rotation
        a, b = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(*ids.shape, N, D).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(*ids.shape, K, D).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(*ids.shape, K, D).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(N // K, 1)
        v = v.repeat_interleave(N // K, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ v
        x = x + att.transpose(1, 2).reshape(*ids.shape, H) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        g = h @ sd[p + "mlp.gate_proj.weight"].T
        u = h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(g) * u) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bidirectional_logits_equal_unmasked_reference(impl):
    torch.manual_seed(1)
    model = build_model(_cfg(attention=impl)).eval()
    ids = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        got = model(ids, causal=False)
        causal = model(ids, causal=True)
    ref = _bidirectional_reference(model, ids)
    assert (got.double() - ref).abs().max().item() < 1e-5
    # the mask switch is a real switch
    assert (causal - got).abs().max().item() > 1e-3


def test_loss_output_matches_float64_cross_entropy():
    torch.manual_seed(2)
    model = build_model(_cfg()).eval()
    ids = torch.randint(0, 97, (2, 20))
    labels = torch.full_like(ids, -100)
    labels[0, :7] = ids[0, 1:8]
    labels[1, 10:12] = 5
    with torch.no_grad():
        out = model(ids, labels=labels, causal=True)
        logits = model(ids, causal=True).double()
    keep = labels != -100
    ref = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    assert int(out.n_targets) == 9
    assert abs(float(out.loss_sum) - float(ref)) / float(ref) < 1e-5
    assert int(out.n_correct) == int((logits[keep].argmax(-1) == labels[keep]).sum())


def test_padding_does_not_change_real_positions():
    torch.manual_seed(3)
    model = build_model(_cfg()).eval()
    ids = torch.randint(5, 97, (1, 12))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], 1).long()
    for causal in (True, False):
        with torch.no_grad():
            a = model(ids, causal=causal)
            b = model(padded, mask, causal=causal)
        assert (a - b[:, :12]).abs().max().item() < 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_documents_equal_each_document_alone(impl):
    """With segment_ids (``data.document_mask``) a packed block is encoded as its documents
    would be one at a time. Attention stays inside each document; positions need no restart
    because a rotary q·k depends only on the distance between positions (Su et al. 2021), and
    the test would see the offset if it mattered. References: HF LlamaForCausalLM (causal)
    and the float64 unmasked forward (bidirectional), each run on every document alone."""
    torch.manual_seed(4)
    cfg = _cfg(attention=impl)
    model = build_model(cfg).eval()
    hf = _hf(cfg)
    hf.load_state_dict(model.state_dict(), strict=False)
    lengths = [[7, 12, 9], [20, 1, 7]]
    docs = [[torch.randint(5, 97, (1, n)) for n in row] for row in lengths]
    ids = torch.cat([torch.cat(row, 1) for row in docs])  # (2, 28)
    seg = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])
    with torch.no_grad():
        for causal in (True, False):
            got = model(ids, causal=causal, segment_ids=seg)
            unsegmented = model(ids, causal=causal)
            for b, row in enumerate(docs):
                start = 0
                for doc in row:
                    n = doc.shape[1]
                    ref = hf(input_ids=doc).logits.double() if causal else _bidirectional_reference(model, doc)
                    err = (got[b, start : start + n].double() - ref[0]).abs().max().item()
                    assert err < 1e-5, (causal, b, start, err)
                    start += n
            # the first document of each row is a prefix: only later documents move
            assert (got - unsegmented).abs().max().item() > 1e-3

