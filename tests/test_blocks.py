"""Block graphs (soda.blocks): one graph call per layer pattern, or per whole step (step graphs).

The runtime with block graphs equals the PyTorch reference to 1e-4 of the max magnitude on the
final samples and every step's model output, with the same FLOPs, for every policy; the block
path is really taken (calls counted per pattern); patterns no graph covers fall back to the
per-module path and still match; a folder without block graphs (as exported before them) still
runs, and so does one with block graphs but no step graphs (export version 3); the weights stay
stored once. The tiny DiT has STRONG random adaLN weights (std 1,
tests/conftest.py `strengthen`), so a 1% error in one MLP output after a block graph, or 0.1% in
a step graph's model output, fails the tolerance (`test_the_tolerance_bites`).

The per-module path keeps its own parity tests in tests/test_runtime.py (their recording
backend exposes no block graphs, so the executor runs module by module there).
"""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from soda.blocks import layer_code
from soda.sampling import SamplerConfig
from soda.selectors import make_selector

REL_TOL = 1e-4
STEPS = 10
POLICIES = ("full", "fora", "toca", "duca", "taylorseer")


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / np.max(np.abs(ref)))


class Counting:
    """A backend wrapper that keeps every step's model output and counts the graph calls by kind
    ("block.<pattern>", "block.<pattern>*" for a multi-layer block, "step.<pattern>" for a step
    graph, "embed", "module", "modulation", "final")."""

    def __init__(self, backend, perturb=None):
        self.backend, self.outputs, self.calls = backend, [], collections.Counter()
        self.specs, self.modules, self.num_layers = backend.specs, backend.modules, backend.num_layers
        self.blocks = getattr(backend, "blocks", ())
        self.perturb = perturb

    def prepare(self, *a):
        return self.backend.prepare(*a)

    def embed(self, *a):
        self.calls["embed"] += 1
        return self.backend.embed(*a)

    def modulation(self, *a):
        self.calls["modulation"] += 1
        return self.backend.modulation(*a)

    def module(self, *a, **kw):
        self.calls["module"] += 1
        return self.backend.module(*a, **kw)

    def block(self, block, *a):
        self.calls[f"block.{block.code}{'*' if block.first != block.last else ''}"] += 1
        out = self.backend.block(block, *a)
        return self.perturb(block, out) if self.perturb else out

    def step_graph(self, block, *a):
        self.calls[f"step.{block.code}"] += 1
        out = self.backend.step_graph(block, *a)
        self.outputs.append(out["out"])  # the model output, which `final` gives on other paths
        return self.perturb(block, out) if self.perturb else out

    def final(self, *a):
        self.calls["final"] += 1
        out = self.backend.final(*a)
        self.outputs.append(out)
        return out


@pytest.fixture(scope="module")
def sampler():
    return SamplerConfig("ddim", STEPS, 4.0, 3)


@pytest.fixture(scope="module")
def tiny_profile(strong_tiny_model, sampler):
    from soda.profile import profile

    return profile(strong_tiny_model, sampler, samples=2, seed=0)


def _profiled(model, sampler, prof, policy: str):
    from soda.policies import ScheduleSpec, make_schedule

    spec = ScheduleSpec.for_model(model.config, sampler.kind, sampler.steps)
    return make_schedule(policy, spec, speedup=2.0, profile=prof)


@pytest.fixture(scope="module")
def soda_schedule(strong_tiny_model, sampler, tiny_profile):
    return _profiled(strong_tiny_model, sampler, tiny_profile, "soda")


def _export(model, sampler, schedule, out, blocks=True):
    from export.onnx_export import export_model

    return export_model(model, "random-init-strong", schedule, sampler, out, progress=False, echo=lambda *a: None,
                        blocks=blocks)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, strong_tiny_model, sampler, soda_schedule):
    """The same model and schedule exported with and without block graphs."""
    root = tmp_path_factory.mktemp("blocks")
    with_blocks = _export(strong_tiny_model, sampler, soda_schedule, root / "blocks")
    without = _export(strong_tiny_model, sampler, soda_schedule, root / "modules", blocks=False)
    return with_blocks, without


@pytest.fixture(scope="module")
def backends(folders, strong_tiny_model):
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.torch_backend import TorchBackend

    engines = open_engines(folders[0].folder)
    return engines, OrtBackend(engines, threads=1), TorchBackend(strong_tiny_model)


def _parity(engines, backend, torch_backend, sampler_cfg, schedule, perturb=None):
    """(worst relative error over the samples and every step's output, graph calls by kind)."""
    from soda.generate import generate

    ys = np.array([1, 7])
    got_rec, ref_rec = Counting(backend, perturb), Counting(torch_backend)
    got, stats = generate(got_rec, engines.config, sampler_cfg, schedule, ys, 3)
    ref, stats_ref = generate(ref_rec, engines.config, sampler_cfg, schedule, ys, 3)
    assert stats.flops == stats_ref.flops
    assert not any(k.startswith(("block", "step")) for k in ref_rec.calls)  # the reference runs module by module
    per_step = max(_rel_err(a, b) for a, b in zip(got_rec.outputs, ref_rec.outputs))
    return max(_rel_err(got, ref), per_step), got_rec.calls


def _given_steps(schedule) -> list[int]:
    """Steps whose every action is supplied by the loop (reuse or forecast): one "r" step graph."""
    from soda.blocks import GIVEN, module_code

    return [s for s in range(STEPS) if not schedule.is_skip(s)
            and all(module_code(a) == GIVEN for row in schedule.steps[s] for a in row)]


@pytest.fixture(scope="module")
def soda_forecast_schedule(strong_tiny_model, sampler, tiny_profile):
    return _profiled(strong_tiny_model, sampler, tiny_profile, "soda-forecast")


@pytest.mark.parametrize("policy, kind", [(p, k) for p in POLICIES for k in ("ddim", "ddpm")]
                         + [("soda", "ddim"), ("soda-forecast", "ddim")])
def test_block_runtime_equals_torch_reference(backends, soda_forecast_schedule, policy, kind):
    from runtime.engines import resolve_schedule

    engines, ort_b, torch_b = backends
    sampler_cfg = engines.sampler_with(kind=kind)
    schedule = soda_forecast_schedule if policy == "soda-forecast" else resolve_schedule(engines, sampler_cfg, policy)
    err, calls = _parity(engines, ort_b, torch_b, sampler_cfg, schedule)
    assert err <= REL_TOL
    full = [s for s in range(STEPS) if schedule.step_kind(s) == "full"]
    given = _given_steps(schedule)
    last_partial = max((s for s in range(STEPS) if schedule.step_kind(s) == "partial"), default=-1)
    # a whole full step is one call, its outputs kept without scores ("k"); after the last partial
    # step none kept ("c"); a full step whose scores a later pruning step reads (ToCa's attention
    # score; DuCa here with ToCa's selector) runs its layers' "ff" blocks instead
    reads = getattr(make_selector(schedule.selector, schedule.params), "reads_scores", True)
    scored = [s for s in full if reads and s < last_partial and any(
        schedule.step_kind(p) == "partial" and all(schedule.step_kind(q) != "full" for q in range(s + 1, p))
        and any("prune" in a for row in schedule.steps[p] for a in row) for p in range(s + 1, STEPS))]
    assert (len(scored) > 0) == (policy in ("toca", "duca"))
    assert calls["step.kk"] == sum(s < last_partial for s in full) - len(scored)
    assert calls["block.ff"] == engines.config.depth * len(scored) and calls["step.ff"] == 0
    assert calls["step.cc"] == sum(s > last_partial for s in full)
    assert calls["step.rr"] == len(given)  # a whole reuse (or forecast) step is one call too
    # every other step: embed, its layers, final (skip steps: embed and final only)
    assert calls["embed"] == calls["final"] == STEPS - len(full) - len(given) + len(scored)
    # the one multi-layer block: a step of the baselines' pruned pattern (attention given, MLP
    # pruned) in every layer runs its layers in one call when its tokens can be chosen before it
    whole_pruned = sum(st != "skip" and {layer_code(row) for row in st} == {"rp"} for st in schedule.steps)
    assert {k for k in calls if k.endswith("*")} <= {"block.rp*"} and calls["block.rp*"] <= whole_pruned
    if policy in ("toca", "duca"):  # ToCa's DDPM-10 schedule here prunes in layer 0 only ("rp/rr")
        assert calls["block.rp*"] == whole_pruned and (whole_pruned > 0 or (policy, kind) == ("toca", "ddpm"))
    if policy in ("full", "fora", "taylorseer"):
        assert sum(calls.values()) == STEPS  # one call per step, every step
    if policy in ("fora", "taylorseer"):
        assert given  # the schedule really has reuse or forecast steps
    if policy not in ("soda-forecast",):
        assert calls["module"] == calls["modulation"] == 0  # every pattern of these schedules is covered
    if policy in ("toca", "duca", "soda"):
        assert sum(v for k, v in calls.items() if "p" in k) > 0  # pruned layers ran inside block graphs


def test_uncovered_patterns_fall_back_to_modules(backends, sampler):
    """Patterns no block graph covers: prune on a forecast (no pattern letter), ToCa's MLP pruned
    after a full attention in the same layer (its choice reads that attention's map), and a
    pattern not exported (as for a schedule made after export)."""
    from soda.schedule import FULL, REUSE, Schedule, forecast, prune

    engines, ort_b, torch_b = backends
    cfg, L = engines.config, engines.config.depth
    steps = [[[FULL, FULL]] * L, [[FULL, FULL]] * L, [[forecast(1), prune(0.5, 1)]] * L, [[FULL, prune(0.5)]] * L,
             [[REUSE, prune(0.25)], [FULL, prune(0.5)]], [[prune(0.5), REUSE]] * L, "skip",
             [[FULL, prune(0.75)]] * L, [[REUSE, REUSE]] * L, [[FULL, FULL], [REUSE, FULL]]]
    steps = [s if s == "skip" else [list(r) for r in s] for s in steps]
    params = {"selector_params": {"interval": 3, "skip_steps": [6]}}
    hand = Schedule("hand", cfg.name, cfg.hash(), "ddim", STEPS, list(engines.modules), L, steps,
                    selector="toca-attention", params=params).validate()
    exported = {b.name for b in ort_b.blocks}
    assert "block.1.rf" not in exported  # a pattern not exported (see default_blocks)
    pr = "block.0.pr" in exported and "block.1.pr" in exported  # exported if the SODA schedule has it
    err, calls = _parity(engines, ort_b, torch_b, sampler, hand)
    assert err <= REL_TOL
    # module by module: steps 2, 3 and 7 (both layers), step 4's layer 1 and step 9's layer 1 (rf),
    # and step 5 unless "pr" is exported; pruned and full modules are module calls, forecast ones not
    assert calls["modulation"] == 8 + 2 * (not pr) and calls["module"] == 13 + 2 * (not pr)
    # step 1's scores are read at step 2 (its layers' "ff" blocks), step 0's are not (step 1 replaces them)
    assert calls["step.ff"] == 0 and calls["step.kk"] == 1 and calls["block.rp"] == 1 and calls["block.pr"] == 2 * pr and calls["step.cc"] == 0
    assert calls["step.rr"] == 1 and calls["block.rr"] == 0 and calls["block.ff"] == L + 1


def test_skip_steps_take_the_tokens_of_a_step_graph(backends, sampler):
    """A skip step reruns only embed and final, on the last tokens: here those of a lean step graph
    (`cc`, after the last partial step) and of a reuse one (`rr`)."""
    from soda.schedule import FULL, REUSE, Schedule

    engines, ort_b, torch_b = backends
    cfg, L = engines.config, engines.config.depth
    ff, rr = [[FULL, FULL] for _ in range(L)], [[REUSE, REUSE] for _ in range(L)]
    steps = [ff, rr, "skip", ff, rr, ff, "skip", ff, "skip", "skip"]
    steps = [s if s == "skip" else [list(r) for r in s] for s in steps]
    hand = Schedule("hand", cfg.name, cfg.hash(), "ddim", STEPS, list(engines.modules), L, steps).validate()
    err, calls = _parity(engines, ort_b, torch_b, sampler, hand)
    assert err <= REL_TOL
    assert dict(calls) == {"step.kk": 2, "step.rr": 2, "step.cc": 2, "embed": 4, "final": 4}


def test_block_graphs_switched_off_run_module_by_module(backends, folders, sampler, soda_schedule):
    from runtime.ort_backend import OrtBackend

    engines, _, torch_b = backends
    err, calls = _parity(engines, OrtBackend(engines, threads=1, blocks=False), torch_b, sampler, soda_schedule)
    assert err <= REL_TOL
    assert not any(k.startswith("block") for k in calls) and calls["module"] > 0


def test_folder_without_block_graphs_still_runs(folders, backends, sampler, soda_schedule):
    """What an export made before block graphs holds: no "blocks" section, no block files."""
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend

    _, torch_b = backends[0], backends[2]
    old = open_engines(folders[1].folder)
    assert "blocks" not in old.manifest.data and old.block_graphs() == []
    assert not list(folders[1].folder.glob("block.*")) and not list(folders[1].folder.glob("step.*"))
    err, calls = _parity(old, OrtBackend(old, threads=1), torch_b, sampler, soda_schedule)
    assert err <= REL_TOL and calls["module"] > 0


@pytest.mark.parametrize("policy", ["fora", "soda"])
def test_folder_with_block_graphs_but_no_step_graphs_still_runs(tmp_path_factory, strong_tiny_model, sampler,
                                                                 soda_schedule, backends, policy):
    """What export version 3 wrote (block-graph section format 1): per-layer block graphs and a
    whole step's layers as one block ("block.0-1.ff" / ".cc"), no step graphs. Full steps then
    run as embed + that block + final, 3 calls."""
    from runtime.engines import open_engines, resolve_schedule
    from runtime.ort_backend import OrtBackend
    from soda.blocks import Block, default_blocks

    cfg = strong_tiny_model.config
    L = cfg.depth
    v3 = [b for b in default_blocks(cfg.interface, L, soda_schedule) if not b.step]
    v3 += [Block(0, L - 1, "ff"), Block(0, L - 1, "cc")]
    out = tmp_path_factory.mktemp("v3") / "e"
    _export(strong_tiny_model, sampler, soda_schedule, out, blocks=v3)
    data = json.loads((out / "manifest.json").read_text())
    data["blocks"]["format"] = 1  # as version 3 wrote it
    (out / "manifest.json").write_text(json.dumps(data))
    old = open_engines(out)
    assert {b.step for b in old.block_graphs()} == {False}
    schedule = resolve_schedule(old, sampler, policy)
    err, calls = _parity(old, OrtBackend(old, threads=1), backends[2], sampler, schedule)
    assert err <= REL_TOL
    full = schedule.count_kinds()["full"]
    assert not any(k.startswith("step") for k in calls) and calls["block.ff*"] + calls["block.cc*"] == full
    assert calls["embed"] == calls["final"] == STEPS and calls["module"] == 0


def test_manifest_block_section_is_checked(folders, tmp_path):
    import shutil

    from runtime.engines import open_engines
    from soda.errors import UserError

    bad = tmp_path / "bad"
    shutil.copytree(folders[0].folder, bad)
    data = json.loads((bad / "manifest.json").read_text())
    data["blocks"]["format"] = 99
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="block-graph section"):
        open_engines(bad)


@pytest.mark.parametrize("where", ["block", "step"])
def test_the_tolerance_bites(backends, sampler, where):
    """A small error in one graph kind's outputs must fail the parity check by a margin (a real
    bug of that size could not hide). "block": 1% of a layer's MLP output added to the residual
    stream after each per-layer block graph that computes it (0.1% gives 7e-5: under the
    tolerance); "step": the step graph's model output (what its final layer gives) scaled by
    1.001. A hand schedule runs both: full steps, and steps with one layer full, the other reused."""
    from soda.schedule import FULL, REUSE, Schedule

    engines, ort_b, torch_b = backends
    cfg = engines.config
    ff, rr = [FULL, FULL], [REUSE, REUSE]
    steps = [[list(ff), list(ff)] if s % 3 == 0 else [list(ff), list(rr)] if s % 3 == 1 else [list(rr), list(ff)]
             for s in range(STEPS)]
    hand = Schedule("hand", cfg.name, cfg.hash(), "ddim", STEPS, list(engines.modules), cfg.depth, steps).validate()

    def perturb(block, out):
        if block.step != (where == "step"):
            return out
        if block.step:
            return dict(out, out=out["out"] * (1 + 1e-3))
        key = f"out.mlp.{block.last}"
        return dict(out, tokens_out=out["tokens_out"] + 1e-2 * out[key]) if key in out else out

    assert _parity(engines, ort_b, torch_b, sampler, hand)[0] <= REL_TOL
    err, calls = _parity(engines, ort_b, torch_b, sampler, hand, perturb=perturb)
    assert calls["step.kk"] > 0 and calls["block.ff"] > 0  # both kinds ran (no selector: no scores read)
    assert err > 3 * REL_TOL


# --- PixArt: cross-attention with its per-generation K/V inside the block graphs ---------------
@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """pixart-digits (4 layers, 64 tokens, 3 caption tokens), random weights made strong: the
    per-block scale_shift_table, t_block and output layer at std 1 so every module shows."""
    import torch

    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.models.loading import load_model
    from soda.policies import ScheduleSpec, make_schedule
    from soda.torch_backend import TorchBackend

    model, _ = load_model("pixart-digits", random_init=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "scale_shift_table" in name or name.startswith(("t_block", "final_layer.linear")):
                p.copy_(torch.randn(p.shape, generator=g))
    sampler = SamplerConfig("ddim", STEPS, 4.5, None)
    spec = ScheduleSpec.for_model(model.config, "ddim", STEPS)
    out = tmp_path_factory.mktemp("pixart") / "e"
    _export(model, sampler, make_schedule("toca", spec), out)
    engines = open_engines(out)
    return engines, OrtBackend(engines, threads=1), TorchBackend(model), sampler


@pytest.mark.parametrize("policy", ["full", "fora", "toca", "duca"])
def test_pixart_block_runtime_equals_torch(pixart, policy):
    from runtime.engines import resolve_schedule
    from soda.captions import PromptEmbeds, caption_conditioning
    from soda.generate import generate

    engines, ort_b, torch_b, sampler = pixart
    schedule = resolve_schedule(engines, sampler, policy)
    rng = np.random.default_rng(0)
    caption = rng.standard_normal((2, 3, 32)).astype(np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
    cond = caption_conditioning(PromptEmbeds(caption, mask), engines.null_caption())
    got_rec, ref_rec = Counting(ort_b), Counting(torch_b)
    got, stats = generate(got_rec, engines.config, sampler, schedule, cond, 3)
    ref, stats_ref = generate(ref_rec, engines.config, sampler, schedule, cond, 3)
    assert stats.flops == stats_ref.flops
    err = max(_rel_err(got, ref), *(_rel_err(a, b) for a, b in zip(got_rec.outputs, ref_rec.outputs)))
    assert err <= REL_TOL
    calls = got_rec.calls
    scored = calls["block.fff"] // engines.config.depth  # full steps whose scores a later step reads: layer blocks
    assert calls["step.kkk"] + calls["step.ccc"] + scored == schedule.count_kinds()["full"]  # else one call
    assert calls["step.fff"] == 0 and (scored > 0) == (policy in ("toca", "duca"))
    assert calls["step.rrr"] == len(_given_steps(schedule))  # and a whole reuse step
    assert calls["embed"] == calls["final"] == STEPS - schedule.count_kinds()["full"] - calls["step.rrr"] + scored
    if policy in ("full", "fora"):
        assert sum(calls.values()) == STEPS  # one call per step
    if policy == "fora":
        assert calls["step.rrr"] > 0
    if policy in ("toca", "duca"):
        assert sum(v for k, v in calls.items() if k.startswith("block.")) > 0


def test_a_selector_without_reads_only_gets_a_layers_first_module_pruned_in_a_graph():
    """Unknown needs: a pruned module's tokens may be chosen before the graph only when it is the
    layer's first module, so "pp" must run module by module (the second choice reads the first's
    result), while "pf"/"pr" may use a graph."""
    from types import SimpleNamespace

    from soda.blocks import Block
    from soda.executor import Executor

    loop = SimpleNamespace(selector=object(), backend=SimpleNamespace(modules=("attn", "mlp")), _pre={})
    ready = {code: Executor._ready(loop, Block(0, 0, code)) for code in ("pp", "pf", "pr", "fp", "rp")}
    assert ready == {"pp": False, "pf": True, "pr": True, "fp": False, "rp": False}
    assert not Executor._ready(loop, Block(0, 1, "pr"))  # a run of layers: the later layers' choices wait
    # Choices made at the step's start (Executor._preselect) may feed a run of layers.
    loop._pre = {(0, 1): None, (1, 1): None}
    assert Executor._ready(loop, Block(0, 1, "rp"))
    loop._pre = {(0, 1): None}
    assert not Executor._ready(loop, Block(0, 1, "rp"))



def test_the_scoreless_step_graph_leaves_the_score_reductions_out(folders):
    """"k" (computed, output kept, no score): the step graph "kk" emits every module's output but
    no attention score, and has none of the reductions that make one (a layer's "ff" block has)."""
    import onnx

    from runtime.engines import open_engines

    engines = open_engines(folders[0].folder)
    L = engines.config.depth
    graphs = {n: onnx.load(str(engines.path(n)), load_external_data=False) for n in (f"step.0-{L - 1}.kk", "block.0.ff")}
    outs = {n: {o.name for o in g.graph.output} for n, g in graphs.items()}
    ops = {n: {x.op_type for x in g.graph.node} for n, g in graphs.items()}
    assert outs[f"step.0-{L - 1}.kk"] == {"out", "tokens_out"} | {f"out.{m}.{l}" for m in engines.modules for l in range(L)}
    assert "received.attn.0" in outs["block.0.ff"]
    assert "ReduceSum" in ops["block.0.ff"] and "ReduceSum" not in ops[f"step.0-{L - 1}.kk"]


def test_a_layer_of_given_outputs_reads_only_their_gates(folders, strong_tiny_model):
    """A DiT layer whose modules are all given ("rr") computes only the two gates: its graph holds
    two D x D slices of adaLN's weight, a third of what a full layer ("ff") reads for its
    modulation; a pruned layer ("rp") reads four. The slices are the same tensors in every
    graph, so the weights file still holds each once."""
    import torch

    from runtime.engines import open_engines

    engines = open_engines(folders[0].folder)
    D = engines.config.hidden_size
    linear = strong_tiny_model.blocks[0].adaLN_modulation[1]
    chunks = [linear.weight[i * D:(i + 1) * D].detach().numpy() for i in range(6)]
    weights = engines.folder / engines.manifest.data["weights_file"]

    def modulation_terms(graph: str) -> set[int]:
        """Which of adaLN's six weight slices (shift_msa, scale_msa, gate_msa, shift_mlp, ...) the
        graph reads (the biases, D floats, are small enough to stay inside the graph)."""
        held = set()
        for _, offset, length, _, shape in engines.manifest.artefacts[graph].initializers:
            if tuple(shape) == (D, D):
                a = np.fromfile(weights, dtype=np.float32, count=length // 4, offset=offset).reshape(D, D)
                held |= {i for i, ch in enumerate(chunks) if np.array_equal(a, ch)}
        return held

    assert modulation_terms("block.0.rr") == {2, 5}
    assert modulation_terms("block.0.rp") == {2, 3, 4, 5}
    assert modulation_terms("block.0.ff") == set(range(6))
    assert engines.manifest.data["weights_bytes"] <= 1.1 * engines.manifest.data["raw_fp32_bytes"]
    # the gates alone equal the gates of the whole modulation; given modules get no shift/scale
    c = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    whole = strong_tiny_model.blocks[0].modulation(c)
    gates = strong_tiny_model.layer_modulation(0, (c,), gates_only=frozenset({"attn", "mlp"}))
    for name in ("attn", "mlp"):
        assert gates[name][0] is None
        torch.testing.assert_close(gates[name][1], whole[name].gate, rtol=0, atol=1e-6)
