"""Tokenise a corpus with ``datasets`` and pack it into fixed-length blocks.

Each line (an utterance, verse or paragraph in the BabyLM layout) is tokenised and
followed by ``</s>``; the token stream is concatenated in file order and cut into blocks
of ``seq_len`` tokens (the last partial block of each map batch is dropped, as in
Hugging Face's ``run_clm.py``). Tokenisation is a cached, multi-process ``datasets.map``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PACK_BATCH_LINES = 20_000


def _tokenize_fn(tokenizer, eos_id: int):
    def fn(batch):
        enc = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [ids + [eos_id] for ids in enc]}

    return fn


def _pack_fn(seq_len: int):
    def fn(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        n = (len(flat) // seq_len) * seq_len
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, n, seq_len)]}

    return fn


def build_packed_dataset(files, tokenizer, seq_len: int, cache_dir: Path, num_proc: int = 1, desc: str = "train"):
    """Tokenise ``files`` and pack into ``seq_len`` blocks.

    Args:
        files: UTF-8 text files (one line per utterance/paragraph), read in this order.
        tokenizer: a ``PreTrainedTokenizerFast`` whose ``eos_token_id`` is ``</s>``.
        seq_len: tokens per block.
        cache_dir: ``datasets`` cache folder; a rerun with the same files and tokenizer
            reuses it.
        num_proc: worker processes for the tokenising ``map``.

    Returns:
        ``datasets.Dataset`` with one column ``input_ids`` (int32 lists of ``seq_len``).
        It may have 0 rows when the text is shorter than one block.
    """
    import datasets

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
    packed = tok.map(
        _pack_fn(seq_len), batched=True, batch_size=PACK_BATCH_LINES,
        remove_columns=tok.column_names, desc=f"packing {desc}",
    )
    return packed.cast_column("input_ids", datasets.Sequence(datasets.Value("int32")))


def blocks_array(dataset) -> np.ndarray:
    """The packed ``input_ids`` of :func:`build_packed_dataset` as one (N, T) int32 array.

    N may be 0 (then the array is (0, 0)).
    """
    if len(dataset) == 0:
        return np.zeros((0, 0), dtype=np.int32)
    arr = np.asarray(dataset.with_format("numpy")["input_ids"], dtype=np.int32)
    return np.ascontiguousarray(arr.reshape(len(dataset), -1))
