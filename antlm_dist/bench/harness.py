"""The benchmark matrix: the real AntLM training step against the BabyLlama reference step.

``antlm`` runners build exactly what ``antlm-train`` builds: the recipe's model
(:func:`antlm_dist.model.build_model`), the DeepSpeed engine
(:func:`antlm_dist.distributed.build_engine` on :func:`~antlm_dist.distributed.build_ds_config`),
the phase collators (:func:`antlm_dist.data.pipeline.make_collators`) and one optimizer step
(:func:`antlm_dist.trainer.global_batch_step`), in one process (world size 1; gloo on CPU). ZeRO
stages still apply (their flattening and partitioning code runs, with one partition).

The ``baseline`` runner is the BabyLlama reference step (Timiryasov & Tastet 2023, a
Hugging Face ``LlamaForCausalLM`` trained with the HF Trainer): the same sizes, initial
weights and micro-batches, transformers' default attention implementation, the full
(B, T, V) logits and torch ``AdamW`` in a plain PyTorch loop (no DeepSpeed), with the
Trainer's default gradient clipping. CLM passes unshifted ``labels`` (HF shifts them and
averages over ``num_items_in_batch``); MLM feeds a (B, 1, T, T) all-keys boolean mask (HF
Llama takes a 4-D mask as given, so attention is bidirectional) and scores the full
logits with ``transformers``' ``ForMaskedLMLoss``. The ``baseline_compiled`` runner is the
same step with the HF model under ``torch.compile`` (Inductor), so that a compiled AntLM
step is also compared with a compiled reference.

Timing (STYLE.md, convention 8): every runner of a group (one recipe and micro-batch) is
built and warmed up in turn (peak memory is measured then), after which the timed steps
are interleaved round-robin over runners and phases, so slow drifts in a shared
machine's load fall on all of them alike. A step's time is the wall time of one
optimizer step on already-collated micro-batches (the data loader is excluded),
synchronised on CUDA.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from antlm_dist.telemetry.flops import FlopModel, mfu
from antlm_dist.config import Recipe
from antlm_dist.data.tokenizer import SPECIAL_TOKENS
from antlm_dist.telemetry.monitor import mean_or_none

log = logging.getLogger("antlm_dist.bench")

PHASES = ("CLM", "MLM")
_GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One cell of the implementation matrix. zero: DeepSpeed ZeRO stage 0–3."""

    attention: str
    loss: str
    zero: int
    compile: bool = False
    """``torch.compile`` the transformer blocks (:func:`antlm_dist.speedups.compile_layers`)."""

    @property
    def label(self) -> str:
        return f"{self.attention}/{self.loss}/ZeRO-{self.zero}" + ("/compiled" if self.compile else "")


@dataclasses.dataclass
class BenchPlan:
    """What to run for every recipe. micro_batches: ``None`` means the recipe's own."""

    phases: list[str]
    variants: list[Variant]
    micro_batches: list[int] | None
    steps: int
    warmup: int
    data: str = "synthetic"
    baselines: tuple[str, ...] = ("eager", "compiled")
    """HF reference runners: ``eager`` (the BabyLlama recipe) and/or ``compiled`` (under torch.compile)."""
    profile: bool = False
    profile_steps: int = 3
    """Profiled steps per runner and phase; the one with the least total self time is kept
    (other processes' load only ever adds time)."""


# ----------------------------------------------------------------------------- data

class SyntheticVocab:
    """Stands in for the tokenizer on synthetic data: the five special roles (pad, bos,
    eos, unk, mask) take ids 0..4 as a trained tokenizer gives them; the ``<role>_token_id``
    attributes and ``convert_tokens_to_ids`` are what
    :func:`antlm_dist.data.pipeline.make_collators` reads."""

    roles = ("pad", "bos", "eos", "unk", "mask")

    def __init__(self):
        for i, role in enumerate(self.roles):
            setattr(self, f"{role}_token_id", i)
        self._ids = dict(zip(SPECIAL_TOKENS, range(len(self.roles))))

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._ids[token]


def load_bench_blocks(recipe: Recipe, data: str, n_blocks: int, workdir: Path):
    """(tokenizer-like, (n_blocks, T) int64 blocks).

    ``synthetic``: uniform non-special token ids (seeded by ``train.seed``), no padding;
    ``corpus``: the recipe's ``data.corpus`` tokenised and packed as ``antlm-train`` does
    (a tokenizer is trained under ``workdir`` unless ``tokenizer.path`` is given).

    Raises:
        ValueError: an unknown ``data``, or a corpus with fewer than ``n_blocks`` blocks.
    """
    seq_len = recipe.data.seq_len
    if data == "synthetic":
        gen = torch.Generator().manual_seed(recipe.train.seed)
        blocks = torch.randint(len(SyntheticVocab.roles), recipe.model.vocab_size, (n_blocks, seq_len), generator=gen)
        return SyntheticVocab(), blocks
    if data != "corpus":
        raise ValueError(f"--data {data!r}: use synthetic or corpus")
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.data.blocks import load_blocks
    from antlm_dist.data.pipeline import prepare_tokenizer

    corpus = find_corpus(recipe.data.corpus)
    workdir.mkdir(parents=True, exist_ok=True)
    tok, tok_hash = prepare_tokenizer(recipe, workdir, corpus.train, 0)
    blocks = load_blocks(corpus.train, tok, tok_hash, seq_len, workdir / "cache", recipe.data.num_proc, True, "train")
    if len(blocks) < n_blocks:
        raise ValueError(f"the corpus packs into {len(blocks)} blocks of {seq_len} tokens; "
                         f"the benchmark needs {n_blocks}")
    return tok, blocks[:n_blocks]


def make_batch_pool(recipe: Recipe, tok, blocks: torch.Tensor, phases, pool_steps: int) -> dict[str, list[list[Any]]]:
    """Per phase, ``pool_steps`` optimizer steps of collated micro-batches (lists of
    :class:`~antlm_dist.data.collators.Batch`), from consecutive blocks."""
    from antlm_dist.data.pipeline import make_collators

    clm, mlm = make_collators(recipe, tok)
    mb, gas = recipe.train.micro_batch_size, recipe.train.gradient_accumulation_steps
    pool = {}
    for phase in phases:
        collator = clm if phase == "CLM" else mlm
        steps = []
        for s in range(pool_steps):
            micro = []
            for g in range(gas):
                ids = list(range((s * gas + g) * mb, (s * gas + g + 1) * mb))
                micro.append(collator(blocks[torch.as_tensor(ids)], ids, 0))
            steps.append(micro)
        pool[phase] = steps
    return pool


# ----------------------------------------------------------------------------- runners

def variant_recipe(recipe: Recipe, variant: Variant | None, micro_batch: int) -> Recipe:
    """A copy of ``recipe`` with the variant's attention, loss, ZeRO JSON and micro-batch."""
    r = copy.deepcopy(recipe)
    r.train.micro_batch_size = micro_batch
    if variant is not None:
        r.model.attention = variant.attention
        r.model.loss = variant.loss
        r.distributed.deepspeed_config = f"zero{max(variant.zero, 1)}.json"
    return r


class AntLMRunner:
    """The trainer's step: DeepSpeed engine + :func:`antlm_dist.trainer.global_batch_step`."""

    kind = "antlm"

    def __init__(self, recipe: Recipe, variant: Variant, device: torch.device, total_steps: int):
        from antlm_dist.distributed import build_ds_config, build_engine
        from antlm_dist.model import build_model
        from antlm_dist.speedups import compile_layers

        self.variant, self.device, self.label = variant, device, variant.label
        ds_config = build_ds_config(recipe, 1, device, recipe_source=f"recipe {recipe.name}")
        if variant.zero == 0:
            ds_config["zero_optimization"] = {"stage": 0}
        torch.manual_seed(recipe.train.seed)
        model = build_model(recipe.model, device=device)
        self.flop_model = FlopModel.from_module(model, recipe.model)
        self.initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if variant.compile:
            compile_layers(model)  # as the trainer does with train.compile; graphs build in the warm-up
        self.engine = build_engine(model, recipe, ds_config, total_steps)
        self.engine.train()

    def step(self, micro_batches, causal: bool) -> None:
        from antlm_dist.trainer import global_batch_step

        global_batch_step(self.engine, micro_batches, causal=causal, device=self.device)

    def close(self) -> None:
        self.engine.destroy()
        self.engine = None


class BaselineRunner:
    """BabyLlama reference step: HF ``LlamaForCausalLM`` + torch AdamW, full logits; with
    ``compiled``, the HF model under ``torch.compile`` (the ``baseline_compiled`` runner)."""

    def __init__(self, recipe: Recipe, device: torch.device, initial_state: dict | None, precision: str,
                 compiled: bool = False):
        import transformers

        from antlm_dist.distributed import build_adamw, param_groups

        m, t = recipe.model, recipe.train
        hf_cfg = transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads or m.num_attention_heads,
            max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.rms_norm_eps,
            rope_theta=m.rope_theta, initializer_range=m.initializer_range, tie_word_embeddings=False,
            attention_bias=False, mlp_bias=False,
        )
        torch.manual_seed(t.seed)
        model = transformers.LlamaForCausalLM(hf_cfg)
        if initial_state is not None:
            model.load_state_dict(initial_state, strict=False)  # HF's rotary buffers are not in ours
        self.model = model.to(device).train()
        self.attn_implementation = model.config._attn_implementation
        self.kind = "baseline_compiled" if compiled else "baseline"
        self.label = "baseline: HF Llama + AdamW" + (", compiled" if compiled else "")
        if compiled:
            self.model.compile()  # the whole HF model, in place; graphs build in the warm-up
        self.device, self.vocab_size, self.grad_clip = device, m.vocab_size, t.grad_clip
        self.optimizer = build_adamw(param_groups(model, t.weight_decay), t)  # the same train.optim as ours
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else
                         torch.autocast(device.type, dtype=torch.float16) if precision == "fp16" else
                         contextlib.nullcontext())

    def step(self, micro_batches, causal: bool) -> None:
        from transformers.loss.loss_utils import ForMaskedLMLoss

        n_items = torch.tensor(sum(b.num_targets for b in micro_batches), device=self.device)
        for batch in micro_batches:
            batch = batch.to(self.device)
            ids, am = batch.input_ids, batch.attention_mask
            with self.autocast:
                if causal:
                    labels = ids.masked_fill(am == 0, -100)  # HF shifts these itself
                    loss = self.model(input_ids=ids, attention_mask=am, labels=labels,
                                      num_items_in_batch=n_items).loss
                else:
                    bsz, seq_len = ids.shape
                    mask = am.bool()[:, None, None, :].expand(bsz, 1, seq_len, seq_len)  # (B, 1, T, T)
                    logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
                    loss = ForMaskedLMLoss(logits, batch.labels, self.vocab_size, num_items_in_batch=n_items)
            loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # wait for the step, as train_step's .item() calls do

    def close(self) -> None:
        self.model = self.optimizer = None


# ----------------------------------------------------------------------------- measurement

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_free_heap() -> None:
    """glibc ``malloc_trim(0)``: hand freed heap pages back to the OS, so that RSS counts
    live memory and a later RSS rise is new memory rather than reuse. No-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resident_bytes(device: torch.device, telemetry) -> float:
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    _release_free_heap()
    return telemetry.snapshot().rss_gib * _GIB


def _percentiles(times: list[float]) -> dict[str, float]:
    arr = np.asarray(times, dtype=np.float64)
    return {"median": float(np.median(arr)), "p10": float(np.percentile(arr, 10)),
            "p90": float(np.percentile(arr, 90)), "mean": float(arr.mean()), "all": [float(x) for x in arr]}


_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
_LOSS_OPS = {"aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
             "aten::nll_loss_backward", "aten::logsumexp", "aten::exp", "aten::exp_", "aten::amax",
             "aten::gather", "aten::argmax", "aten::sub_", "aten::log"}


def _profile_category(evt) -> str:
    """matmul, attention, loss, optimizer or other, for one profiler event (by name and ancestry)."""
    node = evt
    while node is not None:
        if node.name.startswith("Optimizer.step"):
            return "optimizer"
        node = node.cpu_parent
    name = evt.name
    if name in _MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or name in ("aten::_softmax", "aten::_softmax_backward_data"):
        return "attention"
    if name in _LOSS_OPS:
        return "loss"
    return "other"


def profile_step(runner, micro_batches, causal: bool, device: torch.device, top: int = 8) -> dict:
    """One step under ``torch.profiler``.

    Returns:
        ``wall_ms`` (profiled, so slower than a timed step), ``categories``: self time (ms)
        of matmuls (mm/addmm/bmm, the body and the LM head), attention kernels and softmax,
        loss ops (log-softmax, NLL, exp/max/gather of the chunked loss), the optimizer
        (everything under ``Optimizer.step``) and the rest (elementwise, copies, norms,
        gather/scatter); ``ops_ms``: self time of the 40 costliest ops (for diffs against
        the baseline); ``top_ops``: the ``top`` ops by self time. Times are CPU self time
        on CPU and device self time on CUDA.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        runner.step(micro_batches, causal)
        _sync(device)
    wall_ms = 1000 * (time.perf_counter() - t0)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    categories = dict.fromkeys(("matmul", "attention", "loss", "optimizer", "other"), 0.0)
    for evt in prof.events():
        categories[_profile_category(evt)] += getattr(evt, attr, 0.0) / 1000
    total_ms = sum(categories.values()) or 1.0
    ops = sorted((e for e in prof.key_averages() if not e.key.startswith(("Optimizer.", "ProfilerStep", "## "))),
                 key=lambda e: getattr(e, attr, 0.0), reverse=True)
    return {
        "wall_ms": wall_ms,
        "time_kind": "device self time" if device.type == "cuda" else "CPU self time",
        "categories_ms": categories,
        "ops_ms": {e.key: getattr(e, attr) / 1000 for e in ops[:40]},
        "top_ops": [{"op": e.key, "self_ms": getattr(e, attr) / 1000, "share": getattr(e, attr) / 1000 / total_ms,
                     "calls": e.count} for e in ops[:top]],
    }


def run_group(config_name: str, recipe: Recipe, micro_batch: int, plan: BenchPlan, device: torch.device,
              precision: str, telemetry, peak_flops: float, workdir: Path) -> list[dict]:
    """Build, warm up and time every runner of one (recipe, micro-batch) group.

    Returns:
        One record per (runner, phase); see :func:`antlm_dist.bench.report.write_json`.
    """
    base = variant_recipe(recipe, None, micro_batch)
    gas = base.train.gradient_accumulation_steps
    pool_steps = max(1, min(plan.steps + plan.warmup, 4))
    tok, blocks = load_bench_blocks(base, plan.data, pool_steps * micro_batch * gas, workdir / config_name)
    pool = make_batch_pool(base, tok, blocks, plan.phases, pool_steps)
    runners, memory, flop_model = _build_and_warm_up(config_name, recipe, base, micro_batch, plan, device, precision,
                                                     telemetry, pool, pool_steps)
    times, windows, cpu_times = _time_interleaved(config_name, micro_batch, runners, plan, device, telemetry, pool,
                                                  pool_steps)
    profiles = _profile_round_robin(runners, plan, device, pool)
    records = []
    for runner in runners:
        for phase in plan.phases:
            key = (runner.label, phase)
            timed = [pool[phase][(plan.warmup + i) % pool_steps] for i in range(plan.steps)]
            records.append(_record(config_name, base, micro_batch, plan, runner, phase, timed, flop_model,
                                   times[key], windows[key], cpu_times[key], memory[key], profiles.get(key),
                                   peak_flops, device))
    _add_baseline_ratios(records)
    for runner in runners:
        runner.close()
    del runners
    gc.collect()
    return records


def _build_and_warm_up(config_name, recipe, base, micro_batch, plan, device, precision, telemetry, pool, pool_steps):
    """Build each runner in turn and run its warm-up steps per phase, recording the memory it
    added: ``(runners, {(label, phase): (peak GiB above the start, RSS peak GiB)}, FlopModel)``."""
    total_steps = len(plan.phases) * (plan.warmup + plan.steps + 2)
    builders = [(v.label, (lambda v=v: AntLMRunner(variant_recipe(recipe, v, micro_batch), v, device, total_steps)),
                 v.compile) for v in plan.variants]
    builders += [(f"baseline ({kind})", None, kind == "compiled") for kind in plan.baselines]
    runners, memory, initial_state = [], {}, None
    flop_model = None
    for label, build, compiled in builders:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = _resident_bytes(device, telemetry)
        log.info("%s mb=%d: building %s", config_name, micro_batch, label)
        runner = build() if build is not None else BaselineRunner(base, device, initial_state, precision, compiled)
        if isinstance(runner, AntLMRunner):
            flop_model, initial_state = runner.flop_model, initial_state or runner.initial_state
        runners.append(runner)
        for phase in plan.phases:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            else:
                _release_free_heap()
            with telemetry.window() as w:
                for i in range(plan.warmup):
                    runner.step(pool[phase][i % pool_steps], phase == "CLM")
                _sync(device)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - before) / _GIB
            else:
                peak = w.summary.rss_peak_gib - before / _GIB
            memory[(runner.label, phase)] = (peak, w.summary.rss_peak_gib)
    if flop_model is None:
        flop_model = FlopModel.from_model_config(base.model)
    return runners, memory, flop_model


def _time_interleaved(config_name, micro_batch, runners, plan, device, telemetry, pool, pool_steps):
    """Timed steps, round-robin over runners and phases so that load from other processes
    spreads over all of them: ``(times s, telemetry windows, CPU seconds)`` per (label, phase)."""
    times = {(r.label, p): [] for r in runners for p in plan.phases}
    windows = {(r.label, p): [] for r in runners for p in plan.phases}
    cpu_times = {(r.label, p): [] for r in runners for p in plan.phases}
    log.info("%s mb=%d: timing %d steps x %d runners x %d phases, interleaved", config_name, micro_batch,
             plan.steps, len(runners), len(plan.phases))
    for i in range(plan.steps):
        for phase in plan.phases:
            micro = pool[phase][(plan.warmup + i) % pool_steps]
            for runner in runners:
                _sync(device)
                with telemetry.window() as w:
                    t0 = time.perf_counter()
                    runner.step(micro, phase == "CLM")
                    _sync(device)
                    dt = time.perf_counter() - t0
                times[(runner.label, phase)].append(dt)
                windows[(runner.label, phase)].append(w.summary)
                cpu_times[(runner.label, phase)].append(w.summary.cpu_util_pct * w.summary.duration_s / 100)
    return times, windows, cpu_times


def _profile_round_robin(runners, plan, device, pool) -> dict:
    """``{(label, phase): profile}`` of the least disturbed of ``plan.profile_steps`` profiled steps."""
    profiles = {}
    for _ in range(plan.profile_steps if plan.profile else 0):  # round-robin, like the timed steps
        for phase in plan.phases:
            for runner in runners:
                prof = profile_step(runner, pool[phase][0], phase == "CLM", device)
                best = profiles.get((runner.label, phase))
                if best is None or sum(prof["categories_ms"].values()) < sum(best["categories_ms"].values()):
                    profiles[(runner.label, phase)] = prof  # the least disturbed of the profiled steps
    return profiles


def _record(config_name, base, micro_batch, plan, runner, phase, timed, flop_model, times, ws, cpu_times, memory,
            profile, peak_flops, device) -> dict:
    """One (runner, phase) record of ``bench.json``."""
    m, gas, seq_len = base.model, base.train.gradient_accumulation_steps, base.data.seq_len
    targets = statistics.fmean(sum(b.num_targets for b in micro) for micro in timed)
    tokens = micro_batch * gas * seq_len
    st = _percentiles(times)
    flops = flop_model.step(micro_batch * gas, seq_len, phase == "CLM", targets)
    # FLOPs actually executed: the baseline's head runs on every row (full logits)
    executed = (flops if runner.kind == "antlm" else
                flop_model.step(micro_batch * gas, seq_len, phase == "CLM", tokens))  # both baselines
    energy = [w.energy_j for w in ws if w.energy_j is not None]
    total_s = sum(w.duration_s for w in ws)
    return {
        "config": config_name, "phase": phase, "runner": runner.kind, "label": runner.label,
        "attention": runner.variant.attention if runner.kind == "antlm" else f"hf-{runner.attn_implementation}",
        "loss": runner.variant.loss if runner.kind == "antlm" else "full-logits",
        "zero": runner.variant.zero if runner.kind == "antlm" else None,
        "compiled": runner.variant.compile if runner.kind == "antlm" else runner.kind == "baseline_compiled",
        "micro_batch": micro_batch, "gradient_accumulation_steps": gas, "seq_len": seq_len,
        "model": {"hidden_size": m.hidden_size, "num_hidden_layers": m.num_hidden_layers,
                  "num_attention_heads": m.num_attention_heads, "intermediate_size": m.intermediate_size,
                  "vocab_size": m.vocab_size, "body_params": flop_model.n_body_params},
        "tokens_per_step": tokens, "target_rows_per_step": targets,
        "steps": plan.steps, "warmup_steps": plan.warmup,
        "step_time_s": st,
        "cpu_time_s": _percentiles(cpu_times),
        "tokens_per_s_per_device": tokens / st["median"],
        "model_flops_per_step": flops,
        "executed_flops_per_step": executed,
        "model_tflops_per_s": flops / st["median"] / 1e12,
        "mfu": mfu(flops, st["median"], peak_flops),
        "mem_peak_gib": memory[0],
        "mem_kind": ("torch.cuda.max_memory_allocated above the memory held before this runner was built"
                     if device.type == "cuda" else
                     "process RSS peak (psutil) above the RSS before this runner was built"),
        "rss_peak_gib": memory[1],
        "cpu_util_pct": sum(w.cpu_util_pct * w.duration_s for w in ws) / max(total_s, 1e-12),
        "power_w": (sum(energy) / total_s) if energy else None,
        "energy_j_per_step": (sum(energy) / len(energy)) if energy else None,
        "sm_util_pct": mean_or_none(w.sm_util_pct for w in ws),
        "profile": profile,
    }


def _add_baseline_ratios(records: list[dict]) -> None:
    """Speed-ups (wall and CPU time) and the FLOP bound of every record against the eager
    baseline of its phase, and the wall-time speed-up against the compiled baseline."""
    by_phase = {r["phase"]: r for r in records if r["runner"] == "baseline"}
    compiled = {r["phase"]: r for r in records if r["runner"] == "baseline_compiled"}
    for rec in records:
        c = compiled.get(rec["phase"])
        rec["speedup_vs_compiled_baseline"] = (c["step_time_s"]["median"] / rec["step_time_s"]["median"]) if c else None
        b = by_phase.get(rec["phase"])
        rec["speedup_vs_baseline"] = (b["step_time_s"]["median"] / rec["step_time_s"]["median"]) if b else None
        rec["flop_bound_speedup"] = (b["executed_flops_per_step"] / rec["executed_flops_per_step"]) if b else None
        rec["speedup_vs_baseline_cpu_time"] = (b["cpu_time_s"]["median"] / max(rec["cpu_time_s"]["median"], 1e-12)
                                               if b else None)


