"""Span masking for the MLM phases (``objective.masking: span``), as in LTG-BERT.

LTG-BERT (Samuel et al. 2023) masks contiguous spans of subwords rather than single
tokens (SpanBERT, Joshi et al. 2020, with shorter spans). Per sample:

1. **Partition.** The block is cut into consecutive spans whose lengths are drawn from a
   geometric distribution, P(L = k) = p (1 - p)^(k-1) with p = 1/3 (mean 3), capped at 10
   (so P(L = 10) = (1 - p)^9). A special token (``</s>``, padding, ...) never belongs to a
   span, and a span never reaches across one: the partition is cut at every special token.
   Only the last span before a special token or the block end can be shorter than drawn.
2. **Select.** Each span is selected independently with probability ``mlm_probability``,
   so every non-special token is selected with exactly that probability (15% by default)
   and the selected spans' lengths follow the same capped geometric law.
3. **Corrupt.** BERT's 80/10/10 choice is made once per span: the whole span becomes
   ``<mask>``, or random non-special tokens (each position its own draw), or stays.

Labels follow the trainer's convention (see :mod:`antlm_dist.data.collators`):
``same_position`` puts the original token at every selected position; ``next_position``
(MNTP) puts the original token at t+1 on position t when t+1 was selected.

Draws are seeded by (seed, epoch, sample index) via
:func:`~antlm_dist.seeding.derive_seed`, as for token masking, so a resumed run draws
the same spans at any world size.
"""
from __future__ import annotations

import math

import torch

from antlm_dist.data.collators import MLMCollator

SPAN_GEOMETRIC_P = 1.0 / 3.0
"""Success probability of the geometric span-length distribution (mean span 3 tokens)."""
MAX_SPAN_LENGTH = 10
"""Longest span (tokens); longer draws are capped to this."""


def geometric_span_lengths(n: int, generator: torch.Generator, p: float = SPAN_GEOMETRIC_P,
                           max_length: int = MAX_SPAN_LENGTH) -> torch.Tensor:
    """(n,) int64 lengths min(L, max_length) with L ~ Geometric(p) on {1, 2, ...}.

    Inverse CDF: L = 1 + floor(log(U) / log(1 - p)) for U uniform on (0, 1].
    """
    u = 1.0 - torch.rand(n, generator=generator, dtype=torch.float64)  # (0, 1]
    lengths = torch.floor(torch.log(u) / math.log1p(-p)).long() + 1
    return lengths.clamp_(1, max_length)


def capped_geometric_pmf(p: float = SPAN_GEOMETRIC_P, max_length: int = MAX_SPAN_LENGTH) -> list[float]:
    """P(L = k) for k = 1..max_length of the capped geometric law (sums to 1)."""
    pmf = [p * (1 - p) ** (k - 1) for k in range(1, max_length)]
    return pmf + [(1 - p) ** (max_length - 1)]


class SpanMLMCollator(MLMCollator):
    """MLM batches with LTG-BERT span masking; the same arguments as :class:`MLMCollator`.

    Args:
        mask_id, pad_id, eos_id: special token ids.
        special_ids: ids never inside a span nor drawn as random replacements.
        vocab_size: size of the vocabulary (tokens).
        seed: base seed.
        mlm_probability: probability that a span is selected, hence the expected fraction of
            non-special tokens selected (0.15).
        mlm_target: ``same_position`` or ``next_position``.
        document_mask: also emit ``segment_ids``.
    """

    def span_selection(self, tokens: torch.Tensor, generator: torch.Generator):
        """Spans and their choices for one sample.

        Args:
            tokens: (T,) int64 original token ids.
            generator: the sample's generator (consumes 3 draws of T numbers).

        Returns:
            ``(selected, span_id, action)``: selected (T,) bool; span_id (T,) int64, the
            span of each position (-1 on special tokens; ids increase left to right);
            action (T,) float64 in [0, 1), constant within a span: < 0.8 mask, < 0.9 random
            token, else keep.
        """
        seq_len = tokens.shape[0]
        lengths = geometric_span_lengths(seq_len, generator)
        starts = torch.cumsum(lengths, 0) - lengths
        boundary = torch.zeros(seq_len, dtype=torch.bool)
        boundary[starts[starts < seq_len]] = True
        special = self.is_special[tokens]
        boundary[1:] |= special[:-1]  # a span restarts after every special token
        span_id = torch.cumsum(boundary.long(), 0) - 1
        span_id[special] = -1
        span_draw = torch.rand(seq_len, generator=generator, dtype=torch.float64)  # one per span id (ids < T)
        action_draw = torch.rand(seq_len, generator=generator, dtype=torch.float64)
        ids = span_id.clamp(min=0)
        selected = (span_draw[ids] < self.p) & ~special
        return selected, span_id, action_draw[ids]

    def draw(self, tokens: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Span selection with one 80/10/10 draw per span (see :meth:`span_selection`)."""
        selected, _, action = self.span_selection(tokens, generator)
        return selected, action
