"""Joint DP over anchors and per-module prune rates: equal to brute force on small cases."""
import itertools

import numpy as np
import pytest

from soda.dp_joint import ages, plan_error, plan_flops, solve_joint, units_for
from soda.errors import UserError


def random_case(S, J, A, K, seed):
    rng = np.random.default_rng(seed)
    reuse = np.full((S, J, K + 1), np.nan)
    reuse[:, :, 1:] = rng.random((S, J, K)) * rng.integers(1, 4, (S, 1, 1))
    prune = np.full((S, J, A, K + 1), np.nan)
    # Pruning usually helps, more so at higher rates, but not always (E_p > E_c happens).
    prune[:, :, :, 1:] = reuse[:, :, None, 1:] * rng.uniform(0.2, 1.3, (S, J, A, K))
    for s in range(S):
        reuse[s, :, s + 1:] = np.nan  # no age beyond the step itself
        prune[s, :, :, s + 1:] = np.nan
    full = int(rng.integers(8, 13))
    prune_cost = rng.integers(1, 6, (J, A))
    return reuse, prune, full, prune_cost


def brute_force(reuse, prune, full, prune_cost, budget):
    """Least error over every anchor set (step 0 included) and every per-module choice."""
    S, J, K1 = reuse.shape
    A = prune.shape[2]
    best = (np.inf, None)
    for rest in itertools.product([0, 1], repeat=S - 1):
        anchors = [0] + [s + 1 for s, b in enumerate(rest) if b]
        age = ages(anchors, S)
        if max(age) >= K1 or len(anchors) * full > budget:
            continue
        reused = [(s, j) for s in range(S) if age[s] > 0 for j in range(J)]
        for opts in itertools.product(range(A + 1), repeat=len(reused)):
            actions = {key: o - 1 for key, o in zip(reused, opts) if o > 0}
            if plan_flops(anchors, actions, full, prune_cost) > budget:
                continue
            err = plan_error(anchors, actions, np.nan_to_num(reuse, nan=np.inf), np.nan_to_num(prune, nan=np.inf))
            if err < best[0]:
                best = (err, (anchors, actions))
    return best


@pytest.mark.parametrize("S,J,A,K,seed", [(4, 2, 2, 2, 0), (5, 2, 1, 2, 1), (5, 1, 2, 3, 2), (4, 3, 1, 3, 3),
                                          (6, 1, 1, 2, 4), (5, 2, 2, 1, 5)])
def test_joint_equals_brute_force(S, J, A, K, seed):
    reuse, prune, full, prune_cost = random_case(S, J, A, K, seed)
    for budget in sorted({full, full + 3, 2 * full, 2 * full + 5, 3 * full, S * full}):
        want, arg = brute_force(reuse, prune, full, prune_cost, budget)
        if not np.isfinite(want):
            with pytest.raises(UserError):
                solve_joint(reuse, prune, full, prune_cost, budget)
            continue
        plan = solve_joint(reuse, prune, full, prune_cost, budget)
        assert plan.exact
        assert plan.anchors[0] == 0 and plan.flops <= budget
        assert plan.error == pytest.approx(want, rel=1e-12, abs=1e-12), (budget, plan, arg)
        # The plan really costs and errs what it says.
        assert plan.flops == plan_flops(plan.anchors, plan.actions, full, prune_cost)


def test_joint_rounds_up_when_inexact():
    """A unit that does not divide the costs rounds every cost up: the plan never exceeds the budget."""
    reuse, prune, full, prune_cost = random_case(6, 2, 2, 3, 7)
    prune_cost = prune_cost + 0.37  # not integers: no exact unit
    for budget in (2 * full + 4.1, 3 * full + 2.9):
        plan = solve_joint(reuse, prune, full, prune_cost, budget, max_units=64)
        assert not plan.exact and plan.flops <= budget
        exact_best, _ = brute_force(reuse, prune, full, prune_cost, budget)
        assert plan.error >= exact_best - 1e-12  # rounding can only lose, never beat the optimum


def test_units():
    assert units_for([12, 18, 30], 600, 1000) == (6.0, True)
    assert units_for([12, 18, 30], 60000, 1000) == (60.0, False)


def test_pruning_preferred_when_it_pays():
    """Hand-made: one reused step where pruning halves the error and the budget allows it."""
    reuse = np.array([[[np.nan, np.nan]], [[np.nan, 1.0]]])  # S=2, J=1, K=1
    prune = np.array([[[[np.nan, np.nan]]], [[[np.nan, 0.5]]]])
    plan = solve_joint(reuse, prune, 10, np.array([[3]]), 13)
    assert plan.anchors == [0] and plan.actions == {(1, 0): 0} and plan.error == 0.5
    plan = solve_joint(reuse, prune, 10, np.array([[3]]), 12)  # no room to prune
    assert plan.anchors == [0] and plan.actions == {} and plan.error == 1.0
    plan = solve_joint(reuse, prune, 10, np.array([[3]]), 20)  # room for a second anchor: zero error
    assert plan.anchors == [0, 1] and plan.error == 0.0
