"""DuCa (Shenyi-Z/DuCa, DuCa-DiT): ToCa's interval schedule with alternating non-full steps.

`cal_type` (step counts down): full when `step == S-1` or `step % I == 0` (I from ToCa's
`force_scheduler`); otherwise an odd `step % I` is a conservative step (ToCa's partial step:
attention reused, MLP refreshed for a token fraction) and an even one is aggressive: every block
is skipped, the previous step's last-block output goes straight to the final layer ("skip").
The rate schedule is DuCa's only one ('ToCa': wt = 2.0, wl = -0.2, for every sampler); the
spatial bonus is 0.8. Published DiT setting (README): DDIM-50, N = 3, R = 0.05 -> 20 full,
22 conservative, 8 aggressive steps. For DDPM we use DuCa's argparse defaults N = 4, R = 0.07.

Token choice: the official DiT command runs `--cache-type attention` ("toca-attention" with
bonus 0.8, the default here); "duca-random" is the FlashAttention-compatible choice of the paper.
"""
from __future__ import annotations

from soda.errors import UserError
from soda.policies import ScheduleSpec
from soda.policies import toca
from soda.schedule import Schedule

PUBLISHED = {"ddim": {"N": 3, "R": 0.05}, "ddpm": {"N": 4, "R": 0.07},
             # DuCa-PixArt-alpha: fixed interval (force_scheduler's weight 0), PixArt-ToCa's rates
             # and cross-attention-entropy tokens; the paper's fresh ratio 0.75.
             "dpm-solver": {"N": 3, "R": 0.75, "code": "pixart"}}
STEP_WEIGHT, LAYER_WEIGHT = 2.0, -0.2  # DuCa's fresh_ratio_scheduler 'ToCa'
BONUS_RATIO = 0.8
SELECTORS = ("toca-attention", "duca-random", "toca-cross-entropy")


def make(spec: ScheduleSpec, speedup: float | None = None, flops=None, N: int | None = None,
         R: float | None = None, selector: str = "toca-attention", seed: int = 0,
         step_weight: float | None = None, layer_weight: float | None = None) -> Schedule:
    from soda.policies import scaling

    if spec.sampler == "rflow":  # Open-Sora's DuCa: its own per-module control flow
        from soda.policies import toca_video

        return toca_video.make("duca", spec, speedup, flops, N, R, seed, step_weight, layer_weight,
                               selector if selector == "duca-random" else None)
    if spec.sampler not in PUBLISHED:
        raise UserError(f"DuCa has no published setting for sampler {spec.sampler!r}")
    if selector not in SELECTORS:
        raise UserError(f"DuCa token selector must be one of {', '.join(SELECTORS)}, got {selector!r}")
    p = dict(PUBLISHED[spec.sampler])
    code = p.get("code", "dit")
    # PixArt: ToCa-PixArt's rate weights (unless given), a constant interval N.
    pix = toca.PUBLISHED["dpm-solver"]
    wt, wl, iw = (pix["step_weight"], pix["layer_weight"], 0.0) if code == "pixart" else (STEP_WEIGHT, LAYER_WEIGHT, None)
    wt = wt if step_weight is None else step_weight
    wl = wl if layer_weight is None else layer_weight
    if code == "pixart" and selector == "toca-attention":
        selector = "toca-cross-entropy"

    def build(n_: int, r_: float) -> Schedule:
        steps = toca.build_steps(spec, n_, r_, wt, wl, dual=True, code=code, interval_weight=iw)
        skip_steps = [s for s, step in enumerate(steps) if step == "skip"]
        sel, name = toca.selector_for(code, n_, BONUS_RATIO, skip_steps)
        if selector == "duca-random":
            sel["seed"] = seed
            sel["bonus_ratio"] = BONUS_RATIO
            sel.pop("grid", None)
            name = selector
        return toca.to_schedule(spec, "duca", steps, n_, r_, wt, wl, sel, name, code, iw)

    if speedup is None:
        return scaling.record(build(N if N is not None else p["N"], R if R is not None else p["R"]), spec, flops, None)
    if R is not None:
        raise UserError("give either a target --speedup or DuCa's R, not both (R is solved for the speedup)")
    toca._check_modules(spec, code)
    cost = lambda fm, n_, r_: toca.fast_flops(spec, fm, n_, r_, wt, wl, True, code, iw)  # noqa: E731
    if N is not None:  # a tuned setting: N (and the weights) fixed, R fills the budget
        return scaling.fixed_interval(spec, "DuCa", build, cost, flops, speedup, N)
    return scaling.search_interval_ratio("DuCa", spec, build, cost, flops, speedup, p["R"])
