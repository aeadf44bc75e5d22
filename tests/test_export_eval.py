"""Export to Hugging Face and zero-shot evaluation, checked against independent references.

Two tiny 2-rank runs (ZeRO-2 and ZeRO-3, one CLM epoch each, ~20 s apiece) are exported
once per module. References: HF ``LlamaForCausalLM`` logits, minicons'
``IncrementalLMScorer`` sentence scores, float64 one-copy-at-a-time PLL loops, and the
trainer's own held-out evaluation of the same weights.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from antlm_dist.config import recipe_from_dict
from antlm_dist.eval import cli as eval_cli
from antlm_dist.eval.blimp import (BlimpFormatError, MinimalPair, SentenceTooLongError, clm_scores, format_markdown,
                                   pll_scores, read_blimp, read_blimp_file, score_pairs, summarize)
from antlm_dist.export import (ExportError, _builders, consolidate_state_dict, export_checkpoint, load_pretrained,
                               read_antlm_meta, resolve_checkpoint)
from antlm_dist.export_cli import main as export_main
from antlm_dist.metrics import read_metrics
from antlm_dist.model import build_model
from antlm_testutil import assert_ok, run_cli, shared_path, tiny_args_for

pytestmark = pytest.mark.slow

SENTENCES = [
    "The cat sat on the mat.",
    "Who should Derek hug after shocking Richard?",
    "These dogs barks.",
    "a",
    "And the LORD said unto Moses, go forth.",
]
BLIMP_FILES = ("adjunct_island", "anaphor_gender_agreement", "determiner_noun_agreement_1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer, data_cache):
    """{"zero2": run dir, "zero3": run dir}: 4 optimizer steps of CLM each, 2 ranks."""
    out = {}
    for stage in ("zero2", "zero3"):
        run = tmp_path_factory.mktemp(stage) / "run"
        proc = run_cli(["--output-dir", str(run), *tiny_args_for(tiny_tokenizer, data_cache),
                        "objective.schedule=1_CLM", f"distributed.deepspeed_config={stage}.json"])
        assert_ok(proc)
        out[stage] = run
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    return {stage: export_checkpoint(run, root / stage) for stage, run in runs.items()}


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_hf_logits_equal_ours_in_causal_mode(stage, runs, exported):
    from transformers import LlamaForCausalLM

    ckpt_dir, tag, _ = resolve_checkpoint(runs[stage])
    state = json.loads((ckpt_dir / tag / "client_state.json").read_text())
    ours = build_model(recipe_from_dict(state["recipe"]).model)
    ours.load_state_dict(consolidate_state_dict(ckpt_dir, tag), strict=True)
    ours.eval()
    hf = LlamaForCausalLM.from_pretrained(exported[stage]).eval()
    ids = torch.randint(5, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids, causal=True)
        loaded, _ = load_pretrained(exported[stage])
        again = loaded(ids, causal=True)
    assert ref.dtype == got.dtype == torch.float32
    assert (ref - got).abs().max().item() <= 1e-5
    assert torch.equal(got, again)
    # with right padding and HF's attention mask, the real positions agree too
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        ref_p = hf(ids, attention_mask=mask).logits
        got_p = ours(ids, mask, causal=True)
    real = mask.bool()
    assert (ref_p[real] - got_p[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_heldout_cli_equals_the_trainers_final_eval(stage, runs, exported, tmp_path, capsys):
    """The consolidated weights are exactly the trained ones: the trainer's last eval is reproduced."""
    last = read_metrics(runs[stage] / "metrics.jsonl", "eval")[-1]
    out = tmp_path / "heldout.json"
    assert eval_cli.main(["heldout", "--model", str(exported[stage]), "--corpus", "bundled",
                          "--batch-size", "5", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["blocks"] == 16 and res["seq_len"] == 32
    assert res["clm"]["loss"] == pytest.approx(last["clm_loss"], rel=1e-5)
    assert res["mlm"]["loss"] == pytest.approx(last["mlm_loss"], rel=1e-5)
    assert res["mlm"]["accuracy"] == pytest.approx(last["mlm_accuracy"], abs=1e-9)
    assert "CLM loss" in capsys.readouterr().out


def test_exported_folder_metadata_and_offline_loading(runs, exported):
    out = exported["zero3"]
    ckpt_dir, tag, _ = resolve_checkpoint(runs["zero3"])
    state = json.loads((ckpt_dir / tag / "client_state.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 512
    meta = cfg["antlm"]
    assert meta["schedule"] == "1_CLM" and meta["step"] == 4 and meta["untrained"] is False
    assert meta["antlm_dist_version"] and meta["tokenizer_hash"] == state["tokenizer_hash"]
    assert meta["recipe"]["distributed"]["deepspeed_config"] == "zero3.json"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    code = ("import sys; from transformers import AutoTokenizer, LlamaForCausalLM;"
            "t = AutoTokenizer.from_pretrained(sys.argv[1]); LlamaForCausalLM.from_pretrained(sys.argv[1]);"
            "print(t.bos_token_id, t.eos_token_id, t.pad_token_id, t.mask_token_id, t.model_max_length,"
            " t('The cat sat.')['input_ids'])")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, tok = load_pretrained(out)
    expect = tok("The cat sat.", add_special_tokens=False)["input_ids"]
    assert proc.stdout.split()[:5] == ["1", "2", "0", "4", "64"]
    assert proc.stdout.strip().endswith(str(expect))


def test_checkpoint_paths_and_errors(runs, exported, tmp_path, capsys):
    run = runs["zero2"]
    assert resolve_checkpoint(run) == resolve_checkpoint(run / "checkpoints")
    ckpt_dir, tag, run_dir = resolve_checkpoint(run / "checkpoints" / "step00000004")
    assert (ckpt_dir, tag, run_dir) == (run / "checkpoints", "step00000004", run)
    with pytest.raises(ExportError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ExportError, match="no such folder"):
        resolve_checkpoint(tmp_path / "absent")
    with pytest.raises(ValueError, match="gpt2.*cannot be exported"):
        _builders("gpt2")
    # the CLI refuses a non-empty --out, and writes with --overwrite
    assert export_main(["--checkpoint", str(run), "--out", str(exported["zero2"])]) == 2
    assert "not empty" in capsys.readouterr().err
    out = tmp_path / "again"
    assert export_main(["--checkpoint", str(run / "checkpoints"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


def test_untrained_export_is_the_trainers_initialisation(runs, exported, tmp_path):
    out = export_checkpoint(runs["zero2"], tmp_path / "untrained", untrained=True)
    meta = read_antlm_meta(out)
    assert meta["untrained"] is True and meta["step"] == 0
    fresh, _ = load_pretrained(out)
    trained, _ = load_pretrained(exported["zero2"])
    again, _ = load_pretrained(export_checkpoint(runs["zero2"], tmp_path / "twice", untrained=True))
    for (name, a), b, c in zip(fresh.state_dict().items(), trained.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, c), name  # deterministic
        if not name.endswith("norm.weight"):
            assert not torch.equal(a, b), name  # training moved every matrix


# ----------------------------------------------------------------------------- scoring vs references

def _blimp_sentences(n_pairs: int) -> tuple[list[str], list[MinimalPair]]:
    folder = shared_path("data", "blimp")
    pairs = [p for f in BLIMP_FILES for p in read_blimp_file(folder / f"{f}.jsonl", n_pairs)]
    return [s for p in pairs for s in (p.good, p.bad)], pairs


def test_clm_scores_equal_minicons(exported):
    from minicons import scorer

    sentences, _ = _blimp_sentences(50)
    model, tok = load_pretrained(exported["zero2"])
    ours = clm_scores(model, tok, sentences, batch_size=37)
    lm = scorer.IncrementalLMScorer(str(exported["zero2"]), device="cpu")
    # same inputs: minicons prepends the bos token's text and tokenises; we prepend its id
    enc = lm.encode(sentences, bos_token=True)
    for row, m, s in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), sentences):
        assert [t for t, keep in zip(row, m) if keep] == [tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"]
    ref = []
    for start in range(0, len(sentences), 50):
        ref += lm.sequence_score(sentences[start : start + 50], reduction=lambda x: x.sum(0).item(), bos_token=True)
    assert len(ref) == len(ours) == 300
    diff = max(abs(a - b) for a, b in zip(ours, ref))
    assert diff <= 1e-4, diff


def _float64_pll(model64, tok, sentence: str) -> float:
    ids = [tok.bos_token_id] + tok(sentence, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    total = 0.0
    for j in range(1, len(ids) - 1):
        masked = list(ids)
        masked[j] = tok.mask_token_id
        with torch.no_grad():
            logits = model64(torch.tensor([masked]), causal=False)[0, j]
        total += float(torch.log_softmax(logits, -1)[ids[j]])
    return total


def _float64_clm(model64, tok, sentence: str) -> float:
    ids = [tok.bos_token_id] + tok(sentence, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model64(torch.tensor([ids]), causal=True)[0], -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))


class ForwardOnly(torch.nn.Module):
    """Hides ``.model``/``.lm_head``: the scorers must then go through ``forward`` (LTG-BERT's path)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, labels=None, *, causal):
        return self.inner(input_ids, attention_mask, labels, causal=causal)


def test_pll_and_clm_equal_float64_loops(exported):
    model, tok = load_pretrained(exported["zero2"])
    model64 = load_pretrained(exported["zero2"])[0].double()
    ref_pll = [_float64_pll(model64, tok, s) for s in SENTENCES]
    ref_clm = [_float64_clm(model64, tok, s) for s in SENTENCES]
    for bs in (1, 7, 256):
        got = pll_scores(model, tok, SENTENCES, batch_size=bs)
        assert max(abs(a - b) for a, b in zip(got, ref_pll)) <= 1e-4, bs
        got = clm_scores(model, tok, SENTENCES, batch_size=bs)
        assert max(abs(a - b) for a, b in zip(got, ref_clm)) <= 1e-4, bs
    generic = pll_scores(ForwardOnly(model), tok, SENTENCES, batch_size=9)
    assert max(abs(a - b) for a, b in zip(generic, ref_pll)) <= 1e-4
    assert pll_scores(model, tok, [""])[0] == 0.0 == clm_scores(model, tok, [""])[0]


def test_masked_row_pll_equals_full_logit_pll_in_float64(exported):
    """The head applied to the masked rows only gives the scores of the full (R, T, V) logits."""
    model64 = load_pretrained(exported["zero2"])[0].double()
    _, tok = load_pretrained(exported["zero2"])
    fast = pll_scores(model64, tok, SENTENCES, batch_size=5)
    full = pll_scores(model64, tok, SENTENCES, batch_size=5, masked_rows_only=False)
    generic = pll_scores(ForwardOnly(model64), tok, SENTENCES, batch_size=5)
    assert full == generic  # masked_rows_only=False is the plain forward path
    assert max(abs(a - b) for a, b in zip(fast, full)) <= 1e-6
    assert all(s < 0 for s in fast)


def test_pll_equals_float64_loop_on_blimp(exported):
    sentences, _ = _blimp_sentences(2)
    model, tok = load_pretrained(exported["zero3"])
    model64 = load_pretrained(exported["zero3"])[0].double()
    got = pll_scores(model, tok, sentences, batch_size=64)
    ref = [_float64_pll(model64, tok, s) for s in sentences]
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-4


def test_blimp_cli_reads_the_whole_shared_folder(exported, tmp_path):
    """All 67 paradigm files: every pair is read (checked against json.loads of the raw
    lines), and the CLI's per-paradigm verdicts in both modes (first pair of each file)
    equal the float64 one-sentence-at-a-time CLM and PLL loops."""
    folder = shared_path("data", "blimp")
    files = sorted(folder.glob("*.jsonl"))
    raw = {f.stem: [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
           for f in files}
    pairs = read_blimp(folder)
    assert len(files) == 67 and len(pairs) == sum(len(r) for r in raw.values())
    assert [(p.good, p.bad, p.uid, p.field) for p in pairs] == [
        (r["sentence_good"], r["sentence_bad"], r["UID"], r["field"]) for stem in sorted(raw) for r in raw[stem]]

    out = tmp_path / "full.json"
    args = ["blimp", "--model", str(exported["zero2"]), "--data", str(folder), "--mode", "both", "--out", str(out),
            "--limit", "1", "--batch-size", "64", "--no-progress"]
    assert eval_cli.main(args) == 0
    rep = json.loads(out.read_text())
    assert rep["pairs"] == 67
    model64, tok = load_pretrained(exported["zero2"])
    model64 = model64.double()
    for mode, loop in (("clm", _float64_clm), ("mlm", _float64_pll)):
        by_uid = rep["results"][mode]["by_uid"]
        assert set(by_uid) == {r[0]["UID"] for r in raw.values()}
        checked = 0
        for records in raw.values():
            first = records[0]
            margin = loop(model64, tok, first["sentence_good"]) - loop(model64, tok, first["sentence_bad"])
            if abs(margin) > 3e-4:  # closer calls may flip in fp32 (each score agrees within 1e-4)
                assert by_uid[first["UID"]]["accuracy"] == float(margin > 0), (mode, first["UID"], margin)
                checked += 1
        assert checked >= 50, f"{mode}: only {checked} of 67 verdicts were clear enough to compare"
        expected_overall = sum(r["accuracy"] for r in by_uid.values()) / 67
        assert rep["results"][mode]["overall"] == pytest.approx(expected_overall)


# ----------------------------------------------------------------------------- BLiMP CLI, aggregation, errors

def _write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def _pair(good: str, bad: str, uid: str, field: str = "morphology", term: str = "agreement") -> dict:
    return {"sentence_good": good, "sentence_bad": bad, "UID": uid, "field": field, "linguistics_term": term}


def test_summarize_means_over_uids():
    def mp(uid, term, field):
        return MinimalPair("g", "b", uid, field, term, "x:1")

    pairs = [mp("a", "t1", "f")] * 4 + [mp("b", "t1", "f")] * 2 + [mp("c", "t2", "g")] * 1
    res = summarize(pairs, [True, True, True, False, False, True, True])
    assert res["by_uid"]["a"]["accuracy"] == 0.75 and res["by_uid"]["b"]["accuracy"] == 0.5
    assert res["by_term"]["t1"] == {"accuracy": 0.625, "uids": 2, "pairs": 6}
    assert res["by_field"]["g"]["accuracy"] == 1.0
    assert res["overall"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert res["pair_accuracy"] == pytest.approx(5 / 7)
    fewer = summarize(pairs[3:], [False, False, True, True])
    md = format_markdown({"all": res, "subset": fewer})
    assert "| **overall** (mean over 3 UIDs) | 7 / 4 | **75.0** | **50.0** |" in md
    assert "| a | 4 / 1 | 75.0 | 0.0 |" in md and "| t2 | 1 | 100.0 | 100.0 |" in md


def test_blimp_cli_both_modes(exported, tmp_path, capsys):
    data = tmp_path / "blimp"
    _write_pairs(data / "agr.jsonl", [_pair("The dog barks.", "The dog bark.", "agr"),
                                      _pair("The dogs bark.", "The dogs barks.", "agr"),
                                      _pair("A cat sleeps.", "A cat sleep.", "agr")])
    _write_pairs(data / "isl.jsonl", [_pair("Who did you see?", "Who did you see him?", "isl", "syntax", "island"),
                                      _pair("What fell?", "What fell it?", "isl", "syntax", "island")])
    out = tmp_path / "res" / "blimp.json"
    args = ["blimp", "--model", str(exported["zero2"]), "--data", str(data), "--mode", "both", "--out", str(out),
            "--limit", "2", "--batch-size", "4", "--device", "cpu"]
    assert eval_cli.main(args) == 0
    rep = json.loads(out.read_text())
    assert rep["pairs"] == 4 and rep["modes"] == ["clm", "mlm"] and rep["antlm"]["step"] == 4
    for mode in ("clm", "mlm"):
        r = rep["results"][mode]
        assert set(r["by_uid"]) == {"agr", "isl"} and set(r["by_field"]) == {"morphology", "syntax"}
        assert r["by_uid"]["agr"]["pairs"] == 2 and 0.0 <= r["overall"] <= 1.0
    # the JSON agrees with the scoring functions
    model, tok = load_pretrained(exported["zero2"])
    pairs = read_blimp(data, 2)
    scored = score_pairs(model, tok, pairs, "mlm", batch_size=3)
    direct = summarize(pairs, scored["correct"], scored["tie"])
    assert direct == rep["results"]["mlm"]
    md = out.with_suffix(".md").read_text()
    assert "| **overall** (mean over 2 UIDs) | 4 |" in md and "MLM (PLL)" in md and "| agr | 2 |" in md
    assert md in capsys.readouterr().out
    # compare: one table from several result files
    table = tmp_path / "cmp.md"
    assert eval_cli.main(["compare", str(out), str(out), "--names", "x", "y", "--out", str(table)]) == 0
    assert "x CLM | x MLM (PLL) | y CLM | y MLM (PLL)" in table.read_text()


def test_blimp_errors_name_file_and_line(exported, tmp_path, capsys):
    bad_json = tmp_path / "bad" / "p.jsonl"
    bad_json.parent.mkdir()
    bad_json.write_text(json.dumps(_pair("A b.", "B a.", "p")) + "\n\n" + '{"sentence_good": "x", oops}\n')
    with pytest.raises(BlimpFormatError, match=r"p\.jsonl:3: not valid JSON"):
        read_blimp(bad_json.parent)
    missing = _write_pairs(tmp_path / "miss" / "m.jsonl", [_pair("A b.", "B a.", "m"), {"sentence_good": "x"}])
    with pytest.raises(BlimpFormatError, match=r"m\.jsonl:2: 'sentence_bad' is missing"):
        read_blimp_file(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BlimpFormatError, match=r"no \*\.jsonl files"):
        read_blimp(tmp_path / "empty")
    out = tmp_path / "o.json"
    assert eval_cli.main(["blimp", "--model", str(exported["zero2"]), "--data", str(bad_json.parent), "--mode", "clm",
                          "--out", str(out)]) == 2
    assert "p.jsonl:3" in capsys.readouterr().err and not out.exists()

    # sentences longer than the model's 64 positions are refused, naming file and line
    long = " ".join(["word"] * 80)
    too_long = _write_pairs(tmp_path / "long" / "l.jsonl", [_pair("A b.", "B a.", "l"), _pair("Fine.", long, "l")])
    model, tok = load_pretrained(exported["zero2"])
    for mode in ("clm", "mlm"):
        with pytest.raises(SentenceTooLongError, match=r"l\.jsonl:2 \(sentence_bad\).*max_position_embeddings=64"):
            score_pairs(model, tok, read_blimp(too_long), mode, batch_size=8)
    assert eval_cli.main(["blimp", "--model", str(exported["zero2"]), "--data", str(too_long), "--mode", "mlm",
                          "--out", str(out)]) == 2
    assert "l.jsonl:2 (sentence_bad)" in capsys.readouterr().err

    # a model folder without its tokenizer
    no_tok = tmp_path / "no_tok"
    shutil.copytree(exported["zero2"], no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="no tokenizer.json"):
        load_pretrained(no_tok)
    good = _write_pairs(tmp_path / "ok" / "k.jsonl", [_pair("A b.", "B a.", "k")])
    assert eval_cli.main(["blimp", "--model", str(no_tok), "--data", str(good.parent), "--out", str(out)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert eval_cli.main(["blimp", "--model", str(no_tok), "--data", str(good), "--out", str(out), "--limit", "0"]) == 2


def test_heldout_cli_tokenises_once_and_says_so(exported, tmp_path, capsys):
    """The dev split is tokenised on the first call only; both calls say which they did and agree."""
    cache = tmp_path / "cache"
    args = ["heldout", "--model", str(exported["zero2"]), "--corpus", "bundled", "--batch-size", "5",
            "--cache-dir", str(cache)]
    assert eval_cli.main(args) == 0
    first = capsys.readouterr()
    assert eval_cli.main(args) == 0
    second = capsys.readouterr()
    assert first.err.startswith("tokenising the dev split") and second.err.startswith("reusing the dev split")
    assert first.out == second.out and "CLM loss" in first.out
    assert len([p for p in cache.glob("dev-*.npy") if not p.name.endswith(".words.npy")]) == 1  # blocks (beside their word counts)
