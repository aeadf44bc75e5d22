"""End to end on 2 CPU ranks: both phases, falling held-out losses, checkpoints, exact resume."""
import json

import pytest

from antlm_dist.metrics import read_metrics
from antlm_testutil import assert_ok, run_cli, tiny_args_for, train_losses


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_tokenizer, data_cache):
    out = tmp_path_factory.mktemp("full") / "run"
    args = ["--output-dir", str(out), *tiny_args_for(tiny_tokenizer, data_cache)]
    proc = run_cli(args)
    assert_ok(proc)
    return out


def test_full_run_trains_both_phases_and_evals_fall(full_run):
    losses = train_losses(full_run)
    assert sorted(losses) == list(range(1, 13))
    phases = [losses[s][0] for s in range(1, 13)]
    assert phases == ["CLM"] * 4 + ["MLM"] * 4 + ["CLM"] * 4
    evals = read_metrics(full_run / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [4, 8, 12]
    assert evals[-1]["clm_loss"] < evals[0]["clm_loss"]
    assert evals[-1]["mlm_loss"] < evals[0]["mlm_loss"]
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["zero_stage"] == 2 and summary["world_size"] == 2
    assert (full_run / "checkpoints" / "latest").read_text() == "step00000012"
    assert (full_run / "checkpoints" / "step00000012" / "COMPLETE").is_file()
    state = json.loads((full_run / "checkpoints" / "step00000012" / "client_state.json").read_text())
    assert state["schedule"] == "1_CLM+1_MLM+1_CLM" and len(state["tokenizer_hash"]) == 64


def test_interrupted_mid_phase_resume_equals_uninterrupted(full_run, tmp_path, tiny_tokenizer, data_cache):
    out = tmp_path / "run"
    base = ["--output-dir", str(out), *tiny_args_for(tiny_tokenizer, data_cache)]
    first = run_cli(base + ["train.stop_at_step=6"])  # step 6 is in the middle of the MLM phase
    assert_ok(first)
    assert (out / "checkpoints" / "latest").read_text() == "step00000006"
    assert not (out / "summary.json").exists()
    again = run_cli(base)  # no --resume: refuses to mix runs
    assert again.returncode == 2 and "--resume" in again.stderr
    other = run_cli(base + ["--resume", "objective.schedule=1_CLM+2_MLM"])  # refused before the model is built
    assert other.returncode != 0 and "resume with the same objective.schedule" in other.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step00000006"
    resumed = run_cli(base + ["--resume"])
    assert_ok(resumed)
    assert "resumed from step00000006 at step 6" in resumed.stderr + resumed.stdout
    ref, got = train_losses(full_run), train_losses(out)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step][0] == ref[step][0]
        assert got[step][1] == pytest.approx(ref[step][1], rel=1e-6, abs=0), step


def test_zero3_losses_equal_zero2(full_run, tmp_path, tiny_tokenizer, data_cache):
    """ZeRO-3 partitions the LM head; the fused loss runs inside the head module, so it is
    gathered there and every step's loss equals the ZeRO-2 run's."""
    out = tmp_path / "z3"
    proc = run_cli(["--output-dir", str(out), *tiny_args_for(tiny_tokenizer, data_cache),
                    "distributed.deepspeed_config=zero3.json"])
    assert_ok(proc)
    assert json.loads((out / "summary.json").read_text())["zero_stage"] == 3
    ref, got = train_losses(full_run), train_losses(out)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step][0] == ref[step][0]
        assert got[step][1] == pytest.approx(ref[step][1], rel=1e-5, abs=0), step
