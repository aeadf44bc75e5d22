"""Benchmark PLL scoring (Salazar et al. 2020): LM head on the masked rows only vs full logits.

Both variants run :func:`antlm_dist.eval.blimp.pll_scores` on the same sentences and the
same model; they differ only in ``masked_rows_only``:

* ``full``: ``model(ids, causal=False)`` → (R, T, V) logits, then one row per copy is read;
* ``masked rows``: the backbone's (R, T, H) hidden states, the masked row of each copy
  picked, then the head on (R, H) only.

Sizes: ``demo`` (the demo-cpu / study-cpu model: hidden 128, 4 layers, vocab 4,096) and
``babyllama`` (BabyLlama-58M: hidden 512, 16 layers, vocab 16,000), randomly initialised
(the cost does not depend on the weights). The tokenizer is a byte-level BPE of that vocabulary
trained on the bundled corpus; the sentences are the first ``--pairs`` pairs of each file of
``--blimp`` (both sentences), or, without ``--blimp``, lines of 4–20 words from the bundled
corpus's dev split.

Time: median of ``--repeats`` calls per variant after one warm-up call, alternating the two
variants so that other load on a shared machine spreads over both; reported with the
speed-up full / masked rows, measured in the same run. Also checks that both give the same
scores (largest absolute difference, nats). Writes JSON to ``--out``; asserts nothing.

    python benchmarks/bench_pll.py --blimp ../shared/data/blimp --pairs 4 --out bench_pll.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "demo": dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
    "babyllama": dict(vocab_size=16000, hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                      num_attention_heads=8),
}


def _sentences(blimp: str | None, pairs: int) -> list[str]:
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.eval.blimp import read_blimp

    if blimp:
        return [s for p in read_blimp(blimp, pairs) for s in (p.good, p.bad)]
    lines = []
    for f in find_corpus("bundled").dev:
        lines += [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if 4 <= len(ln.split()) <= 20]
    return lines[: 2 * 67 * pairs]


def _tokenizer(vocab: int, folder: Path):
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    return load_tokenizer(save_tokenizer(train_tokenizer(find_corpus("bundled").train, vocab, 2), folder))


def bench(size: str, sentences: list[str], repeats: int, batch_size: int) -> dict:
    from antlm_dist.config import ModelConfig
    from antlm_dist.eval.blimp import pll_scores
    from antlm_dist.model import build_model

    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(SIZES[size]["vocab_size"], Path(tmp))
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="llama", max_position_embeddings=256, **SIZES[size])).eval()
    runs = {"full": [], "masked rows": []}
    scores = {}
    for i in range(repeats + 1):
        for name, rows_only in (("full", False), ("masked rows", True)):
            t0 = time.perf_counter()
            scores[name] = pll_scores(model, tok, sentences, batch_size=batch_size, masked_rows_only=rows_only)
            if i:  # the first round warms up
                runs[name].append(time.perf_counter() - t0)
    copies = sum(len(x) for x in tok(sentences, add_special_tokens=False)["input_ids"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"size": size, **SIZES[size], "sentences": len(sentences), "masked_copies": copies,
            "median_s": med, "copies_per_s": {k: copies / v for k, v in med.items()},
            "speedup": med["full"] / med["masked rows"],
            "max_abs_score_diff": max(abs(a - b) for a, b in zip(scores["full"], scores["masked rows"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="demo,babyllama")
    p.add_argument("--blimp", default=None, help="BLiMP folder (default: sentences from the bundled corpus)")
    p.add_argument("--pairs", type=int, default=4, help="pairs per BLiMP file (default 4: 536 sentences)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench_pll.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sentences = _sentences(args.blimp, args.pairs)
    results = [bench(s, sentences, args.repeats, args.batch_size) for s in args.sizes.split(",")]
    print(f"PLL scoring, {len(sentences)} sentences, {torch.get_num_threads()} threads, batch {args.batch_size}\n")
    print("| size | masked copies | full logits s | masked rows s | speed-up | copies/s (masked rows) | max |Δ score| |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['size']} | {r['masked_copies']} | {r['median_s']['full']:.2f} | {r['median_s']['masked rows']:.2f} "
              f"| {r['speedup']:.2f}× | {r['copies_per_s']['masked rows']:.0f} | {r['max_abs_score_diff']:.1e} |")
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
