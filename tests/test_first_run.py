"""What a new user meets first: fast command lines, --print-config and --dry-run, a corpus of
their own, a tokenizer that gives back the text it was given, honest CPU MFU, and the
rough edges around the run folder and the export.

References: the modules that a command has imported (``sys.modules`` in a fresh process),
YAML and JSON read back from the printed text, values computed here from the recipe, the
input strings themselves, and numbers injected into the peak measurement.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from antlm_testutil import REPO, TINY, assert_ok, run_cli

HEAVY = ("torch", "deepspeed", "transformers", "triton", "datasets")


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(REPO))


# ----------------------------------------------------------------------------- fast command lines

def test_help_and_recipe_errors_import_no_torch(tmp_path):
    """--help of every command, a recipe error and a broken DeepSpeed JSON (syntax, ZeRO
    stage, a batch size against the recipe) answer before torch (or DeepSpeed,
    transformers, Triton, datasets) is imported."""
    broken = {"syntax": '{"zero_optimization": {"stage": 2}', "stage": '{"zero_optimization": {"stage": 7}}',
              "batch": '{"train_micro_batch_size_per_gpu": 3}'}
    for name, text in broken.items():
        (tmp_path / f"{name}.json").write_text(text)
    code = f"""
import contextlib, io, json, sys
from antlm_dist import cli
out = {{}}
for name in ("train_main", "export_main", "eval_main", "bench_main", "study_main"):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            getattr(cli, name)(["--help"])
        except SystemExit as exc:
            out[name] = [exc.code, "usage:" in buf.getvalue()]
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = cli.train_main(["--output-dir", "/nonexistent-parent/run", "train.lr=-1"])
out["bad_recipe"] = [code, err.getvalue()]
for name in {sorted(broken)!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.train_main(["--output-dir", {str(tmp_path / "run")!r}, "--config", "demo-cpu",
                               "distributed.deepspeed_config=" + {str(tmp_path)!r} + "/" + name + ".json"])
    out["bad_json_" + name] = [code, err.getvalue()]
out["heavy"] = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps(out))
"""
    proc = _fresh_python(code)
    assert_ok(proc)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("train_main", "export_main", "eval_main", "bench_main", "study_main"):
        assert out[name] == [0, True], name
    code, err = out["bad_recipe"]
    assert code == 2 and err.strip() == "antlm-train: error: train.lr=-1.0 must be > 0"
    for name, expected in (("syntax", "syntax.json is not valid JSON: Expecting ',' delimiter"),
                           ("stage", "stage.json sets zero_optimization.stage=7; ZeRO stages are 0, 1, 2 and 3"),
                           ("batch", "batch.json sets train_micro_batch_size_per_gpu=3 but demo-cpu gives "
                                     "train.micro_batch_size = 16")):
        code, err = out[f"bad_json_{name}"]
        assert code == 2 and expected in err and "Traceback" not in err, (name, err)
    assert out["heavy"] == []
    assert not (tmp_path / "run").exists()
    assert not Path("/nonexistent-parent").exists()


def test_print_config_prints_the_resolved_recipe_and_deepspeed_json(tmp_path, capsys, monkeypatch):
    from antlm_dist.cli import train_main

    monkeypatch.chdir(tmp_path)
    assert train_main(["--config", "demo-cpu", "--print-config", "train.lr=1e-3", "train.micro_batch_size=8",
                       "train.gradient_accumulation_steps=3"]) == 0
    text = capsys.readouterr().out
    recipe_text, ds_text = text.split("# DeepSpeed config", 1)
    recipe = yaml.safe_load(recipe_text)
    ds = json.loads(ds_text.split("\n", 1)[1])
    demo = yaml.safe_load((REPO / "recipes" / "demo-cpu.yaml").read_text())
    assert recipe["train"]["lr"] == 1e-3 and recipe["train"]["micro_batch_size"] == 8
    assert recipe["model"] == {**recipe["model"], **demo["model"]}  # the YAML's values, the defaults beside them
    assert recipe["tokenizer"]["normalization"] == "nfkc" and recipe["tokenizer"]["add_prefix_space"] is True
    world = demo["distributed"]["nproc_per_node"]
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * world
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False
    assert list(tmp_path.iterdir()) == []  # nothing written


def _babylm_2024_corpus(root: Path, n_train: int = 600, n_dev: int = 80) -> Path:
    """A small corpus in the BabyLM 2024 layout: babylm_10M/*.train and babylm_dev/*.dev,
    lines of words drawn from a 150-word vocabulary (so its BPE stays far below 4,096)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnoprstuw") for _ in range(rng.randint(2, 7))) for _ in range(150)]

    def lines(n):
        return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))) for _ in range(n)) + "\n"

    (root / "babylm_10M").mkdir(parents=True)
    (root / "babylm_dev").mkdir()
    (root / "babylm_10M" / "childes.train").write_text(lines(n_train // 2))
    (root / "babylm_10M" / "wikipedia.train").write_text(lines(n_train - n_train // 2))
    (root / "babylm_dev" / "childes.dev").write_text(lines(n_dev))
    return root


def test_dry_run_fits_the_vocabulary_to_a_small_corpus(tmp_path, capsys):
    from antlm_dist.cli import train_main
    from antlm_dist.data.tokenizer import load_tokenizer

    corpus = _babylm_2024_corpus(tmp_path / "babylm")
    out = tmp_path / "run"
    assert train_main(["--config", "demo-cpu", "--output-dir", str(out), "--dry-run", f"data.corpus={corpus}",
                       "data.num_proc=1"]) == 0
    printed = capsys.readouterr().out
    n = len(load_tokenizer(out / "tokenizer"))
    assert 261 <= n < 4096  # every byte and the 5 special tokens, far from the 4,096 asked for
    assert f"dry run: vocabulary {n} tokens" in printed
    assert {p.name.split("-")[0] for p in (out / "cache").glob("*.npy")} == {"dev", "train"}  # blocks (and word counts)
    assert not any((out / m).exists() for m in ("run.json", "metrics.jsonl", "checkpoints", "recipe.yaml"))


def test_fit_vocab_size_shrinks_only_a_trained_tokenizer():
    from antlm_dist.config import load_recipe
    from antlm_dist.data.pipeline import fit_vocab_size

    r = load_recipe("demo-cpu", ["tokenizer.vocab_size=4096"])
    assert fit_vocab_size(r, 2619) and r.model.vocab_size == 2619 and r.tokenizer.vocab_size == 2619
    assert not fit_vocab_size(r, 2619) and not fit_vocab_size(r, 3000)  # equal or larger: nothing to fit
    given = load_recipe("demo-cpu", ["tokenizer.path=/some/tokenizer.json"])
    assert not fit_vocab_size(given, 100) and given.model.vocab_size == 4096


def test_a_new_output_dir_under_a_missing_parent_is_announced(tmp_path):
    parent = tmp_path / "not" / "there"
    proc = _fresh_python(f"""
import sys
from antlm_dist.cli import train_main
sys.exit(train_main(["--output-dir", {str(parent / 'run')!r}, "--dry-run", "data.corpus={tmp_path / 'none'}"]))
""")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == f"antlm-train: note: {parent} does not exist; it is created for --output-dir"
    assert proc.stderr.splitlines()[1].startswith("antlm-train: error: data.corpus=")
    assert not parent.exists()


@pytest.mark.slow
def test_a_small_babylm_2024_corpus_trains_with_demo_cpu(tmp_path):
    """The acceptance run: --config demo-cpu and the corpus, no other setting: the model is
    fitted to the small tokenizer, recorded in recipe.yaml, and the run completes."""
    from antlm_dist.data.tokenizer import load_tokenizer
    from antlm_dist.metrics import read_metrics

    corpus = _babylm_2024_corpus(tmp_path / "babylm")
    out = tmp_path / "run"
    proc = run_cli(["--config", "demo-cpu", "--output-dir", str(out), f"data.corpus={corpus}"])
    assert_ok(proc)
    n = len(load_tokenizer(out / "tokenizer"))
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model"]["vocab_size"] == n < 4096
    assert f"model.vocab_size={n}, recorded in recipe.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert read_metrics(out / "metrics.jsonl", "summary")


# ----------------------------------------------------------------------------- tokenizer round trip

ROUND_TRIP = [
    "Plain ASCII text.",
    "spaces before punctuation , . ? ! and 's n't ' \" (",
    "日本語のテキストと中文字符",
    "emoji 👩‍👩‍👧 and 🎉🎉",
    "para\u2029graph and line\u2028separator",
    "combining e\u0301 and precomposed é; Hangul \u1100\u1161",
    "ﬁ ligature, subscript ₉, full-width Ｆｕｌｌ",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple    inner  spaces",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttab\tseparated\r\nCRLF",
    "",
    " ",
]


@pytest.fixture(scope="module")
def default_tokenizer(tmp_path_factory):
    """A BPE trained with the recipe's default tokenizer settings, loaded as the trainer loads it."""
    from antlm_dist.config import TokenizerConfig
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    t = TokenizerConfig()
    raw = train_tokenizer(find_corpus("bundled").train[:1], 400, t.min_frequency, t.kind, t.normalization,
                          t.add_prefix_space)
    return load_tokenizer(save_tokenizer(raw, tmp_path_factory.mktemp("tok"), t.kind), t.kind)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_default_tokenizer_round_trips_any_text(default_tokenizer, text):
    ids = default_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert default_tokenizer.unk_token_id not in ids
    assert default_tokenizer.decode(ids) == text


def test_nfkc_and_prefix_space_are_recipe_choices(tmp_path):
    """The paper's settings, when a recipe asks for them, change the text as documented."""
    from antlm_dist.config import load_recipe
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    raw = train_tokenizer(find_corpus("bundled").train[:1], 400, 2, "bpe", "nfkc", True)
    tok = load_tokenizer(save_tokenizer(raw, tmp_path, "bpe"))
    assert tok.decode(tok("ﬁ ₉ Ｆ", add_special_tokens=False)["input_ids"]) == " fi 9 F"
    for name in ("demo-cpu", "babyllama-58m-antlm", "babyllama-58m-clm", "study-cpu"):
        t = load_recipe(name).tokenizer
        assert (t.normalization, t.add_prefix_space) == ("nfkc", True), name
    for name in ("ltg-bert-demo-cpu", "ltg-bert-base-antlm", "ltg-bert-base-mlm"):
        t = load_recipe(name).tokenizer
        assert (t.kind, t.normalization, t.add_prefix_space) == ("wordpiece", "nfkc", False), name


def test_tokenizer_setting_errors_name_the_field():
    from antlm_dist.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=r"tokenizer.normalization='nfc' is not allowed; use one of: none, nfkc"):
        load_recipe("demo-cpu", ["tokenizer.normalization=nfc"])
    with pytest.raises(ConfigError, match="tokenizer.add_prefix_space applies to tokenizer.kind=bpe only"):
        load_recipe("ltg-bert-demo-cpu", ["tokenizer.add_prefix_space=true"])


# ----------------------------------------------------------------------------- MFU on CPU

def test_cpu_peak_uses_every_core_and_is_shared_by_the_node_ranks(monkeypatch):
    import torch

    from antlm_dist.telemetry import flops

    seen = []
    real_mm = torch.mm

    def mm(a, b):
        seen.append(torch.get_num_threads())
        return real_mm(a, b)

    before_threads, before_rng = torch.get_num_threads(), torch.get_rng_state()
    monkeypatch.setattr(torch, "mm", mm)
    measured = flops.measure_matmul_flops("cpu", n=64, repeats=2)
    monkeypatch.setattr(torch, "mm", real_mm)
    assert measured > 0 and seen == [os.cpu_count()] * 3  # warm-up + 2 timed, all on every core
    assert torch.get_num_threads() == before_threads and torch.equal(torch.get_rng_state(), before_rng)

    monkeypatch.setattr(flops, "measure_matmul_flops", lambda dev, dtype, n: 6.0e10)
    peak, source = flops.peak_flops_per_device("cpu", "fp32", devices_sharing=2)
    assert peak == 3.0e10
    assert source == f"measured 2048x2048 fp32 matmul on all {os.cpu_count()} cores, shared by 2 ranks"


def test_bench_warns_when_step_times_spread_widely():
    from antlm_dist.bench.cli import noisy_ratio_notes

    def rec(p10, median, p90):
        return {"config": "demo-cpu", "phase": "CLM", "label": "ours", "micro_batch": 8,
                "step_time_s": {"p10": p10, "median": median, "p90": p90}}

    notes = noisy_ratio_notes([rec(0.91, 1.0, 1.09), rec(0.8, 1.0, 1.25)], steps=3)
    assert len(notes) == 1  # 18% is within the 20% limit, 45% is over it
    assert notes[0].startswith("demo-cpu CLM ours mb 8: step times spread 45% of the median (p10-p90) over 3")


# ----------------------------------------------------------------------------- export file modes

def test_exported_files_follow_the_umask(tmp_path, tiny_tokenizer):
    from antlm_dist.config import load_recipe
    from antlm_dist.export import write_hf_folder
    from antlm_dist.model import build_model

    recipe = load_recipe("demo-cpu", TINY)
    state = {k: v.float() for k, v in build_model(recipe.model).state_dict().items()}
    old = os.umask(0o022)
    try:
        out = write_hf_folder(tmp_path / "hf", recipe, state, tiny_tokenizer.parent, {})
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_export_and_hf_loading_work_without_accelerate(tmp_path, tiny_tokenizer):
    """``accelerate`` is no dependency: the export, transformers' loading and ours run with
    every import of it refused."""
    code = f"""
import sys
sys.modules["accelerate"] = None  # any import of accelerate now raises ImportError
import torch
from transformers import LlamaForCausalLM
from antlm_dist.config import load_recipe
from antlm_dist.export import load_pretrained, write_hf_folder
from antlm_dist.model import build_model
recipe = load_recipe("demo-cpu", {TINY!r})
state = {{k: v.float() for k, v in build_model(recipe.model).state_dict().items()}}
out = write_hf_folder({str(tmp_path / 'hf')!r}, recipe, state, {str(tiny_tokenizer.parent)!r}, {{}})
ids = torch.tensor([[1, 7, 9, 11]])
hf = LlamaForCausalLM.from_pretrained(out).eval()
ours, _ = load_pretrained(out)
with torch.no_grad():
    print((hf(ids).logits - ours(ids, causal=True)).abs().max().item())
"""
    proc = _fresh_python(code)
    assert_ok(proc)
    assert float(proc.stdout.strip().splitlines()[-1]) <= 1e-5


# ----------------------------------------------------------------------------- metrics.jsonl and keep_last

def test_checkpoints_removed_by_keep_last_are_recorded(tmp_path):
    """Every ``checkpoint`` record whose folder keep_last removed is followed by a
    ``checkpoint_deleted`` record for it; the folders left are exactly the unannounced ones."""
    from antlm_dist.config import load_recipe
    from antlm_dist.metrics import MetricsWriter, read_metrics
    from antlm_dist.run_folder import RunFolder
    from antlm_dist.trainer import Trainer

    class Engine:  # writes a tag folder as DeepSpeed's save_checkpoint does
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            (Path(save_dir) / tag).mkdir(parents=True)

    trainer = object.__new__(Trainer)  # only what save() reads
    trainer.recipe = load_recipe("demo-cpu", ["checkpoint.keep_last=2"])
    trainer.run, trainer.engine = RunFolder(tmp_path), Engine()
    trainer.metrics = MetricsWriter(tmp_path / "metrics.jsonl", enabled=True)
    trainer.client_state = lambda step: {"step": step}
    trainer.ds_config, trainer.words_seen = {"zero_optimization": {"stage": 0}}, 0
    for step in (4, 8, 12, 16):
        trainer.save(step)
    trainer.metrics.close()
    saved = [r["path"] for r in read_metrics(tmp_path / "metrics.jsonl", "checkpoint")]
    deleted = read_metrics(tmp_path / "metrics.jsonl", "checkpoint_deleted")
    on_disk = sorted(str(p) for p in (tmp_path / "checkpoints").glob("step*"))
    assert [(r["step"], Path(r["path"]).name) for r in deleted] == [(12, "step00000004"), (16, "step00000008")]
    assert sorted(set(saved) - {r["path"] for r in deleted}) == on_disk == saved[2:]
    assert all(r["reason"] == "checkpoint.keep_last=2" for r in deleted)
