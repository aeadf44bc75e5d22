"""The rendezvous port of launch/slurm/antlm.sbatch (issue 16, item 9): derived from the whole
job id, stepped past ports taken on the head node, and ``--standalone`` for one node.

No cluster needed: the sbatch file runs with ``scontrol``, ``srun`` and ``torchrun`` replaced
by small scripts that print what they were given."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

import pytest

from antlm_dist.slurm import PORT_BASE, PORT_SPAN, free_port_from, job_port
from antlm_testutil import REPO


def test_the_two_jobs_of_the_report_get_different_ports():
    assert 29500 + 1012345 % 1000 == 29500 + 1022345 % 1000  # the old formula's collision
    assert job_port(1012345) != job_port(1022345)


def test_random_pairs_of_nearby_jobs_never_collide():
    """1,000 random pairs of jobs that can run at once (ids less than PORT_SPAN apart), checked
    against a loop over the definition: the port is the id's residue, and residues of ids
    closer than the modulus differ."""
    rng = random.Random(16)
    for _ in range(1000):
        a = rng.randrange(0, 10**9)
        b = a + rng.randrange(1, PORT_SPAN)
        pa, pb = job_port(a), job_port(b)
        assert pa != pb, (a, b)
        for port in (pa, pb):
            assert PORT_BASE <= port < PORT_BASE + PORT_SPAN < 32768  # below Linux's ephemeral range
    with pytest.raises(ValueError, match="SLURM_JOB_ID=-1"):
        job_port(-1)


def test_a_taken_port_is_stepped_past():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        s.listen()
        taken = s.getsockname()[1]
        if not PORT_BASE <= taken < PORT_BASE + PORT_SPAN:  # the kernel chose outside the range: take one inside
            s.close()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            taken = free_port_from(PORT_BASE + 777)
            s.bind(("", taken))
            s.listen()
        got = free_port_from(taken)
        assert got != taken and PORT_BASE <= got < PORT_BASE + PORT_SPAN
        s.close()


def _fake_bin(folder, hostnames):
    folder.mkdir()
    scripts = {
        "scontrol": f"#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf '{hostnames}' || echo \"scontrol $*\"\n",
        "srun": "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done > \"$SRUN_ARGS\"\n",
        "torchrun": "#!/bin/sh\nexit 0\n",
        "python": f"#!/bin/sh\nexec {sys.executable} \"$@\"\n",
    }
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)


@pytest.mark.parametrize("nodes", [1, 2])
def test_sbatch_uses_standalone_for_one_node_and_the_job_port_for_several(tmp_path, nodes):
    hosts = "\\n".join(f"node{i}" for i in range(nodes)) + "\\n"
    _fake_bin(tmp_path / "bin", hosts)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "1022345",
           "SLURM_JOB_NAME": "ports", "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": "node[0-1]",
           "ANTLM_RUNS_DIR": str(tmp_path / "runs"), "ANTLM_TORCHRUN": str(tmp_path / "bin" / "torchrun"),
           "SRUN_ARGS": str(tmp_path / "srun_args")}
    env.pop("ANTLM_RDZV_PORT", None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "antlm.sbatch"), "--config", "demo-cpu"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = (tmp_path / "srun_args").read_text().split("\n")
    if nodes == 1:
        assert "--standalone" in args and not any(a.startswith("--rdzv") for a in args)
    else:
        port = free_port_from(job_port(1022345))
        assert f"--rdzv_endpoint=node0:{port}" in args and "--rdzv_id=1022345" in args
        assert "--standalone" not in args
    assert args[-3:-1] == ["--config", "demo-cpu"]
