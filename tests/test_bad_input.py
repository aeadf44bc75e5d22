"""Every bad input stops antlm-train before any rank starts, naming the field and the fix."""
import json

import pytest

from antlm_dist.cli import train_main
from antlm_dist.config import ConfigError, load_recipe


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def _fails(capsys, argv, *needles):
    code = train_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def test_missing_corpus(tmp_path, capsys, tiny_args):
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"data.corpus={tmp_path}/nope"],
           "data.corpus", "does not exist")


def test_corpus_without_train_files(tmp_path, capsys, tiny_args):
    (tmp_path / "c").mkdir()
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"data.corpus={tmp_path}/c"],
           "data.corpus", "no *.train files")


def test_empty_corpus_file(tmp_path, capsys, tiny_args):
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "train" / "a.train").write_text("\n\n")
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"data.corpus={tmp_path}/c"],
           "a.train is empty")


def test_non_utf8_corpus(tmp_path, capsys, tiny_args):
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "train" / "a.train").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"data.corpus={tmp_path}/c"],
           "a.train is not UTF-8", "offset 3", "iconv")


@pytest.mark.parametrize("schedule,needle", [
    ("4_CLX", "CLX"), ("0_MLM", "at least 1 epoch"), ("4CLM", "malformed"),
    ("1_CLM+2_CLM:MNTP=2:30", "lowest terms (1:15)"), ("2_CLM:MNTP", "needs its ratio"),
    ("2_CLM@0.3", "needs a masked objective"), ("2_MNTP@0.3..1.2", "must lie in (0, 1)"),
])
def test_malformed_schedule(tmp_path, capsys, tiny_args, schedule, needle):
    err = _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"objective.schedule={schedule}"],
                 "objective.schedule", needle)
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_mask_rate_end_out_of_range(tmp_path, capsys, tiny_args):
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, "objective.mask_rate_end=1.5"],
           "objective.mask_rate_end=1.5", "(0, 1)")
    assert not (tmp_path / "o").exists()


def test_seq_len_beyond_positions(tmp_path, capsys, tiny_args):
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, "data.seq_len=128"],
           "data.seq_len=128", "model.max_position_embeddings=64")


def test_deepspeed_config_contradicting_batch_sizes(tmp_path, capsys, tiny_args):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"distributed.deepspeed_config={cfg}"],
           "train_micro_batch_size_per_gpu=8", "train.micro_batch_size = 4", str(cfg))
    cfg.write_text(json.dumps({"train_batch_size": 100}))
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"distributed.deepspeed_config={cfg}"],
           "train_batch_size=100", "world size 2")


def test_tokenizer_vocab_mismatch(tmp_path, capsys, tiny_args):
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, "model.vocab_size=600"],
           "has 512 tokens but model.vocab_size=600", "set model.vocab_size=512")


def test_output_dir_holding_another_run(tmp_path, capsys, tiny_args):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    _fails(capsys, ["--output-dir", str(out), *tiny_args], "already holds a run", "--resume", "--overwrite")
    _fails(capsys, ["--output-dir", str(tmp_path / "fresh"), "--resume", *tiny_args], "start without --resume")


def test_unknown_key_and_wrong_type():
    with pytest.raises(ConfigError, match=r"train.lrr is not a known field.*lr"):
        load_recipe("demo-cpu", ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: expected an integer"):
        load_recipe("demo-cpu", ["train.micro_batch_size=big"])
    with pytest.raises(ConfigError, match=r"no shipped recipe.*demo-cpu"):
        load_recipe("no-such-recipe")
    with pytest.raises(ConfigError, match="mlm_probability"):
        load_recipe("demo-cpu", ["objective.mlm_probability=1.5"])


def test_abandoned_build_lock_is_reported_not_waited_on(tmp_path, capsys, tiny_args, monkeypatch):
    """A torch-extension build lock left by a killed rank would make torch's FileBaton wait
    forever; antlm-train names the file and the fix instead. A fresh lock (a build running
    now) is left alone."""
    import os
    import time

    from torch.utils.file_baton import FileBaton

    from antlm_dist.distributed import check_build_locks

    root = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    lock = root / "deepspeed_shm_comm" / "lock"  # torch's layout under $TORCH_EXTENSIONS_DIR
    lock.parent.mkdir(parents=True)
    lock.touch()
    assert not FileBaton(str(lock)).try_acquire()  # what a build would do: wait for the file to go
    check_build_locks()  # just created: a build may be running
    old = time.time() - 1200
    os.utime(lock, (old, old))
    err = _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args], str(lock), "rm ", "20 minutes")
    assert "deepspeed_shm_comm" in err and not (tmp_path / "o").exists()
    lock.unlink()
    check_build_locks()


# ----------------------------------------------------------------------------- kernel backends at preflight

def _no_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine Triton can run; this checks a CPU-only machine")


@pytest.mark.parametrize("field,fix", [("model.attention", "model.attention=sdpa"), ("model.loss", "model.loss=torch")])
def test_triton_backend_where_triton_cannot_run_stops_at_preflight(tmp_path, capsys, tiny_args, monkeypatch,
                                                                   field, fix):
    _no_cuda()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no interpreter: Triton cannot run on this CPU
    err = _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"{field}=triton"],
                 f"{field}=triton cannot run here", fix)
    assert not (tmp_path / "o").exists()  # stopped before any rank wrote anything
    assert "CUDA" in err


def test_unsupported_head_dim_for_triton_attention_stops_at_preflight(tmp_path, capsys, tiny_args, monkeypatch):
    from antlm_dist.kernels.backend import triton_available

    if not triton_available():
        pytest.skip("without triton the backend error comes first")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton could run (interpreter): only the head dim is wrong
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, "model.attention=triton",
                    "model.hidden_size=48", "model.num_attention_heads=2"],
           "model.attention=triton supports head dims 16, 32, 64, 128", "= 24", "model.attention=sdpa")


def test_backend_resolver_choices_on_cpu(monkeypatch):
    import torch

    from antlm_dist.kernels.backend import BackendError, KernelBackends, resolve_backends

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.device("cpu")
    assert resolve_backends("auto", "auto", cpu, head_dim=32) == KernelBackends("sdpa", "torch")
    assert resolve_backends("eager", "torch", cpu, head_dim=24) == KernelBackends("eager", "torch")
    with pytest.raises(BackendError, match="model.attention=triton is not available for model.arch=ltg_bert"):
        resolve_backends("triton", "torch", cpu, head_dim=32, triton_attention=False, arch="ltg_bert")
    with pytest.raises(BackendError, match="model.loss='cuda' is not known"):
        resolve_backends("auto", "cuda", cpu, head_dim=32)


# ----------------------------------------------------------------------------- refused at preflight, item 7 of issue 16

def _words_corpus(root, n_lines):
    """A corpus folder whose train file holds ``n_lines`` different lines of plain English."""
    words = "the cat sat on a mat while it rained over old hills and quiet rivers".split()
    lines = [" ".join(words[(i + j) % len(words)] for j in range(8)) for i in range(n_lines)]
    (root / "train").mkdir(parents=True)
    (root / "train" / "a.train").write_text("\n".join(lines) + "\n")
    return lines


def test_corpus_shorter_than_one_block(tmp_path, capsys, tiny_args):
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "train" / "a.train").write_text("hello world\n")
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"data.corpus={tmp_path}/c"],
           "data.corpus", "shorter than one block of data.seq_len=32 tokens", "lower data.seq_len")
    assert not (tmp_path / "o").exists()


def test_training_set_smaller_than_one_global_batch(tmp_path, capsys, tiny_args, tiny_tokenizer):
    from antlm_dist.data.tokenizer import load_tokenizer

    lines = _words_corpus(tmp_path / "c", 25)
    # independent count: the tokenizer on every line plus </s>, cut into 32-token blocks
    tok = load_tokenizer(tiny_tokenizer)
    expected = sum(len(ids) + 1 for ids in tok(lines, add_special_tokens=False)["input_ids"]) // 32
    assert 0 < expected < 16
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"data.corpus={tmp_path}/c"],
           f"gives exactly {expected} training blocks", "one global batch of 16 sequences",
           "train.micro_batch_size 4", "world size 2")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override,needles", [
    ("train.lr=nan", ("train.lr=nan", "finite")),
    ("distributed.timeout_minutes=nan", ("distributed.timeout_minutes=nan", "finite")),
    ("model.num_key_value_heads=-1", ("model.num_key_value_heads=-1", "> 0")),
    ("train.adam_beta1=1.5", ("train.adam_beta1=1.5", "[0, 1)", "0.9")),
])
def test_out_of_range_numbers(tmp_path, capsys, tiny_args, override, needles):
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, override], *needles)
    assert not (tmp_path / "o").exists()


def test_zero_stage_that_does_not_exist(tmp_path, capsys, tiny_args):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), *tiny_args, f"distributed.deepspeed_config={cfg}"],
           str(cfg), "zero_optimization.stage=7", "0, 1, 2 and 3")
    assert not (tmp_path / "o").exists()


def test_zero_local_ranks(tmp_path, capsys, tiny_args):
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), "--nproc-per-node", "0", *tiny_args],
           "--nproc-per-node 0", "at least 1")
    assert not (tmp_path / "o").exists()


def test_block_count_matches_the_packing_and_the_bound_holds(tmp_path, tiny_tokenizer):
    """The preflight's exact count equals the number of blocks the datasets packing builds,
    and the byte bound is never below it."""
    from antlm_dist.data.block_count import block_upper_bound, exact_block_count
    from antlm_dist.data.dataset import blocks_array, build_packed_dataset
    from antlm_dist.data.tokenizer import load_tokenizer

    _words_corpus(tmp_path / "c", 300)
    (tmp_path / "c" / "train" / "b.train").write_text("caf\u00e9 \ufb01ne\n\n  \nna\u00efve r\u00e9sum\u00e9\n" * 30)
    files = sorted((tmp_path / "c" / "train").glob("*.train"))
    tok = load_tokenizer(tiny_tokenizer)
    backend = tok.backend_tokenizer
    count = exact_block_count(files, 32, lambda ls: [e.ids for e in backend.encode_batch(ls, add_special_tokens=False)])
    packed = blocks_array(build_packed_dataset(files, tok, 32, tmp_path / "hf", num_proc=1))
    assert count == packed.shape[0] > 0
    assert block_upper_bound(files, 32) >= count


def test_contradicting_run_folder_options(tmp_path, capsys, tiny_args):
    _fails(capsys, ["--output-dir", str(tmp_path / "o"), "--resume", "--overwrite", *tiny_args],
           "--resume and --overwrite contradict each other")
    (tmp_path / "f").write_text("")
    _fails(capsys, ["--output-dir", str(tmp_path / "f"), *tiny_args], "is a file; give a folder")
    assert not (tmp_path / "o").exists() and (tmp_path / "f").read_text() == ""
