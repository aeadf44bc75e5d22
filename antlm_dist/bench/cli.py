"""``antlm-bench``: the AntLM training step against the BabyLlama reference, over a matrix.

    antlm-bench --config demo-cpu --config babyllama-58m-antlm --out runs/bench \\
        --phases clm,mlm --micro-batch 8 --steps 5 --warmup 2 --profile
    antlm-bench --compare runs/a/bench.json runs/b/bench.json

The matrix is phase × attention × loss × ZeRO stage × compile × micro-batch, for each ``--config``;
attention and loss default to what ``auto`` resolves to on this device (on CPU: sdpa and
the torch loss; "triton" on CPU would run the Triton interpreter, far too slow to time).
Positional ``section.key=value`` overrides apply to every recipe. Writes ``bench.json``,
``bench.md`` and ``bench.png`` into ``--out``. Exit status 2 on a usage or recipe error.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import socket
import sys
from pathlib import Path

log = logging.getLogger("antlm_dist.bench")


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="antlm-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None,
                   help="recipe YAML or shipped recipe name; repeat for several (default: demo-cpu)")
    p.add_argument("--out", default=None, help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--phases", default="clm,mlm", help="comma list of clm, mlm (default: both)")
    p.add_argument("--attention", default="auto", help="comma list of sdpa, triton, eager (default: auto's choice)")
    p.add_argument("--loss", default="auto", help="comma list of torch, triton (default: auto's choice)")
    p.add_argument("--zero", default=None, help="comma list of ZeRO stages 0-3 (default: the recipe's JSON)")
    p.add_argument("--micro-batch", default=None, help="comma list of micro-batch sizes (default: the recipe's)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per runner and phase (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per runner and phase (default 3)")
    p.add_argument("--data", choices=("synthetic", "corpus"), default="synthetic",
                   help="synthetic uniform tokens (default) or the recipe's corpus, tokenised and packed")
    p.add_argument("--compile", default="auto",
                   help="comma list of off, on: torch.compile the transformer blocks (default: auto, what "
                        "train.compile resolves to on this device: on with CUDA, off on CPU)")
    p.add_argument("--baselines", default="eager,compiled",
                   help="comma list of HF reference steps: eager (the BabyLlama recipe), compiled (the same under "
                        "torch.compile) (default: both)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the HF reference steps")
    p.add_argument("--profile", action="store_true",
                   help="profile --profile-steps more steps of every runner and phase (torch.profiler) for bench.md")
    p.add_argument("--profile-steps", type=int, default=3,
                   help="profiled steps per runner and phase; the least disturbed one is reported (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice). On a shared, oversubscribed CPU use 1: "
                        "multi-threaded ops wait for descheduled threads and their times become erratic")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print B ÷ A tokens/s and exit")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides for every config, e.g. data.seq_len=64")
    return p


def _csv(text: str | None, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()] if text else []


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _machine(device) -> dict:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {"device": device.type, "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "hostname": socket.gethostname()}


def _versions() -> dict:
    import deepspeed
    import torch
    import transformers

    from antlm_dist import __version__

    return {"antlm_dist": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Run the matrix and write the reports. Returns the ``bench.json`` content."""
    import torch

    from antlm_dist.bench.report import write_json, write_markdown, write_plot
    from antlm_dist.config import load_recipe
    from antlm_dist.distributed import pick_device, resolve_precision
    from antlm_dist.telemetry.flops import mfu, peak_flops_per_device

    _check_args(args)
    load_start = _load_average()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    configs = args.config or ["demo-cpu"]
    recipes = [(c, load_recipe(c, args.overrides)) for c in configs]
    # as a rank does: on CPU, DeepSpeed's CPU accelerator and the op that launch/setup.sh prebuilt
    device = pick_device(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    matrix = _matrix(args, recipes[0][1], device)
    _init_single_process(recipes[0][1], device)
    precision = resolve_precision(recipes[0][1], device)
    peak, peak_source = peak_flops_per_device(device, precision)
    log.info("peak for MFU: %.3f TFLOP/s (%s)", peak / 1e12, peak_source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = _run_matrix(args, recipes, matrix, device, precision, peak, out)
    peak_start = peak
    if "measured" in peak_source:
        # A busy moment at start-up lowers the measured peak (and would raise every MFU); other
        # processes only ever slow a matmul down, so the larger of two measurements is the better one.
        peak = max(peak, peak_flops_per_device(device, precision)[0])
        for rec in records:
            rec["mfu"] = mfu(rec["model_flops_per_step"], rec["step_time_s"]["median"], peak)
    result = {
        "schema": 1,
        "started": started,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "antlm-bench " + shlex.join(argv),
        "machine": {**_machine(device), "load_average_1min_start": load_start,
                    "load_average_1min_end": _load_average()},
        "versions": _versions(),
        "peak_flops": {"flops_per_s": peak, "source": peak_source, "start_flops_per_s": peak_start},
        "precision": precision,
        "plan": {"configs": configs, **matrix, "zero": matrix["zero"] or "recipe",
                 "micro_batch": matrix["micro_batch"] or "recipe", "steps": args.steps,
                 "warmup": args.warmup, "data": args.data, "baselines": matrix["baselines"],
                 "profile_steps": args.profile_steps if args.profile else 0, "overrides": args.overrides},
        "records": records,
        "notes": [],
    }
    if device.type == "cpu":
        result["notes"].append(
            "CPU: the MFU peak is a 2048x2048 matmul on all cores, measured at start-up and again at the end (the larger "
            f"is used: {peak_start / 1e12:.3f} then {peak / 1e12:.3f} TFLOP/s), not a datasheet figure; "
            "peak memory is process RSS (psutil), sampled every 20 ms, and so approximate.")
    noisy = noisy_ratio_notes(records, args.steps)
    for note in noisy:
        log.warning("%s", note)
    result["notes"] += noisy
    write_json(out / "bench.json", result)
    write_markdown(out / "bench.md", result)
    write_plot(out / "bench.png", result)
    return result


NOISY_SPREAD = 0.20
"""Step-time spread (p90 − p10) / median above which a record's ratios are called noisy."""


def noisy_ratio_notes(records: list[dict], steps: int) -> list[str]:
    """One warning per record whose timed steps spread more than :data:`NOISY_SPREAD` of their
    median (p10 to p90): a speed-up or MFU from it can be off by about that much."""
    notes = []
    for r in records:
        st = r["step_time_s"]
        spread = (st["p90"] - st["p10"]) / max(st["median"], 1e-12)
        if spread > NOISY_SPREAD:
            notes.append(f"{r['config']} {r['phase']} {r['label']} mb {r['micro_batch']}: step times spread "
                         f"{100 * spread:.0f}% of the median (p10-p90) over {steps} timed steps; its tokens/s, "
                         "MFU and speed-up are that uncertain: raise --steps or run on a quieter machine")
    return notes


def _check_args(args: argparse.Namespace) -> None:
    """Raises ConfigError for a missing --out, a launcher, or too few steps; sets --threads."""
    import torch

    from antlm_dist.config import ConfigError

    if args.out is None:
        raise ConfigError("--out DIR is required (where bench.json, bench.md and bench.png go)")
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConfigError("antlm-bench runs as one process (world size 1); start it without a launcher")
    if args.steps < 1 or args.warmup < 1:
        raise ConfigError(f"--steps ({args.steps}) and --warmup ({args.warmup}) must be >= 1 "
                          "(peak memory is read during the warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = _load_average()
    if (not torch.cuda.is_available() and torch.get_num_threads() > 1 and load is not None
            and load > (os.cpu_count() or 1)):
        log.warning("load average %.1f on %d CPU cores: with %d torch threads per op, steps wait for descheduled "
                    "threads and time erratically; --threads 1 measures more steadily", load,
                    os.cpu_count(), torch.get_num_threads())


def _matrix(args: argparse.Namespace, recipe, device) -> dict:
    """The swept values: ``{"phases", "attention", "loss", "zero", "micro_batch"}``, backends
    resolved for ``device`` as the trainer resolves them.

    Raises:
        ConfigError: naming the bad option.
    """
    from antlm_dist.bench.harness import PHASES
    from antlm_dist.config import ConfigError
    from antlm_dist.kernels.backend import BackendError, resolve_attention, resolve_loss

    phases = [p.upper() for p in _csv(args.phases)]
    if not phases or [p for p in phases if p not in PHASES]:
        raise ConfigError(f"--phases {args.phases!r}: use a comma list of clm, mlm")
    if not _csv(args.loss):
        raise ConfigError(f"--loss {args.loss!r}: use a comma list of torch, triton (or auto)")
    try:  # the trainer's resolver: auto is triton on CUDA, sdpa / torch elsewhere
        head_dim = recipe.model.hidden_size // recipe.model.num_attention_heads
        attentions = [resolve_attention(a, device, head_dim=head_dim) for a in _csv(args.attention)]
        losses = [resolve_loss(x, device) for x in _csv(args.loss)]
    except BackendError as exc:
        raise ConfigError(f"--attention/--loss: {exc}") from exc
    zeros = _csv(args.zero, int)
    if any(z not in (0, 1, 2, 3) for z in zeros):
        raise ConfigError(f"--zero {args.zero!r}: ZeRO stages are 0, 1, 2, 3")
    micro_batches = _csv(args.micro_batch, int) or None
    if micro_batches and min(micro_batches) < 1:
        raise ConfigError(f"--micro-batch {args.micro_batch!r}: sizes must be >= 1")
    return {"phases": phases, "attention": attentions, "loss": losses, "zero": zeros, "micro_batch": micro_batches,
            **_compile_options(args, device)}


def _compile_options(args: argparse.Namespace, device) -> dict:
    """``{"compile": [bool, ...], "baselines": [...]}`` from --compile and --baselines.

    Raises:
        ConfigError: an unknown value, or compiling on a CPU without a C++ compiler.
    """
    from antlm_dist.config import ConfigError
    from antlm_dist.speedups import cxx_compiler

    modes = {"off": False, "on": True, "auto": device.type == "cuda"}
    compiles = _csv(args.compile)
    if not compiles or [c for c in compiles if c not in modes]:
        raise ConfigError(f"--compile {args.compile!r}: use a comma list of off, on (or auto)")
    baselines = _csv(args.baselines) if args.baseline else []
    if [b for b in baselines if b not in ("eager", "compiled")]:
        raise ConfigError(f"--baselines {args.baselines!r}: use a comma list of eager, compiled")
    compiles = list(dict.fromkeys(modes[c] for c in compiles))
    if device.type == "cpu" and (True in compiles or "compiled" in baselines) and cxx_compiler() is None:
        raise ConfigError("--compile on / --baselines compiled need a C++ compiler for TorchInductor on CPU "
                          "(none of $CXX, g++, clang++, c++ is on PATH); install one or use --compile off "
                          "--baselines eager")
    return {"compile": compiles, "baselines": baselines}


def _init_single_process(recipe, device) -> None:
    """A process group of one rank (DeepSpeed needs one); ``init_distributed`` picks a free port."""
    from antlm_dist.distributed import init_distributed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    init_distributed(recipe, device)


def _run_matrix(args, recipes, matrix: dict, device, precision: str, peak: float, out: Path) -> list[dict]:
    """Every (recipe, micro-batch) group of the matrix under one telemetry sampler; the records."""
    from antlm_dist.bench.harness import BenchPlan, Variant, run_group
    from antlm_dist.distributed import build_ds_config, zero_stage
    from antlm_dist.telemetry import Telemetry

    telemetry = Telemetry(device if device.type == "cuda" else None, interval_s=0.02).start()
    records = []
    try:
        for name, recipe in recipes:
            recipe_zero = zero_stage(build_ds_config(recipe, 1, device, recipe_source=name))
            variants = [Variant(a, lo, z, c) for a in matrix["attention"] for lo in matrix["loss"]
                        for z in (matrix["zero"] or [recipe_zero]) for c in matrix["compile"]]
            plan = BenchPlan(phases=matrix["phases"], variants=variants, micro_batches=matrix["micro_batch"],
                             steps=args.steps, warmup=args.warmup, data=args.data,
                             baselines=tuple(matrix["baselines"]),
                             profile=args.profile, profile_steps=max(1, args.profile_steps))
            for mb in matrix["micro_batch"] or [recipe.train.micro_batch_size]:
                records += run_group(Path(name).stem, recipe, mb, plan, device, precision, telemetry, peak,
                                     out / "data")
    finally:
        telemetry.stop()
    return records


def _print_summary(result: dict) -> None:
    for r in result["records"]:
        sp = r["speedup_vs_baseline"]
        print(f"{r['config']:<22} {r['phase']} {r['label']:<30} mb {r['micro_batch']:>3}: "
              f"{r['tokens_per_s_per_device']:>10,.0f} tok/s  {1000 * r['step_time_s']['median']:8.1f} ms  "
              f"MFU {100 * r['mfu']:5.1f}%  mem {r['mem_peak_gib']:.2f} GiB"
              + ("" if sp is None else f"  {sp:.2f}× baseline")
              + ("" if r.get("speedup_vs_compiled_baseline") is None else
                 f"  {r['speedup_vs_compiled_baseline']:.2f}× compiled baseline"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_arg_parser().parse_args(argv)
    if args.compare:
        from antlm_dist.bench.report import compare

        try:
            print(compare(*args.compare))
        except (OSError, ValueError, KeyError) as exc:
            print(f"antlm-bench: error: {exc}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch.distributed as dist

    started_group = not (dist.is_available() and dist.is_initialized())
    try:
        result = run(args, argv)
    except ValueError as exc:  # ConfigError, CorpusError, TokenizerError
        print(f"antlm-bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    _print_summary(result)
    print(f"wrote {Path(args.out) / 'bench.json'}, bench.md, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
