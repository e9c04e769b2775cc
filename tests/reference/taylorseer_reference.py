"""TaylorSeer-DiT's schedule and forecast, transcribed for parity tests (never imports the project).

Source: Shenyi-Z/TaylorSeer @ 288776d, TaylorSeer-DiT/taylor_utils/__init__.py
(`derivative_approximation`, `taylor_formula`, `taylor_cache_init`) and
TaylorSeer-DiT/cache_functions/{cache_init,cal_type}.py. Kept as close to the original as a
standalone file allows: dicts of torch tensors, `step` counting down from num_steps - 1.
Changes: `cache_init` takes the number of layers (the original hard-codes 28) and starts
`activated_steps` at num_steps - 1 (the original hard-codes 49, i.e. 50 steps).
"""
import math
from typing import Dict

import torch


def cache_init(interval, max_order, num_steps, num_layers):
    cache_dic = {}
    cache = {}
    cache[-1] = {}
    for j in range(num_layers):
        cache[-1][j] = {}
    cache_dic['cache'] = cache
    cache_dic['interval'] = interval
    cache_dic['max_order'] = max_order
    cache_dic['first_enhance'] = 2
    cache_dic['cache_counter'] = 0
    current = {}
    current['num_steps'] = num_steps
    current['activated_steps'] = [num_steps - 1]
    return cache_dic, current


def cal_type(cache_dic, current):
    first_steps = (current['step'] > (current['num_steps'] - cache_dic['first_enhance'] - 1))
    fresh_interval = cache_dic['interval']
    if (first_steps) or (cache_dic['cache_counter'] == fresh_interval - 1):
        current['type'] = 'full'
        cache_dic['cache_counter'] = 0
        current['activated_steps'].append(current['step'])
    else:
        cache_dic['cache_counter'] += 1
        current['type'] = 'Taylor'


def derivative_approximation(cache_dic: Dict, current: Dict, feature: torch.Tensor):
    difference_distance = current['activated_steps'][-1] - current['activated_steps'][-2]
    updated_taylor_factors = {}
    updated_taylor_factors[0] = feature
    for i in range(cache_dic['max_order']):
        if (cache_dic['cache'][-1][current['layer']][current['module']].get(i, None) is not None) and \
                (current['step'] < (current['num_steps'] - cache_dic['first_enhance'] + 1)):
            updated_taylor_factors[i + 1] = (updated_taylor_factors[i] - cache_dic['cache'][-1][current['layer']][current['module']][i]) / difference_distance
        else:
            break
    cache_dic['cache'][-1][current['layer']][current['module']] = updated_taylor_factors


def taylor_formula(cache_dic: Dict, current: Dict) -> torch.Tensor:
    x = current['step'] - current['activated_steps'][-1]
    output = 0
    for i in range(len(cache_dic['cache'][-1][current['layer']][current['module']])):
        output += (1 / math.factorial(i)) * cache_dic['cache'][-1][current['layer']][current['module']][i] * (x ** i)
    return output


def taylor_cache_init(cache_dic: Dict, current: Dict):
    if current['step'] == (current['num_steps'] - 1):
        cache_dic['cache'][-1][current['layer']][current['module']] = {}


def run(outputs, num_steps, num_layers, modules, interval, max_order):
    """What DiTBlock.forward serves per (step, layer, module) over one sampling run, in the
    official loop order; `outputs(step, layer, module)` gives the freshly computed tensor."""
    cache_dic, current = cache_init(interval, max_order, num_steps, num_layers)
    served = {}
    for step in range(num_steps - 1, -1, -1):
        current['step'] = step
        cal_type(cache_dic, current)
        for layer in range(num_layers):
            current['layer'] = layer
            for module in modules:
                current['module'] = module
                if current['type'] == 'full':
                    taylor_cache_init(cache_dic, current)
                    feature = outputs(step, layer, module)
                    derivative_approximation(cache_dic, current, feature)
                    served[(step, layer, module)] = feature
                else:
                    served[(step, layer, module)] = taylor_formula(cache_dic, current)
    return served
