"""The timing scripts answer a wrong folder with one "error:" line and exit 2 (soda.errors.main_or_exit)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["step_kinds.py", "session_heap.py"])
def test_a_missing_engines_folder_is_one_line(tmp_path, script):
    missing = tmp_path / "no-such-folder"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--engines", str(missing)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and str(missing) in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script, flag", [("step_kinds.py", "--rounds"), ("session_heap.py", "--calls"),
                                          ("runtime_memory.py", "--rounds"), ("step_graph_ab.py", "--rounds")])
def test_a_count_below_one_is_refused_by_argparse(tmp_path, script, flag):
    """A median over zero rounds was a StatisticsError traceback after the whole setup."""
    args = [str(tmp_path)] if script == "runtime_memory.py" else ["--engines", str(tmp_path)]
    if script == "step_graph_ab.py":
        args = ["--out", str(tmp_path / "x")]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args, flag, "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{flag}: must be at least 1, got 0" in r.stderr and "Traceback" not in r.stderr
