"""soda-forecast: SODA's planner choosing among full, reuse, Taylor forecast and prune.

The same three stages as `soda` (soda/policies/soda.py, the paper's method, unchanged), with
TaylorSeer's forecast (soda/forecast.py) as one more way to serve a module without computing it:

- OFS: the profile's E_f(s,l,m,o,k,g) and E_pf(s,l,m,o,a,k,g) (soda/profile.py), next to E_c and E_p.
- DCS: the anchor DP with the gap before each anchor as state (soda/dp_forecast.py): a reused
  (s, l, m) costs the least of E_c and E_f over the profiled orders.
- UAS: on each non-anchor (s, l, m) the base is that cheaper of reuse / forecast@o; the rate is
  a = clip(lam * e_base / mean(E_c) + beta, 0, 1) snapped up to the rate set, and the module is
  pruned when the best of E_p (on the cache) and E_pf (on a forecast) at that rate beats e_base;
  the pruned action keeps that base ("prune@a" or "prune@a+forecast@o"). beta fills the same
  FLOPs budget by bisection, and (N_s, lam) are searched exactly as `soda` does.

Forecasts cost no FLOPs in our model (elementwise work, like the residual add); they cost memory:
o arrays of the module output's shape per forecast (layer, module), recorded in the schedule's
`params["forecast_cache"]`. The gap model assumes even gaps before an anchor; the executor uses
the true ones (TaylorSeer's own rule), so the profile's E_f is an estimate where gaps differ.
"""
from __future__ import annotations

import math

import numpy as np

from soda.errors import UserError
from soda.flops import FlopsModel, schedule_flops
from soda.forecast import forecast_cache
from soda.policies import ScheduleSpec
from soda.policies.soda import SELECTOR, Planner, planner_inputs
from soda.schedule import FULL, REUSE, forecast, prune


def make(spec: ScheduleSpec, speedup: float | None = None, anchors: int | None = None, profile=None,
         lam: float | None = None, rates=None, **_ignored):
    """A soda-forecast schedule for `spec` from a profile with forecast tables (format 2)."""
    profile, rates, fm = planner_inputs("soda-forecast", spec, profile, speedup, anchors, rates)
    if not profile.has_forecast:
        raise UserError("this profile has no forecast tables (profile format 1, or profiled without orders); "
                        "measure a new one with `cli.py profile`")
    planner = ForecastPlanner(profile, rates, fm)
    return planner.schedule(spec, planner.plan(speedup, anchors, lam), speedup)


class ForecastPlanner(Planner):
    """SODA's planner with forecast bases: only the DP table and the per-entry errors differ."""

    def __init__(self, profile, rates: list[float], fm: FlopsModel):
        from soda.dp_forecast import base_errors, solve

        super().__init__(profile, rates, fm)
        ridx = [profile.rates.index(a) for a in rates]
        self.orders = list(profile.orders)
        ef, epf = profile.ef(), profile.epf()[:, :, :, :, ridx]  # [S,L,M,O,K,G], [S,L,M,O,A,K,G]
        self.base_err, self.base_choice = base_errors(self.ec, ef, profile.intervals, profile.gaps)
        self.table = solve(self.base_err.sum(axis=(1, 2)))
        # Pruned on the cache (E_p) or on a forecast (E_pf): [S, L, M, A, K+1, G+1], and which base.
        S, L, M, A, G = self.S, self.L, self.M, len(rates), self.K + 1
        self.prune_err = np.full((S, L, M, A, self.K + 1, G + 1), np.inf)
        self.prune_choice = np.zeros(self.prune_err.shape, dtype=np.int64)
        for k in range(1, self.K + 1):
            j = profile.intervals.index(k)
            on_cache = np.where(np.isnan(self.ep[..., j]), np.inf, self.ep[..., j])  # [S, L, M, A]
            self.prune_err[:, :, :, :, k, :] = on_cache[..., None]
            for g in range(1, G + 1):
                fc = epf[:, :, :, :, :, j, g - 1]  # [S, L, M, O, A]
                fc = np.where(np.isnan(fc), np.inf, fc)
                best = fc.argmin(axis=3)
                val = np.take_along_axis(fc, best[:, :, :, None], axis=3)[:, :, :, 0]
                better = val < on_cache
                self.prune_err[:, :, :, :, k, g] = np.where(better, val, on_cache)
                self.prune_choice[:, :, :, :, k, g] = np.where(better, best + 1, 0)
        self._bases: dict = {}

    def _candidates(self, anchors: list[int]):
        """Per non-anchor (s, l, m): the best non-computing error, the best pruned error per rate,
        module index and key (what `Planner._fill` expects); the bases are kept for `schedule`."""
        age, gap = np.zeros(self.S, dtype=np.int64), np.zeros(self.S, dtype=np.int64)
        last, prev_gap = 0, 0
        for s in range(self.S):
            if s in anchors:
                prev_gap, last = (s - last if s else 0), s
            age[s], gap[s] = s - last, prev_gap
        steps = [s for s in range(self.S) if age[s] > 0]
        ec = np.array([self.base_err[s, :, :, age[s], gap[s]] for s in steps]).reshape(-1)
        ep = np.array([self.prune_err[s, :, :, :, age[s], gap[s]] for s in steps]).reshape(-1, len(self.rates))
        base = np.array([self.base_choice[s, :, :, age[s], gap[s]] for s in steps]).reshape(-1)
        pbase = np.array([self.prune_choice[s, :, :, :, age[s], gap[s]] for s in steps]).reshape(-1, len(self.rates))
        keys = [(s, l, m) for s in steps for l in range(self.L) for m in range(self.M)]
        self._bases[tuple(anchors)] = {key: (int(b), pb) for key, b, pb in zip(keys, base, pbase)}
        mods = np.array([k[2] for k in keys], dtype=np.int64)
        return ec, ep, mods, keys

    def schedule(self, spec: ScheduleSpec, plan, speedup: float | None):
        from soda.policies.full import base_schedule

        if tuple(plan.anchors) not in self._bases:
            self._candidates(plan.anchors)
        bases = self._bases[tuple(plan.anchors)]
        order = lambda i: self.orders[i - 1] if i else 0  # noqa: E731  choice index -> order

        def action(s: int, l: int, m: int) -> str:
            b, pb = bases[(s, l, m)]
            if (s, l, m) in plan.actions:
                r = plan.actions[(s, l, m)]
                return prune(float(self.rates[r]), order(int(pb[r])))
            return forecast(order(b)) if b else REUSE

        steps = [[[FULL] * self.M for _ in range(self.L)] if s in plan.anchors else
                 [[action(s, l, m) for m in range(self.M)] for l in range(self.L)] for s in range(self.S)]
        params = {
            "target_speedup": speedup,
            "num_anchors": len(plan.anchors),
            "anchors": plan.anchors,
            "beta": round(float(plan.beta), 6),
            "lam": float(plan.lam),
            "lam_scale": self.ec_scale,
            "rates": [float(a) for a in self.rates],
            "orders": self.orders,
            "predicted_error": round(float(plan.error), 6),
            "profile": {"weights": self.profile.weights, "samples": self.profile.samples,
                        "intervals": self.profile.intervals, "gaps": self.profile.gaps},
        }
        sched = base_schedule(spec, "soda-forecast", steps, SELECTOR, params)
        flops = schedule_flops(sched, self.fm, 1)
        assert math.isclose(flops, plan.flops, rel_tol=1e-9), (flops, plan.flops)
        sched.params["flops_speedup"] = round(float(self.full_flops / flops), 4)
        sched.params["forecast_cache"] = forecast_cache(sched.forecast_orders(), self.fm.num_tokens, self.fm.hidden)
        return sched

