"""``antlm-plot``: the plotted series equal the metrics records, and the PNGs are drawn."""
from __future__ import annotations

import json
import math

from antlm_dist.plots import PLOT_FILES, draw_plots, main, plot_run, plot_run_or_warn, run_series


def synthetic_records() -> list[dict]:
    """A 1_CLM+1_MLM+1_CLM run of 3 steps per epoch, resumed after step 4 (steps 5-6 written
    twice, the second time with other losses), with a mixed-objective record carrying
    ``loss_<objective>`` fields itself, evaluations and a non-finite value."""
    recs = [{"type": "start", "step": 0, "time": 1.0}]
    phases = ["CLM"] * 3 + ["MLM"] * 3 + ["CLM"] * 3
    for step in range(1, 10):
        recs.append({"type": "train", "step": step, "phase": phases[step - 1], "loss": 10.0 - step,
                     "lr": 1e-3 * step, "tokens_per_s": 1000.0 + step, "mfu": 0.1, "time": 2.0})
        if step == 3:
            recs.append({"type": "eval", "step": 3, "clm_loss": 6.5, "mlm_loss": 7.5, "mlm_accuracy": 0.1})
    recs.append({"type": "start", "step": 4, "resumed": True})
    for step in (5, 6):
        recs.append({"type": "train", "step": step, "phase": "MLM", "loss": 20.0 + step, "lr": 2e-3 * step,
                     "tokens_per_s": "inf", "time": 3.0})
    recs.append({"type": "train", "step": 10, "phase": "MIX", "loss": 2.0, "loss_clm": 1.5, "loss_mntp": 2.5,
                 "lr": 0.0, "tokens_per_s": 900.0})
    recs.append({"type": "eval", "step": 10, "clm_loss": 5.0, "mlm_loss": float("nan"), "mlm_accuracy": 0.2})
    return recs


def expected_series(records: list[dict]) -> dict:
    """The same data by a plain loop: the last record per step wins, in step order."""
    last = {"train": {}, "eval": {}}
    for r in records:
        if r["type"] in last:
            last[r["type"]][r["step"]] = r
    loss, lr, tps, heldout = {}, ([], []), ([], []), {}
    for step in sorted(last["train"]):
        r = last["train"][step]
        own = {k[5:]: v for k, v in r.items() if k.startswith("loss_")}
        if not own:
            own[r["phase"].lower()] = r["loss"]
        for name, v in own.items():
            loss.setdefault(name, ([], []))
            loss[name][0].append(step)
            loss[name][1].append(v)
        lr[0].append(step)
        lr[1].append(r["lr"])
        if isinstance(r["tokens_per_s"], float):
            tps[0].append(step)
            tps[1].append(r["tokens_per_s"])
    for step in sorted(last["eval"]):
        for key in ("clm_loss", "mlm_loss"):
            if math.isfinite(last["eval"][step][key]):
                heldout.setdefault(key, ([], []))
                heldout[key][0].append(step)
                heldout[key][1].append(last["eval"][step][key])
    return {"loss": loss, "lr": lr, "tokens_per_s": tps, "heldout": heldout}


def test_series_equal_the_last_record_of_each_step():
    recs = synthetic_records()
    got, want = run_series(recs), expected_series(recs)
    assert got["loss"] == want["loss"]
    assert set(got["loss"]) == {"clm", "mlm", "mntp"}  # MIX carries its own loss_* fields
    assert got["lr"] == want["lr"] and got["tokens_per_s"] == want["tokens_per_s"]
    assert got["heldout"] == want["heldout"]
    assert got["phases"] == [(0, 3, "CLM"), (3, 6, "MLM"), (6, 9, "CLM"), (9, 10, "MIX")]


def write_metrics(folder, records) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def assert_pngs(paths) -> None:
    from matplotlib.image import imread

    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        height, width, _ = imread(path).shape
        assert width > 300 and height > 200, path


def test_plot_run_draws_every_png(tmp_path):
    write_metrics(tmp_path / "run", synthetic_records())
    written = plot_run(tmp_path / "run")
    assert sorted(p.name for p in written) == sorted(PLOT_FILES)
    assert all(p.parent == tmp_path / "run" / "plots" for p in written)
    assert_pngs(written)


def test_draw_plots_skips_figures_without_data(tmp_path):
    series = run_series([{"type": "train", "step": 1, "phase": "CLM", "loss": 3.0}])
    assert [p.name for p in draw_plots(series, tmp_path)] == ["loss.png"]


def test_cli_errors_name_the_folder_and_write_nothing(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("antlm-plot: error:") and "metrics.jsonl not found" in err and "\n" not in err
    write_metrics(tmp_path / "empty", [{"type": "start", "step": 0}])
    assert main([str(tmp_path / "empty")]) == 2
    assert "no training records" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "plots").exists()
    assert plot_run_or_warn(tmp_path / "missing") == []  # at the end of a run: a warning, never an error


def test_cli_prints_the_files_it_wrote(tmp_path, capsys):
    write_metrics(tmp_path / "run", synthetic_records())
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "pngs")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / "pngs" / f) for f in PLOT_FILES)
