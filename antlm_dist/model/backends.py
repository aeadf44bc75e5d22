"""Kernel backends of a model config: one call to :func:`antlm_dist.kernels.backend.resolve_backends`,
with the errors turned into :class:`~antlm_dist.config.ConfigError`."""
from __future__ import annotations

import torch

from antlm_dist.config import ConfigError, ModelConfig
from antlm_dist.kernels.backend import BackendError, KernelBackends, resolve_backends

TRITON_ATTENTION_ARCHS = ("llama",)
"""Backbones whose attention can run the Triton flash-attention kernel (LTG-BERT's
relative-position bias is not one of its inputs)."""


def resolve_model_backends(cfg: ModelConfig, device: torch.device | str | None = None) -> KernelBackends:
    """The attention and loss backends of ``cfg`` on ``device`` (default: CUDA when available).

    Raises:
        ConfigError: a backend that cannot run there, or a head dim the kernel does not
            support, naming the field and the fix.
    """
    try:
        return resolve_backends(cfg.attention, cfg.loss, device, head_dim=cfg.hidden_size // cfg.num_attention_heads,
                                triton_attention=cfg.arch in TRITON_ATTENTION_ARCHS, arch=cfg.arch)
    except BackendError as exc:
        raise ConfigError(str(exc)) from exc


def check_model_backends(cfg: ModelConfig, device: torch.device | str | None = None) -> None:
    """Preflight: raise ConfigError now if :func:`build_model` would fail to resolve the
    backends or ``model.fused_kernels``."""
    from antlm_dist.model.fused import resolve_fused_kernels

    resolve_model_backends(cfg, device)
    resolve_fused_kernels(cfg.fused_kernels, device)
