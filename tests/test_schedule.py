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


# ----------------------------------------------------------------------------- mixed phases, MNTP, mask rates

VALID = [
    "4_CLM+16_MLM+4_CLM", "24_CLM", "3_MNTP", "24_CLM:MNTP=1:15", "2_CLM+10_CLM:MLM:MNTP=1:2:1",
    "4_CLM+20_MLM@0.3..0.15", "5_MNTP@0.2", "1_CLM+2_MLM:CLM=3:1@0.4..0.1+1_CLM", "6_MLM:MNTP=1:1@0.25",
]


@pytest.mark.parametrize("text", VALID)
def test_every_valid_form_round_trips(text):
    phases = parse_schedule(text)
    again = parse_schedule(format_schedule(phases))
    assert again == phases and format_schedule(again) == format_schedule(phases)
    spaced = " + ".join(t.replace("@", " @ ").replace("..", " .. ") for t in text.lower().split("+"))
    assert parse_schedule(spaced) == phases  # spaces and case do not matter


def test_mixed_and_rate_terms_parse_to_their_parts():
    (p,) = parse_schedule("24_CLM:MNTP=1:15@0.30..0.15")
    assert (p.epochs, p.mix, p.mask_rate, p.objectives) == (24, (("CLM", 1), ("MNTP", 15)), (0.3, 0.15), ("CLM", "MNTP"))
    assert parse_schedule("3_MNTP")[0].objectives == ("MNTP",)
    assert parse_schedule("5_MLM@0.2")[0].mask_rate == (0.2, 0.2)


@pytest.mark.parametrize("bad,term,needle", [
    ("10_CLM:MNTP=1", "10_CLM:MNTP=1", "one whole number per objective"),
    ("10_CLM:MNTP=0:15", "10_CLM:MNTP=0:15", "at least 1"),
    ("10_CLM:CLM=1:15", "10_CLM:CLM=1:15", "appears twice"),
    ("10_CLM:MNTP=2:30", "10_CLM:MNTP=2:30", "lowest terms (1:15)"),
    ("10_CLM=1", "10_CLM=1", "two or more objectives"),
    ("2_CLM+10_CLM:MNTP", "10_CLM:MNTP", "needs its ratio"),
    ("10_CLM:MNTP=a:b", "10_CLM:MNTP=a:b", "malformed"),
    ("10_CLM:MNTP=1:15:2", "10_CLM:MNTP=1:15:2", "one whole number per objective"),
    ("10_CLM:MNTX=1:15", "10_CLM:MNTX=1:15", "'MNTX' is not one of"),
    ("10_MLM@1.5", "10_MLM@1.5", "must lie in (0, 1)"),
    ("10_MLM@0.3..0", "10_MLM@0.3..0", "must lie in (0, 1)"),
    ("10_MLM@0.3..", "10_MLM@0.3..", "malformed"),
    ("10_CLM@0.3", "10_CLM@0.3", "needs a masked objective"),
    ("1_CLM++1_MLM", "", "malformed"),
])
def test_malformed_mixed_forms_name_the_term_and_show_an_example(bad, term, needle):
    with pytest.raises(ScheduleError) as exc:
        parse_schedule(bad)
    msg = str(exc.value)
    assert f"objective.schedule term {term!r}" in msg and needle in msg
    assert "24_CLM:MNTP=1:15" in msg  # a valid example of the notation


@pytest.mark.parametrize("mix_text", ["CLM:MNTP=1:15", "CLM:MLM=1:1", "CLM:MLM:MNTP=1:2:3", "MNTP:CLM=3:5"])
@pytest.mark.parametrize("world", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("gas", [1, 2, 3, 4])
def test_realised_ratio_is_exact_over_every_window(mix_text, world, gas):
    from antlm_dist.schedule import objective_for_micro_batch

    phases = parse_schedule(f"1_CLM+3_{mix_text}")
    mix = phases[1].mix
    period, n_micro, spe = sum(w for _, w in mix), world * gas, 7
    start, end = spe, 4 * spe
    seq = []  # the phase's micro-batches in global order: step, then m × world + r
    for step in range(start, end):
        phase = phase_for_step(step, phases, spe)
        assert phase.mix == mix
        per_rank = [[objective_for_micro_batch(phase, step, m * world + r, n_micro) for m in range(gas)]
                    for r in range(world)]  # what each rank computes on its own
        seq += [per_rank[r][m] for m in range(gas) for r in range(world)]
    assert len(seq) == 3 * spe * n_micro
    want = dict(mix)
    for i in range(len(seq) - period + 1):  # every window of one period, aligned or not
        window = seq[i:i + period]
        assert {o: window.count(o) for o in want} == want, (i, window)
    # and over the whole phase, the exact multiple when it holds whole periods
    if len(seq) % period == 0:
        assert {o: seq.count(o) for o in want} == {o: w * len(seq) // period for o, w in want.items()}


@pytest.mark.parametrize("world,gas", [(1, 1), (2, 2), (3, 4), (16, 1)])
def test_assignment_is_the_same_after_a_resume(world, gas):
    """A fresh process that starts at step s (a resume) computes what the uninterrupted run did:
    the assignment depends only on the step and the global micro-batch index."""
    from antlm_dist.schedule import step_assignment

    phases = parse_schedule("2_CLM:MNTP=1:15+1_MLM")
    spe, n_micro = 5, world * gas
    uninterrupted = [step_assignment(phase_for_step(s, phases, spe), s, n_micro) for s in range(2 * spe)]
    for resume_at in (3, 7):
        fresh = parse_schedule(format_schedule(phases))  # as read back from the checkpoint's schedule text
        resumed = [step_assignment(phase_for_step(s, fresh, spe), s, n_micro) for s in range(resume_at, 2 * spe)]
        assert resumed == uninterrupted[resume_at:]


def test_pure_phase_assignment_is_its_objective_and_bad_index_is_refused():
    from antlm_dist.schedule import objective_for_micro_batch

    phases = parse_schedule("1_MNTP")
    at = phase_for_step(0, phases, 3)
    assert objective_for_micro_batch(at, 0, 3, 4) == "MNTP" and not at.causal
    with pytest.raises(ValueError, match="outside"):
        objective_for_micro_batch(at, 0, 4, 4)


def test_mask_rate_follows_phase_and_run_schedules():
    from antlm_dist.schedule import mask_rate_at

    phases = parse_schedule("1_CLM+2_MLM@0.3..0.1+1_MNTP")
    spe = 5  # MLM phase: steps 5..14
    assert mask_rate_at(5, phases, spe, 0.15) == pytest.approx(0.3)
    assert mask_rate_at(14, phases, spe, 0.15) == pytest.approx(0.1)
    assert mask_rate_at(9, phases, spe, 0.15) == pytest.approx(0.3 + (0.1 - 0.3) * 4 / 9)
    assert mask_rate_at(16, phases, spe, 0.15) == 0.15  # no own rate, no run-long line: constant
    run = parse_schedule("2_CLM:MNTP=1:15")
    last = total_steps(run, spe) - 1
    assert mask_rate_at(0, run, spe, 0.30, 0.15) == pytest.approx(0.30)
    assert mask_rate_at(last, run, spe, 0.30, 0.15) == pytest.approx(0.15)
    assert mask_rate_at(4, run, spe, 0.30, 0.15) == pytest.approx(0.30 - 0.15 * 4 / last)
