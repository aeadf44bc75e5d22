"""Console entry points: ``antlm-train``, ``antlm-export``, ``antlm-eval``, ``antlm-bench``, ``antlm-study``,
``antlm-plot``."""
from __future__ import annotations

import os
import sys


def _under_launcher() -> bool:
    """True when torchrun, the deepspeed launcher or srun+torchrun started this process."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def train_main(argv: list[str] | None = None) -> int:
    """``antlm-train``. Under a launcher it is one rank; started alone it starts
    ``distributed.nproc_per_node`` local ranks (2 by default) with ``torchrun --standalone``.
    The recipe is validated here first, so a bad recipe fails before any rank starts; then
    the run folder's lock is taken, and signals are forwarded to the ranks
    (:mod:`antlm_dist.launcher`). ``--print-config`` and ``--dry-run`` stop after the checks
    (see :mod:`antlm_dist.dry_run`)."""
    from antlm_dist.progress import PROGRESS_ENV, bar_wanted
    from antlm_dist.train import PREFLIGHT_DONE_ENV, main, parse_args, preflight

    argv = list(sys.argv[1:] if argv is None else argv)
    if _under_launcher():
        return main(argv)
    args = parse_args(argv)  # --help and usage errors exit here, before torch is imported
    try:
        from antlm_dist.config import load_recipe

        if args.nproc_per_node is not None and args.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node {args.nproc_per_node}: give at least 1 local rank, or leave it out "
                             "to use distributed.nproc_per_node")
        nproc = args.nproc_per_node or load_recipe(args.config, args.overrides).distributed.nproc_per_node
        if args.print_config:
            return _print_config(args, nproc)
        _say_if_creating(args.output_dir)
        recipe, corpus = preflight(args, nproc)
        if args.dry_run:
            return _dry_run(args, recipe, corpus, nproc)
    except ValueError as exc:  # ConfigError, CorpusError, ScheduleError, TokenizerError
        print(f"antlm-train: error: {exc}", file=sys.stderr)
        return 2
    if nproc == 1:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        return main(argv)
    from antlm_dist.launcher import run_torchrun
    from antlm_dist.run_lock import LOCK_HELD_ENV, RunLock, RunLockedError

    try:
        lock = RunLock(args.output_dir).acquire()  # held here until every rank has exited
    except RunLockedError as exc:
        print(f"antlm-train: error: {exc}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "antlm_dist.train", *argv]
    # the ranks skip the checks done here (corpus read once) and the lock held here
    env = dict(os.environ, **{PREFLIGHT_DONE_ENV: "1", LOCK_HELD_ENV: "1"})
    env[PROGRESS_ENV] = "1" if bar_wanted() else "0"  # the ranks cannot tell: torchrun may pipe their stderr
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        return run_torchrun(cmd, env, args.output_dir)
    finally:
        lock.release()


def _print_config(args, nproc: int) -> int:
    from antlm_dist.config import load_recipe
    from antlm_dist.distributed import build_ds_config
    from antlm_dist.dry_run import print_config
    from antlm_dist.train import device_kind

    recipe = load_recipe(args.config, args.overrides)
    device = device_kind()
    print_config(recipe, build_ds_config(recipe, nproc, device, recipe_source=str(args.config)), nproc,
                 device.type, str(args.config))
    return 0


def _say_if_creating(output_dir: str) -> None:
    """A run folder whose parent is missing is created with its parents; say so, since a typo
    in the path would otherwise go unnoticed until the run is looked for."""
    from pathlib import Path

    parent = Path(output_dir).expanduser().absolute().parent
    if not parent.exists():
        print(f"antlm-train: note: {parent} does not exist; it is created for --output-dir", file=sys.stderr)


def _dry_run(args, recipe, corpus, nproc: int) -> int:
    import logging

    from antlm_dist.dry_run import dry_run, format_dry_run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    print(format_dry_run(dry_run(recipe, corpus, args.output_dir, nproc, args.overwrite), recipe.data.seq_len))
    return 0


def export_main(argv: list[str] | None = None) -> int:
    from antlm_dist.export_cli import main

    return main(argv)


def eval_main(argv: list[str] | None = None) -> int:
    from antlm_dist.eval.cli import main

    return main(argv)


def study_main(argv: list[str] | None = None) -> int:
    from antlm_dist.study.cli import main

    return main(argv)


def plot_main(argv: list[str] | None = None) -> int:
    from antlm_dist.plots import main

    return main(argv)


def bench_main(argv: list[str] | None = None) -> int:
    from antlm_dist.bench.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
