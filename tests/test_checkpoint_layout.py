"""The checkpoint layout has one owner, antlm_dist.checkpoint: tag resolution, the typed
client state, the resume compatibility check and the ``latest`` query of launch scripts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from antlm_dist.checkpoint import (CheckpointError, ClientState, check_resume, read_client_state,
                                   resolve_checkpoint)

STATE = {"step": 8, "sampler": {"epoch": 1, "position": 0, "global_batch": 16}, "schedule": "1_CLM+1_MLM",
         "tokenizer_hash": "ab" * 32, "world_size": 2, "recipe": {"name": "tiny"}}


def _fake_run(tmp_path, tags=(("step00000004", True), ("step00000008", True), ("step00000012", False))):
    """A run folder with tag folders (client_state.json; COMPLETE where marked) and ``latest``."""
    ckpt = tmp_path / "run" / "checkpoints"
    for tag, complete in tags:
        (ckpt / tag).mkdir(parents=True)
        (ckpt / tag / "client_state.json").write_text(json.dumps({**STATE, "step": int(tag[4:])}))
        if complete:
            (ckpt / tag / "COMPLETE").write_text("ok\n")
    (ckpt / "latest").write_text("step00000008")
    return tmp_path / "run"


def _latest_cli(path):
    return subprocess.run([sys.executable, "-m", "antlm_dist.checkpoint", "latest", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_resolve_and_read_the_latest_complete_tag(tmp_path):
    run = _fake_run(tmp_path)
    ref = resolve_checkpoint(run)
    assert (ref.ckpt_dir, ref.tag, ref.run_dir) == (run / "checkpoints", "step00000008", run)
    assert resolve_checkpoint(run / "checkpoints") == ref
    assert resolve_checkpoint(run / "checkpoints" / "step00000004").tag == "step00000004"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(run / "checkpoints" / "step00000012")
    tag, state = read_client_state(run / "checkpoints")
    assert tag == "step00000008" and state == ClientState(**{**STATE, "step": 8})
    assert state.to_dict() == {**STATE, "step": 8, "words_seen": None}  # written before words were counted
    with pytest.raises(CheckpointError, match="x.json lacks world_size, recipe"):
        ClientState.from_dict({k: v for k, v in STATE.items() if k not in ("recipe", "world_size")}, "x.json")


def test_latest_cli_prints_the_tag_folder_or_exits_1(tmp_path):
    run = _fake_run(tmp_path)
    proc = _latest_cli(run)
    assert proc.returncode == 0 and proc.stdout.strip() == str(run / "checkpoints" / "step00000008")
    (run / "checkpoints" / "latest").write_text("step00000012")  # stale pointer: the scan finds step 8
    assert _latest_cli(run).stdout.strip() == str(run / "checkpoints" / "step00000008")
    (tmp_path / "empty").mkdir()
    proc = _latest_cli(tmp_path / "empty")
    assert proc.returncode == 1 and "no complete checkpoint" in proc.stderr
    assert _latest_cli(tmp_path / "absent").returncode == 1


def test_resume_compatibility_check():
    state = ClientState(**STATE)
    same = dict(global_batch=16, micro_batch_size=4, gradient_accumulation_steps=2, world_size=2,
                schedule="1_CLM+1_MLM", tok_hash="ab" * 32)
    assert check_resume(state, "step00000008", **same) is False
    assert check_resume(state, "step00000008", **{**same, "world_size": 1, "gradient_accumulation_steps": 4}) is True
    with pytest.raises(CheckpointError, match=r"global batch of 16 .* has 32 .* set train.gradient_accumulation_steps=2"):
        check_resume(state, "t", **{**same, "global_batch": 32, "gradient_accumulation_steps": 4})
    with pytest.raises(CheckpointError, match="schedule '1_CLM\\+1_MLM' but the recipe says '2_CLM'"):
        check_resume(state, "t", **{**same, "schedule": "2_CLM"})
    with pytest.raises(CheckpointError, match="another tokenizer"):
        check_resume(state, "t", **{**same, "tok_hash": "cd" * 32})
