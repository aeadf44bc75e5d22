"""Training progress on rank 0: a tqdm bar on a terminal, and a periodic log line always.

The bar only helps a person watching a terminal; a file or a SLURM log gets the line
``step 120/384 (31%) | MLM | loss 4.2130 | 6,912 tokens/s | ETA 3m12s`` about every
``logging.progress_interval_s`` seconds (never more than that apart while steps take steady
times; an evaluation or a checkpoint logs lines of its own), and after the last step.

Whether a terminal is watching is decided where it is known: ``antlm-train`` started
alone looks at its own stderr and passes the answer to the ranks it starts in
:data:`PROGRESS_ENV` (under ``torchrun`` the ranks' stderr is a pipe, never a terminal).
Setting :data:`PROGRESS_ENV` by hand overrides that: ``1`` shows the bar, ``0`` hides it.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, TextIO

log = logging.getLogger("antlm_dist")

PROGRESS_ENV = "ANTLM_PROGRESS"
"""``1``: show the tqdm bar on rank 0; ``0``: never; unset: when rank 0's stderr is a terminal."""


def bar_wanted(environ: dict | None = None, stream: TextIO | None = None) -> bool:
    """Whether to show a progress bar: :data:`PROGRESS_ENV` when set to ``0``/``1``, else
    whether ``stream`` (default ``sys.stderr``) is a terminal."""
    value = (os.environ if environ is None else environ).get(PROGRESS_ENV, "").strip()
    if value in ("0", "1"):
        return value == "1"
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def make_bar(total: int, desc: str, unit: str, *, initial: int = 0, leave: bool = True, disable: bool = False):
    """A tqdm bar on stderr that follows the terminal's width, or 100 columns and 40 lines when
    the terminal reports no size (a pseudo-terminal opened by ``script`` from a process without
    a terminal, where tqdm would otherwise print nothing)."""
    from tqdm.auto import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # not a terminal, or a stream without a descriptor
        size = os.terminal_size((0, 0))
    # tqdm hides a bar whose position is not below the screen's height, so a 0-line terminal shows none
    size = {"dynamic_ncols": True} if min(size) > 0 else {"ncols": 100, "nrows": 40}
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, disable=disable, **size)


def format_duration(seconds: float) -> str:
    """``3h07m``, ``12m05s`` or ``42s`` for a duration in seconds (``?`` when unknown)."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_progress_line(step: int, total: int, phase: str, loss: float, tokens_per_s: float,
                         eta_s: float | None) -> str:
    """One progress line: step/total with percent, phase, loss (nats per target), tokens/s, ETA."""
    pct = 100.0 * step / max(total, 1)
    return (f"step {step}/{total} ({pct:.0f}%) | {phase} | loss {loss:.4f} | {tokens_per_s:,.0f} tokens/s | "
            f"ETA {format_duration(eta_s)}")


class ProgressReporter:
    """The bar and the periodic line for one run (create it on rank 0 only).

    ETA = wall time since this reporter started / steps done since then × steps left, so it
    includes evaluations and checkpoints. tokens/s is over the optimizer steps since the
    previous line (step time only).

    Args:
        total_steps: optimizer steps of the whole schedule.
        start_step: steps already done (a resumed run).
        interval_s: most wall time between two lines (s): a line comes after the last step that
            ends before the next one, if as long, would pass it; 0 turns the line off.
        bar: show a tqdm bar (on stderr); log records then go through ``tqdm.write`` so the
            bar stays at the bottom.
        clock: monotonic time in seconds (tests pass their own).
        emit: where a line goes (default: the ``antlm_dist`` logger at INFO).
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, interval_s: float = 30.0, bar: bool = False,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None):
        self.total, self.start_step, self.interval_s = total_steps, start_step, interval_s
        self.clock, self.emit = clock, emit or log.info
        self.t_start = self.t_last_line = self.t_prev_update = clock()
        self.window_tokens, self.window_time_s = 0.0, 0.0
        self.bar, self._redirect = None, None
        if bar:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = make_bar(total_steps, "train", "step", initial=start_step)
            self._redirect = logging_redirect_tqdm()  # log lines print above the bar instead of through it
            self._redirect.__enter__()

    def eta_s(self, step: int, now: float) -> float | None:
        """Seconds left at this pace, or None before the first step of this run."""
        done = step - self.start_step
        return None if done <= 0 else (now - self.t_start) / done * (self.total - step)

    def update(self, step: int, phase: str, loss: float, tokens: float, step_time_s: float) -> str | None:
        """After optimizer step ``step`` (1-based): advance the bar; emit a line when due.

        Args:
            phase: the objective name, e.g. ``CLM``.
            loss: the step's loss (nats per target token).
            tokens: tokens in the step's global batch.
            step_time_s: wall time of the step (s).

        Returns:
            The line emitted, or None.
        """
        self.window_tokens += tokens
        self.window_time_s += step_time_s
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(phase=phase, loss=f"{loss:.3f}", refresh=False)
        now = self.clock()
        step_wall_s, self.t_prev_update = now - self.t_prev_update, now
        # log now if waiting for the next step (as long as this one) would leave more than interval_s
        # between two lines: lines stay at most interval_s apart while steps take steady times
        due = self.interval_s > 0 and (now - self.t_last_line + step_wall_s >= self.interval_s or step == self.total)
        if not due:
            return None
        line = format_progress_line(step, self.total, phase, loss,
                                    self.window_tokens / max(self.window_time_s, 1e-9), self.eta_s(step, now))
        self.emit(line)
        self.t_last_line, self.window_tokens, self.window_time_s = now, 0.0, 0.0
        return line

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
