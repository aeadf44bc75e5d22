"""Run under torchrun with 2 ranks (gloo): the phase check compares a mixed step's assignment.

Both ranks compute the assignment of ``2_CLM:MNTP=1:3``; with the same layout the check
passes, and when rank 1 computes it for another number of micro-batches per step (as a rank
with another gradient accumulation would) every rank raises PhaseDesyncError naming the step.
"""
import torch.distributed as dist

from antlm_dist.schedule import (PhaseDesyncError, check_phase_agreement, parse_schedule, phase_for_step,
                                 step_assignment)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    phases = parse_schedule("1_CLM+2_CLM:MNTP=1:3")
    step = 5  # inside the mixed phase (4 steps per epoch)
    phase = phase_for_step(step, phases, 4)
    check_phase_agreement(phase, phases, step, assignment=step_assignment(phase, step, 6))
    print(f"OK rank {rank}: equal assignments agree")
    wrong = step_assignment(phase, step, 6 if rank == 0 else 2)
    try:
        check_phase_agreement(phase, phases, step, assignment=wrong)
    except PhaseDesyncError as exc:
        assert "objective assignment desync at step 5" in str(exc), exc
        print(f"OK rank {rank}: raised {exc}")
    else:
        raise AssertionError("differing assignments passed the check")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
