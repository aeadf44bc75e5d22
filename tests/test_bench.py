"""antlm-bench: analytic FLOPs (by hand and against FlopCounterMode), telemetry with NVML
missing and with a fake NVML, and the reports of a tiny run."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from antlm_dist.telemetry.flops import FlopModel, mfu
from antlm_dist.config import ModelConfig
from antlm_dist.model import build_model

from antlm_testutil import REPO, assert_ok


def _tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=16, attention="eager", loss="torch")
    base.update(kw)
    return ModelConfig(**base)


# ----------------------------------------------------------------------------- FLOPs

def test_flops_hand_count():
    """H=8, I=12, L=2, 2 query heads of D=4, 1 key/value head, V=10; B=3, T=5."""
    cfg = _tiny_cfg()
    fm = FlopModel.from_model_config(cfg)
    # per layer: q 8·8 + k 8·4 + v 8·4 + o 8·8 + SwiGLU 3·8·12 + two norms 2·8 = 496; final norm 8
    assert fm.n_body_params == 2 * 496 + 8 == 1000
    assert FlopModel.from_module(build_model(cfg), cfg) == fm  # counted on the built module
    assert fm.body(3 * 5) == 6 * 1000 * 15 == 90_000
    # 4·B·N_h·T²·D per layer, 2 layers: 4·3·2·25·4·2 = 4800; causal half; ×3.5 forward+backward
    assert fm.attention_forward(3, 5, causal=False) == 4800
    assert fm.attention(3, 5, causal=False) == 16_800
    assert fm.attention(3, 5, causal=True) == 8_400
    assert fm.head(7) == 6 * 8 * 10 * 7 == 3_360  # 6·H·V per target row
    assert fm.step(3, 5, causal=True, target_rows=7) == 90_000 + 8_400 + 3_360
    assert mfu(1e12, 2.0, 1e12) == 0.5
    assert mfu(4e12, 1.0, 1e12, n_devices=4) == 1.0
    with pytest.raises(ValueError, match="positive"):
        mfu(1.0, 0.0, 1e12)


def _norm_params(cfg) -> int:
    return (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size


def _counts(mode: FlopCounterMode) -> dict[str, int]:
    return {str(op): n for op, n in mode.get_flop_counts()["Global"].items()}


def test_flops_match_flop_counter_on_reference_path():
    """HF LlamaForCausalLM (eager attention, grouped-query) forward + backward.

    Exact comparisons, split by op so each is a clean identity:

    * ``aten.mm`` counts the linear layers and the LM head. A linear on M rows costs
      2·M·in·out forward and 2·M·in·out for each of dX and dW, so the body gives exactly
      6·tokens·(N − norm gains): 6·N counts the RMSNorm gains too, which are not matmuls
      (here 5·32 of 23,712 parameters; the 6N approximation is high by that fraction).
      The reference computes logits for every row, so its head is 6·H·V·(B·T), our
      per-row formula with rows = B·T (not the target count: that waste is what MFU
      does not credit).
    * ``aten.bmm`` counts QKᵀ and PV of eager attention: 4·B·N_h·T²·D per layer forward
      and twice that backward (dQ, dK, dV, dP), i.e. 3 × the forward. The eager path
      computes the full square even when causal, so it equals 3 × our non-causal
      forward; our forward+backward factor is 3.5 by the FlashAttention-2 convention
      (the recomputed QKᵀ), which FlopCounterMode does not see.
    """
    transformers = pytest.importorskip("transformers")
    cfg = _tiny_cfg(vocab_size=50, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=32)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False, attn_implementation="eager"))
    fm = FlopModel.from_module(hf, cfg)
    assert fm == FlopModel.from_model_config(cfg)
    bsz, seq = 3, 12
    ids = torch.randint(0, cfg.vocab_size, (bsz, seq))
    with FlopCounterMode(display=False) as mode:
        hf(input_ids=ids, labels=ids).loss.backward()
    counts = _counts(mode)
    tokens = bsz * seq
    linear_params = fm.n_body_params - _norm_params(cfg)
    assert counts["aten.mm"] + counts.get("aten.addmm", 0) == 6 * tokens * linear_params + fm.head(tokens)
    assert counts["aten.bmm"] == 3 * fm.attention_forward(bsz, seq, causal=False)
    assert fm.body(tokens) / (6 * tokens * linear_params) - 1 == pytest.approx(_norm_params(cfg) / linear_params)


def _addmm_inplace_flop(self_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no entry for the in-place ``aten.addmm_``; same count as addmm."""
    m, k = mat1_shape
    _, n = mat2_shape
    return 2 * m * k * n


def test_our_head_costs_six_hv_per_target_row_only():
    """Our model (eager attention, torch loss path), bidirectional, 3 labelled rows of 24:
    the matmuls are exactly 6·tokens·(N − norms) + 6·H·V·3. The loss path accumulates dW
    with an in-place ``addmm_``, which FlopCounterMode is taught to count here."""
    cfg = _tiny_cfg(vocab_size=50, hidden_size=16, intermediate_size=24, max_position_embeddings=32)
    model = build_model(cfg)
    fm = FlopModel.from_model_config(cfg)
    ids = torch.randint(5, cfg.vocab_size, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 4], labels[1, 9] = 3, 7, 9
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flop}) as mode:
        model(ids, None, labels, causal=False).loss_sum.backward()
    counts = _counts(mode)
    matmul = sum(counts.get(k, 0) for k in ("aten.mm", "aten.addmm", "aten.addmm_"))
    assert matmul == 6 * ids.numel() * (fm.n_body_params - _norm_params(cfg)) + fm.head(3)
    assert counts["aten.bmm"] == 3 * fm.attention_forward(2, 12, causal=False)


# ----------------------------------------------------------------------------- telemetry

@pytest.fixture
def fresh_log_flag(monkeypatch):
    from antlm_dist.telemetry import monitor

    monkeypatch.setattr(monitor, "_NVML_ABSENT_LOGGED", False)
    return monitor


def test_telemetry_without_nvml_logs_once_and_measures_the_process(monkeypatch, caplog, fresh_log_flag):
    import pynvml

    def missing():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)  # what a machine without a driver raises

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    from antlm_dist.telemetry import Telemetry

    with caplog.at_level(logging.INFO, logger="antlm_dist.telemetry"):
        tels = [Telemetry(0, interval_s=0.01), Telemetry("cuda:0", interval_s=0.01)]
    assert sum("NVML is not available" in r.getMessage() for r in caplog.records) == 1
    tel = tels[0]
    assert not tel.has_gpu
    with tel:
        with tel.window() as w:
            x = torch.randn(256, 256)
            for _ in range(20):
                x = torch.tanh(x @ x)
            time.sleep(0.05)
        snap = tel.snapshot()
    s = w.summary
    assert s.duration_s > 0.05 and s.n_samples >= 3
    assert s.rss_peak_gib > 0 and snap.rss_gib > 0 and s.cpu_util_pct > 0
    assert s.energy_j is None and s.power_w is None and s.sm_util_pct is None
    assert s.gpu_metrics() == {}
    assert Telemetry(None).has_gpu is False  # CPU device: NVML is not even tried


def _fake_pynvml(energy_mj, power_mw=250_000, energy_supported=True):
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    nv.NVMLError, nv.NVMLError_LibraryNotFound, nv.NVML_CLOCK_SM = NVMLError, NVMLError_LibraryNotFound, 1
    nv.calls = {"init": 0, "shutdown": 0}
    nv.nvmlInit = lambda: nv.calls.__setitem__("init", nv.calls["init"] + 1)
    nv.nvmlShutdown = lambda: nv.calls.__setitem__("shutdown", nv.calls["shutdown"] + 1)
    nv.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"

    def by_uuid(uuid):
        raise NVMLError("no such UUID")

    nv.nvmlDeviceGetHandleByUUID = by_uuid
    nv.nvmlDeviceGetPowerUsage = lambda h: power_mw
    counter = iter(energy_mj)

    def energy(h):
        if not energy_supported:
            raise NVMLError("Not Supported")
        return next(counter)

    nv.nvmlDeviceGetTotalEnergyConsumption = energy
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=80, memory=40)
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    nv.nvmlDeviceGetClockInfo = lambda h, clock: 1980 if clock == nv.NVML_CLOCK_SM else 0
    return nv


def test_telemetry_with_fake_nvml_energy_counter(monkeypatch):
    """Energy is the counter difference (mJ → J); power is energy / window; means of samples."""
    fake = _fake_pynvml(energy_mj=[1_000_000, 1_037_500])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    from antlm_dist.telemetry import Telemetry

    tel = Telemetry(0, interval_s=0.01).start()
    assert tel.has_gpu and fake.calls["init"] == 1
    with tel.window() as w:
        time.sleep(0.08)
    tel.stop()
    assert fake.calls["shutdown"] == 1
    s = w.summary
    assert s.energy_source == "counter"
    assert s.energy_j == pytest.approx(37.5)
    assert s.power_w == pytest.approx(37.5 / s.duration_s)
    assert s.sm_util_pct == 80 and s.sm_clock_mhz == 1980 and s.mem_used_gib == pytest.approx(3.0)
    assert s.n_samples >= 3
    assert s.gpu_metrics() == {"power_w": s.power_w, "energy_j": s.energy_j}


def test_telemetry_with_fake_nvml_without_energy_counter(monkeypatch):
    """No energy counter (pre-Volta): energy integrates the sampled 250 W over the window."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(energy_mj=[], energy_supported=False))
    from antlm_dist.telemetry import Telemetry

    with Telemetry(0, interval_s=0.01) as tel:
        with tel.window() as w:
            time.sleep(0.05)
    s = w.summary
    assert s.energy_source == "power_integral"
    assert s.energy_j == pytest.approx(250.0 * s.duration_s, rel=1e-9)
    assert s.power_w == pytest.approx(250.0)


# ----------------------------------------------------------------------------- reports

TINY_BENCH = ["model.vocab_size=256", "model.hidden_size=32", "model.intermediate_size=64",
              "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.max_position_embeddings=32",
              "data.seq_len=32"]


def test_bench_report_and_plot_from_a_tiny_run(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "antlm_dist.bench.cli", "--config", "demo-cpu", "--out", str(out),
         "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--profile", "--profile-steps", "1",
         "--baselines", "eager", *TINY_BENCH],
        capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO))
    assert_ok(proc)
    result = json.loads((out / "bench.json").read_text())
    assert result["versions"]["torch"] == torch.__version__
    assert result["peak_flops"]["flops_per_s"] > 0 and "measured" in result["peak_flops"]["source"]
    recs = result["records"]
    assert {(r["runner"], r["phase"]) for r in recs} == {(k, p) for k in ("antlm", "baseline") for p in ("CLM", "MLM")}
    for r in recs:
        st = r["step_time_s"]
        assert len(st["all"]) == 2 and st["p10"] <= st["median"] <= st["p90"]
        assert r["tokens_per_step"] == 2 * 32
        assert r["tokens_per_s_per_device"] == pytest.approx(64 / st["median"])
        assert 0 < r["mfu"] < 1 and r["speedup_vs_baseline"] > 0
        assert r["profile"]["categories_ms"]["matmul"] > 0
    clm = next(r for r in recs if r["runner"] == "antlm" and r["phase"] == "CLM")
    assert clm["target_rows_per_step"] == 2 * 31  # the last position has no next token
    assert clm["attention"] == "sdpa" and clm["loss"] == "torch" and clm["zero"] == 2
    mlm = next(r for r in recs if r["runner"] == "antlm" and r["phase"] == "MLM")
    assert mlm["flop_bound_speedup"] > clm["flop_bound_speedup"] > 1  # the baseline's head sees every row
    assert all(r["speedup_vs_baseline"] == 1.0 for r in recs if r["runner"] == "baseline")
    assert all(r["cpu_time_s"]["median"] > 0 for r in recs)
    md = (out / "bench.md").read_text()
    assert "| CLM | sdpa/torch/ZeRO-2 |" in md and "| MLM | baseline: HF Llama + AdamW |" in md
    assert "Where the time goes" in md and "measured" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from antlm_dist.bench.cli import main

    assert main(["--compare", str(out / "bench.json"), str(out / "bench.json")]) == 0


@pytest.mark.slow
def test_bench_compiled_variants_against_both_baselines(tmp_path):
    """--compile off,on and both HF baselines in one run: four runners per phase, and every
    ratio is the quotient of the medians it names."""
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "antlm_dist.bench.cli", "--config", "demo-cpu", "--out", str(out), "--zero", "0",
         "--micro-batch", "2", "--steps", "2", "--warmup", "2", "--compile", "off,on", "--baselines",
         "eager,compiled", *TINY_BENCH],
        capture_output=True, text=True, env=env, timeout=1200, cwd=str(REPO))
    assert_ok(proc)
    result = json.loads((out / "bench.json").read_text())
    assert result["plan"]["compile"] == [False, True] and result["plan"]["baselines"] == ["eager", "compiled"]
    recs = {(r["label"], r["phase"]): r for r in result["records"]}
    labels = {"sdpa/torch/ZeRO-0", "sdpa/torch/ZeRO-0/compiled", "baseline: HF Llama + AdamW",
              "baseline: HF Llama + AdamW, compiled"}
    assert set(recs) == {(label, p) for label in labels for p in ("CLM", "MLM")}
    for phase in ("CLM", "MLM"):
        eager_hf = recs[("baseline: HF Llama + AdamW", phase)]["step_time_s"]["median"]
        compiled_hf = recs[("baseline: HF Llama + AdamW, compiled", phase)]
        assert compiled_hf["runner"] == "baseline_compiled" and compiled_hf["compiled"] is True
        for label in labels:
            r = recs[(label, phase)]
            assert r["compiled"] == ("compiled" in label)
            assert r["speedup_vs_baseline"] == pytest.approx(eager_hf / r["step_time_s"]["median"])
            assert r["speedup_vs_compiled_baseline"] == pytest.approx(
                compiled_hf["step_time_s"]["median"] / r["step_time_s"]["median"])
    md = (out / "bench.md").read_text()
    assert "× compiled baseline (wall)" in md and "| MLM | sdpa/torch/ZeRO-0/compiled |" in md
    assert "compiled baseline" in proc.stdout


def test_bad_compile_options_exit_2(tmp_path, capsys):
    from antlm_dist.bench.cli import main

    assert main(["--config", "demo-cpu", "--out", str(tmp_path), "--compile", "maybe"]) == 2
    assert "--compile 'maybe': use a comma list of off, on" in capsys.readouterr().err
    assert main(["--config", "demo-cpu", "--out", str(tmp_path), "--baselines", "eager,jit"]) == 2
    assert "--baselines 'eager,jit'" in capsys.readouterr().err


def test_compare_prints_ratios(tmp_path, capsys):
    from antlm_dist.bench.cli import main

    def rec(phase, tps):
        return {"config": "demo-cpu", "phase": phase, "label": "sdpa/torch/ZeRO-2", "micro_batch": 8,
                "tokens_per_s_per_device": tps}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"records": [rec("CLM", 1000.0), rec("MLM", 2000.0)]}))
    b.write_text(json.dumps({"records": [rec("CLM", 1500.0)]}))
    assert main(["--compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "1.50×" in text and "1 record(s) in only one file" in text
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"records": []}))
    assert main(["--compare", str(a), str(c)]) == 2


def test_bad_matrix_arguments_exit_2(tmp_path, capsys):
    from antlm_dist.bench.cli import main

    assert main(["--config", "demo-cpu", "--out", str(tmp_path), "--phases", "clm,nsp"]) == 2
    assert "--phases" in capsys.readouterr().err
    assert main(["--config", "demo-cpu", "--out", str(tmp_path), "--zero", "4"]) == 2


def test_trainer_logs_mfu_per_step(tmp_path, tiny_tokenizer, data_cache):
    """antlm-train (1 rank) writes ``mfu`` in every train record; no GPU, so no power/energy."""
    from antlm_dist.metrics import read_metrics
    from antlm_testutil import run_cli, tiny_args_for

    out = tmp_path / "run"
    args = ["--output-dir", str(out), "--nproc-per-node", "1", *tiny_args_for(tiny_tokenizer, data_cache),
            "data.max_train_blocks=16", "objective.schedule=1_CLM+1_MLM", "checkpoint.at_phase_switch=false"]
    assert_ok(run_cli(args))
    records = read_metrics(out / "metrics.jsonl", "train")
    assert {r["phase"] for r in records} == {"CLM", "MLM"}
    for r in records:
        assert 0 < r["mfu"] < 1
        assert "power_w" not in r and "energy_j" not in r
