"""Launch paths without Slurm: `deepspeed --hostfile`, launch/local.sh, resuming at another
world size (2 → 1 → 2 ranks under ZeRO-2 and ZeRO-3), and naming a lost rank."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from antlm_dist.faults import comm_failure_message, format_rank_table, is_comm_failure, lost_ranks
from antlm_testutil import REPO, assert_ok, free_port, train_losses

VENV_BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "ANTLM_VENV": str(VENV_BIN.parent),
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra)
    return env


def test_hostfile_helper_writes_slots_per_host(tmp_path):
    out = tmp_path / "hostfile"
    proc = subprocess.run(["bash", "launch/hostfile.sh", str(out), "node1", "node2"], cwd=REPO,
                          env=_env(ANTLM_SLOTS="4"), capture_output=True, text=True)
    assert_ok(proc)
    assert out.read_text() == "node1 slots=4\nnode2 slots=4\n"
    env = _env()
    env.pop("SLURM_JOB_NODELIST", None)
    proc = subprocess.run(["bash", "launch/hostfile.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST" in proc.stderr


def test_deepspeed_hostfile_two_local_slots_trains(tmp_path, tiny_args):
    """Acceptance 5: the deepspeed launcher runs the antlm-train console script with --local_rank."""
    hostfile = tmp_path / "hostfile"
    assert_ok(subprocess.run(["bash", "launch/hostfile.sh", str(hostfile), "localhost"], cwd=REPO,
                             env=_env(ANTLM_SLOTS="2"), capture_output=True, text=True))
    out = tmp_path / "run"
    cmd = [str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(VENV_BIN / "antlm-train"), "--output-dir", str(out), *tiny_args,
           "objective.schedule=1_CLM+1_MLM"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    assert "--local_rank=0" in proc.stdout + proc.stderr  # how the launcher starts each rank
    got = train_losses(out)
    assert [got[s][0] for s in sorted(got)] == ["CLM"] * 4 + ["MLM"] * 4
    assert (out / "summary.json").is_file()


def _local(out: Path, args: list[str], nproc: int, stop: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["bash", "launch/local.sh", "--output-dir", str(out), *extra, *args, f"train.stop_at_step={stop}"]
    return subprocess.run(cmd, cwd=REPO, env=_env(ANTLM_NPROC_PER_NODE=str(nproc)), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_resume_at_another_world_size_continues_the_loss_curve(tmp_path, tiny_args, ds_config):
    """Acceptance 6: 2 ranks to step 3, 1 rank to step 6, 2 ranks to step 8; the first loss
    after each resume is within 1% of the uninterrupted run's. The global batch stays at
    16 sequences: 4 × 2 accumulation × 2 ranks, then 4 × 4 × 1 rank."""
    args = [*tiny_args, f"distributed.deepspeed_config={ds_config}"]
    ref_dir, out = tmp_path / "ref", tmp_path / "run"
    assert_ok(_local(ref_dir, args, 2, 8))
    assert_ok(_local(out, args, 2, 3))
    if ds_config == "zero2.json":  # the global batch must stay constant: a clear error otherwise
        bad = _local(out, args, 1, 6, "--resume")
        assert bad.returncode != 0
        assert "set train.gradient_accumulation_steps=4" in bad.stderr, bad.stderr[-3000:]
    one = _local(out, [*args, "train.gradient_accumulation_steps=4"], 1, 6, "--resume")
    assert_ok(one)
    assert "written by 2 ranks, this run has 1: loading its universal form" in one.stderr
    two = _local(out, args, 2, 8, "--resume")
    assert_ok(two)
    assert "written by 1 ranks, this run has 2" in two.stderr
    ref, got = train_losses(ref_dir), train_losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step][0] == ref[step][0], step
    for step in (4, 7):  # the first step after each resume
        assert got[step][1] == pytest.approx(ref[step][1], rel=0.01), step
    for step in range(1, 9):  # in practice the whole curve follows (exactly under ZeRO-2)
        assert got[step][1] == pytest.approx(ref[step][1], rel=0.01), step


def test_comm_failure_message_names_the_lost_rank():
    table = [("node1", ["10.77.0.1"]), ("node2", ["10.77.0.2"]), ("node2", ["10.77.0.2"]),
             ("node3", ["10.77.0.3"])]
    exc = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.77.0.3]:50854. "
                       "This is typically caused by a remote worker crashing.")
    assert is_comm_failure(exc)
    assert lost_ranks(exc, table, 0) == [3]
    msg = comm_failure_message(exc, table, 0, 4, 5)
    assert "rank 0 of 4 on node1: lost rank 3 on node3" in msg and "Connection closed by peer" in msg
    two = RuntimeError("Connection closed by peer [10.77.0.2]:1")
    assert "lost one of ranks 1, 2 on node2" in comm_failure_message(two, table, 0, 4, 5)
    timeout = RuntimeError("[gloo] Timed out waiting 300000ms for recv operation to complete")
    assert "timed out after distributed.timeout_minutes=5" in comm_failure_message(timeout, table, 1, 4, 5)
    assert not is_comm_failure(ValueError("bad recipe"))
    assert format_rank_table(table) == "node1: rank 0; node2: ranks 1,2; node3: rank 3"


@pytest.mark.slow
def test_two_one_rank_runs_side_by_side_do_not_collide(tmp_path, tiny_args):
    """``antlm-train --nproc-per-node 1`` runs its rank in its own process without a launcher;
    two such runs started together on one machine each find a free rendezvous port (a fixed
    default port made the second fail with EADDRINUSE) and train the same losses."""
    env = {k: v for k, v in _env().items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    args = [*tiny_args, "objective.schedule=1_CLM", "checkpoint.milestones_words=none"]
    procs = [subprocess.Popen([sys.executable, "-m", "antlm_dist.cli", "--output-dir", str(tmp_path / name),
                               "--nproc-per-node", "1", *args], env=env, cwd=str(REPO), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("a", "b")]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b") != {}
