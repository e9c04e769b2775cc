"""From user flags to a Schedule: a file, or a policy (profiling first for SODA when needed).

Policies: `full`; the baselines `fora`, `toca`, `duca` (their published settings, or tuned
to `--speedup`); `soda` (from `--profile FILE`, or from a profile measured on the spot with
PROFILE_SAMPLES calibration generations, at `--speedup` or DEFAULT_SPEEDUP).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from soda.errors import UserError
from soda.policies import ScheduleSpec, check_request, make_schedule
from soda.schedule import Schedule

DEFAULT_SPEEDUP = 2.5  # the paper's DDIM-50 operating point (2.49x)
PROFILE_SAMPLES = 32


def spec_for(model, sampler) -> ScheduleSpec:
    return ScheduleSpec.for_model(model.config, sampler.kind, sampler.steps, tuple(model.blocks[0].modules_order))


def load_or_profile(model, weights: str, sampler, profile_file=None, echo: Callable = print,
                    samples: int = PROFILE_SAMPLES, seed: int = 0, progress=None):
    """A profile that fits this model and sampler: the file given, or one measured now."""
    from soda.profile import Profile, profile

    config = model.config
    if isinstance(profile_file, Profile):
        prof = profile_file
    elif profile_file:
        prof = Profile.load(profile_file)
    else:
        echo(f"no --profile given: profiling {samples} generations first "
             f"({sampler.kind}-{sampler.steps}; save one with `cli.py profile` to skip this)")
        prof = profile(model, sampler, samples, seed, progress=progress, weights=weights)
        echo(f"profiled in {prof.cost['seconds']:.1f} s")
        return prof
    prof.check_fits(config.name, config.hash(), sampler.kind, sampler.steps)
    if prof.weights != weights:
        echo(f"note: profile was measured with weights {prof.weights[:16]}, these are {weights[:16]}")
    return prof


def resolve_schedule(model, weights: str, sampler, policy: str, schedule_file=None, speedup=None,
                     profile_file=None, echo: Callable = print, anchors: int | None = None) -> Schedule:
    """The schedule the flags ask for, checked against this model and sampler.

    `profile_file` may be a path or an already loaded `soda.profile.Profile`.
    """
    config = model.config
    spec = spec_for(model, sampler)
    if schedule_file:
        if speedup is not None:
            raise UserError("--speedup does not apply to a --schedule file (its speedup is fixed)")
        schedule = Schedule.load(schedule_file)
        schedule.check_fits(config.name, config.hash(), sampler.kind, sampler.steps)
        return schedule
    check_request(policy, speedup)
    if speedup is not None and speedup < 1.0:  # said before SODA profiles, which takes a while
        raise UserError(f"--speedup must be at least 1, got {speedup:g}")
    if policy == "full":
        return make_schedule("full", spec)
    if policy == "soda":
        prof = load_or_profile(model, weights, sampler, profile_file, echo)
        if speedup is None and anchors is None:
            speedup = DEFAULT_SPEEDUP
            echo(f"no --speedup given: soda targets {DEFAULT_SPEEDUP}x FLOPs")
        return make_schedule("soda", spec, speedup=speedup, anchors=anchors, profile=prof)
    from soda.flops import FlopsModel

    params = {"flops": FlopsModel.for_config(config)}
    if speedup is not None:
        params["speedup"] = speedup
    return make_schedule(policy, spec, **params)


def schedule_path_png(path: str | Path) -> Path:
    """The picture that goes next to a JSON file: same name, .png."""
    return Path(path).with_suffix(".png")
