"""Words seen (BabyLM's whitespace count): per-block counts against a decoding loop, the
per-step sums against a loop over every rank's micro-batches, milestone exports and the
word budget in 2-rank CPU runs, and the count across a resume at another world size."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from antlm_dist.config import ConfigError, load_recipe
from antlm_dist.data import dataset as dataset_mod
from antlm_dist.data.blocks import load_blocks
from antlm_dist.data.sampler import DistributedResumableSampler
from antlm_dist.data.tokenizer import load_tokenizer, tokenizer_hash
from antlm_dist.metrics import read_metrics
from antlm_dist.words import BABYLM_2025_MILESTONES, Milestones, WordCounter, milestone_name, parse_word_count
from antlm_testutil import TINY, assert_ok, free_port, run_cli, tiny_args_for

LINES = [
    "The cat sat on the mat.",
    "   ",
    "Antidisestablishmentarianism\tis  a   notoriously long word , isn't it ?",
    "café naïve  résumé",
    "x" * 70,
    "And the LORD said unto Moses, go forth.",
    "a",
    "Who should Derek hug after shocking Richard? These dogs barks.",
]


# ----------------------------------------------------------------------------- per-block counts

def _reference_block_words(lines, tok, seq_len: int, pack_lines: int) -> np.ndarray:
    """Words per block by a loop: a word's first token is the first token whose decoded
    prefix of the line holds one more whitespace word; the tokens cut at the end of each
    packing batch give their words to that batch's last block; a batch without a block
    gives its words to the last block of all."""
    decode = tok.backend_tokenizer.decode
    kept = [line for line in lines if line.strip()]
    out, lost = [], 0
    for b in range(0, len(kept), pack_lines):
        firsts, offset = [], 0
        for line in kept[b : b + pack_lines]:
            ids = tok(line, add_special_tokens=False)["input_ids"]
            seen = 0
            for k in range(1, len(ids) + 1):
                n = len(decode(ids[:k], skip_special_tokens=False).split())
                firsts += [offset + k - 1] * (n - seen)
                seen = n
            assert seen == len(line.split()), line  # the tokenizer is lossless on this text
            offset += len(ids) + 1  # + eos
        n_blocks = offset // seq_len
        if n_blocks == 0:
            lost += len(firsts)
            continue
        counts = [0] * n_blocks
        for pos in firsts:
            counts[min(pos // seq_len, n_blocks - 1)] += 1
        out += counts
    out[-1] += lost
    return np.array(out)


@pytest.mark.parametrize("pack_lines", [20_000, 3])
def test_block_word_counts_equal_a_decoding_loop_and_sum_to_the_corpus(tmp_path, tiny_tokenizer, monkeypatch,
                                                                        pack_lines):
    monkeypatch.setattr(dataset_mod, "PACK_BATCH_LINES", pack_lines)  # 3: several cut tails and a short last batch
    tok = load_tokenizer(tiny_tokenizer)
    lines = LINES * 5 + ["tail words"]
    files = [tmp_path / "a.train", tmp_path / "b.train"]
    files[0].write_text("\n".join(lines[:20]) + "\n")
    files[1].write_text("\n".join(lines[20:]) + "\n")
    blocks = load_blocks(files, tok, tokenizer_hash(tiny_tokenizer), 16, tmp_path / "cache", 1, True, "train")
    corpus_words = sum(len(f.read_text().split()) for f in files)  # BabyLM's count
    assert blocks.words.dtype == np.int64 and blocks.words.shape == (len(blocks),)
    assert int(blocks.words.sum()) == corpus_words
    np.testing.assert_array_equal(blocks.words, _reference_block_words(lines, tok, 16, pack_lines))
    assert np.array_equal(blocks[2:5].words, blocks.words[2:5])
    again = load_blocks(files, tok, tokenizer_hash(tiny_tokenizer), 16, tmp_path / "cache", 1, False, "train")
    assert np.array_equal(again.words, blocks.words)  # read back from <name>-<key>.words.npy


def test_an_old_cache_without_word_counts_is_rebuilt(tmp_path, tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    f = tmp_path / "a.train"
    f.write_text("\n".join(LINES * 3) + "\n")
    cache = tmp_path / "cache"
    first = load_blocks([f], tok, tokenizer_hash(tiny_tokenizer), 16, cache, 1, True, "train")
    (words_file,) = cache.glob("train-*.words.npy")
    words_file.unlink()
    again = load_blocks([f], tok, tokenizer_hash(tiny_tokenizer), 16, cache, 1, True, "train")
    assert np.array_equal(again.words, first.words) and words_file.is_file()


# ----------------------------------------------------------------------------- per-step sums

def test_word_counter_equals_a_loop_over_every_rank_and_any_world_size():
    n, gen = 53, torch.Generator().manual_seed(1)
    words = torch.randint(0, 40, (n,), generator=gen).numpy().astype(np.int64)
    two = [DistributedResumableSampler(n, 2, 3, 2, r, seed=5) for r in range(2)]
    one = DistributedResumableSampler(n, 2, 6, 1, 0, seed=5)
    counters = [WordCounter(words, s) for s in (two[0], two[1], one)]
    seen, per_step = 0, []
    for step in range(3 * two[0].steps_per_epoch + 2):  # into the 4th epoch
        ref = sum(int(words[i]) for s in two for mb in s.micro_batches(step) for i in mb)
        assert [c.step_words(step) for c in counters] == [ref] * 3, step
        seen += ref
        per_step.append(ref)
        assert counters[2].words_after(step + 1) == seen == counters[0].words_after(step + 1)
    cum = np.cumsum(per_step)
    for budget in (cum[0], cum[0] + 1, cum[5] - 1, cum[9], cum[-1] + 1000):
        expect = int(np.sum(cum <= budget))
        assert counters[0].last_step_within(int(budget), len(per_step)) == expect, budget
    with pytest.raises(ValueError, match="word counts for 53 blocks"):
        WordCounter(words[:10], one)


# ----------------------------------------------------------------------------- milestones and the budget key

def test_milestone_forms_names_and_errors():
    assert Milestones.parse("babylm").fixed == BABYLM_2025_MILESTONES
    assert BABYLM_2025_MILESTONES[:3] == (10**6, 2 * 10**6, 3 * 10**6) and BABYLM_2025_MILESTONES[9:12] == (
        10**7, 2 * 10**7, 3 * 10**7) and BABYLM_2025_MILESTONES[-1] == 10**8 and len(BABYLM_2025_MILESTONES) == 19
    assert Milestones.parse(["100k", 50000, "1.5M", "50k"]).fixed == (50_000, 100_000, 1_500_000)
    assert not Milestones.parse("none") and not Milestones.parse([])
    every = Milestones.parse("every 50k")
    assert every.crossed(0, 49_999) == [] and every.crossed(49_999, 150_000) == [50_000, 100_000, 150_000]
    assert Milestones.parse([10, 20, 30]).crossed(10, 29) == [20]
    assert [milestone_name(w) for w in (10**6, 20 * 10**6, 50_000, 1_500_000, 250)] == [
        "1M", "20M", "50k", "1500k", "250"]
    assert parse_word_count("100M", "f") == 10**8 and parse_word_count(7, "f") == 7
    for bad in ("ten", "0", "-5", "1.5", "2.5k5", True):
        with pytest.raises(ValueError, match="f="):
            parse_word_count(bad, "f")


@pytest.mark.parametrize("override, message", [
    ("checkpoint.milestones_words=every tenk", "checkpoint.milestones_words='tenk' is not a word count"),
    ("checkpoint.milestones_words=[1M, 0]", r"checkpoint.milestones_words\[1\]=0 must be a positive"),
    ("checkpoint.milestones_words={a: 1}", "is not allowed; give babylm, none"),
    ("train.max_words_seen=0", "train.max_words_seen=0 must be a positive number of words"),
    ("train.max_words_seen=lots", "train.max_words_seen='lots' is not a word count"),
])
def test_bad_word_settings_are_refused_when_the_recipe_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("demo-cpu", [override])
    assert load_recipe("demo-cpu", ["train.max_words_seen=100M"]).train.max_words_seen == "100M"


# ----------------------------------------------------------------------------- 2-rank CPU runs

def _tiny_blocks(tiny_tokenizer, data_cache):
    """(recipe, training blocks) of the tiny recipe, from the block cache the runs share."""
    from antlm_dist.data.corpus import find_corpus

    recipe = load_recipe("demo-cpu", tiny_args_for(tiny_tokenizer, data_cache))
    blocks = load_blocks(find_corpus("bundled").train, load_tokenizer(tiny_tokenizer), tokenizer_hash(tiny_tokenizer),
                         recipe.data.seq_len, data_cache, 1, True, "train")[: recipe.data.max_train_blocks]
    return recipe, blocks


def _next_clm_step_loss(folder: Path, step: int, tiny_tokenizer, data_cache) -> float:
    """Mean CLM loss (nats) of the exported weights on the global batch of optimizer step
    ``step + 1``, by Hugging Face ``LlamaForCausalLM``: what the trainer logs for that step."""
    from transformers import AutoModelForCausalLM

    recipe, blocks = _tiny_blocks(tiny_tokenizer, data_cache)
    t = recipe.train
    sampler = DistributedResumableSampler(len(blocks), t.micro_batch_size, t.gradient_accumulation_steps, 2, 0,
                                          t.seed)
    ids = blocks[sampler.global_batch_ids(step)]  # (G, T): step + 1 is 1-based, the sampler counts from 0
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].double()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def _words_per_step(tiny_tokenizer, data_cache, n_steps: int) -> list[int]:
    """Words of each global step of the tiny recipe, by a loop over both ranks' micro-batches
    of the block cache the runs share (the per-block counts are checked above)."""
    recipe, blocks = _tiny_blocks(tiny_tokenizer, data_cache)
    t = recipe.train
    samplers = [DistributedResumableSampler(len(blocks), t.micro_batch_size, t.gradient_accumulation_steps, 2, r,
                                            t.seed) for r in range(2)]
    return [sum(int(blocks.words[i]) for s in samplers for mb in s.micro_batches(step) for i in mb)
            for step in range(n_steps)]


def _words_seen(run: Path) -> dict[int, int]:
    return {r["step"]: r["words_seen"] for r in read_metrics(run / "metrics.jsonl", "train")}


def _hf_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, tiny_tokenizer, data_cache):
    """2 ranks, ZeRO-2, a word budget that ends the run after step 6 and three milestones:
    one reached exactly at step 2, two inside step 5."""
    per_step = _words_per_step(tiny_tokenizer, data_cache, 12)
    cum = np.cumsum(per_step).tolist()
    milestones = [cum[1], cum[3] + 1, cum[3] + 2]
    budget = cum[6] - 1  # step 7 would pass it
    out = tmp_path_factory.mktemp("words") / "run"
    settings = [f"checkpoint.milestones_words={milestones}", f"train.max_words_seen={budget}",
                "checkpoint.at_phase_switch=false", "eval.at_phase_end=false"]
    assert_ok(run_cli(["--output-dir", str(out), *tiny_args_for(tiny_tokenizer, data_cache), *settings]))
    return out, cum, milestones, settings


@pytest.mark.slow
def test_words_seen_milestones_and_the_budget_in_a_2_rank_run(budget_run):
    from transformers import AutoModelForCausalLM

    from antlm_dist.export import load_pretrained

    out, cum, milestones, _ = budget_run
    assert _words_seen(out) == {s: cum[s - 1] for s in range(1, 7)}  # the budget ended the run after step 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["words_seen"] == cum[5]
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert [(e["step"], e["reason"]) for e in evals] == [(6, "end")]
    assert (out / "checkpoints" / "latest").read_text() == "step00000006"
    state = json.loads((out / "checkpoints" / "step00000006" / "client_state.json").read_text())
    assert state["words_seen"] == cum[5]
    records = read_metrics(out / "metrics.jsonl", "milestone")
    assert [(r["step"], r["milestone"], r["words_seen"]) for r in records] == [
        (2, milestones[0], cum[1]), (5, milestones[1], cum[4]), (5, milestones[2], cum[4])]
    assert sorted(p.name for p in (out / "hf").iterdir()) == sorted(f"chck_{milestone_name(m)}" for m in milestones)
    ids = torch.tensor([[1, 40, 41, 42, 7, 300]])
    for record in records:
        folder = Path(record["path"])
        meta = json.loads((folder / "config.json").read_text())["antlm"]
        assert meta["words_seen"] == record["words_seen"] and meta["step"] == record["step"]
        ours, _ = load_pretrained(folder)
        hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours(ids, causal=True),
                                       rtol=1e-5, atol=1e-5)
    a, b = (_hf_state(Path(r["path"])) for r in records[:2])
    assert any(not torch.equal(a[k], b[k]) for k in a)  # step 2 and step 5 weights differ


def _check_step2_export(run: Path, milestone: int, tiny_tokenizer, data_cache) -> None:
    """The step-2 export holds exactly the weights the run trained step 3 with (a CLM step)."""
    logged = {r["step"]: r for r in read_metrics(run / "metrics.jsonl", "train")}[3]
    assert logged["phase"] == "CLM"
    got = _next_clm_step_loss(run / "hf" / f"chck_{milestone_name(milestone)}", 2, tiny_tokenizer, data_cache)
    assert got == pytest.approx(logged["loss"], rel=1e-5)


@pytest.mark.slow
def test_the_zero2_milestone_export_holds_the_trained_weights(budget_run, tiny_tokenizer, data_cache):
    out, _, milestones, _ = budget_run
    _check_step2_export(out, milestones[0], tiny_tokenizer, data_cache)


@pytest.mark.slow
def test_words_seen_survives_a_resume_at_another_world_size_under_zero3(budget_run, tmp_path, tiny_tokenizer,
                                                                         data_cache):
    """2 ranks to step 3, then 1 rank (accumulation 4: the same global batch) to the budget,
    under ZeRO-3: every step's words_seen and each milestone export equal the run above."""
    ref, cum, milestones, settings = budget_run
    out = tmp_path / "run"
    base = ["--output-dir", str(out), *tiny_args_for(tiny_tokenizer, data_cache), *settings,
            "distributed.deepspeed_config=zero3.json"]
    assert_ok(run_cli(base + ["train.stop_at_step=3"]))
    one = run_cli(base + ["--resume", "--nproc-per-node", "1", "train.gradient_accumulation_steps=4"],
                  env={"MASTER_PORT": str(free_port())})  # one rank starts no launcher: not the shared default port
    assert_ok(one)
    assert "written by 2 ranks, this run has 1" in one.stderr
    assert _words_seen(out) == _words_seen(ref)
    assert json.loads((out / "summary.json").read_text())["words_seen"] == cum[5]
    for m in milestones:
        name = f"chck_{milestone_name(m)}"
        got, want = _hf_state(out / "hf" / name), _hf_state(ref / "hf" / name)
        assert json.loads((out / "hf" / name / "config.json").read_text())["antlm"]["words_seen"] == \
            json.loads((ref / "hf" / name / "config.json").read_text())["antlm"]["words_seen"]
        assert sorted(got) == sorted(want) and all(got[k].shape == want[k].shape for k in want)
    _check_step2_export(out, milestones[0], tiny_tokenizer, data_cache)  # gathered from the ZeRO-3 shards


def test_antlm_train_refuses_a_bad_milestone_before_writing_anything(tmp_path, capsys, tiny_args, monkeypatch):
    from antlm_dist.cli import train_main

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "o"
    code = train_main(["--output-dir", str(out), *tiny_args, "checkpoint.milestones_words=[1M, 2.5]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "checkpoint.milestones_words[1]=2.5 is not a whole number of words" in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_milestone_exports_leave_the_training_random_stream_alone(tmp_path, data_cache, wordpiece):
    """LTG-BERT trains with dropout drawn from torch's global generator, and a milestone export
    builds an HF model (a random initialisation) in rank 0's process: a 2-rank run with three
    milestones gives exactly the losses of the same run without any."""
    common = ["--config", "ltg-bert-demo-cpu", *TINY, "objective.schedule=1_CLM+1_MLM", f"tokenizer.path={wordpiece}",
              f"data.cache_dir={data_cache}", "checkpoint.at_phase_switch=false", "eval.at_phase_end=false"]
    losses = {}
    for name, milestones in (("none", "none"), ("three", "[500, 1000, 1500]")):
        out = tmp_path / name
        assert_ok(run_cli(["--output-dir", str(out), *common, f"checkpoint.milestones_words={milestones}"]))
        losses[name] = read_metrics(out / "metrics.jsonl", "train")
    exported = sorted(p.name for p in (tmp_path / "three" / "hf").iterdir())
    assert exported == ["chck_1500", "chck_1k", "chck_500"], exported
    assert not (tmp_path / "none" / "hf").exists()
    first = read_metrics(tmp_path / "three" / "metrics.jsonl", "milestone")[0]["step"]
    assert first < len(losses["none"]) - 2  # steps after a milestone are compared
    assert [r["loss"] for r in losses["three"]] == [r["loss"] for r in losses["none"]]
