"""The stitching loop: full compute equals the model's own forward; FLOPs accounting is exact."""
import numpy as np
import pytest
import torch

from soda.executor import Executor
from soda.flops import FlopsModel, schedule_flops
from soda.policies import ScheduleSpec, make_schedule
from soda.schedule import FULL, REUSE, Schedule, prune
from soda.torch_backend import TorchBackend


def _inputs(cfg, B=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    return x, np.array([999, 500, 10, 0][:B]), np.array([1, 2, 3, cfg.num_classes][:B])


def test_full_schedule_equals_forward(tiny_model, tiny_config):
    spec = ScheduleSpec.for_model(tiny_config, "ddim", 3)
    ex = Executor(TorchBackend(tiny_model), make_schedule("full", spec), FlopsModel.for_config(tiny_config))
    x, t, y = _inputs(tiny_config)
    with torch.no_grad():
        ref = tiny_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    np.testing.assert_array_equal(ex(0, x, t, y), ref)


def _mixed_schedule(cfg):
    spec = ScheduleSpec.for_model(cfg, "ddim", 4)
    L = cfg.depth
    steps = [
        [[FULL, FULL] for _ in range(L)],
        [[REUSE, prune(0.5)] for _ in range(L)],
        "skip",
        [[prune(0.25), FULL] for _ in range(L)],
    ]
    return Schedule("test", spec.model, spec.model_hash, "ddim", 4, ["attn", "mlp"], L, steps,
                    selector="feature-mean").validate()


def test_reuse_and_prune_follow_the_cache(tiny_model, tiny_config):
    sched = _mixed_schedule(tiny_config)
    fm = FlopsModel.for_config(tiny_config)
    ex = Executor(TorchBackend(tiny_model), sched, fm)
    x, t, y = _inputs(tiny_config)
    outs, caches = [], []
    for s in range(4):
        outs.append(ex(s, x + 0.1 * s, t, y))  # different inputs per step: a recompute would show
        caches.append({k: v.copy() for k, v in ex.cache.items()})
    # Step 1 reuses attention in every layer: its cache is the step-0 output, untouched, while the
    # pruned MLP's cache changed.
    for l in range(tiny_config.depth):
        np.testing.assert_array_equal(caches[1][(l, 0)], caches[0][(l, 0)])
        assert not np.array_equal(caches[1][(l, 1)], caches[0][(l, 1)])
    # Step 2 skips (caches untouched); step 3 prunes attention at 0.25: a quarter of each row's
    # tokens change in its cache, the rest stay as step 0 left them.
    changed = np.any(caches[3][(0, 0)] != caches[1][(0, 0)], axis=2)
    assert (changed.sum(axis=1) == tiny_config.num_tokens // 4).all()
    # Skip step: the final layer sees the same tokens as step 1, with the same t -> same output.
    np.testing.assert_array_equal(outs[2], outs[1])
    assert ex.flops_done == schedule_flops(sched, fm, 4)


def test_prune_recomputes_exactly_the_selected_tokens(tiny_model, tiny_config):
    """After prune@0.5 on the MLP, the tokens feature-mean picks on the stale cache (by hand: the
    half with the largest mean |D|) hold what a full MLP gives them at this step; the others
    keep their stale values exactly."""
    sched = _mixed_schedule(tiny_config)
    ex = Executor(TorchBackend(tiny_model), sched, FlopsModel.for_config(tiny_config))
    x, t, y = _inputs(tiny_config)
    ex(0, x, t, y)
    stale = ex.cache[(0, 1)].copy()
    x2 = x + 0.5
    ex(1, x2, t, y)
    fresh = ex.cache[(0, 1)]
    N = tiny_config.num_tokens
    picked = np.zeros(fresh.shape[:2], bool)  # [B, N]
    np.put_along_axis(picked, np.argsort(-np.abs(stale).mean(axis=2), axis=1, kind="stable")[:, :N // 2], True, axis=1)
    # the same step with the MLP computed on every token (attention reused alike): layer 0's
    # MLP input is the same, and the MLP acts token by token
    steps = [sched.steps[0], [[REUSE, FULL] for _ in range(tiny_config.depth)], *sched.steps[2:]]
    whole = Executor(TorchBackend(tiny_model), Schedule(**{**sched.to_dict(), "steps": steps}).validate(),
                     FlopsModel.for_config(tiny_config))
    whole(0, x, t, y)
    whole(1, x2, t, y)
    want = whole.cache[(0, 1)]
    np.testing.assert_array_equal(fresh[~picked], stale[~picked])
    np.testing.assert_allclose(fresh[picked], want[picked], rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.abs(fresh[picked] - stale[picked]).min(axis=-1).max() > 0  # every picked token did change


class PoisonAt:
    """The torch backend, but one (layer, module) returns NaN from a given step on."""

    def __init__(self, backend, step, layer, module):
        self.backend, self.where, self.step = backend, (layer, module), step
        self.specs, self.modules, self.num_layers = backend.specs, backend.modules, backend.num_layers
        self.current = 0

    def prepare(self, cond):
        return self.backend.prepare(cond)

    def embed(self, x, t, context):
        return self.backend.embed(x, t, context)

    def modulation(self, layer, step):
        return self.backend.modulation(layer, step)

    def module(self, layer, name, tokens, *args, context=None):
        D, received = self.backend.module(layer, name, tokens, *args, context=context)
        if (layer, name) == self.where and self.current >= self.step:
            D = D.copy()
            D[0, 0, 0] = np.nan
        return D, received

    def final(self, tokens, step):
        return self.backend.final(tokens, step)


def test_non_finite_output_says_at_which_step_and_module(tiny_model, tiny_config):
    import pytest

    from soda.errors import NonFiniteError

    spec = ScheduleSpec.for_model(tiny_config, "ddim", 3)
    backend = PoisonAt(TorchBackend(tiny_model), step=2, layer=1, module="mlp")
    ex = Executor(backend, make_schedule("full", spec), FlopsModel.for_config(tiny_config))
    x, t, y = _inputs(tiny_config)
    for s in range(2):
        backend.current = s
        assert np.isfinite(ex(s, x, t, y)).all()
    backend.current = 2
    with pytest.raises(NonFiniteError, match=r"at step 2 of 3, first in layer 1 mlp;"):
        ex(2, x, t, y)
    with pytest.raises(NonFiniteError, match=r"first in the input latents"):
        ex(2, x * np.float32(np.inf), t, y)


class LayerByLayer:
    """A selector's choices made only when their module runs: no `reads`, no `select_many`."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def reset(self):
        self.inner.reset()

    def observe(self, *args):
        self.inner.observe(*args)

    def select(self, *args):
        return self.inner.select(*args)


@pytest.mark.parametrize("policy", ["toca", "duca", "soda"])
def test_choices_made_at_the_step_start_equal_the_ones_made_layer_by_layer(tiny_model, tiny_config, policy):
    """`Executor._preselect` chooses a step's pruned tokens before its layers run (in one
    `select_many` call where the selector has it): every step's output is bit-identical to
    choosing each when its module runs."""
    from soda.selectors import make_selector

    spec = ScheduleSpec.for_model(tiny_config, "ddim", 10)
    if policy == "soda":  # feature-mean selector (no select_many): the pruned steps of _mixed_schedule
        sched = _mixed_schedule(tiny_config)
    else:
        sched = make_schedule(policy, spec)
    fm = FlopsModel.for_config(tiny_config)
    early = Executor(TorchBackend(tiny_model), sched, fm)
    late = Executor(TorchBackend(tiny_model), sched, fm, selector=LayerByLayer(make_selector(sched.selector, sched.params)))
    made = []
    preselect = early._preselect
    early._preselect = lambda s, tokens: made.append(len(chosen := preselect(s, tokens))) or chosen
    x, t, y = _inputs(tiny_config)
    for s in range(sched.num_steps):
        np.testing.assert_array_equal(early(s, x + 0.1 * s, t, y), late(s, x + 0.1 * s, t, y))
    assert sum(made) > 0  # choices were made early
    assert early.flops_done == late.flops_done


@pytest.mark.parametrize("policy", ["toca", "taylorseer"])
def test_a_reused_executor_generates_what_a_new_one_does(tiny_model, tiny_config, policy):
    """`generate(executor=...)` resets it: the second generation knows nothing of the first's
    caches, forecasts or selector state (ToCa's scores, TaylorSeer's factors); one made for
    another schedule is refused."""
    from soda.generate import generate, make_executor
    from soda.sampling import SamplerConfig

    sampler = SamplerConfig("ddim", 6, 4.0, 3)
    spec = ScheduleSpec.for_model(tiny_config, sampler.kind, sampler.steps)
    schedule = make_schedule(policy, spec)
    backend = TorchBackend(tiny_model)
    executor = make_executor(backend, tiny_config, schedule)
    runs = [(np.array([1, 7]), 3), (np.array([2, 5]), 4), (np.array([1, 7]), 3)]
    reused = [generate(backend, tiny_config, sampler, schedule, y, seed, executor=executor) for y, seed in runs]
    for (y, seed), (x, stats) in zip(runs, reused):
        fresh, fresh_stats = generate(backend, tiny_config, sampler, schedule, y, seed)
        np.testing.assert_array_equal(x, fresh)
        assert stats.flops == fresh_stats.flops
    with pytest.raises(ValueError, match="another backend, schedule or model"):
        generate(backend, tiny_config, sampler, make_schedule("full", spec), np.array([1]), 0, executor=executor)
