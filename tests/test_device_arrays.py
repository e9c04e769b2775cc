"""The stitching loop on the backend's arrays (`soda.arrays`): numpy and torch tensors give the
same samples, and nothing inside the loop converts a device array to the host.

The torch-tensor backend here is `TorchBackend(model, device="cpu")`: every array the loop
holds (tokens, caches, Taylor factors, selector state, token indices) is a torch tensor, as it
is on CUDA; only the device differs. The models have strong adaLN weights (conftest.strengthen)
so a wrong cache entry or token choice shows far above the 1e-6 tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from soda.executor import Executor
from soda.flops import FlopsModel
from soda.policies import ScheduleSpec, make_schedule
from soda.sampling import Conditioning, SamplerConfig, initial_noise, make_diffusion, sample_loop
from soda.torch_backend import TorchBackend

TOL = 1e-6
STEPS = 10
POLICIES = ("full", "fora", "toca", "duca", "soda", "taylorseer", "soda-forecast")


def _rel_err(got, ref) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def sampler_cfg():
    return SamplerConfig("ddim", STEPS, 4.0, 3)


@pytest.fixture(scope="module")
def schedules(strong_tiny_model, sampler_cfg):
    from soda.profile import profile

    cfg = strong_tiny_model.config
    spec = ScheduleSpec.for_model(cfg, sampler_cfg.kind, sampler_cfg.steps)
    prof = profile(strong_tiny_model, sampler_cfg, samples=2, seed=0)
    out = {}
    for p in POLICIES:
        out[p] = make_schedule(p, spec, speedup=2.0, profile=prof) if p.startswith("soda") else make_schedule(p, spec)
    out["duca-random"] = make_schedule("duca", spec, selector="duca-random")  # DuCa's attention-free selector
    out["forecast-hand"] = _forecast_schedule(cfg)
    return out


def _forecast_schedule(cfg):
    """Every forecast kind, pruned on a forecast included (the tiny profile's soda-forecast
    schedule happens to choose none)."""
    from soda.schedule import FULL, REUSE, Schedule, forecast, prune

    grid = lambda row: [list(row) for _ in range(cfg.depth)]  # noqa: E731
    steps = [grid([FULL, FULL]), grid([FULL, FULL]), grid([forecast(1), prune(0.5, 1)]), grid([FULL, FULL]),
             grid([forecast(2), prune(0.25, 2)]), grid([REUSE, forecast(2)]), grid([FULL, FULL]),
             grid([prune(0.75, 1), forecast(1)]), grid([forecast(4), prune(0.5)]), grid([FULL, FULL])]
    return Schedule("hand", cfg.name, cfg.hash(), "ddim", STEPS, list(cfg.modules), cfg.depth, steps,
                    selector="feature-mean").validate()


class Outputs:
    """Keeps every step's model output as the backend returned it."""

    def __init__(self, backend):
        self.backend, self.outputs = backend, []
        self.specs, self.modules, self.num_layers = backend.specs, backend.modules, backend.num_layers

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def final(self, *a):
        out = self.backend.final(*a)
        self.outputs.append(out)
        return out


def _run(backend, config, sampler_cfg, schedule, labels=(1, 7), seed=3):
    """(samples, executor, per-step outputs) of one generation through the shared loop."""
    rec = Outputs(backend)
    executor = Executor(rec, schedule, FlopsModel.for_config(config))
    z, rng = initial_noise(len(labels), config.latent_shape, seed)
    cond = Conditioning.from_labels(np.array(labels), config.null_label)
    x = sample_loop(executor, make_diffusion(sampler_cfg, config.learn_sigma), z, cond, None,
                    config.in_channels, rng)
    return x, executor, rec.outputs


@pytest.mark.parametrize("policy", POLICIES + ("duca-random", "forecast-hand"))
def test_numpy_and_torch_tensors_give_the_same_samples(strong_tiny_model, sampler_cfg, schedules, policy):
    schedule = schedules[policy]
    if policy != "full":
        assert schedule.count_kinds()["full"] < STEPS  # the policy really caches
    cfg = strong_tiny_model.config
    ref, ex_np, outs_np = _run(TorchBackend(strong_tiny_model), cfg, sampler_cfg, schedule)
    got, ex_t, outs_t = _run(TorchBackend(strong_tiny_model, device="cpu"), cfg, sampler_cfg, schedule)
    # the loop really held torch tensors (and numpy in the reference run)
    assert all(isinstance(v, torch.Tensor) for v in ex_t.cache.values()) and ex_t.cache
    assert all(isinstance(v, np.ndarray) for v in ex_np.cache.values())
    assert ex_t.flops_done == ex_np.flops_done
    assert len(outs_t) == len(outs_np) == STEPS
    per_step = max(_rel_err(a.numpy(), b) for a, b in zip(outs_t, outs_np))
    assert max(_rel_err(got, ref), per_step) <= TOL


def _prunes(schedule) -> int:
    from soda.schedule import PRUNE, parse_action

    return sum(parse_action(a)[0] == PRUNE for step in schedule.steps if step != "skip" for row in step for a in row)


def test_prune_policies_prune(schedules):
    """The cases above exercise every selector: the pruned schedules do contain prune actions."""
    for policy in ("toca", "duca", "duca-random", "soda"):
        assert _prunes(schedules[policy]) > 0, policy
    selectors = {p: schedules[p].selector for p in ("toca", "duca", "duca-random", "soda")}
    assert selectors == {"toca": "toca-attention", "duca": "toca-attention", "duca-random": "duca-random",
                         "soda": "feature-mean"}
    assert any(step == "skip" for step in schedules["duca"].steps)  # staleness skips skip steps


class HostConversion(AssertionError):
    pass


@pytest.mark.parametrize("policy", ["toca", "duca-random", "soda", "taylorseer", "forecast-hand"])
def test_no_host_conversion_inside_the_loop(strong_tiny_model, sampler_cfg, schedules, policy, monkeypatch):
    """With torch tensors, converting one to numpy raises, except the one `to_numpy` of the model
    output per step (the sampler is numpy): tokens, caches, forecasts and token selection never
    leave the device."""
    import soda.arrays
    import soda.executor

    allowed = {"on": False, "calls": 0}

    def guard(original):
        def call(self, *a, **kw):
            if not allowed["on"]:
                raise HostConversion("a torch tensor was converted to the host inside the loop")
            return original(self, *a, **kw)
        return call

    def counted_to_numpy(a):
        assert isinstance(a, torch.Tensor)
        allowed["on"], allowed["calls"] = True, allowed["calls"] + 1
        try:
            return soda.arrays.to_numpy(a)
        finally:
            allowed["on"] = False

    for name in ("__array__", "numpy", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, guard(getattr(torch.Tensor, name)))
    monkeypatch.setattr(soda.executor, "to_numpy", counted_to_numpy)
    x, _, _ = _run(TorchBackend(strong_tiny_model, device="cpu"), strong_tiny_model.config, sampler_cfg,
                   schedules[policy])
    assert allowed["calls"] == STEPS and np.isfinite(x).all()
    # the guard does fire: a conversion in the loop would have been caught
    with pytest.raises(HostConversion):
        np.asarray(torch.zeros(2))


def test_pixart_cross_entropy_selector_on_tensors():
    """PixArt's ToCa (toca-cross-entropy selector, scatter of recomputed entropies) on torch
    tensors equals numpy, step by step."""
    from soda.models.config import ModelConfig
    from soda.models.pixart import PixArt

    cfg = ModelConfig("pixart-tiny", depth=2, hidden_size=32, patch_size=2, num_heads=2, input_size=8, in_channels=4,
                      num_classes=0, arch="pixart", caption_channels=8, caption_len=6, pe_interpolation=1.0)
    torch.manual_seed(0)
    model = PixArt(cfg)
    model.randomize(0)
    fm = FlopsModel.for_config(cfg)
    sched = make_schedule("toca", ScheduleSpec.for_model(cfg, "dpm-solver", 10), speedup=2.0, flops=fm)
    assert sched.selector == "toca-cross-entropy" and _prunes(sched) > 0
    rng = np.random.default_rng(0)
    cond = {"caption": rng.standard_normal((4, 6, 8)).astype(np.float32),
            "mask": np.repeat((np.arange(6)[None] < np.array([[6], [3]])), 2, 0).astype(np.float32)}
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    ex_np, ex_t = Executor(TorchBackend(model), sched, fm), Executor(TorchBackend(model, device="cpu"), sched, fm)
    for s in range(10):
        t = np.full(4, 999 - 100 * s)
        ref, got = ex_np(s, x, t, cond), ex_t(s, x, t, cond)
        assert _rel_err(got, ref) <= TOL, s
    assert isinstance(ex_t.selector.entropy[0], torch.Tensor)


def test_selectors_on_tensors_equal_numpy_on_ties():
    """Hand-made scores with ties: top-k (ties to the lower index), the 2x2 spatial bonus and
    the L2 normalisation give the same values and indices on numpy and torch."""
    from soda.selectors import top_k
    from soda.selectors.baselines import l2_normalize, spatial_bonus

    score = np.array([[1.0, 3.0, 3.0, 0.5, 2.0, 2.0, 0.0, 3.0, 1.0, 1.0, 4.0, 4.0, 0.0, 0.0, 2.0, 1.0]])
    assert top_k(score, 4).tolist() == [[1, 2, 10, 11]]
    for fn in (lambda a: top_k(a, 5), lambda a: spatial_bonus(a, 0.6), l2_normalize):
        np.testing.assert_array_equal(fn(torch.from_numpy(score)).numpy(), fn(score))
    # the bonus goes to the FIRST max of each 2x2 block (tokens 0,1,4,5 -> token 1 of 1,3,2,2)
    assert spatial_bonus(score, 0.5)[0, :2].tolist() == [1.0, 4.5]


def test_bad_device_is_one_clear_error():
    from soda.errors import UserError

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device here"):
            TorchBackend(torch.nn.Module(), device="cuda")
    with pytest.raises(UserError, match="unknown torch device"):
        TorchBackend(torch.nn.Module(), device="tpu-ish")


def test_reduced_precision_backend_runs_on_a_copy(strong_tiny_model, sampler_cfg, schedules):
    """dtype=bf16 (what --precision bf16 does on CUDA) runs the modules under bf16 autocast on a
    copy of the model (the caller's model is not moved); module outputs are cached in bf16, the
    samples come back float32, near the fp32 ones but not equal to them."""
    cfg = strong_tiny_model.config
    backend = TorchBackend(strong_tiny_model, device="cpu", dtype=torch.bfloat16)
    assert backend.model is not strong_tiny_model
    assert next(strong_tiny_model.parameters()).dtype == torch.float32
    got, ex, _ = _run(backend, cfg, sampler_cfg, schedules["soda"])
    ref, _, _ = _run(TorchBackend(strong_tiny_model), cfg, sampler_cfg, schedules["soda"])
    assert got.dtype == np.float32 and next(iter(ex.cache.values())).dtype == torch.bfloat16
    assert 0 < _rel_err(got, ref) < 0.2
    # Full compute module by module under bf16 equals the whole model's forward under the same
    # autocast (the same casts); a wrong cast or cache dtype on the way would not stay this close.
    full, _, _ = _run(backend, cfg, sampler_cfg, schedules["full"])

    @torch.no_grad()
    def whole(s, x, t, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = strong_tiny_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y["y"]))
        return out.float().numpy()

    z, rng = initial_noise(2, cfg.latent_shape, 3)
    mono = sample_loop(whole, make_diffusion(sampler_cfg, cfg.learn_sigma), z,
                       Conditioning.from_labels(np.array([1, 7]), cfg.null_label), None, cfg.in_channels, rng)
    assert _rel_err(full, mono) <= 1e-3 < _rel_err(mono, _run(TorchBackend(strong_tiny_model), cfg, sampler_cfg,
                                                             schedules["full"])[0])


@pytest.mark.parametrize("policy", ["toca", "duca", "taylorseer"])
def test_opensora_on_tensors_equals_numpy(policy):
    """Open-Sora's video loop (prepared caption context, fps conditioning, never-pruned spatial /
    temporal attention; ToCa's cross-attention entropy and DuCa's value-norm selectors, no 2x2
    bonus) on torch tensors equals numpy."""
    from test_opensora_pipeline import STEPS as OS_STEPS, prompts

    from soda.captions import PromptEmbeds, caption_conditioning
    from soda.generate import generate, with_video
    from soda.models.loading import load_model
    from soda.models.opensora import apply_video
    from soda.pipeline import spec_for

    model, _ = load_model("opensora-tiny", random_init=True)
    video = apply_video(model)
    config = model.config
    sampler = SamplerConfig("rflow", OS_STEPS, 7.0, None, video=video)
    p = prompts()
    cond = with_video(caption_conditioning(PromptEmbeds(p["prompt_embeds"], p["prompt_attention_mask"].astype(np.float32)),
                                           model.null_caption_table()), config, sampler)
    sched = make_schedule(policy, spec_for(model, sampler), **({} if policy == "taylorseer" else {"speedup": 2.0}))
    if policy != "taylorseer":
        assert _prunes(sched) > 0
    x, _ = initial_noise(len(cond), config.latent_shape, 3)
    want, _ = generate(TorchBackend(model), config, sampler, sched, cond, noise=x)
    got, _ = generate(TorchBackend(model, device="cpu"), config, sampler, sched, cond, noise=x)
    assert _rel_err(got, want) <= TOL
