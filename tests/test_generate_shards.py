"""`cli.py generate` without Ray: per-sample randomness, the ADM .npz, atomic shards, resume after an
interruption, refusal to mix jobs, and no Ray import."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_in_process
from soda.shards import GenerateJob, ShardStore, WorkerSpec, adm_uint8, generate_to_folder, load_backend, sample_inputs

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    r = cli_in_process(args, monkeypatch, capsys)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def digits():
    """dit-digits loaded once: (spec, loaded backend, a job maker)."""
    from soda.policies import ScheduleSpec, make_schedule
    from soda.sampling import SamplerConfig

    spec = WorkerSpec("dit-digits")
    loaded = load_backend(spec)
    backend, config, model, weights = loaded
    sampler = SamplerConfig("ddpm", STEPS, 2.0, None)  # DDPM: per-step noise must follow the sample too
    schedule = make_schedule("full", ScheduleSpec.for_model(config, "ddpm", STEPS, ("attn", "mlp")))

    def job(num_samples=7, shard_size=3, seed=5) -> GenerateJob:
        return GenerateJob(config.name, config.hash(), weights, "torch", sampler.to_dict(), schedule.to_dict(),
                           num_samples, shard_size, seed)

    return spec, loaded, job


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """One uninterrupted local run: the samples every other run must reproduce."""
    spec, loaded, job = digits
    out = tmp_path_factory.mktemp("reference")
    generate_to_folder(spec, loaded, job(), out, echo=lambda *a: None)
    store = ShardStore(out, job())
    samples = np.concatenate([store.load_shard(k)["samples"] for k in range(job().num_shards)])
    with np.load(out / "samples.npz") as z:
        return {"samples": samples, "arr_0": z["arr_0"], "arr_1": z["arr_1"]}


def test_sample_randomness_depends_only_on_seed_and_index(digits):
    _, (_, config, _, _), _ = digits
    labels, noise, rngs = sample_inputs(9, 0, 6, config)
    part_labels, part_noise, part_rngs = sample_inputs(9, 4, 6, config)
    np.testing.assert_array_equal(part_labels, labels[4:])
    np.testing.assert_array_equal(part_noise, noise[4:])
    step = rngs.standard_normal((6, 1, 16, 16))
    np.testing.assert_array_equal(part_rngs.standard_normal((2, 1, 16, 16)), step[4:])
    assert not np.array_equal(sample_inputs(10, 4, 6, config)[1], part_noise)  # another seed, other noise
    many, _, _ = sample_inputs(0, 0, 500, config)
    assert set(many.tolist()) == set(range(10))  # uniform over the classes, as DiT's sample_ddp.py draws them


def test_other_shard_sizes_give_the_same_samples_up_to_float_noise(digits, reference, tmp_path):
    spec, loaded, job = digits
    generate_to_folder(spec, loaded, job(shard_size=7), tmp_path, echo=lambda *a: None)
    x = ShardStore(tmp_path, job(shard_size=7)).load_shard(0)["samples"]
    np.testing.assert_allclose(x, reference["samples"], rtol=0, atol=1e-5)
    with np.load(tmp_path / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_1"], reference["arr_1"])


def test_adm_conversion_is_dit_sample_ddp():
    x = np.array([-1.2, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5], dtype=np.float32).reshape(1, 1, 1, 7)
    # torch.clamp(127.5 * x + 128.0, 0, 255).to(uint8), by hand
    np.testing.assert_array_equal(adm_uint8(x)[0, 0, :, 0], [0, 0, 64, 128, 166, 255, 255])
    assert adm_uint8(x).shape == (1, 1, 7, 3)
    rgb = np.zeros((2, 3, 4, 5), np.float32)
    rgb[:, 1] = 1
    assert adm_uint8(rgb)[0, 0, 0].tolist() == [128, 255, 128]


def test_npz_is_the_adm_layout(digits, reference):
    arr = reference["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (7, 16, 16, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()  # grayscale repeated
    np.testing.assert_array_equal(arr, adm_uint8(reference["samples"]))
    assert reference["arr_1"].shape == (7,) and reference["arr_1"].max() < 10
    assert arr.std() > 10  # real digits, not a blank array


class Interrupt(Exception):
    pass


def test_interrupted_generate_resumes_without_recomputing(digits, reference, tmp_path):
    spec, loaded, job = digits

    def stop_after_two(k):
        if k == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        generate_to_folder(spec, loaded, job(), tmp_path, echo=lambda *a: None, on_shard=stop_after_two)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["done"] == 2 and sorted(manifest["shards"]) == ["0", "1"]
    assert not (tmp_path / "samples.npz").exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # nothing half-written
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "shards").iterdir()}
    assert sorted(first) == ["00000.npz", "00001.npz"]

    messages = []
    res = generate_to_folder(spec, loaded, job(), tmp_path, echo=messages.append)
    assert res["computed"] == [2] and res["skipped"] == 2
    assert "2 already done, 1 to generate" in messages[0]
    for name, (mtime, data) in first.items():
        p = tmp_path / "shards" / name
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    with np.load(tmp_path / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], reference["arr_0"])
        np.testing.assert_array_equal(z["arr_1"], reference["arr_1"])

    again = generate_to_folder(spec, loaded, job(), tmp_path, echo=lambda *a: None)
    assert again["computed"] == [] and again["skipped"] == 3


def test_a_corrupt_shard_is_generated_again(digits, reference, tmp_path):
    spec, loaded, job = digits
    generate_to_folder(spec, loaded, job(), tmp_path, echo=lambda *a: None)
    (tmp_path / "shards" / "00001.npz").write_bytes(b"not an npz")
    res = generate_to_folder(spec, loaded, job(), tmp_path, echo=lambda *a: None)
    assert res["computed"] == [1]
    with np.load(tmp_path / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], reference["arr_0"])


def test_another_job_in_the_same_folder_is_refused(digits, tmp_path):
    from soda.errors import UserError

    spec, loaded, job = digits
    generate_to_folder(spec, loaded, job(num_samples=2, shard_size=2), tmp_path, echo=lambda *a: None)
    with pytest.raises(UserError, match=r"holds another generation \(seed 5 -> 6\)"):
        ShardStore(tmp_path, job(num_samples=2, shard_size=2, seed=6))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        ShardStore(other, job())


# --- the command -------------------------------------------------------------------------------
def test_cli_generate_digits_writes_adm_npz(tmp_path, monkeypatch, capsys):
    out = tmp_path / "gen"
    args = ["generate", "--model", "dit-digits", "--num-samples", "5", "--shard-size", "2", "--steps", "4",
            "--seed", "1", "--out", str(out)]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "3 shards generated by 1 worker(s)" in stdout and "0 reused" in stdout and "uint8 [5, 16, 16, 3]" in stdout
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (5, 16, 16, 3) and z["arr_0"].dtype == np.uint8
    from PIL import Image

    assert Image.open(out / "preview.png").size[0] > 5 * 64  # 5 tiles of 64 px side by side
    code, stdout, _ = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "0 shards generated" in stdout and "3 reused" in stdout


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--num-samples", "4", "--shard-size", "0"], "--shard-size must be at least 1"),
    (["--num-samples", "4", "--ray", "local:zero"], "--ray local:K needs a worker count"),
    (["--num-samples", "4", "--workers", "2"], "--workers needs --ray"),
    (["--num-samples", "4", "--ray", "127.0.0.1:9"], "cannot reach the Ray cluster at 127.0.0.1:9"),
    (["--num-samples", "4", "--vae", "MISSING"], "VAE folder not found"),
])
def test_cli_generate_bad_input(args, message, tmp_path, monkeypatch, capsys):
    # MISSING: a folder that surely does not exist (a fixed path like /nonexistent can, on a shared machine)
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    code, _, err = run_cli(["generate", "--steps", "2", "--out", str(tmp_path / "o"), *args], monkeypatch,
                                  capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and message in err, err
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_cli_generate_latent_model_needs_vae(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["generate", "--model", "dit-s-8", "--random-init", "--steps", "2",
                                   "--num-samples", "2", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert code == 2 and "give --vae DIR" in err


def test_cli_out_is_a_file(tmp_path, monkeypatch, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    code, _, err = run_cli(["generate", "--num-samples", "2", "--out", str(f)], monkeypatch, capsys)
    assert code == 2 and "is a file, not a folder" in err


BLOCKED = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, _Block())
sys.path.insert(0, {root!r})
sys.argv = ['cli.py'] + {args!r}
import cli
try:
    cli.main()
finally:
    leaked = [m for m in sys.modules if m.split('.')[0] in {blocked!r}]
    assert not leaked, leaked
"""


def run_blocked(args: list[str], blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    code = BLOCKED.format(root=str(ROOT), args=args, blocked=blocked)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_without_ray_flag_nothing_imports_ray(tmp_path):
    args = ["generate", "--num-samples", "2", "--steps", "2", "--out", str(tmp_path / "g")]
    proc = run_blocked(args, ("ray",))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "g" / "samples.npz").is_file()
    proc = run_blocked(args[:-2] + ["--out", str(tmp_path / "h"), "--ray", "local:1"], ("ray",))
    assert proc.returncode == 2 and "--ray needs Ray: pip install -e '.[ray]'" in proc.stderr


@pytest.fixture(scope="module")
def digits_engines(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "dit-digits"
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "export", "--model", "dit-digits", "--steps", "4",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return out


def test_generate_from_engines_without_torch_equals_torch(digits_engines, tmp_path, monkeypatch, capsys):
    common = ["--num-samples", "3", "--shard-size", "2", "--seed", "4", "--policy", "fora"]
    proc = run_blocked(["generate", "--engines", str(digits_engines), *common, "--out", str(tmp_path / "ort")],
                       ("torch", "onnx", "ray"))
    assert proc.returncode == 0, proc.stderr
    code, _, err = run_cli(["generate", "--model", "dit-digits", "--steps", "4", *common,
                                   "--out", str(tmp_path / "torch")], monkeypatch, capsys)
    assert code == 0, err
    for k in (0, 1):
        with np.load(tmp_path / "ort" / "shards" / f"{k:05d}.npz") as a, \
                np.load(tmp_path / "torch" / "shards" / f"{k:05d}.npz") as b:
            np.testing.assert_array_equal(a["labels"], b["labels"])
            np.testing.assert_allclose(a["samples"], b["samples"], rtol=0, atol=1e-4 * np.abs(b["samples"]).max())
    ort_job = json.loads((tmp_path / "ort" / "manifest.json").read_text())["job"]
    assert ort_job["backend"] == "ort" and ort_job["sampler"]["steps"] == 4  # the exported sampler by default
