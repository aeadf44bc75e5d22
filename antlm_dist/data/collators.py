"""One collator per objective. Labels are aligned to positions.

``labels[b, t]`` is the token the hidden state at position t must predict, and -100
means no loss there. (Hugging Face's causal ``labels`` are unshifted; ours are shifted
here, once, for every objective.)

* CLM: ``labels[t] = input_ids[t+1]``; the last position is -100.
* MLM, ``same_position`` (BERT, Devlin et al. 2019): ``labels[t]`` is the original token
  where t was selected. Of the selected positions 80% become ``<mask>``, 10% a random
  non-special token and 10% stay unchanged.
* MLM, ``next_position`` (MNTP, as in GPT-BERT, Charpentier & Samuel 2024): the input
  corruption is the same, but ``labels[t]`` is the original token at t+1 where t+1 was
  selected.

Masks are dynamic (new every epoch) and reproducible: each sample's draw comes from a
generator seeded by (seed, epoch, sample index), so a resumed run, at any world size,
draws the same masks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from antlm_dist.kernels.masked_token_loss import IGNORE_INDEX  # the loss owns it
from antlm_dist.seeding import seeded_generator


@dataclass
class Batch:
    """One micro-batch. All tensors are (B, T) on CPU.

    input_ids: int64 token ids (possibly corrupted for MLM).
    attention_mask: int64, 1 for a real token, 0 for padding.
    labels: int64 targets aligned to positions, -100 where no loss.
    segment_ids: int64 document ids inside each block, or None (``data.document_mask``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.attention_mask, self.labels, self.segment_ids)))

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def segment_ids_from_eos(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) document ids: a new segment starts after every ``</s>`` (which ends its own)."""
    is_eos = (input_ids == eos_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos


class CLMCollator:
    """Causal LM batches: labels[t] = input_ids[t+1], -100 at the last position and on padding."""

    causal = True

    def __init__(self, eos_id: int, pad_id: int, document_mask: bool = False):
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.document_mask = document_mask

    def __call__(self, blocks: torch.Tensor, sample_ids=None, epoch: int = 0) -> Batch:
        """blocks: (B, T) int64 token ids. ``sample_ids``/``epoch`` are unused (no randomness)."""
        input_ids = blocks.clone()
        attention_mask = (input_ids != self.pad_id).long()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = input_ids[:, 1:]
        labels[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
        seg = segment_ids_from_eos(input_ids, self.eos_id) if self.document_mask else None
        return Batch(input_ids, attention_mask, labels, seg)


class MLMCollator:
    """Masked LM batches with BERT's 80/10/10 corruption, seeded per (seed, epoch, sample).

    Args:
        mask_id, pad_id, eos_id: special token ids.
        special_ids: ids never selected for masking nor drawn as random replacements.
        vocab_size: size of the vocabulary (tokens).
        seed: base seed.
        mlm_probability: fraction of non-special tokens selected (0.15 in BERT and AntLM).
        mlm_target: ``same_position`` or ``next_position`` (see module docstring).
        document_mask: also emit ``segment_ids``.
    """

    causal = False

    def __init__(self, *, mask_id: int, pad_id: int, eos_id: int, special_ids, vocab_size: int, seed: int,
                 mlm_probability: float = 0.15, mlm_target: str = "same_position",
                 document_mask: bool = False):
        if mlm_target not in ("same_position", "next_position"):
            raise ValueError(f"objective.mlm_target={mlm_target!r}; use same_position or next_position")
        self.mask_id = mask_id
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.seed = seed
        self.p = mlm_probability
        self.mlm_target = mlm_target
        self.document_mask = document_mask
        special = torch.zeros(vocab_size, dtype=torch.bool)
        special[torch.as_tensor(sorted(set(special_ids)), dtype=torch.long)] = True
        self.is_special = special
        self.replacement_ids = torch.nonzero(~special).squeeze(1)

    def variant(self, *, mlm_probability: float | None = None, mlm_target: str | None = None) -> "MLMCollator":
        """A copy with another selection rate or target (e.g. MNTP from an MLM collator, or
        a step's scheduled mask rate); the draws per (seed, epoch, sample) are unchanged.

        Raises:
            ValueError: a rate outside (0, 1) or an unknown ``mlm_target``.
        """
        out = copy.copy(self)
        if mlm_probability is not None:
            if not 0.0 < mlm_probability < 1.0:
                raise ValueError(f"mask rate {mlm_probability} must lie in (0, 1)")
            out.p = mlm_probability
        if mlm_target is not None:
            if mlm_target not in ("same_position", "next_position"):
                raise ValueError(f"mlm_target={mlm_target!r}; use same_position or next_position")
            out.mlm_target = mlm_target
        return out

    def select(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(T,) bool selection for one sample: Bernoulli(p) over non-special tokens."""
        draw = torch.rand(tokens.shape, generator=generator)
        return (draw < self.p) & ~self.is_special[tokens]

    def draw(self, tokens: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(selected, action), both (T,), for one sample: the selected positions, and one
        U(0, 1) draw per position that picks ``<mask>`` (< 0.8), a random token (< 0.9) or
        the original. Subclasses change how positions are selected (e.g. spans)."""
        selected = self.select(tokens, generator)
        return selected, torch.rand(tokens.shape, generator=generator)

    def __call__(self, blocks: torch.Tensor, sample_ids, epoch: int) -> Batch:
        """blocks: (B, T) int64; sample_ids: the B dataset indices (for seeding)."""
        input_ids = blocks.clone()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for b, sid in enumerate(sample_ids):
            g = seeded_generator(self.seed, epoch, sid)
            original = blocks[b]
            selected, action = self.draw(original, g)
            random_tokens = self.replacement_ids[
                torch.randint(len(self.replacement_ids), original.shape, generator=g)
            ]
            row = input_ids[b]
            row[selected & (action < 0.8)] = self.mask_id
            to_random = selected & (action >= 0.8) & (action < 0.9)
            row[to_random] = random_tokens[to_random]
            if self.mlm_target == "same_position":
                labels[b][selected] = original[selected]
            else:
                nxt = selected[1:]
                labels[b, :-1][nxt] = original[1:][nxt]
        attention_mask = (blocks != self.pad_id).long()
        seg = segment_ids_from_eos(blocks, self.eos_id) if self.document_mask else None
        return Batch(input_ids, attention_mask, labels, seg)
