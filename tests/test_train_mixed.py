"""End to end on 2 CPU ranks, a mixed schedule: per-objective step records, falling held-out
CLM and MNTP losses, and an exact resume from the middle of the mixed phase."""
import pytest

from antlm_dist.metrics import read_metrics
from antlm_testutil import assert_ok, run_cli, tiny_args_for, train_losses

# 4 steps per epoch; 2 ranks × 2 accumulation steps = 4 micro-batches per step, so every step
# of the mixed phase holds one CLM and three MNTP micro-batches; the mask rate falls 0.30 -> 0.15.
MIXED = ["objective.schedule=1_CLM+2_CLM:MNTP=1:3", "objective.mlm_probability=0.3",
         "objective.mask_rate_end=0.15", "eval.at_start=true"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_tokenizer, data_cache):
    out = tmp_path_factory.mktemp("mixed") / "run"
    proc = run_cli(["--output-dir", str(out), *tiny_args_for(tiny_tokenizer, data_cache), *MIXED])
    assert_ok(proc)
    return out


def test_mixed_run_records_every_objective_and_evals_fall(mixed_run):
    records = {r["step"]: r for r in read_metrics(mixed_run / "metrics.jsonl", "train")}
    assert sorted(records) == list(range(1, 13))
    assert [records[s]["phase"] for s in range(1, 13)] == ["CLM"] * 4 + ["CLM:MNTP=1:3"] * 8
    for s in range(5, 13):
        r = records[s]
        assert r["clm_targets"] > 0 and r["mntp_targets"] > 0
        # weights 1/4 and 3/4: one CLM and three MNTP micro-batches of the four
        assert r["loss"] == pytest.approx(0.25 * r["clm_loss"] + 0.75 * r["mntp_loss"], rel=1e-9)
        assert r["target_tokens"] == r["clm_targets"] + r["mntp_targets"]
        assert 0.0 <= r["clm_accuracy"] <= 1.0 and 0.0 <= r["mntp_accuracy"] <= 1.0
    assert records[1]["clm_loss"] == pytest.approx(records[1]["loss"]) and "mntp_loss" not in records[1]
    assert records[1]["mask_rate"] == pytest.approx(0.3) and records[12]["mask_rate"] == pytest.approx(0.15)
    assert records[6]["mask_rate"] == pytest.approx(0.3 - 0.15 * 5 / 11)  # step 6 trains global step 5 of 0..11
    evals = read_metrics(mixed_run / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 4, 12]
    for key in ("clm_loss", "mntp_loss", "mlm_loss"):
        assert evals[-1][key] < evals[0][key], (key, evals)


def test_mixed_run_stopped_mid_phase_resumes_with_equal_losses(mixed_run, tmp_path, tiny_tokenizer, data_cache):
    out = tmp_path / "run"
    base = ["--output-dir", str(out), *tiny_args_for(tiny_tokenizer, data_cache), *MIXED]
    first = run_cli(base + ["train.stop_at_step=6"])  # step 6 is the second step of the mixed phase
    assert_ok(first)
    assert (out / "checkpoints" / "latest").read_text() == "step00000006"
    resumed = run_cli(base + ["--resume"])
    assert_ok(resumed)
    ref = {r["step"]: r for r in read_metrics(mixed_run / "metrics.jsonl", "train")}
    got = {r["step"]: r for r in read_metrics(out / "metrics.jsonl", "train")}
    assert sorted(got) == list(range(1, 13)) and train_losses(out).keys() == train_losses(mixed_run).keys()
    for step in range(1, 13):
        for key in ("phase", "clm_targets", "mntp_targets"):  # the same assignment and the same masks
            assert got[step].get(key) == ref[step].get(key), (step, key)
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=0), step


def test_heldout_cli_reproduces_the_final_eval_with_mntp(mixed_run, tmp_path, capsys):
    """``antlm-eval heldout`` on the export of a run that trained MNTP gives the trainer's
    final CLM, MLM and MNTP losses (the same weights, blocks and masks)."""
    import json

    from antlm_dist.eval import cli as eval_cli
    from antlm_dist.export import export_checkpoint

    last = read_metrics(mixed_run / "metrics.jsonl", "eval")[-1]
    folder = export_checkpoint(mixed_run, tmp_path / "export")
    out = tmp_path / "heldout.json"
    assert eval_cli.main(["heldout", "--model", str(folder), "--corpus", "bundled", "--batch-size", "5",
                          "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("clm", "mlm", "mntp"):
        assert res[key]["loss"] == pytest.approx(last[f"{key}_loss"], rel=1e-5), key
    assert res["mntp"]["accuracy"] == pytest.approx(last["mntp_accuracy"], abs=1e-9)
    assert "| MNTP loss" in capsys.readouterr().out
