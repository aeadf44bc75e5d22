"""The rendezvous port of a multi-node SLURM job, used by ``launch/slurm/antlm.sbatch``.

``python -m antlm_dist.slurm port JOB_ID`` prints the port. It starts from
:func:`job_port`, a function of the whole job id that maps any :data:`PORT_SPAN`
consecutive job ids to distinct ports, so jobs submitted near each other never share one
(the old ``29500 + id % 1000`` sent jobs 1012345 and 1022345 both to 29845). The batch
script runs on the job's first node, which is also the rendezvous host, so
:func:`free_port_from` can then step past a port that something on that host already
listens on. One-node jobs need neither: they use ``torchrun --standalone``.

This module imports nothing heavy; it runs in well under a second.
"""
from __future__ import annotations

import socket
import sys

PORT_BASE = 20000
PORT_SPAN = 12000
"""Ports ``PORT_BASE`` .. ``PORT_BASE + PORT_SPAN - 1`` (20000-31999): above the well-known
services, below Linux's ephemeral range (32768-60999), so a client socket never holds one."""


def job_port(job_id: int) -> int:
    """``PORT_BASE + job_id mod PORT_SPAN``: distinct for any two ids less than PORT_SPAN apart.

    Raises:
        ValueError: a negative job id.
    """
    if job_id < 0:
        raise ValueError(f"SLURM_JOB_ID={job_id} must be >= 0")
    return PORT_BASE + job_id % PORT_SPAN


def _is_free(port: int) -> bool:
    """Nothing on this host listens on ``port`` (a bind to all addresses succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port_from(port: int, tries: int = 200) -> int:
    """The first port at or after ``port`` (wrapping inside the range) that is free here.

    Raises:
        RuntimeError: ``tries`` ports in a row are taken.
    """
    for i in range(tries):
        candidate = PORT_BASE + (port - PORT_BASE + i) % PORT_SPAN
        if _is_free(candidate):
            return candidate
    raise RuntimeError(f"ports {port}..{port + tries - 1} are all in use on {socket.gethostname()}; "
                       "set ANTLM_RDZV_PORT to a free port")


def main(argv: list[str] | None = None) -> int:
    """``python -m antlm_dist.slurm port JOB_ID``: print the job's rendezvous port."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "port" or not argv[1].isdigit():
        print("usage: python -m antlm_dist.slurm port JOB_ID", file=sys.stderr)
        return 2
    print(free_port_from(job_port(int(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
