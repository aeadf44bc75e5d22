"""``antlm-train``: AntLM pretraining under DeepSpeed, top to bottom.

``main()`` builds the components, then runs one visible loop: choose phase, get batch,
forward, backward, step, log, evaluate, checkpoint. The phase is a pure function of the
global optimizer step (:func:`antlm_dist.schedule.phase_for_step`); ranks check that they
agree at every switch and after every resume.

Loss normalisation: each micro-batch's summed loss is divided by the number of target
tokens in the whole global batch (all micro-batches and all ranks), so an MLM
micro-batch with few masked tokens weighs exactly as much as its tokens.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from antlm_dist import __version__
from antlm_dist.telemetry.flops import FlopModel, mfu, peak_flops_per_device
from antlm_dist.checkpoint import (CheckpointError, latest_tag, load_checkpoint, read_client_state, save_checkpoint,
                                   universal_tag)
from antlm_dist.config import ConfigError, Recipe, dump_recipe, load_recipe
from antlm_dist.data.collators import CLMCollator, MLMCollator
from antlm_dist.data.corpus import find_corpus
from antlm_dist.data.dataset import blocks_array, build_packed_dataset
from antlm_dist.data.sampler import DistributedResumableSampler, derive_seed
from antlm_dist.data.tokenizer import (check_vocab_matches, load_tokenizer, save_tokenizer, special_token_ids,
                                       tokenizer_hash, train_tokenizer)
from antlm_dist.distributed import (all_reduce_sum, barrier, build_ds_config, build_engine, check_build_locks, dist_env,
                                    init_distributed, pick_device, resolve_precision, world_info, zero_stage)
from antlm_dist.eval.heldout import evaluate_heldout
from antlm_dist.faults import comm_failure_message, format_rank_table, gather_rank_addresses, is_comm_failure
from antlm_dist.metrics import MetricsWriter
from antlm_dist.model import build_model
from antlm_dist.schedule import (PhaseDesyncError, check_phase_agreement, format_schedule, parse_schedule,
                                 phase_for_step, total_epochs, total_steps)
from antlm_dist.telemetry import Telemetry

log = logging.getLogger("antlm_dist")

PREEMPT_EXIT_CODE = 75
"""Exit status after a signal-triggered checkpoint (EX_TEMPFAIL); the sbatch script requeues on it."""
TEST_STEP_DELAY_ENV = "ANTLM_TEST_STEP_DELAY_S"
"""Test-only: sleep this many seconds after every optimizer step, so that a launcher test can
signal or kill a rank mid-phase (the tiny test recipe otherwise trains 12 steps in ~1 s)."""
PREEMPTED_MARKER = "PREEMPTED"
"""Written into the run folder beside exit status 75, because torchrun reports any failed
worker as exit status 1: launch/slurm/antlm.sbatch requeues when it finds this file.
Removed when the next run in the folder starts."""
RUN_MARKERS = ("run.json", "metrics.jsonl", "checkpoints")
_RANK_ADDRESSES: list = []  # (hostname, addresses) per global rank, gathered at start-up
_TIMEOUT_MINUTES: list = []


# ----------------------------------------------------------------------------- arguments

def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="antlm-train",
        description="AntLM pretraining: alternating CLM/MLM phases on one backbone under DeepSpeed.",
    )
    p.add_argument("--config", default="demo-cpu", help="recipe YAML path or shipped recipe name (default: demo-cpu)")
    p.add_argument("--output-dir", required=True, help="run folder: tokenizer, metrics.jsonl, checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in --output-dir first")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="local ranks to start when run without a launcher (default: distributed.nproc_per_node)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 objective.schedule=1_CLM+1_MLM")
    return p


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: a folder holding another run needs --resume or --overwrite.

    Raises:
        ConfigError: naming the folder and both options.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; give one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file; give a folder")
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if holds_run and not (resume or overwrite):
        raise ConfigError(
            f"--output-dir {out} already holds a run; pass --resume to continue it, --overwrite to "
            "replace it, or choose another folder"
        )
    if resume and not (out / "checkpoints").is_dir():
        raise ConfigError(f"--resume: {out}/checkpoints does not exist; start without --resume")


def preflight(args: argparse.Namespace, world_size: int):
    """Every check that needs no compute, run before any rank trains.

    Validates the recipe, that no abandoned torch-extension build lock would hang the start,
    the output folder, the corpus (exists, non-empty, UTF-8), the DeepSpeed JSON against the
    recipe's batch sizes for ``world_size``, and a given ``tokenizer.path`` against
    ``model.vocab_size``.

    Returns:
        (recipe, corpus files).

    Raises:
        ConfigError, CorpusError, ScheduleError, TokenizerError, StaleBuildLockError: naming
        field and fix.
    """
    recipe = load_recipe(args.config, args.overrides)
    check_build_locks()
    check_output_dir(Path(args.output_dir), args.resume, args.overwrite)
    corpus = find_corpus(recipe.data.corpus)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    build_ds_config(recipe, world_size, device, recipe_source=str(args.config))
    if recipe.tokenizer.path:
        check_vocab_matches(load_tokenizer(recipe.tokenizer.path, recipe.tokenizer.kind), recipe.model.vocab_size,
                            f"tokenizer.path={recipe.tokenizer.path}")
    return recipe, corpus


# ----------------------------------------------------------------------------- data

def _cache_key(files, tok_hash: str, seq_len: int) -> str:
    h = hashlib.sha256(f"{tok_hash}:{seq_len}".encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_blocks(files, tokenizer, tok_hash: str, seq_len: int, cache_dir: Path, num_proc: int,
                build: bool, name: str) -> torch.Tensor:
    """(N, T) int64 packed blocks, built once per node into ``cache_dir`` and then memory-mapped."""
    if not files:
        return torch.zeros(0, seq_len, dtype=torch.long)
    path = cache_dir / f"{name}-{_cache_key(files, tok_hash, seq_len)}.npy"
    if build and not path.is_file():
        ds = build_packed_dataset(files, tokenizer, seq_len, cache_dir / "hf", num_proc=num_proc, desc=name)
        arr = blocks_array(ds)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
    barrier()
    return torch.from_numpy(np.load(path).astype(np.int64))


def prepare_tokenizer(recipe: Recipe, out: Path, train_files, rank: int):
    """Load ``tokenizer.path`` or the run's saved tokenizer, else train one on rank 0."""
    run_tok = out / "tokenizer" / "tokenizer.json"
    if rank == 0 and not run_tok.is_file():
        if recipe.tokenizer.path:
            save_tokenizer(load_tokenizer(recipe.tokenizer.path, recipe.tokenizer.kind), out / "tokenizer")
        else:
            vocab = recipe.tokenizer.vocab_size or recipe.model.vocab_size
            kind = recipe.tokenizer.kind
            log.info("training a %s tokenizer (%d tokens) on %d files", kind, vocab, len(train_files))
            save_tokenizer(train_tokenizer(train_files, vocab, recipe.tokenizer.min_frequency, kind),
                           out / "tokenizer", kind)
    barrier()
    tok = load_tokenizer(run_tok, recipe.tokenizer.kind)
    check_vocab_matches(tok, recipe.model.vocab_size, str(recipe.tokenizer.path or run_tok))
    return tok, tokenizer_hash(run_tok)


def make_collators(recipe: Recipe, tok):
    special = special_token_ids(tok)  # by role (pad, bos, eos, unk, mask), whatever the tokenizer kind
    clm = CLMCollator(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, document_mask=recipe.data.document_mask)
    kwargs = dict(mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, special_ids=special,
                  vocab_size=recipe.model.vocab_size, seed=recipe.train.seed,
                  mlm_probability=recipe.objective.mlm_probability, mlm_target=recipe.objective.mlm_target,
                  document_mask=recipe.data.document_mask)
    if recipe.objective.masking == "span":
        from antlm_dist.data.span_masking import SpanMLMCollator

        mlm = SpanMLMCollator(**kwargs)
    else:
        mlm = MLMCollator(**kwargs)
    return clm, mlm


# ----------------------------------------------------------------------------- one optimizer step

def train_step(engine, micro_batches, *, causal: bool, device, extra=()) -> tuple[float, ...]:
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
            preemption flag), returned after the standard ones.

    Returns:
        (global summed loss in nats, N_global, global top-1 hits, *summed extras).
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
        engine.step()
        sums[0] += res.loss_sum.detach().double()
        sums[1] += res.n_correct.double()
    loss_sum, correct = sums.tolist()
    loss_total, correct_total, *rest = all_reduce_sum([loss_sum, correct, *extra], device)
    return (loss_total, n_global, correct_total, *rest)


# ----------------------------------------------------------------------------- preemption

class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (``ANTLM_PREEMPT_SIGNALS``); all-reduced (MAX) once per step."""

    def __init__(self):
        self.requested = False
        names = os.environ.get("ANTLM_PREEMPT_SIGNALS", "SIGTERM,SIGUSR1")
        for name in filter(None, (n.strip() for n in names.split(","))):
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        log.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)


# ----------------------------------------------------------------------------- main

def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("DeepSpeed", "deepspeed", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """One rank of a training run. Returns the process exit status."""
    _, local_rank, env_world = dist_env()
    recipe, corpus = preflight(args, env_world)
    out = Path(args.output_dir)
    phases = parse_schedule(recipe.objective.schedule)
    device = pick_device(local_rank)
    setup_logging(int(os.environ.get("RANK", 0)))
    init_distributed(recipe, device)
    rank, world = world_info()
    _RANK_ADDRESSES[:] = gather_rank_addresses()  # to name a lost rank if a collective fails
    _TIMEOUT_MINUTES[:] = [recipe.distributed.timeout_minutes]
    if world > 1:
        log.info("%d ranks on %d hosts: %s", world, len({h for h, _ in _RANK_ADDRESSES}),
                 format_rank_table(_RANK_ADDRESSES))
    ds_config = build_ds_config(recipe, world, device, recipe_source=str(args.config))
    torch.manual_seed(derive_seed(recipe.train.seed, rank))

    if rank == 0 and args.overwrite and out.exists():
        for m in RUN_MARKERS + ("tokenizer", "summary.json", "recipe.yaml", "logs"):
            target = out / m
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / PREEMPTED_MARKER).unlink(missing_ok=True)
    barrier()

    # ---- tokenizer and data
    tok, tok_hash = prepare_tokenizer(recipe, out, corpus.train, rank)
    cache_dir = Path(recipe.data.cache_dir) if recipe.data.cache_dir else out / "cache"
    if local_rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
    train_blocks = load_blocks(corpus.train, tok, tok_hash, recipe.data.seq_len, cache_dir, recipe.data.num_proc,
                               local_rank == 0, "train")
    if recipe.data.max_train_blocks is not None:
        train_blocks = train_blocks[: recipe.data.max_train_blocks]
    dev_blocks = load_blocks(corpus.dev, tok, tok_hash, recipe.data.seq_len, cache_dir, recipe.data.num_proc,
                             local_rank == 0, "dev")
    if recipe.data.max_eval_blocks is not None:
        dev_blocks = dev_blocks[: recipe.data.max_eval_blocks]
    t = recipe.train
    sampler = DistributedResumableSampler(len(train_blocks), t.micro_batch_size, t.gradient_accumulation_steps,
                                          world, rank, t.seed)
    steps_per_epoch = sampler.steps_per_epoch
    n_steps = total_steps(phases, steps_per_epoch)
    clm_collator, mlm_collator = make_collators(recipe, tok)
    collators = {"CLM": clm_collator, "MLM": mlm_collator}
    tokens_per_step = sampler.global_batch * recipe.data.seq_len

    # ---- resume: read the checkpoint's client state before the engine exists, because a
    # different world size needs DeepSpeed's universal-checkpoint loader configured up front
    ckpt_dir = out / "checkpoints"
    resume_tag, resume_state = None, None
    if args.resume:
        resume_tag = latest_tag(ckpt_dir)
        if resume_tag is None:
            raise CheckpointError(f"--resume: no complete checkpoint under {ckpt_dir}")
        _, resume_state = read_client_state(ckpt_dir, resume_tag)
        saved_batch = resume_state["sampler"]["global_batch"]
        if saved_batch != sampler.global_batch:
            per_step = t.micro_batch_size * world
            hint = (f"set train.gradient_accumulation_steps={saved_batch // per_step}" if saved_batch % per_step == 0
                    else "choose train.micro_batch_size and train.gradient_accumulation_steps to match")
            raise CheckpointError(
                f"checkpoint {resume_tag} was trained with a global batch of {saved_batch} sequences (world size "
                f"{resume_state['world_size']}) but this run has {sampler.global_batch} (train.micro_batch_size "
                f"{t.micro_batch_size} × train.gradient_accumulation_steps {t.gradient_accumulation_steps} × world "
                f"size {world}); the global batch must stay constant across resumes: {hint}"
            )
        if resume_state["schedule"] != format_schedule(phases):
            raise CheckpointError(
                f"checkpoint {resume_tag} was trained with schedule {resume_state['schedule']!r} but the recipe says "
                f"{format_schedule(phases)!r}; resume with the same objective.schedule"
            )
        if resume_state["tokenizer_hash"] != tok_hash:
            raise CheckpointError(
                f"checkpoint {resume_tag} used another tokenizer (hash {resume_state['tokenizer_hash'][:12]}…)"
            )
        if resume_state["world_size"] != world:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True

    # ---- model and engine
    precision = resolve_precision(recipe, device)
    model = build_model(recipe.model)
    n_params = sum(p.numel() for p in model.parameters())
    flop_model = FlopModel.from_module(model, recipe.model)  # before ZeRO-3 partitions the parameters
    engine = build_engine(model, recipe, ds_config, n_steps)
    log.info(
        "antlm-dist %s | %s | world %d (%s) | ZeRO-%d | %s | %.2fM parameters | %d train / %d dev blocks of %d tokens",
        __version__, recipe.name, world, device.type, zero_stage(ds_config), precision,
        n_params / 1e6, len(train_blocks), len(dev_blocks), recipe.data.seq_len,
    )
    log.info(
        "schedule %s: %d steps/epoch × %d epochs = %d optimizer steps; global batch %d sequences = %d tokens per step",
        format_schedule(phases), steps_per_epoch, total_epochs(phases), n_steps, sampler.global_batch,
        tokens_per_step,
    )

    # MFU (Chowdhery et al. 2022) against one device's peak; power and energy of rank 0's GPU (NVML)
    peak_flops, peak_source = peak_flops_per_device(device, precision, matmul_size=1024)
    log.info("MFU peak: %.2f TFLOP/s per device (%s)", peak_flops / 1e12, peak_source)
    telemetry = Telemetry(device, interval_s=0.5).start()

    # ---- resume
    start_step = 0
    if args.resume:
        tag, state = resume_tag, resume_state
        start_step = sampler.step_from_state(state["sampler"])
        if state["world_size"] != world:
            log.info("checkpoint %s was written by %d ranks, this run has %d: loading its universal form",
                     tag, state["world_size"], world)
            load_checkpoint(engine, ckpt_dir, universal_tag(ckpt_dir, tag))
        else:
            load_checkpoint(engine, ckpt_dir, tag)
        log.info("resumed from %s at step %d (epoch %d, phase %s)", tag, start_step,
                 state["sampler"]["epoch"], phase_for_step(min(start_step, n_steps - 1), phases, steps_per_epoch).objective)

    metrics = MetricsWriter(out / "metrics.jsonl", enabled=rank == 0)
    if rank == 0:
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
        (out / "run.json").write_text(json.dumps({
            "antlm_dist": __version__, "torch": torch.__version__, "world_size": world,
            "device": device.type, "zero_stage": zero_stage(ds_config), "parameters": n_params,
            "steps_per_epoch": steps_per_epoch, "total_steps": n_steps, "tokenizer_hash": tok_hash,
            "global_batch": sampler.global_batch, "tokens_per_step": tokens_per_step,
        }, indent=1))
        metrics.write("start", step=start_step, resumed=args.resume, world_size=world, total_steps=n_steps)

    def client_state(step: int) -> dict:
        return {"step": step, "sampler": sampler.state_dict(step), "schedule": format_schedule(phases),
                "tokenizer_hash": tok_hash, "world_size": world, "recipe": recipe.to_dict()}

    def evaluate(step: int, reason: str) -> dict:
        res = evaluate_heldout(engine, dev_blocks, clm_collator, mlm_collator, recipe.eval.micro_batch_size, device)
        metrics.write("eval", step=step, reason=reason, clm_loss=res["clm"]["loss"], clm_ppl=res["clm"]["ppl"],
                      mlm_loss=res["mlm"]["loss"], mlm_accuracy=res["mlm"]["accuracy"])
        log.info("eval @ step %d (%s): CLM loss %.4f (ppl %.1f) | MLM loss %.4f (acc %.3f)", step, reason,
                 res["clm"]["loss"], res["clm"]["ppl"], res["mlm"]["loss"], res["mlm"]["accuracy"])
        return res

    # ---- the loop
    preempt = PreemptionFlag()
    progress = None
    if rank == 0:
        from tqdm.auto import tqdm

        progress = tqdm(total=n_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty() and os.environ.get("ANTLM_PROGRESS") != "1")
    if recipe.eval.at_start and start_step == 0 and len(dev_blocks):
        evaluate(0, "start")
    last_eval = None
    checked_phase = None
    engine.train()
    run_start = time.perf_counter()
    step = start_step
    exit_code = 0
    while step < n_steps:
        phase = phase_for_step(step, phases, steps_per_epoch)
        if checked_phase != phase.index:
            check_phase_agreement(phase, phases, step)
            if checked_phase is not None:
                log.info("phase switch at step %d: %s -> %s (epoch %d)", step, phases[checked_phase].objective,
                         phase.objective, phase.epoch)
            checked_phase = phase.index
        collator = collators[phase.objective]
        t0 = time.perf_counter()
        with telemetry.window() as energy:
            micro = [collator(train_blocks[torch.as_tensor(ids)], ids, phase.epoch) for ids in sampler.micro_batches(step)]
            loss_total, n_global, correct_total, stop_votes = train_step(
                engine, micro, causal=phase.causal, device=device, extra=[float(preempt.requested)])
        step_time = time.perf_counter() - t0
        step += 1
        if os.environ.get(TEST_STEP_DELAY_ENV):
            time.sleep(float(os.environ[TEST_STEP_DELAY_ENV]))
        if rank == 0 and (step % t.log_every_steps == 0 or step == n_steps):
            grad_norm = engine.get_global_grad_norm()
            metrics.write(
                "train", step=step, epoch=phase.epoch, phase=phase.objective, loss=loss_total / max(n_global, 1),
                accuracy=correct_total / max(n_global, 1), lr=engine.get_lr()[0], tokens=tokens_per_step,
                target_tokens=int(n_global), tokens_per_s=tokens_per_step / step_time, step_time_s=step_time,
                grad_norm=None if grad_norm is None else float(grad_norm),
                mfu=mfu(flop_model.step(sampler.global_batch, recipe.data.seq_len, phase.causal, n_global),
                        step_time, peak_flops, world),
                **energy.summary.gpu_metrics(),
            )
        if progress is not None:
            progress.update(1)
            progress.set_postfix(phase=phase.objective, loss=f"{loss_total / max(n_global, 1):.3f}")
        phase_end = step == phase.phase_end_step or step == n_steps
        if len(dev_blocks) and ((phase_end and recipe.eval.at_phase_end) or step == n_steps or
                                (recipe.eval.every_steps and step % recipe.eval.every_steps == 0)):
            last_eval = evaluate(step, "end" if step == n_steps else ("phase_end" if phase_end else "periodic"))
        stopping = stop_votes > 0 or (t.stop_at_step is not None and step >= t.stop_at_step)
        if (step == n_steps or stopping or (phase_end and recipe.checkpoint.at_phase_switch)
                or (recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0)):
            path = save_checkpoint(engine, ckpt_dir, step, client_state(step), recipe.checkpoint.keep_last)
            metrics.write("checkpoint", step=step, path=str(path))
        if stopping and step < n_steps:
            reason = "preemption signal" if stop_votes > 0 else f"train.stop_at_step={t.stop_at_step}"
            log.warning("stopping at step %d (%s); continue with --resume", step, reason)
            metrics.write("stop", step=step, reason=reason)
            exit_code = PREEMPT_EXIT_CODE if stop_votes > 0 else 0
            if rank == 0 and stop_votes > 0:
                (out / PREEMPTED_MARKER).write_text(f"{step}\n")
            break
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - run_start
    if rank == 0 and step == n_steps:
        summary = {
            "recipe": recipe.name, "schedule": format_schedule(phases), "steps": n_steps, "world_size": world,
            "zero_stage": zero_stage(ds_config), "parameters": n_params, "wall_time_s": elapsed,
            "tokens_per_s": (n_steps - start_step) * tokens_per_step / max(elapsed, 1e-9),
            "final_eval": last_eval, "checkpoint": str(ckpt_dir / (latest_tag(ckpt_dir) or "")),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        metrics.write("summary", **summary)
        log.info("done: %d steps in %.1f s; final eval %s; checkpoint %s", n_steps, elapsed,
                 json.dumps({k: round(v["loss"], 4) for k, v in (last_eval or {}).items()}), summary["checkpoint"])
    telemetry.stop()
    metrics.close()
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_intermixed_args(argv)
    try:
        code = run(args)
    except (ConfigError, CheckpointError, ValueError) as exc:
        logging.getLogger("antlm_dist").debug("start-up error", exc_info=True)
        print(f"antlm-train: error: {exc}", file=sys.stderr)
        code = 2
    except RuntimeError as exc:
        if isinstance(exc, PhaseDesyncError) or not is_comm_failure(exc):
            raise
        rank, world = world_info()
        print(comm_failure_message(exc, _RANK_ADDRESSES, rank, world, (_TIMEOUT_MINUTES or [0])[0]),
              file=sys.stderr, flush=True)
        os._exit(1)  # the process group is broken: tearing it down could block on the dead peer
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
    return code


if __name__ == "__main__":
    sys.exit(main())
