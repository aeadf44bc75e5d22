"""The LM head, which also computes the loss so ZeRO-3 gathers its weight for it.

ZeRO-3 partitions every parameter and gathers it only while its own module's
``forward`` runs, so the loss (which reads the head weight) runs inside
:meth:`LMHead.forward`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn


class LossOutput(NamedTuple):
    """loss_sum: fp32 scalar, summed cross-entropy (nats) over target rows.
    n_targets: int64 scalar, rows with a label. n_correct: int64 scalar, top-1 hits."""

    loss_sum: torch.Tensor
    n_targets: torch.Tensor
    n_correct: torch.Tensor


def project_or_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None, loss_impl: str):
    """Logits (…, V) = hidden (…, H) · weightᵀ when ``labels`` is None; else the
    :class:`LossOutput` of :func:`antlm_dist.kernels.masked_token_loss` over the rows whose
    label (…) int64 is not ``IGNORE_INDEX`` (-100; the full logits are never materialised).
    ``loss_impl`` is the resolved backend, ``"triton"`` or ``"torch"``.

    Call it from the ``forward`` of the module that owns ``weight`` (ZeRO-3 gathers it there).
    """
    if labels is None:
        return nn.functional.linear(hidden, weight)
    from antlm_dist.kernels import masked_token_loss

    loss, n, correct = masked_token_loss(
        hidden, weight, labels, reduction="sum", return_accuracy=True,
        backend=loss_impl,
    )
    return LossOutput(loss, n, correct)


class LMHead(nn.Module):
    """``weight`` (V, H) without bias, named ``lm_head.weight`` as in HF Llama.

    ``forward(hidden)`` returns logits (…, V); ``forward(hidden, labels)`` (labels (…) int64,
    aligned to positions, -100 = no loss) returns a
    :class:`LossOutput` computed by :func:`antlm_dist.kernels.masked_token_loss`: only the
    rows whose label is not -100 reach the head, in chunks, so the full logits are never
    materialised.
    """

    def __init__(self, hidden_size: int, vocab_size: int, loss_impl: str = "torch"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.loss_impl = loss_impl

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None):
        return project_or_loss(hidden, self.weight, labels, self.loss_impl)
