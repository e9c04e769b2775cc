"""The README's commands, run in the repository root, leave nothing git would offer to commit."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_outputs() -> set[str]:
    """Files the README's `python cli.py ...` lines write: named outputs, their .png companions
    (profile and schedule pictures), defaults of commands that name none, and train's loss log."""
    text = (ROOT / "README.md").read_text()
    lines = [ln for ln in text.splitlines() if "cli.py" in ln or ln.lstrip().startswith("--")]
    named = set()
    for ln in lines:
        named |= set(re.findall(r"--(?:out|json|plot|save-latents|log)\s+([\w./-]+)", ln))
    out = {n for n in named if "/" not in n and Path(n).suffix}  # folders: checked by a file inside, below
    out |= {str(Path(n).with_suffix(".png")) for n in out if n.endswith(".json")}
    out |= {str(Path(n).with_suffix(".log.jsonl")) for n in out if n.endswith(".safetensors")}
    return out | {"sample.png", "run.png", "bench.json", "demo/report.md", "engines/dit-digits/manifest.json"}


def test_readme_outputs_are_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = sorted(readme_outputs())
    assert {"grid.png", "profile.json", "profile.png", "soda.json", "soda.png", "frontier.png", "dit_digits.safetensors",
            "dit_digits.log.jsonl"} <= set(names)
    r = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT, capture_output=True, text=True)
    ignored = set(r.stdout.split())
    assert ignored == set(names), sorted(set(names) - ignored)
