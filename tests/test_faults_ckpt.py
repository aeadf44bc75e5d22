"""Checkpoint faults (issue 16): damaged checkpoints, garbage ``latest``, interrupted saves,
a full disk and a ZeRO-stage change are each reported by name, and nothing intact is lost.

Unit tests drive :func:`antlm_dist.checkpoint.save_checkpoint` with a stand-in engine that
writes files as DeepSpeed does; one 2-rank run checks the whole path end to end.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from antlm_dist.checkpoint import (MANIFEST, CheckpointError, check_zero_stage, file_checksum, latest_tag,
                                   save_checkpoint, select_resume_tag)
from antlm_dist.config import ConfigError
from antlm_dist.run_folder import RunFolder

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class WritingEngine:
    """Writes a model file and an optimizer shard of random bytes into the tag folder, as
    ``DeepSpeedEngine.save_checkpoint`` does; optionally fails after the first file."""

    def __init__(self, fail: BaseException | None = None):
        self.fail, self.calls = fail, 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls += 1
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MODEL).write_bytes(os.urandom(20_000))
        if self.fail is not None:
            raise self.fail
        (folder / OPTIM).write_bytes(os.urandom(50_000))


def _save(ckpt, step, engine=None, **kw):
    state = {"step": step, "sampler": {"epoch": 0, "position": 0, "global_batch": 16}, "schedule": "1_CLM",
             "tokenizer_hash": "ab" * 32, "world_size": 1, "recipe": {"name": "t"}}
    return save_checkpoint(engine or WritingEngine(), ckpt, step, state, **kw)


def _two_checkpoints(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    _save(ckpt, 4, zero_stage=2)
    _save(ckpt, 8, zero_stage=2)
    return ckpt


def test_manifest_records_size_and_checksum_of_every_file(tmp_path):
    import hashlib

    import xxhash

    ckpt = _two_checkpoints(tmp_path)
    folder = ckpt / "step00000008"
    manifest = json.loads((folder / MANIFEST).read_text())
    files = sorted(p.name for p in folder.iterdir() if p.name not in (MANIFEST, "COMPLETE"))
    assert sorted(manifest["files"]) == files == sorted([MODEL, OPTIM, "rng_rank0.pt", "client_state.json"])
    assert manifest["hash"] == "xxh3_128" and manifest["zero_stage"] == 2 and manifest["world_size"] == 1
    for name, (size, digest) in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert size == len(data) and digest == xxhash.xxh3_128(data).hexdigest()
    assert file_checksum(folder / MODEL, "sha256") == hashlib.sha256((folder / MODEL).read_bytes()).hexdigest()
    assert (ckpt / "latest").read_text() == "step00000008" and (folder / "COMPLETE").is_file()


@pytest.mark.parametrize("damage,needle", [
    (lambda f: (f / MODEL).write_bytes((f / MODEL).read_bytes()[:1000]), f"{MODEL} has 1000 bytes"),
    (lambda f: (f / OPTIM).unlink(), f"{OPTIM} is missing"),
    (lambda f: (f / "client_state.json").write_text((f / "client_state.json").read_text()[:20]),
     "client_state.json has 20 bytes"),
    (lambda f: (f / MODEL).write_bytes(os.urandom(20_000)), f"{MODEL} does not match its xxh3_128 checksum"),
    (lambda f: (f / MANIFEST).write_text("{\"files\": "), f"{MANIFEST} is damaged"),
])
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, caplog, damage, needle):
    ckpt = _two_checkpoints(tmp_path)
    damage(ckpt / "step00000008")
    with caplog.at_level(logging.WARNING, logger="antlm_dist"):
        assert select_resume_tag(ckpt) == "step00000004"
    assert "checkpoint step00000008 is damaged" in caplog.text and needle in caplog.text
    assert select_resume_tag(ckpt, "step00000004") == "step00000004"  # an explicit tag
    with pytest.raises(CheckpointError, match="--resume step00000008: checkpoint step00000008 is damaged"):
        select_resume_tag(ckpt, "step00000008")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint step00000099 .*step00000004, step00000008"):
        select_resume_tag(ckpt, "step00000099")


def test_no_intact_checkpoint_names_each_problem_and_overwrite(tmp_path):
    ckpt = _two_checkpoints(tmp_path)
    for tag in ("step00000004", "step00000008"):
        (ckpt / tag / OPTIM).unlink()
    with pytest.raises(CheckpointError, match=r"step00000008: .*missing; step00000004: .*missing.*--overwrite"):
        select_resume_tag(ckpt)


def test_garbage_in_latest_is_reported_and_ignored(tmp_path, caplog):
    ckpt = _two_checkpoints(tmp_path)
    (ckpt / "latest").write_bytes(b"\x00\xffgarbage\n")
    with caplog.at_level(logging.WARNING, logger="antlm_dist"):
        assert latest_tag(ckpt) == "step00000008"
        assert select_resume_tag(ckpt) == "step00000008"
    assert "not a checkpoint tag; it is ignored" in caplog.text
    proc = subprocess.run([sys.executable, "-m", "antlm_dist.checkpoint", "latest", str(ckpt.parent)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == str(ckpt / "step00000008")
    assert "warning:" in proc.stderr and "garbage" in proc.stderr


def test_stale_partial_folders_are_removed_at_the_next_start(tmp_path):
    ckpt = _two_checkpoints(tmp_path)
    (ckpt / "step00000012.tmp").mkdir()
    (ckpt / "step00000012.tmp" / MODEL).write_bytes(b"x")
    (ckpt / "latest.tmp4242").write_text("step00000012")
    (ckpt / "step00000008" / "universal.tmp").mkdir()
    RunFolder(ckpt.parent).prepare(overwrite=False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step00000004", "step00000008"]
    assert sorted(p.name for p in (ckpt / "step00000008").iterdir()) == sorted(
        ["COMPLETE", MANIFEST, MODEL, OPTIM, "client_state.json", "rng_rank0.pt"])


def test_kill_during_the_first_save_leaves_a_run_a_plain_restart_accepts(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000004.tmp").mkdir(parents=True)
    (run / "checkpoints" / "step00000004.tmp" / MODEL).write_bytes(b"partial")
    (run / "run.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (run / "logs").mkdir()
    (run / "logs" / "job7.log").write_text("the batch script's own lines\n")
    folder = RunFolder(run)
    with pytest.raises(ConfigError, match=r"holds no complete checkpoint .*without --resume.*--overwrite"):
        folder.check(resume=True, overwrite=False)
    folder.check(resume=False, overwrite=False)  # accepted: nothing complete to lose
    folder.prepare(overwrite=False)
    assert sorted(p.name for p in run.iterdir()) == ["logs"]  # the interrupted run's files are gone
    assert (run / "logs" / "job7.log").is_file()  # a SLURM job's logs stay
    # a run with a complete checkpoint is still protected
    _save(run / "checkpoints", 4)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        RunFolder(run).check(resume=False, overwrite=False)


def test_no_space_left_on_device_removes_the_partial_folder_and_keeps_latest(tmp_path):
    ckpt = _two_checkpoints(tmp_path)
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(CheckpointError, match=r"failed on rank 0: No space left on device .*removed the partial "
                                              r"step00000012.tmp, latest stays step00000008"):
        _save(ckpt, 12, WritingEngine(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert (ckpt / "latest").read_text() == "step00000008"


def test_torch_iostream_error_on_a_full_disk_is_named(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as ``basic_ios::clear: iostream error``; with no room left the
    message says what happened."""
    import shutil

    ckpt = _two_checkpoints(tmp_path)
    real = shutil.disk_usage
    engine = WritingEngine(RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                                        "writing file data/0: file write failed; basic_ios::clear: iostream error"))

    def full_after_first_call(path, calls=[]):
        calls.append(path)
        usage = real(path)
        return usage if len(calls) == 1 else usage._replace(free=1024)

    monkeypatch.setattr(shutil, "disk_usage", full_after_first_call)
    with pytest.raises(CheckpointError, match="No space left on device"):
        _save(ckpt, 12, engine)
    assert not (ckpt / "step00000012.tmp").exists() and latest_tag(ckpt) == "step00000008"


def test_free_space_is_checked_against_the_last_checkpoint_before_writing(tmp_path, monkeypatch):
    import shutil

    ckpt = _two_checkpoints(tmp_path)
    size = sum(p.stat().st_size for p in (ckpt / "step00000008").iterdir() if p.name not in (MANIFEST, "COMPLETE"))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=size - 1))
    engine = WritingEngine()
    with pytest.raises(CheckpointError, match=r"No space left on device for checkpoint step00000012: the last one "
                                              r"\(step00000008\) took .* GiB.*checkpoint.keep_last"):
        _save(ckpt, 12, engine)
    assert engine.calls == 0 and latest_tag(ckpt) == "step00000008"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=size))
    _save(ckpt, 12, engine)
    assert latest_tag(ckpt) == "step00000012"


def test_zero_stage_change_is_refused_before_loading(tmp_path):
    ckpt = _two_checkpoints(tmp_path)
    check_zero_stage(ckpt, "step00000008", 2)
    with pytest.raises(CheckpointError, match=r"ZeRO stage 2 but this run uses ZeRO stage 3.*"
                                              r"distributed.deepspeed_config=zero2.json"):
        check_zero_stage(ckpt, "step00000008", 3)


def test_resume_tag_argument_keeps_a_following_override():
    from antlm_dist.train import parse_args

    a = parse_args(["--output-dir", "o", "--resume", "train.lr=1e-3"])
    assert a.resume is True and a.overrides == ["train.lr=1e-3"]
    a = parse_args(["--output-dir", "o", "--resume", "step00000004", "train.lr=1e-3"])
    assert a.resume == "step00000004" and a.overrides == ["train.lr=1e-3"]
    assert parse_args(["--output-dir", "o"]).resume is False
    assert parse_args(["--output-dir", "o", "train.lr=1", "--resume"]).resume is True


# ----------------------------------------------------------------------------- end to end on 2 CPU ranks

def test_two_ranks_damaged_checkpoint_zero_stage_change_and_fallback(tmp_path, tiny_tokenizer, data_cache):
    """A truncated model file in the newest checkpoint and garbage in ``latest``: a resume
    under ZeRO-3 is refused naming both stages, and a resume under ZeRO-2 falls back to the
    older checkpoint, naming the damaged file, and retrains the lost steps exactly."""
    from antlm_testutil import assert_ok, run_cli, tiny_args_for, train_losses

    out = tmp_path / "run"
    base = ["--output-dir", str(out), *tiny_args_for(tiny_tokenizer, data_cache)]
    assert_ok(run_cli(base + ["train.stop_at_step=8"]))  # checkpoints at the phase ends, steps 4 and 8
    first = train_losses(out)
    ckpt = out / "checkpoints"
    manifest = json.loads((ckpt / "step00000008" / MANIFEST).read_text())
    assert manifest["zero_stage"] == 2 and manifest["world_size"] == 2 and MODEL in manifest["files"]
    model = ckpt / "step00000008" / MODEL
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    (ckpt / "latest").write_bytes(b"\x00garbage")

    z3 = run_cli(base + ["--resume", "distributed.deepspeed_config=zero3.json"])
    assert z3.returncode != 0
    assert "written under ZeRO stage 2 but this run uses ZeRO stage 3" in z3.stderr, z3.stderr[-3000:]

    resumed = run_cli(base + ["--resume"])
    assert_ok(resumed)
    log = resumed.stderr + resumed.stdout
    assert "not a checkpoint tag; it is ignored" in log
    assert f"checkpoint step00000008 is damaged: {model} has" in log
    assert "resumed from step00000004 at step 4" in log
    again = train_losses(out)  # the last record per step: steps 5-8 retrained from step 4
    assert sorted(again) == list(range(1, 13))
    for step in range(5, 9):
        assert again[step][0] == first[step][0]
        assert again[step][1] == pytest.approx(first[step][1], rel=1e-6, abs=0), step
    assert (ckpt / "latest").read_text() == "step00000012"


def test_a_rank_waiting_on_a_build_lock_says_so_within_seconds(tmp_path, monkeypatch, caplog):
    """A build lock held by another process (torch's FileBaton, as DeepSpeed's op build takes
    it) is reported with its path and age while DeepSpeed starts, not waited on silently."""
    import re
    import time

    from torch.utils.file_baton import FileBaton

    from antlm_dist.distributed import reporting_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    holder = FileBaton(str(lock))
    assert holder.try_acquire()  # a build in progress elsewhere
    then = time.time() - 30
    os.utime(lock, (then, then))
    with caplog.at_level(logging.WARNING, logger="antlm_dist"), reporting_build_locks(interval_s=0.05):
        assert not FileBaton(str(lock)).try_acquire()  # what a second rank meets
        deadline = time.monotonic() + 20
        while "waiting on" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    holder.release()
    assert f"waiting on {lock}" in caplog.text and f"rm {lock}" in caplog.text
    assert re.search(r"lock (30|31|32) s old: deepspeed_shm_comm is being built", caplog.text), caplog.text
