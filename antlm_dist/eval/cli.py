"""``antlm-eval``: zero-shot BLiMP and held-out losses of an exported model, on one process.

Subcommands::

    antlm-eval blimp   --model DIR --data DIR --mode clm|mlm|mntp|both --out FILE.json
                       [--pll-metric original|within_word_l2r] [--limit N] [--batch-size B]
                       [--device auto|cpu|cuda] [--prefix bos|eos]
    antlm-eval heldout --model DIR --corpus DIR|bundled [--max-blocks N] [--out FILE.json]
    antlm-eval compare A.json B.json ... [--names a b ...] [--out FILE.md]

``--model`` is a folder written by ``antlm-export`` (see :mod:`antlm_dist.export`). The
BLiMP scores are defined in :mod:`antlm_dist.eval.blimp` (CLM: summed log p(w | <s>);
MLM: pseudo-log-likelihood, Salazar et al. 2020, or its ``within_word_l2r`` variant, Kauf
& Ivanova 2023; MNTP: the same read at position i-1, for ``next_position`` models); each
mode's number of tied pairs (equal scores, counted wrong) is printed and stored as
``results.<mode>.ties``; ``heldout`` reuses the trainer's own
:func:`antlm_dist.eval.heldout.evaluate_heldout`, so its numbers equal the trainer's
evaluations of the same weights and blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# torch and the scoring modules are imported inside the commands, so ``--help`` and argument
# errors answer at once.
from antlm_dist.progress import bar_wanted

MODE_TITLES = {"clm": "CLM", "mlm": "MLM (PLL)", "mntp": "MNTP (PLL)"}


def mode_title(mode: str, pll_metric: str = "original") -> str:
    """Column title of a mode, e.g. ``MLM (PLL)`` or ``MLM (PLL-word-l2r)``."""
    title = MODE_TITLES[mode]
    return title if mode == "clm" or pll_metric == "original" else title.replace("(PLL)", "(PLL-word-l2r)")


def _device(name: str):
    """``auto`` (CUDA when visible, else the CPU), ``cuda`` or ``cpu`` as a ``torch.device``.

    Raises:
        ValueError: ``cuda`` without a visible CUDA device.
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(name)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


# ----------------------------------------------------------------------------- blimp

def run_blimp(args: argparse.Namespace) -> dict:
    """Score BLiMP in the requested modes; write ``--out`` (JSON) and ``--out`` with ``.md``."""
    import torch

    from antlm_dist.eval.blimp import format_markdown, read_blimp, score_pairs, summarize
    from antlm_dist.export import load_pretrained, read_antlm_meta

    device = _device(args.device)
    pairs = read_blimp(args.data, args.limit)  # parse everything before loading the model
    model, tok = load_pretrained(args.model, device)
    prefix_id = {"bos": tok.bos_token_id, "eos": tok.eos_token_id}[args.prefix]
    modes = ["clm", "mlm"] if args.mode == "both" else [args.mode]
    meta = read_antlm_meta(args.model)
    if "mlm" in modes and meta.get("mlm_target") == "next_position":
        print("antlm-eval: note: this model was trained with objective.mlm_target=next_position; "
              "--mode mntp reads its masked predictions where they were trained", file=sys.stderr)
    results, wall, per_pair = {}, {}, []
    for mode in modes:
        t0 = time.perf_counter()
        metric = "original" if mode == "clm" else args.pll_metric
        print(f"{mode_title(mode, metric)}: scoring {len(pairs)} pairs ...", file=sys.stderr, flush=True)
        scored = score_pairs(model, tok, pairs, mode, batch_size=args.batch_size, prefix_id=prefix_id,
                             progress=not args.no_progress and bar_wanted(),  # no bar in a log file
                             pll_metric=metric)
        wall[mode] = time.perf_counter() - t0
        results[mode] = summarize(pairs, scored["correct"], scored["tie"])
        per_pair += [{"mode": mode, "source": p.source, "uid": p.uid, "good": g, "bad": b, "tie": t}
                     for p, g, b, t in zip(pairs, scored["good"], scored["bad"], scored["tie"])]
        print(f"{mode_title(mode, metric)}: {100 * results[mode]['overall']:.1f}% over {len(pairs)} pairs, "
              f"{results[mode]['ties']} tied (counted wrong) ({wall[mode]:.1f} s)", file=sys.stderr)
    report = {
        "model": str(args.model), "data": str(args.data), "modes": modes, "limit": args.limit,
        "prefix": args.prefix, "pll_metric": args.pll_metric, "batch_size": args.batch_size, "device": str(device),
        "pairs": len(pairs),
        "wall_time_s": wall, "torch_threads": torch.get_num_threads(),
        "antlm": {k: v for k, v in meta.items() if k != "recipe"}, "results": results,
    }
    out = Path(args.out)
    _write_json(out, report)
    if args.scores_out:
        Path(args.scores_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.scores_out).write_text("".join(json.dumps(r) + "\n" for r in per_pair))
    md = format_markdown({mode_title(m, args.pll_metric): results[m] for m in modes})
    out.with_suffix(".md").write_text(md)
    print(md)
    return report


# ----------------------------------------------------------------------------- heldout

def run_heldout(args: argparse.Namespace) -> dict:
    """CLM perplexity and MLM loss/accuracy (and MNTP's when the run's schedule trained it) on the
    corpus's ``.dev`` blocks, with the trainer's code."""
    from antlm_dist.config import Recipe, recipe_from_dict
    from antlm_dist.data.corpus import CorpusError, find_corpus
    from antlm_dist.data.tokenizer import tokenizer_hash
    from antlm_dist.eval.heldout import evaluate_heldout
    from antlm_dist.export import load_pretrained, read_antlm_meta
    from antlm_dist.data.blocks import cache_key, load_blocks
    from antlm_dist.data.pipeline import make_collators
    from antlm_dist.mixing import collators_for
    from antlm_dist.schedule import parse_schedule, schedule_objectives

    device = _device(args.device)
    model, tok = load_pretrained(args.model, device)
    meta = read_antlm_meta(args.model)
    recipe = recipe_from_dict(meta["recipe"]) if "recipe" in meta else Recipe(model=model.config)
    corpus = find_corpus(args.corpus)
    if not corpus.dev:
        raise CorpusError(f"--corpus {args.corpus}: no *.dev files; heldout evaluation needs a dev split")
    seq_len = args.seq_len or recipe.data.seq_len
    max_blocks = args.max_blocks if args.max_blocks is not None else recipe.data.max_eval_blocks
    tok_hash = tokenizer_hash(Path(args.model) / "tokenizer.json")
    cache = _heldout_cache_dir(args.cache_dir, meta)
    cached = (cache / f"dev-{cache_key(corpus.dev, tok_hash, seq_len)}.npy").is_file()
    print(f"{'reusing' if cached else 'tokenising'} the dev split ({len(corpus.dev)} files, {seq_len}-token "
          f"blocks) {'from' if cached else 'into'} {cache}", file=sys.stderr, flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    blocks = load_blocks(corpus.dev, tok, tok_hash, seq_len, cache, 1, True, "dev")
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    clm, mlm = make_collators(recipe, tok)
    # as the trainer evaluates: MNTP too when the run's schedule trained it
    extra = {"mntp": collators_for(clm, mlm)["MNTP"]} if "MNTP" in schedule_objectives(
        parse_schedule(recipe.objective.schedule)) else {}
    t0 = time.perf_counter()
    print(f"evaluating {blocks.shape[0]} blocks ({', then '.join(['CLM', 'MLM', *(k.upper() for k in extra)])}) ...",
          file=sys.stderr, flush=True)
    res = evaluate_heldout(model, blocks, clm, mlm, args.batch_size, device, extra=extra)
    report = {"model": str(args.model), "corpus": corpus.root, "blocks": int(blocks.shape[0]), "seq_len": seq_len,
              "wall_time_s": time.perf_counter() - t0, **res}
    print(f"CLM loss {res['clm']['loss']:.4f} nats/token (ppl {res['clm']['ppl']:.2f}) | MLM loss "
          f"{res['mlm']['loss']:.4f} (accuracy {res['mlm']['accuracy']:.3f})"
          + "".join(f" | {k.upper()} loss {res[k]['loss']:.4f} (accuracy {res[k]['accuracy']:.3f})" for k in extra)
          + f" on {blocks.shape[0]} blocks of {seq_len} tokens")
    if args.out:
        _write_json(Path(args.out), report)
    return report


def _heldout_cache_dir(given: str | None, meta: dict) -> Path:
    """Where the tokenised dev blocks are kept: ``--cache-dir``; else the block cache of the
    run the model was exported from (its ``data.cache_dir``, or ``<run>/cache``), which
    already holds them when the run evaluated the same split; else
    ``$XDG_CACHE_HOME/antlm-dist/blocks``. Cache files are named by the files, the
    tokenizer hash and the block length, so sharing a folder is safe."""
    if given:
        return Path(given)
    run_cache = (meta.get("recipe") or {}).get("data", {}).get("cache_dir")
    source = meta.get("source_checkpoint")  # <run>/checkpoints/<tag>
    for candidate in (run_cache, source and Path(source).parent.parent / "cache"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "antlm-dist" / "blocks"


# ----------------------------------------------------------------------------- compare

def run_compare(args: argparse.Namespace) -> str:
    """One Markdown table with a column per (result file, mode)."""
    from antlm_dist.eval.blimp import format_markdown

    columns = {}
    names = args.names or [Path(f).stem for f in args.results]
    if len(names) != len(args.results):
        raise ValueError(f"--names gives {len(names)} names for {len(args.results)} result files")
    for name, f in zip(names, args.results):
        rep = json.loads(Path(f).read_text())
        for mode in rep["modes"]:
            title = f"{name} {mode_title(mode, rep.get('pll_metric', 'original'))}"
            if title in columns:
                raise ValueError(f"two columns would be called {title!r}; give distinct --names")
            columns[title] = rep["results"][mode]
    md = format_markdown(columns)
    if args.out:
        Path(args.out).write_text(md)
    print(md)
    return md


# ----------------------------------------------------------------------------- entry

def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="antlm-eval", description="Evaluate a model exported with antlm-export.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("blimp", help="zero-shot BLiMP minimal pairs (Warstadt et al. 2020) in CLM and/or MLM mode")
    b.add_argument("--model", required=True, help="folder written by antlm-export")
    b.add_argument("--data", required=True, help="folder of BLiMP *.jsonl files (or one file)")
    b.add_argument("--mode", choices=("clm", "mlm", "mntp", "both"), default="both",
                   help="clm: summed log p(sentence | <s>); mlm: pseudo-log-likelihood (Salazar et al. 2020); "
                        "mntp: the PLL read at position i-1 (models trained with objective.mlm_target="
                        "next_position); both: clm and mlm")
    b.add_argument("--pll-metric", choices=("original", "within_word_l2r"), default="original",
                   help="masking of mlm/mntp: original (one token) or within_word_l2r (also the later pieces "
                        "of the same word, Kauf & Ivanova 2023)")
    b.add_argument("--out", required=True, help="results JSON; a Markdown table is written beside it (.md)")
    b.add_argument("--scores-out", default=None,
                   help="also write every pair's two scores (nats) as JSON lines: mode, source, uid, good, bad, tie")
    b.add_argument("--limit", type=int, default=None, help="first N pairs of each file (default: all)")
    b.add_argument("--batch-size", type=int, default=256,
                   help="sequences per forward pass (MLM: masked copies) (default: 256)")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): cuda when a GPU is visible, else cpu")
    b.add_argument("--prefix", choices=("bos", "eos"), default="bos",
                   help="context token before each sentence: <s> (default) or </s> (the trainer's line separator)")
    b.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar (it shows only when stderr is a terminal, or with ANTLM_PROGRESS=1)")
    b.set_defaults(func=run_blimp)

    h = sub.add_parser("heldout", help="CLM perplexity and MLM loss/accuracy (and MNTP's when the schedule trained it) "
                                    "on the corpus's .dev files")
    h.add_argument("--model", required=True, help="folder written by antlm-export")
    h.add_argument("--corpus", default="bundled", help="corpus folder in the BabyLM layout, or 'bundled'")
    h.add_argument("--max-blocks", type=int, default=None,
                   help="first N packed dev blocks (default: the run's data.max_eval_blocks)")
    h.add_argument("--seq-len", type=int, default=None, help="tokens per block (default: the run's data.seq_len)")
    h.add_argument("--batch-size", type=int, default=32, help="blocks per forward pass")
    h.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): cuda when a GPU is visible, else cpu")
    h.add_argument("--cache-dir", default=None, help="keep the tokenised dev set here (default: the source run's cache/ "
                   "if it exists, else ~/.cache/antlm-dist/blocks)")
    h.add_argument("--out", default=None, help="also write the results as JSON")
    h.set_defaults(func=run_heldout)

    c = sub.add_parser("compare", help="one Markdown table from several 'antlm-eval blimp' result files")
    c.add_argument("results", nargs="+", help="JSON files written by antlm-eval blimp")
    c.add_argument("--names", nargs="+", default=None, help="a column name per file (default: file stems)")
    c.add_argument("--out", default=None, help="also write the table here")
    c.set_defaults(func=run_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    for name in ("limit", "batch_size", "max_blocks", "seq_len"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            print(f"antlm-eval: error: --{name.replace('_', '-')} must be > 0, got {value}", file=sys.stderr)
            return 2
    try:
        args.func(args)
    except (ValueError, OSError) as exc:  # BlimpFormatError, SentenceTooLongError, ExportError, CorpusError …
        print(f"antlm-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
