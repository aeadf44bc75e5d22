"""Tokenise a corpus with ``datasets`` and pack it into fixed-length blocks.

Each line (an utterance, verse or paragraph in the BabyLM layout) is tokenised and
followed by ``</s>``; the token stream is concatenated in file order and cut into blocks
of ``seq_len`` tokens (the last partial block of each map batch is dropped, as in
Hugging Face's ``run_clm.py``). Tokenisation is a cached, multi-process ``datasets.map``.

Words are counted as BabyLM counts them: whitespace-separated (``str.split()``) in the raw
text. Each block carries the number of words whose first token lies in it; the words of
the tokens that packing drops at the end of a map batch count in that batch's last block,
so the sum over all blocks equals the corpus's word count exactly (:func:`block_word_counts`).
"""
from __future__ import annotations

from pathlib import Path

import re

import numpy as np

PACK_BATCH_LINES = 20_000
_WORD = re.compile(r"\S+")  # a BabyLM word: a maximal run of non-whitespace, as str.split() finds it


def word_start_tokens(text: str, offsets) -> list[int]:
    """Token index (within ``text``'s tokens) of the first token of each whitespace word.

    Args:
        text: one line of raw text.
        offsets: the tokenizer's ``(start, end)`` character span of each token of ``text``
            (``return_offsets_mapping``), in the raw text's coordinates, non-decreasing.

    Returns:
        One int per word of ``text.split()``: the token that holds the word's first
        character, i.e. the last token that starts at or before it among those that end
        after it (a space the tokenizer adds before the line shares the first character's
        span, and is passed over). A word that no token covers (the tokenizer dropped it)
        maps to ``len(offsets)``, the line's closing eos token, so no word is ever lost.
    """
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
    chars = np.fromiter((m.start() for m in _WORD.finditer(text)), dtype=np.int64)
    first_ending_after = np.searchsorted(ends, chars, side="right")
    last_starting_at_or_before = np.searchsorted(starts, chars, side="right") - 1
    return np.maximum(first_ending_after, last_starting_at_or_before).tolist()


def _tokenize_fn(tokenizer, eos_id: int):
    def fn(batch):
        enc = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=True)
        return {"ids": [ids + [eos_id] for ids in enc["input_ids"]],
                "word_starts": [word_start_tokens(t, o) for t, o in zip(batch["text"], enc["offset_mapping"])]}

    return fn


def _pack_fn(seq_len: int):
    def fn(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        n = (len(flat) // seq_len) * seq_len
        # block of each word's first token; words in the dropped tail go to the batch's last block
        first_tokens, offset = [], 0
        for ids, starts in zip(batch["ids"], batch["word_starts"]):
            first_tokens.extend(offset + s for s in starts)
            offset += len(ids)
        words = np.bincount(np.minimum(np.asarray(first_tokens, dtype=np.int64) // seq_len, max(n // seq_len - 1, 0)),
                            minlength=n // seq_len)[: n // seq_len]
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, n, seq_len)], "words": words.tolist()}

    return fn


def build_packed_dataset(files, tokenizer, seq_len: int, cache_dir: Path, num_proc: int = 1, desc: str = "train"):
    """Tokenise ``files`` and pack into ``seq_len`` blocks (:func:`tokenize_and_pack` without the word total)."""
    return tokenize_and_pack(files, tokenizer, seq_len, cache_dir, num_proc, desc)[0]


def tokenize_and_pack(files, tokenizer, seq_len: int, cache_dir: Path, num_proc: int = 1, desc: str = "train"):
    """Tokenise ``files``, pack into ``seq_len`` blocks and count the corpus's words.

    Args:
        files: UTF-8 text files (one line per utterance/paragraph), read in this order.
        tokenizer: a ``PreTrainedTokenizerFast`` (a fast tokenizer: word counting reads its
            offsets) whose ``eos_token_id`` ends every line.
        seq_len: tokens per block.
        cache_dir: ``datasets`` cache folder; a rerun with the same files and tokenizer
            reuses it.
        num_proc: worker processes for the tokenising ``map``.

    Returns:
        (``datasets.Dataset`` with columns ``input_ids`` (int32 lists of ``seq_len``) and
        ``words`` (words whose first token lies in the block, see the module's docstring);
        it may have 0 rows when the text is shorter than one block,
        the number of whitespace-separated words of ``files``).
    """
    import datasets
    import pyarrow.compute as pc

    datasets.disable_progress_bars()
    raw = datasets.load_dataset(
        "text", data_files={desc: [str(f) for f in files]}, split=desc,
        cache_dir=str(cache_dir), keep_linebreaks=False,
    )
    raw = raw.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
    n_proc = max(1, min(num_proc, len(raw) // 1000 or 1))
    tok = raw.map(
        _tokenize_fn(tokenizer, tokenizer.eos_token_id), batched=True, num_proc=n_proc,
        remove_columns=raw.column_names, desc=f"tokenising {desc}",
    )
    total_words = int(pc.sum(pc.list_value_length(tok.data.column("word_starts"))).as_py() or 0)
    packed = tok.map(
        _pack_fn(seq_len), batched=True, batch_size=PACK_BATCH_LINES,
        remove_columns=tok.column_names, desc=f"packing {desc}",
    )
    return packed.cast_column("input_ids", datasets.Sequence(datasets.Value("int32"))), total_words


def blocks_array(dataset) -> np.ndarray:
    """The packed ``input_ids`` of :func:`build_packed_dataset` as one (N, T) int32 array.

    N may be 0 (then the array is (0, 0)).
    """
    if len(dataset) == 0:
        return np.zeros((0, 0), dtype=np.int32)
    arr = np.asarray(dataset.with_format("numpy")["input_ids"], dtype=np.int32)
    return np.ascontiguousarray(arr.reshape(len(dataset), -1))


def block_word_counts(dataset, total_words: int) -> np.ndarray:
    """(N,) int64 words per block of :func:`tokenize_and_pack`, summing to ``total_words``.

    A map batch too short for one block (only the last can be) keeps its words; they are
    added to the last block, so that one pass over all blocks counts every word of the
    corpus. N may be 0 (then the array is empty).
    """
    if len(dataset) == 0:
        return np.zeros((0,), dtype=np.int64)
    words = np.asarray(dataset.with_format("numpy")["words"], dtype=np.int64).copy()
    words[-1] += total_words - int(words.sum())
    return words
