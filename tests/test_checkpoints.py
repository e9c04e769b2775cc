"""Checkpoint loading through `soda.models.loading.load_model`: the formats people actually have
(bare state dict, official train.py checkpoint, safetensors) and the ways a file can be wrong.
Every user mistake is a `UserError` with one line that names the problem."""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch

from soda.errors import UserError
from soda.models.config import get_config
from soda.models.dit import DiT
from soda.models.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
MARKER = "soda_pickle_code_ran"


@pytest.fixture(scope="module")
def state():
    """A dit-digits state dict (registered, small) with random non-zero weights."""
    torch.manual_seed(0)
    model = DiT(get_config("dit-digits"))
    model.randomize_zero_init(0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def shifted(state: dict, delta: float) -> dict:
    return {k: v + delta for k, v in state.items()}


def assert_loaded(model: DiT, want: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def assert_one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# --- formats that load -------------------------------------------------------------------------
def test_bare_state_dict(state, tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(state, path)
    model, weights_id = load_model("dit-digits", path)
    assert_loaded(model, state)
    assert not model.training
    assert weights_id == hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_py_checkpoint_uses_ema(state, tmp_path):
    """Official train.py saves {"model", "ema", "opt", "args"} with args an argparse.Namespace."""
    ema = shifted(state, 0.5)
    model = DiT(get_config("dit-digits"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    ckpt = {"model": state, "ema": ema, "opt": opt.state_dict(),
            "args": argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000, epochs=1400)}
    path = tmp_path / "0400000.pt"
    torch.save(ckpt, path)
    model, _ = load_model("dit-digits", path)
    assert_loaded(model, ema)


def test_model_only_checkpoint(state, tmp_path):
    path = tmp_path / "model_only.pt"
    torch.save({"model": state}, path)
    model, _ = load_model("dit-digits", path)
    assert_loaded(model, state)


def test_safetensors(state, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    model, weights_id = load_model("dit-digits", path)
    assert_loaded(model, state)
    assert weights_id == hashlib.sha256(path.read_bytes()).hexdigest()


def test_generic_dit_reads_the_architecture_from_the_tensors(state, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match="--num-heads"):
        load_model("dit", path)  # the digits width is not a standard DiT width: heads cannot be inferred
    model, _ = load_model("dit", path, num_heads=get_config("dit-digits").num_heads)
    c = model.config
    want = get_config("dit-digits")
    assert (c.hidden_size, c.depth, c.patch_size, c.input_size, c.in_channels, c.num_classes, c.learn_sigma) == (
        want.hidden_size, want.depth, want.patch_size, want.input_size, want.in_channels, want.num_classes, True)
    assert_loaded(model, state)


# --- files that must be refused with one clear line ---------------------------------------------
def test_missing_file_says_where_it_looked(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError) as e:
        load_model("dit-digits", missing)
    assert str(missing.resolve()) in str(e.value)


def test_missing_official_file_says_where_the_weights_are(tmp_path):
    with pytest.raises(UserError) as e:
        load_model("dit-xl-2", tmp_path / "DiT-XL-2-256x256.pt")
    msg = str(e.value)
    assert str((tmp_path / "DiT-XL-2-256x256.pt").resolve()) in msg
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in msg


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(state, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load_model("dit-digits", path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(UserError, match="cannot read"):
        load_model("dit-digits", path)


def test_random_bytes_are_not_a_checkpoint_not_a_refused_pickle(tmp_path):
    """Random bytes used to read "needs arbitrary code to unpickle": wrong, and alarming."""
    path = tmp_path / "rand.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match=r"cannot read checkpoint .*: not a PyTorch checkpoint \(") as e:
        load_model("dit-digits", path)
    assert "arbitrary code" not in str(e.value) and "\n" not in str(e.value)


class RunsCode:
    """Unpickling this would run code (create a marker file): it must be refused, not run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_needs_code_execution_is_refused(state, tmp_path):
    marker = tmp_path / MARKER
    path = tmp_path / "evil.pt"
    torch.save({"ema": state, "payload": RunsCode(str(marker))}, path)
    with pytest.raises(UserError, match=r"refusing .*needs arbitrary code to unpickle \(getattr\)") as e:
        load_model("dit-digits", path)
    assert not marker.exists()
    assert "\n" not in str(e.value)


def test_custom_module_object_is_refused(tmp_path):
    """torch.save(model) (a whole nn.Module, a common mistake) needs code to unpickle."""
    path = tmp_path / "module.pt"
    torch.save(DiT(get_config("dit-digits")), path)
    with pytest.raises(UserError, match="refusing"):
        load_model("dit-digits", path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(UserError, match="not a state dict"):
        load_model("dit-digits", path)


def test_not_a_dit(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UserError, match="does not look like a DiT"):
        load_model("dit", path)


def test_key_and_shape_mismatch_lists_the_offending_keys(state, tmp_path):
    bad = dict(state)
    del bad["blocks.0.mlp.fc1.bias"]
    bad["blocks.0.extra.weight"] = torch.zeros(3)
    bad["blocks.1.attn.qkv.weight"] = torch.zeros(3, 5)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(UserError) as e:
        load_model("dit-digits", path)
    msg = str(e.value)
    assert "dit-digits" in msg
    for key in ("blocks.0.mlp.fc1.bias", "blocks.0.extra.weight", "blocks.1.attn.qkv.weight"):
        assert key in msg
    assert "missing" in msg and "unexpected" in msg and "shape" in msg


def test_checkpoint_of_another_architecture_for_a_named_model(state, tmp_path):
    """A dit-digits checkpoint passed as dit-s-8: refused, with the shape mismatches named."""
    path = tmp_path / "digits.pt"
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        load_model("dit-s-8", path)
    msg = str(e.value)
    assert "does not fit dit-s-8" in msg and "shape mismatch blocks.0." in msg and "more)" in msg
    assert "--num-heads" not in msg  # the user passed no heads: do not talk about them


def test_named_model_without_ckpt_says_what_to_pass():
    with pytest.raises(UserError, match="--ckpt"):
        load_model("dit-xl-2")


# --- the same errors through the CLI: exit 2, one line, no traceback ----------------------------
def test_cli_missing_official_checkpoint(tmp_path):
    r = run_cli("sample", "--model", "dit-xl-2", "--ckpt", "DiT-XL-2-256x256.pt", "--steps", "1", cwd=tmp_path)
    line = assert_one_line_error(r)
    assert str(tmp_path / "DiT-XL-2-256x256.pt") in line and "dl.fbaipublicfiles.com" in line


def test_cli_refuses_code_execution_pickle(state, tmp_path):
    marker = tmp_path / MARKER
    path = tmp_path / "evil.pt"
    torch.save({"ema": state, "payload": RunsCode(str(marker))}, path)
    r = run_cli("sample", "--model", "dit-digits", "--ckpt", str(path), "--steps", "1", "--out",
                str(tmp_path / "x.png"))
    assert "refusing" in assert_one_line_error(r)
    assert not marker.exists() and not (tmp_path / "x.png").exists()


def test_cli_truncated_checkpoint(state, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:1000])
    r = run_cli("sample", "--model", "dit-digits", "--ckpt", str(path), "--steps", "1")
    assert "cannot read" in assert_one_line_error(r)
