"""Our own transcription of the official ToCa / DuCa DiT control flow, for tests only.

Shenyi-Z/ToCa DiT-ToCa/cache_functions (force_scheduler, global_force_fresh, force_init,
fresh_ratio_scheduler, cache_cutfresh, score_evaluate, scores.attn_score) and DuCa-DiT's
cal_type, rewritten with the same torch arithmetic (float32 tensors, torch.round, int()) and the
same loop structure: the step loop counts down, the decision is taken inside the layer loop and
force_init updates the interval right after a full layer. The tensors of the model are replaced
by what the control flow needs: token counts, attention maps and the cache_index counters.
Written independently of soda/policies so the tests compare two transcriptions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_LAYERS_OFFICIAL = 28  # cache_init and fresh_ratio_scheduler hard-code 28 layers (l / 27)


def force_scheduler(cache_dic: dict, current: dict) -> None:
    linear_step_weight = 0.0 if cache_dic["fresh_ratio"] == 0 else 0.4
    step_factor = torch.tensor(1 + linear_step_weight - 2 * linear_step_weight * current["step"] / current["num_steps"])
    threshold = torch.round(cache_dic["fresh_threshold"] / step_factor)
    if current["step"] in range(int(current["num_steps"] * 0.2), int(current["num_steps"] * 0.4)) and cache_dic["fresh_ratio"] != 0:
        threshold = 2
    cache_dic["cal_threshold"] = threshold


def global_force_fresh(cache_dic: dict, current: dict) -> bool:
    first_step = current["step"] == current["num_steps"] - 1
    fresh_threshold = cache_dic["fresh_threshold"] if first_step else cache_dic["cal_threshold"]
    return bool(first_step or (current["step"] % fresh_threshold == 0))


def cal_type_duca(cache_dic: dict, current: dict) -> None:
    first_step = current["step"] == current["num_steps"] - 1
    fresh_interval = cache_dic["fresh_threshold"] if first_step else cache_dic["cal_threshold"]
    if (current["step"] % fresh_interval == 0) or first_step:
        current["type"] = "full"
    elif (current["step"] % fresh_interval) % 2 == 1:
        current["type"] = "ToCa"
    else:
        current["type"] = "aggressive"


def fresh_ratio_scheduler(cache_dic: dict, current: dict) -> float:
    """'ToCa-ddim50' / 'ToCa-ddpm250' (weights passed in cache_dic)."""
    step, num_steps = current["step"], current["num_steps"]
    step_factor = 1 + cache_dic["step_weight"] - 2 * cache_dic["step_weight"] * step / num_steps
    layer_factor = 1 + cache_dic["layer_weight"] - 2 * cache_dic["layer_weight"] * current["layer"] / 27
    module_weight, module_time_weight = 2.5, 0.6
    module_factor = (1 - (1 - module_time_weight) * module_weight) if current["module"] == "attn" else (1 + module_time_weight * module_weight)
    return cache_dic["fresh_ratio"] * layer_factor * step_factor * module_factor


def local_selection_with_bonus(score: torch.Tensor, bonus_ratio: float, grid_size: int = 2) -> torch.Tensor:
    batch_size, num_tokens = score.shape
    image_size = int(num_tokens**0.5)
    block_size = grid_size * grid_size
    r = score.view(batch_size, image_size // grid_size, grid_size, image_size // grid_size, grid_size)
    r = r.permute(0, 1, 3, 2, 4).contiguous().view(batch_size, -1, block_size)
    max_scores, max_indices = r.max(dim=-1, keepdim=True)
    mask = torch.zeros_like(r)
    mask.scatter_(-1, max_indices, 1)
    r = r + mask * max_scores * bonus_ratio
    r = r.view(batch_size, image_size // grid_size, image_size // grid_size, grid_size, grid_size)
    return r.permute(0, 1, 3, 2, 4).contiguous().view(batch_size, num_tokens)


def cache_cutfresh(cache_dic: dict, current: dict, num_tokens: int, bonus_ratio: float):
    """Token count and fresh indices (when an attention map is known), updating cache_index."""
    fresh_ratio = torch.clamp(torch.tensor(fresh_ratio_scheduler(cache_dic, current)), 0.0, 1.0)
    topk = int(fresh_ratio * num_tokens)
    layer, module = current["layer"], current["module"]
    attn_map = cache_dic["attn_map"].get(layer)
    if attn_map is None:
        return topk, None
    score = F.normalize(attn_map.sum(dim=1), dim=1, p=2)  # attn_score
    score = score + cache_dic["soft_fresh_weight"] * cache_dic["cache_index"][layer][module].float() / cache_dic["fresh_threshold"]
    score = local_selection_with_bonus(score, bonus_ratio, 2)
    fresh_indices = score.argsort(dim=-1, descending=True)[:, :topk]
    cache_dic["cache_index"][layer][module] += 1
    cache_dic["cache_index"][layer][module].scatter_(dim=1, index=fresh_indices, src=torch.zeros_like(fresh_indices, dtype=torch.int))
    return topk, fresh_indices


def run(num_steps: int, N: int, R: float, step_weight: float, layer_weight: float, num_tokens: int,
        num_layers: int = NUM_LAYERS_OFFICIAL, dual: bool = False, attn_maps=None, bonus_ratio: float = 0.6):
    """Walk the official loop. Returns {(step, layer): ("full",) | ("ToCa", topk, indices) | ("aggressive",)}.

    attn_maps(step, layer) -> [B, N, N] head-averaged map produced by a full attention, or None.
    """
    cache_dic = {"fresh_ratio": R, "fresh_threshold": N, "step_weight": step_weight, "layer_weight": layer_weight,
                 "soft_fresh_weight": 0.25, "attn_map": {}, "cache_index": {l: {} for l in range(num_layers)}}
    current = {"num_steps": num_steps}
    out = {}
    for i in list(range(num_steps))[::-1]:
        current["step"] = i
        for layer in range(num_layers):
            current["layer"] = layer
            if dual:
                cal_type_duca(cache_dic, current)
                kind = current["type"]
            else:
                kind = "full" if global_force_fresh(cache_dic, current) else "ToCa"
            if kind == "full":
                B = 1
                if attn_maps is not None:
                    cache_dic["attn_map"][layer] = attn_maps(i, layer)
                    B = cache_dic["attn_map"][layer].shape[0]
                for module in ("attn", "mlp"):
                    current["module"] = module
                    cache_dic["cache_index"][layer][module] = torch.zeros(B, num_tokens, dtype=torch.int)  # force_init
                    force_scheduler(cache_dic, current)
                out[(i, layer)] = ("full",)
            elif kind == "ToCa":
                current["module"] = "mlp"
                topk, idx = cache_cutfresh(cache_dic, current, num_tokens, bonus_ratio)
                out[(i, layer)] = ("ToCa", topk, idx)
            else:
                out[(i, layer)] = ("aggressive",)
    return out
