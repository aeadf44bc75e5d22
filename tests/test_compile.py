"""``train.compile`` and the single-rank ZeRO stage (:mod:`antlm_dist.speedups`).

The compiled blocks are checked against the eager model itself (the reference): the same
weights, forward and backward in float64-free fp32, both attention modes, with and without
padding; then whole 2-rank training runs, compiled against eager, under ZeRO-0 and ZeRO-2.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from antlm_dist.config import ConfigError, ModelConfig, load_recipe
from antlm_dist.model import build_model
from antlm_dist.speedups import compile_layers, cxx_compiler, resolve_compile, single_rank_ds_config

from antlm_testutil import REPO, assert_ok, run_cli, tiny_args_for, train_losses

needs_cxx = pytest.mark.skipif(cxx_compiler() is None, reason="TorchInductor on CPU needs a C++ compiler")
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- decisions

def test_auto_compiles_on_cuda_only_and_never_under_zero3():
    recipe = load_recipe("demo-cpu")
    assert resolve_compile(recipe, CPU, 2)[0] is False  # demo-cpu keeps its recorded eager losses
    assert resolve_compile(recipe, torch.device("cuda"), 2) == (True, "auto: compiled on cuda")
    assert resolve_compile(recipe, torch.device("cuda"), 3)[0] is False
    on = load_recipe("demo-cpu", ["train.compile=true"])
    assert resolve_compile(on, torch.device("cuda"), 1)[0] is True
    assert resolve_compile(load_recipe("demo-cpu", ["train.compile=false"]), torch.device("cuda"), 2)[0] is False
    with pytest.raises(ConfigError, match="not supported under ZeRO-3.*train.compile=false"):
        resolve_compile(on, torch.device("cuda"), 3)
    with pytest.raises(ConfigError, match="train.compile: .yes please. is not a bool"):
        load_recipe("demo-cpu", ["train.compile=yes please"])


def test_compile_on_cpu_without_a_cxx_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    assert cxx_compiler() is None
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler.*apt-get install g\+\+"):
        resolve_compile(load_recipe("demo-cpu", ["train.compile=true"]), CPU, 2)


def test_one_rank_runs_zero0_unless_offloading_or_asked_not_to():
    recipe = load_recipe("demo-cpu")
    zero2 = {"train_batch_size": 16, "zero_optimization": {"stage": 2, "overlap_comm": True}}
    cfg, note = single_rank_ds_config(zero2, 1, recipe)
    assert cfg["zero_optimization"] == {"stage": 0} and cfg["train_batch_size"] == 16
    assert "ZeRO stage 0 instead of the JSON's stage 2" in note
    assert zero2["zero_optimization"]["stage"] == 2  # the given config is not modified
    assert single_rank_ds_config(zero2, 2, recipe) == (zero2, None)
    keep = load_recipe("demo-cpu", ["distributed.single_rank_zero0=false"])
    assert single_rank_ds_config(zero2, 1, keep) == (zero2, None)
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert single_rank_ds_config(offload, 1, recipe) == (offload, None)
    no_offload = {"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}
    assert single_rank_ds_config(no_offload, 1, recipe)[0]["zero_optimization"] == {"stage": 0}


def test_optimizer_partitions_by_deepspeed_file_names(tmp_path):
    """Which checkpoints load into a ZeRO engine (``zero``), which the universal converter
    takes (``zero``, ``bf16``) and which only a ZeRO-0 engine of the same world size reads."""
    from antlm_dist.checkpoint import optimizer_partitions

    for tag, files, kind in (("a", ["zero_pp_rank_0_mp_rank_00_optim_states.pt"], "zero"),
                             ("b", ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"], "bf16"),
                             ("c", ["mp_rank_00_model_states.pt"], None)):
        (tmp_path / tag).mkdir()
        for name in files + ["mp_rank_00_model_states.pt"]:
            (tmp_path / tag / name).touch()
        assert optimizer_partitions(tmp_path, tag) == kind, tag


def test_preflight_refuses_compile_under_zero3_before_writing(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["--output-dir", str(out), "--nproc-per-node", "2", "distributed.deepspeed_config=zero3.json",
                    "train.compile=true"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.compile=true is not supported under ZeRO-3" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


# ----------------------------------------------------------------------------- numerics

def _pair(**kw):
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention="sdpa", loss="torch", **kw)
    torch.manual_seed(0)
    eager = build_model(cfg, device=CPU)
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == 2
    return eager, compiled


@needs_cxx
def test_compiled_blocks_match_eager_forward_and_backward():
    """Loss and every gradient within 1e-5 relative (fp32), both modes, with and without
    a padding mask; the parameter names (hence checkpoints) are unchanged."""
    eager, compiled = _pair()
    assert list(eager.state_dict()) == list(compiled.state_dict())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 97, (3, 24), generator=gen)
    labels = ids.masked_fill(torch.rand(3, 24, generator=gen) < 0.5, -100)
    padded = torch.ones(3, 24, dtype=torch.long)
    padded[1, 17:] = 0
    for causal, mask in ((True, None), (False, None), (False, padded), (True, None)):
        outs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            res = model(ids, mask, labels, causal=causal)
            res.loss_sum.backward()
            outs.append((res.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (ref_loss, ref_grads), (loss, grads) = outs
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=f"{name} causal={causal}")


# ----------------------------------------------------------------------------- training runs

STEPS = 51  # 17 CLM, 17 MLM, 17 CLM steps: both modes, a switch each way, past the first 50 steps


@pytest.fixture(scope="module")
def zero0_json(tmp_path_factory):
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    cfg["zero_optimization"] = {"stage": 0}
    path = tmp_path_factory.mktemp("ds") / "zero0.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("ds_config", ["zero0", "zero2.json"])
def test_compiled_training_losses_equal_eager(tmp_path, tiny_tokenizer, data_cache, zero0_json, ds_config):
    """2 ranks, fp32, demo-cpu's model (hidden 128, 4 layers, 4 heads) with the tiny tokenizer:
    the per-step losses of a compiled run equal the eager run's within 1e-5 relative over
    all 51 steps (CLM, MLM, CLM): the bar for turning compilation on by default."""
    ds = str(zero0_json) if ds_config == "zero0" else ds_config
    base = ["--config", "demo-cpu", "--nproc-per-node", "2", *tiny_args_for(tiny_tokenizer, data_cache),
            "model.hidden_size=128", "model.intermediate_size=256", "model.num_hidden_layers=4",
            "model.num_attention_heads=4", "model.max_position_embeddings=128", "data.seq_len=128",
            "data.max_train_blocks=272", "train.micro_batch_size=8", "train.gradient_accumulation_steps=1",
            "train.precision=fp32", f"distributed.deepspeed_config={ds}", "checkpoint.at_phase_switch=false",
            "eval.at_phase_end=false"]
    runs = {}
    for mode in ("false", "true"):
        out = tmp_path / f"compile-{mode}"
        proc = run_cli(["--output-dir", str(out), *base, f"train.compile={mode}"], timeout=1500)
        assert_ok(proc)
        assert f"torch.compile: {'on' if mode == 'true' else 'off'} (train.compile={mode})" in proc.stderr
        runs[mode] = train_losses(out)
    eager, compiled = runs["false"], runs["true"]
    assert sorted(eager) == sorted(compiled) == list(range(1, STEPS + 1))
    assert [eager[s][0] for s in range(1, STEPS + 1)] == ["CLM"] * 17 + ["MLM"] * 17 + ["CLM"] * 17
    for step in range(1, STEPS + 1):
        assert compiled[step][0] == eager[step][0]
        assert compiled[step][1] == pytest.approx(eager[step][1], rel=1e-5), step


@pytest.mark.slow
def test_one_rank_run_trains_under_zero0_and_says_so(tmp_path, tiny_tokenizer, data_cache):
    """antlm-train with one rank and zero2.json: ZeRO-0, printed at start-up and recorded in
    summary.json; ``distributed.single_rank_zero0=false`` keeps the JSON's stage 2."""
    args = ["--nproc-per-node", "1", *tiny_args_for(tiny_tokenizer, data_cache), "data.max_train_blocks=16",
            "objective.schedule=1_CLM+1_MLM", "checkpoint.at_phase_switch=false", "train.gradient_accumulation_steps=4"]
    for keep, stage in ((None, 0), ("false", 2)):
        out = tmp_path / f"run-{stage}"
        proc = run_cli(["--output-dir", str(out), *args, *([f"distributed.single_rank_zero0={keep}"] if keep else [])])
        assert_ok(proc)
        said = "one rank: ZeRO stage 0 instead of the JSON's stage 2" in proc.stderr
        assert said == (stage == 0), proc.stderr[-2000:]
        assert json.loads((out / "summary.json").read_text())["zero_stage"] == stage
        assert sorted(train_losses(out)) == [1, 2]
