"""Open-Sora block graphs (soda.blocks on a video model): cross-attention with its per-generation
K/V and caption mask, and the video's size (the conditioning's latent "grid") inside the graphs,
whose token axis is the video's.

One export of `opensora-tiny` (random weights; 17 frames of 64 x 64 -> 5 x 8 x 8 latents, 80
tokens; rflow 8 steps, CFG 7) with its SODA schedule, then for every policy the runtime with block
graphs equals the PyTorch executor (`sample`'s loop) to 1e-4 of the largest magnitude, on the
final latents and every step's model output, with the same FLOPs and the block graphs counted as
called: at the exported video AND at another one (34 frames of 40 x 48 -> 10 x 5 x 6 latents, 90
tokens, the height padded to the patch), which the graphs take through their dynamic axes. At the
other size the baselines are rebuilt there, as `run` does; the SODA plans are those of the exported
size, replayed (their actions are per step, layer and module, their rates fractions of N). A whole
full or reuse step is one step graph call (embed and final inside, `Block.step`). The last test
adds 0.1% of one MLP output after each block graph, and 0.1% to each step graph's model output,
and watches the parity fail.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from soda.blocks import layer_code
from tests.test_blocks import Counting

STEPS = 8
REL_TOL = 1e-4
OTHER = {"num_frames": 34, "height": 40, "width": 48}
POLICIES = ("full", "fora", "toca", "duca", "taylorseer", "soda", "soda-forecast")


def _rel_err(got, ref) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from export.onnx_export import export_model
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.captions import PromptEmbeds, caption_conditioning
    from soda.models.loading import load_model
    from soda.models.opensora import apply_video
    from soda.pipeline import spec_for
    from soda.policies import make_schedule
    from soda.profile import profile
    from soda.sampling import SamplerConfig
    from soda.torch_backend import TorchBackend

    model, weights = load_model("opensora-tiny", random_init=True)
    sampler = SamplerConfig("rflow", STEPS, 7.0, None, video=apply_video(model))
    rng = np.random.default_rng(0)
    mask = (np.arange(16)[None] < np.array([[5], [12]])).astype(np.float32)  # captions of 5 and 12 tokens
    captions = PromptEmbeds(rng.standard_normal((2, 16, 32)).astype(np.float32), mask)
    captions = caption_conditioning(captions, model.null_caption_table())
    prof = profile(model, sampler, samples=2, seed=0, batch_size=2,
                   conditioning=_with_video(captions, model.config, sampler), weights=weights, rates=(0.25, 0.5),
                   orders=(1, 2))
    plans = {p: make_schedule(p, spec_for(model, sampler), speedup=2.0, profile=prof) for p in ("soda", "soda-forecast")}
    out = tmp_path_factory.mktemp("opensora-blocks") / "eng"
    export_model(model, weights, plans["soda"], sampler, out, progress=False, echo=lambda *a: None)
    engines = open_engines(out)
    return engines, OrtBackend(engines, threads=1), TorchBackend(model), captions, plans


def _with_video(captions, config, sampler):
    from soda.generate import with_video

    return with_video(captions, config, sampler)


def _schedule(engines, sampler, policy, plans):
    """The policy's schedule at the engines' video: a baseline made there, a SODA plan replayed."""
    from runtime.engines import resolve_schedule

    if policy not in plans:
        return resolve_schedule(engines, sampler, policy, speedup=None if policy == "full" else 2.0)
    return dataclasses.replace(plans[policy], model_hash=engines.config.hash())


@pytest.mark.parametrize("other", [False, True], ids=["exported-video", "other-video"])
@pytest.mark.parametrize("policy", POLICIES)
def test_opensora_block_runtime_equals_torch(setup, policy, other):
    from soda.generate import generate
    from soda.sampling import initial_noise

    engines, ort_b, torch_b, captions, plans = setup
    if other:
        engines = engines.at_video(**OTHER)
    config, sampler = engines.config, engines.sampler
    assert config.latent_shape[1:] == ((10, 5, 6) if other else (5, 8, 8)) and engines.exported_video != other
    schedule = _schedule(engines, sampler, policy, plans)
    cond = _with_video(captions, config, sampler)
    x, _ = initial_noise(len(cond), config.latent_shape, 3)
    got_rec, ref_rec = Counting(ort_b), Counting(torch_b)
    got, stats = generate(got_rec, config, sampler, schedule, cond, noise=x)
    ref, stats_ref = generate(ref_rec, config, sampler, schedule, cond, noise=x)
    assert stats.flops == stats_ref.flops
    assert not any(k.startswith(("block", "step")) for k in ref_rec.calls)  # the reference runs module by module
    err = max(_rel_err(got, ref), *(_rel_err(a, b) for a, b in zip(got_rec.outputs, ref_rec.outputs)))
    assert err <= REL_TOL, err
    calls = got_rec.calls
    kinds = schedule.count_kinds()
    # a whole full step is one call (with its outputs but no scores while a later step reads them,
    # "ccc" after), or its layers' "fff" blocks when a later pruning step reads its scores
    scored = calls["block.fff"] // config.depth
    assert calls["step.kkk"] + calls["step.ccc"] + scored == kinds["full"] and calls["step.fff"] == 0
    # whole steps are step graphs; the one multi-layer block is a pruned step (MLP pruned in every layer)
    assert {k for k in calls if k.endswith("*")} <= {f"block.{'r' * (len(engines.modules) - 1)}p*"}
    if policy == "full":
        assert calls["step.ccc"] == STEPS and sum(calls.values()) == STEPS  # one call per step
    else:
        assert sum(v for k, v in calls.items() if k.startswith("block.") or k == "step.rrr") > 0
    if policy in ("fora", "toca", "taylorseer", "soda"):  # every pattern of these schedules has a graph
        assert calls["module"] == calls["modulation"] == 0, calls
    if policy in ("toca", "duca"):  # the MLP pruned inside a graph, its tokens chosen by the official scores
        assert calls["block.rrp"] + calls["block.rrp*"] > 0  # per layer, or a whole pruned step in one call
        whole = sum(st != "skip" and {layer_code(row) for row in st} == {"rrp"} for st in schedule.steps)
        assert calls["block.rrp*"] == whole, (calls, whole)  # a step pruning every layer's MLP: one call


def test_video_block_graphs_are_exported_with_video_axes(setup):
    """The block graphs' token axis is the video's N, their pruned modules' their own axes, and the
    attention reads the conditioning's latent grid (int64), the cross-attention each layer's K/V."""
    engines = setup[0]
    names = {b.name for b in engines.block_graphs()}
    assert {"block.0.fff", "block.3.rrr", "block.1.rrp", "step.0-3.kkk", "step.0-3.ccc", "step.0-3.rrr"} <= names
    art = engines.manifest.artefacts["step.0-3.kkk"]  # a whole step: the latent video in, the model output out
    shapes = {t.name: (list(t.shape), t.dtype) for t in [*art.inputs, *art.outputs]}
    assert shapes["x"][0][2:] == shapes["out"][0][2:] == ["T", "H", "W"] and shapes["tokens_out"][0] == ["B", "N", 64]
    art = engines.manifest.artefacts["block.1.rrp"]
    shapes = {t.name: (list(t.shape), t.dtype) for t in [*art.inputs, *art.outputs]}
    assert shapes["tokens"] == (["B", "N", 64], "float32")
    assert shapes["idx.mlp.1"] == (["B", "n_mlp_1"], "int64")
    assert shapes["out.mlp.1"] == (["B", "n_mlp_1", 64], "float32")
    art = engines.manifest.artefacts["block.2.fff"]
    shapes = {t.name: (list(t.shape), t.dtype) for t in art.inputs}
    assert shapes["grid"] == (["B", 3], "int64") and shapes["mask"] == (["B", "L"], "float32")
    assert shapes["k.2"] == shapes["v.2"] == (["B", "L", 64], "float32") and "k.3" not in shapes


def test_the_tolerance_bites_on_video(setup):
    """0.1% of the last layer's MLP output added to the residual stream after each block graph that
    computes it, and 0.1% on each step graph's model output: the parity above must fail."""
    from soda.generate import generate

    engines, ort_b, torch_b, captions, plans = setup

    def perturb(block, out):
        if block.step:
            return dict(out, out=out["out"] * (1 + 1e-3))
        key = f"out.mlp.{block.last}"
        if key in out and f"cache_out.mlp.{block.last}" not in out:
            out = dict(out, tokens_out=out["tokens_out"] + 1e-3 * out[key])
        return out

    cond = _with_video(captions, engines.config, engines.sampler)
    got_rec = Counting(ort_b, perturb)
    got, _ = generate(got_rec, engines.config, engines.sampler, plans["soda"], cond, seed=3)
    ref, _ = generate(torch_b, engines.config, engines.sampler, plans["soda"], cond, seed=3)
    assert got_rec.calls["step.kkk"] > 0 and _rel_err(got, ref) > REL_TOL  # feature mean: no scores read


def test_open_sora_selectors_reads_decide_which_pruned_patterns_run_in_a_graph():
    """The official Open-Sora scores read the layer's other modules: ToCa's entropy the
    cross-attention (refreshed by a pruned cross-attention too), DuCa's value norms the attention.
    A pruned module is chosen before a block graph only when nothing it reads is computed earlier in
    the same layer; otherwise the layer runs module by module."""
    from types import SimpleNamespace

    from soda.blocks import Block
    from soda.executor import Executor
    from soda.selectors import make_selector

    modules = ("attn", "cross_attn", "mlp")
    codes = ("rrp", "rpr", "rpp", "frp", "fpr", "ffp")
    ready = {}
    for name in ("toca-cross-entropy", "duca-value-norm"):
        loop = SimpleNamespace(selector=make_selector(name, {"selector_params": {"interval": 3, "bonus_ratio": 0}}),
                               backend=SimpleNamespace(modules=modules), _pre={})  # no choice made at the step start
        ready[name] = {c for c in codes if Executor._ready(loop, Block(0, 0, c))}
    assert ready["toca-cross-entropy"] == {"rrp", "rpr", "frp", "fpr"}  # not after a computed cross-attention
    assert ready["duca-value-norm"] == {"rrp", "rpr", "rpp"}  # not after a computed attention
