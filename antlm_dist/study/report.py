"""The study's report: ``study.json``, ``study.md`` and two PNG plots.

Per schedule, every figure is summarised over its seeds as mean, sample standard deviation
(n − 1 in the denominator; 0 for one seed), minimum and maximum. BLiMP accuracies are the
mean over paradigms (UIDs) of the per-paradigm accuracy (Warstadt et al. 2020), in percent
in the tables and plots and as fractions in ``study.json``.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

METRICS = {
    # key: (title in the tables, getter on a run result, scale, decimals)
    "blimp_clm": ("BLiMP CLM (%)", lambda r: r["blimp"].get("clm", {}).get("overall"), 100.0, 1),
    "blimp_pll": ("BLiMP PLL (%)", lambda r: r["blimp"].get("mlm", {}).get("overall"), 100.0, 1),
    "heldout_clm_loss": ("held-out CLM loss", lambda r: (r["heldout"] or {}).get("clm", {}).get("loss"), 1.0, 3),
    "heldout_mlm_loss": ("held-out MLM loss", lambda r: (r["heldout"] or {}).get("mlm", {}).get("loss"), 1.0, 3),
    "heldout_mlm_accuracy": ("held-out MLM acc. (%)",
                             lambda r: (r["heldout"] or {}).get("mlm", {}).get("accuracy"), 100.0, 1),
    "train_wall_s": ("train wall (s)", lambda r: r["wall_time_s"].get("train"), 1.0, 0),
    "total_wall_s": ("total wall (s)", lambda r: sum(r["wall_time_s"].values()), 1.0, 0),
}
"""The figures reported per run and summarised per schedule."""


def spread(values: list[float]) -> dict | None:
    """``{"mean", "std", "min", "max", "n"}`` of the finite values, or None when there are none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def summarise(results: list[dict], schedules: list[str]) -> dict:
    """Per schedule (in ``schedules`` order): every metric's spread over seeds, and the
    per-field BLiMP accuracies' spread in both modes."""
    out = {}
    for s in schedules:
        runs = [r for r in results if r["schedule"] == s]
        if not runs:
            continue
        fields = sorted({f for r in runs for m in r["blimp"].values() for f in m["by_field"]})
        out[s] = {
            "seeds": [r["seed"] for r in runs],
            **{k: spread([get(r) for r in runs]) for k, (_, get, _, _) in METRICS.items()},
            "blimp_by_field": {mode: {f: spread([r["blimp"].get(mode, {}).get("by_field", {}).get(f) for r in runs])
                                      for f in fields} for mode in ("clm", "mlm")},
        }
    return out


def _fmt(x: float | None, scale: float, decimals: int) -> str:
    return "n/a" if x is None else f"{scale * x:.{decimals}f}"


def _fmt_spread(sp: dict | None, scale: float, decimals: int) -> str:
    if sp is None:
        return "n/a"
    if sp["n"] == 1:
        return _fmt(sp["mean"], scale, decimals)
    return f"{_fmt(sp['mean'], scale, decimals)} ± {_fmt(sp['std'], scale, decimals)}"


def format_markdown(study: dict) -> str:
    """``study.md``: the command, the per-schedule summary, every run, and BLiMP per field."""
    keys = list(METRICS)
    head = "| " + " | ".join(METRICS[k][0] for k in keys) + " |"
    rule = "|---:" * len(keys) + "|"
    lines = [f"# Study: {study['config']}", "", f"Command: `{study['command']}`", "",
             f"{len(study['runs'])} complete runs of {len(study['planned'])} planned. "
             "Mean ± sample standard deviation over seeds; BLiMP is the mean over paradigms of the "
             f"per-paradigm accuracy ({study['blimp_note']}).", "",
             "## Per schedule", "", "| schedule | seeds " + head, "|---|---:" + rule]
    for s, summ in study["summary"].items():
        cells = [_fmt_spread(summ[k], METRICS[k][2], METRICS[k][3]) for k in keys]
        lines.append(f"| {s} | {len(summ['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Every run", "", "| schedule | seed | steps " + head, "|---|---:|---:" + rule]
    for r in study["runs"]:
        cells = [_fmt(get(r), scale, dec) for _, get, scale, dec in METRICS.values()]
        lines.append(f"| {r['schedule']} | {r['seed']} | {r['steps']} | " + " | ".join(cells) + " |")
    for mode, title in (("clm", "CLM scoring"), ("mlm", "PLL scoring")):
        fields = sorted({f for summ in study["summary"].values() for f in summ["blimp_by_field"][mode]})
        if not fields:
            continue
        lines += ["", f"## BLiMP by field, {title} (%)", "",
                  "| schedule | " + " | ".join(fields) + " |", "|---" + "|---:" * len(fields) + "|"]
        for s, summ in study["summary"].items():
            lines.append(f"| {s} | " + " | ".join(_fmt_spread(summ["blimp_by_field"][mode].get(f), 100.0, 1)
                                                   for f in fields) + " |")
    return "\n".join(lines) + "\n"


def plot_heldout(study: dict, path: Path) -> None:
    """Held-out CLM and MLM loss against optimizer step, one line per run (a colour per
    schedule), with each schedule's phase switches as dotted vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    colours = {s: f"C{i}" for i, s in enumerate(study["summary"])}
    for r in study["runs"]:
        c = colours[r["schedule"]]
        steps = [p["step"] for p in r["curve"]]
        label = f"{r['schedule']} (seed {r['seed']})"
        for ax, key in zip(axes, ("clm_loss", "mlm_loss")):
            ax.plot(steps, [p[key] for p in r["curve"]], marker="o", ms=3, color=c, label=label, alpha=0.85)
    for s, c in colours.items():
        switches = next((r["phase_switch_steps"] for r in study["runs"] if r["schedule"] == s), [])
        for ax in axes:
            for x in switches:
                ax.axvline(x, color=c, ls=":", lw=1.2)
    for ax, title in zip(axes, ("held-out CLM loss (nats/token)", "held-out MLM loss (nats/masked token)")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{study['config']}: held-out loss; dotted lines mark phase switches")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_blimp(study: dict, path: Path) -> None:
    """BLiMP overall per schedule, CLM and PLL scoring side by side: bars at the seed mean,
    one dot per seed, whiskers from the seed minimum to maximum, chance (50%) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = list(study["summary"])
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(schedules)), 4.5), constrained_layout=True)
    width = 0.38
    for j, (key, title) in enumerate((("blimp_clm", "CLM scoring"), ("blimp_pll", "PLL scoring"))):
        xs = [i + (j - 0.5) * width for i in range(len(schedules))]
        for x, s in zip(xs, schedules):
            sp = study["summary"][s][key]
            if sp is None:
                continue
            ax.bar(x, 100 * sp["mean"], width, color=f"C{j}", alpha=0.75, label=title if s == schedules[0] else None)
            ax.errorbar(x, 100 * sp["mean"], yerr=[[100 * (sp["mean"] - sp["min"])], [100 * (sp["max"] - sp["mean"])]],
                        color="k", capsize=4)
            seeds = [METRICS[key][1](r) for r in study["runs"] if r["schedule"] == s]
            ax.scatter([x] * len(seeds), [100 * v for v in seeds if v is not None], color="k", s=12, zorder=3)
    ax.axhline(50, color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(schedules)), schedules)
    ax.set_ylabel("BLiMP accuracy (%)")
    values = [100 * v for s in schedules for k in ("blimp_clm", "blimp_pll")
              if (sp := study["summary"][s][k]) for v in (sp["min"], sp["max"])]
    if values:
        ax.set_ylim(min(45.0, min(values) - 2), max(values) + 3)
    ax.legend(fontsize=8)
    ax.set_title(f"{study['config']}: BLiMP per schedule (bars: seed mean; whiskers: min–max)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, study: dict) -> None:
    """Write ``study.json``, ``study.md`` and ``plots/*.png`` into ``out``."""
    out = Path(out)
    study["summary"] = summarise(study["runs"], study["planned_schedules"])
    (out / "study.json").write_text(json.dumps(study, indent=1))
    (out / "study.md").write_text(format_markdown(study))
    if study["runs"]:
        (out / "plots").mkdir(exist_ok=True)
        plot_heldout(study, out / "plots" / "heldout_loss.png")
        if any(s["blimp_clm"] or s["blimp_pll"] for s in study["summary"].values()):
            plot_blimp(study, out / "plots" / "blimp.png")
