"""bench: same noise for every policy, full is the reference, the report has every field."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soda.bench import (BenchSetup, FIELDS, Runner, bench, format_table, backend_for, mean_ci95, parse_policies,
                        parse_speedups)
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
    with pytest.raises(UserError, match="--frontier must be comma-separated numbers, got '2,x'"):
        parse_speedups("2,x")


def test_runner_batches_equal_one_batch(tiny_model):
    """Splitting the bench samples into batches changes nothing for DDIM (same noise per sample)."""
    from soda.pipeline import resolve_schedule

    sampler = SamplerConfig("ddim", 3, 4.0, None)
    sched = resolve_schedule(tiny_model, "w", sampler, "full")
    labels = np.arange(5) % 10
    noise = np.random.default_rng(0).standard_normal((5, 4, 8, 8)).astype(np.float32)
    a, fa, _ = Runner(backend_for("torch", tiny_model), tiny_model, sampler, 5).run(sched, labels, noise, lambda c: c)
    b, fb, _ = Runner(backend_for("torch", tiny_model), tiny_model, sampler, 2).run(sched, labels, noise, lambda c: c)
    np.testing.assert_allclose(a, b, atol=1e-4)  # batch size changes matmul blocking only
    assert fa == pytest.approx(fb)


def test_mean_ci95_hand_made():
    mean, ci = mean_ci95([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.3027
    assert mean == 2.0 and ci == pytest.approx([2 - 4.302653 / 3**0.5, 2 + 4.302653 / 3**0.5], rel=1e-6)
    assert mean_ci95([5.0]) == (5.0, None)


def test_bench_report(strong_tiny_model):
    tiny_model = strong_tiny_model
    sampler = SamplerConfig("ddim", 6, 4.0, None)
    said, bars = [], []

    def progress(desc, total):
        bars.append([desc, total, 0])

        class Bar:
            def update(self):
                bars[-1][2] += 1

            def close(self):
                pass

        return Bar()

    setup = BenchSetup(["full", "fora", "soda"], 2.0, samples=6, frontier=[1.5, 2.0], profile_samples=4, batch_size=4,
                       keep_samples=6, eval_seeds=3, tune_samples=2, ablation=True)
    report = bench(tiny_model, "w", sampler, setup, echo=said.append, progress=progress)
    kept = report.pop("kept_samples")
    assert set(kept) == {"full", "fora rule", "fora tuned", "soda"} and kept["soda"].shape[0] == 6
    assert any("profiling 4 generations" in m for m in said)
    assert bars[0] == ["profile 4 generations", 6, 6]  # profiling shows a bar: 6 steps of one batch
    rows = {(r["policy"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {("full", "-"), ("fora", "rule"), ("fora", "tuned"), ("soda", "-")}
    for r in report["results"] + report["frontier"] + report["ablation"]:
        assert set(FIELDS) <= set(r)
    assert rows[("full", "-")]["flops_speedup"] == 1.0 and rows[("full", "-")]["psnr_db"] is None
    soda = rows[("soda", "-")]
    # Fidelity is against full compute on the same noise, per evaluation seed: recomputed by hand.
    full, ours = kept["full"].astype(np.float64), kept["soda"].astype(np.float64)
    by_hand = [10 * np.log10((full[i].max() - full[i].min()) ** 2 / np.mean((ours[i] - full[i]) ** 2))
               for i in (slice(0, 2), slice(2, 4), slice(4, 6))]
    assert soda["psnr_per_seed"] == pytest.approx(by_hand, abs=1e-3) and not np.array_equal(ours, full)
    a, b = ours.reshape(6, -1), full.reshape(6, -1)
    cos = np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert soda["cosine"] == pytest.approx(cos, abs=1e-6)
    assert 2.0 <= soda["flops_speedup"] <= 2.06 and soda["in_window"]
    lo, hi = soda["psnr_ci95"]
    assert len(soda["psnr_per_seed"]) == 3 and lo <= soda["psnr_db"] <= hi
    assert soda["psnr_db"] == pytest.approx(np.mean(soda["psnr_per_seed"]), abs=1e-3)
    assert rows[("full", "-")]["class_accuracy"] is None  # not dit-digits
    tuned = rows[("fora", "tuned")]["tuning"]
    assert tuned["evaluated"] >= 2 and tuned["tried"] >= tuned["evaluated"]
    assert {(r["policy"], r["variant"], r["target_speedup"]) for r in report["frontier"]} == {
        ("fora", "rule", 1.5), ("fora", "tuned", 1.5), ("soda", "-", 1.5)}
    assert [r["variant"] for r in report["ablation"]] == ["fixed", "dcs", "uas", "joint"]
    assert report["ablation"][2]["psnr_db"] == soda["psnr_db"]  # uas is soda's default planner
    text = format_table(report["results"])
    assert text.splitlines()[0].split()[:2] == ["policy", "variant"] and "tuned" in text
    json.dumps(report)


def test_cli_bench_bad_input(tmp_path):
    for args, match in [(["--policies", "full,fast"], "unknown policy fast"),
                        (["--speedup", "0.5"], "at least 1"),
                        (["--backend", "ort"], "needs --engines"),
                        (["--eval-seeds", "3"], "--eval-seeds must be between 1 and --samples (2)"),
                        (["--tune-samples", "0"], "--tune-samples must be at least 1")]:
        r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "bench", "--random-init", "--samples", "2",
                            "--steps", "2", *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        lines = [l for l in r.stderr.strip().splitlines() if not l.startswith("note:")]
        assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr


def test_frontier_plot(tmp_path):
    from soda.plots import frontier_plot

    rows = [{"policy": p, "variant": v, "flops_speedup": x, "psnr_db": y, "psnr_ci95": None if y is None else [y - 1, y + 1]}
            for p, v, x, y in [("full", "-", 1.0, None), ("fora", "rule", 2.0, 30.0), ("fora", "rule", 3.0, 25.0),
                               ("fora", "tuned", 2.0, 31.0), ("soda", "-", 2.0, 35.0), ("soda", "-", 3.0, 31.0)]]
    frontier_plot(rows, tmp_path / "f.png", title="t")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_bench_on_ort_reports_runtime_against_monolithic(strong_tiny_model, tmp_path, monkeypatch):
    """--backend ort: fidelity from the exported graphs, plus the runtime timing section, whose
    arithmetic is checked on a fake clock (monolithic 2 s, stitched full 3 s, FORA 1 s a run)."""
    import types

    import soda.bench_runtime as br
    from export.onnx_export import export_model
    from soda.policies import ScheduleSpec, make_schedule

    tiny_model = strong_tiny_model
    clock = {"t": 0.0}

    def timed(make, cost):
        def wrapper(*args, **kw):
            loop = make(*args, **kw)

            def run():
                out = loop()
                clock["t"] += cost(args)
                return out
            return run
        return wrapper

    monkeypatch.setattr(br, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"], process_time=lambda: clock["t"]))
    monkeypatch.setattr(br, "monolithic_loop", timed(br.monolithic_loop, lambda a: 2.0))
    monkeypatch.setattr(br, "schedule_loop", timed(br.schedule_loop, lambda a: {"full": 3.0, "fora": 1.0}[a[3].policy]))
    sampler = SamplerConfig("ddim", 6, 4.0, None)
    spec = ScheduleSpec.for_model(tiny_model.config, "ddim", 6)
    export_model(tiny_model, "w", make_schedule("full", spec), sampler, tmp_path / "eng", progress=False, echo=lambda s: None)
    setup = BenchSetup(["full", "fora"], 2.0, samples=4, batch_size=4, backend="ort", engines_dir=str(tmp_path / "eng"),
                       timing_images=1, timing_repeats=2, eval_seeds=2, tune=False)
    report = bench(tiny_model, "w", sampler, setup, echo=lambda s: None)
    torch_report = bench(tiny_model, "w", sampler, BenchSetup(["full", "fora"], 2.0, samples=4, batch_size=4,
                                                              eval_seeds=2, tune=False), echo=lambda s: None)
    # Same schedules, same noise: the deploy runtime's fidelity equals the reference's (strong
    # weights, so a module graph 0.1% off would move the PSNR far more than this).
    assert report["results"][1]["psnr_db"] == pytest.approx(torch_report["results"][1]["psnr_db"], abs=0.01)
    assert report["results"][1]["psnr_db"] < 90  # FORA really differs from full here (69 dB)
    rt = report["runtime"]
    assert rt["images"] == 1  # timing_images (--timing-images): the first of the evaluation samples
    names = [r["name"] for r in rt["rows"]]
    assert names == ["monolithic full", "stitched full", "stitched fora rule"]
    assert rt["monolithic_max_rel_diff"] < 1e-4  # the monolithic graph computes the same samples
    assert rt["stitched_over_monolithic"] == pytest.approx(1.5)  # stitched 3 s / monolithic 2 s
    assert rt["stitched_over_monolithic_cpu"] == pytest.approx(1.5)
    # graph calls per step: a full step is one step graph (embed, every layer and final inside)
    assert rt["rows"][0]["calls_per_step"] == 1.0 and rt["rows"][1]["calls_per_step"] == 1.0
    fora = rt["rows"][2]
    assert fora["wall_speedup"] == pytest.approx(3.0) and fora["rounds"] == [1.0, 1.0]
    assert fora["flops_speedup"] == pytest.approx(report["results"][1]["flops_speedup"], rel=1e-3)
    assert fora["efficiency"] == pytest.approx(3.0 / report["results"][1]["flops_speedup"], rel=1e-3)
    json.dumps(report)
