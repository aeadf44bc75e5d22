"""Naming the lost rank when a collective fails.

When a rank dies, the survivors' next collective fails: gloo at once with "Connection
closed by peer [ip]:port", NCCL (or a hung peer) after ``distributed.timeout_minutes``.
Neither says which *rank* is gone. At start-up every rank publishes its host name and
addresses (:func:`gather_rank_addresses`, one ``all_gather_object``); on failure
:func:`comm_failure_message` maps the peer address in the error back to ranks.
"""
from __future__ import annotations

import re
import socket

_PEER = re.compile(r"\[([0-9A-Fa-f:.]+)\]:\d+")
_COMM_HINTS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe",
               "socket", "peer")


def _local_addresses() -> list[str]:
    host = socket.gethostname()
    addrs = set()
    for name in {host, socket.getfqdn()}:
        try:
            addrs.update(info[4][0] for info in socket.getaddrinfo(name, None))
        except OSError:
            pass
    return sorted(addrs)


def gather_rank_addresses() -> list[tuple[str, list[str]]]:
    """Collective: ``[(hostname, addresses)]`` indexed by global rank ([] without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return []
    table: list = [None] * dist.get_world_size()
    dist.all_gather_object(table, (socket.gethostname(), _local_addresses()))
    return table


def is_comm_failure(exc: BaseException) -> bool:
    """True for errors raised by a failed or timed-out collective."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(h in str(exc).lower() for h in _COMM_HINTS)


def lost_ranks(exc: BaseException, table: list[tuple[str, list[str]]], my_rank: int) -> list[int]:
    """Ranks whose addresses appear as the peer in ``exc`` (excluding ``my_rank``)."""
    peers = set(_PEER.findall(str(exc)))
    return [r for r, (_, addrs) in enumerate(table) if r != my_rank and peers & set(addrs)]


def comm_failure_message(exc: BaseException, table: list[tuple[str, list[str]]], rank: int, world: int,
                         timeout_minutes: float) -> str:
    """One line for stderr: who failed, which rank is lost (when known), and the cause."""
    me = f"rank {rank} of {world}" + (f" on {table[rank][0]}" if rank < len(table) else "")
    lost = lost_ranks(exc, table, rank)
    if lost:
        hosts = sorted({table[r][0] for r in lost})
        who = (f"lost rank {lost[0]}" if len(lost) == 1 else f"lost one of ranks {', '.join(map(str, lost))}")
        what = f"{who} on {', '.join(hosts)}: its connection closed during a collective, so it died or was killed"
    elif "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
        what = (f"a collective timed out after distributed.timeout_minutes={timeout_minutes:g}: a peer rank "
                "died or stopped responding")
    else:
        what = "a collective failed: a peer rank died or stopped responding"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"antlm-train: error: {me}: {what}; the launcher's failure summary names the rank that exited "
            f"first. Cause: {first_line}")


def format_rank_table(table: list[tuple[str, list[str]]]) -> str:
    """``"node1: ranks 0,1; node2: ranks 2,3"`` (hosts in order of their first rank)."""
    by_host: dict[str, list[int]] = {}
    for r, (host, _) in enumerate(table):
        by_host.setdefault(host, []).append(r)
    return "; ".join(f"{h}: rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))}" for h, rs in by_host.items())
