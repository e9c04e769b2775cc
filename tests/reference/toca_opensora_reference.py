"""Our own transcription of the official ToCa / DuCa Open-Sora 1.2 control flow, for tests only.

Shenyi-Z/ToCa `Open-Sora/opensora/models/cache_functions` (force_scheduler, global_force_fresh,
fresh_ratio_scheduler 'ToCa', cache_cutfresh's token count) with the STDiT3Block branches of
`Open-Sora/opensora/models/stdit/stdit3.py`, and Shenyi-Z/DuCa `DuCa-Open-Sora` cal_type
(lists_ToCa_CN) with its block branches. Settings from both `scripts/inference.py`: fresh_ratio
0.1, fresh_threshold 3, force_fresh 'global', ratio_scheduler 'ToCa'. The step loop counts up
(`current['step'] = i`); blocks run spatial l, temporal l (flag 0 / -1). What a block does per
module is returned as "full" / "reuse" / ("fresh", k) / "skip" (DuCa's aggressive: nothing added).
Written independently of soda/policies.
"""
from __future__ import annotations

import torch


def force_scheduler(cache_dic, current):
    cache_dic["cal_threshold"] = {"spat-attn": 3, "temp-attn": 3, "cross-attn": 6, "mlp": 3}


def _thresholds(cache_dic, current):
    if current["step"] != 0:
        return dict(cache_dic["cal_threshold"])
    return {k: cache_dic["fresh_threshold"] for k in ("spat-attn", "temp-attn", "cross-attn", "mlp")}


def global_force_fresh(cache_dic, current):
    first_3steps = current["step"] <= 2
    th = _thresholds(cache_dic, current)
    out = {}
    attn_key = "temp-attn" if current["flag"] == -1 else "spat-attn"
    out["attn"] = first_3steps or (current["step"] % th[attn_key] == 0)
    out["cross-attn"] = first_3steps or (current["step"] % th["cross-attn"] == 0)
    out["mlp"] = first_3steps or (current["step"] % th["mlp"] == 0)
    return out


def fresh_ratio_scheduler(cache_dic, current):
    fresh_ratio = cache_dic["fresh_ratio"]
    step, num_steps = current["step"], current["num_steps"]
    step_weight = 0.0
    step_factor = 1 + step_weight - 2 * step_weight * step / num_steps
    layer_weight = 0.0
    layer_factor = 1 + layer_weight - 2 * layer_weight * current["layer"] / 27
    module_weight = 1.5
    module_time_weight = 0.33
    module_factor = (1 - (1 - module_time_weight) * module_weight) if current["module"] == "cross-attn" else (
        1 + module_time_weight * module_weight)
    type_weight = 0.0
    type_factor = 1 + type_weight if current["flag"] == -1 else 1 - type_weight
    return fresh_ratio * layer_factor * step_factor * module_factor * type_factor


def cutfresh_count(cache_dic, current, num_tokens):
    fresh_ratio = fresh_ratio_scheduler(cache_dic, current)
    fresh_ratio = torch.clamp(torch.tensor(fresh_ratio), min=0, max=1)
    return int(fresh_ratio * num_tokens)


def toca_block(cache_dic, current, num_tokens):
    force = global_force_fresh(cache_dic, current)
    out = {}
    current["module"] = "attn"
    out["attn"] = "full" if force["attn"] else "reuse"
    current["module"] = "cross-attn"
    out["cross-attn"] = "full" if force["cross-attn"] else ("fresh", cutfresh_count(cache_dic, current, num_tokens))
    current["module"] = "mlp"
    out["mlp"] = "full" if force["mlp"] else ("fresh", cutfresh_count(cache_dic, current, num_tokens))
    return out


LISTS_TOCA_CN = {"temp-attn": ["full", "ToCa", "aggressive", "full", "ToCa", "aggressive"],
                 "spat-attn": ["full", "ToCa", "aggressive", "full", "ToCa", "aggressive"],
                 "cross-attn": ["full", "ToCa", "aggressive", "ToCa", "ToCa", "aggressive"],
                 "mlp": ["full", "ToCa", "aggressive", "full", "ToCa", "aggressive"]}


def cal_type(cache_dic, current):
    first_3steps = current["step"] <= 2
    th = _thresholds(cache_dic, current)
    lists, types, step = LISTS_TOCA_CN, {}, current["step"]
    if current["flag"] == -1:
        types["attn"] = lists["temp-attn"][0] if (first_3steps or step % th["temp-attn"] == 0) else \
            lists["temp-attn"][step % th["temp-attn"]]
    else:
        types["attn"] = "full" if (first_3steps or step % th["spat-attn"] == 0) else \
            lists["spat-attn"][step % th["spat-attn"]]
    types["cross-attn"] = "full" if (first_3steps or step % th["cross-attn"] == 0) else \
        lists["cross-attn"][step % th["cross-attn"]]
    types["mlp"] = "full" if (first_3steps or step % th["mlp"] == 0) else lists["mlp"][step % th["mlp"]]
    types["all_aggressive"] = types["attn"] == "aggressive" and types["cross-attn"] == "aggressive" and \
        types["mlp"] == "aggressive"
    return types


def duca_block(cache_dic, current, num_tokens):
    types = cal_type(cache_dic, current)
    out = {}
    for module in ("attn", "cross-attn", "mlp"):
        current["module"] = module
        kind = types[module]
        if kind == "full":
            out[module] = "full"
        elif kind == "aggressive":
            out[module] = "skip"
        elif module == "mlp":  # 'ToCa': MLP refreshed token-wise, attn and cross-attn reused whole
            out[module] = ("fresh", cutfresh_count(cache_dic, current, num_tokens))
        else:
            out[module] = "reuse"
    out["all_aggressive"] = types["all_aggressive"]
    return out


def run(policy: str, num_steps: int, depth: int, num_tokens: int):
    """[step][block in execution order] -> per-module decision; blocks interleave spatial/temporal."""
    cache_dic = {"fresh_ratio": 0.1, "fresh_threshold": 3, "force_fresh": "global",
                 "fresh_ratio_schedule": "ToCa", "soft_fresh_weight": 0.25}
    current = {"num_steps": num_steps}
    block = toca_block if policy == "toca" else duca_block
    rows = []
    for i in range(num_steps):
        current["step"] = i
        row = []
        for layer in range(depth):
            current["layer"] = layer
            for flag in (0, -1):
                current["flag"] = flag
                force_scheduler(cache_dic, current)  # force_init after a full module; constant here
                row.append(block(cache_dic, current, num_tokens))
        rows.append(row)
    return rows
