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
    for name in ("torch-cpu", "torch-cpu-bf16", "ort-cpu"):
        assert "policies" in backends[name], (name, backends[name])
        b = backends[name]
        assert set(b["policies"]) == {"full", "fora", "toca", "duca", "soda"}, b
        for p, row in b["policies"].items():
            if p == "full":
                assert row["flops_speedup"] == 1.0 and row["wall_speedup"] == 1.0
            else:  # every policy scheduled at the same 2.5x FLOPs (FORA: whole steps, the first count above)
                assert 2.5 <= row["flops_speedup"] <= 2.8, (name, p, row)
                assert row["wall_speedup"] > 0 and row["seconds"] > 0
        assert 0 < b["stitched_full_over_monolithic"] < 10
        # stitched full compute and the monolithic model compute the same samples (bf16: both
        # under the same autocast, so the same casts; a float32 reference would differ by ~1e-2)
        assert b["samples_max_rel_diff_vs_monolithic"] <= (1e-3 if name.endswith("bf16") else 1e-4), (name, b)
    import torch

    if not torch.cuda.is_available():  # each GPU backend is skipped with its true reason
        assert "no CUDA device" in backends["torch-cuda"]["skipped"]
        assert backends["trt-fp16"]["skipped"] and backends["ort-cuda"]["skipped"]
    assert f"report -> {out}" in r.stdout


def _check(tmp_path, *flags):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--json", str(tmp_path / "c.json"),
                           *flags], cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_gpu_check_refuses_bad_flags_in_one_line(tmp_path):
    for flags, expected in [(("--tiny", "--policies", "full,nonsense"), "--policies: unknown nonsense"),
                            (("--backends", "bogus"), "--backends: unknown bogus"),
                            (("--tiny", "--steps", "0"), "--steps must be at least 1, got 0")]:
        r = _check(tmp_path, *flags)
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)


def test_gpu_check_with_nothing_measured_is_a_failure(tmp_path):
    """On a machine without the GPU backends asked for, the check must not pass with an empty report."""
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has CUDA: torch-cuda would be measured")
    r = _check(tmp_path, "--backends", "torch-cuda")
    assert r.returncode == 1 and "no backend could be measured here" in r.stderr, r.stderr
    assert "no CUDA device" in json.loads((tmp_path / "c.json").read_text())["backends"]["torch-cuda"]["skipped"]


def test_gpu_check_profile_is_written_then_reused_and_refused_for_another_run(tmp_path):
    """--profile: the first run writes SODA's profile, the next reads it (no profiling, the same
    schedule), and a run with another sampler stops in one line instead of using it."""
    prof = tmp_path / "soda_profile.json"
    flags = ("--tiny", "--backends", "ort-cpu", "--policies", "full,soda", "--profile", str(prof))
    def soda_flops_speedup():
        return json.loads((tmp_path / "c.json").read_text())["backends"]["ort-cpu"]["policies"]["soda"]["flops_speedup"]

    first = _check(tmp_path, *flags)
    assert first.returncode == 0 and f"profile written to {prof}" in first.stdout, first.stderr[-2000:]
    made, speedup = prof.read_text(), soda_flops_speedup()
    second = _check(tmp_path, *flags)
    assert second.returncode == 0 and f"profile read from {prof}" in second.stdout, second.stderr[-2000:]
    assert "profiling" not in second.stdout and prof.read_text() == made
    assert soda_flops_speedup() == speedup  # FLOPs of the same schedule, made from the same profile
    third = _check(tmp_path, *flags, "--steps", "8")
    assert third.returncode == 2 and "--profile" in third.stderr and "ddim" in third.stderr, third.stderr
    assert "Traceback" not in third.stderr
    # a profile made with forecast orders serves SODA too (its E_c and E_p do not depend on them); not the reverse
    forecast = tmp_path / "forecast_profile.json"
    made = _check(tmp_path, "--tiny", "--backends", "ort-cpu", "--policies", "full,soda-forecast", "--profile", str(forecast))
    assert made.returncode == 0, made.stderr[-2000:]
    served = _check(tmp_path, *flags[:-1], str(forecast))
    assert served.returncode == 0 and f"profile read from {forecast}" in served.stdout, served.stderr[-2000:]
    refused = _check(tmp_path, "--tiny", "--backends", "ort-cpu", "--policies", "full,soda-forecast", "--profile", str(prof))
    assert refused.returncode == 2 and "orders []" in refused.stderr and "orders [1, 2]" in refused.stderr, refused.stderr


def test_gpu_check_profiles_ahead_on_a_machine_without_the_backends(tmp_path):
    """--profile on a CPU-only machine: SODA's profile is made here, for a GPU session to read."""
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has CUDA: torch-cuda would be timed")
    prof = tmp_path / "ahead.json"
    r = _check(tmp_path, "--tiny", "--backends", "torch-cuda", "--policies", "full,soda", "--profile", str(prof))
    assert r.returncode == 0 and f"SODA's profile is in {prof}" in r.stdout, r.stderr[-2000:]
    assert json.loads(prof.read_text())["kind"] and "no CUDA device" in r.stdout
