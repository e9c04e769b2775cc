"""DCS: the exact dynamic program that places N_s anchor (full-compute) steps.

An anchor at step s followed by n - 1 reused steps is a segment of length n; the reused step
s + k is served from a cache k steps old, so the segment costs

    E_dp(s, n) = sum_{k=1..n-1} err[s + k, k],   err[s, k] = sum_{l,m} E_c(s, l, m, k).

A segment may be at most K + 1 long, K being the largest cache age the profile measured
(1..K all present): ages beyond the profile have no error estimate, so they are not allowed.
Step 0 is always an anchor. The recurrence

    dp[s][i] = min_{n = 1..K+1, s+n <= S} E_dp(s, n) + dp[s+n][i-1],   dp[S][0] = 0

gives the least total error of covering steps s..S-1 with i segments; the answer is
dp[0][N_s] and the anchors come from backtracking. One table serves every N_s at once.
numpy only, O(S * N_s * K).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from soda.errors import UserError


def step_errors(ec: np.ndarray, intervals) -> np.ndarray:
    """err [S, K+1] (column 0 unused) from a profile's E_c [S, L, M, len(intervals)]: the
    error of serving step s from a cache k steps old, summed over layers and modules.
    Only the contiguous ages 1..K are kept; entries with s < k are +inf (impossible)."""
    K = 0
    while K + 1 in intervals:
        K += 1
    if K == 0:
        raise UserError(f"the profile has no cache age 1 (intervals {list(intervals)}); the DP needs 1..K")
    S = ec.shape[0]
    err = np.full((S, K + 1), np.inf)
    for k in range(1, K + 1):
        col = ec[:, :, :, list(intervals).index(k)].sum(axis=(1, 2))
        err[:, k] = np.where(np.isnan(col), np.inf, col)
    return err


def segment_costs(err: np.ndarray) -> np.ndarray:
    """E_dp [S, K+2]: cost of a segment starting at s with length n (inf where it leaves 0..S-1)."""
    S, K1 = err.shape
    cost = np.full((S, K1 + 1), np.inf)
    for s in range(S):
        total = 0.0
        cost[s, 1] = 0.0
        for n in range(2, K1 + 1):
            if s + n > S:
                break
            total += err[s + n - 1, n - 1]
            cost[s, n] = total
    return cost


@dataclass
class DPTable:
    """dp[s][i] for every start step s and segment count i, plus the argmin for backtracking."""

    value: np.ndarray  # [S+1, S+1]
    choice: np.ndarray  # [S+1, S+1] segment length chosen, 0 where infeasible
    max_segment: int

    @property
    def num_steps(self) -> int:
        return self.value.shape[0] - 1

    def feasible(self, num_anchors: int) -> bool:
        return 1 <= num_anchors <= self.num_steps and np.isfinite(self.value[0, num_anchors])

    def anchors(self, num_anchors: int) -> tuple[list[int], float]:
        """The optimal anchor steps for exactly `num_anchors` anchors, and their total error."""
        S = self.num_steps
        if not self.feasible(num_anchors):
            lo = -(-S // self.max_segment)
            raise UserError(
                f"{num_anchors} anchors cannot cover {S} steps: need {lo}..{S} "
                f"(the profile's longest cache age is {self.max_segment - 1})")
        out, s = [], 0
        for i in range(num_anchors, 0, -1):
            out.append(s)
            s += int(self.choice[s, i])
        assert s == S
        return out, float(self.value[0, num_anchors])


def solve(err: np.ndarray) -> DPTable:
    """The full DP table from step errors err [S, K+1]. Ties go to the shorter segment."""
    S, K1 = err.shape
    cost = segment_costs(err)
    value = np.full((S + 1, S + 1), np.inf)
    choice = np.zeros((S + 1, S + 1), dtype=np.int64)
    value[S, 0] = 0.0
    for s in range(S - 1, -1, -1):
        for n in range(1, K1 + 1):
            if s + n > S or not np.isfinite(cost[s, n]):
                continue
            cand = np.full(S + 1, np.inf)
            cand[1:] = cost[s, n] + value[s + n, :-1]  # i segments here = 1 + (i-1) after s+n
            better = cand < value[s]
            value[s] = np.where(better, cand, value[s])
            choice[s] = np.where(better, n, choice[s])
    return DPTable(value, choice, K1)


def optimal_anchors(err: np.ndarray, num_anchors: int) -> tuple[list[int], float]:
    """Convenience: anchors and total error for exactly `num_anchors` anchors."""
    return solve(err).anchors(num_anchors)
