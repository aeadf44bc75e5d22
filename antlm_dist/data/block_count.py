"""How many packed training blocks a corpus gives, checked at preflight without writing anything.

Two ways to count, chosen for cost:

- **An upper bound from the bytes.** A byte-level BPE token covers at least one byte of the
  line (of its NFKC form under ``tokenizer.normalization=nfkc``; the bound takes the longer)
  and a WordPiece token at least one character (``[UNK]`` a whole word), and each line adds at most two tokens (the prefix space of the byte-level pre-tokenizer and the
  ``</s>`` that :mod:`antlm_dist.data.dataset` appends). So a line of b bytes gives at most
  b + 2 tokens, and the corpus at most ``floor(Σ(b + 2) / seq_len)`` blocks. When even that is
  too few, the corpus is refused at once.
- **An exact count for small corpora.** When the bound is under :data:`EXACT_BELOW_FACTOR`
  times what the run needs, the corpus is small, so it is tokenised here exactly as the
  packing does (lines of each ``PACK_BATCH_LINES`` batch concatenated, the partial last block
  of each batch dropped), with ``tokenizer.path`` or with a tokenizer trained in memory on
  the same files (the ranks later train the same one). Nothing is written anywhere.

Above that factor the bound is trusted: a corpus would need tokens averaging more than
``EXACT_BELOW_FACTOR`` bytes to fall short, which no BPE or WordPiece vocabulary gives.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from antlm_dist.config import ConfigError, Recipe
from antlm_dist.data.dataset import PACK_BATCH_LINES

EXACT_BELOW_FACTOR = 32
"""Tokenise exactly when the byte bound is below this many times the blocks needed."""


def _lines(files) -> list[str]:
    """Non-blank lines of ``files`` in order, as ``datasets``' text loader keeps them."""
    out = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            out += [line.rstrip("\r\n") for line in fh if line.strip()]
    return out


def block_upper_bound(files, seq_len: int) -> int:
    """At most this many ``seq_len``-token blocks come out of ``files`` (see the module notes)."""
    tokens = 0
    for line in _lines(files):
        size = len(line.encode("utf-8"))
        if not line.isascii():  # NFKC (tokenizer.normalization=nfkc) can lengthen a line; ASCII is NFKC already
            size = max(size, len(unicodedata.normalize("NFKC", line).encode("utf-8")))
        tokens += size + 2
    return tokens // seq_len


def exact_block_count(files, seq_len: int, encode) -> int:
    """Blocks the packing of :func:`antlm_dist.data.dataset.build_packed_dataset` makes.

    Args:
        encode: list of lines -> list of token-id lists, without special tokens.
    """
    lines, blocks = _lines(files), 0
    for start in range(0, len(lines), PACK_BATCH_LINES):
        n_tokens = sum(len(ids) + 1 for ids in encode(lines[start:start + PACK_BATCH_LINES]))  # + </s>
        blocks += n_tokens // seq_len
    return blocks


def _encoder(recipe: Recipe, files):
    """An ``encode(lines)`` of the run's tokenizer: ``tokenizer.path``, or one trained in memory."""
    from antlm_dist.data.tokenizer import load_tokenizer, train_tokenizer

    t = recipe.tokenizer
    if t.path:
        backend = load_tokenizer(t.path, t.kind).backend_tokenizer
    else:
        backend = train_tokenizer(files, t.vocab_size or recipe.model.vocab_size, t.min_frequency, t.kind,
                                  t.normalization, t.add_prefix_space)
    return lambda lines: [e.ids for e in backend.encode_batch(lines, add_special_tokens=False)]


def check_training_blocks(recipe: Recipe, train_files, world_size: int) -> None:
    """Refuse a corpus shorter than one block, or a training set smaller than one global batch.

    Args:
        recipe: the validated recipe (``data.seq_len``, ``data.max_train_blocks``, batch sizes).
        train_files: the corpus's ``.train`` files, already checked to be UTF-8.
        world_size: data-parallel ranks of the launch.

    Raises:
        ConfigError: naming the corpus, the count, the fields involved and the fix.
    """
    d, t = recipe.data, recipe.train
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    needed = max(1, global_batch)
    count = block_upper_bound(train_files, d.seq_len)
    how = "at most"
    if count < EXACT_BELOW_FACTOR * needed:
        count, how = exact_block_count(train_files, d.seq_len, _encoder(recipe, train_files)), "exactly"
    where = f"data.corpus={d.corpus!r}" if not isinstance(d.corpus, (list, tuple)) else "data.corpus"
    if count == 0:
        raise ConfigError(
            f"{where}: the training text ({_size(train_files)}) is shorter than one block of data.seq_len="
            f"{d.seq_len} tokens; use a larger corpus or lower data.seq_len"
        )
    if d.max_train_blocks is not None:
        count = min(count, d.max_train_blocks)
    if count < global_batch:
        raise ConfigError(
            f"{where} gives {how} {count} training blocks of data.seq_len={d.seq_len} tokens"
            f"{' (data.max_train_blocks=%d)' % d.max_train_blocks if d.max_train_blocks is not None else ''}, "
            f"fewer than one global batch of {global_batch} sequences (train.micro_batch_size {t.micro_batch_size}"
            f" × train.gradient_accumulation_steps {t.gradient_accumulation_steps} × world size {world_size}); "
            "use a larger corpus, raise data.max_train_blocks, or lower the batch sizes or data.seq_len"
        )


def _size(files) -> str:
    return f"{sum(Path(f).stat().st_size for f in files)} bytes in {len(files)} file(s)"
