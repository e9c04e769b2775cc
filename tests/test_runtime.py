"""The deploy runtime: exported graphs + numpy loop == the PyTorch reference, for every policy.

Parity is held to 1e-4 of the max magnitude, for the final samples AND for the model output
of every step (fp32 ORT vs torch; both run the same numpy stitching loop, schedules and
selectors). The models are random-init with STRONG adaLN and final-layer weights (std 1, not
the 0.02 of `randomize_zero_init`): with weak gates the blocks barely reach the output and a
0.1% error in a module would pass unseen; with these, it fails the tolerance 40-500x over.
The torch-free claim is tested for real in a subprocess where `import torch` and
`import onnx` raise ImportError.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soda.errors import UserError
from soda.sampling import SamplerConfig

from conftest import strengthen

ROOT = Path(__file__).resolve().parent.parent
REL_TOL = 1e-4
STEPS = 10
BASELINES = ("full", "fora", "toca", "duca", "taylorseer")


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / np.max(np.abs(ref)))


class Recording:
    """A backend wrapper that keeps every model output (one per step) for per-step parity."""

    def __init__(self, backend):
        self.backend, self.outputs = backend, []
        self.specs, self.modules, self.num_layers = backend.specs, backend.modules, backend.num_layers

    def prepare(self, *a):
        return self.backend.prepare(*a)

    def embed(self, *a):
        return self.backend.embed(*a)

    def modulation(self, *a):
        return self.backend.modulation(*a)

    def module(self, *a, **kw):
        return self.backend.module(*a, **kw)

    def final(self, *a):
        out = self.backend.final(*a)
        self.outputs.append(out)
        return out


def _export(model, weights, sampler_cfg, out, schedule=None):
    from export.onnx_export import export_model
    from soda.policies import ScheduleSpec, make_schedule

    spec = ScheduleSpec.for_model(model.config, sampler_cfg.kind, sampler_cfg.steps)
    schedule = schedule or make_schedule("full", spec)
    export_model(model, weights, schedule, sampler_cfg, out, progress=False, echo=lambda *a: None)
    return out


def _soda_schedule(model, sampler_cfg, speedup=2.0, policy="soda"):
    """A real SODA (or soda-forecast) schedule: profile the model (2 calibration generations), then plan."""
    from soda.policies import ScheduleSpec, make_schedule
    from soda.profile import profile

    prof = profile(model, sampler_cfg, samples=2, seed=0)
    spec = ScheduleSpec.for_model(model.config, sampler_cfg.kind, sampler_cfg.steps)
    return make_schedule(policy, spec, speedup=speedup, profile=prof)


# --- the tiny random-init DiT (python API) ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sampler():
    return SamplerConfig("ddim", STEPS, 4.0, 3)


@pytest.fixture(scope="module")
def strong_tiny(strong_tiny_model):
    return strong_tiny_model


@pytest.fixture(scope="module")
def tiny_soda(strong_tiny, tiny_sampler):
    return _soda_schedule(strong_tiny, tiny_sampler)


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory, strong_tiny, tiny_sampler, tiny_soda):
    out = tmp_path_factory.mktemp("rt") / "tiny_engines"
    return _export(strong_tiny, "random-init-strong", tiny_sampler, out, tiny_soda)


@pytest.fixture(scope="module")
def tiny_backends(tiny_engines, strong_tiny):
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.torch_backend import TorchBackend

    engines = open_engines(tiny_engines)
    return engines, OrtBackend(engines, threads=1), TorchBackend(strong_tiny)


def _parity(engines, ort_backend, torch_backend, sampler_cfg, schedule, labels=(1, 7), seed=3):
    """Worst relative error over the final samples and every step's model output."""
    from soda.generate import generate

    ys = np.array(labels)
    got_rec, ref_rec = Recording(ort_backend), Recording(torch_backend)
    got, stats_ort = generate(got_rec, engines.config, sampler_cfg, schedule, ys, seed)
    ref, stats_ref = generate(ref_rec, engines.config, sampler_cfg, schedule, ys, seed)
    assert stats_ort.flops == stats_ref.flops
    assert len(got_rec.outputs) == len(ref_rec.outputs) == sampler_cfg.steps
    per_step = max(_rel_err(a, b) for a, b in zip(got_rec.outputs, ref_rec.outputs))
    return max(_rel_err(got, ref), per_step)


# The exported SODA schedule is for ddim (schedules are per sampler): no soda-ddpm case.
@pytest.mark.parametrize("policy, kind", [(p, k) for p in BASELINES for k in ("ddim", "ddpm")] + [("soda", "ddim")])
def test_tiny_runtime_equals_torch_reference(tiny_backends, tiny_sampler, policy, kind):
    from runtime.engines import resolve_schedule

    engines, ort_b, torch_b = tiny_backends
    sampler_cfg = engines.sampler_with(kind=kind)
    schedule = resolve_schedule(engines, sampler_cfg, policy)
    if policy != "full":
        assert schedule.count_kinds()["full"] < STEPS  # the policy really caches
    assert _parity(engines, ort_b, torch_b, sampler_cfg, schedule) <= REL_TOL


def test_tiny_runtime_equals_torch_for_soda_forecast(tiny_backends, tiny_sampler, strong_tiny):
    """Forecasts and prune-on-forecast actions run in the shared loop: onnxruntime equals torch."""
    from soda.schedule import forecast_order

    engines, ort_b, torch_b = tiny_backends
    schedule = _soda_schedule(strong_tiny, tiny_sampler, 2.0, "soda-forecast")
    assert _parity(engines, ort_b, torch_b, tiny_sampler, schedule) <= REL_TOL
    # A hand-made schedule with every forecast kind, pruned on a forecast included.
    from soda.schedule import FULL, REUSE, Schedule, forecast, prune

    L = engines.config.depth
    grid = lambda row: [list(row) for _ in range(L)]  # noqa: E731
    steps = [grid([FULL, FULL]), grid([FULL, FULL]), grid([forecast(1), prune(0.5, 1)]), grid([FULL, FULL]),
             grid([forecast(2), prune(0.25, 2)]), grid([REUSE, forecast(2)]), grid([FULL, FULL]),
             grid([prune(0.75, 1), forecast(1)]), grid([forecast(4), prune(0.5)]), grid([FULL, FULL])]
    hand = Schedule("hand", engines.config.name, engines.config.hash(), "ddim", STEPS, list(engines.modules), L,
                    steps, selector="feature-mean").validate()
    assert max(forecast_order(a) for step in hand.steps for row in step for a in row) == 4
    assert _parity(engines, ort_b, torch_b, tiny_sampler, hand) <= REL_TOL


def test_tiny_prune_with_feature_mean(tiny_backends, tiny_sampler):
    """A hand-made schedule with prune actions of several rates and a skip step."""
    from soda.schedule import FULL, REUSE, Schedule, prune

    engines, ort_b, torch_b = tiny_backends
    cfg = engines.config
    L = cfg.depth
    grids = {"full": [[FULL, FULL]] * L, "prune": [[prune(0.5), prune(0.25)]] * L,
             "mixed": [[REUSE, prune(0.75)]] * L}
    order = ["full", "prune", "mixed", "skip", "prune", "full", "mixed", "prune", "skip", "prune"]
    steps = ["skip" if k == "skip" else [list(r) for r in grids[k]] for k in order]
    sched = Schedule("hand", cfg.name, cfg.hash(), "ddim", STEPS, ["attn", "mlp"], L, steps,
                     selector="feature-mean").validate()
    assert _parity(engines, ort_b, torch_b, tiny_sampler, sched) <= REL_TOL


def test_sessions_do_not_spin_and_say_their_provider(tiny_backends):
    _, ort_b, _ = tiny_backends
    from runtime.ort_backend import session_options

    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    session = ort_b.sessions["attn.0"]
    assert ort_b.provider == session.get_providers()[0]
    assert ort_b.provider in ort_b.describe()


# --- torch-free, for real ----------------------------------------------------------------------
BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnx'):
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, _Block())
for _m in [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')]:
    del sys.modules[_m]
sys.path.insert(0, {root!r})
sys.argv = ['cli.py'] + {args!r}
import runtime, runtime.run, runtime.ort_backend
try:
    import torch
    raise SystemExit('torch imported despite the blocker')
except ImportError:
    pass
import cli
try:
    cli.main()
finally:
    leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx'))
    assert not leaked, leaked
"""


def test_runtime_package_never_imports_torch_or_onnx():
    """Not even lazily inside a function: `runtime/` is what a deploy machine without torch runs."""
    import ast

    heavy = {"export.onnx_export", "export.graphs", "export.weights_store", "export.granularity", "soda.torch_backend", "soda.profile", "soda.bench_runtime", "soda.models.dit",
             "soda.models.loading", "soda.pipeline"}
    found = []
    for path in sorted((ROOT / "runtime").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.name}: {n}" for n in names if n in heavy or n.split(".")[0] in {"torch", "onnx"}
                      or any(n.startswith(h + ".") for h in heavy)]
    assert not found, found


def _run_blocked(args: list[str]) -> subprocess.CompletedProcess:
    code = BLOCKER.format(root=str(ROOT), args=args)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("policy", ["toca", "soda"])
def test_cli_run_works_without_torch(tiny_engines, tiny_backends, tmp_path, policy):
    from runtime.engines import resolve_schedule
    from soda.generate import generate

    engines, ort_b, _ = tiny_backends
    latents = tmp_path / "x.npy"
    proc = _run_blocked(["run", "--engines", str(tiny_engines), "--policy", policy, "--labels", "1,7", "--seed", "3",
                         "--save-latents", str(latents), "--out", str(tmp_path / "x.png")])
    assert proc.returncode == 0, proc.stderr
    assert "CPUExecutionProvider" in proc.stdout
    want, _ = generate(ort_b, engines.config, engines.sampler, resolve_schedule(engines, engines.sampler, policy),
                       np.array([1, 7]), 3)
    np.testing.assert_allclose(np.load(latents), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert (tmp_path / "x.png").is_file()


# --- bad input: one line, exit 2 -------------------------------------------------------------
def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_errors_are_one_line(tiny_engines, tmp_path):
    from soda.policies import ScheduleSpec, make_schedule
    from soda.models.config import get_config

    _one_line_error(_cli(["run", "--engines", str(tmp_path / "nope"), "--labels", "1"]), "not found")
    (tmp_path / "empty").mkdir()
    _one_line_error(_cli(["run", "--engines", str(tmp_path / "empty"), "--labels", "1"]), "manifest.json")
    other = make_schedule("full", ScheduleSpec.for_model(get_config("dit-s-2"), "ddim", STEPS))
    other.save(tmp_path / "other.json")
    _one_line_error(_cli(["run", "--engines", str(tiny_engines), "--schedule", str(tmp_path / "other.json"),
                          "--labels", "1"]), "dit-s-2")
    _one_line_error(_cli(["run", "--engines", str(tiny_engines), "--labels", "1", "--steps", "7"]), "ddim-10")
    _one_line_error(_cli(["run", "--engines", str(tiny_engines), "--labels", "1", "--policy", "soda",
                          "--speedup", "3"]), "--speedup")
    # a tampered graph: same size, other bytes
    bad = tmp_path / "bad"
    shutil.copytree(tiny_engines, bad)
    blob = bytearray((bad / "mlp.1.onnx").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "mlp.1.onnx").write_bytes(bytes(blob))
    _one_line_error(_cli(["run", "--engines", str(bad), "--labels", "1"]), "mlp.1.onnx")


def test_manifest_shapes_dtypes_and_token_counts_are_checked(tiny_engines, tmp_path):
    """Fields written at export are checked on load, not just carried along."""
    import json

    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend

    def tampered(change) -> Path:
        folder = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_engines, folder)
        data = json.loads((folder / "manifest.json").read_text())
        change(data)
        (folder / "manifest.json").write_text(json.dumps(data))
        return folder

    def counts(d):
        d["token_counts"] = d["token_counts"][:1]

    def shape(d):
        d["artefacts"]["attn.1"]["inputs"][0]["shape"][2] += 1

    def dtype(d):
        d["artefacts"]["embed"]["inputs"][1]["dtype"] = "float32"

    def out_shape(d):
        d["artefacts"]["final"]["outputs"][0]["shape"][1] = 99

    with pytest.raises(UserError, match="lists token counts"):
        open_engines(tampered(counts))
    for change, where in ((shape, "attn.1:tokens"), (dtype, "embed:t"), (out_shape, "final:out")):
        with pytest.raises(UserError, match=f"manifest.json says {where} is"):
            OrtBackend(open_engines(tampered(change)))
    OrtBackend(open_engines(tampered(lambda d: None)))  # untouched: opens


def test_exported_schedule_must_be_soda_for_policy_soda(tmp_path, tiny_model):
    from runtime.engines import open_engines, resolve_schedule

    out = _export(tiny_model, "random-init-0", SamplerConfig("ddim", 4, 4.0, 3), tmp_path / "full_engines")
    engines = open_engines(out)
    with pytest.raises(UserError, match="not a soda one"):
        resolve_schedule(engines, engines.sampler, "soda")
    assert resolve_schedule(engines, engines.sampler, None).policy == "full"


# --- dit-digits through the two CLIs ---------------------------------------------------------
WEIGHTS = ROOT / "soda" / "assets" / "dit_digits.safetensors"


@pytest.fixture(scope="module", params=["shipped", "strong-random"])
def digits_engines(request, tmp_path_factory):
    from soda.models.loading import load_model

    if request.param == "shipped" and not WEIGHTS.is_file():
        pytest.skip(f"shipped weights {WEIGHTS.name} not in this checkout")
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("digits")
    ckpt = WEIGHTS
    if request.param != "shipped":  # strong random weights, given to both CLIs as a checkpoint
        model, _ = load_model("dit-digits", random_init=True)
        ckpt = folder / "strong.safetensors"
        save_file({k: v.contiguous() for k, v in strengthen(model).state_dict().items()}, str(ckpt))
    model, weights = load_model("dit-digits", ckpt)
    sampler_cfg = SamplerConfig("ddim", STEPS, 4.0, None)  # what `cli.py sample` uses for 1 channel
    out = folder / "engines"
    _export(model, weights, sampler_cfg, out, _soda_schedule(model, sampler_cfg, 2.0))
    return ckpt, out


@pytest.mark.parametrize("policy", [*BASELINES, "soda", "soda-forecast"])
def test_digits_cli_run_equals_cli_sample(digits_engines, policy, tmp_path):
    from click.testing import CliRunner

    import cli

    ckpt, engines = digits_engines
    labels = "0,3,8"
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(5).standard_normal((3, 1, 16, 16)).astype(np.float32))
    common = ["--labels", labels, "--noise", str(noise), "--out", str(tmp_path / "x.png")]
    pol = ["--schedule", str(engines / "schedule.json")] if policy == "soda" else ["--policy", policy]
    run_pol = ["--policy", policy]
    if policy == "soda-forecast":  # planned here from a 2-generation profile; both CLIs run its file
        from soda.models.loading import load_model

        sched_file = tmp_path / "soda-forecast.json"
        _soda_schedule(load_model("dit-digits", ckpt)[0], SamplerConfig("ddim", STEPS, 4.0, None), 2.0,
                       policy).save(sched_file)
        pol = run_pol = ["--schedule", str(sched_file)]
    runner = CliRunner()
    ref = runner.invoke(cli.cli, ["sample", "--model", "dit-digits", "--ckpt", str(ckpt),
                                  "--steps", str(STEPS), "--cfg-scale", "4", *pol, *common,
                                  "--save-latents", str(tmp_path / "ref.npy")], catch_exceptions=False)
    assert ref.exit_code == 0, ref.output
    got = runner.invoke(cli.cli, ["run", "--engines", str(engines), *run_pol, *common,
                                  "--save-latents", str(tmp_path / "got.npy")], catch_exceptions=False)
    assert got.exit_code == 0, got.output
    a, b = np.load(tmp_path / "got.npy"), np.load(tmp_path / "ref.npy")
    assert _rel_err(a, b) <= REL_TOL
    # Same schedule on both sides: the FLOPs speedups printed must agree too.
    speed = [line.rsplit("FLOPs speedup", 1)[1] for line in (ref.output + got.output).splitlines() if "FLOPs speedup" in line]
    assert len(speed) == 2 and speed[0] == speed[1]


# --- IO binding (the CUDA code path, driven on the CPU with numpy buffers) ----------------------
@pytest.mark.parametrize("policy", ["toca", "soda"])
def test_io_binding_path_equals_plain_run(tiny_backends, policy):
    """`OrtBackend._run_bound` is the CUDA path's code: inputs and preallocated outputs bound by
    pointer, output shapes resolved from the manifest's named axes. With numpy buffers on the
    CPU provider it must give exactly what `session.run` gives."""
    from runtime.engines import resolve_schedule
    from runtime.ort_backend import OrtBackend
    from soda.generate import generate

    engines, plain, _ = tiny_backends
    bound = OrtBackend(engines, device="cpu", threads=1, io_binding=True)
    assert bound._run == bound._run_bound and plain._run == plain._run_cpu
    schedule = resolve_schedule(engines, engines.sampler, policy)
    ys = np.array([1, 7])
    got_rec = Recording(bound)
    got, s1 = generate(got_rec, engines.config, engines.sampler, schedule, ys, 3)
    ref, s2 = generate(plain, engines.config, engines.sampler, schedule, ys, 3)
    np.testing.assert_array_equal(got, ref)
    assert s1.flops == s2.flops


def test_io_binding_outputs_are_fresh_preallocated_arrays(tiny_backends):
    """Every call returns new output arrays of the declared shapes (the loop caches them: a
    reused buffer would overwrite a cache entry), pruned token counts included."""
    from runtime.ort_backend import OrtBackend

    engines, plain, _ = tiny_backends
    bound = OrtBackend(engines, device="cpu", threads=1, io_binding=True)
    cfg = engines.config
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((3, cfg.hidden_size)).astype(np.float32) for _ in engines.interface.spec("attn").args]
    for n in (cfg.num_tokens, 4):
        tokens = rng.standard_normal((3, n, cfg.hidden_size)).astype(np.float32)
        a = bound._run("attn.0", (tokens, *args))
        b = bound._run("attn.0", (tokens, *args))
        want = plain._run("attn.0", (tokens, *args))
        assert [x.shape for x in a] == [(3, n, cfg.hidden_size), (3, n)]
        assert all(x is not y and not np.shares_memory(x, y) for x, y in zip(a, b))
        for x, w in zip(a, want):
            np.testing.assert_array_equal(x, w)


def test_shapes_resolve_from_named_axes():
    from export.manifest import TensorSpec
    from runtime.device import named_dims, resolve_shape

    specs = [TensorSpec("tokens", ("B", "n", 32), "float32"), TensorSpec("caption", ("B", "L", 8), "float32")]
    dims = named_dims(specs, [np.zeros((4, 9, 32)), np.zeros((4, 6, 8))])
    assert dims == {"B": 4, "n": 9, "L": 6}
    assert resolve_shape(("B", "n", 32), dims) == (4, 9, 32)
    assert resolve_shape(("B", "T"), dims) is None  # an axis no input fixes: left to onnxruntime


def test_ort_cuda_device_resident(tiny_engines, tiny_backends):
    """On a GPU: the loop runs on CuPy arrays bound to the CUDA sessions, equal to the CPU run."""
    import onnxruntime as ort

    from runtime.device import cuda_availability

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDA provider ({', '.join(ort.get_available_providers())}): "
                    "the ORT-CUDA IO-binding path runs only on a GPU machine with onnxruntime-gpu")
    cupy, why = cuda_availability()
    if cupy is None:
        pytest.skip(why)
    from runtime.engines import resolve_schedule
    from runtime.ort_backend import OrtBackend
    from soda.generate import generate

    engines, plain, _ = tiny_backends
    gpu = OrtBackend(engines, device="cuda")
    schedule = resolve_schedule(engines, engines.sampler, "toca")
    got, _ = generate(gpu, engines.config, engines.sampler, schedule, np.array([1, 7]), 3)
    ref, _ = generate(plain, engines.config, engines.sampler, schedule, np.array([1, 7]), 3)
    assert _rel_err(got, ref) <= 1e-3  # cuBLAS may use TF32


# --- reduced-precision engine check (the comparison, driven with onnxruntime as the candidate) ---
def test_engine_check_on_recorded_activations(tiny_engines, tiny_backends):
    """Recorded activations are real (a generation's middle step, every graph), the pruned token
    counts are checked on token subsets, and a candidate 1% off is measured as such and would be
    refused at fp16's tolerance while an exact one passes."""
    from runtime.engine_check import TOLERANCE, compare, record_activations

    engines, plain, _ = tiny_backends
    records = record_activations(tiny_engines)
    assert set(records) == set(engines.graph_names())
    x = records["embed"][0]
    assert x.shape[0] == 2 and np.abs(x).max() > 0  # one label with CFG
    counts = engines.manifest.token_counts
    assert len(counts) > 1  # the SODA export prunes: several profiles per module engine
    art = engines.manifest.artefacts
    per_graph = lambda name: counts if "n" in art[name].inputs[0].shape else []  # noqa: E731 (as export/trt.py profiles)
    seen = []

    def exact(name, feed):
        seen.append((name, feed[0].shape))
        return plain._run(name, feed)

    errors = compare(records, engines.io, per_graph, plain._run, exact)
    assert max(errors.values()) == 0.0
    assert {shape[1] for name, shape in seen if name == "attn.0"} == set(counts)
    off = compare(records, engines.io, per_graph, plain._run,
                  lambda name, feed: [o * (1.01 if name == "mlp.1" else 1.0) for o in plain._run(name, feed)])
    assert off["mlp.1"] == pytest.approx(0.01, rel=1e-3) and off["attn.1"] == 0.0
    assert off["mlp.1"] <= TOLERANCE["fp16"] and not off["mlp.1"] * 3 <= TOLERANCE["fp16"]


def test_trt_engine_check_needs_tensorrt(tiny_engines):
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the tensorrt package is not installed here ({e}): check_trt_engines runs only where engines build")
    from runtime.device import cuda_availability

    cupy, why = cuda_availability()
    if cupy is None:
        pytest.skip(why)
    from export.trt import build_engines
    from export.manifest import load_manifest
    from runtime.engine_check import check_trt_engines

    section = build_engines(tiny_engines, load_manifest(tiny_engines).data, "fp16", echo=lambda s: None)
    checked = check_trt_engines(tiny_engines, section, "fp16", echo=lambda s: None)
    assert checked["check"]["worst"] <= checked["check"]["tolerance"]
    assert all(e["max_rel_err"] is not None for e in checked["engines"].values())


# --- TensorRT where it exists ----------------------------------------------------------------
def test_trt_backend_equals_ort(tmp_path, strong_tiny, tiny_sampler):
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the tensorrt package is not installed here ({e}); runtime/trt_backend.py is untested")
    from export.trt import gpu_name
    from runtime.device import cuda_availability

    if gpu_name() is None:
        pytest.skip("TensorRT is installed but no GPU was found")
    if cuda_availability()[0] is None:
        pytest.skip(cuda_availability()[1])
    from export.onnx_export import export_model
    from runtime.engines import open_engines, resolve_schedule
    from runtime.ort_backend import OrtBackend
    from runtime.engine_check import check_trt_engines
    from runtime.trt_backend import TrtBackend
    from soda.generate import generate
    from soda.policies import ScheduleSpec, make_schedule

    spec = ScheduleSpec.for_model(strong_tiny.config, "ddim", STEPS)
    export_model(strong_tiny, "random-init-0", make_schedule("toca", spec), tiny_sampler, tmp_path / "e",
                 trt_precision="fp32", progress=False, echo=lambda *a: None, check_engines=check_trt_engines)
    engines = open_engines(tmp_path / "e")
    schedule = resolve_schedule(engines, engines.sampler, None)
    ys = np.array([1, 7])
    trt_b = TrtBackend(engines)
    assert trt_b.blocks and not engines.manifest.trt["check"]["unchecked"]  # block and step engines, all checked
    got, _ = generate(trt_b, engines.config, engines.sampler, schedule, ys, 3)
    assert any(name.startswith(("block.", "step.")) for name in trt_b._engines)  # loaded on their first call
    ref, _ = generate(OrtBackend(engines), engines.config, engines.sampler, schedule, ys, 3)
    assert _rel_err(got, ref) <= 1e-3  # TF32 may be on in fp32 engines
    per_module, _ = generate(TrtBackend(engines, blocks=False), engines.config, engines.sampler, schedule, ys, 3)
    assert _rel_err(per_module, ref) <= 1e-3


# --- the benchmark's measuring function (numbers themselves: docs/runtime.md) -----------------
def test_interleaved_rows_report_flops_and_wall_speedups(tiny_backends, monkeypatch):
    """What `runtime_report` does with its loops: interleaved rounds, rows against the full one."""
    from runtime.engines import resolve_schedule
    from soda.flops import FlopsModel, schedule_flops
    from soda.generate import full_flops

    engines, ort_b, _ = tiny_backends
    sc = engines.sampler
    schedules = {p: resolve_schedule(engines, sc, p) for p in ("full", "fora")}
    # A fake clock: per round, full takes 3, 30, 6 s and FORA 1, 10, 3 s (load changing between
    # rounds). Wall speedup is the median of per-round ratios (3, 3, 2) = 3; a ratio of medians
    # would give 6 / 3 = 2, and the load change would leak in.
    import types

    import soda.bench_runtime as br

    clock, costs = {"t": 0.0}, {"full": [3.0, 30.0, 6.0], "fora": [1.0, 10.0, 3.0]}

    def fake_loop(backend, config, sampler_cfg, schedule, labels, seed=0):
        loop = br.schedule_loop(backend, config, sampler_cfg, schedule, labels, seed)

        def run():
            out = loop()
            clock["t"] += costs[schedule.policy].pop(0)
            return out
        return run

    monkeypatch.setattr(br, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    loops = {name: fake_loop(ort_b, engines.config, sc, s, np.array([1, 7])) for name, s in schedules.items()}
    full = full_flops(engines.config, sc, 2, tuple(schedules["full"].modules))
    rows = {r.name: r for r in br.rows_from(br.interleaved(loops, 3), "full", full)}
    fm = FlopsModel.for_config(engines.config)
    want = schedule_flops(schedules["full"], fm, 4) / schedule_flops(schedules["fora"], fm, 4)
    assert rows["fora"].flops_speedup == pytest.approx(want) and want > 1.5
    assert rows["fora"].rounds == [1.0, 10.0, 3.0] and rows["fora"].seconds == 3.0 and rows["full"].seconds == 6.0
    assert rows["fora"].wall_speedup == pytest.approx(3.0) and rows["full"].wall_speedup == pytest.approx(1.0)
    assert rows["fora"].efficiency == pytest.approx(3.0 / want)


def test_bench_names_the_model_when_image_engines_meet_a_video_model(tiny_engines):
    """`bench --model <video> --engines <image export>`: the message is about the wrong engines,
    not about video flags that were never given."""
    from types import SimpleNamespace

    from soda.bench import backend_for

    video_model = SimpleNamespace(video=(64, 64, 17, 24.0), config=SimpleNamespace(name="opensora-tiny"))
    with pytest.raises(UserError, match="was exported from .*, not opensora-tiny"):
        backend_for("ort", video_model, engines_dir=str(tiny_engines))


def test_trt_profile_choice_for_module_and_block_engines(tiny_engines):
    """TrtEngine's profile choice (pure Python, tested without TensorRT): a module engine by its
    tokens' count, a block engine by each pruned module's index count; a count without a profile
    is one clear error."""
    from export.trt import _profiles
    from runtime.engines import open_engines
    from runtime.trt_backend import axis_positions, profile_key, select_profile

    m = open_engines(tiny_engines).manifest
    counts = m.token_counts
    assert len(counts) > 1
    rp = next(b for b in m.data["blocks"]["graphs"] if b.endswith(".rp"))
    profs = _profiles(m.data["artefacts"][rp], counts, 4)
    keys = {profile_key(p): i for i, p in enumerate(profs)}
    axes = axis_positions(m.artefacts[rp].inputs)
    layer = rp.split(".")[1]
    assert axes == {f"n_mlp_{layer}": (f"idx.mlp.{layer}", 1)}
    for i, k in enumerate(counts[1:]):
        assert select_profile(keys, {f"idx.mlp.{layer}": np.zeros((2, k), np.int64)}, axes) == i
    with pytest.raises(UserError, match=f"no TensorRT profile for n_mlp_{layer}=5 "):
        select_profile(keys, {f"idx.mlp.{layer}": np.zeros((2, 5), np.int64)}, axes)
    attn = {profile_key(p): i for i, p in enumerate(_profiles(m.data["artefacts"]["attn.0"], counts, 4))}
    assert select_profile(attn, {"tokens": np.zeros((2, counts[-1], 32), np.float32)}, {}) == len(counts) - 1
    with pytest.raises(UserError, match="no TensorRT profile for 5 tokens"):
        select_profile(attn, {"tokens": np.zeros((2, 5, 32), np.float32)}, {})
    one = {profile_key(p): i for i, p in enumerate(_profiles(m.data["artefacts"]["step.0-1.kk"], counts, 4))}
    assert select_profile(one, {"x": np.zeros((2, 4, 8, 8), np.float32)}, {}) is None


def test_engine_check_feeds_block_graphs_at_every_profile(tiny_engines, tiny_backends):
    """Block graphs are checked on inputs assembled from the recorded step (tokens, conditioning,
    D and caches from the module graphs, k spread distinct indices per profile): an exact
    candidate measures 0 on every block, one 1% off on one block measures 1% there only."""
    from export.trt import _profiles
    from runtime.engine_check import block_cases, compare, record_activations
    from runtime.ort_backend import OrtBackend

    engines, _, _ = tiny_backends
    plain = OrtBackend(engines, device="cpu", threads=1)
    records = record_activations(tiny_engines)
    arts = engines.manifest.data["artefacts"]
    profiles = lambda name: _profiles(arts[name], engines.manifest.token_counts, 4)  # noqa: E731
    cases = block_cases(engines, records, plain._run, profiles)
    assert set(cases) == {b.name for b in engines.block_graphs()}
    rp = next(n for n in cases if n.endswith(".rp"))
    layer = rp.split(".")[1]
    ins = engines.io(rp)[0]
    fed = [feed[ins.index(f"idx.mlp.{layer}")] for feed in cases[rp]]
    assert [f.shape[1] for f in fed] == engines.manifest.token_counts[1:]
    assert all(len(np.unique(row)) == len(row) and row.max() < 16 for f in fed for row in f)
    D = plain._run(f"mlp.{layer}", records[f"mlp.{layer}"])[0]
    np.testing.assert_array_equal(cases[rp][0][ins.index(f"cache.mlp.{layer}")], D)
    np.testing.assert_array_equal(cases[rp][0][0], records[f"attn.{layer}"][0])  # the tokens entering the layer
    counts = lambda name: []  # noqa: E731 (module graphs at their recorded count only, here)
    exact = compare({}, engines.io, counts, plain._run, plain._run, cases)
    assert set(exact) == set(cases) and max(exact.values()) == 0.0
    off = compare({}, engines.io, counts, plain._run,
                  lambda name, feed: [o * (1.01 if name == rp else 1.0) for o in plain._run(name, feed)], cases)
    assert off[rp] == pytest.approx(0.01, rel=1e-3) and max(v for n, v in off.items() if n != rp) == 0.0


def test_bench_refuses_engines_of_other_weights(tiny_engines, strong_tiny):
    """bench --backend ort times the graphs' own weights: naming others (--ckpt, another seed)
    would put their name on the report, so it is refused; the engines' own id passes."""
    from runtime.engines import open_engines
    from soda.bench import backend_for

    with pytest.raises(UserError, match="was exported from weights random-init-strong, not random-init-0"):
        backend_for("ort", strong_tiny, engines_dir=str(tiny_engines), weights="random-init-0")
    assert backend_for("ort", strong_tiny, engines_dir=str(tiny_engines), weights=open_engines(tiny_engines).weights)


def test_run_shows_progress(tiny_engines):
    """`cli.py run` gets a bar per generation (sample has one): one update per step."""
    from runtime.run import run_command

    seen = []

    class Bar:
        def __init__(self, desc, total):
            seen.append((desc, total))
            self.n = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen.append(self.n)

        def update(self):
            self.n += 1

    run_command(str(tiny_engines), "1", policy="full", out=None, echo=lambda m: None, progress_bar=Bar)
    steps = json.loads((tiny_engines / "manifest.json").read_text())["sampler"]["steps"]
    assert seen == [("run full", steps), steps]
