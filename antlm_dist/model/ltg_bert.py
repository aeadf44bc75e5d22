"""LTG-BERT backbone (Samuel et al., Findings of EACL 2023) with a causal switch for AntLM.

LTG-BERT ("Trained on 100 million words and still in shape: BERT meets British National
Corpus") is a BERT-style encoder tuned for small corpora. AntLM (Yu et al., BabyLM 2024)
trains it with alternating CLM phases (causal mask, next-token labels) and MLM phases
(bidirectional mask); the mask is the ``causal`` forward argument, never module state.

Architecture, as implemented here (B batch, T sequence, H hidden, N heads, D = H/N head
dim, I intermediate, V vocab, S ``position_bucket_size``, R = 2S-1 relative buckets):

* Embedding: ``LN(E[ids])`` (LayerNorm without affine parameters), dropout. Relative
  position embeddings ``P`` (R, H), ``LN_affine(P)``, shared by every layer.
* Layer (pre-LayerNorm, NormFormer extra norms, Shleifer et al. 2021)::

      h  = LN(x)                                          # no affine
      q, k = split(W_qk h + b_qk);  v = W_v h + b_v       # (B, N, T, D)
      qp, kp = split(W_qk dropout(P~) + b_qk)             # (R, N, D); the same W_qk
      logit[i, j] = (q_i·k_j + q_i·kp[r(i, j)] + k_j·qp[r(i, j)]) / sqrt(3 D)
      a  = softmax(logit + mask) v                        # mask: padding (+ causal)
      x  = x + dropout(LN_affine(W_o a + b_o))            # NormFormer post-attention LN
      u, g = split(W_up LN(x))                            # (B, T, 2I) -> 2 × (B, T, I), no bias
      x  = x + dropout(W_down LN(u · GELU_tanh(g)))       # GEGLU (Shazeer 2020) + NormFormer LN

  ``r(i, j) = bucket(i - j) + S - 1`` is DeBERTa's log-bucketed relative position (He et
  al. 2021): exact within ±S/2, logarithmic up to ``max_relative_positions``
  (:func:`log_bucket_position`).
* Head: ``LN → Linear(H, H) → GELU → LN → dropout → E^T`` (weights tied to the word
  embedding).

Initialisation: every weight matrix and both embeddings from a truncated normal with
std = sqrt(2 / (5 H)), cut at ±2 std; biases zero; the two feed-forward matrices of layer
l (0-based) scaled by sqrt(1 / (2 (l + 1))).

Differences from the reference code, on purpose:

* the vocabulary bias of the output projection is omitted, so the loss runs in the fused
  :func:`antlm_dist.kernels.masked_token_loss`, which takes no bias;
* ``causal=True`` adds the upper-triangular mask (AntLM's CLM phases), and ``segment_ids``
  keep attention inside packed documents, as in the Llama backbone.

ZeRO-3 and the tied head: ZeRO-3 gathers a parameter only while the module that owns it
runs ``forward``. The word-embedding matrix is owned by :class:`TiedWordEmbedding`, which
serves both the input lookup (``forward(input_ids)``) and the output projection plus loss
(``forward(hidden=..., labels=...)``). The loss kernel therefore always runs inside the
owner's ``forward``, with the weight gathered, and ZeRO-3's backward hooks on that call's
outputs gather it again for the backward. No ``GatheredParameters`` context is needed.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from antlm_dist.config import ModelConfig
from antlm_dist.kernels.masked_token_loss import IGNORE_INDEX
from antlm_dist.kernels.backend import KernelBackends
from antlm_dist.model.attention import build_attention_mask
from antlm_dist.model.backends import resolve_model_backends
from antlm_dist.model.heads import project_or_loss



def log_bucket_position(relative_pos: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """DeBERTa's log buckets of signed relative positions (He et al. 2021, §3.3 / appendix).

    With ``mid = bucket_size // 2``: distances ``|d| <= mid`` keep their value; larger ones
    map to ``sign(d) · (mid + ceil(log(|d| / mid) / log((max_position - 1) / mid) · (mid - 1)))``,
    with ``|d|`` capped at ``max_position - 1``. The result lies in
    ``[-(2·mid - 1), 2·mid - 1]``.

    Args:
        relative_pos: int tensor of signed distances (query minus key).
        bucket_size: S (32 in LTG-BERT); must be even.
        max_position: the distance that reaches the last bucket (512 in LTG-BERT).

    Returns:
        int64 tensor of the same shape.
    """
    mid = bucket_size // 2
    sign = torch.sign(relative_pos)
    distance = relative_pos.abs().clamp(min=mid, max=max_position - 1).to(torch.float64)
    log_pos = torch.ceil(torch.log(distance / mid) / math.log((max_position - 1) / mid) * (mid - 1)).long() + mid
    return torch.where(relative_pos.abs() <= mid, relative_pos, log_pos * sign).long()


def relative_position_index(seq_len: int, bucket_size: int, max_position: int, device=None) -> torch.Tensor:
    """(T, T) int64 rows of the relative-embedding table: ``bucket(i - j) + S - 1`` in [0, 2S-2]."""
    pos = torch.arange(seq_len, device=device)
    return log_bucket_position(pos[:, None] - pos[None, :], bucket_size, max_position) + bucket_size - 1


def _trunc_normal_(tensor: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


class TiedWordEmbedding(nn.Embedding):
    """The (V, H) word-embedding matrix, used as input embedding and as tied output projection.

    An ``nn.Embedding`` (so tools that treat embeddings specially, e.g. FLOP counting or
    HF's ``get_input_embeddings``, recognise it) whose ``forward`` also serves the head:

    * ``forward(input_ids)``: (B, T) int64 → (B, T, H) embeddings.
    * ``forward(hidden=h)``: (…, H) → logits (…, V) = h Eᵀ.
    * ``forward(hidden=h, labels=y)``: h (N, H) or (B, T, H), y the matching labels (-100 =
      no loss) → :class:`LossOutput` from :func:`antlm_dist.kernels.masked_token_loss`.

    One module owns the weight and every use of it runs in its ``forward`` (see the
    module docstring on ZeRO-3).
    """

    def __init__(self, vocab_size: int, hidden_size: int, loss_impl: str = "torch"):
        super().__init__(vocab_size, hidden_size)
        self.loss_impl = loss_impl

    def forward(self, input_ids: torch.Tensor | None = None, *, hidden: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        if input_ids is not None:
            return F.embedding(input_ids, self.weight)
        if hidden is None:
            raise ValueError("TiedWordEmbedding needs input_ids (lookup) or hidden (output projection)")
        return project_or_loss(hidden, self.weight, labels, self.loss_impl)


class LtgBertEmbedding(nn.Module):
    """Word embedding (LayerNorm without affine, dropout) and the shared relative embeddings."""

    def __init__(self, cfg: ModelConfig, loss_impl: str = "torch"):
        super().__init__()
        self.word_embedding = TiedWordEmbedding(cfg.vocab_size, cfg.hidden_size, loss_impl)
        self.word_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, elementwise_affine=False)
        self.relative_embedding = nn.Parameter(torch.empty(2 * cfg.position_bucket_size - 1, cfg.hidden_size))
        self.relative_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) → (word embeddings (B, T, H), relative embeddings (2S-1, H))."""
        x = self.dropout(self.word_layer_norm(self.word_embedding(input_ids)))
        return x, self.relative_layer_norm(self.relative_embedding)


class LtgBertAttention(nn.Module):
    """Disentangled self-attention: content·content + content·position + position·content."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = 1.0 / math.sqrt(3 * self.head_dim)
        self.in_proj_qk = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size, bias=True)
        self.in_proj_v = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.pre_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, elementwise_affine=False)
        self.post_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention_dropout = cfg.attention_dropout
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def position_bias(self, q: torch.Tensor, k: torch.Tensor, relative: torch.Tensor,
                      position_index: torch.Tensor) -> torch.Tensor:
        """(B, N, T, T) logits' position terms, already scaled: (q_i·kp[r] + k_j·qp[r]) / sqrt(3D).

        q, k: (B, N, T, D); relative: (R, H) normalised relative embeddings;
        position_index: (T, T) int64, r(i, j).
        """
        bsz, n_heads, seq_len, head_dim = q.shape
        pos = self.in_proj_qk(F.dropout(relative, self.attention_dropout, self.training))  # (R, 2H)
        q_pos, k_pos = pos.view(-1, 2, n_heads, head_dim).unbind(1)  # (R, N, D) each
        c2p = torch.einsum("bnid,rnd->bnir", q, k_pos)  # (B, N, T, R): query content · key position
        p2c = torch.einsum("bnjd,rnd->bnjr", k, q_pos)  # (B, N, T, R): key content · query position
        index = position_index.expand(bsz, n_heads, seq_len, seq_len)
        c2p = c2p.gather(-1, index)  # (B, N, T, T): [i, j] = c2p[i, r(i, j)]
        p2c = p2c.gather(-1, index.transpose(-1, -2)).transpose(-1, -2)  # [i, j] = p2c[j, r(i, j)]
        return (c2p + p2c) * self.scale

    def forward(self, x: torch.Tensor, relative: torch.Tensor, position_index: torch.Tensor,
                mask: torch.Tensor | None, *, impl: str = "sdpa") -> torch.Tensor:
        """x (B, T, H); relative (R, H); position_index (T, T); mask (B, 1, T, T) bool
        (True = may attend) or None. Returns the residual branch (B, T, H)."""
        bsz, seq_len, hidden = x.shape
        h = self.pre_layer_norm(x)
        q, k = self.in_proj_qk(h).view(bsz, seq_len, 2, self.num_heads, self.head_dim).unbind(2)  # (B, T, N, D)
        v = self.in_proj_v(h).view(bsz, seq_len, self.num_heads, self.head_dim)  # (B, T, N, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, N, T, D)
        bias = self.position_bias(q, k, relative, position_index)  # (B, N, T, T)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        p_drop = self.attention_dropout if self.training else 0.0
        if impl == "eager":
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + bias  # (B, N, T, T)
            probs = F.dropout(scores.softmax(dim=-1), p_drop, self.training)
            out = torch.matmul(probs, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop, scale=self.scale)
        out = out.transpose(1, 2).reshape(bsz, seq_len, hidden)  # (B, T, H)
        return self.dropout(self.post_layer_norm(self.out_proj(out)))


class LtgBertFeedForward(nn.Module):
    """GEGLU feed-forward with a NormFormer LayerNorm before the output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, elementwise_affine=False)
        self.up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.mid_layer_norm = nn.LayerNorm(cfg.intermediate_size, eps=cfg.layer_norm_eps, elementwise_affine=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up_proj(self.pre_layer_norm(x)).chunk(2, dim=-1)  # (B, T, I) each
        h = self.mid_layer_norm(value * F.gelu(gate, approximate="tanh"))
        return self.dropout(self.down_proj(h))


class LtgBertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = LtgBertAttention(cfg)
        self.mlp = LtgBertFeedForward(cfg)

    def forward(self, x, relative, position_index, mask, *, impl: str = "sdpa"):
        """x (B, T, H) → (B, T, H); see :meth:`LtgBertAttention.forward` for the rest."""
        x = x + self.attention(x, relative, position_index, mask, impl=impl)
        return x + self.mlp(x)


class LtgBertEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList([LtgBertLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x, relative, position_index, mask, *, impl: str = "sdpa"):
        for layer in self.layers:
            x = layer(x, relative, position_index, mask, impl=impl)
        return x


class LtgBertHeadTransform(nn.Module):
    """The MLM head's non-linearity before the tied projection: LN → Linear → GELU → LN → dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, elementwise_affine=False)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.post_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, elementwise_affine=False)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.post_layer_norm(F.gelu(self.dense(self.pre_layer_norm(x)))))


class LtgBertForPretraining(nn.Module):
    """LTG-BERT encoder + tied MLM head; the same weights serve CLM and MLM phases.

    ``forward(input_ids, attention_mask=None, labels=None, *, causal, segment_ids=None)``:

    * input_ids (B, T) int64; attention_mask (B, T), 1 for a real token; segment_ids (B, T)
      document ids or None; ``causal=True`` adds the upper-triangular mask (CLM phases).
    * with ``labels`` (B, T) int64, aligned to positions (``labels[t]`` is what the hidden
      state at t must predict; CLM: ``input_ids[t+1]``; -100 = no loss), returns
      :class:`~antlm_dist.model.heads.LossOutput`. Only the labelled rows go through the
      head.
    * without, returns logits (B, T, V) in the parameters' dtype.
    """

    def __init__(self, cfg: ModelConfig, backends: KernelBackends | None = None):
        super().__init__()
        if cfg.num_key_value_heads not in (None, cfg.num_attention_heads):
            raise ValueError("model.arch=ltg_bert has no grouped-query attention; leave model.num_key_value_heads unset")
        if backends is None:  # resolved for the default device; build_model passes the run's
            backends = resolve_model_backends(cfg)
        self.config = cfg
        self.attention_impl = backends.attention  # "sdpa" or "eager": the Triton kernel takes no position bias
        self.embedding = LtgBertEmbedding(cfg, backends.loss)
        self.transformer = LtgBertEncoder(cfg)
        self.classifier = LtgBertHeadTransform(cfg)
        self._index_cache: dict[tuple[int, str], torch.Tensor] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LTG-BERT's initialisation (see the module docstring)."""
        std = math.sqrt(2.0 / (5.0 * self.config.hidden_size))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _trunc_normal_(module.weight, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()
        _trunc_normal_(self.embedding.word_embedding.weight, std)
        _trunc_normal_(self.embedding.relative_embedding, std)
        for i, layer in enumerate(self.transformer.layers):
            layer.mlp.up_proj.weight.mul_(math.sqrt(1.0 / (2.0 * (i + 1))))
            layer.mlp.down_proj.weight.mul_(math.sqrt(1.0 / (2.0 * (i + 1))))

    def position_index(self, seq_len: int, device) -> torch.Tensor:
        """(T, T) int64 relative-embedding rows, cached per (T, device)."""
        key = (seq_len, str(device))
        index = self._index_cache.get(key)
        if index is None:
            index = relative_position_index(seq_len, self.config.position_bucket_size,
                                            self.config.max_relative_positions, device)
            self._index_cache[key] = index
        return index

    def encode(self, input_ids, attention_mask=None, *, causal: bool, segment_ids=None) -> torch.Tensor:
        """The encoder's last hidden states (B, T, H)."""
        bsz, seq_len = input_ids.shape
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"input length {seq_len} exceeds model.max_position_embeddings={self.config.max_position_embeddings}"
            )
        x, relative = self.embedding(input_ids)
        key_padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding_mask = attention_mask.bool()
        mask = build_attention_mask(bsz, seq_len, causal=causal, key_padding_mask=key_padding_mask,
                                    segment_ids=segment_ids, device=x.device)
        return self.transformer(x, relative, self.position_index(seq_len, x.device), mask,
                                impl=self.attention_impl)

    def forward(self, input_ids, attention_mask=None, labels=None, *, causal: bool, segment_ids=None):
        hidden = self.encode(input_ids, attention_mask, causal=causal, segment_ids=segment_ids)
        word_embedding = self.embedding.word_embedding
        if labels is None:
            return word_embedding(hidden=self.classifier(hidden))
        rows = labels != IGNORE_INDEX  # (B, T)
        return word_embedding(hidden=self.classifier(hidden[rows]), labels=labels[rows])  # (N, H), (N,)
