"""From user flags to a Schedule: a file, or a policy (profiling first for SODA when needed).

Policies: `full`; the baselines `fora`, `toca`, `duca`, `taylorseer` (their published settings,
or tuned to `--speedup`); `soda` and `soda-forecast` (from `--profile FILE`, or from a profile
measured on the spot with PROFILE_SAMPLES calibration generations, at `--speedup` or DEFAULT_SPEEDUP).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from soda.errors import UserError
from soda.policies import PROFILED, ScheduleSpec, baseline_schedule, check_request, make_schedule
from soda.schedule import Schedule

DEFAULT_SPEEDUP = 2.5  # the paper's DDIM-50 operating point (2.49x)
PROFILE_SAMPLES = 32
PROFILE_BATCH = 64  # generations per profiling batch (CFG doubles the rows)


def spec_for(model, sampler) -> ScheduleSpec:
    return ScheduleSpec.for_model(model.config, sampler.kind, sampler.steps)


def load_or_profile(model, weights: str, sampler, profile_file=None, echo: Callable = print,
                    samples: int = PROFILE_SAMPLES, seed: int = 0, progress: Callable | None = None,
                    hint: str = "; save one with `cli.py profile` and pass --profile to skip this",
                    conditioning=None, orders: tuple[int, ...] = ()):
    """A profile that fits this model and sampler: the file given, or one measured now (on
    `conditioning`, the calibration captions of a text-conditioned model).

    `orders`: Taylor forecast orders to measure when profiling now; only soda-forecast needs
    them, and they triple the profiling time, so the default measures none.

    `progress(desc, total)` makes a progress bar (tqdm-like: update(), close()) for the
    profiling run, which takes minutes on real models.
    """
    from soda.profile import Profile, profile

    config = model.config
    if isinstance(profile_file, Profile):
        prof = profile_file
    elif profile_file:
        prof = Profile.load(profile_file)
    else:
        echo(f"profiling {samples} generations first ({sampler.kind}-{sampler.steps}){hint}")
        total = sampler.steps * -(-samples // PROFILE_BATCH)
        bar = progress(f"profile {samples} generations", total) if progress else None
        try:
            prof = profile(model, sampler, samples, seed, progress=bar and (lambda s: bar.update()), weights=weights,
                           batch_size=PROFILE_BATCH, conditioning=conditioning, orders=orders)
        finally:
            if bar is not None:
                bar.close()
        echo(f"profiled in {prof.cost['seconds']:.1f} s")
        return prof
    prof.check_fits(config.name, config.hash(), sampler.kind, sampler.steps)
    if prof.weights != weights:
        echo(f"note: profile was measured with weights {prof.weights[:16]}, these are {weights[:16]}")
    return prof


def resolve_schedule(model, weights: str, sampler, policy: str, schedule_file=None, speedup=None,
                     profile_file=None, echo: Callable = print, anchors: int | None = None,
                     toca_official_loop: bool = False, progress=None) -> Schedule:
    """The schedule the flags ask for, checked against this model and sampler.

    `profile_file` may be a path or an already loaded `soda.profile.Profile`.
    """
    config = model.config
    spec = spec_for(model, sampler)
    if schedule_file:
        if toca_official_loop:
            raise UserError("--toca-official-loop builds a ToCa schedule; it does not apply to a --schedule file")
        if speedup is not None:
            raise UserError("--speedup does not apply to a --schedule file (its speedup is fixed)")
        schedule = Schedule.load(schedule_file)
        schedule.check_fits(config.name, config.hash(), sampler.kind, sampler.steps)
        return schedule
    check_request(policy, speedup)
    if speedup is not None and speedup < 1.0:  # said before SODA profiles, which takes a while
        raise UserError(f"--speedup must be at least 1, got {speedup:g}")
    if policy in PROFILED:
        if toca_official_loop:
            raise UserError(f"--toca-official-loop applies to --policy toca, not {policy}")
        if policy == "soda" and speedup is not None and not profile_file:
            from soda.policies.soda import check_reach_before_profiling

            check_reach_before_profiling(speedup, config, sampler.steps)
        prof = load_or_profile(model, weights, sampler, profile_file, echo, progress=progress,
                               orders=forecast_orders([policy]))
        if speedup is None and anchors is None:
            speedup = DEFAULT_SPEEDUP
            echo(f"no --speedup given: {policy} targets {DEFAULT_SPEEDUP}x FLOPs")
        return make_schedule(policy, spec, speedup=speedup, anchors=anchors, profile=prof)
    return baseline_schedule(policy, spec, config, speedup, toca_official_loop)


def forecast_orders(policies) -> tuple[int, ...]:
    """The forecast orders a profile measured now must hold for these policies."""
    from soda.profile import DEFAULT_ORDERS

    return DEFAULT_ORDERS if "soda-forecast" in policies else ()


def schedule_path_png(path: str | Path) -> Path:
    """The picture that goes next to a JSON file: same name, .png."""
    return Path(path).with_suffix(".png")
