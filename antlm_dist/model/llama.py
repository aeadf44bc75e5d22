"""BabyLlama backbone: the Llama architecture (RMSNorm, RoPE, SwiGLU, untied LM head).

Parameter names and math follow Hugging Face ``LlamaForCausalLM`` (Touvron et al. 2023),
so state dicts load both ways. The attention mask mode is a forward argument
(``causal``), never module state: AntLM alternates CLM (causal) and MLM (bidirectional)
phases on this one backbone.

Shapes: B batch, T sequence, H hidden, N heads, K key/value heads, D head dim, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from antlm_dist.config import ModelConfig
from antlm_dist.kernels.backend import KernelBackends
from antlm_dist.model.backends import resolve_model_backends
from antlm_dist.model.attention import attention
from antlm_dist.model.fused import rms_norm, rope, rotate_half, swiglu
from antlm_dist.model.heads import LMHead


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · weight, computed in fp32 (Zhang & Sennrich 2019);
    ``fused_impl`` (see :mod:`antlm_dist.model.fused`) picks torch or liger-kernel."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.fused_impl = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, self.fused_impl)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) cos and sin of rotary embeddings (Su et al. 2021), HF's half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, N, T, D); cos/sin: (T, D)."""
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.fused_impl = "torch"  # RoPE: torch or liger-kernel (antlm_dist.model.fused)

    def forward(self, x, cos, sin, *, causal: bool, impl: str, key_padding_mask=None, segment_ids=None):
        bsz, seq_len, _ = x.shape
        q = self.q_proj(x).view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, N, T, D)
        k = self.k_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = rope(q, k, cos, sin, self.fused_impl)
        out = attention(q, k, v, causal=causal, impl=impl, key_padding_mask=key_padding_mask,
                        segment_ids=segment_ids)  # (B, N, T, D)
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.num_heads * self.head_dim)  # (B, T, N·D)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused_impl = "torch"  # silu · mul: torch or liger-kernel (antlm_dist.model.fused)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.fused_impl))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, **attn_kwargs):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, **attn_kwargs)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """Embedding, decoder layers and final norm (HF ``LlamaModel``; prefix ``model.``)."""

    def __init__(self, cfg: ModelConfig, attention_impl: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.attention_impl = attention_impl  # resolved once by build_model: "sdpa", "triton" or "eager"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) rotary cos and sin, cached per (T, device, dtype): constants of the config."""
        key = (seq_len, str(device), dtype)
        if key not in self._rope_cache:
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            with torch.inference_mode(False):  # normal tensors, usable by a later training forward
                self._rope_cache[key] = rope_cos_sin(seq_len, head_dim, self.config.rope_theta, device, dtype)
        return self._rope_cache[key]

    def forward(self, input_ids, attention_mask=None, *, causal: bool, segment_ids=None):
        """input_ids (B, T) int64; attention_mask (B, T) 1 = real token; returns (B, T, H)."""
        bsz, seq_len = input_ids.shape
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"input length {seq_len} exceeds model.max_position_embeddings={self.config.max_position_embeddings}"
            )
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(seq_len, x.device, x.dtype)
        key_padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding_mask = attention_mask.bool()
        for layer in self.layers:
            x = layer(x, cos, sin, causal=causal, impl=self.attention_impl, key_padding_mask=key_padding_mask,
                      segment_ids=segment_ids)
        return self.norm(x)


class AntLMForPretraining(nn.Module):
    """Backbone + untied LM head; the same weights serve CLM and MLM phases.

    ``forward(input_ids, attention_mask=None, labels=None, *, causal, segment_ids=None)``:

    * with ``labels`` (B, T) int64, aligned to positions (-100 = no loss), returns
      :class:`~antlm_dist.model.heads.LossOutput` (summed loss, target count, top-1 hits);
    * without, returns logits (B, T, V) in the parameters' dtype.
    """

    def __init__(self, cfg: ModelConfig, backends: KernelBackends | None = None):
        super().__init__()
        if backends is None:  # resolved for the default device; build_model passes the run's
            backends = resolve_model_backends(cfg)
        self.config = cfg
        self.model = LlamaBackbone(cfg, backends.attention)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, backends.loss)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """HF Llama's initialisation: N(0, initializer_range) for linears and embeddings."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, LMHead)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(self, input_ids, attention_mask=None, labels=None, *, causal: bool, segment_ids=None):
        hidden = self.model(input_ids, attention_mask, causal=causal, segment_ids=segment_ids)
        return self.lm_head(hidden, labels)
