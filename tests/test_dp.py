"""DCS: the DP equals brute force over every anchor set, and finds hand-made optima."""
import itertools

import numpy as np
import pytest

from soda.dp import optimal_anchors, segment_costs, solve, step_errors
from soda.errors import UserError


def brute_force(err: np.ndarray, num_anchors: int) -> float:
    """Least total error over every anchor set with step 0, exactly num_anchors anchors, and
    every reused step within the profiled ages (k <= K)."""
    S, K1 = err.shape
    best = np.inf
    for rest in itertools.combinations(range(1, S), num_anchors - 1):
        anchors = (0, *rest)
        total, ok = 0.0, True
        for i, a in enumerate(anchors):
            end = anchors[i + 1] if i + 1 < len(anchors) else S
            for s in range(a + 1, end):
                k = s - a
                if k >= K1:
                    ok = False
                    break
                total += err[s, k]
            if not ok:
                break
        if ok:
            best = min(best, total)
    return best


def random_err(S: int, K: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    err = np.full((S, K + 1), np.inf)
    err[:, 1:] = rng.random((S, K))
    return err


@pytest.mark.parametrize("S,K,seed", [(1, 1, 0), (5, 1, 1), (7, 2, 2), (8, 3, 3), (10, 2, 4), (10, 6, 5), (9, 4, 6)])
def test_dp_equals_brute_force(S, K, seed):
    err = random_err(S, K, seed)
    table = solve(err)
    for n in range(1, S + 1):
        want = brute_force(err, n)
        if not np.isfinite(want):
            assert not table.feasible(n)
            continue
        anchors, cost = table.anchors(n)
        assert len(anchors) == n and anchors[0] == 0 and anchors == sorted(set(anchors))
        assert cost == pytest.approx(want, rel=1e-12)
        # The anchors it returns really cost what it says.
        recomputed = sum(err[s, s - max(a for a in anchors if a <= s)] for s in range(S) if s not in anchors)
        assert recomputed == pytest.approx(cost, rel=1e-12)


def test_sensitive_step_becomes_an_anchor():
    """Reusing step 5 is ruinous at any age: with 2 anchors, the second one must be step 5."""
    S, K = 8, 7
    err = np.zeros((S, K + 1))
    err[:, 0] = np.inf
    err[5, 1:] = 10.0
    err[:, 1:] += 0.01
    assert optimal_anchors(err, 2)[0] == [0, 5]


def test_convex_age_cost_splits_evenly():
    """err grows as k^2 at every step: 2 anchors over 6 steps split 3 + 3 (cost 2 * (1 + 4))."""
    S, K = 6, 5
    err = np.tile(np.arange(K + 1, dtype=float) ** 2, (S, 1))
    anchors, cost = optimal_anchors(err, 2)
    assert anchors == [0, 3] and cost == 10.0
    assert optimal_anchors(err, 6) == ([0, 1, 2, 3, 4, 5], 0.0)


def test_segment_cost_is_the_sum_of_ages():
    err = np.tile(np.arange(4, dtype=float), (5, 1))  # err[s, k] = k
    cost = segment_costs(err)
    assert cost[0, 1] == 0 and cost[0, 2] == 1 and cost[0, 4] == 1 + 2 + 3
    assert np.isinf(cost[3, 3])  # would run past the last step


@pytest.mark.parametrize("n", [0, 3, 11])
def test_infeasible_anchor_count_is_a_user_error(n):
    err = random_err(10, 2, 0)  # segments of at most 3 steps: 4..10 anchors
    with pytest.raises(UserError, match="anchors cannot cover 10 steps: need 4..10"):
        optimal_anchors(err, n)


def test_step_errors_uses_contiguous_ages_only():
    S, L, M = 5, 2, 2
    ec = np.ones((S, L, M, 3))
    ec[0] = np.nan
    err = step_errors(ec, [1, 2, 4])  # age 4 without 3: only 1..2 usable
    assert err.shape == (S, 3) and err[1, 1] == L * M and np.isinf(err[0, 1])
    with pytest.raises(UserError, match=r"no cache age 1 \(intervals \[2, 3, 4\]\); the DP needs 1..K"):
        step_errors(ec, [2, 3, 4])
