"""Backbones. :func:`build_model` picks one from ``model.arch`` and resolves its kernel
backends once (:func:`antlm_dist.kernels.backend.resolve_backends`)."""
from __future__ import annotations

import torch

from antlm_dist.config import ModelConfig
from antlm_dist.model.backends import check_model_backends, resolve_model_backends  # noqa: F401  (re-exported)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None):
    """Instantiate the backbone + LM head for ``cfg.arch``, with kernel backends and fused
    elementwise kernels (``model.fused_kernels``) for ``device`` (the device the model will
    run on; default CUDA when available, else the CPU).

    Raises:
        ValueError: unknown ``model.arch``.
        ConfigError: see :func:`resolve_model_backends` and
            :func:`antlm_dist.model.fused.resolve_fused_kernels`.
    """
    if cfg.arch not in ("llama", "ltg_bert"):
        raise ValueError(f"model.arch={cfg.arch!r} is not known; use llama or ltg_bert")
    backends = resolve_model_backends(cfg, device)
    if cfg.arch == "llama":
        from antlm_dist.model.fused import resolve_fused_kernels, set_fused_kernels
        from antlm_dist.model.llama import AntLMForPretraining

        model = AntLMForPretraining(cfg, backends)
        set_fused_kernels(model, resolve_fused_kernels(cfg.fused_kernels, device))
        return model
    from antlm_dist.model.ltg_bert import LtgBertForPretraining

    return LtgBertForPretraining(cfg, backends)
