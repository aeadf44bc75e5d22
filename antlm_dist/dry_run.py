"""``antlm-train --print-config`` and ``antlm-train --dry-run``: look at a run before it starts.

``--print-config`` resolves the recipe (YAML + overrides) and the DeepSpeed JSON with its
``"auto"`` fields filled for the world size, prints both and writes nothing.

``--dry-run`` runs the launcher's preflight and then the data preparation that rank 0
would do at the start of training, in this process and without a process group:

* ``<output_dir>/tokenizer/``: the tokenizer (trained on the ``.train`` files, or copied
  from ``tokenizer.path``); a smaller trained tokenizer fits ``model.vocab_size`` to it
  (:func:`antlm_dist.data.pipeline.fit_vocab_size`);
* ``<output_dir>/cache/`` (or ``data.cache_dir``): the packed train and dev blocks.

A later ``antlm-train`` into the same folder reuses both (neither marks the folder as
holding a run), so the dry run is not wasted. It prints the sizes the run will have:
vocabulary, blocks, optimizer steps, tokens per step.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from antlm_dist.config import ConfigError, Recipe, dump_recipe


def print_config(recipe: Recipe, ds_config: dict, world_size: int, device_type: str, source: str,
                 out=None) -> None:
    """Print the resolved recipe (YAML) and DeepSpeed config (JSON) to ``out`` (stdout).

    Args:
        recipe: the validated recipe. ds_config: from :func:`antlm_dist.distributed.build_ds_config`.
        world_size: the ranks the JSON was filled for. device_type: ``cpu`` or ``cuda``.
        source: the ``--config`` value, for the header.
    """
    out = out or sys.stdout
    print(f"# resolved recipe (--config {source} and overrides)", file=out)
    if recipe.tokenizer.path is None:
        print("# model.vocab_size shrinks to the trained tokenizer if that comes out smaller "
              "(antlm-train --dry-run shows it)", file=out)
    print(dump_recipe(recipe), end="", file=out)
    print(f"# DeepSpeed config, \"auto\" fields filled for world size {world_size} on {device_type}", file=out)
    print(json.dumps(ds_config, indent=2), file=out)


def dry_run(recipe: Recipe, corpus, output_dir: Path | str, world_size: int, overwrite: bool = False) -> dict:
    """Prepare the tokenizer and the block caches as a run would, and return the run's sizes.

    Args:
        recipe: from the preflight; ``model.vocab_size`` may be fitted in place.
        corpus: :class:`~antlm_dist.data.corpus.CorpusFiles` from the preflight.
        output_dir: the run folder (created if needed). world_size: ranks of the run.
        overwrite: ``--overwrite`` was given; refused when the folder holds a run, because
            a dry run deletes nothing.

    Returns:
        ``{"vocab_size", "train_blocks", "dev_blocks", "steps_per_epoch", "total_steps",
        "global_batch", "tokens_per_step", "written"}``.

    Raises:
        ConfigError: ``overwrite`` on a folder that holds a run.
        ValueError (TokenizerError, CorpusError): from the tokenizer or too few blocks for
            one global batch.
    """
    from antlm_dist.data.blocks import load_blocks
    from antlm_dist.data.pipeline import prepare_tokenizer
    from antlm_dist.data.sampler import DistributedResumableSampler
    from antlm_dist.run_folder import RUN_MARKERS
    from antlm_dist.schedule import parse_schedule, total_steps

    out = Path(output_dir)
    if overwrite and any((out / m).exists() for m in RUN_MARKERS):
        raise ConfigError(f"--dry-run deletes nothing, but --overwrite asks to replace the run in {out}; "
                          "drop --overwrite or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    tok, tok_hash = prepare_tokenizer(recipe, out, corpus.train, rank=0)
    d, t = recipe.data, recipe.train
    cache_dir = Path(d.cache_dir) if d.cache_dir else out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    train = load_blocks(corpus.train, tok, tok_hash, d.seq_len, cache_dir, d.num_proc, True, "train")
    dev = load_blocks(corpus.dev, tok, tok_hash, d.seq_len, cache_dir, d.num_proc, True, "dev")
    n_train = len(train) if d.max_train_blocks is None else min(len(train), d.max_train_blocks)
    n_dev = len(dev) if d.max_eval_blocks is None else min(len(dev), d.max_eval_blocks)
    sampler = DistributedResumableSampler(n_train, t.micro_batch_size, t.gradient_accumulation_steps,
                                          world_size, 0, t.seed)  # raises when one global batch does not fit
    return {"vocab_size": recipe.model.vocab_size, "train_blocks": n_train, "dev_blocks": n_dev,
            "steps_per_epoch": sampler.steps_per_epoch,
            "total_steps": total_steps(parse_schedule(recipe.objective.schedule), sampler.steps_per_epoch),
            "global_batch": sampler.global_batch, "tokens_per_step": sampler.global_batch * d.seq_len,
            "written": [str(out / "tokenizer"), str(cache_dir)]}


def format_dry_run(sizes: dict, seq_len: int) -> str:
    """The dry run's report, a few lines for the terminal."""
    return (f"dry run: vocabulary {sizes['vocab_size']} tokens; {sizes['train_blocks']} train / "
            f"{sizes['dev_blocks']} dev blocks of {seq_len} tokens; {sizes['steps_per_epoch']} steps per epoch, "
            f"{sizes['total_steps']} optimizer steps of {sizes['global_batch']} sequences "
            f"({sizes['tokens_per_step']} tokens)\nwrote {' and '.join(sizes['written'])} (reused by the run); "
            "nothing trained")
