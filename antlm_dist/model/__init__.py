"""Backbones. :func:`build_model` picks one from ``model.arch``."""
from __future__ import annotations

from antlm_dist.config import ModelConfig


def build_model(cfg: ModelConfig):
    """Instantiate the backbone + LM head for ``cfg.arch``.

    Raises:
        ValueError: unknown ``model.arch``.
    """
    if cfg.arch == "llama":
        from antlm_dist.model.llama import AntLMForPretraining

        return AntLMForPretraining(cfg)
    if cfg.arch == "ltg_bert":
        from antlm_dist.model.ltg_bert import LtgBertForPretraining

        return LtgBertForPretraining(cfg)
    raise ValueError(f"model.arch={cfg.arch!r} is not known; use llama or ltg_bert")
