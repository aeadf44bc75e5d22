"""The AntLM trainer: built once from a recipe and a run folder, then :meth:`Trainer.train`.

``Trainer.__init__`` builds, in this order (the order fixes every random draw): the
DeepSpeed config, the initialisation seed, tokenizer and packed blocks, sampler and
collators, the resume point (read before the engine exists, because another world size
needs DeepSpeed's universal loader configured up front), model and engine, the MFU peak
and telemetry, the restored checkpoint, and the run's start-up files.

:meth:`Trainer.train` is the loop: phase check, :meth:`Trainer.train_step`, then named
calls to log, evaluate, checkpoint and stop. The phase is a pure function of the global
optimizer step (:func:`antlm_dist.schedule.phase_for_step`); ranks check that they agree at
every switch and after every resume.

Loss normalisation: each micro-batch's summed loss is divided by the number of target
tokens in the whole global batch (all micro-batches and all ranks), so an MLM micro-batch
with few masked tokens weighs exactly as much as its tokens (:func:`global_batch_step`).
A mixed phase normalises each objective by its own global target count and weighs the
objectives by their share of the step's micro-batches (:mod:`antlm_dist.mixing`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from antlm_dist import __version__
from antlm_dist.checkpoint import (TAG_PREFIX, CheckpointError, ClientState, check_resume, check_zero_stage, latest_tag,
                                   load_checkpoint, optimizer_partitions, read_client_state, save_checkpoint,
                                   select_resume_tag, universal_tag)
from antlm_dist.config import ConfigError, Recipe, dump_recipe
from antlm_dist.data.blocks import load_blocks
from antlm_dist.data.corpus import CorpusFiles
from antlm_dist.data.pipeline import BatchPrefetcher, make_collators, prepare_tokenizer
from antlm_dist.data.sampler import DistributedResumableSampler
from antlm_dist.distributed import (all_reduce_sum, build_ds_config, build_engine, dist_env, resolve_precision,
                                    world_info, zero_stage)
from antlm_dist.eval.heldout import evaluate_heldout
from antlm_dist.export import export_milestones
from antlm_dist.metrics import MetricsWriter, drop_records_after
from antlm_dist.mixing import collators_for, mixed_batch_step, mixed_loss, objective_fields
from antlm_dist.model import build_model
from antlm_dist.plots import plot_run_or_warn
from antlm_dist.progress import ProgressReporter, bar_wanted
from antlm_dist.nonfinite import NONFINITE_EXIT_CODE, NonFiniteGuard
from antlm_dist.run_folder import PREEMPT_EXIT_CODE, RunFolder
from antlm_dist.schedule import (check_phase_agreement, format_schedule, is_causal, mask_rate_at, parse_schedule,
                                 phase_for_step, schedule_objectives, step_assignment, total_epochs, total_steps)
from antlm_dist.seeding import seed_model_init
from antlm_dist.speedups import compile_layers, resolve_compile, single_rank_ds_config
from antlm_dist.telemetry import Telemetry
from antlm_dist.telemetry.flops import FlopModel, mfu, peak_flops_per_device
from antlm_dist.trackers import build_trackers
from antlm_dist.words import Milestones, WordCounter, parse_word_count

log = logging.getLogger("antlm_dist")


# ----------------------------------------------------------------------------- one optimizer step

def global_batch_step(engine, micro_batches, *, causal: bool, device, extra=()) -> tuple[float, ...]:
    """Forward/backward every micro-batch of one optimizer step, then step the engine.

    Each micro-batch's summed loss is scaled by ``world × accumulation / N_global``,
    where N_global is the target count of the whole global batch (one all-reduce before
    the first backward). DeepSpeed divides by the accumulation steps and averages over
    data-parallel ranks, so the applied gradient is exactly
    ∇(Σ_global loss / N_global): what one large batch would give.

    Args:
        engine: DeepSpeed engine whose module returns a ``LossOutput``.
        micro_batches: this rank's :class:`~antlm_dist.data.collators.Batch` list; its
            length must equal the engine's ``gradient_accumulation_steps``.
        causal: the phase's attention mask.
        extra: further numbers to sum over ranks in the closing all-reduce (e.g. the
            preemption flag), returned after the standard ones; or a callable returning
            them, called after the last micro-batch, just before that all-reduce.

    Returns:
        (global summed loss in nats, N_global, global top-1 hits, *summed extras).

    Raises:
        ValueError: the number of micro-batches differs from the accumulation steps.
    """
    _, world = world_info()
    gas = engine.gradient_accumulation_steps()
    if len(micro_batches) != gas:
        raise ValueError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps={gas}")
    (n_global,) = all_reduce_sum([sum(b.num_targets for b in micro_batches)], device)
    scale = world * gas / max(n_global, 1.0)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss, hits), read once after the loop
    for batch in micro_batches:
        batch = batch.to(device)
        res = engine(batch.input_ids, batch.attention_mask, batch.labels, causal=causal,
                     segment_ids=batch.segment_ids)
        engine.backward(res.loss_sum * scale)
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        sums[0] += res.loss_sum.detach().double()
        sums[1] += res.n_correct.double()
    loss_sum, correct = sums.tolist()
    extra = extra() if callable(extra) else extra
    loss_total, correct_total, *rest = all_reduce_sum([loss_sum, correct, *extra], device)
    return (loss_total, n_global, correct_total, *rest)


@dataclasses.dataclass
class StepResult:
    """One optimizer step, summed over the global batch: loss (nats), targets, top-1 hits,
    ranks that asked to stop, wall time (s) and the telemetry window of the step. A mixed
    step also has its per-objective sums (:func:`antlm_dist.mixing.mixed_batch_step`)."""

    loss_sum: float
    n_targets: float
    n_correct: float
    stop_votes: float
    step_time_s: float
    window: object
    per_objective: dict | None = None

    @property
    def loss(self) -> float:
        """Nats per target; a mixed step's Σ_k w_k · S_k / N_k (:func:`antlm_dist.mixing.mixed_loss`)."""
        if self.per_objective is not None:
            return mixed_loss(self.per_objective)
        return self.loss_sum / max(self.n_targets, 1)


# ----------------------------------------------------------------------------- preemption

class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (``ANTLM_PREEMPT_SIGNALS``, read once); all-reduced (MAX) once per step."""

    def __init__(self):
        self.requested = False
        names = os.environ.get("ANTLM_PREEMPT_SIGNALS", "SIGTERM,SIGUSR1")
        for name in filter(None, (n.strip() for n in names.split(","))):
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        # Only a vote here: torchrun also sends SIGTERM to the survivors when another rank dies,
        # and then no checkpoint can follow. The checkpoint is announced once every rank has voted.
        log.warning("received %s: asking every rank to stop at the end of this step", signal.Signals(signum).name)


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """One rank of a training run. The process group must already be initialised.

    Args:
        recipe: the validated recipe.
        run: the run folder (already checked by preflight).
        corpus: the corpus files (already validated by preflight).
        device: this rank's device.
        resume: continue from the newest intact checkpoint in ``run`` (True), or from the
            tag given (a string).
        overwrite: replace a previous run in ``run``.
        recipe_source: how the recipe was given, for error messages.

    Raises:
        CheckpointError: ``resume`` without a complete checkpoint, or one that does not
            fit this run (global batch, schedule, tokenizer).
        ConfigError, TokenizerError, ValueError: naming the field and the fix.
    """

    def __init__(self, recipe: Recipe, run: RunFolder, corpus: CorpusFiles, device: torch.device, *,
                 resume: bool | str = False, overwrite: bool = False, recipe_source: str = "the recipe"):
        self.recipe, self.run, self.device, self.resume = recipe, run, device, resume
        self.rank, self.world = world_info()
        self.phases = parse_schedule(recipe.objective.schedule)
        json_config = build_ds_config(recipe, self.world, device, recipe_source=recipe_source)
        self.ds_config, self.zero_note = single_rank_ds_config(json_config, self.world, recipe)
        self.debug = recipe.debug  # read once: fault injection and step delays for tests
        seed_model_init(recipe.train.seed, self.rank)
        run.prepare(overwrite)
        self._build_data(corpus)
        resume_point = self._read_resume_point(json_config) if resume else None
        self._build_engine()
        # MFU (Chowdhery et al. 2022) against one device's peak; power and energy of rank 0's GPU (NVML)
        self.peak_flops = None  # only rank 0 writes metrics; the others wait for it at the next collective
        if self.rank == 0:  # on CPU the ranks of a node share its cores: each gets its share of the peak
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
            self.peak_flops, peak_source = peak_flops_per_device(device, self.precision, devices_sharing=local_ranks)
            log.info("MFU peak: %.3f TFLOP/s per device (%s)", self.peak_flops / 1e12, peak_source)
        self.telemetry = Telemetry(device, interval_s=0.5).start()
        self.start_step = self._load_resume_point(resume_point) if resume_point else 0
        self._init_words(resume_point)
        if resume_point and self.rank == 0:  # steps logged after the checkpoint are trained again
            dropped = drop_records_after(run.metrics_path, self.start_step)
            if dropped:
                log.info("metrics.jsonl: removed %d records of steps after %d, which this resume trains again",
                         dropped, self.start_step)
        trackers = build_trackers(recipe.logging, run.path, recipe.name, recipe.to_dict()) if self.rank == 0 else None
        self.metrics = MetricsWriter(run.metrics_path, enabled=self.rank == 0, sink=trackers)
        self._write_start()
        self.preempt = PreemptionFlag()
        self.nonfinite = NonFiniteGuard(recipe.train.max_nonfinite_steps)
        self._skipped_steps = getattr(self.engine, "skipped_steps", 0)  # DeepSpeed's overflow count (restored)
        self.progress, self.last_eval, self.checked_phase = None, None, None
        self.failed = False  # set by a stop that must not write the summary
        self.last_saved: tuple[int, Path | None] = (-1, None)  # (step, folder) of this process's last save

    # ---- building

    def _build_data(self, corpus: CorpusFiles) -> None:
        """Tokenizer, memory-mapped train/dev blocks, sampler and collators."""
        r, t = self.recipe, self.recipe.train
        _, local_rank, _ = dist_env()
        self.tokenizer, self.tok_hash = prepare_tokenizer(r, self.run.path, corpus.train, self.rank)
        cache_dir = Path(r.data.cache_dir) if r.data.cache_dir else self.run.path / "cache"
        if local_rank == 0:
            cache_dir.mkdir(parents=True, exist_ok=True)

        def blocks(files, name, limit):
            b = load_blocks(files, self.tokenizer, self.tok_hash, r.data.seq_len, cache_dir, r.data.num_proc,
                            local_rank == 0, name)  # one build per node; the others wait, then map it
            return b if limit is None else b[:limit]

        self.train_blocks = blocks(corpus.train, "train", r.data.max_train_blocks)
        self.dev_blocks = blocks(corpus.dev, "dev", r.data.max_eval_blocks)
        self.sampler = DistributedResumableSampler(len(self.train_blocks), t.micro_batch_size,
                                                   t.gradient_accumulation_steps, self.world, self.rank, t.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.n_steps = total_steps(self.phases, self.steps_per_epoch)
        self.clm_collator, self.mlm_collator = make_collators(r, self.tokenizer)
        self.collators = collators_for(self.clm_collator, self.mlm_collator)  # CLM, MLM, MNTP
        o = r.objective
        scheduled = o.mask_rate_end is not None or any(p.mask_rate for p in self.phases)
        self.mask_rate = (lambda step: mask_rate_at(step, self.phases, self.steps_per_epoch, o.mlm_probability,
                                                    o.mask_rate_end)) if scheduled else None
        self.tokens_per_step = self.sampler.global_batch * r.data.seq_len

    def _build_engine(self) -> None:
        """Model (kernel backends resolved once, for this device) and DeepSpeed engine."""
        r = self.recipe
        self.precision = resolve_precision(r, self.device)
        model = build_model(r.model, device=self.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.flop_model = FlopModel.from_module(model, r.model)  # before ZeRO-3 partitions the parameters
        compiled, why = resolve_compile(r, self.device, zero_stage(self.ds_config))
        if compiled:
            compile_layers(model)  # before DeepSpeed wraps the model; the graphs build at the first step
        self.engine = build_engine(model, r, self.ds_config, self.n_steps)
        for note in (self.zero_note, f"torch.compile: {'on' if compiled else 'off'} ({why})"):
            if note:
                log.info("%s", note)
        log.info(
            "antlm-dist %s | %s | world %d (%s) | ZeRO-%d | %s | %.2fM parameters | %d train / %d dev blocks of %d "
            "tokens", __version__, r.name, self.world, self.device.type, zero_stage(self.ds_config), self.precision,
            self.n_params / 1e6, len(self.train_blocks), len(self.dev_blocks), r.data.seq_len,
        )
        log.info(
            "schedule %s: %d steps/epoch × %d epochs = %d optimizer steps; global batch %d sequences = %d tokens "
            "per step", format_schedule(self.phases), self.steps_per_epoch, total_epochs(self.phases), self.n_steps,
            self.sampler.global_batch, self.tokens_per_step,
        )

    # ---- checkpoints

    def _init_words(self, resume_point) -> None:
        """Words seen at the start step, the word budget (which may end the run early) and the milestones.

        Raises:
            ConfigError: ``train.max_words_seen`` is below the words of the first step.
        """
        self.word_counter = WordCounter(self.train_blocks.words, self.sampler)
        saved = resume_point[1].words_seen if resume_point else 0
        self.words_seen = self.word_counter.words_after(self.start_step) if saved is None else saved
        self.milestones = Milestones.parse(self.recipe.checkpoint.milestones_words)
        if self.recipe.train.max_words_seen is None:
            return
        budget = parse_word_count(self.recipe.train.max_words_seen, "train.max_words_seen")
        end = self.word_counter.last_step_within(budget, self.n_steps)
        if end == 0:
            raise ConfigError(f"train.max_words_seen={budget} is less than the {self.word_counter.step_words(0)} "
                              "words of the first optimizer step; raise it or use a smaller global batch")
        if end < self.n_steps:  # the LR schedule (built for the whole schedule) is left as it is
            log.info("train.max_words_seen=%d ends the run after step %d of %d (%d words)", budget, end,
                     self.n_steps, self.word_counter.words_after(end))
            self.n_steps = end

    def client_state(self, step: int) -> ClientState:
        return ClientState(step=step, sampler=self.sampler.state_dict(step), schedule=format_schedule(self.phases),
                           tokenizer_hash=self.tok_hash, world_size=self.world, recipe=self.recipe.to_dict(),
                           words_seen=self.words_seen)

    def _read_resume_point(self, json_config: dict) -> tuple[str, ClientState]:
        """The newest intact tag (or the one given to --resume) and its state, checked against
        this run; switches the DeepSpeed config to the universal loader when the world size
        differs, and back to the JSON's ZeRO stage (``json_config``) when the checkpoint holds
        ZeRO partitions."""
        # verified against its manifest; a damaged newest one falls back to the newest intact one
        tag = select_resume_tag(self.run.checkpoints, self.resume if isinstance(self.resume, str) else None)
        _, state = read_client_state(self.run.checkpoints, tag)
        t = self.recipe.train
        other_world = check_resume(state, tag, global_batch=self.sampler.global_batch,
                                   micro_batch_size=t.micro_batch_size,
                                   gradient_accumulation_steps=t.gradient_accumulation_steps, world_size=self.world,
                                   schedule=format_schedule(self.phases), tok_hash=self.tok_hash)
        partitions = optimizer_partitions(self.run.checkpoints, tag)
        if self.zero_note and partitions == "zero":  # ZeRO partitions load into a ZeRO engine only
            self.ds_config = json_config
            self.zero_note = f"one rank: keeping the JSON's ZeRO stage {zero_stage(json_config)} to load {tag}"
        check_zero_stage(self.run.checkpoints, tag, zero_stage(self.ds_config))  # before DeepSpeed loads anything
        if other_world and partitions is None:
            raise CheckpointError(
                f"checkpoint {tag} was written under ZeRO stage 0 by {state.world_size} rank(s) and cannot be "
                f"resumed by {self.world}; resume it with {state.world_size} rank(s), or train one-rank runs "
                "that must move with distributed.single_rank_zero0=false")
        if other_world:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return tag, state

    def _load_resume_point(self, resume_point: tuple[str, ClientState]) -> int:
        """Collective: restore the engine (and RNG) from the checkpoint; returns its step."""
        tag, state = resume_point
        ckpt_dir = self.run.checkpoints
        start_step = self.sampler.step_from_state(state.sampler)
        if state.world_size != self.world:
            log.info("checkpoint %s was written by %d ranks, this run has %d: loading its universal form",
                     tag, state.world_size, self.world)
            load_checkpoint(self.engine, ckpt_dir, universal_tag(ckpt_dir, tag))
        else:
            load_checkpoint(self.engine, ckpt_dir, tag)
        phase = phase_for_step(min(start_step, self.n_steps - 1), self.phases, self.steps_per_epoch)
        log.info("resumed from %s at step %d (epoch %d, phase %s)", tag, start_step, state.sampler["epoch"],
                 phase.objective)
        return start_step

    def save(self, step: int) -> Path:
        """Collective: checkpoint ``step``, record it in metrics.jsonl and return its folder,
        with a ``checkpoint_deleted`` record for each older checkpoint that
        ``checkpoint.keep_last`` removed (so no ``checkpoint`` record is left pointing at nothing
        unannounced)."""
        keep_last = self.recipe.checkpoint.keep_last
        before = {p for p in self.run.checkpoints.glob(TAG_PREFIX + "*") if p.is_dir()}
        path = save_checkpoint(self.engine, self.run.checkpoints, step, self.client_state(step), keep_last,
                               zero_stage=zero_stage(self.ds_config))
        self.metrics.write("checkpoint", step=step, path=str(path), words_seen=self.words_seen)
        for gone in sorted(p for p in before if not p.exists()):
            self.metrics.write("checkpoint_deleted", step=step, path=str(gone),
                               reason=f"checkpoint.keep_last={keep_last}")
        self.last_saved = (step, path)
        return path

    def _write_start(self) -> None:
        self.run.write_start(dump_recipe(self.recipe), {
            "antlm_dist": __version__, "torch": torch.__version__, "world_size": self.world,
            "device": self.device.type, "zero_stage": zero_stage(self.ds_config), "parameters": self.n_params,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.n_steps, "tokenizer_hash": self.tok_hash,
            "global_batch": self.sampler.global_batch, "tokens_per_step": self.tokens_per_step,
        })
        self.metrics.write("start", step=self.start_step, resumed=bool(self.resume), world_size=self.world,
                           total_steps=self.n_steps)

    # ---- the loop

    def train(self) -> int:
        """Train from the start (or resume) step to the end of the schedule, or until a stop.

        Returns:
            The process exit status: 0, or :data:`PREEMPT_EXIT_CODE` after a preemption signal.
        """
        self.progress = self._progress_bar()
        if self.recipe.eval.at_start and self.start_step == 0 and len(self.dev_blocks):
            self.evaluate(0, "start")
        self.engine.train()
        run_start = time.perf_counter()
        step, exit_code = self.start_step, 0
        batches = BatchPrefetcher(self.train_blocks, self.sampler, self.collators, self.phases, self.steps_per_epoch,
                                  self.start_step, self.n_steps, mask_rate=self.mask_rate)
        try:
            for index, phase, micro in batches:  # micro-batches collated ahead by a background thread
                self.check_phase(index, phase)  # one all-reduce at a switch: every rank trains the same phase
                result = self.train_step(phase, micro)
                step = index + 1  # optimizer steps done
                words_before = self.words_seen
                self.words_seen += self.word_counter.step_words(index)  # the same sum on every rank, no collective
                self.log_step(step, phase, result)
                finite = self.check_finite(step, phase, result)  # same answer on every rank
                if finite:
                    self.maybe_evaluate(step, phase)
                # the stop vote was summed in the step's all-reduce, so every rank stops after the same step
                reason = self.stop_reason(step, result)
                if finite:  # never save a non-finite state: the last good checkpoint stays `latest`
                    self.maybe_checkpoint(step, phase, stopping=reason is not None)  # saved before stopping
                    self.maybe_export_milestones(step, words_before)
                if reason is not None and (step < self.n_steps or not finite):
                    exit_code = self.stop(step, reason, preempted=result.stop_votes > 0, phase=phase)
                    break
        finally:
            batches.close()
        self.finish(step, time.perf_counter() - run_start)
        return exit_code

    def train_step(self, phase, micro_batches) -> StepResult:
        """One optimizer step of ``phase`` on this rank's ``micro_batches``, timed and watched by telemetry."""
        t0 = time.perf_counter()
        with self.telemetry.window() as window:
            if phase.mix:  # objectives mixed inside the step: (objective, batch) pairs
                per, stop_votes = mixed_batch_step(self.engine, micro_batches, objectives=tuple(o for o, _ in phase.mix),
                                                   device=self.device, extra=self._closing_votes)
                sums = [sum(v[k] for v in per.values()) for k in ("loss_sum", "targets", "correct")]
                return StepResult(*sums, stop_votes, time.perf_counter() - t0, window, per)
            loss_sum, n_global, correct, stop_votes = global_batch_step(
                self.engine, micro_batches, causal=phase.causal, device=self.device,
                extra=self._closing_votes)  # the stop vote rides on the step's closing all-reduce
        return StepResult(loss_sum, n_global, correct, stop_votes, time.perf_counter() - t0, window)

    def _closing_votes(self) -> list[float]:
        """Called just before the all-reduce that ends the step, so a signal that arrived
        during the step's compute stops the run after this very step."""
        self._debug_delay()  # test-only: a slow step, so that a test can signal or stop a rank inside it
        return [float(self.preempt.requested)]

    # ---- what the loop calls

    def check_phase(self, step: int, phase) -> None:
        """At the first step and at every switch: all ranks must agree on the phase."""
        if self.checked_phase == phase.index:
            return
        believed = phase.index
        if self.debug.fault_phase_rank == self.rank:  # test-only: this rank believes the next phase
            believed += 1
        n_micro = self.world * self.recipe.train.gradient_accumulation_steps
        assignment = step_assignment(phase, step, n_micro) if phase.mix else ()  # covers a mixed phase too
        check_phase_agreement(phase, self.phases, step, local_index=believed, assignment=assignment)
        if self.checked_phase is not None:
            log.info("phase switch at step %d: %s -> %s (epoch %d)", step, self.phases[self.checked_phase].objective,
                     phase.objective, phase.epoch)
        self.checked_phase = phase.index

    def _debug_delay(self) -> None:
        if self.debug.step_delay_s:  # test-only: room for a launcher test to signal or kill a rank
            time.sleep(self.debug.step_delay_s)

    def log_step(self, step: int, phase, result: StepResult) -> None:
        """A ``train`` record every ``train.log_every_steps`` steps and at the end; the progress bar."""
        r = self.recipe
        if self.rank == 0 and (step % r.train.log_every_steps == 0 or step == self.n_steps):
            grad_norm = self.engine.get_global_grad_norm()
            per = result.per_objective or {phase.objective: {"loss_sum": result.loss_sum, "targets": result.n_targets,
                                                             "correct": result.n_correct, "weight": 1.0}}
            flops = sum(self.flop_model.step(self.sampler.global_batch * v["weight"], r.data.seq_len, is_causal(o),
                                             v["targets"]) for o, v in per.items())
            self.metrics.write(
                "train", step=step, epoch=phase.epoch, phase=phase.objective, loss=result.loss,
                accuracy=result.n_correct / max(result.n_targets, 1), lr=self.engine.get_lr()[0],
                tokens=self.tokens_per_step, target_tokens=int(result.n_targets), words_seen=self.words_seen,
                tokens_per_s=self.tokens_per_step / result.step_time_s, step_time_s=result.step_time_s,
                grad_norm=None if grad_norm is None else float(grad_norm),
                mfu=mfu(flops, result.step_time_s, self.peak_flops, self.world), **objective_fields(per),
                **({"mask_rate": self.mask_rate(step - 1)} if self.mask_rate else {}),  # scheduled rates only
                **result.window.summary.gpu_metrics(),
            )
        if self.progress is not None:
            self.progress.update(step, phase.objective, result.loss, self.tokens_per_step, result.step_time_s)

    def _phase_end(self, step: int, phase) -> bool:
        return step == phase.phase_end_step or step == self.n_steps

    def maybe_evaluate(self, step: int, phase) -> None:
        """Held-out evaluation at phase ends, at the end and every ``eval.every_steps``."""
        e, phase_end = self.recipe.eval, self._phase_end(step, phase)
        if len(self.dev_blocks) and ((phase_end and e.at_phase_end) or step == self.n_steps or
                                     (e.every_steps and step % e.every_steps == 0)):
            self.last_eval = self.evaluate(step, "end" if step == self.n_steps else
                                           ("phase_end" if phase_end else "periodic"))

    def evaluate(self, step: int, reason: str) -> dict:
        """Collective: held-out CLM and MLM loss (and MNTP when the schedule trains it),
        logged and written as an ``eval`` record."""
        extra = {"mntp": self.collators["MNTP"]} if "MNTP" in schedule_objectives(self.phases) else {}
        res = evaluate_heldout(self.engine, self.dev_blocks, self.clm_collator, self.mlm_collator,
                               self.recipe.eval.micro_batch_size, self.device, extra=extra)
        more = {f"{k}_{f}": res[k][f] for k in extra for f in ("loss", "accuracy")}
        self.metrics.write("eval", step=step, reason=reason, clm_loss=res["clm"]["loss"], clm_ppl=res["clm"]["ppl"],
                           mlm_loss=res["mlm"]["loss"], mlm_accuracy=res["mlm"]["accuracy"], **more)
        log.info("eval @ step %d (%s): CLM loss %.4f (ppl %.1f) | MLM loss %.4f (acc %.3f)%s", step, reason,
                 res["clm"]["loss"], res["clm"]["ppl"], res["mlm"]["loss"], res["mlm"]["accuracy"],
                 "".join(f" | {k.upper()} loss {res[k]['loss']:.4f} (acc {res[k]['accuracy']:.3f})" for k in extra))
        return res

    def check_finite(self, step: int, phase, result: StepResult) -> bool:
        """Count a non-finite loss or gradient norm, or a step DeepSpeed skipped for an overflow."""
        grad_norm = self.engine.get_global_grad_norm()
        skipped = getattr(self.engine, "skipped_steps", 0)
        was_skipped, self._skipped_steps = skipped > self._skipped_steps, skipped
        return self.nonfinite.update(step, phase.objective, result.loss,
                                     None if grad_norm is None else float(grad_norm), was_skipped)

    def stop_reason(self, step: int, result: StepResult) -> str | None:
        """Why the run stops after ``step`` (non-finite steps, a preemption vote or
        ``train.stop_at_step``), or None. A non-finite last step also stops it: there is no
        finite state to save as the run's result."""
        if self.nonfinite.exhausted or (self.nonfinite.consecutive and step == self.n_steps):
            return "non-finite"
        if result.stop_votes > 0:
            return "preemption signal"
        stop_at = self.recipe.train.stop_at_step
        if stop_at is not None and step >= stop_at:
            return f"train.stop_at_step={stop_at}"
        return None

    def maybe_checkpoint(self, step: int, phase, stopping: bool) -> None:
        """Checkpoint at the end, before a stop, at phase switches and every ``checkpoint.every_steps``."""
        c = self.recipe.checkpoint
        if (step == self.n_steps or stopping or (self._phase_end(step, phase) and c.at_phase_switch)
                or (c.every_steps and step % c.every_steps == 0)):
            if stopping and self.rank == 0:  # every rank voted at the end of this step
                log.warning("every rank stops after step %d: checkpointing it first", step)
            self.save(step)

    def maybe_export_milestones(self, step: int, words_before: int) -> None:
        """Collective: for the ``checkpoint.milestones_words`` this step reached, checkpoint the step
        (every rank; reused when already saved) and export it to ``<run>/hf/chck_<N>`` (rank 0)."""
        reached = self.milestones.crossed(words_before, self.words_seen)
        if not reached:
            return
        tag_dir = self.last_saved[1] if self.last_saved[0] == step else self.save(step)
        if self.rank == 0:  # the other ranks go on and wait in the next step's first collective
            for record in export_milestones(tag_dir, self.run.path / "hf", reached):
                self.metrics.write("milestone", step=step, words_seen=self.words_seen, **record)

    def stop(self, step: int, reason: str, preempted: bool, phase=None) -> int:
        """Record an early stop; returns the exit status (75 after preemption, for a requeue;
        :data:`NONFINITE_EXIT_CODE` after non-finite steps)."""
        if reason == "non-finite":
            message = self.nonfinite.message(step, phase.objective)
            log.error("stopping at step %d: %s", step, message)
            if self.rank == 0:
                print(f"antlm-train: error: {message}", file=sys.stderr, flush=True)
            self.metrics.write("stop", step=step, reason=reason, error=message)
            self.failed = True
            return NONFINITE_EXIT_CODE
        if self.rank == 0:  # every rank stops; one line says so
            log.warning("stopping at step %d (%s); continue with --resume", step, reason)
        self.metrics.write("stop", step=step, reason=reason)
        if preempted:
            self.run.mark_preempted(step)
            return PREEMPT_EXIT_CODE
        return 0

    def finish(self, step: int, elapsed_s: float) -> None:
        """Close the progress bar, telemetry and metrics; after the last step write the summary."""
        if self.progress is not None:
            self.progress.close()
        if self.rank == 0 and step == self.n_steps and not self.failed:
            ckpt_dir = self.run.checkpoints
            summary = {
                "recipe": self.recipe.name, "schedule": format_schedule(self.phases), "steps": self.n_steps,
                "world_size": self.world, "zero_stage": zero_stage(self.ds_config), "parameters": self.n_params,
                "wall_time_s": elapsed_s, "words_seen": self.words_seen,
                "tokens_per_s": (self.n_steps - self.start_step) * self.tokens_per_step / max(elapsed_s, 1e-9),
                "final_eval": self.last_eval, "checkpoint": str(ckpt_dir / (latest_tag(ckpt_dir) or "")),
            }
            self.run.write_summary(summary)
            self.metrics.write("summary", **summary)
            log.info("done: %d steps in %.1f s; final eval %s; checkpoint %s", self.n_steps, elapsed_s,
                     json.dumps({k: round(v["loss"], 4) for k, v in (self.last_eval or {}).items()}),
                     summary["checkpoint"])
        self.telemetry.stop()
        self.metrics.close()
        if self.rank == 0 and self.recipe.logging.plots:
            plot_run_or_warn(self.run.path)

    def _progress_bar(self):
        """Rank 0's :class:`~antlm_dist.progress.ProgressReporter` (bar on a terminal, periodic line), else None."""
        if self.rank != 0:
            return None
        return ProgressReporter(self.n_steps, self.start_step, interval_s=self.recipe.logging.progress_interval_s,
                                bar=bar_wanted())
