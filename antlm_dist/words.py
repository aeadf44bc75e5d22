"""Words seen: the BabyLM measure of training data, its budget and its milestones (exported by
:func:`antlm_dist.export.export_milestones`).

BabyLM counts words as whitespace-separated strings of the training text (Warstadt et al.
2023; the 2025 call caps the strict tracks at 100M words seen, epochs included, and asks
for intermediate checkpoints named by the words seen). The packed-block cache stores how
many words start in each block (:mod:`antlm_dist.data.dataset`), so the words of one
optimizer step are the sum over the blocks of its global batch. Every rank computes that
sum from the sampler's indices, which do not depend on the world size, so the count needs
no communication and stays exact across resumes at any world size.

Milestones (``checkpoint.milestones_words``) are written as:

* ``babylm`` (the default): the BabyLM 2025 list, every 1M words to 10M, then every 10M
  to 100M (:data:`BABYLM_2025_MILESTONES`);
* a list of word counts, each an integer or a string with a ``k`` (10³) or ``M`` (10⁶)
  suffix, e.g. ``[50k, 100k, 1.5M]``;
* ``every <count>``, e.g. ``every 50k``: every multiple of that count, without end;
* ``none`` or ``[]``: no milestone exports.

A milestone's folder is ``<run>/hf/chck_<name>`` with :func:`milestone_name`: ``1M`` for
whole millions (the BabyLM names), else ``50k`` for whole thousands, else the plain count
(``chck_1500k`` is 1.5M words, ``chck_250`` is 250 words).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

BABYLM_2025_MILESTONES = tuple([m * 10**6 for m in range(1, 11)] + [m * 10**6 for m in range(20, 101, 10)])
"""Words seen at the BabyLM 2025 intermediate checkpoints: 1M … 10M, then 20M … 100M."""
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6}


# ----------------------------------------------------------------------------- parsing

def parse_word_count(value, field: str) -> int:
    """A positive word count from an int or a string such as ``50k``, ``1.5M`` or ``100M``.

    Raises:
        ValueError: not a positive whole number of words, naming ``field`` and the forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"{field}={value!r} is not a word count; give an integer or e.g. 50k, 1.5M, 100M")
    if isinstance(value, int):
        words = value
    else:
        match = _COUNT.match(str(value))
        if not match:
            raise ValueError(f"{field}={value!r} is not a word count; give an integer or e.g. 50k, 1.5M, 100M")
        scaled = float(match.group(1)) * _SCALE[match.group(2).lower()]
        if scaled != int(scaled):
            raise ValueError(f"{field}={value!r} is not a whole number of words")
        words = int(scaled)
    if words <= 0:
        raise ValueError(f"{field}={value!r} must be a positive number of words")
    return words


class Milestones:
    """The word counts at which a run exports a Hugging Face folder.

    Args:
        fixed: sorted distinct word counts.
        every: with ``fixed`` empty, every positive multiple of this count instead.
    """

    def __init__(self, fixed: tuple[int, ...] = (), every: int | None = None):
        self.fixed, self.every = tuple(fixed), every

    @classmethod
    def parse(cls, spec, field: str = "checkpoint.milestones_words") -> "Milestones":
        """Read ``checkpoint.milestones_words`` (see the module's docstring for the forms).

        Raises:
            ValueError: an unknown form or a bad count, naming ``field`` and the forms.
        """
        if spec is None or (isinstance(spec, str) and spec.strip().lower() == "none"):
            return cls()
        if isinstance(spec, str) and spec.strip().lower() == "babylm":
            return cls(BABYLM_2025_MILESTONES)
        if isinstance(spec, str) and spec.strip().lower().startswith("every "):
            return cls(every=parse_word_count(spec.strip()[len("every "):], field))
        if isinstance(spec, (int, str)) and not isinstance(spec, bool):
            spec = [spec]
        if not isinstance(spec, (list, tuple)):
            raise ValueError(f"{field}={spec!r} is not allowed; give babylm, none, 'every 50k' or a list of "
                             "word counts such as [50k, 100k, 1M]")
        return cls(tuple(sorted({parse_word_count(v, f"{field}[{i}]") for i, v in enumerate(spec)})))

    def crossed(self, before: int, after: int) -> list[int]:
        """The milestones m with ``before < m <= after``, ascending."""
        if self.every:
            return list(range((before // self.every + 1) * self.every, after + 1, self.every))
        return [m for m in self.fixed if before < m <= after]

    def __bool__(self) -> bool:
        return bool(self.fixed or self.every)


def milestone_name(words: int) -> str:
    """Folder suffix for a milestone: ``1M``, ``50k``, ``1500k`` or ``250`` (see the module)."""
    if words % 10**6 == 0:
        return f"{words // 10**6}M"
    if words % 10**3 == 0:
        return f"{words // 10**3}k"
    return str(words)


# ----------------------------------------------------------------------------- counting

class WordCounter:
    """Words of the training text consumed by each global optimizer step.

    Args:
        block_words: (N,) int64 words whose first token lies in each packed block.
        sampler: the run's :class:`~antlm_dist.data.sampler.DistributedResumableSampler`.

    Raises:
        ValueError: ``block_words`` is missing or does not match the sampler's N.
    """

    def __init__(self, block_words: np.ndarray | None, sampler):
        if block_words is None or len(block_words) != sampler.num_samples:
            raise ValueError(f"word counts for {sampler.num_samples} blocks are needed, got "
                             f"{None if block_words is None else len(block_words)}; rebuild the block cache")
        self.block_words = np.asarray(block_words, dtype=np.int64)
        self.sampler = sampler
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def step_words(self, step: int) -> int:
        """Words of global optimizer ``step`` (0-based): the sum over its whole global batch."""
        return int(self.block_words[self.sampler.global_batch_ids(step).numpy()].sum())

    def _cumulative(self, epoch: int) -> np.ndarray:
        """(S+1,) int64 words after 0..S steps of ``epoch`` (S = steps per epoch)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            s, g = self.sampler.steps_per_epoch, self.sampler.global_batch
            ids = self.sampler.permutation(epoch)[: s * g].numpy()
            per_step = self.block_words[ids].reshape(s, g).sum(axis=1)  # (S,) words per step
            self._epoch_cache = (epoch, np.concatenate([[0], np.cumsum(per_step)]))
        return self._epoch_cache[1]

    def words_after(self, steps: int) -> int:
        """Words seen after the first ``steps`` optimizer steps of the run."""
        epochs, rest = divmod(steps, self.sampler.steps_per_epoch)
        return int(sum(self._cumulative(e)[-1] for e in range(epochs)) + self._cumulative(epochs)[rest])

    def last_step_within(self, budget: int, n_steps: int) -> int:
        """The most optimizer steps (at most ``n_steps``) whose words seen stay ``<= budget``."""
        done, seen = 0, 0
        while done < n_steps:
            epoch = done // self.sampler.steps_per_epoch
            cum = self._cumulative(epoch)[: n_steps - done + 1]
            if seen + cum[-1] > budget:  # the budget ends inside this epoch
                return done + int(np.searchsorted(cum, budget - seen, side="right")) - 1
            done, seen = done + len(cum) - 1, seen + int(cum[-1])
        return n_steps
