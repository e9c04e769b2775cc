"""Schedule generators, one file per policy. numpy only: the runtime builds baselines too.

`make_schedule(policy, spec, **params)` is the single entry point; `spec` says which model
and sampler the schedule is for.
"""
from __future__ import annotations

from dataclasses import dataclass

from soda.errors import UserError

POLICIES = ("full", "fora", "toca", "duca", "taylorseer", "soda", "soda-forecast")
PROFILED = ("soda", "soda-forecast")  # need a sensitivity profile measured with the torch model


@dataclass(frozen=True)
class ScheduleSpec:
    """What a schedule is made for: model identity, layers, modules, tokens, sampler, steps."""

    model: str
    model_hash: str
    num_layers: int
    modules: tuple[str, ...]
    num_tokens: int
    sampler: str
    num_steps: int

    @classmethod
    def for_model(cls, config, sampler: str, num_steps: int, modules: tuple[str, ...] | None = None) -> "ScheduleSpec":
        """`modules` default: the ones the config's architecture declares."""
        modules = config.modules if modules is None else modules
        return cls(config.name, config.hash(), config.depth, tuple(modules), config.num_tokens, sampler, num_steps)


def check_request(policy: str, speedup: float | None = None) -> None:
    """The checks every way of asking for a policy shares (CLI flags, the runtime, the API);
    each policy checks the range of its own parameters, speedup included."""
    if policy not in POLICIES:
        raise UserError(f"unknown policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    if speedup is not None and policy == "full":
        raise UserError(f"--speedup does not apply to --policy full (choose one of {', '.join(POLICIES[1:])})")


def baseline_schedule(policy: str, spec: ScheduleSpec, config, speedup: float | None = None,
                      toca_official_loop: bool = False):
    """full, FORA, ToCa, DuCa or TaylorSeer for `spec`: the published setting, or tuned to `speedup` x FLOPs
    on `config`'s FLOPs model. The one builder `sample`, `export`, `bench` and `run` share, so the
    reference and the runtime always execute the same baseline schedule.

    `toca_official_loop`: ToCa's literal official layer loop (docs/baselines.md, "Deviations").
    """
    from soda.flops import FlopsModel

    check_request(policy, speedup)
    if policy in PROFILED:
        raise UserError(f"{policy} needs a sensitivity profile (soda.pipeline.resolve_schedule)")
    if toca_official_loop and policy != "toca":
        raise UserError(f"--toca-official-loop applies to --policy toca, not {policy}")
    if toca_official_loop and speedup is not None:
        raise UserError("--toca-official-loop reproduces the published ToCa setting only; drop --speedup")
    if policy == "full":
        return make_schedule("full", spec)
    params = {"flops": FlopsModel.for_config(config)}
    if speedup is not None:
        params["speedup"] = speedup
    if toca_official_loop:
        params["layer_quirk"] = True
    return make_schedule(policy, spec, **params)


def make_schedule(policy: str, spec: ScheduleSpec, **params):
    check_request(policy, params.get("speedup"))
    if policy == "full":
        from soda.policies.full import full_schedule

        return full_schedule(spec)
    import importlib

    try:
        name = f"soda.policies.{policy.replace('-', '_')}"
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise UserError(f"policy {policy!r} is not installed in this checkout") from None
        raise
    return mod.make(spec, **params)
