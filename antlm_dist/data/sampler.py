"""Deterministic, resumable distributed sampling of packed blocks.

Epoch ``e`` visits the blocks in the order ``randperm(N)`` drawn from a generator
seeded by (seed, e). Optimizer step ``s`` of the epoch consumes the contiguous slice
``perm[s*G : (s+1)*G]`` of that order, where G is the global batch (micro-batch ×
gradient accumulation × world size). Inside the slice, micro-batch ``m`` of rank ``r``
takes ``mb`` consecutive ids starting at ``(m * world + r) * mb``. The set of blocks of a
global step therefore depends only on (seed, epoch, step), not on the world size, and
the position in an epoch is a number of samples that converts between world sizes.
"""
from __future__ import annotations

import torch

from antlm_dist.seeding import derive_seed, seeded_generator  # noqa: F401  (derive_seed: kept importable here)


class DistributedResumableSampler:
    """Block ids for every (step, micro-batch, rank); its whole state is the global step.

    Args:
        num_samples: packed blocks in the training set.
        micro_batch_size: blocks per rank per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        world_size, rank: data-parallel layout.
        seed: base seed of the per-epoch shuffle.

    Raises:
        ValueError: fewer samples than one global batch, naming the numbers and the fix.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, gradient_accumulation_steps: int,
                 world_size: int, rank: int, seed: int):
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = micro_batch_size * gradient_accumulation_steps * world_size
        if num_samples < self.global_batch:
            raise ValueError(
                f"the training set has {num_samples} blocks, fewer than one global batch of "
                f"{self.global_batch} (train.micro_batch_size × train.gradient_accumulation_steps × "
                f"world size); use a larger corpus or smaller batches"
            )
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; the incomplete last global batch is dropped."""
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        """(N,) int64 visiting order of ``epoch``, from a generator seeded by (seed, epoch)."""
        cached = self._perm_cache  # one read: the prefetch thread and the trainer both call this
        if cached is None or cached[0] != epoch:
            cached = (epoch, torch.randperm(self.num_samples, generator=seeded_generator(self.seed, epoch)))
            self._perm_cache = cached
        return cached[1]

    def global_batch_ids(self, step: int) -> torch.Tensor:
        """(G,) int64 block ids of global optimizer ``step`` over all ranks and micro-batches;
        the same on every rank and at every world size."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        base = step_in_epoch * self.global_batch
        return self.permutation(epoch)[base : base + self.global_batch]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's block ids for global optimizer ``step``: one list per micro-batch."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        base = step_in_epoch * self.global_batch
        mb = self.micro_batch_size
        out = []
        for m in range(self.gradient_accumulation_steps):
            start = base + (m * self.world_size + self.rank) * mb
            out.append(perm[start : start + mb].tolist())
        return out

    def state_dict(self, step: int) -> dict:
        """Position after ``step`` optimizer steps: epoch and samples consumed in it."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "position": step_in_epoch * self.global_batch, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch": self.global_batch}

    def step_from_state(self, state: dict) -> int:
        """The global step at which to resume from a saved :meth:`state_dict`.

        Raises:
            ValueError: the data or global batch changed so the position cannot map.
        """
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"the checkpoint was trained on {state['num_samples']} blocks but the corpus now "
                f"gives {self.num_samples}; resume with the same corpus, tokenizer and data.seq_len"
            )
        if state["position"] % self.global_batch:
            raise ValueError(
                f"the checkpoint stopped {state['position']} samples into epoch {state['epoch']}, "
                f"which is not a whole number of global batches of {self.global_batch}; keep the "
                "global batch (micro-batch × accumulation × world size) unchanged across resumes"
            )
        return state["epoch"] * self.steps_per_epoch + state["position"] // self.global_batch
