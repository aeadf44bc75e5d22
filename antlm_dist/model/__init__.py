"""Backbones. :func:`build_model` picks one from ``model.arch`` and resolves its kernel
backends once (:func:`antlm_dist.kernels.backend.resolve_backends`)."""
from __future__ import annotations

import torch

from antlm_dist.config import ModelConfig
from antlm_dist.model.backends import check_model_backends, resolve_model_backends  # noqa: F401  (re-exported)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None):
    """Instantiate the backbone + LM head for ``cfg.arch``, with kernel backends for ``device``
    (the device the model will run on; default CUDA when available, else the CPU).

    Raises:
        ValueError: unknown ``model.arch``.
        ConfigError: see :func:`resolve_model_backends`.
    """
    if cfg.arch not in ("llama", "ltg_bert"):
        raise ValueError(f"model.arch={cfg.arch!r} is not known; use llama or ltg_bert")
    backends = resolve_model_backends(cfg, device)
    if cfg.arch == "llama":
        from antlm_dist.model.llama import AntLMForPretraining

        return AntLMForPretraining(cfg, backends)
    from antlm_dist.model.ltg_bert import LtgBertForPretraining

    return LtgBertForPretraining(cfg, backends)
