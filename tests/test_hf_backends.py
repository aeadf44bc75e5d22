"""Exports load in every backend of the BabyLM 2025 pipeline, and the scorers agree with it.

Two tiny trained checkpoints (one rank, CLM then MLM, 8 steps each): a Llama with
``same_position`` MLM and an LTG-BERT with ``next_position`` (MNTP). References: our own
trainer model in the matching mode; the pipeline's three scoring methods written here on
the HF Auto classes (causal: summed log-probs; mlm: masked PLL; mntp: PLL read at i-1);
float64 one-copy-at-a-time loops for the ``within_word_l2r`` variant; lm-evaluation-harness.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from antlm_dist.eval import cli as eval_cli
from antlm_dist.eval.blimp import clm_scores, mntp_scores, pll_scores, read_blimp
from antlm_dist.export import export_checkpoint, load_pretrained
from antlm_testutil import TINY, assert_ok, run_cli

pytestmark = pytest.mark.slow

ARCHS = ("llama", "ltg_bert")
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel", "AutoModelForSequenceClassification")
SENTENCES = ["Who should Derek hug after shocking Richard?", "These dogs barks.", "The man was not there.",
             "Unbelievably, the philosopher wrote.", "a"]
PAIRS = [("The cat sat on the mat.", "The cat sat the on mat."), ("These dogs bark.", "These dogs barks."),
         ("Who did you see?", "Who did you see him?"), ("The man was not there.", "The man was not there.")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer, wordpiece, data_cache) -> dict[str, Path]:
    """{arch: exported folder} of a trained 1-rank run each (CLM phase then MLM phase)."""
    common = [*TINY, "objective.schedule=1_CLM+1_MLM", "distributed.nproc_per_node=1", f"data.cache_dir={data_cache}"]
    per_arch = {"llama": [f"tokenizer.path={tiny_tokenizer}"],
                "ltg_bert": [f"tokenizer.path={wordpiece}", "objective.mlm_target=next_position"]}
    out = {}
    for arch in ARCHS:
        run = tmp_path_factory.mktemp(arch) / "run"
        config = ["--config", "ltg-bert-demo-cpu"] if arch == "ltg_bert" else []
        assert_ok(run_cli([*config, "--output-dir", str(run), *common, *per_arch[arch]]))
        out[arch] = export_checkpoint(run, tmp_path_factory.mktemp(f"{arch}_hf") / "hf")
    return out


def _hidden(ours, ids, mask, causal):
    """Our model's last hidden states (B, T, H)."""
    return ours.encode(ids, mask, causal=causal) if hasattr(ours, "encode") else ours.model(ids, mask, causal=causal)


_LOAD_ALL = """
import sys, torch, transformers
from transformers import AutoTokenizer
folder, ids, mask, dest = sys.argv[1], *torch.load(sys.argv[2]), sys.argv[3]
out = {}
with torch.no_grad():
    for name in %r:
        kwargs = {"num_labels": 3} if name.endswith("Classification") else {}
        m = getattr(transformers, name).from_pretrained(folder, trust_remote_code=True, **kwargs).eval()
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        res = m(input_ids=ids, attention_mask=mask)
        out[name] = res.last_hidden_state if name == "AutoModel" else res.logits
        if name == "AutoModelForSequenceClassification":
            out["score"] = m.score.weight.detach().clone()
t = AutoTokenizer.from_pretrained(folder)
out["special"] = [t.pad_token_id, t.bos_token_id, t.eos_token_id, t.unk_token_id, t.mask_token_id]
torch.save(out, dest)
""" % (AUTO_CLASSES,)


@pytest.mark.parametrize("arch", ARCHS)
def test_four_auto_classes_load_offline_and_equal_our_model(arch, exported, tmp_path):
    folder = exported[arch]
    cfg = json.loads((folder / "config.json").read_text())
    assert set(AUTO_CLASSES) <= set(cfg["auto_map"]) and (folder / "hf_auto.py").is_file()
    assert cfg["mlm_target"] == ("same_position" if arch == "llama" else "next_position")
    ours, tok = load_pretrained(folder)
    ids = torch.randint(5, 512, (2, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding in the second row
    torch.save((ids, mask), tmp_path / "in.pt")
    # a fresh interpreter, offline, with an empty module cache: the code comes from the folder
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", _LOAD_ALL, str(folder), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["special"] == [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id,
                              tok.mask_token_id] == [0, 1, 2, 3, 4]
    real = mask.bool()
    with torch.no_grad():
        ref = {"AutoModelForCausalLM": ours(ids, mask, causal=True), "AutoModelForMaskedLM": ours(ids, mask, causal=False),
               "AutoModel": _hidden(ours, ids, mask, False)}
        keep = mask[..., None].float()
        pooled = (_hidden(ours, ids, mask, False) * keep).sum(1) / keep.sum(1)  # (B, H): mean over real tokens
        ref["AutoModelForSequenceClassification"] = pooled @ got["score"].T
    assert got["AutoModelForSequenceClassification"].shape == (2, 3)
    assert (got["AutoModelForSequenceClassification"] - ref["AutoModelForSequenceClassification"]).abs().max() <= 1e-5
    for name in AUTO_CLASSES[:3]:
        assert got[name].dtype == torch.float32
        assert (got[name][real] - ref[name][real]).abs().max().item() <= 1e-5, name
    # the two masks really differ: the causal logits are not the bidirectional ones
    assert (ref["AutoModelForCausalLM"] - ref["AutoModelForMaskedLM"]).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------- the pipeline's scoring methods


def _wrapped(tok, sentence, eos: bool) -> list[int]:
    return [tok.bos_token_id] + tok(sentence, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])


def _pipeline_causal(hf, tok, sentence) -> float:
    """The pipeline's ``causal`` backend: Σ log p(w_t | w_<t) from AutoModelForCausalLM logits."""
    ids = _wrapped(tok, sentence, eos=False)
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))


def _pipeline_masked(hf, tok, sentence, offset: int) -> float:
    """``mlm`` (offset 0) and ``mntp`` (offset -1): each word piece masked in its own copy,
    its log-prob read at its own position or the one before, from AutoModelForMaskedLM."""
    ids = _wrapped(tok, sentence, eos=True)
    copies, where = [], []
    for t in range(1, len(ids) - 1):
        row = list(ids)
        row[t] = tok.mask_token_id
        copies.append(row)
        where.append(t)
    if not copies:
        return 0.0
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(copies), attention_mask=torch.ones(len(copies), len(ids))).logits.double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[b, t + offset, ids[t]] for b, t in enumerate(where)))


def _write_pairs(folder: Path, pairs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"sentence_good": g, "sentence_bad": b, "UID": "pairs", "field": "f", "linguistics_term": "t"})
             for g, b in pairs]
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("arch", ARCHS)
def test_each_pipeline_backend_equals_antlm_eval(arch, exported, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = exported[arch]
    causal_hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    masked_hf = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    ours, tok = load_pretrained(folder)
    data = _write_pairs(tmp_path / "blimp", PAIRS)
    sentences = [s for p in PAIRS for s in p]
    references = {"clm": [_pipeline_causal(causal_hf, tok, s) for s in sentences],
                  "mlm": [_pipeline_masked(masked_hf, tok, s, 0) for s in sentences],
                  "mntp": [_pipeline_masked(masked_hf, tok, s, -1) for s in sentences]}
    for mode, scorer in (("clm", clm_scores), ("mlm", pll_scores), ("mntp", mntp_scores)):
        got = scorer(ours, tok, sentences, batch_size=5)
        assert max(abs(a - b) for a, b in zip(got, references[mode])) <= 1e-4, mode
        scores = tmp_path / f"{mode}.jsonl"
        out = tmp_path / f"{mode}.json"
        assert eval_cli.main(["blimp", "--model", str(folder), "--data", str(data), "--mode", mode, "--out", str(out),
                              "--batch-size", "3", "--no-progress", "--scores-out", str(scores)]) == 0
        rows = [json.loads(line) for line in scores.read_text().splitlines()]
        assert [r["source"] for r in rows] == [p.source for p in read_blimp(data)]
        ref = references[mode]
        assert max(max(abs(r["good"] - ref[2 * i]), abs(r["bad"] - ref[2 * i + 1])) for i, r in enumerate(rows)) <= 1e-4
        # the identical pair is a tie, reported and counted wrong
        res = json.loads(out.read_text())["results"][mode]
        assert res["ties"] == 1 and res["by_uid"]["pairs"]["ties"] == 1 and rows[-1]["tie"] is True
        expected = sum(r["good"] > r["bad"] for r in rows) / len(rows)
        assert res["overall"] == pytest.approx(expected)
        assert "1 tied (counted wrong)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- within_word_l2r


def _float64_l2r(model64, tok, sentence: str, offset: int = 0) -> float:
    """Kauf & Ivanova's PLL-word-l2r, one copy at a time: piece j and the later pieces of its word masked."""
    enc = tok(sentence, add_special_tokens=False)
    ids = [tok.bos_token_id] + enc["input_ids"] + [tok.eos_token_id]
    words = [None] + enc.word_ids() + [None]
    total = 0.0
    for j in range(1, len(ids) - 1):
        masked = list(ids)
        for k in range(j, len(ids) - 1):
            if words[k] == words[j]:
                masked[k] = tok.mask_token_id
        with torch.no_grad():
            logits = model64(torch.tensor([masked]), causal=False)[0, j + offset]
        total += float(torch.log_softmax(logits, -1)[ids[j]])
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_within_word_l2r_equals_a_float64_loop(arch, exported):
    model, tok = load_pretrained(exported[arch])
    model64 = load_pretrained(exported[arch])[0].double()
    words = [tok(s, add_special_tokens=False).word_ids() for s in SENTENCES]
    multi = [i for i, w in enumerate(words) if len(set(w)) < len(w)]
    single = [i for i, w in enumerate(words) if len(set(w)) == len(w)]
    assert len(multi) >= 3 and SENTENCES.index("The man was not there.") in single
    for scorer, offset in ((pll_scores, 0), (mntp_scores, -1)):
        ref = [_float64_l2r(model64, tok, s, offset) for s in SENTENCES]
        for bs in (1, 7, 256):
            got = scorer(model, tok, SENTENCES, batch_size=bs, pll_metric="within_word_l2r")
            assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-4, (scorer.__name__, bs)
        original = scorer(model, tok, SENTENCES, batch_size=256)
        l2r = scorer(model, tok, SENTENCES, batch_size=256, pll_metric="within_word_l2r")
        for i in single:
            assert abs(original[i] - l2r[i]) <= 1e-6, SENTENCES[i]
        # masking the later pieces changes the scores of multi-piece words (little, in a barely trained model)
        assert max(abs(original[i] - l2r[i]) for i in multi) > 1e-4
    with pytest.raises(ValueError, match="pll_metric='word'"):
        pll_scores(model, tok, SENTENCES, pll_metric="word")


# ----------------------------------------------------------------------------- lm-evaluation-harness

BLIMP_LINES = [  # six pairs of BLiMP (Warstadt et al. 2020), three paradigms
    ("Katherine can't help herself.", "Katherine can't help himself.", "anaphor_gender_agreement"),
    ("Karla could listen to herself.", "Karla could listen to himself.", "anaphor_gender_agreement"),
    ("Some dog stunned this committee.", "Some dog stunned these committee.", "determiner_noun_agreement_2"),
    ("Tracy passed these art galleries.", "Tracy passed this art galleries.", "determiner_noun_agreement_2"),
    ("Paula references Robert.", "Paula reference Robert.", "regular_plural_subject_verb_agreement_1"),
    ("Most legislatures haven't disliked children.", "Most legislatures hasn't disliked children.",
     "regular_plural_subject_verb_agreement_1"),
]
# The shape of lm-eval's own BLiMP task (lm_eval/tasks/blimp), on a local JSON-lines file, with no
# delimiter before the sentence: antlm-eval scores the sentence as written, and the test tokenizer
# (tokenizer.add_prefix_space=false, the default) would read a leading space as a token of its own.
LM_EVAL_TASK = """task: antlm_minimal_pairs
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}
output_type: multiple_choice
validation_split: train
doc_to_text: ""
doc_to_target: 0
doc_to_choice: "{{{{[sentence_good, sentence_bad]}}}}"
target_delimiter: ""
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_eval_loglikelihoods_equal_antlm_eval_clm(arch, exported, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[dev]')")
    from lm_eval.tasks import TaskManager

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    data = tmp_path / "blimp" / "pairs.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"sentence_good": g, "sentence_bad": b, "UID": u}) + "\n"
                            for g, b, u in BLIMP_LINES))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "antlm_minimal_pairs.yaml").write_text(LM_EVAL_TASK.format(data=data))
    # Llama: HF's own LlamaForCausalLM (no remote code); LTG-BERT: our causal class via auto_map
    remote = ",trust_remote_code=True" if arch == "ltg_bert" else ""
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={exported[arch]},dtype=float32{remote}",
                                  tasks=["antlm_minimal_pairs"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  device="cpu", batch_size=4, log_samples=True)
    samples = sorted(res["samples"]["antlm_minimal_pairs"], key=lambda r: r["doc_id"])
    theirs = [(float(r["filtered_resps"][0][0]), float(r["filtered_resps"][1][0])) for r in samples]
    scores = tmp_path / "scores.jsonl"
    assert eval_cli.main(["blimp", "--model", str(exported[arch]), "--data", str(data), "--mode", "clm",
                          "--out", str(tmp_path / "clm.json"), "--no-progress", "--scores-out", str(scores)]) == 0
    ours = [(r["good"], r["bad"]) for r in map(json.loads, scores.read_text().splitlines())]
    assert len(theirs) == len(ours) == len(BLIMP_LINES)
    assert max(abs(a - b) for x, y in zip(theirs, ours) for a, b in zip(x, y)) <= 1e-4, (theirs, ours)
    acc = res["results"]["antlm_minimal_pairs"]["acc,none"]
    assert acc == pytest.approx(sum(g > b for g, b in ours) / len(ours))
