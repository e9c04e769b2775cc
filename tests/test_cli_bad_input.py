"""User mistakes across the commands: exit 2 with one `error:` line, nothing written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    (["bench", "--speedup", "nan"], "at least 1 and finite"),
    (["bench", "--plot", "plot.txt"], "--plot plot.txt: use one of"),
    (["train", "--steps", "2", "--lr", "nan"], "--lr must be positive"),
])
def test_one_line_error(args, match, tmp_path):
    r = _cli(*args, cwd=tmp_path)
    lines = [l for l in r.stderr.strip().splitlines() if not l.startswith("note:")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.stderr
    assert not any(tmp_path.iterdir()), "nothing is written on bad input"


@pytest.mark.parametrize("args", [["sample", "--seed", "-1"], ["profile", "--batch-size", "0"],
                                  ["export", "--opset", "5"], ["run", "--engines", "x", "--threads", "0"]])
def test_option_ranges_are_click_errors(args, tmp_path):
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and "Invalid value" in r.stderr and "Traceback" not in r.stderr


def test_demo_checks_before_writing(tmp_path):
    r = _cli("demo", "--speedup", "0", "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and "at least 1" in r.stderr
    assert not (tmp_path / "d").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    r = _cli("demo", "--out", str(tmp_path / "mine"))
    assert r.returncode == 2 and "holds other files" in r.stderr
