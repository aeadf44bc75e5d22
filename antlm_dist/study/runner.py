"""Run one study run through its stages, each of which can be resumed.

Stages, in order, each leaving a file that says it is done:

1. ``train``: ``antlm-train`` in a subprocess (it starts its own ranks). A run folder with a
   complete checkpoint is continued with ``--resume``, exactly as an uninterrupted run
   would have gone (the trainer's exact-resume guarantee); one without is started afresh.
   Done when ``train/summary.json`` exists.
2. ``export``: ``antlm-export`` of the final checkpoint into ``export/`` (written as
   ``export.partial/`` and renamed, so ``export/`` only ever holds a complete folder).
3. ``blimp_clm`` and ``blimp_mlm``: ``antlm-eval blimp`` in CLM and PLL mode into
   ``blimp_clm.json`` / ``blimp_mlm.json`` (also written under a temporary name, then renamed).
4. ``result.json``: the run's figures gathered from the files above; its presence marks
   the run complete, and a rerun of the study skips it.

Interrupting the study (SIGINT or SIGTERM) forwards SIGTERM to the training ranks, which
checkpoint at the end of their step (the trainer's preemption path) before the study exits.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from antlm_dist.run_folder import PREEMPT_EXIT_CODE
from antlm_dist.study.plan import RunSpec, StudyPlan

RESULT_FILE = "result.json"
STAGES_FILE = "stages.json"
_STOP_WAIT_S = 180.0  # how long the ranks get to write their preemption checkpoint


class RunFailed(RuntimeError):
    """A stage of a run failed; the message names the run, the stage and its log."""


class StudyInterrupted(RuntimeError):
    """The study was stopped by a signal; rerunning the same command resumes it."""


def run_dir(out: Path, run: RunSpec) -> Path:
    return Path(out) / run.key


def is_complete(out: Path, run: RunSpec) -> bool:
    return (run_dir(out, run) / RESULT_FILE).is_file()


def _stage_times(rdir: Path) -> dict[str, float]:
    path = rdir / STAGES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _add_stage_time(rdir: Path, stage: str, seconds: float) -> None:
    """Accumulate wall time per stage over attempts (a resumed run adds its parts)."""
    times = _stage_times(rdir)
    times[stage] = times.get(stage, 0.0) + seconds
    (rdir / STAGES_FILE).write_text(json.dumps(times, indent=1))


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _MetricsFollower:
    """Reads new ``train`` records of a growing metrics.jsonl to report the last step."""

    def __init__(self, path: Path):
        self.path, self.offset, self.step = path, 0, None

    def poll(self) -> int | None:
        if not self.path.is_file():
            return self.step
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # a half-written last line waits for the next poll
        self.offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if rec.get("type") == "train":
                    self.step = rec["step"]
        return self.step


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the trainer's whole process group, then wait until the group is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_WAIT_S
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def train_command(plan: StudyPlan, run: RunSpec, train_dir: Path, cache_dir: Path) -> list[str]:
    """The antlm-train command line of ``run``: ``--resume`` when a complete checkpoint exists."""
    from antlm_dist.checkpoint import latest_tag

    resume = latest_tag(train_dir / "checkpoints") is not None
    cmd = [sys.executable, "-m", "antlm_dist.cli", "--config", plan.config, "--output-dir", str(train_dir),
           "--resume" if resume else "--overwrite"]
    if plan.nproc_per_node:
        cmd += ["--nproc-per-node", str(plan.nproc_per_node)]
    return cmd + plan.run_overrides(run, cache_dir)


def train_stage(plan: StudyPlan, run: RunSpec, out: Path, bar) -> None:
    """Train (or continue) ``run``; ``bar`` is a tqdm bar advanced to the trainer's step.

    Raises:
        RunFailed: antlm-train exited non-zero (the message ends with its log's tail).
        StudyInterrupted: a signal reached the study, or the trainer was preempted.
    """
    rdir = run_dir(out, run)
    train_dir = rdir / "train"
    if (train_dir / "summary.json").is_file():
        return
    rdir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(plan, run, train_dir, out / "cache")
    log_path = rdir / "train.log"
    follower = _MetricsFollower(train_dir / "metrics.jsonl")
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        # own session: a Ctrl-C in the terminal reaches the study only, which then stops the
        # ranks through the trainer's preemption path instead of killing them mid-step
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                _advance(bar, follower.poll(), train_dir)
        except KeyboardInterrupt:
            _stop_group(proc)
            _add_stage_time(rdir, "train", time.perf_counter() - t0)
            raise StudyInterrupted(f"{run.key}: stopped; its ranks checkpointed. Rerun the same command to "
                                   "continue") from None
    _add_stage_time(rdir, "train", time.perf_counter() - t0)
    _advance(bar, follower.poll(), train_dir)
    if proc.returncode == PREEMPT_EXIT_CODE:
        raise StudyInterrupted(f"{run.key}: the trainer was preempted and checkpointed; rerun the same command "
                               "to continue")
    if proc.returncode != 0 or not (train_dir / "summary.json").is_file():
        raise RunFailed(f"{run.key}: antlm-train exited with status {proc.returncode}; log {log_path}:\n"
                        f"{_tail(log_path)}")


def _advance(bar, step: int | None, train_dir: Path) -> None:
    if bar is None:
        return
    if bar.total is None and (train_dir / "run.json").is_file():
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            bar.total = json.loads((train_dir / "run.json").read_text())["total_steps"]
            bar.refresh()
    if step is not None and step > bar.n:
        bar.update(step - bar.n)


def export_stage(run: RunSpec, out: Path) -> None:
    """Export the run's final checkpoint to ``export/`` (via ``export.partial/``).

    Raises:
        RunFailed: antlm-export refused the checkpoint.
    """
    from antlm_dist.export_cli import main as export_main

    rdir = run_dir(out, run)
    final = rdir / "export"
    if (final / "config.json").is_file():
        return
    partial = rdir / "export.partial"
    t0 = time.perf_counter()
    with open(rdir / "eval.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        code = export_main(["--checkpoint", str(rdir / "train"), "--out", str(partial), "--overwrite"])
    if code != 0:
        raise RunFailed(f"{run.key}: antlm-export failed (status {code}); see {rdir / 'eval.log'}:\n"
                        f"{_tail(rdir / 'eval.log')}")
    shutil.rmtree(final, ignore_errors=True)
    partial.replace(final)
    _add_stage_time(rdir, "export", time.perf_counter() - t0)


def blimp_stage(plan: StudyPlan, run: RunSpec, out: Path, mode: str, progress: bool) -> None:
    """Score BLiMP in ``mode`` (``clm`` or ``mlm``) into ``blimp_<mode>.json`` and ``.md``.

    Raises:
        RunFailed: antlm-eval failed (e.g. a sentence longer than the model's positions).
    """
    from antlm_dist.eval.cli import main as eval_main

    rdir = run_dir(out, run)
    final = rdir / f"blimp_{mode}.json"
    if plan.blimp is None or final.is_file():
        return
    partial = rdir / f"blimp_{mode}.partial.json"
    limit = plan.blimp_limit if mode == "clm" else plan.pll_limit
    argv = ["blimp", "--model", str(rdir / "export"), "--data", plan.blimp, "--mode", mode, "--out", str(partial),
            "--prefix", plan.blimp_prefix, "--batch-size", str(plan.blimp_batch_size)]
    argv += ["--limit", str(limit)] if limit else []
    argv += [] if progress else ["--no-progress"]
    t0 = time.perf_counter()
    with open(rdir / "eval.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        code = eval_main(argv)
    if code != 0:
        raise RunFailed(f"{run.key}: antlm-eval blimp --mode {mode} failed (status {code}); see {rdir / 'eval.log'}")
    partial.with_suffix(".md").replace(final.with_suffix(".md"))
    partial.replace(final)
    _add_stage_time(rdir, f"blimp_{mode}", time.perf_counter() - t0)


def collect_result(plan: StudyPlan, run: RunSpec, out: Path) -> dict:
    """Gather the run's figures into ``result.json`` (written atomically) and return them.

    Returns:
        ``{"schedule", "seed", "steps", "steps_per_epoch", "phase_switch_steps", "parameters",
        "tokens_per_step", "heldout": {"clm": {...}, "mlm": {...}} (the trainer's final
        evaluation), "curve": [{"step", "clm_loss", "mlm_loss", "mlm_accuracy"}],
        "blimp": {"clm"|"mlm": {"overall", "pairs", "by_field"}}, "wall_time_s": {stage: s}}``;
        accuracies are fractions, losses nats per target token.
    """
    from antlm_dist.metrics import read_metrics
    from antlm_dist.schedule import parse_schedule

    rdir = run_dir(out, run)
    train = rdir / "train"
    info = json.loads((train / "run.json").read_text())
    summary = json.loads((train / "summary.json").read_text())
    spe = info["steps_per_epoch"]
    switches, epochs = [], 0
    for phase in parse_schedule(run.schedule)[:-1]:
        epochs += phase.epochs
        switches.append(epochs * spe)
    curve = {}  # by step: a resumed run may have logged an evaluation twice; keep the last
    for rec in read_metrics(train / "metrics.jsonl", "eval"):
        curve[rec["step"]] = {"step": rec["step"], "clm_loss": rec["clm_loss"], "mlm_loss": rec["mlm_loss"],
                              "mlm_accuracy": rec["mlm_accuracy"]}
    blimp = {}
    for mode in ("clm", "mlm"):
        f = rdir / f"blimp_{mode}.json"
        if f.is_file():
            res = json.loads(f.read_text())["results"][mode]
            blimp[mode] = {"overall": res["overall"], "pairs": res["pairs"],
                           "by_field": {k: v["accuracy"] for k, v in res["by_field"].items()}}
    result = {
        "schedule": run.schedule, "seed": run.seed, "steps": info["total_steps"], "steps_per_epoch": spe,
        "phase_switch_steps": switches, "parameters": info["parameters"], "tokens_per_step": info["tokens_per_step"],
        "world_size": info["world_size"], "heldout": summary["final_eval"], "curve": [curve[s] for s in sorted(curve)],
        "blimp": blimp, "wall_time_s": _stage_times(rdir),
        "train_loop_s": summary["wall_time_s"],
    }
    tmp = rdir / (RESULT_FILE + ".partial")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(rdir / RESULT_FILE)
    return result


def execute_run(plan: StudyPlan, run: RunSpec, out: Path, bar, progress: bool) -> dict:
    """All stages of one run, skipping those already done; returns its result."""
    train_stage(plan, run, out, bar)
    export_stage(run, out)
    for mode in ("clm", "mlm"):
        blimp_stage(plan, run, out, mode, progress)
    return collect_result(plan, run, out)
