"""Every random seed of a run, derived in one place.

All seeds come from ``train.seed`` and integers that name their use, hashed by
:func:`derive_seed`, so they are stable across processes, world sizes and Python versions:

* model initialisation: ``(seed, rank)``; rank 0's draw is what ``antlm-export --untrained``
  reproduces (:func:`seed_model_init`);
* the per-epoch shuffle of the sampler: ``(seed, epoch)``;
* the MLM mask of one sample: ``(seed, epoch, sample index)``;
* held-out evaluation masks: ``(seed, EVAL_EPOCH, sample index)``, fixed across evaluations.
"""
from __future__ import annotations

import hashlib

import torch

EVAL_EPOCH = 1_000_003
"""The 'epoch' used to seed evaluation masks: fixed, and distinct from training epochs."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def seed_model_init(seed: int, rank: int = 0) -> None:
    """Seed torch's global generator before ``build_model`` on ``rank`` (the trainer seeds
    every rank this way; export's untrained baseline uses rank 0)."""
    torch.manual_seed(derive_seed(seed, rank))
