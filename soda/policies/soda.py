"""SODA: DCS anchors from the exact DP, then UAS pruning on the reused steps.

On a non-anchor step s, each (layer l, module m) is k steps past its anchor. UAS gives it
a recompute rate a = clip(lam * E_c(s,l,m,k) + beta, 0, 1), snapped UP to the nearest rate of
the discrete set (one exported subgraph per rate); a rate above the largest one is clamped
to the largest (never "full": a full module would refresh the cache and change every later
age the DP planned with). The module is pruned at that rate only when the profile says it
helps, E_p(s,l,m,a,k) < E_c(s,l,m,k); otherwise it reuses the cache whole (also when a = 0).

Meeting a FLOPs budget (`speedup`): every anchor count N_s whose reuse-only schedule is fast
enough is a candidate. For each, the DP places the anchors, and bisection finds the largest
beta whose pruning still fits the budget. The candidate with the least predicted error
(sum of E_c over reused modules + E_p over pruned ones) wins, among those whose speedup is
within 3% above the target (if none is, the one closest to it). `anchors=N` alone fixes N_s and
prunes nothing; with `speedup` too, N_s is fixed and beta fills the budget.

lam is the paper's lambda in units of 1 / mean(E_c) of the table (lam=1: a module of average
sensitivity gets beta + 1); by default it is picked from LAM_GRID by predicted error (on a
dit-digits checkpoint, lower predicted error meant higher measured PSNR for every pair of
candidate schedules but one, 0.06 dB apart).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from soda.errors import UserError
from soda.flops import FlopsModel, schedule_flops
from soda.policies import ScheduleSpec
from soda.schedule import FULL, REUSE, kept_tokens, prune

SELECTOR = "feature-mean"
TOLERANCE = 0.03  # achieved speedup may exceed the target by this fraction
LAM_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class Plan:
    """One candidate: anchors, beta and what the profile predicts for it."""

    anchors: list[int]
    beta: float | None  # None: not the lambda/beta rule (joint DP, anchors only)
    lam: float | None  # normalised (see module docstring)
    flops: float
    error: float
    actions: dict  # (s, l, m) -> rate index (pruned) ; absent = reuse


PLANNERS = ("uas", "joint", "dcs", "fixed")


def make(spec: ScheduleSpec, speedup: float | None = None, anchors: int | None = None, profile=None,
         lam: float | None = None, rates=None, planner: str = "uas", **_ignored):
    """A SODA schedule for `spec` from a profile (a `soda.profile.Profile` or a path to one).

    `planner`: "uas" (the paper: DCS anchors, then lambda * E_c + beta rates), "joint" (one exact
    DP over anchors and rates, `soda.dp_joint`), and for the ablation "dcs" (DCS anchors, no
    pruning) and "fixed" (evenly spaced anchors, no pruning); the last two use the most anchors
    whose speedup still reaches `speedup` (whole anchors: they may land above the window)."""
    if planner not in PLANNERS:
        raise UserError(f"unknown planner {planner!r}; choose one of: {', '.join(PLANNERS)}")
    profile, rates, fm = planner_inputs("soda", spec, profile, speedup, anchors, rates)
    if planner != "uas" and (speedup is None or anchors is not None or lam is not None):
        raise UserError(f"--planner {planner} takes --speedup only (no --anchors or --lam)")
    planner_ = Planner(profile, rates, fm)
    if planner == "joint":
        plan = planner_.plan_joint(speedup)
    elif planner in ("dcs", "fixed"):
        plan = planner_.plan_anchors_only(speedup, evenly=planner == "fixed")
    else:
        plan = planner_.plan(speedup, anchors, lam)
    sched = planner_.schedule(spec, plan, speedup)
    sched.params["planner"] = planner
    return sched


def planner_inputs(policy: str, spec: ScheduleSpec, profile, speedup, anchors, rates):
    """The checks a profile-driven policy shares: (profile loaded and checked against `spec`,
    the rates to plan with, the FLOPs model of the profiled model)."""
    from soda.models.config import ModelConfig
    from soda.profile import Profile

    if profile is None:
        raise UserError(f"the {policy} policy needs a sensitivity profile (cli.py profile, or --profile FILE)")
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    profile.check_fits(spec.model, spec.model_hash, spec.sampler, spec.num_steps)
    if speedup is None and anchors is None:
        raise UserError(f"the {policy} policy needs --speedup X or --anchors N")
    if speedup is not None and not (isinstance(speedup, (int, float)) and speedup >= 1.0):
        raise UserError(f"--speedup must be at least 1, got {speedup}")
    if list(profile.modules) != list(spec.modules) or profile.num_layers != spec.num_layers:
        raise UserError("profile and model disagree on layers or modules")
    rates = sorted(set(float(a) for a in (rates or profile.rates)))
    missing = [a for a in rates if a not in profile.rates]
    if missing:
        raise UserError(f"rates {missing} were not profiled (the profile has {profile.rates})")
    return profile, rates, FlopsModel.for_config(ModelConfig.from_dict(profile.model_config))


def flops_parts(fm: FlopsModel, num_layers: int, modules) -> tuple[float, float, np.ndarray]:
    """Per batch row: once per generation (conditioning), once per step (embed, final, every
    layer's adaLN), and each module's full compute in one layer."""
    step_base = fm.embed(1) + fm.final(1) + num_layers * fm.modulation(1)
    return fm.condition(1), step_base, np.array([fm.module(n, 1, fm.num_tokens) for n in modules])


def unreachable(speedup: float, fm: FlopsModel, steps: int, num_layers: int, modules, max_age: int) -> UserError | None:
    """The error for a target above SODA's fastest plan, else None: ceil(S / (K + 1)) anchors and
    every other step served from the cache (pruning only adds compute). Needs no profile, so
    a hopeless --speedup is said before profiling."""
    generation, step, module_full = flops_parts(fm, num_layers, modules)
    n = -(-steps // (max_age + 1))
    best = (generation + steps * (step + num_layers * module_full.sum())) / \
        (generation + steps * step + n * num_layers * module_full.sum())
    if speedup <= best * (1 + 1e-9):
        return None
    return UserError(f"speedup {speedup:g}x is not reachable: at most {best:.2f}x with {n} anchors "
                     f"and cache ages up to {max_age} (profile more --intervals for more)")


def check_reach_before_profiling(speedup: float, config, steps: int) -> None:
    """`unreachable` for a profile still to be made (the profiler's default intervals): said
    before minutes of profiling, by `sample`/`export`/`generate` and `bench` alike."""
    from soda.profile import DEFAULT_INTERVALS

    error = unreachable(speedup, FlopsModel.for_config(config), steps, config.depth, config.modules,
                        max(DEFAULT_INTERVALS))
    if error:
        raise error


class Planner:
    """Holds the profile as arrays and the per-action FLOPs, and searches (N_s, beta, lam)."""

    def __init__(self, profile, rates: list[float], fm: FlopsModel):
        from soda.dp import solve, step_errors

        self.profile = profile
        self.rates = np.array(rates)
        self.fm = fm
        ec, ep = profile.ec(), profile.ep()
        self.S, self.L, self.M = ec.shape[:3]
        self.K = profile.max_contiguous_interval
        self.kidx = {k: profile.intervals.index(k) for k in range(1, self.K + 1)}
        ridx = [profile.rates.index(a) for a in rates]
        self.ec = ec  # [S, L, M, K]
        self.ep = ep[:, :, :, ridx, :]  # [S, L, M, A, K] restricted to `rates`
        self.table = solve(step_errors(ec, profile.intervals))
        finite = ec[np.isfinite(ec)]
        self.ec_scale = float(finite.mean()) if finite.size and finite.mean() > 0 else 1.0
        N = fm.num_tokens
        names = profile.modules
        self.generation_base, self.step_base, self.module_full = flops_parts(fm, self.L, names)  # module_full: [M]
        self.module_prune = np.array([[fm.module(n, 1, kept_tokens(a, N)) for a in rates] for n in names])  # [M, A]
        self.full_flops = self.generation_base + self.S * (self.step_base + self.L * self.module_full.sum())

    # --- FLOPs and errors of a plan -------------------------------------------------------
    def reuse_flops(self, num_anchors: int) -> float:
        return self.generation_base + self.S * self.step_base + num_anchors * self.L * self.module_full.sum()

    def _candidates(self, anchors: list[int]):
        """Per reused (s, l, m): E_c, E_p over rates, module index, and the key."""
        age = np.zeros(self.S, dtype=np.int64)
        last = 0
        for s in range(self.S):
            if s in anchors:
                last = s
            age[s] = s - last
        steps = [s for s in range(self.S) if age[s] > 0]
        ec = np.array([self.ec[s, :, :, self.kidx[age[s]]] for s in steps]).reshape(-1)  # [P]
        ep = np.array([self.ep[s, :, :, :, self.kidx[age[s]]] for s in steps]).reshape(-1, len(self.rates))
        keys = [(s, l, m) for s in steps for l in range(self.L) for m in range(self.M)]
        mods = np.array([k[2] for k in keys], dtype=np.int64)
        return ec, ep, mods, keys

    def _evaluate(self, cand, beta: float, lam: float):
        """(extra FLOPs, predicted error, rate index per entry or -1 for reuse)."""
        ec, ep, mods, _ = cand
        a = np.clip(lam * ec / self.ec_scale + beta, 0.0, 1.0)
        r = np.minimum(np.searchsorted(self.rates, a - 1e-12, side="left"), len(self.rates) - 1)
        ep_r = ep[np.arange(len(ec)), r]
        pruned = (a > 0) & (ep_r < ec)
        choice = np.where(pruned, r, -1)
        extra = float(self.module_prune[mods[pruned], r[pruned]].sum())
        error = float(np.where(pruned, ep_r, ec).sum())
        return extra, error, choice

    def _fill(self, anchors: list[int], budget: float, lam: float) -> Plan:
        """The largest beta (by bisection) whose pruning keeps the FLOPs within `budget`."""
        cand = self._candidates(anchors)
        base = self.reuse_flops(len(anchors))
        lo, hi = -1.0 - lam * (cand[0].max(initial=0.0) / self.ec_scale), 1.0
        extra, err, choice = self._evaluate(cand, lo, lam)
        best = (lo, extra, err, choice)
        hi_eval = self._evaluate(cand, hi, lam)
        if base + hi_eval[0] <= budget:
            best = (hi, *hi_eval)
        else:
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                ev = self._evaluate(cand, mid, lam)
                if base + ev[0] <= budget:
                    lo, best = mid, (mid, *ev)
                else:
                    hi = mid
        beta, extra, err, choice = best
        actions = {key: int(c) for key, c in zip(cand[3], choice) if c >= 0}
        return Plan(anchors, beta, lam, base + extra, err, actions)

    # --- the search -----------------------------------------------------------------------
    def plan(self, speedup: float | None, num_anchors: int | None, lam: float | None) -> Plan:
        lams = LAM_GRID if lam is None else (float(lam),)
        if num_anchors is not None:
            anchors, _ = self.table.anchors(int(num_anchors))
            if speedup is None:
                return self._fill(anchors, self.reuse_flops(len(anchors)), 0.0)  # no pruning
            budget = self.full_flops / speedup
            if self.reuse_flops(len(anchors)) > budget * (1 + 1e-9):
                raise UserError(f"{num_anchors} anchors reach at most {self.full_flops / self.reuse_flops(len(anchors)):.2f}x, "
                                f"below --speedup {speedup:g}; use fewer anchors")
            return min((self._fill(anchors, budget, lm) for lm in lams), key=lambda p: p.error)
        budget = self.full_flops / speedup
        feasible = [n for n in range(1, self.S + 1) if self.table.feasible(n) and self.reuse_flops(n) <= budget * (1 + 1e-9)]
        if not feasible:
            raise unreachable(speedup, self.fm, self.S, self.L, self.profile.modules, self.K) or \
                UserError(f"speedup {speedup:g}x: no anchor count of this profile reaches it")
        plans = [self._fill(self.table.anchors(n)[0], budget, lm) for n in feasible for lm in lams]
        close = [p for p in plans if self.full_flops / p.flops <= speedup * (1 + TOLERANCE)]
        if close:
            return min(close, key=lambda p: (p.error, -p.flops))
        return max(plans, key=lambda p: (p.flops, -p.error))  # none within 3%: the closest to the target

    def plan_joint(self, speedup: float) -> Plan:
        """The exact joint DP (`soda.dp_joint.solve_joint`) at the budget full / speedup."""
        from soda.dp_joint import solve_joint

        S, L, M, K = self.S, self.L, self.M, self.K
        cols = [self.kidx[k] for k in range(1, K + 1)]
        reuse = np.full((S, L * M, K + 1), np.nan)
        reuse[:, :, 1:] = self.ec[:, :, :, cols].reshape(S, L * M, K)
        prune = np.full((S, L * M, len(self.rates), K + 1), np.nan)
        prune[:, :, :, 1:] = self.ep[:, :, :, :, cols].reshape(S, L * M, len(self.rates), K)
        prune_cost = np.tile(self.module_prune, (L, 1))  # [L*M, A], j = l*M + m
        base = self.generation_base + S * self.step_base  # what every plan pays: conditioning, embed, final, adaLN
        budget = self.full_flops / speedup - base
        try:
            jp = solve_joint(reuse, prune, L * float(self.module_full.sum()), prune_cost, budget)
        except UserError as e:
            raise UserError(f"speedup {speedup:g}x: {e}") from None
        actions = {(s, j // M, j % M): a for (s, j), a in jp.actions.items()}
        return Plan(jp.anchors, None, None, base + jp.flops, jp.error, actions)

    def plan_anchors_only(self, speedup: float, evenly: bool = False) -> Plan:
        """No pruning: the most anchors whose speedup still reaches `speedup`, placed by the DCS
        DP or evenly (s_i = floor(i*S/N), the ablation's fixed interval)."""
        budget = self.full_flops / speedup
        counts = [n for n in range(1, self.S + 1) if self.reuse_flops(n) <= budget * (1 + 1e-9)
                  and (evenly or self.table.feasible(n))]
        if not counts:
            raise UserError(f"speedup {speedup:g}x is not reachable with whole anchors")
        n = max(counts)
        anchors = sorted({(i * self.S) // n for i in range(n)}) if evenly else self.table.anchors(n)[0]
        if max(np.diff(anchors + [self.S])) > self.K + 1:
            raise UserError(f"{n} even anchors leave cache ages beyond the profile's {self.K}")
        return self._fill(anchors, self.reuse_flops(len(anchors)), 0.0)

    def schedule(self, spec: ScheduleSpec, plan: Plan, speedup: float | None):
        from soda.policies.full import base_schedule

        steps = []
        for s in range(self.S):
            if s in plan.anchors:
                steps.append([[FULL] * self.M for _ in range(self.L)])
                continue
            steps.append([[prune(float(self.rates[plan.actions[(s, l, m)]])) if (s, l, m) in plan.actions else REUSE
                           for m in range(self.M)] for l in range(self.L)])
        params = {
            "target_speedup": speedup,
            "num_anchors": len(plan.anchors),
            "anchors": plan.anchors,
            "beta": None if plan.beta is None else round(float(plan.beta), 6),
            "lam": None if plan.lam is None else float(plan.lam),
            "lam_scale": self.ec_scale,
            "rates": [float(a) for a in self.rates],
            "predicted_error": round(float(plan.error), 6),
            "profile": {"weights": self.profile.weights, "samples": self.profile.samples,
                        "intervals": self.profile.intervals},
        }
        sched = base_schedule(spec, "soda", steps, SELECTOR, params)
        flops = schedule_flops(sched, self.fm, 1)
        assert math.isclose(flops, plan.flops, rel_tol=1e-9), (flops, plan.flops)
        sched.params["flops_speedup"] = round(float(self.full_flops / flops), 4)
        return sched
