import pytest

from antlm_dist.schedule import Phase, ScheduleError, format_schedule, parse_schedule, phase_for_step, total_steps


def test_parse_paper_notation():
    assert parse_schedule("4_CLM+16_MLM+4_CLM") == [Phase("CLM", 4), Phase("MLM", 16), Phase("CLM", 4)]
    assert parse_schedule("24_CLM") == [Phase("CLM", 24)]
    assert parse_schedule(" 2_mlm + 1_CLM ") == [Phase("MLM", 2), Phase("CLM", 1)]
    assert format_schedule(parse_schedule("4_CLM+16_MLM+4_CLM")) == "4_CLM+16_MLM+4_CLM"


@pytest.mark.parametrize("bad,needle", [
    ("4_CLX", "CLX"), ("0_MLM", "at least 1 epoch"), ("", "empty"), ("4CLM", "malformed"),
    ("4_CLM+", "malformed"), ("-1_MLM", "malformed"), ("CLM", "malformed"), ("1.5_CLM", "malformed"),
])
def test_malformed_schedules_name_the_term(bad, needle):
    with pytest.raises(ScheduleError, match="objective.schedule") as exc:
        parse_schedule(bad)
    assert needle in str(exc.value)


def _expand(schedule: str, steps_per_epoch: int) -> list[str]:
    """Independent reference: list the objective of every step by walking epochs."""
    out = []
    for term in schedule.split("+"):
        n, obj = term.split("_")
        for _ in range(int(n) * steps_per_epoch):
            out.append(obj)
    return out


@pytest.mark.parametrize("schedule", ["4_CLM+16_MLM+4_CLM", "1_MLM", "2_CLM+1_MLM+3_CLM+1_MLM"])
@pytest.mark.parametrize("spe", [1, 3, 7])
def test_phase_for_step_matches_expansion(schedule, spe):
    phases = parse_schedule(schedule)
    ref = _expand(schedule, spe)
    assert total_steps(phases, spe) == len(ref)
    for step, obj in enumerate(ref):
        p = phase_for_step(step, phases, spe)
        assert p.objective == obj
        assert p.causal == (obj == "CLM")
        assert p.epoch == step // spe and p.step_in_epoch == step % spe
        assert p.phase_start_step <= step < p.phase_end_step
        assert ref[p.phase_start_step] == obj and ref[p.phase_end_step - 1] == obj
        if p.phase_end_step < len(ref):
            assert ref[p.phase_end_step] != obj or p.index + 1 < len(phases)


def test_phase_for_step_rejects_bad_arguments():
    with pytest.raises(ValueError):
        phase_for_step(-1, parse_schedule("1_CLM"), 3)
    with pytest.raises(ValueError):
        phase_for_step(0, parse_schedule("1_CLM"), 0)
