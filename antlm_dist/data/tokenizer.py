"""Tokenizers trained with ``tokenizers`` (byte-level BPE or WordPiece), or loaded.

Two kinds (``tokenizer.kind``):

* ``bpe`` (default): BabyLlama (Timiryasov & Tastet, BabyLM 2023) trains a byte-level BPE
  with 16,000 tokens and minimum pair frequency 2. Special tokens
  ``<pad>``, ``<s>``, ``</s>``, ``<unk>``, ``<mask>``.
* ``wordpiece``: LTG-BERT (Samuel et al. 2023) uses a cased WordPiece of 16,384 tokens.
  Special tokens ``[PAD]``, ``[CLS]``, ``[SEP]``, ``[UNK]``, ``[MASK]``.

Two choices change the text itself (``tokenizer.normalization``, ``tokenizer.add_prefix_space``).
By default there is neither, and a byte-level BPE then gives ``decode(encode(s)) == s`` for
every Unicode string: the pre-tokenizer maps each UTF-8 byte to one symbol and the decoder
maps it back. NFKC (BabyLlama's setting) folds compatibility characters ("ﬁ" -> "fi",
"₉" -> "9", full-width letters); the prefix space (GPT-2's option) puts a space before the
first word, so decoding returns " " + s. WordPiece never round-trips: its BERT
pre-tokenizer drops whitespace.

The trainer never names special tokens literally; it uses their roles (pad, bos, eos,
unk, mask; :data:`SPECIAL_TOKENS_BY_KIND`): documents end with the eos token, padding
uses pad, the MLM phases insert mask. Trained tokenizers put the five at ids 0..4 in the
order pad, bos, eos, unk, mask.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

SPECIAL_TOKEN_ROLES = ("pad", "bos", "eos", "unk", "mask")
"""The roles the trainer needs, in id order of a trained tokenizer."""
SPECIAL_TOKENS_BY_KIND = {
    "bpe": {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"},
    "wordpiece": {"pad": "[PAD]", "bos": "[CLS]", "eos": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"},
}
"""Role → token string for each ``tokenizer.kind``."""
SPECIAL_TOKENS = tuple(SPECIAL_TOKENS_BY_KIND["bpe"][r] for r in SPECIAL_TOKEN_ROLES)
"""The BPE kind's special tokens (kept for callers that predate ``tokenizer.kind``)."""


def special_tokens_for(kind: str) -> dict[str, str]:
    """Role → token string of ``kind``.

    Raises:
        TokenizerError: unknown kind.
    """
    if kind not in SPECIAL_TOKENS_BY_KIND:
        raise TokenizerError(f"tokenizer.kind={kind!r} is not known; use one of {', '.join(SPECIAL_TOKENS_BY_KIND)}")
    return SPECIAL_TOKENS_BY_KIND[kind]


def _hf_special_kwargs(kind: str) -> dict[str, str]:
    return {f"{role}_token": tok for role, tok in special_tokens_for(kind).items()}


def detect_kind(vocab) -> str | None:
    """The kind whose five special tokens are all in ``vocab`` (token → id), or None."""
    for kind, roles in SPECIAL_TOKENS_BY_KIND.items():
        if all(t in vocab for t in roles.values()):
            return kind
    return None


def special_token_ids(tok) -> list[int]:
    """Ids of the pad, bos, eos, unk and mask tokens of a loaded ``PreTrainedTokenizerFast``."""
    return [getattr(tok, f"{role}_token_id") for role in SPECIAL_TOKEN_ROLES]


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, lacks a special token or mismatches the model."""


NORMALIZATIONS = ("none", "nfkc")
"""Values of ``tokenizer.normalization``."""


def train_tokenizer(files: Iterable[Path], vocab_size: int, min_frequency: int = 2, kind: str = "bpe",
                    normalization: str = "none", add_prefix_space: bool = False):
    """Train a tokenizer of ``kind``.

    ``bpe``: byte-level BPE (ByteLevel pre-tokenizer and decoder). ``wordpiece``:
    cased WordPiece with ``##`` continuation prefix (BERT pre-tokenizer: whitespace
    and punctuation splits; WordPiece decoder).

    Args:
        files: UTF-8 text files, one utterance or paragraph per line.
        vocab_size: target vocabulary size in tokens, special tokens included. The result
            can be smaller when the corpus has fewer distinct pairs than that.
        min_frequency: minimum count for a merge.
        kind: ``bpe`` or ``wordpiece``.
        normalization: ``none`` (the text is kept as it is) or ``nfkc`` (Unicode NFKC
            before tokenising, as BabyLlama and LTG-BERT do).
        add_prefix_space: ``bpe`` only: a space before the first word, so that it is
            tokenised like a word inside a line (GPT-2's option; decoding then returns it).

    Returns:
        A ``tokenizers.Tokenizer``.

    Raises:
        TokenizerError: unknown kind or normalization, or ``add_prefix_space`` with ``wordpiece``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = [special_tokens_for(kind)[r] for r in SPECIAL_TOKEN_ROLES]
    if normalization not in NORMALIZATIONS:
        raise TokenizerError(f"tokenizer.normalization={normalization!r} is not known; use one of "
                             f"{', '.join(NORMALIZATIONS)}")
    if add_prefix_space and kind != "bpe":
        raise TokenizerError("tokenizer.add_prefix_space applies to tokenizer.kind=bpe only; set it to false")
    normalizer = normalizers.NFKC() if normalization == "nfkc" else None
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=special_tokens_for(kind)["unk"], continuing_subword_prefix="##"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            continuing_subword_prefix="##", show_progress=False,
        )
        tok.train([str(f) for f in files], trainer)
        return _canonical_wordpiece(tok, specials)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return tok


def _canonical_wordpiece(tok, specials: list[str]):
    """The trained WordPiece with its ids in a canonical order.

    ``tokenizers``' WordPiece trainer numbers the ``##``-prefixed alphabet in hash-map
    order, which changes from process to process. Order here: the special tokens, single
    characters, ``##`` + one character (each group sorted), then every other token in the
    trainer's merge order. Merges whose counts tie are still ordered by those ids, so on
    small corpora two trainings can differ in the order of tied merges (and, at the
    vocabulary cut-off, in a few tokens). The trainer saves the run's tokenizer and
    records its hash; pass ``tokenizer.path`` to reuse one exactly.
    """
    from tokenizers import Tokenizer, models

    vocab = tok.get_vocab(with_added_tokens=True)

    def key(t: str):
        if t in specials:
            return (0, specials.index(t), "")
        if len(t) == 1:
            return (1, 0, t)
        if t.startswith("##") and len(t) == 3:
            return (2, 0, t)
        return (3, vocab[t], t)

    ordered = sorted(vocab, key=key)
    out = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(ordered)}, unk_token=specials[3],
                                     continuing_subword_prefix="##"))
    out.normalizer, out.pre_tokenizer, out.decoder = tok.normalizer, tok.pre_tokenizer, tok.decoder
    out.add_special_tokens(specials)
    return out


def tokenizer_hash(path: Path) -> str:
    """sha256 of the tokenizer's JSON, canonicalised (sorted keys), as hex."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def load_tokenizer(path: Path | str, kind: str | None = None):
    """Load a ``tokenizer.json`` (or a folder holding one) as ``PreTrainedTokenizerFast``.

    The special tokens are bound to their roles (``tok.pad_token_id`` ...) from ``kind``;
    ``None`` picks the kind whose five special tokens the vocabulary holds.

    Raises:
        TokenizerError: missing file, unreadable JSON, or a special token absent.
    """
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise TokenizerError(f"tokenizer.path={str(path)!r}: no tokenizer.json there; train one by leaving tokenizer.path unset")
    try:
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises plain Exceptions for bad JSON
        raise TokenizerError(f"tokenizer.path={str(p)!r} could not be read: {exc}") from exc
    vocab = raw.get_vocab(with_added_tokens=True)
    if kind is None:
        kind = detect_kind(vocab) or "bpe"
    roles = special_tokens_for(kind)
    missing = [t for t in roles.values() if t not in vocab]
    if missing:
        raise TokenizerError(
            f"tokenizer {p} lacks the special token(s) {', '.join(missing)}; AntLM needs "
            f"{', '.join(roles.values())} for tokenizer.kind={kind} (add them, set tokenizer.kind to "
            "the tokenizer's kind, or let antlm-train train a tokenizer)"
        )
    return PreTrainedTokenizerFast(tokenizer_object=raw, **_hf_special_kwargs(kind))


def save_tokenizer(tok, folder: Path, kind: str | None = None) -> Path:
    """Write ``tokenizer.json`` plus the HF wrapper files into ``folder``; returns the JSON path.

    ``kind`` binds the special-token roles of a raw ``tokenizers.Tokenizer``; ``None``
    detects it from the vocabulary.
    """
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(tok, PreTrainedTokenizerFast):
        kind = kind or detect_kind(tok.get_vocab(with_added_tokens=True)) or "bpe"
        tok = PreTrainedTokenizerFast(tokenizer_object=tok, **_hf_special_kwargs(kind))
    tok.save_pretrained(str(folder))
    return folder / "tokenizer.json"


def check_vocab_matches(tok, vocab_size: int, source: str) -> None:
    """The model's ``vocab_size`` must equal the tokenizer's length.

    Raises:
        TokenizerError: naming both numbers and the fix.
    """
    n = len(tok)
    if n != vocab_size:
        raise TokenizerError(
            f"tokenizer {source} has {n} tokens but model.vocab_size={vocab_size}; "
            f"set model.vocab_size={n} (or train a new tokenizer by leaving tokenizer.path unset)"
        )
