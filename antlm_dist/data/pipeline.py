"""From a recipe to training batches: the run's tokenizer, the phase collators, and a
prefetch thread that collates the next optimizer step while the current one trains.

Collation is deterministic (each MLM mask comes from its own generator seeded by
(seed, epoch, sample), see :mod:`antlm_dist.seeding`) and never touches torch's global
generator, so collating in another thread yields exactly the batches the training thread
would have built itself.
"""
from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from antlm_dist.config import Recipe
from antlm_dist.data.collators import CLMCollator, MLMCollator
from antlm_dist.data.tokenizer import (check_vocab_matches, load_tokenizer, save_tokenizer, special_token_ids,
                                       tokenizer_hash, train_tokenizer)
from antlm_dist.distributed import barrier
from antlm_dist.mixing import collate_step
from antlm_dist.schedule import phase_for_step

log = logging.getLogger("antlm_dist")


def prepare_tokenizer(recipe: Recipe, out: Path, train_files, rank: int):
    """Load ``tokenizer.path`` or the run's saved tokenizer, else train one on rank 0.

    Collective (a barrier). The tokenizer is saved under ``<out>/tokenizer``.

    Returns:
        (``PreTrainedTokenizerFast``, sha256 hex of its ``tokenizer.json``).

    Raises:
        TokenizerError: its vocabulary differs from ``model.vocab_size``.
    """
    run_tok = Path(out) / "tokenizer" / "tokenizer.json"
    if rank == 0 and not run_tok.is_file():
        if recipe.tokenizer.path:
            save_tokenizer(load_tokenizer(recipe.tokenizer.path, recipe.tokenizer.kind), Path(out) / "tokenizer")
        else:
            vocab = recipe.tokenizer.vocab_size or recipe.model.vocab_size
            kind = recipe.tokenizer.kind
            log.info("training a %s tokenizer (%d tokens) on %d files", kind, vocab, len(train_files))
            save_tokenizer(train_tokenizer(train_files, vocab, recipe.tokenizer.min_frequency, kind),
                           Path(out) / "tokenizer", kind)
    barrier()
    tok = load_tokenizer(run_tok, recipe.tokenizer.kind)
    check_vocab_matches(tok, recipe.model.vocab_size, str(recipe.tokenizer.path or run_tok))
    return tok, tokenizer_hash(run_tok)


def make_collators(recipe: Recipe, tok):
    """(CLM collator, MLM collator) for the recipe's objective settings and ``tok``'s special tokens."""
    special = special_token_ids(tok)  # by role (pad, bos, eos, unk, mask), whatever the tokenizer kind
    clm = CLMCollator(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, document_mask=recipe.data.document_mask)
    kwargs = dict(mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, special_ids=special,
                  vocab_size=recipe.model.vocab_size, seed=recipe.train.seed,
                  mlm_probability=recipe.objective.mlm_probability, mlm_target=recipe.objective.mlm_target,
                  document_mask=recipe.data.document_mask)
    if recipe.objective.masking == "span":
        from antlm_dist.data.span_masking import SpanMLMCollator

        mlm = SpanMLMCollator(**kwargs)
    else:
        mlm = MLMCollator(**kwargs)
    return clm, mlm


class BatchPrefetcher:
    """Iterates ``(step, phase, micro_batches)`` for steps ``start .. stop-1``, collated by a
    daemon thread that stays at most ``depth`` steps ahead.

    Args:
        blocks: the training blocks (indexing with ids gives (B, T) int64).
        sampler: :class:`~antlm_dist.data.sampler.DistributedResumableSampler`.
        collators: ``{"CLM": collator, "MLM": collator}`` (and ``"MNTP"``, see
            :func:`antlm_dist.mixing.collators_for`).
        phases, steps_per_epoch: the schedule, for :func:`antlm_dist.schedule.phase_for_step`.
        mask_rate: ``step -> rate`` for a scheduled mask rate, or None (the collators' own).

    A mixed phase's micro-batches come as ``(objective, Batch)`` pairs
    (:func:`antlm_dist.mixing.collate_step`).

    An exception in the thread is raised again by the iterator. :meth:`close` stops the
    thread (the trainer calls it when it stops early).
    """

    def __init__(self, blocks, sampler, collators, phases, steps_per_epoch: int, start: int, stop: int,
                 depth: int = 2, mask_rate=None):
        self._args = (blocks, sampler, collators, phases, steps_per_epoch)
        self._mask_rate = mask_rate
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._range = (start, stop)
        self._thread = threading.Thread(target=self._fill, name="antlm-collate", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        blocks, sampler, collators, phases, steps_per_epoch = self._args
        try:
            for step in range(*self._range):
                phase = phase_for_step(step, phases, steps_per_epoch)
                rate = None if self._mask_rate is None else self._mask_rate(step)
                micro = collate_step(blocks, sampler, collators, phase, step, rate)
                if not self._put((step, phase, micro)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        for _ in range(*self._range):
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
