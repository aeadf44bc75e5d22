"""One run per run folder: an advisory lock on ``<run>/run.lock``.

Two runs writing into one ``--output-dir`` at once log every step twice and overwrite each
other's checkpoints. The ``antlm-train`` launcher takes the lock before it starts any rank
(and tells its ranks through :data:`LOCK_HELD_ENV`); under another launcher (torchrun,
deepspeed, srun) global rank 0 takes it before it touches the folder. The holder keeps it
for the whole run.

``fcntl.flock`` locks belong to an open file, so the kernel releases them when the holder
exits for any reason, SIGKILL included: a stale ``run.lock`` file never blocks a restart.
The file holds the holder's host and PID, for the message a second run gets.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from antlm_dist.config import ConfigError

LOCK_NAME = "run.lock"
LOCK_HELD_ENV = "ANTLM_RUN_LOCK_HELD"
"""Set to ``1`` by the ``antlm-train`` launcher for its ranks: it holds the run folder's lock."""


class RunLockedError(ConfigError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/run.lock``.

    Args:
        run_dir: the run folder; created (with parents) by :meth:`acquire`.
    """

    def __init__(self, run_dir: Path | str):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock and write ``<host> <pid>`` into the file.

        Raises:
            RunLockedError: another process holds it; the message names its host and PID.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"host {holder[0]}, PID {holder[1]}" if len(holder) >= 2 else "an unknown process"
            raise RunLockedError(
                f"--output-dir {self.path.parent} is in use by another run ({who}, lock {self.path}); wait for it "
                "to end or stop it, or choose another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; an unheld file means nothing)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
