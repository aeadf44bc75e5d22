"""Mixed phases on the data side: collation by assignment, MNTP labels, scheduled mask rates."""
from __future__ import annotations

import pytest
import torch

from antlm_dist.data.blocks import PackedBlocks
from antlm_dist.data.collators import IGNORE_INDEX, CLMCollator, MLMCollator
from antlm_dist.data.pipeline import BatchPrefetcher
from antlm_dist.data.sampler import DistributedResumableSampler
from antlm_dist.mixing import collators_for, mixed_loss, objective_fields
from antlm_dist.schedule import mask_rate_at, parse_schedule, phase_for_step, step_assignment, total_steps

V, PAD, BOS, EOS, UNK, MASK = 1000, 0, 1, 2, 3, 4
SPECIAL = [PAD, BOS, EOS, UNK, MASK]


def _collators(p=0.15, span=False):
    cls = MLMCollator
    if span:
        from antlm_dist.data.span_masking import SpanMLMCollator as cls
    mlm = cls(mask_id=MASK, pad_id=PAD, eos_id=EOS, special_ids=SPECIAL, vocab_size=V, seed=7, mlm_probability=p)
    return collators_for(CLMCollator(eos_id=EOS, pad_id=PAD), mlm)


def _blocks(n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PackedBlocks(torch.randint(5, V, (n, t), generator=g).to(torch.int32).numpy())


def test_mntp_labels_are_the_next_selected_token_and_mlm_is_unchanged():
    x = torch.randint(5, V, (6, 40), generator=torch.Generator().manual_seed(1))
    c = _collators(0.3)
    mlm, mntp = c["MLM"](x, list(range(6)), 2), c["MNTP"](x, list(range(6)), 2)
    assert torch.equal(mlm.input_ids, mntp.input_ids)  # the same corruption, only the targets move
    selected = mlm.labels != IGNORE_INDEX
    for b in range(6):  # a loop over positions as the reference
        for t in range(39):
            want = int(x[b, t + 1]) if selected[b, t + 1] else IGNORE_INDEX
            assert int(mntp.labels[b, t]) == want
        assert int(mntp.labels[b, 39]) == IGNORE_INDEX
    assert c["MLM"].mlm_target == "same_position"  # the variant did not touch the original


@pytest.mark.parametrize("world,gas", [(1, 4), (2, 2), (3, 1)])
def test_mixed_step_collates_each_micro_batch_with_its_assigned_objective(world, gas):
    blocks = _blocks(96, 24)
    phases = parse_schedule("1_CLM+2_CLM:MNTP=1:3")
    collators = _collators(0.3)
    seen = {}
    for rank in range(world):
        sampler = DistributedResumableSampler(len(blocks), 2, gas, world, rank, seed=5)
        spe = sampler.steps_per_epoch
        got = list(BatchPrefetcher(blocks, sampler, collators, phases, spe, spe, 3 * spe))
        for step, phase, micro in got:
            assignment = step_assignment(phase, step, world * gas)
            ids = sampler.micro_batches(step)
            assert len(micro) == gas
            for m, (objective, batch) in enumerate(micro):
                assert objective == assignment[m * world + rank]
                ref = collators[objective](blocks[ids[m]], ids[m], phase.epoch)
                assert torch.equal(batch.labels, ref.labels) and torch.equal(batch.input_ids, ref.input_ids)
                seen[(step, m * world + rank)] = objective
    n = len(seen)
    assert n % 4 == 0 and sum(o == "CLM" for o in seen.values()) == n // 4  # 1:3 over the whole phase


@pytest.mark.parametrize("schedule,start,end,run_end,span", [
    ("3_MNTP", 0.30, 0.15, 0.15, False),               # run-long line from objective.mlm_probability
    ("1_CLM+3_MLM@0.30..0.15", 0.30, 0.15, None, False),  # the phase's own line
    ("3_MLM@0.05..0.4", 0.05, 0.4, None, True),         # span masking follows it too
])
def test_selected_fraction_follows_the_mask_rate_schedule(schedule, start, end, run_end, span):
    """±0.5 percentage points at the start, middle and end of the line, on 128k tokens per point."""
    phases = parse_schedule(schedule)
    blocks = _blocks(3 * 1024, 128, seed=3)
    sampler = DistributedResumableSampler(len(blocks), 1024, 1, 1, 0, seed=5)
    spe = sampler.steps_per_epoch  # 3 steps per epoch
    masked_phase = phase_for_step(total_steps(phases, spe) - 1, phases, spe)
    first, last = (0, total_steps(phases, spe) - 1) if run_end else (masked_phase.phase_start_step,
                                                                   masked_phase.phase_end_step - 1)
    rate = (lambda s: mask_rate_at(s, phases, spe, 0.30, run_end))
    points = {first: start, (first + last) // 2: start + (end - start) * ((first + last) // 2 - first) / (last - first),
              last: end}
    collators = _collators(0.30, span=span)
    for step, want in points.items():
        (_, phase, micro), = list(BatchPrefetcher(blocks, sampler, collators, phases, spe, step, step + 1,
                                                  mask_rate=rate))
        labels = micro[0].labels
        # MNTP puts the target of position t+1 on t, so count labels over the T-1 shifted positions
        eligible = labels.shape[0] * (labels.shape[1] - 1 if phase.objective == "MNTP" else labels.shape[1])
        fraction = (labels != IGNORE_INDEX).sum().item() / eligible
        assert abs(fraction - want) < 0.005, (step, fraction, want)


def test_mixed_loss_and_fields_from_per_objective_sums():
    per = {"CLM": {"loss_sum": 40.0, "targets": 10.0, "correct": 5.0, "weight": 0.25},
           "MNTP": {"loss_sum": 9.0, "targets": 3.0, "correct": 0.0, "weight": 0.75}}
    assert mixed_loss(per) == pytest.approx(0.25 * 4.0 + 0.75 * 3.0)
    fields = objective_fields(per)
    assert fields == {"clm_loss": 4.0, "clm_targets": 10, "clm_accuracy": 0.5,
                      "mntp_loss": 3.0, "mntp_targets": 3, "mntp_accuracy": 0.0}
    assert objective_fields({"MLM": {"loss_sum": 0.0, "targets": 0.0, "correct": 0.0, "weight": 1.0}})["mlm_loss"] is None


def test_phase_check_covers_the_assignment_on_two_ranks():
    from antlm_testutil import REPO, assert_ok, run_torchrun

    proc = run_torchrun(REPO / "tests" / "dist_scripts" / "assignment_check.py", [], nproc=2, timeout=300)
    assert_ok(proc)
    assert proc.stdout.count("equal assignments agree") == 2 and proc.stdout.count("raised") == 2, proc.stdout
