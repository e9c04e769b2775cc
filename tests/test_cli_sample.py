"""`python cli.py sample` end to end on a small checkpoint: what it writes, and one clear line
(exit 2, no traceback) for each input a user can get wrong."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soda.models.config import ModelConfig
from soda.models.dit import DiT

ROOT = Path(__file__).resolve().parent.parent
# 2 layers, width 48 (non-standard: needs --num-heads), 8x8x4 latents, 16 tokens, 10 classes.
SMALL = ModelConfig("dit", depth=2, hidden_size=48, patch_size=2, num_heads=3, input_size=8, in_channels=4,
                    num_classes=10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = DiT(SMALL)
    model.randomize_zero_init(0)
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def sample(ckpt: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "cli.py"), "sample", "--model", "dit", "--ckpt", str(ckpt), "--num-heads", "3",
           *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def sample_in_process(ckpt: Path, *args: str, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """The same `cli.main` without a fresh interpreter (cheaper on a shared machine)."""
    from conftest import cli_in_process

    return cli_in_process(["sample", "--model", "dit", "--ckpt", str(ckpt), "--num-heads", "3", *args], monkeypatch,
                          capsys)


@pytest.fixture
def run_here(ckpt, monkeypatch, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lambda *args: sample_in_process(ckpt, *args, monkeypatch=monkeypatch, capsys=capsys)
    torch.set_num_threads(before)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_writes_latents_and_png(ckpt, tmp_path):
    latents, png = tmp_path / "out" / "l.npy", tmp_path / "out" / "grid.png"
    latents.parent.mkdir()
    r = sample(ckpt, "--labels", "3,0,9", "--steps", "4", "--save-latents", str(latents), "--out", str(png))
    assert r.returncode == 0, r.stderr
    x = np.load(latents)
    assert x.shape == (3, 4, 8, 8) and x.dtype == np.float32 and np.isfinite(x).all()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.width > 3 * 8 and im.height > 8
    assert "ms/step" in r.stdout and "3 samples, ddim-4" in r.stdout


def test_same_noise_file_gives_same_latents_whatever_the_seed(run_here, tmp_path):
    """--noise overrides --seed: the trajectory depends only on the noise given."""
    noise = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "z.npy", noise)
    outs = []
    for seed in ("0", "5"):
        lat = tmp_path / f"l{seed}.npy"
        r = run_here("--labels", "1,2", "--steps", "3", "--seed", seed, "--noise", str(tmp_path / "z.npy"),
                     "--save-latents", str(lat), "--out", str(tmp_path / "s.png"))
        assert r.returncode == 0, r.stderr
        outs.append(np.load(lat))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_noise_of_the_wrong_shape(ckpt, tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((2, 4, 16, 16), np.float32))
    line = one_line_error(sample(ckpt, "--labels", "1,2", "--steps", "2", "--noise", str(tmp_path / "z.npy")))
    assert "[2, 4, 16, 16]" in line and "[2, 4, 8, 8]" in line


def test_noise_count_must_match_labels(run_here, tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((3, 4, 8, 8), np.float32))
    assert "one per label" in one_line_error(run_here("--labels", "1,2", "--steps", "2", "--noise",
                                                      str(tmp_path / "z.npy")))


def test_noise_file_that_is_not_npy(run_here, tmp_path):
    (tmp_path / "z.npy").write_text("not an array")
    assert "cannot read" in one_line_error(run_here("--labels", "1", "--steps", "2", "--noise",
                                                    str(tmp_path / "z.npy")))


def test_missing_noise_file(run_here, tmp_path):
    assert "not found" in one_line_error(run_here("--steps", "2", "--noise", str(tmp_path / "none.npy")))


def test_labels_out_of_range(ckpt):
    line = one_line_error(sample(ckpt, "--labels", "1,10", "--steps", "2"))
    assert "[10]" in line and "0..9" in line


def test_non_numeric_labels(ckpt):
    assert "comma-separated integers" in one_line_error(sample(ckpt, "--labels", "1,cat", "--steps", "2"))


def test_zero_steps(ckpt):
    assert "--steps" in one_line_error(sample(ckpt, "--steps", "0"))


def test_cfg_scale_below_one(run_here):
    assert "--cfg-scale" in one_line_error(run_here("--steps", "2", "--cfg-scale", "0.5"))


def test_toca_official_loop_on_the_command_line(run_here, tmp_path):
    """--toca-official-loop runs the literal official layer loop: on DDIM-50 two full steps compute
    only layer 0 fully, so the FLOPs speedup printed is that of `layer_quirk=True`, not the default's."""
    import re

    from soda.flops import FlopsModel, schedule_flops
    from soda.policies import ScheduleSpec, make_schedule
    from soda.policies.full import full_schedule

    spec, fm = ScheduleSpec.for_model(SMALL, "ddim", 50), FlopsModel.for_config(SMALL)
    want = {quirk: schedule_flops(full_schedule(spec), fm, 2) / schedule_flops(
        make_schedule("toca", spec, flops=fm, layer_quirk=quirk), fm, 2) for quirk in (False, True)}
    assert want[True] > want[False]
    for quirk in (False, True):
        r = run_here("--labels", "1", "--steps", "50", "--policy", "toca", *(["--toca-official-loop"] if quirk else []),
                     "--out", str(tmp_path / "s.png"))
        assert r.returncode == 0, r.stderr
        assert re.search(r"policy toca: .*FLOPs speedup ([0-9.]+)x", r.stdout).group(1) == f"{want[quirk]:.2f}"
    assert "applies to --policy toca" in one_line_error(run_here("--steps", "50", "--policy", "fora",
                                                                 "--toca-official-loop"))
    assert "drop --speedup" in one_line_error(run_here("--steps", "50", "--policy", "toca", "--speedup", "2",
                                                       "--toca-official-loop"))


def test_a_schedule_file_reports_its_own_policy(run_here, tmp_path):
    from soda.policies import ScheduleSpec, make_schedule

    make_schedule("fora", ScheduleSpec.for_model(SMALL, "ddim", 6)).save(tmp_path / "fora.json")
    r = run_here("--labels", "1", "--steps", "6", "--schedule", str(tmp_path / "fora.json"), "--out",
                 str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr
    assert "policy fora:" in r.stdout and "policy full" not in r.stdout


def test_noise_that_overflows_is_an_error_at_its_step(run_here, tmp_path):
    """Noise scaled by 1e30 is finite float32, but the model output is not: exit 2, not NaN images."""
    np.save(tmp_path / "z.npy", (1e30 * np.random.default_rng(0).standard_normal((1, 4, 8, 8))).astype(np.float32))
    r = run_here("--labels", "1", "--steps", "3", "--noise", str(tmp_path / "z.npy"), "--out", str(tmp_path / "s.png"))
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]  # the rest is the progress bar
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    assert "NaN or inf in the model output at step 0 of 3, first in layer 0 attn" in errors[0]
    assert not (tmp_path / "s.png").exists()


def test_complex_noise_is_refused_not_cast(run_here, tmp_path):
    np.save(tmp_path / "z.npy", np.ones((1, 4, 8, 8), np.complex64))
    assert "must be real numbers, not complex64" in one_line_error(
        run_here("--labels", "1", "--steps", "2", "--noise", str(tmp_path / "z.npy")))


def test_checkpoint_with_a_nan_weight_is_refused_by_name(ckpt, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt))
    state["blocks.1.mlp.fc2.bias"][3] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    r = sample_in_process(tmp_path / "nan.safetensors", "--steps", "2", "--out", str(tmp_path / "s.png"),
                          monkeypatch=monkeypatch, capsys=capsys)
    assert "tensor blocks.1.mlp.fc2.bias holds NaN or inf values" in one_line_error(r)
    assert not (tmp_path / "s.png").exists()


def test_a_profile_given_as_schedule_says_what_it_is(run_here, tmp_path):
    import json

    (tmp_path / "p.json").write_text(json.dumps({"format": 1, "model": "dit", "model_config": {}, "E_c": [], "E_p": []}))
    line = one_line_error(run_here("--steps", "2", "--schedule", str(tmp_path / "p.json")))
    assert "is a sensitivity profile, not a schedule" in line and "cli.py schedule --profile" in line
    (tmp_path / "s.json").write_text(json.dumps({"format": 1, "policy": "x", "colour": "red"}))
    line = one_line_error(run_here("--steps", "2", "--schedule", str(tmp_path / "s.json")))
    assert "not a schedule (unexpected colour; missing model, model_hash" in line and "__init__" not in line
