"""Zero-shot minimal-pair scoring (BLiMP, Warstadt et al. 2020, TACL) in CLM, MLM and MNTP mode.

A pair is correct when score(good) > score(bad) (a tie counts as wrong). Two scores,
both log-probabilities in nats summed over the sentence's word-piece tokens
w1..wn (``tokenizer(sentence, add_special_tokens=False)``):

* **CLM** (``causal=True``): log p(w1..wn | <s>) = Σ_i log p(w_i | <s> w_<i). The input is
  ``<s> w1..wn``; the ``<s>`` itself is not scored. This is what minicons'
  ``IncrementalLMScorer.sequence_score(..., bos_token=True)`` computes for an exported
  folder, summed instead of averaged.
* **MLM** (``causal=False``): the pseudo-log-likelihood of Salazar et al. 2020 ("Masked
  Language Model Scoring", ACL): PLL = Σ_i log p(w_i | <s> w_<i <mask> w_>i </s>). The
  sentence is wrapped as ``<s> w1..wn </s>`` (the BERT ``[CLS] … [SEP]`` convention
  Salazar et al. use, with our tokenizer's specials); each word-piece token is replaced
  by ``<mask>`` in its own copy, the specials are never masked nor scored. All n copies
  of every sentence are batched together (rows sorted by length to limit padding).

Two variants of the masked scores (``pll_metric``, Kauf & Ivanova 2023, "A Better Way
to Do Masked Language Model Scoring", ACL; the names of minicons' ``PLL_metric``):

* ``original``: only w_i is masked (Salazar et al. 2020).
* ``within_word_l2r``: w_i and the later pieces of the same word are masked, so a word
  split into pieces is not scored from its own right-hand pieces. Words are the
  tokenizer's word ids (``BatchEncoding.word_ids``), as in minicons. A word of one piece
  scores as in ``original``.

**MNTP** (``mntp_scores``; models trained with ``objective.mlm_target=next_position``,
masked next-token prediction as in GPT-BERT, Charpentier & Samuel 2024): the same masked
copies, but the score of w_i is read from the logits at position i-1 (the hidden state
that was trained to predict the token after it), as the BabyLM 2025 pipeline's ``mntp``
backend does. w1 is read at the ``<s>``.

Ties: :func:`score_pairs` also reports pairs whose two scores are equal; a model that
gives identical scores (e.g. one that ignores its input) must not look good, so a tie
counts as wrong and the number of ties is reported beside the accuracy (Păpușoi &
Nisioi 2025).

The context token before the sentence is ``<s>`` by default; ``prefix_id`` changes it
(e.g. to ``</s>``, the separator the trainer's packed streams put before every line).

Length: a sentence whose wrapped length exceeds the model's ``max_position_embeddings``
is refused with :class:`SentenceTooLongError` naming its source (file and line), never
truncated: a truncated sentence would be compared on part of its tokens.

The functions take any model with ``forward(input_ids, attention_mask, labels=None, *,
causal)`` → logits (B, T, V) (our Llama backbone, and LTG-BERT) and a
``PreTrainedTokenizerFast`` with ``<s> </s> <pad> <mask>``.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

REQUIRED_FIELDS = ("sentence_good", "sentence_bad")


class BlimpFormatError(ValueError):
    """A BLiMP file is missing, not JSON lines, or lacks a required field (names file and line)."""


class SentenceTooLongError(ValueError):
    """A sentence does not fit the model's positions (names its source)."""


@dataclass(frozen=True)
class MinimalPair:
    """One BLiMP pair. ``source`` is ``"<file>:<line>"`` for error messages."""

    good: str
    bad: str
    uid: str
    field: str
    term: str
    source: str


# ----------------------------------------------------------------------------- reading

def read_blimp_file(path: Path | str, limit: int | None = None) -> list[MinimalPair]:
    """Read one BLiMP JSON-lines file (one pair per line; blank lines are skipped).

    Required per line: non-empty strings ``sentence_good`` and ``sentence_bad``.
    ``UID`` defaults to the file name's stem, ``field`` and ``linguistics_term`` to
    ``"unknown"``.

    Args:
        limit: keep only the first ``limit`` pairs (None: all).

    Raises:
        BlimpFormatError: naming the file and the 1-based line number.
    """
    path = Path(path)
    pairs: list[MinimalPair] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BlimpFormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(rec, dict):
                raise BlimpFormatError(f"{where}: expected a JSON object with sentence_good and sentence_bad")
            for key in REQUIRED_FIELDS:
                if not isinstance(rec.get(key), str) or not rec[key].strip():
                    raise BlimpFormatError(f"{where}: '{key}' is missing or not a non-empty string")
            pairs.append(MinimalPair(rec["sentence_good"], rec["sentence_bad"], str(rec.get("UID") or path.stem),
                                     str(rec.get("field") or "unknown"), str(rec.get("linguistics_term") or "unknown"),
                                     where))
    return pairs


def read_blimp(data: Path | str, limit: int | None = None) -> list[MinimalPair]:
    """All pairs of a folder of ``*.jsonl`` files (sorted by name), or of one file.

    Args:
        limit: pairs per file (None: all).

    Raises:
        BlimpFormatError: no such path, no ``*.jsonl`` file, or a malformed line.
    """
    data = Path(data)
    if data.is_file():
        return read_blimp_file(data, limit)
    if not data.is_dir():
        raise BlimpFormatError(f"--data {data}: no such file or folder")
    files = sorted(data.glob("*.jsonl"))
    if not files:
        raise BlimpFormatError(f"--data {data}: no *.jsonl files (BLiMP format: one JSON object per line)")
    return [p for f in files for p in read_blimp_file(f, limit)]


# ----------------------------------------------------------------------------- scoring

def _max_positions(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _check_lengths(seqs: Sequence[Sequence[int]], n_special: int, max_positions: int | None,
                   sources: Sequence[str] | None) -> None:
    if max_positions is None:
        return
    for i, s in enumerate(seqs):
        if len(s) > max_positions:
            where = sources[i] if sources is not None else f"sentence {i}"
            raise SentenceTooLongError(
                f"{where}: {len(s) - n_special} tokens + {n_special} special = {len(s)} exceed the model's "
                f"max_position_embeddings={max_positions}; such sentences are refused, not truncated "
                "(remove the line or use a model with more positions)"
            )


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) int64 ids and (B, T) int64 attention mask (1 = real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled, dynamic_ncols=True, leave=False)


def _logits_at(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
               masked_rows_only: bool = True) -> torch.Tensor:
    """Bidirectional logits (R, V) at one position per row.

    A model that exposes its backbone as ``model.model(ids, mask, causal=False)`` → hidden
    (R, T, H) and its head as ``model.lm_head(hidden)`` → logits (ours does) gets the head
    applied to the R selected rows only, when ``masked_rows_only`` (the default): the
    head's (R·T, H) × (H, V) product shrinks T-fold to (R, H) × (H, V), and it is the
    largest single matmul of a small model. Any other model, or ``masked_rows_only=False``,
    goes through ``forward`` and the full (R, T, V) logits. Both give the same scores.
    """
    backbone, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if masked_rows_only and callable(backbone) and callable(head):
        return head(backbone(ids, mask, causal=False)[rows, pos])  # (R, H) -> (R, V)
    return model(ids, mask, causal=False)[rows, pos]  # (R, T, V) -> (R, V)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are promoted to fp32 for the log-softmax; fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def encode(tokenizer, sentences: Sequence[str]) -> list[list[int]]:
    """Word-piece ids of each sentence, without special tokens."""
    return tokenizer(list(sentences), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def clm_scores(model, tokenizer, sentences: Sequence[str], *, batch_size: int = 64, prefix_id: int | None = None,
               sources: Sequence[str] | None = None, progress: bool = False) -> list[float]:
    """Summed next-token log-probabilities log p(w1..wn | prefix), nats, one per sentence.

    Args:
        model: ``forward(input_ids (B,T) int64, attention_mask (B,T) int64, *, causal=True)``
            → logits (B, T, V) of any float dtype (log-softmax runs in fp32).
        tokenizer: the model's tokenizer (``bos_token_id``, ``pad_token_id``).
        sentences: S strings.
        batch_size: sentences per forward pass.
        prefix_id: the context token (default ``<s>``); it is not scored.
        sources: S labels for error messages (e.g. ``"file.jsonl:12"``).

    Returns:
        S floats (≤ 0). An empty sentence scores 0.

    Raises:
        SentenceTooLongError: 1 + n > ``model.config.max_position_embeddings``.
    """
    prefix = tokenizer.bos_token_id if prefix_id is None else prefix_id
    seqs = [[prefix] + s for s in encode(tokenizer, sentences)]
    _check_lengths(seqs, 1, _max_positions(model), sources)
    device = _device_of(model)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    scores = [0.0] * len(seqs)
    with _progress(len(seqs), "CLM", progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _pad([seqs[i] for i in chunk], tokenizer.pad_token_id, device)  # (B, T)
            logits = model(ids, mask, causal=True)  # (B, T, V)
            logp = torch.log_softmax(_at_least_fp32(logits[:, :-1]), dim=-1)  # (B, T-1, V): predicts ids[:, 1:]
            token_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]  # (B, T-1)
            for i, s in zip(chunk, token_lp.double().sum(1).tolist()):
                scores[i] = s
            bar.update(len(chunk))
    return scores


PLL_METRICS = ("original", "within_word_l2r")
"""The masking variants of :func:`pll_scores` and :func:`mntp_scores` (see the module docstring)."""


def _later_pieces_of_word(word_ids: Sequence[int | None], j: int) -> list[int]:
    """Positions after ``j`` that belong to the same word as ``j`` (word pieces are contiguous)."""
    out, k = [], j + 1
    while k < len(word_ids) and word_ids[j] is not None and word_ids[k] == word_ids[j]:
        out.append(k)
        k += 1
    return out


def _masked_copies(tokenizer, sentences: Sequence[str], prefix: int, pll_metric: str) -> tuple[list, list]:
    """Wrapped ids ``[prefix] w1..wn [</s>]`` per sentence, and one row per scored token:
    (sentence index, scored position j in 1..n, positions to mask: j and, for
    ``within_word_l2r``, the later pieces of its word)."""
    if pll_metric not in PLL_METRICS:
        raise ValueError(f"pll_metric={pll_metric!r}; use one of {', '.join(PLL_METRICS)}")
    enc = tokenizer(list(sentences), add_special_tokens=False)
    seqs, rows = [], []
    for i, pieces in enumerate(enc["input_ids"]):
        seqs.append([prefix] + pieces + [tokenizer.eos_token_id])
        words = [None] + enc.word_ids(i) + [None]  # aligned to the wrapped sequence
        for j in range(1, len(pieces) + 1):
            extra = _later_pieces_of_word(words, j) if pll_metric == "within_word_l2r" else []
            rows.append((i, j, [j] + extra))
    return seqs, rows


def _masked_scores(model, tokenizer, sentences, *, batch_size, prefix_id, sources, progress, masked_rows_only,
                   pll_metric, read_offset: int) -> list[float]:
    """Σ over each sentence's rows of log p(w_j) read at position j + ``read_offset`` (0: MLM, -1: MNTP)."""
    prefix = tokenizer.bos_token_id if prefix_id is None else prefix_id
    seqs, rows = _masked_copies(tokenizer, sentences, prefix, pll_metric)
    _check_lengths(seqs, 2, _max_positions(model), sources)
    device = _device_of(model)
    rows.sort(key=lambda r: len(seqs[r[0]]))  # similar lengths together: less padding
    scores = [0.0] * len(seqs)
    title = ("MNTP" if read_offset else "MLM") + (" (PLL)" if pll_metric == "original" else " (PLL-word-l2r)")
    with _progress(len(rows), title, progress) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask = _pad([seqs[i] for i, _, _ in chunk], tokenizer.pad_token_id, device)  # (R, T)
            r = torch.arange(len(chunk), device=device)
            pos = torch.as_tensor([j for _, j, _ in chunk], device=device)  # (R,) scored positions
            targets = ids[r, pos].clone()  # (R,)
            hide_r = [b for b, (_, _, m) in enumerate(chunk) for _ in m]
            hide_t = [t for _, _, m in chunk for t in m]
            ids[hide_r, hide_t] = tokenizer.mask_token_id
            logits = _logits_at(model, ids, mask, r, pos + read_offset, masked_rows_only)  # (R, V)
            logp = torch.log_softmax(_at_least_fp32(logits), dim=-1)
            for (i, _, _), lp in zip(chunk, logp.gather(-1, targets[:, None]).squeeze(-1).double().tolist()):
                scores[i] += lp
            bar.update(len(chunk))
    return scores


@torch.no_grad()
def pll_scores(model, tokenizer, sentences: Sequence[str], *, batch_size: int = 256, prefix_id: int | None = None,
               sources: Sequence[str] | None = None, progress: bool = False,
               masked_rows_only: bool = True, pll_metric: str = "original") -> list[float]:
    """Pseudo-log-likelihoods (Salazar et al. 2020; ``within_word_l2r``: Kauf & Ivanova 2023), nats.

    PLL(w) = Σ_i log p(w_i | prefix w_<i <mask> w_>i </s>), bidirectional attention
    (``causal=False``), one masked copy per word-piece token; with ``within_word_l2r``
    the later pieces of w_i's word are masked too. Copies of all sentences are batched
    together.

    Args:
        model: ``forward(input_ids, attention_mask, *, causal=False)`` → logits (B, T, V).
        tokenizer: a fast tokenizer (``word_ids``) with ``mask_token_id``, ``eos_token_id``,
            ``pad_token_id``, ``bos_token_id``.
        batch_size: masked copies per forward pass.
        prefix_id: context token before the sentence (default ``<s>``).
        sources: labels for error messages.
        masked_rows_only: run the LM head on the scored row of each copy only (see
            :func:`_logits_at`); ``False`` computes the full (R, T, V) logits, for comparison.
        pll_metric: ``original`` or ``within_word_l2r``.

    Returns:
        S floats (≤ 0). An empty sentence scores 0.

    Raises:
        SentenceTooLongError: n + 2 > ``model.config.max_position_embeddings``.
        ValueError: unknown ``pll_metric``.
    """
    return _masked_scores(model, tokenizer, sentences, batch_size=batch_size, prefix_id=prefix_id, sources=sources,
                          progress=progress, masked_rows_only=masked_rows_only, pll_metric=pll_metric, read_offset=0)


@torch.no_grad()
def mntp_scores(model, tokenizer, sentences: Sequence[str], *, batch_size: int = 256, prefix_id: int | None = None,
                sources: Sequence[str] | None = None, progress: bool = False,
                masked_rows_only: bool = True, pll_metric: str = "original") -> list[float]:
    """Masked next-token pseudo-log-likelihoods, nats: for models trained with
    ``objective.mlm_target=next_position`` (MNTP, GPT-BERT, Charpentier & Samuel 2024).

    Σ_i log p(w_i) read from the bidirectional logits at position i-1 of the copy
    ``prefix w_<i <mask> w_>i </s>`` (w_1 is read at ``prefix``), the BabyLM 2025
    pipeline's ``mntp`` backend. Arguments, returns and errors as :func:`pll_scores`.
    """
    return _masked_scores(model, tokenizer, sentences, batch_size=batch_size, prefix_id=prefix_id, sources=sources,
                          progress=progress, masked_rows_only=masked_rows_only, pll_metric=pll_metric, read_offset=-1)


SCORERS = {"clm": clm_scores, "mlm": pll_scores, "mntp": mntp_scores}
"""Mode → scoring function, all with the signature of :func:`clm_scores` (the masked ones
also take ``pll_metric``)."""


def score_pairs(model, tokenizer, pairs: Sequence[MinimalPair], mode: str, *, batch_size: int,
                prefix_id: int | None = None, progress: bool = False, pll_metric: str = "original") -> dict:
    """Score both sentences of every pair in one batched pass.

    Args:
        mode: ``clm``, ``mlm`` or ``mntp`` (:data:`SCORERS`).
        pll_metric: for ``mlm`` and ``mntp``: ``original`` or ``within_word_l2r``.

    Returns:
        ``{"good": [P floats], "bad": [P floats], "correct": [P bools], "tie": [P bools]}``
        (nats; a tie, good == bad, is not correct).

    Raises:
        ValueError: unknown ``mode`` or ``pll_metric`` (``clm`` takes only ``original``);
            SentenceTooLongError.
    """
    if mode not in SCORERS:
        raise ValueError(f"mode={mode!r}; use one of {', '.join(SCORERS)}")
    if pll_metric not in PLL_METRICS or (mode == "clm" and pll_metric != "original"):
        raise ValueError(f"pll_metric={pll_metric!r} with mode={mode!r}; use one of {', '.join(PLL_METRICS)} "
                         "with mlm or mntp, and original with clm")
    sentences = [p.good for p in pairs] + [p.bad for p in pairs]
    sources = [f"{p.source} (sentence_good)" for p in pairs] + [f"{p.source} (sentence_bad)" for p in pairs]
    extra = {} if mode == "clm" else {"pll_metric": pll_metric}
    s = SCORERS[mode](model, tokenizer, sentences, batch_size=batch_size, prefix_id=prefix_id, sources=sources,
                      progress=progress, **extra)
    good, bad = s[: len(pairs)], s[len(pairs) :]
    return {"good": good, "bad": bad, "correct": [g > b for g, b in zip(good, bad)],
            "tie": [g == b for g, b in zip(good, bad)]}


# ----------------------------------------------------------------------------- aggregating

def summarize(pairs: Sequence[MinimalPair], correct: Sequence[bool], ties: Sequence[bool] | None = None) -> dict:
    """Accuracy per UID, and means over UIDs per linguistics_term, per field and overall.

    Args:
        ties: per pair, whether its two scores were equal (:func:`score_pairs`); when given,
            ``"ties"`` (a count) is added overall and per UID.

    Returns:
        ``{"overall": mean of UID accuracies, "pair_accuracy": correct / pairs,
        "pairs": P, "by_uid": {uid: {"accuracy", "pairs", "field", "linguistics_term"}},
        "by_term": {term: {"accuracy", "uids", "pairs"}}, "by_field": {...}}``; accuracies
        are fractions in [0, 1]. With equal pairs per UID (BLiMP: 1,000) the UID mean and
        the pair accuracy coincide.
    """
    hits: dict[str, list[bool]] = defaultdict(list)
    info: dict[str, MinimalPair] = {}
    for p, c in zip(pairs, correct):
        hits[p.uid].append(bool(c))
        info.setdefault(p.uid, p)
    by_uid = {u: {"accuracy": sum(h) / len(h), "pairs": len(h), "field": info[u].field,
                  "linguistics_term": info[u].term} for u, h in sorted(hits.items())}

    def group(key: str) -> dict:
        acc: dict[str, list[str]] = defaultdict(list)
        for u, rec in by_uid.items():
            acc[rec[key]].append(u)
        return {g: {"accuracy": sum(by_uid[u]["accuracy"] for u in us) / len(us), "uids": len(us),
                    "pairs": sum(by_uid[u]["pairs"] for u in us)} for g, us in sorted(acc.items())}

    n = len(correct)
    out = {
        "overall": sum(r["accuracy"] for r in by_uid.values()) / len(by_uid) if by_uid else math.nan,
        "pair_accuracy": sum(map(bool, correct)) / n if n else math.nan, "pairs": n,
        "by_field": group("field"), "by_term": group("linguistics_term"), "by_uid": by_uid,
    }
    if ties is not None:
        out["ties"] = sum(map(bool, ties))
        for u in by_uid:
            by_uid[u]["ties"] = 0
        for p, t in zip(pairs, ties):
            by_uid[p.uid]["ties"] += bool(t)
    return out


def format_markdown(columns: dict[str, dict]) -> str:
    """Markdown tables: overall and per field, per linguistics term, per UID.

    Args:
        columns: column title → a :func:`summarize` result (e.g. ``{"CLM": …, "MLM (PLL)": …}``).
            Accuracies are printed in percent with one decimal; the rows are the first
            column's; where columns were scored on different numbers of pairs, the pairs
            cell lists each distinct count (``67000 / 6700``).
    """
    names = list(columns)
    first = columns[names[0]]
    head = "| | pairs | " + " | ".join(names) + " |\n|---|---:|" + "---:|" * len(names) + "\n"

    def pct(x: float) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    def pairs(counts) -> str:  # columns scored on different subsets (e.g. --limit) show every count
        return " / ".join(dict.fromkeys(str(c) for c in counts if c is not None))

    def rows(section: str) -> str:
        return "".join(
            f"| {g} | {pairs(columns[c][section].get(g, {}).get('pairs') for c in names)} | "
            + " | ".join(pct(columns[c][section].get(g, {}).get("accuracy")) for c in names) + " |\n"
            for g in first[section])

    n_uid = len(first["by_uid"])
    overall = (f"| **overall** (mean over {n_uid} UIDs) | {pairs(columns[c]['pairs'] for c in names)} | "
               + " | ".join(f"**{pct(columns[c]['overall'])}**" for c in names) + " |\n")
    return ("BLiMP accuracy (%), score(good) > score(bad)\n\n" + head + overall + rows("by_field")
            + "\nBy linguistics term\n\n" + head + rows("by_term")
            + "\nBy paradigm (UID)\n\n" + head + rows("by_uid"))
