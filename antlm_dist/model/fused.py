"""Fused elementwise kernels for the Llama block: liger-kernel's RMSNorm, SwiGLU and RoPE on CUDA.

``model.fused_kernels`` picks the implementation once, in :func:`resolve_fused_kernels`:
``liger`` runs the Triton kernels of the ``liger-kernel`` package (Hsu et al. 2024,
"Liger Kernel: Efficient Triton Kernels for LLM Training"; install the ``gpu`` extra),
``torch`` the modules' own torch code; ``auto`` is ``liger`` on CUDA when the package is
installed and ``torch`` elsewhere. Both compute the same functions:

* RMSNorm (Zhang & Sennrich 2019): ``weight · (x · rsqrt(mean(x²) + eps))``, normalised in
  fp32 and cast back to x's dtype before the gain (liger's ``llama`` casting mode);
* SwiGLU (Shazeer 2020): ``silu(gate) · up``;
* RoPE (Su et al. 2021), HF's half-split layout: ``x · cos + rotate_half(x) · sin`` for
  queries and keys in one kernel.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from antlm_dist.config import ConfigError

FUSED_CHOICES = ("auto", "liger", "torch")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_fused_kernels(choice: str, device: torch.device | str | None) -> str:
    """``"liger"`` or ``"torch"`` for ``model.fused_kernels`` on ``device``.

    Raises:
        ConfigError: ``liger`` without the package, or on a device other than CUDA.
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if choice == "torch" or (choice == "auto" and not (device.type == "cuda" and liger_installed())):
        return "torch"
    if not liger_installed():
        raise ConfigError("model.fused_kernels=liger needs the liger-kernel package: pip install 'antlm-dist[gpu]' "
                          "(or set model.fused_kernels=torch)")
    if device.type != "cuda":
        raise ConfigError(f"model.fused_kernels=liger runs Triton kernels on CUDA only; this run is on {device.type}: "
                          "set model.fused_kernels=torch (or auto)")
    return "liger"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "torch") -> torch.Tensor:
    """RMSNorm of x (…, H) any float dtype with gain weight (H,); returns (…, H) in x's dtype."""
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_rms_norm

        return liger_rms_norm(x, weight, eps, casting_mode="llama", in_place=False)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """silu(gate) · up for gate, up (…, I) of one dtype; returns (…, I)."""
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_swiglu

        return liger_swiglu(gate, up)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(…, D) → (…, D): the halves (x1, x2) become (-x2, x1), HF's RoPE layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         impl: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embeddings of q (B, N, T, D) and k (B, K, T, D) with cos, sin (T, D) in
    HF's half-split layout; returns rotated (q, k), same shapes and dtype."""
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_rope

        return liger_rope(q, k, cos, sin)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def set_fused_kernels(model: nn.Module, impl: str) -> int:
    """Set ``fused_impl`` on every module of ``model`` that has one (RMSNorm, MLP,
    attention); returns how many were set."""
    n = 0
    for module in model.modules():
        if hasattr(module, "fused_impl"):
            module.fused_impl = impl
            n += 1
    return n
