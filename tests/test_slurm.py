"""launch/slurm/antlm.sbatch on a real Slurm cluster: 2 nodes × 1 CPU rank, tiny recipe.

Needs a cluster: ``launch/testing/cluster_up.sh`` starts one on this machine (2 slurmd in
their own network namespaces) and writes ``env.sh`` exporting ``SLURM_CONF`` and
``ANTLM_SLURM_CLUSTER=1``; ``.ci/run`` does this around the test suite. Without it every
test here is skipped with that reason.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from antlm_dist.metrics import read_metrics
from antlm_testutil import REPO, tiny_args_for, train_losses

SBATCH_SCRIPT = REPO / "launch" / "slurm" / "antlm.sbatch"
VENV_BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY",
            "PREEMPTED"}
STEP_DELAY = "debug.step_delay_s=0.5"  # room to signal or kill a rank mid-phase


def _cluster_reason() -> str | None:
    if os.environ.get("ANTLM_SLURM_CLUSTER") != "1":
        return ("no Slurm test cluster: run `sudo bash launch/testing/cluster_up.sh` and "
                "`source /tmp/antlm-slurm/env.sh` (sets ANTLM_SLURM_CLUSTER=1)")
    if shutil.which("sbatch") is None:
        return "ANTLM_SLURM_CLUSTER=1 but sbatch is not on PATH"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix,alloc", "-o", "%N"], capture_output=True,
                              text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    nodes = set(proc.stdout.split())
    if proc.returncode != 0 or len(nodes) < 2:
        return f"the Slurm cluster has {len(nodes)} usable nodes (need 2): {proc.stderr.strip()}"
    return None


_REASON = _cluster_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


# ----------------------------------------------------------------------------- helpers

def _torch_extensions_dir(runs_dir: Path) -> Path:
    """A private JIT-extension cache for these jobs, seeded from the user's.

    DeepSpeed JIT-loads its CPU shm-comm op in every rank under a lock *file* in the cache;
    a rank killed while holding it (these tests kill and cancel ranks) would leave the
    file behind and block every later DeepSpeed start that uses the same cache.
    """
    private = runs_dir / "torch_extensions"
    if not private.exists():
        shared = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
        if shared.is_dir() and not any(shared.glob("*/*/lock")):  # not while someone builds
            shutil.copytree(shared, private, ignore=shutil.ignore_patterns("lock", ".ninja_lock"))
        private.mkdir(parents=True, exist_ok=True)
    return private


def job_env(runs_dir: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update({"ANTLM_RUNS_DIR": str(runs_dir), "ANTLM_TORCHRUN": str(VENV_BIN / "torchrun"),
                "OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                "TORCH_EXTENSIONS_DIR": str(_torch_extensions_dir(runs_dir))})
    env.update(extra)
    return env


def submit(name: str, runs_dir: Path, args: list[str], env: dict, nodes: int = 2) -> str:
    """sbatch the launch script on ``nodes`` CPU nodes; returns the job id."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={nodes}", "--gpus-per-node=0",
           "--time=10", f"--output={runs_dir}/{name}-%j.out", str(SBATCH_SCRIPT), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict | None:
    """``scontrol show job`` as a dict, or None once Slurm has forgotten the job."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)


def wait_job(job_id: str, timeout_s: float = 600) -> dict:
    """Poll until the job reaches a terminal state; returns its last fields."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields is None:
            assert last is not None, f"job {job_id} unknown to Slurm"
            return last
        last = fields
        if fields["JobState"] in TERMINAL:
            return fields
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=20)
    pytest.fail(f"job {job_id} still {last and last['JobState']} after {timeout_s} s")


def wait_for_step(run_dir: Path, step: int, job_id: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and any(
                r["step"] >= step for r in read_metrics(run_dir / "metrics.jsonl", "train")):
            return
        fields = job_fields(job_id)
        assert fields is not None and fields["JobState"] not in TERMINAL, f"job {job_id} ended before step {step}"
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not reach step {step} in {timeout_s} s")


def node_logs(run_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.node*.log"))}


def describe(run_dir: Path, job: dict | None = None) -> str:
    text = [f"job: {job}"] if job else []
    for name, log in node_logs(run_dir).items():
        text.append(f"== {name}\n{log[-3000:]}")
    for p in sorted(run_dir.parent.glob(f"{run_dir.name}-*.out")):
        text.append(f"== {p.name}\n{p.read_text(errors='replace')[-2000:]}")
    return "\n".join(text)


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer, data_cache) -> list[str]:
    return tiny_args_for(tiny_tokenizer, data_cache)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm_runs")


@pytest.fixture(scope="module")
def uninterrupted(runs, tiny) -> Path:
    """Acceptance 1: 2 nodes × 1 rank, ZeRO-2, all three phases of the tiny schedule."""
    job = submit("full", runs, tiny, job_env(runs))
    fields = wait_job(job)
    run_dir = runs / "full"
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", describe(run_dir, fields)
    return run_dir


# ----------------------------------------------------------------------------- tests

def test_two_node_job_trains_across_phase_switches(uninterrupted):
    run_dir = uninterrupted
    got = train_losses(run_dir)
    assert sorted(got) == list(range(1, 13))
    assert [got[s][0] for s in range(1, 13)] == ["CLM"] * 4 + ["MLM"] * 4 + ["CLM"] * 4
    run = json.loads((run_dir / "run.json").read_text())
    assert run["world_size"] == 2 and run["zero_stage"] == 2
    logs = node_logs(run_dir)
    assert len(logs) == 2, logs.keys()  # one log per node
    text = "\n".join(logs.values())
    ranks = re.search(r"2 ranks on (\d) hosts?: (.*)", text)
    assert ranks, text[-3000:]
    if os.environ.get("ANTLM_SLURM_CLUSTER_MODE", "netns") == "netns":  # each node its own hostname
        assert sorted(ranks.group(2).split("; ")) in (["node1: rank 0", "node2: rank 1"],
                                                      ["node1: rank 1", "node2: rank 0"])
    else:  # loopback fallback: both slurmd on this host
        assert ranks.group(2).endswith("ranks 0,1")
    assert "phase switch at step 4: CLM -> MLM" in text
    assert (run_dir / "summary.json").is_file()


def test_signalled_job_checkpoints_requeues_and_resumes_exactly(uninterrupted, runs, tiny):
    run_dir = runs / "preempt"
    job = submit("preempt", runs, tiny + [STEP_DELAY], job_env(runs))
    wait_for_step(run_dir, 5, job)  # inside the MLM phase (steps 5-8)
    subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=20)
    fields = wait_job(job)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", describe(run_dir, fields)
    stops = read_metrics(run_dir / "metrics.jsonl", "stop")
    assert len(stops) == 1 and stops[0]["reason"] == "preemption signal", stops
    stop_step = stops[0]["step"]
    assert 5 <= stop_step < 12
    logs = node_logs(run_dir)
    first = "\n".join(v for k, v in logs.items() if f"job{job}.0." in k)
    second = "\n".join(v for k, v in logs.items() if f"job{job}.1." in k)
    assert "received SIGTERM" in first and "[rank1] WARNING received SIGTERM" in first
    phase = train_losses(uninterrupted)[stop_step + 1][0]
    assert f"resumed from step{stop_step:08d} at step {stop_step} (epoch {stop_step // 4}, phase {phase})" in second
    assert "requeueing" in (run_dir / "logs" / f"job{job}.log").read_text()
    assert not (run_dir / "PREEMPTED").exists()
    ref, got = train_losses(uninterrupted), train_losses(run_dir)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step][0] == ref[step][0], step
        assert got[step][1] == pytest.approx(ref[step][1], rel=1e-6, abs=0), step


def _rank_pid(run_dir: Path, rank: int) -> int:
    """PID of the training process of global ``rank`` of the run in ``run_dir`` (the test
    cluster's nodes share this machine's process table)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"antlm_dist.train" in cmd and str(run_dir).encode() in cmd and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no process of rank {rank} for {run_dir}")


def test_killed_rank_ends_job_nonzero_naming_the_lost_rank(runs, tiny):
    run_dir = runs / "deadrank"
    job = submit("deadrank", runs, tiny + ["distributed.timeout_minutes=1", STEP_DELAY], job_env(runs))
    wait_for_step(run_dir, 2, job)
    os.kill(_rank_pid(run_dir, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    fields = wait_job(job, timeout_s=120)
    elapsed = time.monotonic() - killed_at
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", describe(run_dir, fields)
    assert elapsed < 60, f"the job needed {elapsed:.0f} s to end after rank 1 died (timeout 1 min)"
    assert fields["Restarts"] == "0"  # a crash is not a preemption: no requeue
    text = "\n".join(node_logs(run_dir).values())
    assert "rank      : 1" in text and "SIGKILL" in text, describe(run_dir, fields)  # torchrun's summary
    assert "lost rank 1" in text, describe(run_dir, fields)  # our own message, from the surviving rank


def test_phase_desync_stops_every_rank_with_the_error(runs, tiny):
    run_dir = runs / "desync"
    job = submit("desync", runs, tiny + ["debug.fault_phase_rank=1"], job_env(runs))
    deadline = time.monotonic() + 600
    while not any("phase desync" in t for t in node_logs(run_dir).values()):  # start-up takes a while
        assert time.monotonic() < deadline, describe(run_dir, job_fields(job))
        time.sleep(0.2)
    detected = time.monotonic()
    fields = wait_job(job, timeout_s=120)
    assert time.monotonic() - detected < 30, "the job lingered after the desync was detected"
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", describe(run_dir, fields)
    logs = node_logs(run_dir)
    assert len(logs) == 2
    for name, text in logs.items():
        assert "PhaseDesyncError: phase desync at step 0" in text, (name, describe(run_dir, fields))
        assert "rank 0: phase 0 (CLM), rank 1: phase 1 (MLM)" in text, name
    assert not read_metrics(run_dir / "metrics.jsonl", "train")  # stopped before any step
