"""Export: ONNX subgraphs + one weights file + manifest; parity, reuse, atomicity, validation."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.manifest import load_manifest
from soda.errors import UserError
from soda.executor import Executor
from soda.flops import FlopsModel
from soda.policies import ScheduleSpec, make_schedule
from soda.sampling import SamplerConfig
from soda.schedule import FULL, REUSE, Schedule, prune
from soda.torch_backend import TorchBackend

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


def _sampler():
    return SamplerConfig("ddim", STEPS, 4.0, None)


def _mixed_schedule(cfg):
    """Full, reuse, two prune rates and a skip step: every path the runtime takes."""
    spec = ScheduleSpec.for_model(cfg, "ddim", STEPS)
    L = cfg.depth
    steps = [[[FULL, FULL]] * L, [[REUSE, prune(0.5)]] * L, "skip", [[prune(0.25), FULL]] * L]
    return Schedule("test", spec.model, spec.model_hash, "ddim", STEPS, ["attn", "mlp"], L,
                    [s if s == "skip" else [list(r) for r in s] for s in steps], selector="feature-mean").validate()


def _export(model, out, schedule=None, **kw):
    from export.onnx_export import export_model

    schedule = schedule or _mixed_schedule(model.config)
    lines = []
    res = export_model(model, "random-init-0", schedule, _sampler(), out, progress=False, echo=lines.append, **kw)
    return res, lines


@pytest.fixture(scope="module")
def tiny_model(strong_tiny_model):
    """Strong adaLN/final weights (conftest.strengthen): with the weak 0.02 gates, scaling every MLP
    output by 1.10 moved the model output by 5e-5, under the tolerance; here 1.001 fails it."""
    return strong_tiny_model


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eng") / "tiny"
    res, _ = _export(tiny_model, out)
    return out, res


from soda.models.interface import DIT  # noqa: E402


class OrtBackend:
    """The executor's backend protocol over the exported graphs (what the runtime does)."""

    def __init__(self, folder):
        import onnxruntime as ort

        m = load_manifest(folder)
        self.sess = {n: ort.InferenceSession(str(m.path(n)), providers=["CPUExecutionProvider"]) for n in m.artefacts}
        self.specs = DIT.modules
        self.modules = ("attn", "mlp")
        self.num_layers = m.model["depth"]

    def prepare(self, cond):
        return cond

    def embed(self, x, t, context):
        tokens, c = self.sess["embed"].run(None, {"x": x, "t": t, "y": context["y"]})
        return tokens, (c,)

    def modulation(self, layer, step):
        o = self.sess[f"modulation.{layer}"].run(None, {"c": step[0]})
        return {"attn": (tuple(o[:2]), o[2]), "mlp": (tuple(o[3:5]), o[5])}

    def module(self, layer, name, tokens, shift, scale, context=None):
        o = self.sess[f"{name}.{layer}"].run(None, {"tokens": tokens, "shift": shift, "scale": scale})
        return o[0], (o[1] if name == "attn" else None)

    def final(self, tokens, step):
        return self.sess["final"].run(None, {"tokens": tokens, "c": step[0]})[0]


def test_artefacts_manifest_and_parity(exported, tiny_model, tiny_config):
    out, res = exported
    m = load_manifest(out)
    L = tiny_config.depth
    want = {"embed", "final"} | {f"{k}.{l}" for l in range(L) for k in ("modulation", "attn", "mlp")}
    blocks = set(m.data["blocks"]["graphs"])  # soda.blocks.default_blocks: these at least, and the schedule's
    assert {f"block.{l}.{c}" for l in range(L) for c in ("ff", "rr", "rp")} | {f"step.0-{L - 1}.{c}" for c in ("kk", "cc", "rr")} \
        <= blocks
    assert set(m.artefacts) == want | blocks
    assert m.token_counts == [16, 8, 4]  # N, prune@0.5, prune@0.25 of 16 tokens
    assert m.model_hash == tiny_config.hash() and m.weights == "random-init-0"
    assert all(a.parity_max_abs <= 1e-4 for a in m.artefacts.values())
    attn = m.artefacts["attn.0"]
    assert attn.input_names == ["tokens", "shift", "scale"] and attn.output_names == ["D", "received"]
    assert list(attn.inputs[0].shape) == ["B", "n", 32] and attn.outputs[1].shape == ("B", "n")
    assert m.artefacts["embed"].inputs[1].dtype == "int64"
    assert m.artefacts["modulation.1"].output_names == ["shift_attn", "scale_attn", "gate_attn",
                                                       "shift_mlp", "scale_mlp", "gate_mlp"]
    # Weights stored once: every big initializer points into the one shared file; size <= 1.2x raw.
    for a in m.artefacts.values():
        proto = onnx.load(str(out / a.file), load_external_data=False)
        ext = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert ext and all({e.key: e.value for e in t.external_data}["location"] == "weights.bin" for t in ext)
        assert all(len(t.raw_data) < 256 for t in proto.graph.initializer)
    # (the tiny model's graphs weigh as much as its weights; the 1.2x total is checked on dit-digits)
    assert (out / "weights.bin").stat().st_size <= 1.05 * res.raw_fp32_bytes
    assert not res.reused


def test_export_leaves_the_model_in_eval_mode(exported, tiny_model):
    """torch.onnx.export restores the mode it found recursively; a training-mode wrapper used to
    leave the shared model in training mode, where label dropout made PyTorch calls random."""
    assert not [n for n, m in tiny_model.named_modules() if m.training]
    backend, gen = TorchBackend(tiny_model), __import__("torch").Generator().manual_seed(3)
    from export.graphs import graph_specs

    x, t, y = [a.numpy() for a in graph_specs(tiny_model)[0].example(64, 16, gen, 10)]
    (tokens, (c,)), (tokens2, (c2,)) = backend.embed(x, t, {"y": y}), backend.embed(x, t, {"y": y})
    for a, b in ((tokens, tokens2), (c, c2)):
        np.testing.assert_array_equal(a, b)


def test_parity_check_fails_loudly_with_both_numbers(tiny_model, tmp_path, monkeypatch):
    """No best-of-N: a reference that changes between calls fails the export, saying by how much."""
    from soda.torch_backend import TorchBackend as TB

    real, calls = TB.embed, {"n": 0}

    def drifting(self, x, t, context):
        tokens, (c,) = real(self, x, t, context)
        calls["n"] += 1
        return tokens, (c + 0.01 * calls["n"],)

    monkeypatch.setattr(TB, "embed", drifting)
    with pytest.raises(RuntimeError, match=r"embed: onnxruntime differs from PyTorch by 0\.01.*"
                                           r"differs from its first result by 0\.01"):
        _export(tiny_model, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_nan_weights_fail_the_export(tiny_model, tmp_path):
    import copy

    import torch

    bad = copy.deepcopy(tiny_model)
    with torch.no_grad():
        bad.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"graph mlp\.1: PyTorch gives non-finite outputs"):
        _export(bad, tmp_path / "e")


def test_executor_over_onnx_matches_torch(exported, tiny_model, tiny_config):
    """The exported graphs drive the one stitching loop to the PyTorch result (prune, reuse, skip)."""
    out, _ = exported
    sched = Schedule.load(out / "schedule.json")
    fm = FlopsModel.for_config(tiny_config)
    ref, got = Executor(TorchBackend(tiny_model), sched, fm), Executor(OrtBackend(out), sched, fm)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    t, y = np.array([999, 700, 20, 0]), np.array([1, 2, 3, 10])
    for s in range(STEPS):
        xs = x + 0.1 * s
        want = ref(s, xs, t, y)
        # 1e-5 of the output's magnitude: seen 2e-7 here, while one module graph 1.001x off gives 4.5e-5.
        np.testing.assert_allclose(got(s, xs, t, y), want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_second_export_is_reuse_and_force_reexports(exported, tiny_model):
    out, _ = exported
    before = (out / "weights.bin").stat().st_mtime_ns
    res, lines = _export(tiny_model, out)
    assert res.reused and any(line.startswith("reuse:") for line in lines)
    assert (out / "weights.bin").stat().st_mtime_ns == before
    res, _ = _export(tiny_model, out, force=True)
    assert not res.reused and (out / "weights.bin").stat().st_mtime_ns != before
    load_manifest(out)


def test_interrupted_export_leaves_previous_artefacts(exported, tiny_model, tiny_config, monkeypatch, tmp_path):
    import export.onnx_export as ox

    out = tmp_path / "eng"
    shutil.copytree(exported[0], out)
    before = (out / "manifest.json").read_text()
    calls = {"n": 0}
    real = ox.export_graph

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ox, "export_graph", failing)
    full = make_schedule("full", ScheduleSpec.for_model(tiny_config, "ddim", STEPS))
    with pytest.raises(KeyboardInterrupt):
        _export(tiny_model, out, schedule=full, replace=True)
    assert (out / "manifest.json").read_text() == before
    load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]  # no temporary folder left behind


def test_another_schedule_in_the_same_folder_is_refused_without_force(exported, tiny_model, tiny_config, tmp_path):
    out = _copy(exported, tmp_path)
    before = (out / "manifest.json").read_text()
    fora = make_schedule("fora", ScheduleSpec.for_model(tiny_config, "ddim", STEPS))
    with pytest.raises(UserError, match=r"holds another export \(schedule test -> fora\); --force replaces it"):
        _export(tiny_model, out, schedule=fora)
    assert (out / "manifest.json").read_text() == before
    res, _ = _export(tiny_model, out, schedule=fora, force=True)
    assert not res.reused and load_manifest(out).schedule_hash == fora.hash()


def test_a_concurrent_export_that_finished_first_is_not_overwritten(exported, tiny_model, tiny_config, tmp_path,
                                                                    monkeypatch):
    """Two exports into one empty folder: the one that publishes second refuses instead of replacing."""
    import export.onnx_export as ox

    out = tmp_path / "eng"
    real, calls = ox._current_key, {"n": 0}

    def other_writer_lands_meanwhile(folder):
        calls["n"] += 1
        if calls["n"] == 2:  # the check before publishing: the other export (mixed schedule) has landed
            shutil.copytree(exported[0], folder)
        return real(folder)

    monkeypatch.setattr(ox, "_current_key", other_writer_lands_meanwhile)
    fora = make_schedule("fora", ScheduleSpec.for_model(tiny_config, "ddim", STEPS))
    with pytest.raises(UserError, match=r"another export wrote .* while this one ran \(schedule"):
        _export(tiny_model, out, schedule=fora)
    assert load_manifest(out).schedule_hash == Schedule.load(exported[0] / "schedule.json").hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_full_disk_names_the_folder_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    import errno

    from export.weights_store import WeightsStore

    def full(self, dtype, data):
        raise OSError(errno.ENOSPC, "No space left on device")  # what a write() to a full disk raises

    monkeypatch.setattr(WeightsStore, "_put", full)
    with pytest.raises(OSError) as e:
        _export(tiny_model, tmp_path / "eng")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "eng")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()  # --out under folders the export makes: those go too, what was there stays
    with pytest.raises(OSError):
        _export(tiny_model, tmp_path / "mine" / "a" / "b" / "eng")
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["mine"]


def test_stale_temporary_folder_of_a_killed_export_is_removed(exported, tiny_model, tmp_path):
    out = _copy(exported, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".eng.tmp-{int(dead.stdout)}"
    stale.mkdir()
    _export(tiny_model, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def _copy(exported, tmp_path):
    out = tmp_path / "eng"
    shutil.copytree(exported[0], out)
    return out


def test_truncated_weights_is_a_clear_error(exported, tmp_path):
    out = _copy(exported, tmp_path)
    with open(out / "weights.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=r"weights.bin has 1000 bytes.*truncated"):
        load_manifest(out)


def test_changed_byte_and_swapped_graphs_are_clear_errors(exported, tmp_path):
    out = _copy(exported, tmp_path)
    w = bytearray((out / "weights.bin").read_bytes())
    w[len(w) // 2] ^= 0xFF
    (out / "weights.bin").write_bytes(bytes(w))
    load_manifest(out, verify="size")  # same size: only the hash can tell
    with pytest.raises(UserError, match=r"weights.bin does not match its sha256"):
        load_manifest(out)
    out2 = _copy(exported, tmp_path / "b")
    a, b = (out2 / "mlp.0.onnx").read_bytes(), (out2 / "mlp.1.onnx").read_bytes()
    (out2 / "mlp.0.onnx").write_bytes(b)
    (out2 / "mlp.1.onnx").write_bytes(a)
    with pytest.raises(UserError, match=r"mlp\.0\.onnx (has|does not match)"):
        load_manifest(out2)


def test_missing_file_format_and_other_checkpoint(exported, tmp_path, tiny_config):
    out = _copy(exported, tmp_path)
    m = load_manifest(out)
    m.check_matches(model_hash=tiny_config.hash(), weights="random-init-0")
    with pytest.raises(UserError, match=r"exported from weights random-init-0, not abc"):
        m.check_matches(weights="abc")
    with pytest.raises(UserError, match=r"exported for model dit-tiny"):
        m.check_matches(model_hash="0" * 16)
    (out / "attn.1.onnx").unlink()
    with pytest.raises(UserError, match=r"attn.1.onnx is missing"):
        load_manifest(out)
    data = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(data, format=99)))
    with pytest.raises(UserError, match=r"format 99"):
        load_manifest(out)
    with pytest.raises(UserError, match=r"not an export folder"):
        load_manifest(tmp_path)


def test_manifest_module_needs_neither_torch_nor_onnx():
    code = "import sys, export.manifest; bad = {'torch', 'onnx', 'onnxruntime'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_trt_profiles_one_per_token_count(exported):
    from export.trt import _profiles

    m = load_manifest(exported[0])
    attn = m.data["artefacts"]["attn.0"]
    profs = _profiles(attn, m.token_counts, max_batch=8)
    assert [p["n"] for p in profs] == [16, 8, 4]
    assert profs[2]["shapes"]["tokens"] == [[1, 4, 32], [8, 4, 32], [8, 4, 32]]
    assert len(_profiles(m.data["artefacts"]["embed"], m.token_counts, 8)) == 1


def test_trt_without_tensorrt_says_so_in_one_line(exported, tmp_path):
    from export.trt import availability, build_engines

    trt, gpu, _ = availability()
    if trt is not None and gpu is not None:
        pytest.skip("TensorRT and a GPU are present: the ONNX-only path is not taken")
    lines = []
    assert build_engines(_copy(exported, tmp_path), load_manifest(exported[0]).data, "fp16", echo=lines.append) is None
    assert len(lines) == 1 and "ONNX only" in lines[0]


def test_trt_engines_build(exported, tmp_path):
    from export.trt import availability, build_engines

    trt, gpu, why = availability()
    if trt is None or gpu is None:
        pytest.skip(f"TensorRT engines need tensorrt and a GPU: {why}")
    out = _copy(exported, tmp_path)
    section = build_engines(out, load_manifest(out).data, "fp16", echo=lambda s: None)
    assert set(section["engines"]) == set(load_manifest(out).artefacts)
    assert len(section["engines"]["attn.0"]["profiles"]) == 3


def _cli(*args):
    return subprocess.run([sys.executable, "cli.py", "export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_export_then_reuse(tmp_path):
    out = tmp_path / "digits"
    r = _cli("--model", "dit-digits", "--random-init", "--steps", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    ratio = float(re.search(r"= ([0-9.]+)x the raw fp32 weights", r.stdout).group(1))
    assert ratio <= 1.1 and "worst parity" in r.stdout  # issue 17; 1.101 before shared_constants
    assert load_manifest(out).sampler["steps"] == 3
    r = _cli("--model", "dit-digits", "--random-init", "--steps", "3", "--out", str(out))
    assert r.returncode == 0 and "reuse:" in r.stdout


def test_cli_refuses_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = _cli("--model", "dit-digits", "--random-init", "--steps", "3", "--out", str(tmp_path))
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "not an export folder" in err[0]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_tensorrt_engines_need_a_check_handed_in(tmp_path):
    """Export builds engines but never samples: the engine check (which runs the loop) comes from
    the caller, and engines without one are refused before any work."""
    from export.onnx_export import export_model

    with pytest.raises(ValueError, match="check_engines"):
        export_model(object(), "w", None, None, tmp_path / "e", trt_precision="fp16")


def test_shared_constants_keep_one_node_per_value(exported):
    """Repeated Constant nodes (the exporter's 0, 1, axes, LayerNorm ones) become one per value;
    the graph computes the same; every exported graph holds each constant value once."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.onnx_export import shared_constants

    one = lambda out: helper.make_node("Constant", [], [out], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    two = helper.make_node("Constant", [], ["c2"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0]))
    nodes = [one("c0"), helper.make_node("Add", ["x", "c0"], ["a"]), one("c1"), two,
             helper.make_node("Add", ["a", "c1"], ["b"]), helper.make_node("Mul", ["b", "c2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.arange(3, dtype=np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    shared_constants(model)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Constant", "Add", "Constant", "Add", "Mul"]
    assert list(model.graph.node[3].input) == ["a", "c0"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(after, (x + 2) * 2)
    out, _ = exported
    for path in out.glob("*.onnx"):
        g = onnx.load(str(path), load_external_data=False).graph
        values = [n.attribute[0].SerializeToString() for n in g.node if n.op_type == "Constant"]
        assert len(values) == len(set(values)), path.name



def test_trt_block_profiles_one_per_pruned_count(exported):
    """A block graph takes all N tokens; a pruned module's index count k is its own axis: one
    profile per pruned count (every combination when a block prunes two modules), none to build
    when the export prunes nothing."""
    from export.trt import _profiles, pruned_axes

    m = load_manifest(exported[0])
    arts = m.data["artefacts"]
    rp = arts["block.1.rp"]
    assert pruned_axes(rp) == ["n_mlp_1"] and m.token_counts == [16, 8, 4]
    profs = _profiles(rp, m.token_counts, max_batch=8)
    assert [(p["n"], p["axes"]) for p in profs] == [(None, {"n_mlp_1": 8}), (None, {"n_mlp_1": 4})]
    assert profs[1]["shapes"]["idx.mlp.1"] == [[1, 4], [8, 4], [8, 4]]
    assert profs[1]["shapes"]["tokens"] == profs[1]["shapes"]["cache.mlp.1"] == [[1, 16, 32], [8, 16, 32], [8, 16, 32]]
    whole = _profiles(arts["step.0-1.rr"], m.token_counts, 8)  # a whole step: one profile
    assert len(whole) == 1 and "axes" not in whole[0] and whole[0]["n"] is None
    assert whole[0]["shapes"]["x"] == [[1, 4, 8, 8], [8, 4, 8, 8], [8, 4, 8, 8]]
    assert _profiles(rp, [16], 8) == []  # a full-only export: no pruned count, no engine
    pp = {"inputs": [{"name": "tokens", "shape": ["B", 16, 32]}, {"name": "idx.attn.0", "shape": ["B", "n_attn_0"]},
                     {"name": "idx.mlp.0", "shape": ["B", "n_mlp_0"]}]}
    assert [p["axes"] for p in _profiles(pp, [16, 8, 4], 2)] == [
        {"n_attn_0": a, "n_mlp_0": b} for a in (8, 4) for b in (8, 4)]
    # a pruned step over every layer: one axis per layer, too many combinations for engine profiles
    step = {"inputs": [{"name": "tokens", "shape": ["B", 16, 32]}]
            + [{"name": f"idx.mlp.{l}", "shape": ["B", f"n_mlp_{l}"]} for l in range(12)]}
    assert _profiles(step, [16, 8], 2) != [] and _profiles(step, [16, 8, 4], 2) == []  # 1 and 4096 combinations
    many = list(range(100, 13, -1))  # 87 pruned counts, as ToCa's DiT-S/2 schedule has: a one-layer block keeps them all
    one = {"inputs": [{"name": "tokens", "shape": ["B", 101, 32]}, {"name": "idx.mlp.3", "shape": ["B", "n_mlp_3"]}]}
    assert [p["axes"]["n_mlp_3"] for p in _profiles(one, [101] + many, 2)] == many
    video = {"inputs": [{"name": "tokens", "shape": ["B", "N", 32]}, {"name": "idx.mlp.0", "shape": ["B", "n_mlp_0"]}]}
    assert [p["axes"]["n_mlp_0"] for p in _profiles(video, [24, 12, 6], 2, video={"N": 24})] == [12, 6]


def test_trt_manifest_lists_block_engines(exported, tmp_path, monkeypatch):
    """build_engines' bookkeeping without TensorRT (the build itself stubbed): every block graph
    with a count to build for gets an engine entry with its profiles, next to the module engines."""
    import export.trt as trt_mod

    class FakeTrt:
        __version__ = "10.0.0"

        class BuilderFlag:  # TensorRT 10's weak-typing flags (11 has none)
            FP16, BF16 = "fp16", "bf16"

        class Logger:
            WARNING = 0

            def __init__(self, level):
                pass

        @staticmethod
        def Builder(logger):
            return None

    built = []
    monkeypatch.setattr(trt_mod, "availability", lambda: (FakeTrt, "Fake GPU", ""))
    monkeypatch.setattr(trt_mod, "_build_one", lambda trt, b, lg, path, profiles, *a: built.append(path.name) or b"plan")
    out = _copy(exported, tmp_path)
    data = load_manifest(out).data
    section = trt_mod.build_engines(out, data, "fp16", max_batch=4, echo=lambda s: None)
    assert set(section["engines"]) == set(data["artefacts"]) and len(built) == len(data["artefacts"])
    rp = section["engines"]["block.0.rp"]
    assert [p["axes"] for p in rp["profiles"]] == [{"n_mlp_0": 8}, {"n_mlp_0": 4}]
    assert rp["file"].endswith("block.0.rp.fp16.plan") and (out / rp["file"]).read_bytes() == b"plan"
    assert len(section["engines"]["attn.0"]["profiles"]) == 3
    # A full-only export: the pruned block patterns get no engine (the runtime runs them module by module).
    data = dict(data, token_counts=[16])
    section = trt_mod.build_engines(out, data, "fp16", max_batch=4, echo=lambda s: None)
    assert "block.0.rp" not in section["engines"] and "block.0.ff" in section["engines"]


def test_attributes_that_restate_their_default_are_dropped():
    """Gemm's alpha = beta = 1 and transA = 0 are the defaults (absent means default): dropped;
    transB = 1 and a non-default alpha stay; a node of another domain is left as it is."""
    import onnx
    from onnx import TensorProto, helper

    from export.onnx_export import default_attributes_dropped

    nodes = [helper.make_node("Gemm", ["a", "b"], ["c"], alpha=1.0, beta=1.0, transA=0, transB=1),
             helper.make_node("Gemm", ["a", "b"], ["d"], alpha=2.0),
             helper.make_node("FusedMatMul", ["a", "b"], ["e"], domain="com.microsoft", alpha=1.0)]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in "abcde"]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:2], io[2:]), opset_imports=[helper.make_opsetid("", 17)])
    out = default_attributes_dropped(model).graph.node
    assert [[(a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute] for n in out] == [
        [("transB", 1)], [("alpha", 2.0)], [("alpha", 1.0)]]
    # the default domain spelled "ai.onnx": defaults of its opset (Softmax's axis is -1 from 13, 1 before)
    soft = helper.make_node("Softmax", ["a"], ["b"], axis=1)
    for version, kept in ((17, [1]), (11, [])):
        model = helper.make_model(helper.make_graph([soft], "g", io[:1], io[1:2]),
                                  opset_imports=[helper.make_opsetid("ai.onnx", version)])
        assert [a.i for a in default_attributes_dropped(model).graph.node[0].attribute] == kept


def test_the_dynamo_exporter_exports_module_and_block_graphs(tiny_model, tmp_path):
    """`--exporter dynamo`: graphs whose forwards take `*inputs` (embed, the blocks) get their
    dynamic axes by position (a dict keyed by the graph's input names failed in torch.export), and
    the export's own parity check passes for every graph, the pruned step over both layers too."""
    from soda.blocks import Block

    res, _ = _export(tiny_model, tmp_path / "e", exporter="dynamo", blocks=[Block(0, 1, "rp"), Block(0, 1, "kk", step=True)])
    m = load_manifest(tmp_path / "e")
    assert {"embed", "block.0-1.rp", "step.0-1.kk"} <= set(m.artefacts) and m.data["opset"] >= 18
    # the batch and the pruned counts stay dynamic (the parity check runs at the traced batch only)
    g = onnx.load(str(tmp_path / "e" / "block.0-1.rp.onnx"), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in g.input}
    assert isinstance(dims["tokens"][0], str) and dims["tokens"][1:] == [16, 32]
    assert all(isinstance(d, str) for d in dims["idx.mlp.0"] + dims["idx.mlp.1"]), dims
