"""Beyond the paper: one exact DP over anchors AND per-(layer, module) prune rates under a FLOPs budget.

The paper plans in two stages: DCS places the anchors for error alone (`soda/dp.py`), then UAS
gives each reused module the rate clip(lambda * E_c + beta, 0, 1) with beta filling the budget.
`solve_joint` instead minimises the same predicted error the planner reports,

    sum over reused (s, j) of  E_c(s, j, k)            if module j reuses its cache whole,
                               E_p(s, j, a, k)         if it recomputes a fraction a of its tokens,

(k = steps since the last anchor, j = a (layer, module) pair) over every anchor set and every
per-module choice at once, subject to one budget on the FLOPs of the module work.

State after step s: (age k = s - last anchor, FLOPs used f). Step 0 is an anchor. A step is
either an anchor (k -> 0, pays the full module work) or reused (k -> k + 1 <= K, the profile's
longest contiguous age); on a reused step the modules are decided one after another, each a
multiple-choice knapsack step over f (reuse: no FLOPs; prune at rate a: its FLOPs). So

    V_s[0][f]     = min_k V_{s-1}[k][f - full]
    V_s[k+1][f]   = modules j = 1..J folded in turn:  min(W[f] + E_c, min_a W[f - c_ja] + E_p(a))

from W = V_{s-1}[k]. Cost O(S * J * (A + 1) * K * F), memory S * J * K * F bytes for backtracking.

FLOPs discretisation (`units`): costs are integers (2 x multiply-adds), so when the budget
divided by the greatest common divisor of all action costs is at most `max_units`, that gcd
is the unit and the DP is exact. Otherwise the unit is budget / max_units and every action's
cost is rounded UP to whole units: each plan returned then still fits the true budget (never
over it), and it is optimal among plans whose rounded cost fits; `JointPlan.exact` says which.
numpy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from soda.errors import UserError

MAX_UNITS = 20_000
MAX_TABLE_BYTES = 400 * 2**20  # backtracking table cap; max_units shrinks to fit it


@dataclass
class JointPlan:
    anchors: list[int]
    actions: dict  # (s, j) -> rate index, for pruned modules; absent on a reused step = reuse whole
    error: float  # predicted error of the plan (recomputed from the tables)
    flops: float  # true module-work FLOPs of the plan (anchors + pruned modules)
    unit: float  # FLOPs per DP unit
    exact: bool  # True: the unit divides every cost (no rounding)


def units_for(costs: list[float], budget: float, max_units: int) -> tuple[float, bool]:
    """(unit, exact): the gcd of integer costs when it keeps the budget within max_units units."""
    if all(float(c).is_integer() for c in costs) and float(budget) >= 1:
        g = 0
        for c in costs:
            g = math.gcd(g, int(c))
        if g > 0 and budget / g <= max_units:
            return float(g), True
    return budget / max_units, False


def solve_joint(reuse_err: np.ndarray, prune_err: np.ndarray, full_cost: float, prune_cost: np.ndarray,
                budget: float, max_units: int = MAX_UNITS) -> JointPlan:
    """The least-error plan whose module FLOPs fit `budget`.

    reuse_err  [S, J, K+1]    error of serving module j at step s from a cache k old (column 0 unused)
    prune_err  [S, J, A, K+1] error of recomputing a fraction (rate index a) of its tokens instead
    full_cost  FLOPs of an anchor's module work (every module, every token)
    prune_cost [J, A]         FLOPs of module j pruned at rate index a
    NaN or inf errors mark choices that do not exist (ages beyond the step, unprofiled ages).
    """
    reuse_err = np.where(np.isfinite(reuse_err), reuse_err, np.inf).astype(np.float64)
    prune_err = np.where(np.isfinite(prune_err), prune_err, np.inf).astype(np.float64)
    S, J, K1 = reuse_err.shape
    A = prune_err.shape[2]
    prune_cost = np.asarray(prune_cost, dtype=np.float64).reshape(J, A)
    if budget < full_cost:
        raise UserError(f"the FLOPs budget ({budget:.3g}) does not cover step 0's full compute ({full_cost:.3g})")
    max_units = int(max(64, min(max_units, MAX_TABLE_BYTES // max(1, S * J * K1))))
    unit, exact = units_for([full_cost, *prune_cost.ravel().tolist()], budget, max_units)
    F = int(math.floor(budget / unit + 1e-9))
    fu = int(math.ceil(full_cost / unit - 1e-9))
    pu = np.ceil(prune_cost / unit - 1e-9).astype(np.int64)

    V = np.full((K1, F + 1), np.inf)
    V[0, fu] = 0.0
    anchor_from = np.zeros((S, F + 1), dtype=np.int16)
    choice = np.zeros((S, J, K1, F + 1), dtype=np.int8)
    for s in range(1, S):
        new = np.full_like(V, np.inf)
        if fu <= F:
            prev_best, prev_age = V.min(axis=0), V.argmin(axis=0)
            new[0, fu:] = prev_best[:F + 1 - fu]
            anchor_from[s, fu:] = prev_age[:F + 1 - fu]
        cur = np.full_like(V, np.inf)
        cur[1:] = V[:-1]  # reused: age k -> k + 1; the oldest age cannot be reused again
        for j in range(J):
            best = cur + reuse_err[s, j][:, None]
            ch = np.zeros(best.shape, dtype=np.int8)
            for a in range(A):
                c = int(pu[j, a])
                if c > F:
                    continue
                cand = np.full_like(cur, np.inf)
                cand[:, c:] = cur[:, :F + 1 - c] + prune_err[s, j, a][:, None]
                better = cand < best
                best = np.where(better, cand, best)
                ch[better] = a + 1
            choice[s, j] = ch
            cur = best
        new[1:] = cur[1:]
        V = new

    if not np.isfinite(V).any():
        raise UserError("no plan fits this FLOPs budget within the profiled cache ages")
    k, f = np.unravel_index(int(np.argmin(V)), V.shape)
    k, f = int(k), int(f)
    anchors, actions = [], {}
    for s in range(S - 1, 0, -1):
        if k == 0:
            anchors.append(s)
            k = int(anchor_from[s, f])
            f -= fu
            continue
        for j in range(J - 1, -1, -1):
            c = int(choice[s, j, k, f])
            if c > 0:
                actions[(s, j)] = c - 1
                f -= int(pu[j, c - 1])
        k -= 1
    assert k == 0 and f == fu, (k, f, fu)
    anchors = [0] + anchors[::-1]
    return JointPlan(anchors, actions, plan_error(anchors, actions, reuse_err, prune_err),
                     plan_flops(anchors, actions, full_cost, prune_cost), unit, exact)


def ages(anchors: list[int], S: int) -> list[int]:
    """Steps since the last anchor, per step."""
    out, last, anchor_set = [], 0, set(anchors)
    for s in range(S):
        if s in anchor_set:
            last = s
        out.append(s - last)
    return out


def plan_error(anchors, actions, reuse_err, prune_err) -> float:
    S, J, _ = reuse_err.shape
    total = 0.0
    for s, k in enumerate(ages(anchors, S)):
        if k == 0:
            continue
        for j in range(J):
            total += prune_err[s, j, actions[(s, j)], k] if (s, j) in actions else reuse_err[s, j, k]
    return float(total)


def plan_flops(anchors, actions, full_cost, prune_cost) -> float:
    return float(len(anchors) * full_cost + sum(prune_cost[j, a] for (_, j), a in actions.items()))
