"""scripts/gpu_check.py in its --tiny mode: the GPU check's code (monolithic references, every
policy at 2.5x, interleaved timing, skip reasons, the JSON) runs on the CPU backends, so the
script a GPU session will run cannot rot unseen."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_tiny_runs_and_reports(tmp_path):
    out = tmp_path / "check.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--json", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["format"] == 1 and report["tiny"] and "RANDOM" in report["weights"]
    backends = report["backends"]
    for name in ("torch-cpu", "ort-cpu"):
        b = backends[name]
        assert set(b["policies"]) == {"full", "fora", "toca", "duca", "soda"}, b
        for p, row in b["policies"].items():
            if p == "full":
                assert row["flops_speedup"] == 1.0 and row["wall_speedup"] == 1.0
            else:  # every policy scheduled at the same 2.5x FLOPs (FORA: whole steps, the first count above)
                assert 2.5 <= row["flops_speedup"] <= 2.8, (name, p, row)
                assert row["wall_speedup"] > 0 and row["seconds"] > 0
        assert 0 < b["stitched_full_over_monolithic"] < 10
        # stitched full compute and the monolithic model compute the same samples
        assert b["samples_max_rel_diff_vs_monolithic"] <= 1e-4
    import torch

    if not torch.cuda.is_available():  # each GPU backend is skipped with its true reason
        assert "no CUDA device" in backends["torch-cuda"]["skipped"]
        assert backends["trt-fp16"]["skipped"] and backends["ort-cuda"]["skipped"]
    assert f"report -> {out}" in r.stdout
