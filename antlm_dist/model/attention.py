"""One attention entry point with named implementations.

Every backbone calls :func:`attention` with the implementation ``impl`` ("sdpa",
"triton" or "eager") that :func:`antlm_dist.kernels.backend.resolve_backends` chose once
when the model was built; the causal/bidirectional switch is a per-call argument, so the causal/bidirectional switch of AntLM
(Yu et al., BabyLM 2024) is an argument, never module state.

Shapes use B = batch, H = query heads, Hkv = key/value heads, T = sequence, D = head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def build_attention_mask(
    batch: int,
    seq_len: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B, 1, T, T), True where query t may attend to key s.

    Combines the causal triangle, key padding (``key_padding_mask`` (B, T) bool, True for
    a real token) and packed-document segments (``segment_ids`` (B, T) int: attend only
    within the same id). Returns ``None`` when nothing is masked, so SDPA can use its
    fastest unmasked path.

    A query row with no allowed key (a fully padded sequence) is given every key, so the
    softmax stays finite; :func:`attention` zeroes such rows' outputs afterwards.
    """
    if not causal and key_padding_mask is None and segment_ids is None:
        return None
    mask = torch.ones(batch, 1, seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        mask = mask & torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    empty_rows = ~mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    return mask | empty_rows


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    impl: str = "sdpa",
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with a per-call causal/bidirectional switch.

    Args:
        q: (B, H, T, D) float16/bfloat16/float32.
        k, v: (B, Hkv, T, D), same dtype; H must be a multiple of Hkv (grouped-query).
        causal: True for the CLM mask (query t sees keys <= t), False for the
            bidirectional MLM mask.
        impl: "sdpa" (torch ``scaled_dot_product_attention`` with an explicit mask),
            "triton" (``antlm_dist.kernels.flash_attention``) or "eager" (plain matmul +
            softmax, the float64-capable oracle), as resolved by
            :func:`antlm_dist.kernels.backend.resolve_backends`.
        key_padding_mask: (B, T) bool/int, 1 for a real token, or None.
        segment_ids: (B, T) int document ids for packed sequences, or None.
        softmax_scale: defaults to 1/sqrt(D).

    Returns:
        (B, H, T, D) in q's dtype. Rows of padded query positions are exact zeros.

    Raises:
        ValueError: unknown ``impl`` or mismatched shapes.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention expects q (B,H,T,D) and k/v (B,Hkv,T,D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"num_attention_heads ({q.shape[1]}) must be a multiple of num_key_value_heads ({k.shape[1]})")
    if impl == "triton":
        from antlm_dist.kernels import flash_attention

        return flash_attention(
            q, k, v, causal=causal, softmax_scale=softmax_scale,
            key_padding_mask=None if key_padding_mask is None else key_padding_mask.bool(),
            segment_ids=segment_ids, backend="triton",
        )
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attention impl {impl!r} is not known; use 'sdpa', 'triton' or 'eager'")

    bsz, n_heads, seq_len, head_dim = q.shape
    groups = n_heads // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, H, T, D)
        v = v.repeat_interleave(groups, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    only_causal = causal and key_padding_mask is None and segment_ids is None
    if impl == "sdpa" and only_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = build_attention_mask(
        bsz, seq_len, causal=causal, key_padding_mask=key_padding_mask,
        segment_ids=segment_ids, device=q.device,
    )
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, T, T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v)
    if key_padding_mask is not None:
        out = out * key_padding_mask.to(out.dtype)[:, None, :, None]
    return out
