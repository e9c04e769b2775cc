"""soda-forecast: the gap-aware anchor DP against brute force, and the planner on hand-made profiles."""
import itertools

import numpy as np
import pytest

from soda.dp_forecast import base_errors, solve
from soda.errors import UserError
from soda.flops import FlopsModel, schedule_flops
from soda.policies import ScheduleSpec, make_schedule
from soda.policies.full import full_schedule
from soda.profile import Profile
from soda.schedule import forecast_order, parse_action


def _brute_force(err, S, n_anchors, K):
    best = (np.inf, None)
    for rest in itertools.combinations(range(1, S), n_anchors - 1):
        anchors = [0, *rest]
        bounds = anchors + [S]
        if any(b - a > K + 1 for a, b in zip(bounds, bounds[1:])):
            continue
        total = 0.0
        for i, a in enumerate(anchors):
            g = a - anchors[i - 1] if i else 0
            total += sum(err[a + k, k, g] for k in range(1, bounds[i + 1] - a))
        best = min(best, (total, anchors), key=lambda x: x[0])
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gap_dp_equals_brute_force(seed):
    S, K = 9, 3
    rng = np.random.default_rng(seed)
    err = rng.random((S, K + 1, K + 2))
    table = solve(err)
    for n in range(3, S + 1):
        want, _ = _brute_force(err, S, n, K)
        anchors, got = table.anchors(n)
        assert got == pytest.approx(want)
        bounds = anchors + [S]  # the backtracked anchors really cost what the table says
        cost = sum(err[a + k, k, a - anchors[i - 1] if i else 0] for i, a in enumerate(anchors)
                   for k in range(1, bounds[i + 1] - a))
        assert cost == pytest.approx(got)
    assert not table.feasible(2)  # 9 steps need at least 3 segments of at most K + 1 = 4
    with pytest.raises(UserError, match="cannot cover"):
        table.anchors(2)


def hand_profile(config, S=12, noise=0.0, epf_value=2.0):
    """E_c = 1; order-1 forecast 0.5 and order-2 0.1 wherever their history exists; pruning never
    helps (unless `epf_value` says so); every entry times (1 + noise * U[0, 1))."""
    rng = np.random.default_rng(0)
    L, M, ks, gs, orders, rates = config.depth, 2, [1, 2, 3], [1, 2, 3, 4], [1, 2], [0.5]
    ec = np.full((S, L, M, 3), np.nan)
    ep = np.full((S, L, M, 1, 3), np.nan)
    ef = np.full((S, L, M, 2, 3, 4), np.nan)
    epf = np.full((S, L, M, 2, 1, 3, 4), np.nan)
    for s in range(S):
        for j, k in enumerate(ks):
            if s >= k:
                ec[s, :, :, j], ep[s, :, :, :, j] = 1.0, 2.0
            for oi, o in enumerate(orders):
                for gi, g in enumerate(gs):
                    if s - k - o * g >= 0:
                        ef[s, :, :, oi, j, gi] = (0.5, 0.1)[oi]
                        epf[s, :, :, oi, :, j, gi] = epf_value
    ec, ep, ef, epf = (t * (1 + noise * rng.random(t.shape)) for t in (ec, ep, ef, epf))
    nested = lambda a: np.where(np.isnan(a), None, a).tolist()  # noqa: E731
    return Profile(model=config.name, model_hash=config.hash(), model_config=config.to_dict(), weights="hand",
                   sampler={"kind": "ddim", "steps": S}, num_steps=S, num_layers=L, modules=["attn", "mlp"],
                   intervals=ks, rates=rates, E_c=nested(ec), E_p=nested(ep), samples=1, orders=orders, gaps=gs,
                   E_f=nested(ef), E_pf=nested(epf)).validate()


def test_planner_picks_the_forecast_each_segment_allows(tiny_config):
    prof = hand_profile(tiny_config)
    spec = ScheduleSpec.for_model(tiny_config, "ddim", 12)
    sched = make_schedule("soda-forecast", spec, anchors=4, profile=prof)
    anchors = sched.params["anchors"]
    assert len(anchors) == 4 and anchors[0] == 0
    for i, a in enumerate(anchors):
        end = anchors[i + 1] if i + 1 < len(anchors) else 12
        g = a - anchors[i - 1] if i else 0
        for s in range(a + 1, end):
            k = s - a
            want = "reuse" if i == 0 else ("forecast@2" if a - 2 * g >= 0 else "forecast@1")
            assert {act for row in sched.steps[s] for act in row} == {want}, (s, k, g)
    # By hand, per (layer, module): 0-1 reuse (1), 2-3 order 1 (0.5), 4-7 and 8-11 order 2 (3 x 0.1
    # each, 4 - 2*2 >= 0 and 8 - 2*4 >= 0): 2.1, times 4 (layer, module) pairs; soda alone would pay 8.
    assert anchors == [0, 2, 4, 8] and sched.params["predicted_error"] == pytest.approx(8.4)
    assert sched.params["forecast_cache"]["orders"] == [[2, 2]] * tiny_config.depth
    per_row = 2 * tiny_config.num_tokens * tiny_config.hidden_size * 4
    assert sched.params["forecast_cache"]["bytes_per_row"] == [[per_row, per_row]] * tiny_config.depth


def test_soda_forecast_meets_the_budget_and_composes_prune(tiny_config):
    """On a profile where pruning on a forecast helps most, pruned actions keep the forecast base."""
    prof = hand_profile(tiny_config, S=20, noise=0.5, epf_value=0.01)
    spec = ScheduleSpec.for_model(tiny_config, "ddim", 20)
    fm = FlopsModel.for_config(tiny_config)
    for target in (1.5, 2.0, 2.5):
        sched = make_schedule("soda-forecast", spec, speedup=target, profile=prof)
        got = schedule_flops(full_schedule(spec), fm, 1) / schedule_flops(sched, fm, 1)
        assert target <= got <= target * 1.03 + 1e-9
        acts = [a for st in sched.steps for row in st for a in row]
        pruned = [a for a in acts if parse_action(a)[0] == "prune"]
        assert pruned and all(forecast_order(a) >= 1 for a in pruned)


def test_soda_forecast_needs_forecast_tables(tiny_config):
    prof = hand_profile(tiny_config)
    d = prof.to_dict()
    for key in ("E_f", "E_pf", "orders", "gaps"):
        d.pop(key)
    old = Profile.from_dict(d)
    spec = ScheduleSpec.for_model(tiny_config, "ddim", 12)
    with pytest.raises(UserError, match="no forecast tables"):
        make_schedule("soda-forecast", spec, speedup=2.0, profile=old)
    assert make_schedule("soda", spec, speedup=2.0, profile=old).policy == "soda"  # soda itself does not care


def test_base_errors_fall_back_to_reuse_without_history(tiny_config):
    prof = hand_profile(tiny_config)
    err, choice = base_errors(prof.ec(), prof.ef(), prof.intervals, prof.gaps)
    assert err[5, 0, 0, 1, 0] == 1.0 and choice[5, 0, 0, 1, 0] == 0  # g = 0: no earlier anchor
    assert err[5, 0, 0, 1, 2] == pytest.approx(0.1) and choice[5, 0, 0, 1, 2] == 2  # 5 - 1 - 2*2 >= 0
    assert err[4, 0, 0, 1, 2] == pytest.approx(0.5) and choice[4, 0, 0, 1, 2] == 1  # order 2 needs step -1
