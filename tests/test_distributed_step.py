"""A 2-rank DeepSpeed step under ZeRO-1, 2 and 3 equals one large float64 batch."""
import pytest

from antlm_testutil import REPO, assert_ok, run_torchrun


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_step_equals_single_large_batch(stage):
    proc = run_torchrun(REPO / "tests" / "dist_scripts" / "step_check.py", [str(stage)], nproc=2, timeout=300)
    assert_ok(proc)
    assert proc.stdout.count(f"stage {stage}: rel err") == 2, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_mixed_step_equals_float64_per_objective_formula(stage):
    """CLM:MLM:MNTP=1:1:2 over 2 ranks × 2 accumulation steps: ∇ Σ_k (a_k/Σa) S_k / N_k."""
    proc = run_torchrun(REPO / "tests" / "dist_scripts" / "step_check.py", [str(stage), "mixed"], nproc=2, timeout=600)
    assert_ok(proc)
    assert proc.stdout.count(f"stage {stage} mixed: rel err") == 2, proc.stdout
