"""TensorBoard and W&B (offline) trackers, the progress line in a log file and the end-of-run
plots, read back from one short 2-rank CPU run; the tracker names; a missing package."""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest

from antlm_dist.metrics import read_metrics
from antlm_dist.plots import PLOT_FILES
from antlm_dist.trackers import scalars_of
from antlm_testutil import assert_ok, run_cli, tiny_args_for

STEPS = 12  # the tiny recipe: 4 steps per epoch, 1_CLM+1_MLM+1_CLM


def test_scalar_names_follow_the_record_fields():
    rec = {"step": 7, "epoch": 1, "time": 1.5, "phase": "MLM", "loss": 4.0, "lr": 1e-3, "mfu": None,
           "tokens_per_s": 512, "grad_norm": float("nan"), "words_seen": 1200, "note": "x", "flag": True}
    assert scalars_of("train", rec) == {"train/loss": 4.0, "train/loss_mlm": 4.0, "train/lr": 1e-3,
                                        "train/tokens_per_s": 512.0, "train/words_seen": 1200.0}
    mixed = {"step": 3, "phase": "MIX", "loss": 2.0, "loss_clm": 1.5, "loss_mntp": 2.5}
    assert scalars_of("train", mixed) == {"train/loss": 2.0, "train/loss_clm": 1.5, "train/loss_mntp": 2.5}
    assert scalars_of("eval", {"step": 4, "reason": "end", "clm_loss": 5.0, "mlm_accuracy": 0.25}) == \
        {"eval/clm_loss": 5.0, "eval/mlm_accuracy": 0.25}
    assert scalars_of("checkpoint", {"step": 4, "path": "p"}) == {}


def test_logging_section_reads_and_rejects_like_the_others():
    from antlm_dist.config import ConfigError, WandbConfig, load_recipe

    assert load_recipe("demo-cpu").logging.wandb is None
    assert load_recipe("demo-cpu", ["logging.wandb={}"]).logging.wandb == WandbConfig()
    assert load_recipe("demo-cpu", ["logging.wandb.project=babylm"]).logging.wandb.project == "babylm"
    for override, needle in (("logging.wandb.mode=cloud", "logging.wandb.mode='cloud' is not allowed"),
                             ("logging.wandb.team=x", "logging.wandb.team is not a known field"),
                             ("logging.progress_interval_s=-1", "logging.progress_interval_s=-1.0 must be >= 0"),
                             ("logging.tensorboard=maybe", "logging.tensorboard: expected true or false")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_recipe("demo-cpu", [override])


def test_missing_tracker_package_stops_in_preflight(tmp_path, capsys, tiny_args, monkeypatch):
    from antlm_dist.cli import train_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "o"
    assert train_main(["--output-dir", str(out), *tiny_args, "logging.wandb={project: p}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "logging.wandb needs the wandb package" in err and "pip install" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_tokenizer, data_cache):
    """A tiny run with both trackers, a progress line due at every step and stderr to a pipe."""
    pytest.importorskip("tensorboard", reason="the trackers extra is not installed (pip install '.[trackers]')")
    pytest.importorskip("wandb", reason="the trackers extra is not installed (pip install '.[trackers]')")
    root = tmp_path_factory.mktemp("tracked")
    out = root / "run"
    args = ["--output-dir", str(out), *tiny_args_for(tiny_tokenizer, data_cache), "logging.tensorboard=true",
            "logging.wandb={project: antlm-test, mode: offline}", "logging.progress_interval_s=0.01",
            "debug.step_delay_s=0.05"]  # each step takes longer than the interval: one line per step
    env = {"ANTLM_PROGRESS": "", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(root / "wandb_config"),
           "WANDB_CACHE_DIR": str(root / "wandb_cache"), "WANDB_DATA_DIR": str(root / "wandb_data")}
    proc = run_cli(args, env=env)
    assert_ok(proc)
    return out, proc


@pytest.mark.slow
def test_log_file_has_a_progress_line_per_step_and_no_bar(tracked_run):
    out, proc = tracked_run
    lines = re.findall(r"step (\d+)/(\d+) \(\d+%\) \| (\w+) \| loss ([\d.]+) \| [\d,]+ tokens/s \| ETA \S+",
                       proc.stderr)
    train = {r["step"]: r for r in read_metrics(out / "metrics.jsonl", "train")}
    assert [int(s) for s, *_ in lines] == list(range(1, STEPS + 1))
    for step, total, phase, loss in lines:
        rec = train[int(step)]
        assert int(total) == STEPS and phase == rec["phase"] and float(loss) == pytest.approx(rec["loss"], abs=5e-5)
    assert "step/s" not in proc.stderr  # stderr is a pipe: no tqdm bar


@pytest.mark.slow
def test_tensorboard_events_hold_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = tracked_run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/loss_clm", "train/loss_mlm", "train/lr", "train/tokens_per_s", "train/mfu",
                "train/accuracy", "train/grad_norm", "eval/clm_loss", "eval/mlm_loss", "eval/mlm_accuracy"}
    assert expected <= tags, expected - tags
    train = read_metrics(out / "metrics.jsonl", "train")
    evals = read_metrics(out / "metrics.jsonl", "eval")

    def read(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    for tag, recs, field in (("train/loss", train, "loss"), ("train/lr", train, "lr"),
                             ("train/tokens_per_s", train, "tokens_per_s"), ("eval/clm_loss", evals, "clm_loss")):
        want = [(r["step"], r[field]) for r in recs]
        got = read(tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # stored as float32
    for objective in ("CLM", "MLM"):
        want = [(r["step"], r["loss"]) for r in train if r["phase"] == objective]
        got = read(f"train/loss_{objective.lower()}")
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def _wandb_payloads(path: Path) -> list[bytes]:
    """The records of a ``run-*.wandb`` log, read here by a loop of our own: a 7-byte header
    (``:W&B``, magic, version), then LevelDB-style 32 KiB blocks of chunks, each with a CRC (4
    bytes), a length (2, little-endian) and a type (1: whole, 2/3/4: first/middle/last part)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        kind = data[pos + 6] if left >= 7 else 0
        if kind == 0:  # a block's zero padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(payload)
            payload = b""
    return out


def _wandb_history(run_folder: Path) -> list[dict]:
    """The ``history`` rows (what ``wandb.log`` sent) of an offline W&B run folder."""
    import json

    from wandb.proto import wandb_internal_pb2

    (log_file,) = run_folder.glob("run-*.wandb")
    rows = []
    for payload in _wandb_payloads(log_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics(tracked_run):
    out, _ = tracked_run
    (run_folder,) = (out / "wandb").glob("offline-run-*")
    rows = _wandb_history(run_folder)
    assert len(rows) == STEPS  # one row per step: an evaluation joins its step's row
    by_step = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    for rec in read_metrics(out / "metrics.jsonl", "train"):
        row = by_step[rec["step"]]
        assert row["train/loss"] == pytest.approx(rec["loss"], rel=1e-12)
        assert row[f"train/loss_{rec['phase'].lower()}"] == pytest.approx(rec["loss"], rel=1e-12)
        assert row["train/lr"] == pytest.approx(rec["lr"], rel=1e-12)
        assert math.isclose(row["train/tokens_per_s"], rec["tokens_per_s"], rel_tol=1e-12)
    for rec in read_metrics(out / "metrics.jsonl", "eval"):
        assert by_step[rec["step"]]["eval/mlm_loss"] == pytest.approx(rec["mlm_loss"], rel=1e-12)


@pytest.mark.slow
def test_run_ends_with_its_plots(tracked_run):
    out, proc = tracked_run
    for name in PLOT_FILES:
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG", name
    assert "plots:" in proc.stderr
