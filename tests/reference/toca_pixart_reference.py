"""Our transcription of the official ToCa / DuCa PixArt-alpha control flow, for tests only.

Shenyi-Z/ToCa PixArt-alpha-ToCa/diffusion/model/cache_functions (force_scheduler,
global_force_fresh, force_init, fresh_ratio_scheduler 'ToCa', cache_cutfresh's token count) and
the block loop of nets/PixArt.py; Shenyi-Z/DuCa DuCa-PixArt-alpha's cal_type and force_scheduler
(linear_step_weight 0). Same torch arithmetic (float32 tensors, torch.round, int()) and loop
structure: `step` counts UP (dpm_solver.py sets current['step'] = 0, 1, ...), the decision is
taken inside the layer loop and force_init updates the interval after a full layer. Written
independently of soda/policies, so the test compares two transcriptions.
"""
from __future__ import annotations

import torch


def force_scheduler(cache_dic: dict, current: dict, linear_step_weight: float) -> None:
    if cache_dic["fresh_ratio"] == 0:
        linear_step_weight = 0.0
    step_factor = torch.tensor(1 - linear_step_weight + 2 * linear_step_weight * current["step"] / current["num_steps"])
    threshold = torch.round(cache_dic["fresh_threshold"] / step_factor)
    cache_dic["cal_threshold"] = threshold


def fresh_ratio_scheduler(cache_dic: dict, current: dict, num_layers: int) -> float:
    """'ToCa' ratio schedule (the / 27 of the 28-layer code written as / (num_layers - 1))."""
    fresh_ratio = cache_dic["fresh_ratio"]
    step, num_steps = current["step"], current["num_steps"]
    step_weight = -0.9
    step_factor = 1 - step_weight + 2 * step_weight * step / num_steps
    layer_weight = 0.6
    layer_factor = 1 + layer_weight - 2 * layer_weight * current["layer"] / (num_layers - 1)
    module_weight = 1.0
    module_time_weight = 0.6
    module_factor = (1 - (1 - module_time_weight) * module_weight) if current["module"] == "cross-attn" \
        else (1 + module_time_weight * module_weight)
    return fresh_ratio * layer_factor * step_factor * module_factor


def fresh_tokens(cache_dic: dict, current: dict, num_tokens: int, num_layers: int) -> int:
    """cache_cutfresh: topk = int(clamp(tensor(ratio), 0, 1) * N)."""
    fresh_ratio = fresh_ratio_scheduler(cache_dic, current, num_layers)
    fresh_ratio = torch.clamp(torch.tensor(fresh_ratio), min=0, max=1)
    return int(fresh_ratio * num_tokens)


def toca_kind(cache_dic: dict, current: dict) -> str:
    """global_force_fresh with force_fresh 'global'."""
    first_step = current["step"] == 0
    fresh_threshold = cache_dic["fresh_threshold"] if first_step else cache_dic["cal_threshold"]
    return "full" if (first_step or (current["step"] % fresh_threshold == 0)) else "partial"


def duca_kind(cache_dic: dict, current: dict) -> str:
    """cal_type: full / 'ToCa' (partial) / aggressive."""
    first_step = current["step"] == 0
    fresh_interval = cache_dic["fresh_threshold"] if first_step else cache_dic["cal_threshold"]
    if (current["step"] % fresh_interval == 0) or first_step:
        return "full"
    if (current["step"] % fresh_interval) % 2 == 1:
        return "partial"
    return "aggressive"


def run(num_steps: int, num_layers: int, num_tokens: int, N: int, R: float, dual: bool) -> list[list[tuple]]:
    """Per step (step = 0 .. S-1), per layer: (kind, cross-attn tokens, mlp tokens); tokens are
    None on full and aggressive layers. ToCa: force_scheduler weight 0.2; DuCa: 0."""
    cache_dic = {"fresh_ratio": R, "fresh_threshold": N}
    weight = 0.0 if dual else 0.2
    rows = []
    for step in range(num_steps):
        current = {"step": step, "num_steps": num_steps}
        row = []
        for layer in range(num_layers):
            current["layer"] = layer
            kind = (duca_kind if dual else toca_kind)(cache_dic, current)
            if kind == "full":
                for module in ("attn", "cross-attn", "mlp"):  # force_init after each module
                    current["module"] = module
                    force_scheduler(cache_dic, current, weight)
                row.append(("full", None, None))
            elif kind == "partial":
                counts = []
                for module in ("cross-attn", "mlp"):  # self-attention reused whole
                    current["module"] = module
                    counts.append(fresh_tokens(cache_dic, current, num_tokens, num_layers))
                row.append(("partial", *counts))
            else:
                row.append(("aggressive", None, None))
        rows.append(row)
    return rows
