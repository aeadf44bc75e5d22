"""``antlm-export``: the command line of :mod:`antlm_dist.export`.

    antlm-export --checkpoint RUN|RUN/checkpoints|RUN/checkpoints/stepNNNNNNNN --out DIR
                 [--overwrite] [--untrained]

Exit status 0 when the folder is written, 2 on a bad checkpoint, folder or tokenizer (one
line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import sys
import time

from antlm_dist.export import export_checkpoint, read_antlm_meta, resolve_checkpoint


def build_arg_parser() -> argparse.ArgumentParser:
    """``--checkpoint``, ``--out``, ``--overwrite``, ``--untrained``."""
    p = argparse.ArgumentParser(
        prog="antlm-export",
        description="Export an antlm-train checkpoint (any ZeRO stage, any world size) to a Hugging Face folder.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="run folder, its checkpoints/ folder (latest complete tag) or a checkpoints/stepNNNNNNNN folder")
    p.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--untrained", action="store_true",
                   help="write the run's recipe and tokenizer with freshly initialised weights (step 0 baseline)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``antlm-export``; returns the exit status (0 written, 2 on a bad checkpoint, folder,
    recipe or tokenizer, reported in one line on stderr)."""
    args = build_arg_parser().parse_args(argv)
    from antlm_dist.checkpoint import CheckpointError

    t0 = time.perf_counter()
    try:
        ckpt_dir, tag, _ = resolve_checkpoint(args.checkpoint)  # a bad path fails with one line, before this one
        print(f"exporting {ckpt_dir / tag} to {args.out}: consolidating the ZeRO shards, then writing "
              "safetensors ...", file=sys.stderr, flush=True)  # the slow stage has no natural unit for a bar
        out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, untrained=args.untrained)
    except (ValueError, CheckpointError) as exc:  # ExportError, ConfigError, TokenizerError
        print(f"antlm-export: error: {exc}", file=sys.stderr)
        return 2
    meta = read_antlm_meta(out)
    print(f"exported {'untrained ' if meta.get('untrained') else ''}step {meta.get('step')} "
          f"({meta.get('schedule')}) to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
