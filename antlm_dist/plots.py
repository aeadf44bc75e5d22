"""Plots of a run from its ``metrics.jsonl``: ``antlm-plot RUN_DIR`` and the trainer's ``plots/``.

:func:`run_series` turns the records into plain lists (tested against the records);
:func:`draw_plots` draws them with matplotlib's Agg canvas (no display, no pyplot state):

- ``loss.png``: training loss per objective against the optimizer step, one colour per
  objective, each phase's steps shaded in its objective's colour;
- ``heldout_loss.png``: held-out CLM and MLM loss at each evaluation;
- ``lr.png``: the learning rate;
- ``throughput.png``: tokens/s per step.

Per-objective losses are read generically: every numeric ``loss_<name>`` field of a
``train`` record is a series ``<name>``; a record without any such field adds its
``loss`` to the series of its ``phase`` (lower-cased).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from antlm_dist.metrics import read_metrics

log = logging.getLogger("antlm_dist")

PLOT_FILES = ("loss.png", "heldout_loss.png", "lr.png", "throughput.png")


class PlotError(ValueError):
    """The run folder has no metrics to plot."""


def _number(value) -> float | None:
    """A finite float, or None for missing, non-numeric and non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _last_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the last one written (a resumed run repeats the steps after its
    checkpoint), in step order."""
    by_step = {}
    for rec in records:
        if isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def objective_losses(record: dict) -> dict[str, float]:
    """``{objective: loss}`` of one ``train`` record (lower-case names, nats per target)."""
    out = {k[len("loss_"):]: v for k, v in record.items()
           if k.startswith("loss_") and _number(v) is not None}
    phase = str(record.get("phase", "")).lower()
    if phase and not out and _number(record.get("loss")) is not None:
        out[phase] = float(record["loss"])
    return out


def phase_spans(train: list[dict]) -> list[tuple[float, float, str]]:
    """``(first step - 1, last step, phase)`` of each run of consecutive records of one phase."""
    spans: list[list] = []
    for rec in train:
        phase = rec.get("phase")
        if phase is None:
            continue
        if spans and spans[-1][2] == phase:
            spans[-1][1] = rec["step"]
        else:
            spans.append([rec["step"] - 1, rec["step"], phase])
    return [tuple(s) for s in spans]


def run_series(records: list[dict]) -> dict:
    """The plotted data of a run's metrics records.

    Returns:
        ``{"loss": {objective: (steps, values)}, "phases": [(start, end, phase)],
        "heldout": {"clm_loss" | "mlm_loss" | ...: (steps, values)}, "lr": (steps, values),
        "tokens_per_s": (steps, values)}``; steps are optimizer steps, losses nats per
        target, lr the optimizer's learning rate, tokens/s per step of the global batch.
    """
    train = _last_per_step([r for r in records if r.get("type") == "train"])
    evals = _last_per_step([r for r in records if r.get("type") == "eval"])
    loss: dict[str, tuple[list, list]] = {}
    for rec in train:
        for name, value in objective_losses(rec).items():
            steps, values = loss.setdefault(name, ([], []))
            steps.append(rec["step"])
            values.append(value)
    heldout: dict[str, tuple[list, list]] = {}
    for rec in evals:
        for key, value in rec.items():
            if key.endswith("_loss") and _number(value) is not None:
                steps, values = heldout.setdefault(key, ([], []))
                steps.append(rec["step"])
                values.append(float(value))

    def column(key: str) -> tuple[list, list]:
        rows = [(r["step"], _number(r.get(key))) for r in train if _number(r.get(key)) is not None]
        return [s for s, _ in rows], [v for _, v in rows]

    return {"loss": loss, "phases": phase_spans(train), "heldout": heldout, "lr": column("lr"),
            "tokens_per_s": column("tokens_per_s")}


def _axes(title: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _colour(name: str, names: list[str]) -> str:
    return f"C{names.index(name) % 10}" if name in names else "C7"


def _shade_phases(ax, spans, names: list[str]) -> None:
    for start, end, phase in spans:
        ax.axvspan(start, end, color=_colour(phase.lower(), names), alpha=0.08, lw=0)


def draw_plots(series: dict, out_dir: Path | str, title: str = "") -> list[Path]:
    """Write the PNGs of :data:`PLOT_FILES` that have data into ``out_dir`` (created).

    Args:
        series: :func:`run_series`'s output.
        title: prefix of every figure title (e.g. the run folder's name).

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(series["loss"]) + sorted({p.lower() for _, _, p in series["phases"]} - set(series["loss"]))
    prefix = f"{title}: " if title else ""
    written = []

    def save(fig, name):
        fig.savefig(out / name)
        written.append(out / name)

    if series["loss"]:
        fig, ax = _axes(f"{prefix}training loss per objective (shaded: phases)", "loss (nats per target token)")
        _shade_phases(ax, series["phases"], names)
        for name in sorted(series["loss"]):
            ax.plot(*series["loss"][name], ".", ms=2, color=_colour(name, names), label=name.upper())
        ax.legend()
        save(fig, "loss.png")
    if series["heldout"]:
        fig, ax = _axes(f"{prefix}held-out loss at each evaluation", "loss (nats per target token)")
        _shade_phases(ax, series["phases"], names)
        for key in sorted(series["heldout"]):
            ax.plot(*series["heldout"][key], "o-", label=f"held-out {key.removesuffix('_loss').upper()}")
        ax.legend()
        save(fig, "heldout_loss.png")
    for key, name, label in (("lr", "lr.png", "learning rate"), ("tokens_per_s", "throughput.png", "tokens/s")):
        if series[key][0]:
            fig, ax = _axes(f"{prefix}{label}", label)
            _shade_phases(ax, series["phases"], names)
            ax.plot(*series[key], "-", lw=1)
            save(fig, name)
    return written


def plot_run(run_dir: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Read ``run_dir/metrics.jsonl`` and draw its plots into ``out_dir`` (default ``run_dir/plots``).

    Raises:
        PlotError: no metrics.jsonl, or no ``train`` record in it.
    """
    run = Path(run_dir)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} not found; pass the --output-dir of an antlm-train run")
    series = run_series(read_metrics(path))
    if not series["loss"]:
        raise PlotError(f"{path} has no training records yet; plot again after the first logged step")
    return draw_plots(series, out_dir if out_dir is not None else run / "plots", title=run.resolve().name)


def plot_run_or_warn(run_dir: Path | str) -> list[Path]:
    """:func:`plot_run` at the end of a training run: any failure is a warning, never an error."""
    try:
        written = plot_run(run_dir)
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; the run's results are already saved
        log.warning("plots not drawn (%s: %s); try antlm-plot %s", type(exc).__name__, exc, run_dir)
        return []
    log.info("plots: %s", ", ".join(str(p) for p in written))
    return written


def main(argv: list[str] | None = None) -> int:
    """``antlm-plot RUN_DIR [--out DIR]``."""
    p = argparse.ArgumentParser(prog="antlm-plot", description="Draw loss, held-out loss, LR and tokens/s "
                                "of an antlm-train run from its metrics.jsonl (PNG files).")
    p.add_argument("run_dir", help="the run folder (antlm-train --output-dir)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/plots)")
    args = p.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except (PlotError, ValueError) as exc:
        print(f"antlm-plot: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
