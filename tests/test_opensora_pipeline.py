"""Open-Sora through the toolchain on `opensora-tiny` (random weights: fidelity numbers mean nothing
here, only agreement does): every policy through the PyTorch executor and the exported graphs on
numpy + onnxruntime, the CLI end to end, and bad input as one line."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from soda.schedule import SKIP, parse_action

STEPS = 8


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_cli(args: list[str], monkeypatch, capsys) -> subprocess.CompletedProcess:
    from tests.conftest import cli_in_process

    return cli_in_process(args, monkeypatch, capsys)


def prompts(n: int = 3, channels: int = 32, L: int = 16) -> dict:
    rng = np.random.default_rng(0)
    mask = np.zeros((n, L), dtype=np.int64)
    for i in range(n):
        mask[i, : 3 + 5 * i] = 1  # captions of 3, 8, 13 tokens
    return {"prompt_embeds": rng.standard_normal((n, L, channels)).astype(np.float32), "prompt_attention_mask": mask}


@pytest.fixture(scope="module")
def tiny():
    from soda.models.loading import load_model
    from soda.models.opensora import apply_video

    model, weights = load_model("opensora-tiny", random_init=True)
    video = apply_video(model)
    return model, weights, video


def test_all_policies_torch_and_runtime_agree(tiny, tmp_path):
    """full, FORA, ToCa, DuCa and SODA at 2x FLOPs: the exported graphs (numpy + onnxruntime) give
    the PyTorch executor's samples to 1e-4; self-attention is never pruned (full or reuse only)."""
    from export.onnx_export import export_model
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.captions import PromptEmbeds, caption_conditioning
    from soda.generate import full_flops, generate, with_video
    from soda.pipeline import resolve_schedule, spec_for
    from soda.policies import make_schedule
    from soda.profile import profile
    from soda.sampling import SamplerConfig, initial_noise
    from soda.torch_backend import TorchBackend

    model, weights, video = tiny
    config = model.config
    sampler = SamplerConfig("rflow", STEPS, 7.0, None, video=video)
    p = prompts()
    cond = with_video(caption_conditioning(PromptEmbeds(p["prompt_embeds"], p["prompt_attention_mask"].astype(np.float32)),
                                           model.null_caption_table()), config, sampler)
    prof = profile(model, sampler, samples=2, seed=0, batch_size=2, conditioning=cond.rows(slice(0, 2)),
                   weights=weights, rates=(0.25, 0.5))
    assert np.isnan(prof.ep()[:, :, 0]).all() and np.isfinite(prof.ep()[1:, :, 2]).any()  # attn: no prune entry
    # Module by module (the block graphs' parity is tests/test_opensora_blocks.py's).
    export_model(model, weights, make_schedule("full", spec_for(model, sampler)), sampler, tmp_path / "eng",
                 progress=False, echo=lambda *a: None, blocks=False)
    engines = open_engines(tmp_path / "eng")
    x, _ = initial_noise(len(cond), config.latent_shape, 3)
    for policy in ("full", "fora", "toca", "duca", "soda"):
        sched = resolve_schedule(model, weights, sampler, policy, speedup=None if policy == "full" else 2.0,
                                 profile_file=prof, echo=lambda *a: None)
        for s in range(STEPS):
            if not sched.is_skip(s):
                assert all(parse_action(row[0])[0] in ("full", "reuse") for row in sched.steps[s]), (policy, s)
        want, stats = generate(TorchBackend(model), config, sampler, sched, cond, noise=x)
        got, _ = generate(OrtBackend(engines, threads=1), config, sampler, sched, cond, noise=x)
        assert rel(got, want) < 1e-4, policy
        speed = full_flops(config, sampler, len(cond)) / stats.flops
        # the bench's window [target, 1.03 target]; FORA moves by whole anchor steps, so at least the target
        in_window = 2.0 * (1 - 1e-9) <= speed <= 2.0 * 1.03 or (policy == "fora" and speed >= 2.0)
        assert speed == pytest.approx(1.0) if policy == "full" else in_window, (policy, speed)
    assert any(step == SKIP for step in make_schedule("duca", spec_for(model, sampler)).steps)


def test_cli_sample_run_and_bad_input(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "p.npz", **prompts(2))
    np.save(tmp_path / "noise.npy", np.random.default_rng(1).standard_normal((2, 4, 5, 8, 8)).astype(np.float32))
    base = ["--model", "opensora-tiny", "--random-init", "--prompt-embeds", str(tmp_path / "p.npz")]
    r = run_cli(["sample", *base, "--noise", str(tmp_path / "noise.npy"), "--steps", "3", "--height", "64",
                 "--width", "64", "--num-frames", "17", "--fps", "24", "--save-latents", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "x.png")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert "rflow-3" in r.stdout and np.load(tmp_path / "x.npy").shape == (2, 4, 5, 8, 8)
    assert (tmp_path / "x.png").stat().st_size > 0
    # Without --noise the latent follows from the video: 51 frames of 48 x 80 -> 15 x 6 x 10.
    r = run_cli(["sample", *base, "--steps", "1", "--height", "48", "--width", "80", "--num-frames", "51",
                 "--save-latents", str(tmp_path / "y.npy"), "--out", str(tmp_path / "y.png")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "y.npy").shape == (2, 4, 15, 6, 10)

    np.savez(tmp_path / "wide.npz", **prompts(2, channels=48))
    cases = [
        (["sample", *base, "--noise", str(tmp_path / "noise.npy"), "--height", "96"],
         "expected [2, 4, 5, 12, 8]: [n, C, T, H, W] with the latent frames, height and width of --num-frames"),
        (["sample", *base, "--num-frames", "40"], "expected"),  # 40 frames -> 12 latents, noise has 5
        (["sample", "--model", "opensora-tiny", "--random-init", "--prompt-embeds", str(tmp_path / "wide.npz")],
         "caption dimension 48, the checkpoint expects 32"),
        (["sample", *base, "--num-frames", "8"], "--num-frames 8: rflow's timestep transform needs 1 frame"),
        (["sample", *base, "--num-frames", "0"], "--num-frames must be at least 1"),
        (["sample", *base, "--sampler", "ddim"], "--sampler rflow is Open-Sora's"),
        (["sample", "--model", "dit-digits", "--height", "64"], "are for video models; dit-digits is an image model"),
        (["sample", *base, "--vae", str(tmp_path)], "Open-Sora's video VAE is not supported"),
        (["sample", *base, "--height", "0"], "--height and --width must be at least 8 pixels, got 0x64"),
        # refused before any work, not killed for memory half-way through sampling
        (["sample", *base, "--height", "100000", "--width", "100000", "--num-frames", "1"],
         "GiB for its token caches"),
    ]
    for args, msg in cases:
        if "--num-frames" in args and "40" in args:
            args = args + ["--noise", str(tmp_path / "noise.npy")]
        r = run_cli(args + ["--steps", "1", "--out", str(tmp_path / "z.png")], monkeypatch, capsys)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines and lines[-1].startswith("error: ") and msg in lines[-1], (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_tiny_export_reports_size(tiny, tmp_path, monkeypatch, capsys):
    r = run_cli(["export", "--model", "opensora-tiny", "--random-init", "--policy", "duca", "--out",
                 str(tmp_path / "eng")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert "the raw fp32 weights" in r.stdout
    np.savez(tmp_path / "p.npz", **prompts(1))
    r = run_cli(["run", "--engines", str(tmp_path / "eng"), "--prompt-embeds", str(tmp_path / "p.npz"),
                 "--out", str(tmp_path / "r.png")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert "rflow-30, policy duca" in r.stdout


def test_forecast_policies_torch_and_runtime_agree(tiny, tmp_path):
    """TaylorSeer and soda-forecast (Taylor forecasts of cached outputs) on the video model: the
    exported graphs give the PyTorch executor's samples to 1e-4, at the FLOPs asked for."""
    from export.onnx_export import export_model
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.captions import PromptEmbeds, caption_conditioning
    from soda.generate import full_flops, generate, with_video
    from soda.pipeline import resolve_schedule, spec_for
    from soda.policies import make_schedule
    from soda.profile import profile
    from soda.sampling import SamplerConfig, initial_noise
    from soda.schedule import forecast_order
    from soda.torch_backend import TorchBackend

    model, weights, video = tiny
    config = model.config
    sampler = SamplerConfig("rflow", STEPS, 7.0, None, video=video)
    p = prompts(2)
    cond = with_video(caption_conditioning(PromptEmbeds(p["prompt_embeds"], p["prompt_attention_mask"].astype(np.float32)),
                                           model.null_caption_table()), config, sampler)
    prof = profile(model, sampler, samples=2, seed=0, batch_size=2, conditioning=cond, weights=weights,
                   rates=(0.25, 0.5), orders=(1, 2))
    # Module by module (the block graphs' parity is tests/test_opensora_blocks.py's).
    export_model(model, weights, make_schedule("full", spec_for(model, sampler)), sampler, tmp_path / "eng",
                 progress=False, echo=lambda *a: None, blocks=False)
    engines = open_engines(tmp_path / "eng")
    x, _ = initial_noise(len(cond), config.latent_shape, 5)
    for policy in ("taylorseer", "soda-forecast"):
        sched = resolve_schedule(model, weights, sampler, policy, speedup=2.0, profile_file=prof, echo=lambda *a: None)
        forecasts = sum(1 for st in sched.steps if st != SKIP for row in st for a in row if forecast_order(a))
        assert sched.policy == policy and (forecasts > 0 or policy == "soda-forecast"), (policy, forecasts)
        want, stats = generate(TorchBackend(model), config, sampler, sched, cond, noise=x)
        got, _ = generate(OrtBackend(engines, threads=1), config, sampler, sched, cond, noise=x)
        assert rel(got, want) < 1e-4, policy
        speed = full_flops(config, sampler, len(cond)) / stats.flops  # TaylorSeer: whole full steps, like FORA
        assert 2.0 * (1 - 1e-9) <= speed and (speed <= 2.0 * 1.03 or policy == "taylorseer"), (policy, speed)
    # soda-forecast may plan no forecast here: a hand-made schedule runs every kind on the video
    # model's three modules, pruned on a forecast included (self-attention is not prunable).
    from soda.schedule import FULL, REUSE, Schedule, forecast, prune

    grid = lambda row: [list(row) for _ in range(config.depth)]  # noqa: E731
    steps = [grid([FULL] * 3), grid([FULL] * 3), grid([forecast(1), prune(0.5, 1), prune(0.25, 1)]),
             grid([FULL] * 3), grid([forecast(2), forecast(2), prune(0.5, 2)]), grid([REUSE, prune(0.5), forecast(2)]),
             grid([FULL] * 3), grid([forecast(1), REUSE, prune(0.75, 1)])]
    hand = Schedule("hand", config.name, config.hash(), "rflow", STEPS, list(config.modules), config.depth, steps,
                    selector="feature-mean").validate()
    assert max(forecast_order(a) for step in hand.steps for row in step for a in row) == 2
    want, _ = generate(TorchBackend(model), config, sampler, hand, cond, noise=x)
    got, _ = generate(OrtBackend(engines, threads=1), config, sampler, hand, cond, noise=x)
    assert rel(got, want) < 1e-4


def test_bench_runs_forecast_policies_on_the_runtime(tmp_path, monkeypatch, capsys):
    """`bench --backend ort` on opensora-tiny with TaylorSeer and soda-forecast: every row measured."""
    import json

    np.savez(tmp_path / "p.npz", **prompts(4))
    r = run_cli(["export", "--model", "opensora-tiny", "--random-init", "--policy", "full", "--steps", "6",
                 "--out", str(tmp_path / "eng")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    r = run_cli(["bench", "--model", "opensora-tiny", "--random-init", "--prompt-embeds", str(tmp_path / "p.npz"),
                 "--policies", "full,taylorseer,soda-forecast", "--speedup", "2", "--samples", "4",
                 "--profile-samples", "2", "--no-tune", "--steps", "6", "--batch-size", "2", "--backend", "ort",
                 "--engines", str(tmp_path / "eng"), "--json", str(tmp_path / "b.json")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["backend"].startswith("onnxruntime")
    rows = {row["policy"]: row for row in out["results"]}
    assert set(rows) == {"full", "taylorseer", "soda-forecast"}
    for policy in ("taylorseer", "soda-forecast"):
        speed = rows[policy]["flops_speedup"]  # rounded to 4 decimals; TaylorSeer moves by whole full steps
        assert 2.0 * 0.999 <= speed and (speed <= 2.0 * 1.03 or policy == "taylorseer"), rows[policy]
        assert np.isfinite(rows[policy]["psnr_db"]), rows[policy]
    # the runtime-vs-monolithic timing takes class labels: asked for on a text model, refused before any work
    r = run_cli(["bench", "--model", "opensora-tiny", "--random-init", "--prompt-embeds", str(tmp_path / "p.npz"),
                 "--backend", "ort", "--engines", str(tmp_path / "eng"), "--timing-per-module", "--json",
                 str(tmp_path / "t.json")], monkeypatch, capsys)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "opensora-tiny is text-conditioned" in lines[-1] and "Traceback" not in r.stderr
    assert not (tmp_path / "t.json").exists()


def test_one_export_runs_other_video_sizes(tmp_path, monkeypatch, capsys):
    """The video graphs take the latent size as dynamic axes: one export (17 frames of 64 x 64, rflow-4)
    runs 17 frames and 34 frames of 104 x 80 (13 x 10 latents: patch padding, another position-
    embedding base), at the exported 4 steps and at `--steps 3`, each equal to `sample` with that
    size, steps and policy to 1e-4 (the exported ToCa is remade there, as `sample` makes it); an
    exported SODA plan is refused at another size or step count, one line."""
    np.savez(tmp_path / "p.npz", **prompts(2))
    r = run_cli(["export", "--model", "opensora-tiny", "--random-init", "--policy", "toca", "--steps", "4",
                 "--out", str(tmp_path / "eng")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    other = ["--num-frames", "34", "--height", "104", "--width", "80"]
    for video, steps in [([], "4"), ([], "3"), (other, "4"), (other, "3")]:
        base = ["--prompt-embeds", str(tmp_path / "p.npz"), "--steps", steps, "--seed", "3"]
        # `run` without --policy: the exported ToCa, remade for another size or step count (no profile needed)
        r = run_cli(["run", "--engines", str(tmp_path / "eng"), *base, *video, "--save-latents",
                     str(tmp_path / "r.npy"), "--out", str(tmp_path / "r.png")], monkeypatch, capsys)
        assert r.returncode == 0, r.stderr
        assert f"rflow-{steps}, policy toca" in r.stdout
        r = run_cli(["sample", "--model", "opensora-tiny", "--random-init", "--policy", "toca", *base, *video,
                     "--save-latents", str(tmp_path / "s.npy"), "--out", str(tmp_path / "s.png")], monkeypatch, capsys)
        assert r.returncode == 0, r.stderr
        got, want = np.load(tmp_path / "r.npy"), np.load(tmp_path / "s.npy")
        assert got.shape == want.shape == ((2, 4, 10, 13, 10) if video else (2, 4, 5, 8, 8))
        assert rel(got, want) < 1e-4, video
    # A schedule exported under a baseline's name that is not that baseline's own (a --schedule file,
    # a tuned one) runs as it is at the exported sampler, and is refused rather than remade elsewhere.
    import dataclasses

    from runtime.engines import open_engines, resolve_schedule
    from soda.errors import UserError

    engines = open_engines(tmp_path / "eng")
    own = engines.exported_schedule
    tuned = dataclasses.replace(own, params={**own.params, "N": own.params["N"] + 1})
    engines = dataclasses.replace(engines, exported_schedule=tuned)
    assert resolve_schedule(engines, engines.sampler) is tuned
    with pytest.raises(UserError, match="exported toca schedule is not toca's own setting .* cannot be remade for rflow-3"):
        resolve_schedule(engines, engines.sampler_with(steps=3))

    bad = ["run", "--engines", str(tmp_path / "eng"), "--prompt-embeds", str(tmp_path / "p.npz"), "--steps", "2",
           "--out", str(tmp_path / "z.png")]
    np.save(tmp_path / "noise.npy", np.zeros((2, 4, 5, 8, 8), dtype=np.float32))
    np.savez(tmp_path / "wide.npz", **prompts(2, channels=48))
    cases = [
        (bad + ["--policy", "soda", "--num-frames", "34"], "exported with a 'toca' schedule, not a soda one"),
        (bad + ["--policy", "full", "--num-frames", "8"], "--num-frames 8: rflow's timestep transform needs 1 frame"),
        (bad + ["--policy", "full", "--num-frames", "34", "--noise", str(tmp_path / "noise.npy")],
         "expected [2, 4, 10, 8, 8]: [n, C, T, H, W] with the latent frames, height and width of --num-frames"),
        ([a if a != str(tmp_path / "p.npz") else str(tmp_path / "wide.npz") for a in bad],
         "caption dimension 48, the checkpoint expects 32"),
    ]
    for args, msg in cases:
        r = run_cli(args, monkeypatch, capsys)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines and lines[-1].startswith("error: ") and msg in lines[-1], (args, r.stderr)
        assert "Traceback" not in r.stderr

    # A SODA plan comes from a profile of the exported video: another size is refused, one line.
    tiny = ["--model", "opensora-tiny", "--random-init", "--prompt-embeds", str(tmp_path / "p.npz"), "--steps", "4"]
    r = run_cli(["profile", *tiny, "--samples", "1", "--intervals", "1,2", "--rates", "0.5", "--orders", "none",
                 "--out", str(tmp_path / "prof.json")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    r = run_cli(["export", *tiny[:3], *tiny[5:], "--policy", "soda", "--speedup", "1.5", "--profile", str(tmp_path / "prof.json"),
                 "--out", str(tmp_path / "soda")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    r = run_cli(["run", "--engines", str(tmp_path / "soda"), "--prompt-embeds", str(tmp_path / "p.npz"),
                 "--num-frames", "34", "--out", str(tmp_path / "z.png")], monkeypatch, capsys)
    assert r.returncode == 2 and "soda schedule was planned from a profile of the exported video (64x64, 17 frames)" \
        in r.stderr.strip().splitlines()[-1], r.stderr
    r = run_cli(["run", "--engines", str(tmp_path / "soda"), "--prompt-embeds", str(tmp_path / "p.npz"),
                 "--steps", "3", "--out", str(tmp_path / "z.png")], monkeypatch, capsys)
    assert r.returncode == 2 and "soda schedule was planned for rflow-4 (from a profile of that sampler), not rflow-3" \
        in r.stderr.strip().splitlines()[-1], r.stderr


def test_trt_profiles_fix_the_exported_video():
    """TensorRT optimization profiles take a video graph's size axes at the exported video (the
    engines serve that size; onnxruntime any)."""
    from export.trt import _profiles

    art = {"inputs": [{"name": "x", "shape": ["B", 4, "T", "H", "W"]}, {"name": "grid", "shape": ["B", 3]}]}
    (prof,) = _profiles(art, [80], max_batch=8, video={"T": 5, "H": 8, "W": 8, "N": 80})
    assert prof["shapes"]["x"] == [[1, 4, 5, 8, 8], [8, 4, 5, 8, 8], [8, 4, 5, 8, 8]]
    assert prof["shapes"]["grid"] == [[1, 3], [8, 3], [8, 3]]


def test_dynamo_exporter_refuses_video_graphs(tmp_path, monkeypatch, capsys):
    r = run_cli(["export", "--model", "opensora-tiny", "--random-init", "--exporter", "dynamo", "--steps", "2",
                 "--out", str(tmp_path / "eng")], monkeypatch, capsys)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: video graphs take the video "
                                                                              "size as dynamic axes"), r.stderr
    assert not (tmp_path / "eng").exists()


def test_generate_bad_video_input_is_one_line(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "p.npz", **prompts(2))
    np.savez(tmp_path / "wide.npz", **prompts(2, channels=48))
    base = ["generate", "--model", "opensora-tiny", "--random-init", "--num-samples", "2", "--steps", "1"]
    cases = [
        (["--prompt-embeds", str(tmp_path / "p.npz"), "--num-frames", "8"], "--num-frames 8: rflow's timestep"),
        (["--prompt-embeds", str(tmp_path / "p.npz"), "--vae", str(tmp_path)], "Open-Sora's video VAE is not supported"),
        (["--prompt-embeds", str(tmp_path / "wide.npz")], "caption dimension 48, the checkpoint expects 32"),
    ]
    for args, msg in cases:
        r = run_cli(base + args + ["--out", str(tmp_path / "g")], monkeypatch, capsys)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines and lines[-1].startswith("error: ") and msg in lines[-1], (args, r.stderr)
        assert not (tmp_path / "g").exists()


def test_parity_counts_a_large_score_relative_to_its_size():
    """DuCa's value norms (sums of |v| in the hundreds at the XL width) are compared relative to their
    magnitude; D stays absolute (1e-4)."""
    from types import SimpleNamespace

    from export.onnx_export import _max_err

    spec = SimpleNamespace(name="attn.0", module=SimpleNamespace(spec=SimpleNamespace(score="value_norm")),
                           outputs=[("D", None, None), ("value_norm", None, None)])
    D, vn = np.ones((1, 4, 2)), np.full((1, 4), 250.0)
    assert _max_err(spec, 4, [D, vn + 5e-5], [D, vn]) == pytest.approx(5e-5 / 250)
    assert _max_err(spec, 4, [D + 5e-5, vn], [D, vn]) == pytest.approx(5e-5)
