"""The progress line and bar of :mod:`antlm_dist.progress`, driven by an injected clock,
and the launcher telling its ranks whether a terminal is watching."""
from __future__ import annotations

import io
import os
import re

import pytest

from antlm_dist.progress import (PROGRESS_ENV, ProgressReporter, bar_wanted, format_duration, format_progress_line,
                                 make_bar)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def parse_line(line: str) -> dict:
    m = re.fullmatch(r"step (\d+)/(\d+) \((\d+)%\) \| (\w+) \| loss ([\d.]+) \| ([\d,]+) tokens/s \| ETA (\S+)", line)
    assert m, line
    return {"step": int(m[1]), "total": int(m[2]), "pct": int(m[3]), "phase": m[4], "loss": float(m[5]),
            "tokens_per_s": int(m[6].replace(",", "")), "eta": m[7]}


def test_durations_read_as_hours_minutes_seconds():
    for seconds in (0, 42, 59.4, 60, 725, 3599, 3600, 11220, 200000):
        text = format_duration(seconds)
        s = int(round(seconds))
        if s >= 3600:
            h, m = re.fullmatch(r"(\d+)h(\d\d)m", text).groups()
            assert int(h) * 3600 + int(m) * 60 == s - s % 60
        elif s >= 60:
            m, sec = re.fullmatch(r"(\d+)m(\d\d)s", text).groups()
            assert int(m) * 60 + int(sec) == s
        else:
            assert text == f"{s}s"
    assert format_duration(None) == format_duration(float("nan")) == format_duration(-1) == "?"


def test_line_comes_before_the_interval_would_pass_with_window_throughput_and_eta():
    clock, lines = FakeClock(), []
    total, tokens = 10, 4096
    rep = ProgressReporter(total, 0, interval_s=30.0, clock=clock, emit=lines.append)
    t0 = clock.now
    step_times = {1: 2.0, 2: 3.0, 3: 4.0, 4: 1.0, 5: 2.5}

    def at(seconds, step, phase, loss):
        clock.now = t0 + seconds
        return rep.update(step, phase, loss, tokens, step_times.get(step, 0.1))

    assert at(10, 1, "CLM", 5.5) is None  # 10 s since the start, next step due at ~20 s: no line
    assert at(16, 2, "CLM", 5.4) is None  # 16 s + a 6 s step = 22 s < 30 s
    line = at(25, 3, "CLM", 5.25)  # 25 s + a 9 s step would pass 30 s: log now
    assert lines == [line]
    got = parse_line(line)
    assert (got["step"], got["total"], got["pct"], got["phase"], got["loss"]) == (3, 10, 30, "CLM", 5.25)
    assert got["tokens_per_s"] == round(3 * tokens / (step_times[1] + step_times[2] + step_times[3]))
    assert got["eta"] == format_duration(25 / 3 * (total - 3))
    assert at(35, 4, "MLM", 4.0) is None  # 10 s since the line, 10 s steps
    got = parse_line(at(47, 5, "MLM", 3.9))  # 22 s + 12 s > 30 s
    # the window restarts after each line: steps 4 and 5 only
    assert got["tokens_per_s"] == round(2 * tokens / (step_times[4] + step_times[5]))
    assert got["phase"] == "MLM" and got["eta"] == format_duration(47 / 5 * (total - 5))
    for step in range(6, total):
        assert at(42 + step, step, "CLM", 3.0) is None
    assert parse_line(at(53, total, "CLM", 3.0))["step"] == total  # the last step always logs
    assert len(lines) == 3
    rep.close()


def test_resumed_run_counts_eta_from_its_own_steps_and_zero_interval_is_silent():
    clock, lines = FakeClock(), []
    rep = ProgressReporter(100, 60, interval_s=5.0, clock=clock, emit=lines.append)
    clock.now += 20
    got = parse_line(rep.update(62, "MLM", 4.0, 100, 1.0))
    assert got["eta"] == format_duration(20 / 2 * (100 - 62))
    silent = ProgressReporter(3, 0, interval_s=0, clock=clock, emit=lines.append)
    for step in (1, 2, 3):
        clock.now += 100
        assert silent.update(step, "CLM", 1.0, 1, 1.0) is None
    assert len(lines) == 1


def test_format_matches_the_documented_example():
    assert format_progress_line(120, 384, "MLM", 4.213, 6912.4, 192) == \
        "step 120/384 (31%) | MLM | loss 4.2130 | 6,912 tokens/s | ETA 3m12s"


def test_bar_follows_the_environment_then_the_terminal():
    assert bar_wanted({PROGRESS_ENV: "1"}, io.StringIO()) is True
    assert bar_wanted({PROGRESS_ENV: "0"}, FakeTTY()) is False
    assert bar_wanted({}, FakeTTY()) is True
    assert bar_wanted({}, io.StringIO()) is False


def test_bar_counts_steps_and_routes_log_lines_around_it(monkeypatch):
    import logging

    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    handler = logging.StreamHandler(stream)
    logging.root.addHandler(handler)
    try:
        clock, lines = FakeClock(), []
        rep = ProgressReporter(5, 1, interval_s=0, bar=True, clock=clock, emit=lines.append)
        assert handler not in logging.root.handlers  # while the bar shows, records go through tqdm.write
        for step in (2, 3):
            rep.update(step, "CLM", 2.0, 10, 0.5)
        assert rep.bar.n == 3 and rep.bar.total == 5
        rep.close()
        assert rep.bar is None and handler in logging.root.handlers
        assert "3/5" in stream.getvalue()
    finally:
        logging.root.removeHandler(handler)


@pytest.mark.parametrize("terminal", [True, False])
def test_launcher_passes_the_terminal_down_to_the_ranks(monkeypatch, tmp_path, terminal):
    import antlm_dist.cli as cli
    import antlm_dist.train as train

    seen = {}
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("sys.stderr", FakeTTY() if terminal else io.StringIO())
    monkeypatch.setattr(train, "preflight", lambda args, nproc: (None, None))
    import antlm_dist.launcher as launcher

    monkeypatch.setattr(launcher, "run_torchrun", lambda cmd, env, output_dir: seen.update(env) or 0)
    assert cli.train_main(["--output-dir", str(tmp_path / "run"), "--nproc-per-node", "2"]) == 0
    assert seen[PROGRESS_ENV] == ("1" if terminal else "0")


def test_bar_draws_on_a_terminal_that_reports_no_width(monkeypatch):
    import pty
    import select

    master, slave = pty.openpty()  # a new pseudo-terminal has 0 columns until someone sets them
    term = os.fdopen(slave, "w", encoding="utf-8")
    try:
        assert tuple(os.get_terminal_size(slave)) == (0, 0)
        monkeypatch.setattr("sys.stderr", term)
        bar = make_bar(5, "train", "step")
        bar.update(3)
        bar.refresh()
        term.flush()
        ready, _, _ = select.select([master], [], [], 5.0)  # never block the test on an empty terminal
        drawn = os.read(master, 65536).decode("utf-8", "replace") if ready else ""
        bar.close()
    finally:
        term.close()
        os.close(master)
    assert "train:  60%" in drawn and "3/5" in drawn
