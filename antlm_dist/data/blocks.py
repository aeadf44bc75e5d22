"""The packed-block cache: tokenised corpora stored once per node as int32 ``.npy`` files,
memory-mapped read-only by every rank and cast to int64 one batch at a time.

A cache file is named by the corpus files (path, size, mtime), the tokenizer hash and
``seq_len``, so any change of those builds a new file. Local rank 0 builds it
(``datasets.map``, atomically renamed into place); the other ranks wait at a barrier and
then map the same file. The operating system shares the mapped pages between the ranks
of a node, so the blocks cost each rank only the pages it touches.

Beside each cache file, ``<name>-<key>.words.npy`` holds the (N,) int64 word count of
every block (:mod:`antlm_dist.data.dataset`: words whose first token lies in the block;
the counts of all blocks sum to the corpus's whitespace word count).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from antlm_dist.data.dataset import block_word_counts, blocks_array, tokenize_and_pack
from antlm_dist.distributed import barrier


class PackedBlocks:
    """(N, T) int32 token blocks, usually a read-only memory map; indexing casts to int64.

    ``blocks[ids]`` (a list, tuple, array or tensor of N-indices) returns a new (B, T)
    int64 tensor, the dtype the collators expect; ``blocks[a:b]`` returns another
    ``PackedBlocks`` viewing the same memory (no copy).

    ``words`` is the (N,) int64 number of corpus words whose first token lies in each
    block, or None when unknown; slicing slices it too.
    """

    def __init__(self, array: np.ndarray, words: np.ndarray | None = None):
        if array.ndim != 2:
            raise ValueError(f"PackedBlocks needs a (N, T) array, got shape {array.shape}")
        if words is not None and words.shape != (array.shape[0],):
            raise ValueError(f"PackedBlocks: words has shape {words.shape}, expected ({array.shape[0]},)")
        self.array = array
        self.words = words

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PackedBlocks(self.array[index], None if self.words is None else self.words[index])
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        rows = self.array[np.asarray(index, dtype=np.int64)]  # fancy indexing copies just these rows
        return torch.from_numpy(rows.astype(np.int64))


def cache_key(files, tok_hash: str, seq_len: int) -> str:
    """16 hex digits naming a cache file: files (resolved path, size, mtime), tokenizer, seq_len."""
    h = hashlib.sha256(f"{tok_hash}:{seq_len}".encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_blocks(files, tokenizer, tok_hash: str, seq_len: int, cache_dir: Path, num_proc: int,
                build: bool, name: str) -> PackedBlocks:
    """The (N, T) packed blocks of ``files``, built into ``cache_dir`` if ``build`` and absent.

    Collective when a process group is initialised (a barrier after the build): every rank
    calls it, ``build`` is true on one rank per node.

    Args:
        files: text files, in order. tokenizer/tok_hash: the run's tokenizer and its hash.
        seq_len: tokens per block. cache_dir: the node's cache folder.
        num_proc: ``datasets.map`` workers for the build. name: "train" or "dev".

    Returns:
        :class:`PackedBlocks` over a read-only int32 memory map ((0, seq_len) without
        files), with the (N,) int64 words per block.
    """
    if not files:
        return PackedBlocks(np.zeros((0, seq_len), dtype=np.int32), np.zeros((0,), dtype=np.int64))
    path = Path(cache_dir) / f"{name}-{cache_key(files, tok_hash, seq_len)}.npy"
    words_path = path.with_name(path.name[: -len(".npy")] + ".words.npy")
    if build and not (path.is_file() and words_path.is_file()):  # a cache from before word counts is rebuilt
        ds, total_words = tokenize_and_pack(files, tokenizer, seq_len, Path(cache_dir) / "hf", num_proc=num_proc,
                                            desc=name)
        _save_atomic(words_path, block_word_counts(ds, total_words))  # first: the blocks file marks completion
        _save_atomic(path, blocks_array(ds).astype(np.int32, copy=False))
    barrier()
    arr = np.load(path, mmap_mode="r")
    words = np.load(words_path)
    if arr.shape[0] == 0:  # np.save of a (0, 0) array: keep the promised width
        return PackedBlocks(np.zeros((0, seq_len), dtype=np.int32), np.zeros((0,), dtype=np.int64))
    return PackedBlocks(arr, words)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
