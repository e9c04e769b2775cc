"""bench: same noise for every policy, full is the reference, the report has every field."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soda.bench import BenchSetup, FIELDS, Runner, bench, format_table, backend_for, parse_policies, parse_speedups
from soda.errors import UserError
from soda.sampling import SamplerConfig

ROOT = Path(__file__).resolve().parent.parent


def test_backend_factory(tiny_model):
    from soda.torch_backend import TorchBackend

    assert isinstance(backend_for("torch", tiny_model), TorchBackend)
    with pytest.raises(UserError, match="needs --engines"):
        backend_for("ort", tiny_model)
    with pytest.raises(UserError, match="unknown backend 'tpu'"):
        backend_for("tpu", tiny_model)


def test_parsers():
    assert parse_policies("full, soda") == ["full", "soda"]
    assert parse_speedups("1.5,3") == [1.5, 3.0] and parse_speedups(None) == []
    with pytest.raises(UserError, match="unknown policy fast"):
        parse_policies("full,fast")
    with pytest.raises(UserError):
        parse_speedups("2,x")


def test_runner_batches_equal_one_batch(tiny_model):
    """Splitting the bench samples into batches changes nothing for DDIM (same noise per sample)."""
    from soda.pipeline import resolve_schedule

    sampler = SamplerConfig("ddim", 3, 4.0, None)
    sched = resolve_schedule(tiny_model, "w", sampler, "full")
    a, fa, _ = Runner(backend_for("torch", tiny_model), tiny_model, sampler, BenchSetup(["full"], 1.0, 5, batch_size=5)).run(sched, "a")
    b, fb, _ = Runner(backend_for("torch", tiny_model), tiny_model, sampler, BenchSetup(["full"], 1.0, 5, batch_size=2)).run(sched, "b")
    np.testing.assert_allclose(a, b, atol=1e-4)  # batch size changes matmul blocking only
    assert fa == pytest.approx(fb)


def test_bench_report(tiny_model):
    pytest.importorskip("soda.metrics")
    sampler = SamplerConfig("ddim", 6, 4.0, None)
    said = []
    setup = BenchSetup(["full", "soda"], 2.0, samples=4, frontier=[1.5, 2.0], profile_samples=4, batch_size=4,
                       keep_samples=2)
    report = bench(tiny_model, "w", sampler, setup, echo=said.append)
    kept = report.pop("kept_samples")
    assert set(kept) == {"full", "soda"} and kept["soda"].shape[0] == 2
    assert any("profiling 4 generations" in m for m in said)
    rows = {r["policy"]: r for r in report["results"]}
    assert set(rows) == {"full", "soda"}
    for r in report["results"]:
        assert set(FIELDS) <= set(r)
    assert rows["full"]["flops_speedup"] == 1.0 and rows["full"]["cosine"] == pytest.approx(1.0)
    assert 2.0 <= rows["soda"]["flops_speedup"] <= 2.06
    assert np.isfinite(rows["soda"]["psnr_db"]) and rows["soda"]["cosine"] <= 1.0
    assert rows["full"]["class_accuracy"] is None  # not dit-digits
    assert [r["target_speedup"] for r in report["frontier"]] == [1.5, 2.0]
    assert report["frontier"][1] is rows["soda"]  # the main result is reused, not rerun
    text = format_table(report["results"])
    assert text.splitlines()[0].startswith("policy") and "soda" in text
    json.dumps(report)


def test_cli_bench_bad_input(tmp_path):
    for args, match in [(["--policies", "full,fast"], "unknown policy fast"),
                        (["--speedup", "0.5"], "at least 1"),
                        (["--backend", "ort"], "needs --engines")]:
        r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "bench", "--random-init", "--samples", "2",
                            "--steps", "2", *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        lines = [l for l in r.stderr.strip().splitlines() if not l.startswith("note:")]
        assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr


def test_frontier_plot(tmp_path):
    from soda.plots import frontier_plot

    rows = [{"policy": p, "flops_speedup": x, "psnr_db": y} for p, x, y in
            [("full", 1.0, None), ("fora", 2.0, 30.0), ("fora", 3.0, 25.0), ("soda", 2.0, 35.0), ("soda", 3.0, 31.0)]]
    frontier_plot(rows, tmp_path / "f.png", title="t")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_bench_on_ort_reports_runtime_against_monolithic(tiny_model, tmp_path):
    """--backend ort: fidelity from the exported graphs, plus the runtime timing section."""
    from export.onnx_export import export_model
    from soda.policies import ScheduleSpec, make_schedule

    sampler = SamplerConfig("ddim", 6, 4.0, None)
    spec = ScheduleSpec.for_model(tiny_model.config, "ddim", 6)
    export_model(tiny_model, "w", make_schedule("full", spec), sampler, tmp_path / "eng", progress=False, echo=lambda s: None)
    setup = BenchSetup(["full", "fora"], 2.0, samples=4, batch_size=4, backend="ort", engines_dir=str(tmp_path / "eng"),
                       timing_images=1, timing_repeats=1)
    report = bench(tiny_model, "w", sampler, setup, echo=lambda s: None)
    torch_report = bench(tiny_model, "w", sampler, BenchSetup(["full", "fora"], 2.0, samples=4, batch_size=4),
                         echo=lambda s: None)
    # Same schedules, same noise: the deploy runtime's fidelity equals the reference's.
    assert report["results"][1]["psnr_db"] == pytest.approx(torch_report["results"][1]["psnr_db"], abs=0.05)
    rt = report["runtime"]
    names = [r["name"] for r in rt["rows"]]
    assert names == ["monolithic full", "stitched full", "stitched fora"]
    assert rt["monolithic_max_rel_diff"] < 1e-4  # the monolithic graph computes the same samples
    assert rt["stitched_over_monolithic"] > 0
    fora = rt["rows"][2]
    assert fora["flops_speedup"] == pytest.approx(report["results"][1]["flops_speedup"], rel=1e-3)
    json.dumps(report)
