"""``antlm-study``: one command for a whole schedule comparison.

::

    antlm-study --config study-cpu --schedules "1_CLM+4_MLM+1_CLM,6_CLM,6_MLM" --seeds 1,2 \\
        --blimp ../shared/data/blimp --out runs/study [section.key=value ...]

Every schedule × seed is trained with ``antlm-train`` (same recipe and overrides; only
``objective.schedule`` and ``train.seed`` differ), exported with ``antlm-export`` to
``<out>/<schedule>/seed<k>/export``, scored on BLiMP with ``antlm-eval blimp`` in CLM and
PLL mode, and reported in ``<out>/study.md``, ``study.json`` and ``plots/``. Rerunning the
same command skips complete runs and resumes a half-finished one from its last checkpoint.

Exit status: 0 when every run is complete; 2 for invalid arguments (nothing is written);
1 when a run failed; 75 when the study was interrupted (rerun it to continue).
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
from pathlib import Path


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="antlm-study",
        description="Train, export and score several objective schedules of one recipe at equal epochs, "
                    "over several seeds, and write a report (study.md, study.json, plots/).")
    p.add_argument("--config", required=True, help="recipe name (e.g. study-cpu) or YAML path, as for antlm-train")
    p.add_argument("--out", required=True, help="study folder; rerunning with the same folder resumes")
    p.add_argument("--schedules", default=None,
                   help="comma-separated schedules in the paper's notation, e.g. '1_CLM+4_MLM+1_CLM,6_CLM,6_MLM' "
                        "(default: the recipe's schedule and the CLM-only and MLM-only ones with its epochs)")
    p.add_argument("--seeds", default="1", help="comma-separated train.seed values (default: 1)")
    p.add_argument("--blimp", default=None, help="folder of BLiMP *.jsonl files (required unless --no-blimp)")
    p.add_argument("--no-blimp", action="store_true", help="skip BLiMP scoring (held-out losses only)")
    p.add_argument("--blimp-limit", type=int, default=None,
                   help="first N pairs of each BLiMP file for CLM scoring (default: all)")
    p.add_argument("--pll-limit", type=int, default=None,
                   help="first N pairs of each BLiMP file for PLL scoring, which costs one forward per word "
                        "piece (default: --blimp-limit)")
    p.add_argument("--blimp-prefix", choices=("bos", "eos"), default="eos",
                   help="context token before each sentence: </s> (default; the separator before every line "
                        "of the trainer's packed stream) or <s>")
    p.add_argument("--blimp-batch-size", type=int, default=256, help="sequences per scoring forward (default: 256)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="local ranks per run (default: the recipe's distributed.nproc_per_node)")
    p.add_argument("--allow-unequal-epochs", action="store_true",
                   help="accept schedules whose total epochs differ (the comparison is then not at equal epochs)")
    p.add_argument("--overwrite", action="store_true", help="delete --out first and start the study again")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides for every run")
    return p


def _plan_from_args(args: argparse.Namespace):
    """Validate everything and build the plan; raises ValueError subclasses with clear messages."""
    from antlm_dist.config import load_recipe, parse_overrides
    from antlm_dist.study.plan import StudyError, StudyPlan, check_plan, normalise_schedules, parse_int_list

    for name in ("blimp_limit", "pll_limit", "blimp_batch_size", "nproc_per_node"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise StudyError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.blimp is None and not args.no_blimp:
        raise StudyError("--blimp DIR is required (a folder of BLiMP *.jsonl files); pass --no-blimp to skip "
                         "BLiMP scoring")
    for key, _ in parse_overrides(args.overrides):  # also refuses an override without '='
        if key in ("objective.schedule", "train.seed"):
            raise StudyError(f"override {key}=…: the study sets objective.schedule and train.seed itself; "
                             "use --schedules and --seeds")
    recipe = load_recipe(args.config, args.overrides)
    plan = StudyPlan(
        config=args.config, overrides=list(args.overrides),
        schedules=normalise_schedules(args.schedules, recipe.objective.schedule, args.allow_unequal_epochs),
        seeds=parse_int_list(args.seeds, "--seeds"),
        blimp=None if args.no_blimp else str(Path(args.blimp).resolve()), blimp_limit=args.blimp_limit,
        pll_limit=args.pll_limit if args.pll_limit is not None else args.blimp_limit,
        blimp_prefix=args.blimp_prefix, blimp_batch_size=args.blimp_batch_size, nproc_per_node=args.nproc_per_node)
    check_plan(plan)
    return plan


def _blimp_note(plan) -> str:
    if plan.blimp is None:
        return "BLiMP not scored"

    def pairs(n):
        return "all pairs" if n is None else f"the first {n} pairs"

    prefix = {"eos": "</s>", "bos": "<s>"}[plan.blimp_prefix]
    return (f"CLM scoring on {pairs(plan.blimp_limit)} of each paradigm, PLL scoring on {pairs(plan.pll_limit)}; "
            f"context token {prefix}")


def _study_record(plan, command: str, results: list[dict]) -> dict:
    return {"config": plan.config, "command": command, "overrides": plan.overrides, "blimp": plan.blimp,
            "blimp_note": _blimp_note(plan), "planned": [r.key for r in plan.runs],
            "planned_schedules": plan.schedules, "seeds": plan.seeds, "runs": results}


def _raise_interrupt(signum, frame):  # SIGTERM takes the same path as Ctrl-C
    raise KeyboardInterrupt


def run_study(plan, out: Path, command: str) -> int:
    """Run every incomplete run of ``plan`` in order, then write the report. Returns the exit status."""
    from tqdm.auto import tqdm

    from antlm_dist.study.report import write_report
    from antlm_dist.study.runner import (PREEMPT_EXIT_CODE, RunFailed, StudyInterrupted, collect_result, execute_run,
                                         is_complete, run_dir)

    results, code = [], 0
    tty = sys.stderr.isatty()
    outer = tqdm(total=len(plan.runs), desc="study", unit="run", position=0, disable=not tty, dynamic_ncols=True)
    try:
        for i, run in enumerate(plan.runs, 1):
            if is_complete(out, run):
                print(f"[study] {i}/{len(plan.runs)} {run.key}: complete, skipped", file=sys.stderr)
                results.append(collect_result(plan, run, out))
                outer.update(1)
                continue
            print(f"[study] {i}/{len(plan.runs)} {run.key}: running (log {run_dir(out, run) / 'train.log'})",
                  file=sys.stderr)
            inner = tqdm(total=None, desc=run.key, unit="step", position=1, leave=False, disable=not tty,
                         dynamic_ncols=True)
            try:
                results.append(execute_run(plan, run, out, inner, progress=tty))
            finally:
                inner.close()
            r = results[-1]
            blimp = ", ".join(f"BLiMP {m.upper()} {100 * v['overall']:.1f}" for m, v in r["blimp"].items())
            print(f"[study] {run.key}: done in {sum(r['wall_time_s'].values()):.0f} s; {blimp}", file=sys.stderr)
            write_report(out, _study_record(plan, command, results))  # a long study shows its results so far
            outer.update(1)
    except StudyInterrupted as exc:
        print(f"antlm-study: {exc}", file=sys.stderr)
        code = PREEMPT_EXIT_CODE
    except KeyboardInterrupt:  # outside training: the stage in progress is simply redone on the rerun
        print("antlm-study: interrupted; rerun the same command to continue", file=sys.stderr)
        code = PREEMPT_EXIT_CODE
    except RunFailed as exc:
        print(f"antlm-study: error: {exc}", file=sys.stderr)
        code = 1
    finally:
        outer.close()
    write_report(out, _study_record(plan, command, results))
    print(f"[study] {len(results)}/{len(plan.runs)} runs complete; report {out / 'study.md'}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_arg_parser().parse_intermixed_args(argv)
    from antlm_dist.study.plan import write_or_check_plan

    try:
        plan = _plan_from_args(args)
        out = Path(args.out).resolve()
        if args.overwrite:
            shutil.rmtree(out, ignore_errors=True)
        write_or_check_plan(plan, out)
    except ValueError as exc:  # ConfigError, ScheduleError, StudyError, BlimpFormatError
        print(f"antlm-study: error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    return run_study(plan, out, "antlm-study " + shlex.join(argv))


if __name__ == "__main__":
    sys.exit(main())
