"""``bench.json``, ``bench.md`` and ``bench.png``, and ``--compare`` of two JSON files.

A record (one runner × phase × micro-batch of one recipe) holds, with units in the names:
``tokens_per_s_per_device``; ``step_time_s`` (median, p10, p90, mean, all); ``mfu``
(fraction; Chowdhery et al. 2022) from ``model_flops_per_step`` (see
:mod:`antlm_dist.telemetry.flops`); ``mem_peak_gib`` and what it measures (``mem_kind``);
``cpu_time_s`` (this process's CPU seconds per step) and ``cpu_util_pct``; on GPU
``power_w``, ``energy_j_per_step`` and ``sm_util_pct``; ``speedup_vs_baseline`` (eager
baseline median step time ÷ this one's), ``speedup_vs_compiled_baseline`` (the same against
the HF model under torch.compile; None without that runner) and ``speedup_vs_baseline_cpu_time`` (the same with CPU
time); ``executed_flops_per_step`` and ``flop_bound_speedup`` (the baseline computes the
LM head on every row); and an optional ``profile`` (one step under ``torch.profiler``).
"""
from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, result: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result, indent=1))
    return path


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _model_line(rec: dict) -> str:
    m = rec["model"]
    return (f"hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']} heads, "
            f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']}, N = {m['body_params'] / 1e6:.2f}M "
            f"non-embedding parameters, sequence {rec['seq_len']}")


def markdown(result: dict) -> str:
    """The Markdown report: provenance, one table per recipe, profile summaries."""
    recs = result["records"]
    mach, ver, peak = result["machine"], result["versions"], result["peak_flops"]
    plan = result["plan"]
    lines = [
        "# antlm-bench", "",
        f"Command: `{result['command']}`", "",
        f"- Machine: {mach['device_name']} ({mach['device']}), {mach['cpu_count']} CPU cores, "
        f"torch threads {mach['torch_threads']}, {mach['platform']}; "
        + (f"run {result['started']} to {result['created']}; " if result.get("started") else
           f"written {result['created']}; ")
        + f"1-min load average {_fmt(mach.get('load_average_1min_start'), '.1f')} at the start, "
        f"{_fmt(mach.get('load_average_1min_end'), '.1f')} at the end.",
        f"- Versions: antlm-dist {ver['antlm_dist']}, torch {ver['torch']}, deepspeed {ver['deepspeed']}, "
        f"transformers {ver['transformers']}, Python {ver['python']}.",
        f"- Peak for MFU: {peak['flops_per_s'] / 1e12:.3f} TFLOP/s per device, {peak['source']}"
        + (f"; the larger of the measurements at start-up ({peak['start_flops_per_s'] / 1e12:.3f}) and at the end"
           if "measured" in peak["source"] and peak.get("start_flops_per_s") else "") + ".",
        f"- Precision {result['precision']}; data {plan['data']}; {plan['warmup']} warm-up + {plan['steps']} timed "
        "optimizer steps per runner and phase, timed steps interleaved round-robin over runners and phases; "
        "step time excludes collation.",
        "- MFU = model FLOPs / (step time × peak): 6·N per token, attention 3.5 × 4·B·H·T²·D per layer "
        "(halved when causal), LM head 6·H·V per target row (Chowdhery et al. 2022; Kaplan et al. 2020). "
        "The baseline gets the same model FLOPs, so its MFU is not credited with its extra logits.",
        "",
    ]
    lines += _config_tables(recs)
    lines += _profile_section(result)
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def _config_tables(recs: list[dict]) -> list[str]:
    """One Markdown table per recipe: every runner, phase and micro-batch."""
    lines = []
    for config in dict.fromkeys(r["config"] for r in recs):
        rows = [r for r in recs if r["config"] == config]
        lines += [f"## {config}", "", _model_line(rows[0]) + ".", "",
                  "| phase | runner | micro-batch | tokens/s/device | step ms: median (p10–p90) | CPU s/step "
                  "| TFLOP/s | MFU | peak mem GiB | × baseline (wall) | × baseline (CPU time) "
                  "| × compiled baseline (wall) | FLOP bound × |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: (r["phase"], r["micro_batch"], r["runner"] == "antlm", r["label"])):
            st = r["step_time_s"]
            extra = ""
            if r.get("power_w") is not None:
                extra = f" ({r['power_w']:.0f} W, {r['energy_j_per_step']:.1f} J/step)"
            lines.append(
                f"| {r['phase']} | {r['label']}{extra} | {r['micro_batch']} | {r['tokens_per_s_per_device']:,.0f} "
                f"| {1000 * st['median']:.1f} ({1000 * st['p10']:.1f}–{1000 * st['p90']:.1f}) "
                f"| {r['cpu_time_s']['median']:.2f} "
                f"| {r['model_tflops_per_s']:.3f} | {100 * r['mfu']:.1f}% | {r['mem_peak_gib']:.2f} "
                f"| {_fmt(r['speedup_vs_baseline'], '.2f')}× | {_fmt(r['speedup_vs_baseline_cpu_time'], '.2f')}× "
                f"| {_fmt(r.get('speedup_vs_compiled_baseline'), '.2f')}× | {_fmt(r['flop_bound_speedup'], '.2f')}× |")
        lines += ["", f"Peak memory: {rows[0]['mem_kind']}. CPU s/step: this process's user + system CPU "
                  "time per step (median); on a shared machine its ratio is less disturbed by other "
                  "processes' load than the wall-clock ratio. FLOP bound: the baseline's executed FLOPs (its LM "
                  "head runs on every row) ÷ this runner's, the speed-up if time were proportional to FLOPs.", ""]
    return lines


def _profile_section(result: dict) -> list[str]:
    """Profiler summaries: time by category, AntLM vs baseline differences, top ops."""
    profiled = [r for r in result["records"] if r.get("profile")]
    lines = []
    if profiled:
        n_prof = result["plan"].get("profile_steps", 1)
        lines += [f"## Where the time goes (torch.profiler, least disturbed of {n_prof} "
                  "profiled steps per runner and phase)", "",
                  f"Self time in ms by category ({profiled[0]['profile']['time_kind']}; a profiled step runs slower "
                  "than a timed one). matmul: mm/addmm/bmm (body and LM head); attention: SDPA kernels and softmax; "
                  "loss: log-softmax, NLL and the chunked loss's exp/max/gather; optimizer: everything under "
                  "`Optimizer.step`; other: elementwise ops, copies, norms, gathers.", "",
                  "| config | phase | runner | mb | matmul | attention | loss | optimizer | other | total |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in profiled:
            c = r["profile"]["categories_ms"]
            lines.append(f"| {r['config']} | {r['phase']} | {r['label']} | {r['micro_batch']} | "
                         + " | ".join(f"{c[k]:.0f}" for k in ("matmul", "attention", "loss", "optimizer", "other"))
                         + f" | {sum(c.values()):.0f} |")
        lines.append("")
        for r in profiled:
            if r["runner"] != "antlm":
                continue
            b = next((x for x in profiled if x["runner"] == "baseline" and
                      (x["config"], x["phase"], x["micro_batch"]) == (r["config"], r["phase"], r["micro_batch"])), None)
            if b is None:
                continue
            mine, ref = r["profile"]["ops_ms"], b["profile"]["ops_ms"]
            ops = sorted(set(mine) | set(ref), key=lambda k: -abs(mine.get(k, 0.0) - ref.get(k, 0.0)))[:10]
            saved = [k for k in ops if mine.get(k, 0.0) < ref.get(k, 0.0) - 0.5][:3]
            extra = [k for k in ops if mine.get(k, 0.0) > ref.get(k, 0.0) + 0.5][:3]
            lines += [
                f"**{r['config']} {r['phase']}** (micro-batch {r['micro_batch']}): {r['label']} "
                f"{sum(r['profile']['categories_ms'].values()):.0f} ms vs baseline "
                f"{sum(b['profile']['categories_ms'].values()):.0f} ms of profiled self time; timed "
                f"{_fmt(r['speedup_vs_baseline'], '.2f')}× (FLOP bound {_fmt(r['flop_bound_speedup'], '.2f')}×). "
                "Saves " + (", ".join(f"`{k}` {ref.get(k, 0.0) - mine.get(k, 0.0):.0f} ms" for k in saved) or "nothing")
                + "; spends more on " + (", ".join(f"`{k}` +{mine.get(k, 0.0) - ref.get(k, 0.0):.0f} ms" for k in extra)
                                         or "nothing") + ".", ""]
            lines += [f"Largest differences, {r['config']} {r['phase']}, {r['label']} vs baseline, micro-batch "
                      f"{r['micro_batch']} (self ms; negative = AntLM spends less):", "",
                      "| op | AntLM | baseline | AntLM − baseline |", "|---|---:|---:|---:|"]
            lines += [f"| `{k}` | {mine.get(k, 0.0):.0f} | {ref.get(k, 0.0):.0f} "
                      f"| {mine.get(k, 0.0) - ref.get(k, 0.0):+.0f} |"
                      for k in ops]
            lines.append("")
        for r in profiled:
            p = r["profile"]
            lines += [f"Top ops, {r['config']} {r['phase']}, {r['label']}, micro-batch {r['micro_batch']}: "
                      + ", ".join(f"`{o['op']}` {o['self_ms']:.0f} ms ({100 * o['share']:.0f}%)" for o in p["top_ops"]),
                      ""]
    return lines


def write_markdown(path: Path, result: dict) -> Path:
    path = Path(path)
    path.write_text(markdown(result))
    return path


def write_plot(path: Path, result: dict) -> Path:
    """Bars of tokens/s per device for every AntLM runner, grouped by phase, one panel per
    recipe; the baseline of each phase (and micro-batch) as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    configs = list(dict.fromkeys(r["config"] for r in recs))
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 4.2), squeeze=False)
    for ax, config in zip(axes[0], configs):
        rows = [r for r in recs if r["config"] == config]
        phases = list(dict.fromkeys(r["phase"] for r in rows))
        series = list(dict.fromkeys((r["label"], r["micro_batch"]) for r in rows if r["runner"] == "antlm"))
        width = 0.8 / max(len(series), 1)
        for j, (label, mb) in enumerate(series):
            xs, ys = [], []
            for i, phase in enumerate(phases):
                hit = [r for r in rows if (r["label"], r["micro_batch"], r["phase"]) == (label, mb, phase)]
                if hit:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(hit[0]["tokens_per_s_per_device"])
            ax.bar(xs, ys, width * 0.9, label=f"{label} (mb {mb})")
        for kind, style, name in (("baseline", "--", "baseline (HF Llama + AdamW)"),
                                  ("baseline_compiled", ":", "baseline, compiled")):
            for k, r in enumerate(r for r in rows if r["runner"] == kind):
                i = phases.index(r["phase"])
                ax.hlines(r["tokens_per_s_per_device"], i - 0.45, i + 0.45, colors="black", linestyles=style,
                          label=name if k == 0 else None)
        ax.set_xticks(range(len(phases)), phases)
        ax.set_ylabel("tokens/s per device")
        ax.set_title(f"{config} (seq {rows[0]['seq_len']})")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _key(r: dict) -> tuple:
    return (r["config"], r["phase"], r["label"], r["micro_batch"])


def compare(path_a: Path, path_b: Path) -> str:
    """A text table of tokens/s in B ÷ A for every record present in both files.

    Raises:
        ValueError: the files share no record (config, phase, runner, micro-batch).
    """
    a = {_key(r): r for r in json.loads(Path(path_a).read_text())["records"]}
    b = {_key(r): r for r in json.loads(Path(path_b).read_text())["records"]}
    common = [k for k in a if k in b]
    if not common:
        raise ValueError(f"{path_a} and {path_b} share no (config, phase, runner, micro-batch) record")
    head = f"{'config':<22} {'phase':<5} {'runner':<34} {'mb':>4} {'A tok/s':>11} {'B tok/s':>11} {'B/A':>6}"
    lines = [f"A = {path_a}", f"B = {path_b}", head, "-" * len(head)]
    for k in common:
        ta, tb = a[k]["tokens_per_s_per_device"], b[k]["tokens_per_s_per_device"]
        lines.append(f"{k[0]:<22} {k[1]:<5} {k[2]:<34} {k[3]:>4} {ta:>11,.0f} {tb:>11,.0f} {tb / ta:>5.2f}×")
    only = [k for k in list(a) + list(b) if not (k in a and k in b)]
    if only:
        lines.append(f"({len(only)} record(s) in only one file)")
    return "\n".join(lines)
