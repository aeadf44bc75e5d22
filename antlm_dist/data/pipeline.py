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

    Collective (a barrier). The tokenizer is saved under ``<out>/tokenizer``. A trained
    tokenizer smaller than ``model.vocab_size`` (a small corpus has fewer distinct pairs to
    merge) fits the model to it: :func:`fit_vocab_size` changes ``recipe`` in place, and
    every rank reads the same file, so all ranks agree.

    Returns:
        (``PreTrainedTokenizerFast``, sha256 hex of its ``tokenizer.json``).

    Raises:
        TokenizerError: its vocabulary differs from ``model.vocab_size`` (a given
            ``tokenizer.path``, or a trained one larger than asked for).
    """
    run_tok = Path(out) / "tokenizer" / "tokenizer.json"
    t = recipe.tokenizer
    if rank == 0 and not run_tok.is_file():
        if t.path:
            save_tokenizer(load_tokenizer(t.path, t.kind), Path(out) / "tokenizer")
        else:
            vocab = t.vocab_size or recipe.model.vocab_size
            log.info("training a %s tokenizer (%d tokens) on %d files", t.kind, vocab, len(train_files))
            save_tokenizer(train_tokenizer(train_files, vocab, t.min_frequency, t.kind, t.normalization,
                                           t.add_prefix_space), Path(out) / "tokenizer", t.kind)
    barrier()
    tok = load_tokenizer(run_tok, t.kind)
    fit_vocab_size(recipe, len(tok))
    check_vocab_matches(tok, recipe.model.vocab_size, str(t.path or run_tok))
    return tok, tokenizer_hash(run_tok)


def fit_vocab_size(recipe: Recipe, n_tokens: int) -> bool:
    """Shrink ``model.vocab_size`` to a trained tokenizer of ``n_tokens`` tokens when it came out smaller.

    The model is fitted exactly, not rounded up to a multiple of 64: rows beyond the
    tokenizer would be ids that no text produces, yet MLM's random replacement draws from
    ``[0, model.vocab_size)`` and the exported model would promise tokens the tokenizer
    lacks. (On a GPU, a multiple of 64 is faster; choose such a ``model.vocab_size`` for a
    corpus that fills it.) A given ``tokenizer.path`` is never fitted: a mismatch there is
    an error. The change goes into the resolved recipe (``recipe.yaml``, checkpoints) and
    the log.

    Returns:
        True when ``recipe`` was changed.
    """
    m, t = recipe.model, recipe.tokenizer
    if t.path or n_tokens >= m.vocab_size:
        return False
    log.info("the tokenizer trained on this corpus has %d tokens, fewer than model.vocab_size=%d: the model is "
             "fitted to it (model.vocab_size=%d, recorded in recipe.yaml)", n_tokens, m.vocab_size, n_tokens)
    m.vocab_size = n_tokens
    if t.vocab_size is not None:
        t.vocab_size = n_tokens  # the recipe requires the two to be equal when both are set
    return True


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
