"""DCS with forecasting: the exact anchor DP when reused steps may be served as Taylor forecasts.

A forecast at step a + k extrapolates from the anchor a and the anchors before it, so its error
depends on the gap g = a - (previous anchor) as well as on the age k (soda/profile.py measures
E_f(s, l, m, o, k, g) assuming even gaps before a). The DP of soda/dp.py therefore gets the gap
as a second state (g = 0 for the first anchor, which has no predecessor and can only reuse):

    err[s, k, g] = sum_{l,m} min(E_c(s,l,m,k), min_o E_f(s,l,m,o,k,g))      (E_c alone when g = 0)
    E_dp(a, n, g) = sum_{k=1..n-1} err[a+k, k, g]
    dp[a][g][i] = min_{n = 1..K+1} E_dp(a, n, g) + dp[a+n][n][i-1],   dp[S][*][0] = 0

and the answer is dp[0][0][N_s], anchors by backtracking. Forecasting, like reuse, costs no
FLOPs, so the per-(s, l, m) choice inside a segment is the cheaper error. numpy, O(S * K^2 * S).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from soda.errors import UserError


def base_errors(ec: np.ndarray, ef: np.ndarray, intervals, gaps) -> tuple[np.ndarray, np.ndarray]:
    """Per (s, l, m, k, g) the least error of serving without computing, and its forecast order
    index + 1 (0 = reuse): arrays [S, L, M, K+1, G+1] (k = 0 and g = 0 columns: reuse only;
    entries with no estimate are +inf). ec [S, L, M, len(intervals)], ef [S, L, M, O, len(intervals), len(gaps)]."""
    K = 0
    while K + 1 in intervals:
        K += 1
    if K == 0:
        raise UserError(f"the profile has no cache age 1 (intervals {list(intervals)}); the DP needs 1..K")
    S, L, M = ec.shape[:3]
    G = K + 1
    if list(gaps)[:G] != list(range(1, G + 1)):
        raise UserError(f"the profile's forecast gaps {list(gaps)} do not cover 1..{G}")
    err = np.full((S, L, M, K + 1, G + 1), np.inf)
    choice = np.zeros(err.shape, dtype=np.int64)
    for k in range(1, K + 1):
        j = list(intervals).index(k)
        reuse = np.where(np.isnan(ec[:, :, :, j]), np.inf, ec[:, :, :, j])
        err[:, :, :, k, :] = reuse[..., None]
        for g in range(1, G + 1):
            fc = np.where(np.isnan(ef[:, :, :, :, j, g - 1]), np.inf, ef[:, :, :, :, j, g - 1])  # [S, L, M, O]
            best = fc.argmin(axis=3)
            val = np.take_along_axis(fc, best[..., None], axis=3)[..., 0]
            better = val < reuse
            err[:, :, :, k, g] = np.where(better, val, reuse)
            choice[:, :, :, k, g] = np.where(better, best + 1, 0)
    return err, choice


@dataclass
class ForecastDPTable:
    """dp[a][g][i] for every anchor a, gap g before it and segment count i, plus the argmin."""

    value: np.ndarray  # [S+1, G+1, S+1]
    choice: np.ndarray  # [S+1, G+1, S+1] segment length chosen, 0 where infeasible
    max_segment: int

    @property
    def num_steps(self) -> int:
        return self.value.shape[0] - 1

    def feasible(self, num_anchors: int) -> bool:
        return 1 <= num_anchors <= self.num_steps and np.isfinite(self.value[0, 0, num_anchors])

    def anchors(self, num_anchors: int) -> tuple[list[int], float]:
        S = self.num_steps
        if not self.feasible(num_anchors):
            lo = -(-S // self.max_segment)
            raise UserError(f"{num_anchors} anchors cannot cover {S} steps: need {lo}..{S} "
                            f"(the profile's longest cache age is {self.max_segment - 1})")
        out, a, g = [], 0, 0
        for i in range(num_anchors, 0, -1):
            out.append(a)
            n = int(self.choice[a, g, i])
            a, g = a + n, n
        assert a == S
        return out, float(self.value[0, 0, num_anchors])


def solve(step_err: np.ndarray) -> ForecastDPTable:
    """The DP from err [S, K+1, G+1] (summed over layers and modules). Ties go to the shorter segment."""
    S, K1, G1 = step_err.shape
    value = np.full((S + 1, G1, S + 1), np.inf)
    choice = np.zeros((S + 1, G1, S + 1), dtype=np.int64)
    value[S, :, 0] = 0.0
    for a in range(S - 1, -1, -1):
        for g in range(G1 if a else 1):
            total = 0.0
            for n in range(1, K1 + 1):
                if a + n > S:
                    break
                if n > 1:
                    total += step_err[a + n - 1, n - 1, g]
                if not np.isfinite(total):
                    break
                cand = np.full(S + 1, np.inf)
                cand[1:] = total + value[a + n, min(n, G1 - 1), :-1]
                better = cand < value[a, g]
                value[a, g] = np.where(better, cand, value[a, g])
                choice[a, g] = np.where(better, n, choice[a, g])
    return ForecastDPTable(value, choice, K1)
