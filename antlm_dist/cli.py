"""Console entry points: ``antlm-train``, ``antlm-export``, ``antlm-eval``, ``antlm-bench``, ``antlm-study``."""
from __future__ import annotations

import os
import subprocess
import sys


def _under_launcher() -> bool:
    """True when torchrun, the deepspeed launcher or srun+torchrun started this process."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def train_main(argv: list[str] | None = None) -> int:
    """``antlm-train``. Under a launcher it is one rank; started alone it starts
    ``distributed.nproc_per_node`` local ranks (2 by default) with ``torchrun --standalone``.
    The recipe is validated here first, so a bad recipe fails before any rank starts."""
    from antlm_dist.train import PREFLIGHT_DONE_ENV, main, parse_args, preflight

    argv = list(sys.argv[1:] if argv is None else argv)
    if _under_launcher():
        return main(argv)
    args = parse_args(argv)
    try:
        from antlm_dist.config import load_recipe

        if args.nproc_per_node is not None and args.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node {args.nproc_per_node}: give at least 1 local rank, or leave it out "
                             "to use distributed.nproc_per_node")
        nproc = args.nproc_per_node or load_recipe(args.config, args.overrides).distributed.nproc_per_node
        preflight(args, nproc)
    except ValueError as exc:  # ConfigError, CorpusError, ScheduleError, TokenizerError
        print(f"antlm-train: error: {exc}", file=sys.stderr)
        return 2
    if nproc == 1:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        return main(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "antlm_dist.train", *argv]
    env = dict(os.environ, **{PREFLIGHT_DONE_ENV: "1"})  # the ranks skip the checks done here (corpus read once)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def export_main(argv: list[str] | None = None) -> int:
    from antlm_dist.export import main

    return main(argv)


def eval_main(argv: list[str] | None = None) -> int:
    from antlm_dist.eval.cli import main

    return main(argv)


def study_main(argv: list[str] | None = None) -> int:
    from antlm_dist.study.cli import main

    return main(argv)


def bench_main(argv: list[str] | None = None) -> int:
    from antlm_dist.bench.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
