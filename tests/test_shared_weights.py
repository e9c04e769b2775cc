"""One copy of the weights for every onnxruntime session of a folder (runtime.shared_weights).

The manifest says where each graph's initializers lie in weights.bin (checked here against the
graphs' own external-data fields); OrtBackend hands every session the same OrtValue per stored
tensor, so a layer's per-module and block graphs read one copy. That the sessions really read the
handed-in values (and not their own copy from the file) is shown by handing in a scaled copy of
the weights: the outputs change. The process-RSS figures are measured in docs/runtime.md
"Memory" (a test cannot hold RSS steady on a shared machine).
"""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from soda.sampling import SamplerConfig

SAMPLER = SamplerConfig("ddim", 6, 4.0, 3)


@pytest.fixture(scope="module")
def folder(strong_tiny_model, tmp_path_factory):
    """A toca export: per-module graphs, block graphs and pruned patterns at two token counts."""
    from export.onnx_export import export_model
    from soda.policies import ScheduleSpec, make_schedule

    model = strong_tiny_model
    spec = ScheduleSpec.for_model(model.config, SAMPLER.kind, SAMPLER.steps)
    schedule = make_schedule("toca", spec)
    out = tmp_path_factory.mktemp("shared") / "tiny"
    export_model(model, "random-init-strong", schedule, SAMPLER, out, progress=False, echo=lambda *a: None)
    return out


def _generate(backend, engines, policy="toca"):
    from runtime.engines import resolve_schedule
    from soda.generate import generate

    schedule = resolve_schedule(engines, SAMPLER, policy, None, None)
    x, _ = generate(backend, engines.config, SAMPLER, schedule, np.array([1, 7]), 3)
    return x


def test_manifest_says_where_every_initializer_lies(folder):
    import onnx

    from export.manifest import load_manifest

    m = load_manifest(folder)
    size = (folder / "weights.bin").stat().st_size
    for name, art in m.artefacts.items():
        proto = onnx.load(str(folder / art.file), load_external_data=False)
        want = []
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
                want.append((t.name, int(info["offset"]), int(info["length"]), dtype, tuple(t.dims)))
        assert list(art.initializers) == want and want, name
        assert all(re.fullmatch(r"w\d+", n) for n, *_ in want), name  # short names (export.onnx_export.compact_names)
        assert all(o + k <= size for _, o, k, _, _ in want)


def test_sessions_share_one_copy_and_match_private_weights(folder):
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend

    engines = open_engines(folder)
    shared = OrtBackend(engines, device="cpu", threads=1)
    own = OrtBackend(engines, device="cpu", threads=1, share_weights=False)
    assert own.shared is None and shared.shared is not None
    got, ref = _generate(shared, engines), _generate(own, engines)
    # Without prepacking the CPU GEMMs may round differently: equal to float32 rounding, not bitwise.
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
    opened = [n for n in shared.sessions]
    assert any(n.startswith("block.") for n in opened)  # the block sessions of the schedule's patterns too
    handed = sum(len(engines.manifest.artefacts[n].initializers) for n in opened)
    assert shared.shared.requests == handed
    # A layer's weights are read by its module graphs and its block graphs: each tensor made once.
    distinct = {(o, k, d, s) for n in opened for _, o, k, d, s in engines.manifest.artefacts[n].initializers}
    assert len(shared.shared) == len(distinct) < handed
    assert shared.shared.nbytes <= engines.manifest.data["weights_bytes"]


def test_shared_weights_are_prepacked_only_in_small_folders(folder, monkeypatch):
    """Prepacking gives each session a packed copy of its GEMM weights: on for private weights and
    for shared ones up to PREPACK_MAX_BYTES of weights, off above (and when asked). Unpacked
    shared weights compute bit for bit what unpacked private ones do."""
    from runtime import ort_backend
    from runtime.engines import open_engines

    engines = open_engines(folder)
    size = (folder / "weights.bin").stat().st_size
    small = ort_backend.OrtBackend(engines, device="cpu", threads=1)
    assert small.shared is not None and small.prepack
    assert ort_backend.OrtBackend(engines, device="cpu", threads=1, share_weights=False).prepack
    monkeypatch.setattr(ort_backend, "PREPACK_MAX_BYTES", size - 1)
    big = ort_backend.OrtBackend(engines, device="cpu", threads=1)
    assert big.shared is not None and not big.prepack
    monkeypatch.setattr(ort_backend, "PREPACK_MAX_BYTES", size)
    assert ort_backend.OrtBackend(engines, device="cpu", threads=1).prepack
    assert not ort_backend.OrtBackend(engines, device="cpu", threads=1, prepack=False).prepack

    def packs(backend) -> set[bool]:  # what each session was told (no entry: onnxruntime's default, on)
        told = set()
        for session in backend.sessions.values():
            try:
                told.add(session.get_session_options().get_session_config_entry("session.disable_prepacking") != "1")
            except RuntimeError:
                told.add(True)
        return told

    assert packs(small) == {True} and packs(big) == {False}
    own = ort_backend.OrtBackend(engines, device="cpu", threads=1, share_weights=False, prepack=False)
    unpacked = _generate(big, engines)
    assert np.array_equal(unpacked, _generate(own, engines))
    packed = _generate(small, engines)
    assert np.max(np.abs(packed - unpacked)) <= 1e-5 * np.max(np.abs(unpacked))


def test_cpu_sessions_take_their_memory_from_one_arena(folder):
    """By default every CPU session asks for onnxruntime's environment arena (registered once per
    process); the samples are bit for bit those of sessions with arenas of their own. (What it
    saves is resident memory, measured in docs/runtime.md "Memory".)"""
    from runtime import ort_backend
    from runtime.engines import open_engines

    engines = open_engines(folder)

    def asks(backend) -> set[str]:
        told = set()
        for session in backend.sessions.values():
            try:
                told.add(session.get_session_options().get_session_config_entry("session.use_env_allocators"))
            except RuntimeError:  # not set: the session's own arena
                told.add("0")
        return told

    one = ort_backend.OrtBackend(engines, device="cpu", threads=1)
    own = ort_backend.OrtBackend(engines, device="cpu", threads=1, shared_arena=False)
    assert one.shared_arena and asks(one) == {"1"} and asks(own) == {"0"}
    assert ort_backend._ARENA_REGISTERED
    assert np.array_equal(_generate(one, engines), _generate(own, engines))
    assert asks(one) == {"1"}  # the block sessions the schedule opened too


def test_sessions_read_the_shared_values(folder, tmp_path):
    """A session given a scaled copy of the weights computes with it: the values are used in place
    of the graph's own external data (were they ignored, both outputs would be equal)."""
    import onnxruntime as ort

    from runtime.engines import open_engines
    from runtime.ort_backend import session_options
    from runtime.shared_weights import SharedWeights

    engines = open_engines(folder)
    art = engines.manifest.artefacts["mlp.0"]
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal([2 if d == "B" else 16 if isinstance(d, str) else d for d in t.shape])
             .astype(np.float32) for t in art.inputs}

    def run(weights):
        options = session_options(1, no_prepacking=True)
        keep = None
        if weights is not None:
            keep = SharedWeights(weights)
            keep.add_to(options, art.initializers)
        out = ort.InferenceSession(str(folder / art.file), options, providers=["CPUExecutionProvider"]).run(None, feeds)
        return out[0], keep

    plain, _ = run(None)
    same, shared = run(folder / "weights.bin")
    assert np.array_equal(same, plain) and len(shared) == len(art.initializers)
    (tmp_path / "other").mkdir()
    scaled = np.fromfile(folder / "weights.bin", dtype=np.float32) * np.float32(1.5)
    scaled.tofile(tmp_path / "other" / "weights.bin")
    changed, _ = run(tmp_path / "other" / "weights.bin")
    assert not np.allclose(changed, plain, rtol=1e-3)


def test_a_manifest_that_reads_past_the_weights_is_one_error(folder, tmp_path):
    from runtime.shared_weights import SharedWeights
    from soda.errors import UserError

    short = tmp_path / "weights.bin"
    shutil.copyfile(folder / "weights.bin", short)
    size = short.stat().st_size
    with pytest.raises(UserError, match="does not hold a float32 \\[4\\] at bytes"):
        SharedWeights(short).initializers([("w", size - 8, 16, "float32", (4,))])
    with pytest.raises(UserError, match="re-run `cli.py export`"):
        SharedWeights(short).initializers([("w", 0, 12, "float32", (4,))])  # length and shape disagree


def test_folder_without_initializer_table_loads_private_copies(folder, tmp_path):
    """An export made before the table: each session loads its own weights, as before."""
    import json

    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend

    old = tmp_path / "old"
    shutil.copytree(folder, old)
    data = json.loads((old / "manifest.json").read_text())
    for a in data["artefacts"].values():
        a.pop("initializers")
    (old / "manifest.json").write_text(json.dumps(data))
    engines = open_engines(old)
    backend = OrtBackend(engines, device="cpu", threads=1)
    assert backend.shared is None
    ref = _generate(OrtBackend(open_engines(folder), device="cpu", threads=1, share_weights=False), engines)
    assert np.array_equal(_generate(backend, engines), ref)


def test_cuda_sessions_share_device_weights(folder):
    """The CUDA path uploads each tensor once (OrtValue.ortvalue_from_numpy(a, 'cuda', id)) and
    hands it to every session with SessionOptions.add_initializer, which the CUDA provider uses
    in place: the samples equal sessions that load their own weights. Runs where onnxruntime-gpu,
    CuPy and a GPU are (not on this machine or CI)."""
    import onnxruntime as ort

    from runtime.device import cuda_availability
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDA provider ({', '.join(ort.get_available_providers())})")
    cupy, why = cuda_availability()
    if cupy is None:
        pytest.skip(why)

    engines = open_engines(folder)
    shared = OrtBackend(engines, device="cuda")
    own = OrtBackend(engines, device="cuda", share_weights=False)
    assert shared.shared.device_type == "cuda"
    got, ref = _generate(shared, engines), _generate(own, engines)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_a_reused_executor_runs_the_block_and_step_graphs_as_a_new_one(folder):
    """One executor per schedule across generations (`generate(executor=)`) on the block path:
    ToCa's full steps with scores, its pruned blocks (token choices made at the step start),
    reuse steps as one step graph; and full compute as the lean step graph. Every generation
    equals a fresh executor's, FLOPs included, and the executor holds no caches in between."""
    from runtime.engines import open_engines, resolve_schedule
    from runtime.ort_backend import OrtBackend
    from soda.generate import generate, make_executor

    engines = open_engines(folder)
    backend = OrtBackend(engines, device="cpu", threads=1)
    assert backend.blocks
    for policy in ("toca", "full"):
        schedule = resolve_schedule(engines, SAMPLER, policy, None, None)
        executor = make_executor(backend, engines.config, schedule)
        for labels, seed in (([1, 7], 3), ([2, 5], 4), ([1, 7], 3)):
            x, stats = generate(backend, engines.config, SAMPLER, schedule, np.array(labels), seed, executor=executor)
            assert not executor.cache and executor.last_tokens is None and executor.flops_done == 0
            fresh, fresh_stats = generate(backend, engines.config, SAMPLER, schedule, np.array(labels), seed)
            assert np.array_equal(x, fresh) and stats.flops == fresh_stats.flops, policy
        assert any(name.startswith("step.") for name in backend.sessions)  # the step graphs ran
