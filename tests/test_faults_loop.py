"""Faults around the training loop and the self-launcher, on 2 CPU ranks of the tiny recipe:
a stopped (SIGSTOP) rank, a diverged model, two runs into one folder, SIGTERM/SIGINT to
``antlm-train`` and ``timeout``, and preemption within the step that was running."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from antlm_dist.checkpoint import latest_tag, tag_for_step
from antlm_dist.metrics import MetricsWriter, read_metrics
from antlm_dist.nonfinite import NonFiniteGuard
from antlm_dist.run_folder import PREEMPT_EXIT_CODE, PREEMPTED_MARKER
from antlm_dist.run_lock import RunLock, RunLockedError
from antlm_dist.watchdog import Watchdog, heartbeat_interval_s
from antlm_testutil import REPO, run_cli

STEP_DELAY = "debug.step_delay_s=0.7"  # a slow step: room to signal or stop a rank inside it


# ----------------------------------------------------------------------------- helpers

def _start_cli(args: list[str], *launcher: str) -> subprocess.Popen:
    """``antlm-train`` (optionally under ``launcher``, e.g. ``timeout``) in the background."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([*launcher, sys.executable, "-m", "antlm_dist.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path, "train")] if path.is_file() else []


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout_s: float = 400) -> int:
    """Poll metrics.jsonl until ``step`` is logged; returns the last logged step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = _steps(run_dir)
        if done and done[-1] >= step:
            return done[-1]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before step {step}\n{err[-4000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"step {step} not reached within {timeout_s} s")


def _warm_data_cache(tiny_args: list[str], tmp: Path) -> None:
    """Tokenize and pack the tiny recipe's blocks into the shared cache, in this process.

    Rank 0 builds them at start-up while rank 1 waits in a barrier; on a loaded machine that
    wait can exceed a 30 s collective timeout before the fault under test is injected."""
    from antlm_dist.config import load_recipe
    from antlm_dist.data.blocks import load_blocks
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.data.pipeline import prepare_tokenizer

    recipe = load_recipe("demo-cpu", tiny_args)
    corpus = find_corpus(recipe.data.corpus, validate=False)
    tok, tok_hash = prepare_tokenizer(recipe, tmp, corpus.train, 0)
    for files, name in ((corpus.train, "train"), (corpus.dev, "dev")):
        load_blocks(files, tok, tok_hash, recipe.data.seq_len, Path(recipe.data.cache_dir), 1, True, name)


def _rank_processes(run_dir: Path) -> dict[int, psutil.Process]:
    """The training ranks of the run in ``run_dir``, by global rank."""
    out = {}
    for p in psutil.process_iter(["cmdline", "environ"]):
        cmd, environ = p.info["cmdline"] or [], p.info["environ"] or {}
        if "antlm_dist.train" in cmd and str(run_dir) in cmd and "RANK" in environ:
            out[int(environ["RANK"])] = p
    return out


def _finish(proc: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"antlm-train still running {timeout_s} s later\n{err[-4000:]}")
    return proc.returncode, err


# ----------------------------------------------------------------------------- units

def test_metrics_write_nonfinite_numbers_as_null_with_a_flag(tmp_path):
    writer = MetricsWriter(tmp_path / "m.jsonl", enabled=True)
    writer.write("train", step=1, loss=float("nan"), grad_norm=float("inf"), lr=1e-3, mfu=float("-inf"))
    writer.close()
    line = (tmp_path / "m.jsonl").read_text()

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    rec = json.loads(line, parse_constant=refuse)  # strict JSON: no NaN, Infinity or "inf" strings
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["mfu"] is None and rec["lr"] == 1e-3
    assert sorted(rec["nonfinite"]) == ["grad_norm", "loss", "mfu"]
    assert "inf" not in line and "NaN" not in line


def test_resume_drops_the_records_of_steps_it_trains_again(tmp_path):
    """A rank killed after the checkpoint of step 4 had logged steps 5 and 6: a resume from
    step 4 removes those records (and keeps everything else, in order)."""
    from antlm_dist.metrics import drop_records_after

    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path, enabled=True)
    written = [("start", {"step": 0}), *[("train", {"step": s, "loss": 6.0 - s}) for s in range(1, 7)],
               ("checkpoint", {"step": 4}), ("eval", {"step": 6}), ("note", {})]
    for kind, fields in written:
        writer.write(kind, **fields)
    writer.close()
    before = read_metrics(path)
    expected = [r for r in before if not (isinstance(r.get("step"), int) and r["step"] > 4)]
    assert drop_records_after(path, 4) == len(before) - len(expected) == 3
    assert read_metrics(path) == expected
    assert drop_records_after(path, 4) == 0 and read_metrics(path) == expected


def test_nonfinite_guard_counts_consecutive_steps_against_a_loop():
    inf, nan = float("inf"), float("nan")
    steps = [(2.0, 1.0, False), (inf, 1.0, False), (2.0, inf, False), (1.5, 0.5, False), (1.5, 0.5, True),
             (nan, None, False), (1.0, nan, False)]
    guard, expected_run = NonFiniteGuard(3), 0
    for step, (loss, norm, skipped) in enumerate(steps, 1):
        bad = loss != loss or abs(loss) == inf or (norm is not None and (norm != norm or abs(norm) == inf)) \
            or skipped
        expected_run = expected_run + 1 if bad else 0
        assert guard.update(step, "CLM", loss, norm, skipped) is (not bad)
        assert guard.consecutive == expected_run
        assert guard.exhausted is (expected_run >= 3)
    assert guard.last_finite == (4, "CLM", 1.5)
    assert "step 4" in guard.message(7, "MLM") and "1.5000" in guard.message(7, "MLM")
    with pytest.raises(ValueError, match="train.max_nonfinite_steps"):
        NonFiniteGuard(0)


def test_watchdog_names_the_silent_peer_and_ignores_a_finished_one():
    """Three ranks share a store; rank 1 stops beating (as under SIGSTOP), rank 2 finishes.
    Rank 0's watchdog reports rank 1 only, after the timeout and before timeout + 2 beats."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    timeout_s, fired = 2.0, []
    lost_event = threading.Event()

    def on_lost(msg):
        fired.append((time.monotonic(), msg))
        lost_event.set()

    hosts = ["node0", "node1", "node2"]
    dogs = [Watchdog(store, r, 3, hosts, timeout_s, on_lost=on_lost if r == 0 else (lambda m: None))
            for r in range(3)]
    for d in dogs:
        d.start()
    time.sleep(heartbeat_interval_s(timeout_s) * 2)
    dogs[2].close(finished=True)
    dogs[1].close(finished=False)  # frozen: no beat, no "done"
    silent_since = time.monotonic()
    assert lost_event.wait(timeout_s + 4 * heartbeat_interval_s(timeout_s) + 2)
    elapsed = fired[0][0] - silent_since
    assert timeout_s - heartbeat_interval_s(timeout_s) <= elapsed, elapsed
    assert dogs[0].lost == [1]
    assert "rank 1 on node1 stopped answering" in fired[0][1] and "rank 2" not in fired[0][1]
    dogs[0].close()


def test_run_lock_refuses_a_second_holder_naming_host_and_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from antlm_dist.run_lock import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}") as info:
            RunLock(tmp_path).acquire()
        assert os.uname().nodename in str(info.value) and "--output-dir" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path).acquire()  # the kernel dropped the killed holder's lock
    assert (tmp_path / "run.lock").read_text().split() == [os.uname().nodename, str(os.getpid())]
    lock.release()


# ----------------------------------------------------------------------------- 2 ranks

def test_stopped_rank_makes_every_other_rank_exit_naming_it(tmp_path, tiny_args):
    """Acceptance: with distributed.timeout_minutes=0.5, rank 1 stopped by SIGSTOP makes
    rank 0 exit non-zero within 60 s, naming rank 1."""
    out = tmp_path / "run"
    _warm_data_cache(tiny_args, tmp_path / "warm")
    proc = _start_cli(["--output-dir", str(out), *tiny_args, STEP_DELAY, "distributed.timeout_minutes=0.5"])
    _wait_for_step(proc, out, 2)
    ranks = _rank_processes(out)
    assert sorted(ranks) == [0, 1]
    ranks[1].suspend()  # SIGSTOP
    stopped_at = time.monotonic()
    try:
        ranks[0].wait(timeout=90)
        elapsed = time.monotonic() - stopped_at
    finally:
        ranks[1].kill()
    code, err = _finish(proc)
    print(f"rank 0 exited {elapsed:.1f} s after rank 1 was stopped")
    assert elapsed < 60, f"rank 0 needed {elapsed:.0f} s to stop"
    assert code != 0
    assert "rank 1 on" in err and "stopped answering" in err, err[-3000:]
    assert "[rank0]" in err or "rank 0" in err


def test_killed_rank_makes_its_peer_name_it_and_promise_no_checkpoint(tmp_path, tiny_args):
    """A rank killed by SIGKILL: torchrun sends SIGTERM to the survivor, which must not claim
    a checkpoint it cannot write; it exits non-zero naming the lost rank, and no checkpoint or
    preemption marker appears after the kill."""
    out = tmp_path / "run"
    _warm_data_cache(tiny_args, tmp_path / "warm")
    proc = _start_cli(["--output-dir", str(out), *tiny_args, STEP_DELAY])
    _wait_for_step(proc, out, 2)
    ranks = _rank_processes(out)
    assert sorted(ranks) == [0, 1]
    saved_before = latest_tag(out / "checkpoints")
    ranks[1].kill()  # SIGKILL
    code, err = _finish(proc)
    assert code not in (0, PREEMPT_EXIT_CODE), err[-3000:]
    assert "checkpointing" not in err, err[-3000:]  # neither the old signal line nor the vote's announcement
    assert "lost rank 1" in err or "rank 1 on" in err, err[-3000:]
    assert latest_tag(out / "checkpoints") == saved_before
    assert not (out / PREEMPTED_MARKER).exists()


def test_diverged_run_stops_and_keeps_the_last_finite_checkpoint(tmp_path, tiny_args):
    """Acceptance: train.lr=1e3 train.warmup_steps=0 exits non-zero within
    max_nonfinite_steps + 1 steps of the last finite step; `latest` is that step's
    checkpoint; no summary. (Before: exit 0, a summary, grad_norm written as "inf".)"""
    out = tmp_path / "run"
    proc = run_cli(["--output-dir", str(out), *tiny_args, "train.lr=1e3", "train.warmup_steps=0",
                    "checkpoint.every_steps=1", "train.max_nonfinite_steps=3"])
    assert proc.returncode != 0, proc.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    bad = [r["step"] for r in train if r.get("nonfinite") or r["loss"] is None]
    finite = [r["step"] for r in train if r["step"] not in bad]
    assert bad and finite == list(range(1, finite[-1] + 1)), [(r["step"], r.get("nonfinite")) for r in train]
    # stopped after exactly max_nonfinite_steps non-finite steps: within max_nonfinite_steps + 1 steps of the
    # last finite one (the tiny model's loss stays finite, if absurd, for a step or two after the first update)
    assert bad == list(range(finite[-1] + 1, finite[-1] + 4)) and train[-1]["step"] == finite[-1] + 3, (finite, bad)
    assert all(r["grad_norm"] is None and "grad_norm" in r["nonfinite"] for r in train if r["step"] in bad
               and r.get("nonfinite"))
    assert latest_tag(out / "checkpoints") == tag_for_step(finite[-1])
    assert not (out / "checkpoints" / tag_for_step(finite[-1] + 1)).exists()
    stop = [r for r in records if r["type"] == "stop"]
    assert stop and stop[-1]["reason"] == "non-finite"
    assert not (out / "summary.json").exists() and not any(r["type"] == "summary" for r in records)
    assert f"last finite loss {train[finite[-1] - 1]['loss']:.4f} at step {finite[-1]}" in proc.stderr
    assert "CLM" in stop[-1]["error"] and "antlm-train: error: 3 consecutive non-finite" in proc.stderr


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "timeout"])
def test_signal_to_launcher_checkpoints_the_running_step_and_exits_75(tmp_path, tiny_args, how):
    """SIGTERM or Ctrl-C to antlm-train (or `timeout`) reaches both ranks: they stop after the
    step during which the signal came, checkpoint it, and antlm-train exits 75. A second
    run into the same folder meanwhile is refused, naming the launcher's PID."""
    out = tmp_path / "run"
    # slow steps: the refused second run must fit into the first one's 12 steps
    args = ["--output-dir", str(out), *tiny_args, f"debug.step_delay_s={8 if how == 'SIGTERM' else 2}"]
    launcher = ("timeout", "-s", "TERM", "1000") if how == "timeout" else ()
    proc = _start_cli(args, *launcher)
    _wait_for_step(proc, out, 1)
    if how == "SIGTERM":  # the lock is taken before any rank starts; check it once
        second = run_cli([*args, "--overwrite"], timeout=300)
        assert second.returncode == 2 and f"PID {proc.pid}" in second.stderr, second.stderr[-2000:]
        assert "in use by another run" in second.stderr and "Traceback" not in second.stderr
    ranks = _rank_processes(out)
    seen = _wait_for_step(proc, out, _steps(out)[-1] + 1)  # step `seen` just closed: step seen + 1 is running
    # `timeout` passes a SIGTERM on as it does when its time is up: to the command, then to its group
    proc.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGTERM)
    code, err = _finish(proc)
    assert code == PREEMPT_EXIT_CODE, err[-4000:]
    stop = read_metrics(out / "metrics.jsonl", "stop")[-1]
    assert stop["step"] == seen + 1, (seen, stop)
    assert max(_steps(out)) == seen + 1
    assert latest_tag(out / "checkpoints") == tag_for_step(seen + 1)
    assert (out / PREEMPTED_MARKER).read_text().strip() == str(seen + 1)
    assert "received SIGTERM" in err and "[rank1]" in err
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())
