"""``python -m antlm_dist.train``: one rank of an AntLM pretraining run.

:func:`preflight` runs every check that needs no compute, once per launch (the
``antlm-train`` launcher runs it before it starts any rank; ranks started by another
launcher run its cheap checks each, and global rank 0 alone reads the corpus files). :func:`run` then starts the process group and hands over to
:class:`antlm_dist.trainer.Trainer`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

# Only light modules at import time: ``antlm-train --help`` and recipe errors must not wait
# for torch, DeepSpeed or transformers (seconds each); the functions below import them.
from antlm_dist.config import ConfigError, load_recipe
from antlm_dist.data.block_count import check_training_blocks
from antlm_dist.data.corpus import find_corpus
from antlm_dist.ds_json import read_ds_json

log = logging.getLogger("antlm_dist")

PREFLIGHT_DONE_ENV = "ANTLM_PREFLIGHT_DONE"
"""Set by the ``antlm-train`` launcher for the ranks it starts: it has already run
:func:`preflight` (which reads every corpus file), so the ranks only load the recipe."""
_RANK_ADDRESSES: list = []  # (hostname, addresses) per global rank, gathered at start-up
_TIMEOUT_MINUTES: list = []
_RUN_LOCK: list = []
_WATCHDOG: list = []  # this rank's heartbeat watchdog, to name a silent peer when a collective fails


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="antlm-train",
        description="AntLM pretraining: alternating CLM/MLM phases on one backbone under DeepSpeed.",
    )
    p.add_argument("--config", default="demo-cpu", help="recipe YAML path or shipped recipe name (default: demo-cpu)")
    p.add_argument("--output-dir", default=None,
                   help="run folder: tokenizer, metrics.jsonl, checkpoints/ (required unless --print-config)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="TAG",
                   help="continue from the newest intact checkpoint in --output-dir, or from TAG (e.g. step00000120)")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in --output-dir first")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="local ranks to start when run without a launcher (default: distributed.nproc_per_node)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe and DeepSpeed JSON, then exit (writes nothing)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the preflight checks and prepare the data (tokenizer/ and the block cache in "
                        "--output-dir), print the run's sizes, then exit without training")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 objective.schedule=1_CLM+1_MLM")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``antlm-train``; exits 2 (argparse) when ``--output-dir`` is missing
    without ``--print-config``. ``--resume`` takes an optional TAG; an override right after it
    (``--resume train.lr=1e-3``) stays an override, as it was before TAG existed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, token in enumerate(argv[:-1]):
        if token == "--resume" and "=" in argv[i + 1]:
            argv[i] = "--resume="  # an empty TAG: resume from the newest intact checkpoint
    p = build_arg_parser()
    args = p.parse_intermixed_args(argv)
    if args.resume == "":
        args.resume = True
    if args.output_dir is None and not args.print_config:
        p.error("the following arguments are required: --output-dir")
    return args


def device_kind():
    """``torch.device("cuda")`` when CUDA is visible, else the CPU (imports torch)."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def preflight(args: argparse.Namespace, world_size: int, read_corpus: bool = True):
    """Every check that needs no compute, run before any rank trains.

    Validates the recipe, the output folder, the corpus (exists; with ``read_corpus`` also
    non-empty and UTF-8, which reads every file), the DeepSpeed JSON against the recipe's
    batch sizes for ``world_size``, ``train.compile`` against the ZeRO stage and the C++
    compiler, the kernel backends and head dims for this machine,
    that no abandoned torch-extension build lock would hang the start, and a given
    ``tokenizer.path`` against ``model.vocab_size``, and that the packages of the trackers the
    recipe turns on are installed, and (with ``read_corpus``) that the corpus gives at
    least one global batch of blocks (:mod:`antlm_dist.data.block_count`). The checks that need no torch come first, so a recipe error appears in about a second.

    Returns:
        (recipe, corpus files).

    Raises:
        ConfigError, CorpusError, ScheduleError, TokenizerError, StaleBuildLockError: naming
        field and fix.
    """
    from antlm_dist.run_folder import RunFolder
    from antlm_dist.trackers import check_trackers

    recipe = load_recipe(args.config, args.overrides)
    check_trackers(recipe.logging)
    RunFolder(args.output_dir).check(args.resume, args.overwrite)
    corpus = find_corpus(recipe.data.corpus, validate=read_corpus)
    read_ds_json(recipe, world_size, str(args.config))  # the file, its ZeRO stage and batch fields, before torch
    from antlm_dist.distributed import build_ds_config, check_build_locks, zero_stage
    from antlm_dist.model.backends import check_model_backends
    from antlm_dist.speedups import resolve_compile, single_rank_ds_config

    device = device_kind()
    ds_config, _ = single_rank_ds_config(build_ds_config(recipe, world_size, device, recipe_source=str(args.config)),
                                         world_size, recipe)
    resolve_compile(recipe, device, zero_stage(ds_config))
    check_model_backends(recipe.model, device)
    check_build_locks()  # imports torch.utils.cpp_extension (about a second): last
    if recipe.tokenizer.path:
        from antlm_dist.data.tokenizer import check_vocab_matches, load_tokenizer

        check_vocab_matches(load_tokenizer(recipe.tokenizer.path, recipe.tokenizer.kind), recipe.model.vocab_size,
                            f"tokenizer.path={recipe.tokenizer.path}")
    if read_corpus:  # needs the files read; a tiny corpus is tokenised in memory, nothing written
        check_training_blocks(recipe, corpus.train, world_size)
    return recipe, corpus


def _recipe_and_corpus(args: argparse.Namespace, rank: int, world_size: int):
    """The launcher's preflight result when it ran one. Else :func:`preflight` here, reading
    the corpus files on global rank 0 only (a bad file stops rank 0, and the launcher then
    stops the others)."""
    if os.environ.get(PREFLIGHT_DONE_ENV) == "1":
        recipe = load_recipe(args.config, args.overrides)
        return recipe, find_corpus(recipe.data.corpus, validate=False)
    return preflight(args, world_size, read_corpus=rank == 0)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("DeepSpeed", "deepspeed", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """One rank of a training run. Returns the process exit status."""
    from antlm_dist.distributed import dist_env, init_distributed, pick_device, world_info
    from antlm_dist.faults import format_rank_table, gather_rank_addresses
    from antlm_dist.run_folder import RunFolder
    from antlm_dist.run_lock import LOCK_HELD_ENV, RunLock
    from antlm_dist.trainer import Trainer
    from antlm_dist.watchdog import start_watchdog

    env_rank, local_rank, env_world = dist_env()
    recipe, corpus = _recipe_and_corpus(args, env_rank, env_world)
    if env_rank == 0 and os.environ.get(LOCK_HELD_ENV) != "1":  # another launcher: rank 0 holds the run folder
        _RUN_LOCK[:] = [RunLock(args.output_dir).acquire()]  # released when this process exits
    device = pick_device(local_rank)
    setup_logging(env_rank)
    init_distributed(recipe, device)
    rank, world = world_info()
    _RANK_ADDRESSES[:] = gather_rank_addresses()  # to name a lost rank if a collective fails
    _TIMEOUT_MINUTES[:] = [recipe.distributed.timeout_minutes]
    if world > 1:
        log.info("%d ranks on %d hosts: %s", world, len({h for h, _ in _RANK_ADDRESSES}),
                 format_rank_table(_RANK_ADDRESSES))
    watchdog = start_watchdog(recipe.distributed.timeout_minutes, [h for h, _ in _RANK_ADDRESSES])
    _WATCHDOG[:] = [watchdog] if watchdog else []
    trainer = Trainer(recipe, RunFolder(args.output_dir, rank), corpus, device, resume=args.resume,
                      overwrite=args.overwrite, recipe_source=str(args.config))
    code = trainer.train()
    if watchdog is not None:
        watchdog.close(finished=True)  # the peers stop watching this rank, which now leaves
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config or args.dry_run:
        print("antlm-train: error: --print-config and --dry-run run before any rank starts; give them to "
              "antlm-train without a launcher (torchrun, srun)", file=sys.stderr)
        return 2
    from antlm_dist.checkpoint import CheckpointError
    from antlm_dist.distributed import world_info
    from antlm_dist.faults import comm_failure_message, is_comm_failure
    from antlm_dist.schedule import PhaseDesyncError

    try:
        code = run(args)
    except (ConfigError, CheckpointError, ValueError) as exc:
        logging.getLogger("antlm_dist").debug("start-up error", exc_info=True)
        print(f"antlm-train: error: {exc}", file=sys.stderr)
        code = 2
    except RuntimeError as exc:
        if isinstance(exc, PhaseDesyncError) or not is_comm_failure(exc):
            raise
        rank, world = world_info()
        msg = comm_failure_message(exc, _RANK_ADDRESSES, rank, world, (_TIMEOUT_MINUTES or [0])[0])
        silent = _WATCHDOG[0].silent_ranks(60 * _TIMEOUT_MINUTES[0] / 2) if _WATCHDOG else []
        if silent:  # a collective timed out: the heartbeats tell which peer stopped answering
            msg += f" ({_WATCHDOG[0].describe(silent)} sent no heartbeat for the last {30 * _TIMEOUT_MINUTES[0]:g} s)"
        print(msg, file=sys.stderr, flush=True)
        os._exit(1)  # the process group is broken: tearing it down could block on the dead peer
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
    return code


if __name__ == "__main__":
    sys.exit(main())
