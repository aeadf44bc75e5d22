"""The ``antlm-train`` self-launcher: torchrun for the local ranks, with signals forwarded.

Started alone, ``antlm-train`` runs ``torchrun --standalone`` in a session of its own, so
that a terminal's Ctrl-C or ``timeout``'s process-group signal reaches this process only.
The first SIGTERM, SIGINT or SIGHUP is forwarded as SIGTERM (the ranks' preemption signal,
see ``antlm_dist.trainer.PreemptionFlag``) to every rank, which then checkpoint at the end
of the step and exit with status 75. A second signal tells torchrun to stop its ranks at
once (``timeout``'s second copy of its signal, sent to the group, does not count). torchrun gets SIGTERM itself should this process die (``PR_SET_PDEATHSIG``), so no
rank trains on orphaned.

torchrun reports any failed worker as exit status 1; when the ranks wrote the run folder's
``PREEMPTED`` marker, the launcher returns :data:`~antlm_dist.run_folder.PREEMPT_EXIT_CODE`
instead, as a single rank would.
"""
from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
import time
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
SAME_SIGNAL_S = 2.0
"""Signals within this many seconds of the first count as the same request: ``timeout``
sends its signal to the command and then to the command's whole process group."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _ranks_of(torchrun_pid: int) -> list:
    """torchrun's worker processes (its direct children), as psutil processes."""
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process(torchrun_pid).children(recursive=False)
    return []


class _Forwarder:
    """Signal handlers of the launcher while torchrun runs."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.first_at = proc, None

    def __call__(self, signum, frame) -> None:
        import psutil

        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            print(f"antlm-train: received {signal.Signals(signum).name}: asking every rank to checkpoint and stop "
                  "(send it again to stop them at once)", file=sys.stderr, flush=True)
            for rank in _ranks_of(self.proc.pid):
                with contextlib.suppress(psutil.Error):
                    rank.send_signal(signal.SIGTERM)
        elif now - self.first_at > SAME_SIGNAL_S:
            print("antlm-train: second signal: stopping the ranks now, without a checkpoint", file=sys.stderr,
                  flush=True)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)  # torchrun stops its workers


def run_torchrun(cmd: list[str], env: dict, run_dir: Path) -> int:
    """Run ``cmd`` (a torchrun command line) and forward signals; returns the exit status.

    Returns:
        torchrun's status, or 75 when it failed and the ranks marked a preemption.
    """
    from antlm_dist.run_folder import PREEMPT_EXIT_CODE, PREEMPTED_MARKER

    started = time.time()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    forwarder = _Forwarder(proc)
    previous = {s: signal.signal(s, forwarder) for s in FORWARDED}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except InterruptedError:  # a handler ran; keep waiting for the ranks' checkpoint
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    marker = Path(run_dir) / PREEMPTED_MARKER
    if code != 0 and marker.is_file() and marker.stat().st_mtime >= started:  # written by this run's ranks
        return PREEMPT_EXIT_CODE
    return code
