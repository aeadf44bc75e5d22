"""demo-cpu trains with exactly the per-step losses recorded before the trainer redesign.

``tests/data/demo_cpu_losses.json`` holds the (phase, loss) of steps 1-160 of
``antlm-train --config demo-cpu`` as produced by the code before the Trainer class, the
memory-mapped block cache and the collation thread existed. A refactor must not move a
single bit: the run here stops after the switch from CLM to MLM (step 128) and compares
every logged loss with ``==``. (``benchmarks/demo_cpu_run.py`` runs the same comparison
over any number of steps and also records peak memory per rank.)
"""
from __future__ import annotations

import json

import pytest

from antlm_testutil import REPO, assert_ok, run_cli, train_losses

REFERENCE = REPO / "tests" / "data" / "demo_cpu_losses.json"
STOP_AT_STEP = 132  # 128 CLM steps, then 4 MLM steps


@pytest.mark.slow
def test_demo_cpu_losses_are_bit_identical_to_the_recorded_ones(tmp_path):
    reference = {int(k): tuple(v) for k, v in json.loads(REFERENCE.read_text())["losses"].items()}
    proc = run_cli(["--config", "demo-cpu", "--output-dir", str(tmp_path / "demo"),
                    f"train.stop_at_step={STOP_AT_STEP}"], env={"OMP_NUM_THREADS": "1"}, timeout=1200)
    assert_ok(proc)
    got = train_losses(tmp_path / "demo")
    assert sorted(got) == list(range(1, STOP_AT_STEP + 1))
    assert {s: got[s][0] for s in got} == {s: ("CLM" if s <= 128 else "MLM") for s in got}
    mismatched = {s: (got[s][1], reference[s][1]) for s in got if got[s] != reference[s]}
    assert not mismatched, f"{len(mismatched)} steps differ (got, recorded): {dict(list(mismatched.items())[:5])}"
