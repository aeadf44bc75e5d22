"""``antlm-study``: argument checks, a tiny study end to end, skipping and resuming runs.

The end-to-end study trains the tiny recipe with two schedules and one seed, then checks its
BLiMP figures against independent float64 loops: Hugging Face ``LlamaForCausalLM`` for CLM
scoring and a one-copy-at-a-time PLL loop over our model for MLM scoring.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from antlm_dist.study import cli as study_cli
from antlm_dist.study.plan import StudyPlan, RunSpec
from antlm_dist.study.runner import train_command

# Two tiny "paradigms" of our own making (BLiMP's JSON-lines format).
PAIRS = {
    "agreement": [("The dog runs.", "The dog run."), ("The cats sleep.", "The cats sleeps."),
                  ("She was here.", "She were here."), ("They have gone.", "They has gone.")],
    "word_order": [("He saw the king.", "He the king saw."), ("I am very happy.", "I very am happy."),
                   ("Where did you go?", "Where you did go?"), ("It is a big house.", "It is a house big.")],
}
SCHEDULES = "1_CLM+1_MLM,2_CLM"


def _write_blimp(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for uid, pairs in PAIRS.items():
        lines = [json.dumps({"sentence_good": g, "sentence_bad": b, "UID": uid, "field": "syntax",
                             "linguistics_term": uid}) for g, b in pairs]
        (folder / f"{uid}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _study_args(tiny_args, out: Path, blimp: Path, *extra: str) -> list[str]:
    overrides = [a for a in tiny_args if not a.startswith("objective.schedule=")]
    return ["--config", "demo-cpu", "--out", str(out), "--schedules", SCHEDULES, "--seeds", "3",
            "--blimp", str(blimp), *extra, *overrides]


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_tokenizer, data_cache):
    from antlm_testutil import tiny_args_for

    root = tmp_path_factory.mktemp("study")
    blimp = _write_blimp(root / "blimp")
    args = _study_args(tiny_args_for(tiny_tokenizer, data_cache), root / "out", blimp)
    assert study_cli.main(args) == 0
    return {"out": root / "out", "args": args, "blimp": blimp}


# ----------------------------------------------------------------------------- refused before any work

@pytest.mark.parametrize("extra, message", [
    (["--schedules", "1_CLM+1_MLM,3_CLM"], "total epochs differ (1_CLM+1_MLM = 2, 3_CLM = 3)"),
    (["--schedules", "1_CLM+1_XLM,2_CLM"], "objective 'XLM' is not one of CLM, MLM, MNTP"),
    (["--schedules", "2_CLM,2_clm"], "lists a schedule twice"),
    (["--schedules", "2_CLM:MNTP=1:15,3_CLM"], "total epochs differ (2_CLM:MNTP=1:15 = 2, 3_CLM = 3)"),
    (["--schedules", "2_CLM:MNTP=2:30,2_CLM"], "lowest terms (1:15)"),
    (["--schedules", "2_CLM,,2_MLM"], "give comma-separated schedules"),
    (["--seeds", "1,x"], "--seeds '1,x'"),
    (["--seeds", "1,1"], "distinct integers"),
    (["--pll-limit", "0"], "--pll-limit must be > 0"),
    (["train.seed=4"], "use --schedules and --seeds"),
    (["model.hidden_size=-3"], "model.hidden_size"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, capsys, extra, message):
    blimp = _write_blimp(tmp_path / "blimp")
    out = tmp_path / "out"
    args = ["--config", "demo-cpu", "--out", str(out), "--schedules", "1_CLM+1_MLM,2_CLM", "--blimp", str(blimp)]
    assert study_cli.main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("antlm-study: error:") and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_unequal_epochs_pass_with_the_flag_and_blimp_is_required(tmp_path, capsys):
    out = tmp_path / "out"
    assert study_cli.main(["--config", "demo-cpu", "--out", str(out), "--schedules", "2_CLM,3_CLM"]) == 2
    assert "--blimp DIR is required" in capsys.readouterr().err
    args = study_cli.build_arg_parser().parse_args(
        ["--config", "demo-cpu", "--out", str(out), "--schedules", "2_CLM,3_CLM", "--no-blimp",
         "--allow-unequal-epochs"])
    plan = study_cli._plan_from_args(args)
    assert plan.schedules == ["2_CLM", "3_CLM"] and [r.key for r in plan.runs] == ["2_CLM/seed1", "3_CLM/seed1"]
    assert not out.exists()


def test_mixed_and_mask_rate_schedules_join_a_study(tmp_path):
    args = study_cli.build_arg_parser().parse_args(
        ["--config", "demo-cpu", "--out", str(tmp_path / "o"), "--no-blimp", "--schedules",
         "1_CLM+2_MLM+1_CLM, 4_clm:mntp=1:15@0.30..0.15 ,4_MNTP"])
    plan = study_cli._plan_from_args(args)  # each run's recipe is validated here too
    assert plan.schedules == ["1_CLM+2_MLM+1_CLM", "4_CLM:MNTP=1:15@0.3..0.15", "4_MNTP"]
    assert [r.key for r in plan.runs][1] == "4_CLM:MNTP=1:15@0.3..0.15/seed1"
    assert "objective.schedule=4_CLM:MNTP=1:15@0.3..0.15" in plan.run_overrides(plan.runs[1], tmp_path)
    assert not (tmp_path / "o").exists()


def test_default_schedules_are_the_recipe_and_its_single_objective_baselines(tmp_path):
    args = study_cli.build_arg_parser().parse_args(
        ["--config", "demo-cpu", "--out", str(tmp_path / "o"), "--no-blimp", "--seeds", "1,2"])
    plan = study_cli._plan_from_args(args)
    assert plan.schedules == ["1_CLM+2_MLM+1_CLM", "4_CLM", "4_MLM"]  # demo-cpu trains 4 epochs
    assert len(plan.runs) == 6


def test_train_command_resumes_only_from_a_complete_checkpoint(tmp_path):
    plan = StudyPlan(config="demo-cpu", overrides=["train.lr=1e-3"], schedules=["2_CLM"], seeds=[5], blimp=None)
    train = tmp_path / "train"
    cmd = train_command(plan, RunSpec("2_CLM", 5), train, tmp_path / "cache")
    assert "--overwrite" in cmd and "--resume" not in cmd
    assert cmd[-3:] == [f"data.cache_dir={tmp_path / 'cache'}", "objective.schedule=2_CLM", "train.seed=5"]
    tag = train / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    assert "--overwrite" in train_command(plan, RunSpec("2_CLM", 5), train, tmp_path / "cache")  # no COMPLETE yet
    (tag / "COMPLETE").write_text("")
    assert "--resume" in train_command(plan, RunSpec("2_CLM", 5), train, tmp_path / "cache")


# ----------------------------------------------------------------------------- end to end

def _float64_clm(hf_model, ids: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))


def _float64_pll(model64, ids: list[int], mask_id: int) -> float:
    total = 0.0
    for j in range(1, len(ids) - 1):
        masked = list(ids)
        masked[j] = mask_id
        with torch.no_grad():
            total += float(torch.log_softmax(model64(torch.tensor([masked]), causal=False)[0, j], -1)[ids[j]])
    return total


def _reference_accuracy(score) -> float:
    """Mean over paradigms of the fraction of pairs with score(good) > score(bad)."""
    return sum(sum(score(g) > score(b) for g, b in pairs) / len(pairs) for pairs in PAIRS.values()) / len(PAIRS)


@pytest.mark.slow
def test_study_end_to_end(study):
    from transformers import LlamaForCausalLM

    from antlm_dist.export import load_pretrained

    out = study["out"]
    report = json.loads((out / "study.json").read_text())
    assert [(r["schedule"], r["seed"]) for r in report["runs"]] == [("1_CLM+1_MLM", 3), ("2_CLM", 3)]
    steps = {r["steps"] for r in report["runs"]}
    assert len(steps) == 1  # equal epochs → equal optimizer steps and LR schedule
    mixed = report["runs"][0]
    assert mixed["phase_switch_steps"] == [mixed["steps_per_epoch"]]
    for r in report["runs"]:
        export = out / r["schedule"] / "seed3" / "export"
        hf = LlamaForCausalLM.from_pretrained(export).double().eval()
        model64, tok = load_pretrained(export)
        model64 = model64.double()
        sep = tok.eos_token_id  # the study's default context token is </s>

        def ids(s):
            return [sep] + tok(s, add_special_tokens=False)["input_ids"]

        assert r["blimp"]["clm"]["overall"] == pytest.approx(_reference_accuracy(lambda s: _float64_clm(hf, ids(s))))
        assert r["blimp"]["mlm"]["overall"] == pytest.approx(
            _reference_accuracy(lambda s: _float64_pll(model64, ids(s) + [tok.eos_token_id], tok.mask_token_id)))
        assert r["blimp"]["clm"]["pairs"] == 8
        # the held-out losses are the trainer's final evaluation
        from antlm_dist.metrics import read_metrics

        last = read_metrics(out / r["schedule"] / "seed3" / "train" / "metrics.jsonl", "eval")[-1]
        assert r["heldout"]["clm"]["loss"] == last["clm_loss"] and r["heldout"]["mlm"]["loss"] == last["mlm_loss"]
        assert math.isfinite(r["heldout"]["clm"]["loss"]) and r["curve"][-1]["step"] == r["steps"]
    md = (out / "study.md").read_text()
    for r in report["runs"]:
        row = f"| {r['schedule']} | 3 | {r['steps']} | {100 * r['blimp']['clm']['overall']:.1f} | "
        assert row in md, md
    summ = report["summary"]["2_CLM"]["blimp_clm"]
    assert summ["n"] == 1 and summ["std"] == 0.0 and summ["mean"] == report["runs"][1]["blimp"]["clm"]["overall"]
    for png in ("heldout_loss.png", "blimp.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_skips_complete_runs_and_resumes_a_half_finished_one(study, capsys):
    out, args = study["out"], study["args"]
    mixed = out / "1_CLM+1_MLM" / "seed3"
    before = json.loads((out / "study.json").read_text())["runs"]
    logs = {p: p.read_text() for p in out.glob("*/seed3/train.log")}

    t0 = time.perf_counter()
    assert study_cli.main(args) == 0
    assert time.perf_counter() - t0 < 60  # nothing is trained again
    assert "complete, skipped" in capsys.readouterr().err
    assert {p: p.read_text() for p in out.glob("*/seed3/train.log")} == logs

    # a run that stopped after training: export and scoring are redone, training is not
    for name in ("result.json", "blimp_mlm.json"):
        (mixed / name).unlink()
    shutil.rmtree(mixed / "export")
    assert study_cli.main(args) == 0
    assert {p: p.read_text() for p in out.glob("*/seed3/train.log")} == logs
    after = json.loads((out / "study.json").read_text())["runs"]
    for a, b in zip(before, after):
        assert a["blimp"] == b["blimp"] and a["heldout"] == b["heldout"]


@pytest.mark.slow
def test_rerun_with_other_shared_settings_is_refused(study, capsys):
    args = [a for a in study["args"]] + ["--pll-limit", "2"]
    assert study_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "holds a study with other settings (pll_limit differ" in err and "--overwrite" in err
