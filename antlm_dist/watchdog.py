"""A heartbeat watchdog that stops every surviving rank when a peer hangs or is stopped.

A rank frozen by ``kill -STOP`` (or a hung host) closes no connection, so the survivors'
next collective simply waits. Some collectives honour ``distributed.timeout_minutes``;
others do not (DeepSpeed's CPU paths were seen to wait for more than 240 s with a 30 s
timeout), and none says which rank is gone.

Every rank therefore runs one daemon thread that, every ``interval_s``:

1. increments its own counter ``<prefix>/<rank>`` in the rendezvous key-value store
   (the ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT`` that torchrun's agent, or rank 0 of an
   ``env://`` launch, serves), and
2. reads every peer's counter.

A peer whose counter has not moved for ``timeout_s`` (measured on this rank's monotonic
clock, so clock skew between hosts does not matter) stopped answering: the thread prints
one line naming its rank and host and ends this process with exit status
:data:`WATCHDOG_EXIT_CODE`. The thread keeps beating while the main thread is blocked in a
C++ collective, because torch releases the GIL there. A rank that finishes normally writes
``done`` so that its peers stop watching it.

The heartbeat is a side channel of the process group, in the manner of torch's own
NCCL heartbeat monitor (``TORCH_NCCL_ENABLE_MONITORING``), which only exists for NCCL
and kills its own process rather than naming a peer.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import timedelta

log = logging.getLogger("antlm_dist")

WATCHDOG_EXIT_CODE = 1
"""Exit status of a rank the watchdog stops (a failure: torchrun then stops its peers)."""
_DONE = b"done"


def heartbeat_interval_s(timeout_s: float) -> float:
    """Seconds between beats: a tenth of the timeout, within [0.5, 10] s, so that a peer is
    declared lost at most ``timeout_s + interval`` after its last beat."""
    return min(10.0, max(0.5, timeout_s / 10))


class Watchdog:
    """Heartbeats of one rank through a key-value store, and the thread that watches its peers.

    Args:
        store: a ``torch.distributed.Store`` shared by all ranks (``set``/``get``/``add``).
        rank: this rank's global rank.
        world: the world size.
        hosts: host name per global rank, for the message (may be empty).
        timeout_s: seconds of silence after which a peer counts as lost (> 0).
        prefix: key prefix; one per launch, so a restarted group never reads stale beats.
        on_lost: called with the message instead of ending the process (tests only).

    Raises:
        ValueError: ``timeout_s`` <= 0 or ``rank`` outside ``[0, world)``.
    """

    def __init__(self, store, rank: int, world: int, hosts: list[str], timeout_s: float, *,
                 prefix: str = "antlm/heartbeat", on_lost=None):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside [0, {world})")
        self.store, self.rank, self.world, self.hosts = store, rank, world, hosts
        self.timeout_s, self.interval_s = timeout_s, heartbeat_interval_s(timeout_s)
        self.prefix, self.on_lost = prefix, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="antlm-watchdog", daemon=True)
        self._last_value: dict[int, bytes] = {}
        self._last_change: dict[int, float] = {}
        self._done: set[int] = set()
        self.lost: list[int] = []

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/{rank}"

    def start(self) -> "Watchdog":
        self.store.add(self._key(self.rank), 1)  # exists before any peer reads it
        now = time.monotonic()
        for r in range(self.world):
            self._last_change[r] = now
        self._thread.start()
        return self

    def close(self, finished: bool = True) -> None:
        """Stop beating; with ``finished`` tell the peers this rank ended normally."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval_s + 1)
        if finished:
            try:
                self.store.set(self._key(self.rank), _DONE)
            except Exception:  # noqa: BLE001 - the store may already be gone at exit
                pass

    def silent_ranks(self, min_silence_s: float) -> list[int]:
        """Peers (not finished) whose counter has not moved for at least ``min_silence_s``."""
        now = time.monotonic()
        return [r for r, t in sorted(self._last_change.items())
                if r != self.rank and r not in self._done and now - t >= min_silence_s]

    def describe(self, ranks: list[int]) -> str:
        """``"rank 1 on node2"`` (or ``"ranks 1, 2 on node2, node3"``)."""
        hosts = sorted({self.hosts[r] for r in ranks if r < len(self.hosts)})
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        return who + (f" on {', '.join(hosts)}" if hosts else "")

    def poll(self) -> list[int]:
        """One beat and one read of every peer; returns the peers silent for ``timeout_s``."""
        self.store.add(self._key(self.rank), 1)
        now = time.monotonic()
        for r in range(self.world):
            if r == self.rank or r in self._done:
                continue
            value = self.store.get(self._key(r))
            if value == _DONE:
                self._done.add(r)
            elif value != self._last_value.get(r):
                self._last_value[r], self._last_change[r] = value, now
        return self.silent_ranks(self.timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                lost = self.poll()
            except Exception as exc:  # noqa: BLE001 - a store that stopped answering is itself a loss
                lost = self.silent_ranks(self.timeout_s)
                log.debug("heartbeat store error: %s", exc)
            if lost:
                self.lost = lost
                self._fire(lost)
                return

    def _fire(self, lost: list[int]) -> None:
        me = f"rank {self.rank}" + (f" on {self.hosts[self.rank]}" if self.rank < len(self.hosts) else "")
        msg = (f"antlm-train: error: {me}: {self.describe(lost)} stopped answering: no heartbeat for "
               f"{self.timeout_s:g} s (distributed.timeout_minutes={self.timeout_s / 60:g}); it hangs, was "
               "stopped (SIGSTOP) or its host is unreachable. Stopping this rank; continue with --resume.")
        if self.on_lost is not None:
            self.on_lost(msg)
            return
        print(msg, file=sys.stderr, flush=True)
        logging.shutdown()
        # os._exit, not sys.exit: the main thread is blocked inside a C++ collective, where
        # neither an exception from this thread nor a signal handler (run only by the main
        # thread between bytecodes) can reach it; tearing the process group down would wait
        # on the lost peer as well.
        os._exit(WATCHDOG_EXIT_CODE)


def start_watchdog(timeout_minutes: float, hosts: list[str]) -> Watchdog | None:
    """A started :class:`Watchdog` for the initialised process group, or None for one rank.

    Connects its own client to the rendezvous store (``MASTER_ADDR``/``MASTER_PORT``), so
    its requests never queue behind the process group's. Keys are scoped by torchrun's run
    id and restart count.

    Raises:
        RuntimeError: the store cannot be reached (a launcher that sets no ``MASTER_PORT``).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    timeout_s = timeout_minutes * 60
    interval = heartbeat_interval_s(timeout_s)
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          is_master=False, timeout=timedelta(seconds=max(2 * interval, 5)),
                          wait_for_workers=False)
    prefix = (f"antlm/heartbeat/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
              f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    return Watchdog(store, dist.get_rank(), dist.get_world_size(), hosts, timeout_s, prefix=prefix).start()
