"""ToCa and DuCa on Open-Sora against our transcription of the official Open-Sora control flow
(tests/reference/toca_opensora_reference.py): every step's and block's action and token count."""
from __future__ import annotations

import pytest

from soda.policies import ScheduleSpec
from soda.policies import toca_video
from soda.schedule import SKIP, kept_tokens, parse_action
from tests.reference import toca_opensora_reference as ref

# The published run: 51 frames of 240 x 426 -> 15 x 30 x 53 latents -> 15 x 15 x 27 tokens.
TOKENS = 15 * 15 * 27
SPEC = ScheduleSpec("opensora-v1.2", "0" * 16, 56, ("attn", "cross_attn", "mlp"), TOKENS, "rflow", 30)
NAMES = {"attn": "attn", "cross_attn": "cross-attn", "mlp": "mlp"}


def as_official(action: str, n: int):
    kind, rate = parse_action(action)
    if kind == "prune":
        return ("fresh", kept_tokens(rate, n))
    return kind


@pytest.mark.parametrize("policy", ["toca", "duca"])
def test_published_setting_equals_official_control_flow(policy):
    want = ref.run(policy, 30, 28, TOKENS)
    steps = toca_video.build_steps(SPEC, 3, 0.1, dual=policy == "duca")
    for s, (row, official) in enumerate(zip(steps, want)):
        if row == SKIP:
            assert all(b["all_aggressive"] for b in official), s
            continue
        for l, (actions, block) in enumerate(zip(row, official)):
            for m, action in zip(SPEC.modules, actions):
                expect = block[NAMES[m]]
                expect = "reuse" if expect == ("fresh", 0) else expect
                assert as_official(action, TOKENS) == expect, (s, l, m)


def test_published_counts():
    """ToCa: 3 + 9 full attn/MLP steps, 3 + 4 full cross-attention steps, MLP 14.95% of the tokens
    between; DuCa: the same full steps and 9 skipped (aggressive) steps."""
    toca = toca_video.build_steps(SPEC, 3, 0.1)
    full = lambda steps, m: sum(1 for st in steps if st != SKIP and st[0][m] == "full")  # noqa: E731
    assert (full(toca, 0), full(toca, 1), full(toca, 2)) == (12, 7, 12)
    assert toca[4][0][2] == "prune@" + format(int(0.1495 * TOKENS) / TOKENS, "g")
    assert kept_tokens(parse_action(toca[4][0][2])[1], TOKENS) == int(0.1495 * TOKENS) == 908
    duca = toca_video.build_steps(SPEC, 3, 0.1, dual=True)
    assert [s for s, st in enumerate(duca) if st == SKIP] == [5, 8, 11, 14, 17, 20, 23, 26, 29]


def test_wrong_modules_refused():
    from soda.errors import UserError

    dit = ScheduleSpec("dit", "0" * 16, 28, ("attn", "mlp"), 256, "rflow", 30)
    with pytest.raises(UserError, match="for modules attn, cross_attn, mlp"):
        toca_video.build_steps(dit, 3, 0.1)


@pytest.mark.parametrize("policy", ["toca", "duca", "fora"])
def test_scaled_to_a_speedup_on_the_video_flops_model(policy):
    """--speedup 2.5 on opensora-v1.2's FLOPs model (spatial and temporal attention costed apart):
    ToCa/DuCa within the 3% tolerance and their fast count equal to schedule_flops on the built
    schedule; FORA (whole steps only) at the fewest anchors that reach the target."""
    from soda.flops import FlopsModel, schedule_flops
    from soda.models.config import get_config
    from soda.policies import make_schedule
    from soda.policies.full import full_schedule

    cfg = get_config("opensora-v1.2")
    spec = ScheduleSpec.for_model(cfg, "rflow", 30)
    fm = FlopsModel.for_config(cfg)
    schedule = make_schedule(policy, spec, speedup=2.5, flops=fm)
    achieved = schedule_flops(full_schedule(spec), fm, 1) / schedule_flops(schedule, fm, 1)
    assert 2.5 * (1 - 1e-9) <= achieved <= 2.5 * 1.03 or (policy == "fora" and achieved >= 2.5)
    assert schedule.params["achieved_speedup"] == pytest.approx(achieved, rel=1e-6)
    if policy != "fora":
        N, R = schedule.params["N"], schedule.params["R"]
        fast = toca_video.fast_flops(spec, fm, N, R, policy == "duca")
        assert fast == pytest.approx(schedule_flops(schedule, fm, 1), rel=1e-12)
        assert all(st == SKIP or all(row[0] in ("full", "reuse") for row in st) for st in schedule.steps)


def test_video_attention_flops_by_axis():
    """Spatial layers attend over S = 15*27 patches, temporal ones over T = 15 frames."""
    from soda.flops import FlopsModel
    from soda.models.config import get_config

    cfg = get_config("opensora-v1.2")
    fm = FlopsModel.for_config(cfg)
    H, n, S, T = 1152, TOKENS, 15 * 27, 15
    linear = 2 * n * H * 3 * H + 2 * n * H * H
    assert fm.module("attn", 1, n, 0) == linear + 4 * n * S * H
    assert fm.module("attn", 1, n, 1) == linear + 4 * n * T * H
    assert fm.module("attn", 1, n) == pytest.approx(linear + 2 * n * (S + T) * H)
    assert fm.module("cross_attn", 1, n, 0) == 4 * n * H * H + 4 * n * 300 * H


@pytest.mark.parametrize("policy", ["toca", "duca"])
def test_tuned_setting_fixes_n_and_weights_and_solves_r(policy):
    """What `bench --tune` builds: N and the official formula's step/layer weights given, R solved."""
    from soda.flops import FlopsModel, schedule_flops
    from soda.models.config import get_config
    from soda.policies import make_schedule
    from soda.policies.full import full_schedule

    cfg = get_config("opensora-v1.2")
    spec = ScheduleSpec.for_model(cfg, "rflow", 30)
    fm = FlopsModel.for_config(cfg)
    sched = make_schedule(policy, spec, speedup=2.0, flops=fm, N=4, step_weight=2.0, layer_weight=-0.2)
    assert sched.params["N"] == 4 and sched.params["step_weight"] == 2.0
    achieved = schedule_flops(full_schedule(spec), fm, 1) / schedule_flops(sched, fm, 1)
    assert 2.0 <= achieved <= 2.0 * 1.03
    fast = toca_video.fast_flops(spec, fm, 4, sched.params["R"], policy == "duca", 2.0, -0.2)
    assert fast == pytest.approx(schedule_flops(sched, fm, 1), rel=1e-12)
    # The layer weight (-0.2) makes the last blocks refresh more MLP tokens than the first.
    tokens = lambda l: sum(TOKENS if a == "full" else kept_tokens(parse_action(a)[1], TOKENS)  # noqa: E731
                           for st in sched.steps if st != SKIP for a in [st[l][2]] if a != "reuse")
    if policy == "duca":  # DuCa at 2x refreshes every partial MLP whole: nothing for the weight to move
        assert all(parse_action(st[l][2])[0] in ("full", "reuse") for st in sched.steps if st != SKIP
                   for l in range(cfg.depth)) and tokens(0) == tokens(cfg.depth - 1)
    else:
        assert tokens(0) < tokens(cfg.depth - 1)
