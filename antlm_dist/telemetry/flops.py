"""Analytic training FLOPs, peak FLOP/s and model FLOPs utilisation (MFU).

MFU follows Chowdhery et al. 2022 (PaLM, appendix B): the FLOPs the model *needs* for
the tokens processed (forward + backward, no rematerialisation, no wasted work) divided
by the time taken and the hardware's peak FLOP/s. A step that computes more than it
needs (e.g. logits for positions without a label) does not get credit for it.

Per optimizer step of B sequences of T tokens, with L layers, N_h query heads of
dimension D, hidden size H, vocabulary V and M target rows (positions with a label):

* body: 6·N per token (Kaplan et al. 2020, "Scaling laws for neural language models",
  section 2.1: 2N forward + 4N backward), where N counts every parameter that is neither
  the token embedding nor the LM head (the norm gains included, as in Kaplan's N);
* attention scores and mixing: forward 4·B·N_h·T²·D per layer (QKᵀ and PV, 2 FLOPs
  per multiply-add), halved when causal (half the score matrix is needed), and
  forward + backward = 3.5 × forward (backward = 2.5 × forward, the FlashAttention-2
  convention, Dao 2023, which counts the recomputed QKᵀ);
* LM head: 6·H·V per target row only (2·H·V forward, 4·H·V backward). MLM phases
  supervise ~15% of the rows, so the head's useful work is ~15% of a CLM step's.

All FLOP counts are plain floats (FLOPs, not FLOP/s); times are seconds.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

ATTENTION_FWD_BWD_FACTOR = 3.5
"""Forward + backward attention FLOPs as a multiple of the forward (backward = 2.5 × forward)."""

_GPU_PEAK_BF16 = (
    # (substring of torch.cuda.get_device_name, dense bf16/fp16 tensor-core FLOP/s, vendor datasheet)
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("A100", 312.0e12),
    ("L40S", 362.1e12),
    ("L4", 121.0e12),
)


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Sizes that the analytic FLOP count needs.

    n_body_params: N, parameters outside the token embedding and the LM head.
    n_layers: L. n_heads: query heads N_h. head_dim: D. hidden_size: H. vocab_size: V.
    """

    n_body_params: int
    n_layers: int
    n_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def from_model_config(cls, cfg) -> "FlopModel":
        """From a Llama :class:`~antlm_dist.config.ModelConfig` (or anything with its fields).

        N = L·(H·N_h·D + 2·H·K·D + N_h·D·H + 3·H·I + 2·H) + H: the q, k, v, o and SwiGLU
        projections, two RMSNorm gains per layer and the final norm (K = key/value heads,
        I = intermediate size).

        Raises:
            ValueError: ``cfg.arch`` is not ``llama`` (use :meth:`from_module`).
        """
        if getattr(cfg, "arch", "llama") != "llama":
            raise ValueError(f"FlopModel.from_model_config knows model.arch=llama, not {cfg.arch!r}; "
                             "use FlopModel.from_module(model, cfg)")
        h, n_h = cfg.hidden_size, cfg.num_attention_heads
        kv = cfg.num_key_value_heads or n_h
        d = h // n_h
        per_layer = h * n_h * d + 2 * h * kv * d + n_h * d * h + 3 * h * cfg.intermediate_size + 2 * h
        return cls(n_body_params=cfg.num_hidden_layers * per_layer + h, n_layers=cfg.num_hidden_layers,
                   n_heads=n_h, head_dim=d, hidden_size=h, vocab_size=cfg.vocab_size)

    @classmethod
    def from_module(cls, model: torch.nn.Module, cfg) -> "FlopModel":
        """Count N on a built model: all parameters minus every ``nn.Embedding`` and the
        parameters under a child named ``lm_head``. Works for any ``model.arch``.

        Under ZeRO-3 call it before ``deepspeed.initialize`` (partitioned parameters
        report 0 elements afterwards).
        """
        excluded = set()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding) or name.split(".")[-1] == "lm_head":
                excluded.update(id(p) for p in module.parameters())
        n = sum(p.numel() for p in model.parameters() if id(p) not in excluded)
        n_h = cfg.num_attention_heads
        return cls(n_body_params=n, n_layers=cfg.num_hidden_layers, n_heads=n_h,
                   head_dim=cfg.hidden_size // n_h, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)

    def body(self, tokens: float) -> float:
        """6·N·tokens: forward + backward FLOPs of every non-embedding, non-head weight."""
        return 6.0 * self.n_body_params * tokens

    def attention_forward(self, batch: int, seq_len: int, causal: bool) -> float:
        """Forward score + mixing FLOPs of all layers: L·4·B·N_h·T²·D, halved if causal."""
        flops = 4.0 * batch * self.n_heads * seq_len * seq_len * self.head_dim * self.n_layers
        return flops / 2 if causal else flops

    def attention(self, batch: int, seq_len: int, causal: bool) -> float:
        """Forward + backward attention FLOPs: 3.5 × :meth:`attention_forward`."""
        return ATTENTION_FWD_BWD_FACTOR * self.attention_forward(batch, seq_len, causal)

    def head(self, target_rows: float) -> float:
        """6·H·V per target row: the LM head's forward and backward on rows with a label."""
        return 6.0 * self.hidden_size * self.vocab_size * target_rows

    def step(self, batch: int, seq_len: int, causal: bool, target_rows: float) -> float:
        """Model FLOPs of one optimizer step over ``batch`` sequences (all micro-batches,
        all ranks) of ``seq_len`` tokens with ``target_rows`` labelled positions."""
        return (self.body(batch * seq_len) + self.attention(batch, seq_len, causal)
                + self.head(target_rows))


def mfu(flops: float, seconds: float, peak_flops_per_device: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation (Chowdhery et al. 2022): ``flops / (seconds · n_devices · peak)``.

    Args:
        flops: model FLOPs of the work done in ``seconds`` by all ``n_devices``.
        seconds: wall time (s).
        peak_flops_per_device: FLOP/s of one device (see :func:`peak_flops_per_device`).

    Returns:
        A fraction in [0, 1] for honest inputs (not a percentage).

    Raises:
        ValueError: a non-positive time, peak or device count.
    """
    if seconds <= 0 or peak_flops_per_device <= 0 or n_devices <= 0:
        raise ValueError(f"mfu needs positive seconds, peak and devices; got {seconds}, "
                         f"{peak_flops_per_device}, {n_devices}")
    return flops / (seconds * n_devices * peak_flops_per_device)


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         n: int | None = None, repeats: int = 8, threads: int | None = None) -> float:
    """Best FLOP/s of an n×n·n×n matmul (2·n³ FLOPs) over ``repeats`` timed runs.

    n defaults to 2048 on CPU and 8192 on CUDA. On CPU this is the stand-in for a
    datasheet peak; it runs on ``threads`` threads (default: every core,
    ``os.cpu_count()``; torch's own setting is restored afterwards). On a shared machine it
    is lowered by other processes' load like every other figure. The operands come from a
    private generator, so the global random state is untouched.
    """
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        torch.mm(a, b)  # warm-up: thread pool, kernel selection
        best = 0.0
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            torch.mm(a, b)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(before)
    return best


def peak_flops_per_device(device: torch.device | str, precision: str = "fp32",
                          matmul_size: int | None = None, devices_sharing: int = 1) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU, and where the number comes from.

    On CUDA in bf16/fp16: the dense tensor-core datasheet figure for known boards
    (H100/H200 SXM 989.4 TFLOP/s, A100 312, ...). Otherwise (CPU, fp32, unknown board):
    :func:`measure_matmul_flops` in that dtype, measured now, of size ``matmul_size``
    (default 2048 on CPU, 8192 on CUDA). On CPU it uses every core and is divided by
    ``devices_sharing``, the ranks of this node: they share the cores, so each rank's
    "device" is that share of the machine. (Measuring with the one thread each rank runs,
    while the other ranks measure too, is what made CPU MFU read 40-50% for a tiny model.)

    Returns:
        (FLOP/s, description such as ``"datasheet NVIDIA H100 80GB HBM3 bf16"`` or
        ``"measured 2048x2048 fp32 matmul on all 2 cores, shared by 2 ranks"``).
    """
    dev = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if dev.type == "cuda" and dtype != torch.float32:
        name = torch.cuda.get_device_name(dev)
        for key, peak in _GPU_PEAK_BF16:
            if key in name:
                return peak, f"datasheet {name} dense {precision}"
    n = matmul_size or (8192 if dev.type == "cuda" else 2048)
    peak = measure_matmul_flops(dev, dtype, n)
    if dev.type != "cpu":
        return peak, f"measured {n}x{n} {precision} matmul ({torch.cuda.get_device_name(dev)})"
    cores = os.cpu_count() or 1
    shared = f", shared by {devices_sharing} ranks" if devices_sharing > 1 else ""
    return peak / devices_sharing, f"measured {n}x{n} {precision} matmul on all {cores} cores{shared}"
