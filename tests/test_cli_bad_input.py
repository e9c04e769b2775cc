"""User mistakes across the commands: exit 2 with one `error:` line, nothing written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_in_process

ROOT = Path(__file__).resolve().parent.parent
S8 = ["--model", "dit-s-8", "--random-init", "--steps", "2"]


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("args, match", [
    (["sample", *S8, "--num-heads", "5"], "--num-heads is for --model dit"),
    (["sample", "--model", "bogus"], "unknown model 'bogus'"),
    (["sample", "--cfg-scale", "nan"], "--cfg-scale"),
    (["sample", "--labels", "1,,2"], "--labels must be comma-separated integers"),
    (["sample", "--out", "s.txt"], "--out s.txt: use one of"),
    (["sample", "--save-latents", "l.txt"], "--save-latents l.txt: use one of .npy"),
    (["sample", "--policy", "fora", "--schedule", "x.json"], "not both"),
    (["sample", "--policy", "full", "--speedup", "2"], "--speedup does not apply to --policy full"),
    (["sample", "--ckpt", "nope.pt", "--random-init"], "give --ckpt or --random-init, not both"),
    (["profile", "--intervals", "2,3", "--out", "p.json"], "including 1"),
    (["profile", "--rates", "0.5,1.5", "--out", "p.json"], "strictly between 0 and 1"),
    (["bench", "--policies", ""], "--policies is empty"),
    (["bench", "--engines", "somewhere"], "--engines is for --backend ort"),
    (["bench", "--timing-rounds", "3"], "--timing-images and --timing-per-module are for --backend ort"),
    (["bench", "--timing-per-module"], "--timing-images and --timing-per-module are for --backend ort"),
    (["bench", "--timing-images", "4"], "--timing-images and --timing-per-module are for --backend ort"),
    (["bench", "--backend", "ort", "--samples", "2", "--timing-images", "4"], "give at least --samples 4 (got 2)"),
    (["bench", "--speedup", "nan"], "at least 1 and finite"),
    (["bench", "--speedup", "1000"], "cannot reach a 1000x FLOPs speedup"),  # before any profiling or sampling
    (["bench", "--policies", "soda", "--speedup", "20"], "speedup 20x is not reachable: at most 5.88x"),
    (["sample", "--policy", "soda", "--speedup", "20"], "speedup 20x is not reachable: at most 5.88x"),
    (["bench", "--plot", "plot.txt"], "--plot plot.txt: use one of"),
    (["bench", "--precision", "bf16"], "--precision bf16 needs --backend torch --device cuda"),
    (["bench", "--device", "cuda", "--ray", "local:2"], "--device cuda runs in this process"),
    (["train", "--steps", "2", "--lr", "nan"], "--lr must be positive"),
    # checked before any sampling, not at the end (dit-digits makes pixels; dit-s-8 latents)
    (["sample", "--vae", "vae"], "--vae is for latent models; dit-digits makes pixels"),
    (["sample", *S8, "--vae", "vae"], "VAE folder not found: vae"),
    (["generate", *S8, "--policy", "full", "--num-samples", "2", "--vae", ".", "--out", "g"],
     "cannot load a diffusers AutoencoderKL from ."),  # before g/ and its manifest are written
    (["generate", "--steps", "2", "--policy", "full", "--num-samples", "9999999", "--shard-size", "9999999",
      "--out", "g"],
     "GiB for its token caches"),
    (["demo", "--model", "pixart-digits"], "demo runs class-label models"),
    # a flag the command would ignore
    (["sample", "--profile", "p.json"], "--profile plans --policy soda or soda-forecast; --policy full does not"),
    (["export", "--schedule", "s.json", "--profile", "p.json"], "--profile does not apply to a --schedule file"),
    (["generate", "--engines", "e", "--model", "dit-s-2", "--cfg-channels", "all", "--num-samples", "2",
      "--out", "g"],
     "--model, --cfg-channels do not apply with --engines"),
    (["bench", "--calibration-prompts", "2"], "--calibration-prompts is for text-conditioned models"),
    (["demo", "--model", "opensora-tiny", "--random-init"], "opensora-tiny takes captions"),
])
def test_one_line_error(args, match, tmp_path):
    r = _cli(*args, cwd=tmp_path)
    lines = [l for l in r.stderr.strip().splitlines() if not l.startswith("note:")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.stderr
    assert not any(tmp_path.iterdir()), "nothing is written on bad input"


@pytest.mark.parametrize("args", [["sample", "--seed", "-1"], ["sample", "--num-heads", "0"],
                                  ["profile", "--batch-size", "0"],
                                  ["export", "--opset", "5"], ["run", "--engines", "x", "--threads", "0"]])
def test_option_ranges_are_click_errors(args, tmp_path):
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and f"Invalid value for '{args[-2]}'" in r.stderr and "Traceback" not in r.stderr


def test_noise_npz_is_one_clear_error(tmp_path):
    """np.load gives an NpzFile for an .npz: one error line, not an AttributeError traceback."""
    import numpy as np

    np.savez(tmp_path / "noise.npz", arr_0=np.zeros((1, 1, 16, 16), np.float32))
    r = _cli("sample", "--labels", "1", "--noise", "noise.npz", "--out", "s.png", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: noise.npz is an .npz archive; give the noise as one .npy array (np.save)"], r.stderr
    assert not (tmp_path / "s.png").exists()


def test_demo_checks_before_writing(tmp_path):
    r = _cli("demo", "--speedup", "0", "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and "at least 1" in r.stderr
    assert not (tmp_path / "d").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    r = _cli("demo", "--out", str(tmp_path / "mine"))
    assert r.returncode == 2 and "holds other files" in r.stderr


@pytest.mark.parametrize("args", [
    ["sample", "--out", "f/x.png"], ["sample", "--save-latents", "f/x.npy"], ["profile", "--out", "f/p.json"],
    ["schedule", "--profile", "p.json", "--speedup", "2", "--out", "f/s.json"], ["bench", "--json", "f/b.json"],
    ["bench", "--plot", "f/sub/b.png"], ["export", "--out", "f/eng"], ["run", "--engines", "x", "--out", "f/r.png"],
    ["train", "--out", "f/w.safetensors"], ["train", "--log", "f/w.jsonl"], ["demo", "--out", "f/d"],
])
def test_unwritable_output_is_refused_before_the_work(args, tmp_path, monkeypatch, capsys):
    """An output under a path whose parent is a file: one line up front, not an OSError after minutes."""
    (tmp_path / "f").write_text("a file")
    r = cli_in_process(args, monkeypatch, capsys, tmp_path)
    lines = [l for l in r.stderr.strip().splitlines() if not l.startswith("note:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "f is a file, not a folder" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_disk_full_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch, capsys):
    """ENOSPC half way through writing the latents: `error: FILE: No space left on device`, exit 2;
    the earlier file is intact and no temporary file is left."""
    import errno

    import numpy as np

    def full_disk(path, arr, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    (tmp_path / "l.npy").write_bytes(b"old")
    monkeypatch.setattr(np, "save", full_disk)
    r = cli_in_process(["sample", "--steps", "2", "--labels", "1", "--save-latents", "l.npy", "--out", "s.png"],
                  monkeypatch, capsys, tmp_path)
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error")]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].endswith("No space left on device"), r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.npy"] and (tmp_path / "l.npy").read_bytes() == b"old"


def test_sigterm_during_export_leaves_no_temporary_folder(tmp_path):
    """kill (SIGTERM) unwinds like Ctrl-C: the hidden `.NAME.tmp-PID` folder is removed at once."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "export", "--model", "dit-digits", "--steps", "3",
                             "--out", str(tmp_path / "eng")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".eng.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "aborted" in err, err
    assert list(tmp_path.iterdir()) == []


def test_run_policy_help_says_what_the_default_runs(monkeypatch, capsys):
    """No --policy runs the exported schedule whatever its policy; --policy soda (or soda-forecast)
    insists it is that policy's."""
    r = cli_in_process(["run", "--help"], monkeypatch, capsys)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    assert "the engines' exported schedule, which must be that policy's" in text
    assert "Default: the exported schedule, whatever its policy" in text


def test_bench_device_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the no-GPU error is not taken")
    r = _cli("bench", "--device", "cuda", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--device cuda: no CUDA device here" in lines[0], r.stderr
    assert not any(tmp_path.iterdir())


def test_a_missing_output_folder_is_created_and_said(tmp_path, monkeypatch, capsys):
    """Output folders are made as needed, like `mkdir -p`, but never silently: a typo in a folder
    name shows up as a note naming the outermost folder created."""
    r = cli_in_process(["sample", *S8, "--labels", "1", "--out", "new/sub/x.png", "--save-latents", "x.npy"],
                       monkeypatch, capsys, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "note: --out: creating the folder new\n" in r.stderr, r.stderr
    assert "--save-latents: creating" not in r.stderr  # its folder exists: nothing to say
    assert (tmp_path / "new" / "sub" / "x.png").is_file()
