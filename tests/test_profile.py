"""OFS: the profile's tables equal a direct computation on the same full trajectory."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soda.errors import UserError
from soda.profile import Profile, profile
from soda.sampling import SamplerConfig
from soda.schedule import kept_tokens

ROOT = Path(__file__).resolve().parent.parent
INTERVALS, RATES = (1, 2), (0.25, 0.5)


@pytest.fixture(scope="module")
def sampler():
    return SamplerConfig("ddim", 4, 4.0, None)


@pytest.fixture(scope="module")
def prof(tiny_model, sampler):
    return profile(tiny_model, sampler, samples=3, seed=0, intervals=INTERVALS, rates=RATES, weights="test")


@pytest.fixture(scope="module")
def prof_approx(tiny_model, sampler):
    return profile(tiny_model, sampler, samples=3, seed=0, intervals=INTERVALS, rates=RATES, exact_attention=False)


def trajectory(model, sampler, samples, seed):
    """Every module's inputs and output D(s, l, m) of the calibration run, recorded the obvious way."""
    from soda.executor import Executor
    from soda.flops import FlopsModel
    from soda.policies import ScheduleSpec
    from soda.policies.full import full_schedule
    from soda.sampling import Diffusion, initial_noise, sample_loop
    from soda.torch_backend import TorchBackend

    class Tap(TorchBackend):
        def module(self, layer, name, tokens, shift, scale, context=None):
            inputs[(len(D) // (2 * cfg.depth), layer, name)] = (tokens.copy(), shift, scale)
            return super().module(layer, name, tokens, shift, scale, context=context)

    cfg = model.config
    D, inputs = {}, {}
    backend = Tap(model)
    ex = Executor(backend, full_schedule(ScheduleSpec.for_model(cfg, "ddim", sampler.steps)),
                  FlopsModel.for_config(cfg), recorder=lambda s, l, name, d: D.__setitem__((s, l, name), d.copy()))
    from soda import seeds

    labels = np.random.default_rng(seeds.calibration(seed, seeds.PROFILE, 0)).integers(0, cfg.num_classes, samples)
    z, rng = initial_noise(samples, (cfg.in_channels, cfg.input_size, cfg.input_size),
                           seeds.calibration(seed, seeds.PROFILE, 1))
    sample_loop(ex, Diffusion(sampler), z, labels, cfg.null_label, cfg.in_channels, rng)
    return D, inputs, backend


def cos_dist(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return 1 - (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


@pytest.mark.parametrize("exact", [True, False])
def test_tables_match_direct_computation(prof, prof_approx, tiny_model, sampler, exact):
    """E_c and E_p from the definitions. Pruned attention (exact) attends among the kept tokens."""
    D, inputs, backend = trajectory(tiny_model, sampler, 3, 0)
    p = prof if exact else prof_approx
    ec, ep = p.ec(), p.ep()
    S, L, M, K = ec.shape
    assert (S, L, M, K) == (4, 2, 2, 2) and ep.shape == (4, 2, 2, 2, 2)
    N = tiny_model.config.num_tokens
    for s in range(S):
        for l in range(L):
            for m, name in enumerate(p.modules):
                for j, k in enumerate(INTERVALS):
                    if s < k:
                        assert np.isnan(ec[s, l, m, j]) and np.isnan(ep[s, l, m, :, j]).all()
                        continue
                    old, new = D[(s - k, l, name)], D[(s, l, name)]
                    assert old.shape[0] == 6  # CFG: the doubled batch as sampled
                    assert ec[s, l, m, j] == pytest.approx(cos_dist(old, new).mean(), rel=1e-4, abs=1e-9)
                    score = np.abs(old).mean(axis=2)
                    for i, a in enumerate(RATES):
                        idx = np.sort(np.argsort(-score, axis=1, kind="stable")[:, :kept_tokens(a, N)], axis=1)[:, :, None]
                        if exact and name == "attn":
                            tokens, shift, scale = inputs[(s, l, name)]
                            fresh = backend.module(l, name, np.take_along_axis(tokens, idx, 1), shift, scale)[0]
                        else:
                            fresh = np.take_along_axis(new, idx, 1)
                        mixed = old.copy()
                        np.put_along_axis(mixed, idx, fresh, 1)
                        assert ep[s, l, m, i, j] == pytest.approx(cos_dist(mixed, new).mean(), rel=1e-4, abs=1e-9)
    assert np.nanmax(ec) > 0
    # Recomputing more tokens never makes the mixture worse on the token-wise MLP.
    mlp = p.modules.index("mlp")
    assert np.all(ep[1:, :, mlp, 1, 0] <= ep[1:, :, mlp, 0, 0] + 1e-12)


def test_exact_attention_changes_only_attention(prof, prof_approx):
    attn, mlp = prof.modules.index("attn"), prof.modules.index("mlp")
    np.testing.assert_allclose(prof.ep()[:, :, mlp], prof_approx.ep()[:, :, mlp], rtol=1e-5)
    np.testing.assert_allclose(prof.ec(), prof_approx.ec(), rtol=1e-5)
    assert np.nanmax(np.abs(prof.ep()[:, :, attn] - prof_approx.ep()[:, :, attn])) > 0


def test_identity_and_cost(prof, tiny_model):
    cfg = tiny_model.config
    assert prof.model_hash == cfg.hash() and prof.weights == "test" and prof.num_steps == 4
    assert prof.cost["seconds"] > 0 and prof.cost["generations"] == 3 and prof.cost["batch_rows"] == 6
    assert prof.cost["max_rss_mb"] > 0 and prof.cost["peak_traced_mb"] > 0


def test_peak_memory_is_measured_and_grows_with_the_batch(prof, tiny_model, sampler):
    """The traced peak is a measurement, not a constant: 8x the rows per batch hold more memory.
    (Both measured after the fixture's run: a first run in a process also traces one-time allocations.)"""
    import tracemalloc

    small, big = (profile(tiny_model, sampler, samples=n, seed=0, intervals=INTERVALS, rates=RATES) for n in (3, 24))
    assert big.cost["batch_rows"] == 48 and big.cost["peak_traced_mb"] > 2 * small.cost["peak_traced_mb"] > 0
    assert not tracemalloc.is_tracing()  # the profiler stops the tracing it started


def test_save_load_roundtrip(prof, tmp_path):
    path = tmp_path / "p.json"
    prof.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == 2 and data["kind"] == "soda-profile" and data["E_c"][0][0][0][0] is None
    back = Profile.load(path)
    np.testing.assert_allclose(back.ec(), prof.ec(), rtol=1e-5)
    np.testing.assert_allclose(back.ep(), prof.ep(), rtol=1e-5)
    np.testing.assert_allclose(back.ef(), prof.ef(), rtol=1e-5)
    np.testing.assert_allclose(back.epf(), prof.epf(), rtol=1e-5)
    # A format-1 profile (before forecasting) still loads, without forecast tables.
    for key in ("E_f", "E_pf", "orders", "gaps"):
        data.pop(key)
    data["format"] = 1
    path.write_text(json.dumps(data))
    old = Profile.load(path)
    assert not old.has_forecast and old.format == 1
    np.testing.assert_allclose(old.ec(), prof.ec(), rtol=1e-5)


def test_batches_do_not_mix_trajectories(tiny_model, sampler):
    """Batches of 2 + 1 generations: each batch's step 0 starts with an empty history."""
    split = profile(tiny_model, sampler, 3, 0, INTERVALS, RATES, batch_size=2)
    assert split.cost["batch_rows"] == 4
    ec = split.ec()
    for j, k in enumerate(INTERVALS):
        assert np.isnan(ec[:k, :, :, j]).all() and np.isfinite(ec[k:, :, :, j]).all()


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(kind="schedule"), "not a SODA profile"),
    (lambda d: d.update(format=99), "format 99"),
    (lambda d: d.update(E_c=[[1.0]]), "E_c has shape"),
    (lambda d: d.update(rates=[0.5, 1.5]), "rates"),
    (lambda d: d.pop("E_p"), "malformed"),
])
def test_bad_profiles_are_user_errors(prof, mutate, match):
    d = prof.to_dict()
    mutate(d)
    with pytest.raises(UserError, match=match):
        Profile.from_dict(d)


def test_check_fits(prof, tiny_model):
    cfg = tiny_model.config
    prof.check_fits(cfg.name, cfg.hash(), "ddim", 4)
    with pytest.raises(UserError, match="made for model"):
        prof.check_fits("other", "0" * 16, "ddim", 4)
    with pytest.raises(UserError, match="ddim-4, not ddim-50"):
        prof.check_fits(cfg.name, cfg.hash(), "ddim", 50)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_profile_writes_json_and_heatmap(tmp_path):
    r = run_cli("profile", "--random-init", "--steps", "3", "--samples", "2", "--intervals", "1,2",
                "--out", "p.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "peak traced memory" in r.stdout and "s;" in r.stdout
    assert (tmp_path / "p.png").stat().st_size > 1000
    p = Profile.load(tmp_path / "p.json")
    assert p.intervals == [1, 2] and p.weights == "random-init-0" and p.num_steps == 3


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON"), ('{"format": 1}', "not a SODA profile")])
def test_cli_rejects_bad_profile_file(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    r = run_cli("schedule", "--profile", "bad.json", "--speedup", "2", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0]


def test_exact_attention_on_a_row_subset(tiny_model, sampler):
    """attention_rows=2 measures pruned attention on rows 0 and B-1 (one per CFG half) only."""
    p = profile(tiny_model, sampler, 3, 0, (1,), (0.5,), attention_rows=2)
    D, inputs, backend = trajectory(tiny_model, sampler, 3, 0)
    rows = np.array([0, 5])
    s, l, N = 2, 1, tiny_model.config.num_tokens
    old, new = D[(s - 1, l, "attn")][rows], D[(s, l, "attn")][rows]
    idx = np.sort(np.argsort(-np.abs(old).mean(2), axis=1, kind="stable")[:, :kept_tokens(0.5, N)], axis=1)[:, :, None]
    tokens, shift, scale = inputs[(s, l, "attn")]
    fresh = backend.module(l, "attn", np.take_along_axis(tokens[rows], idx, 1), shift[rows], scale[rows])[0]
    mixed = old.copy()
    np.put_along_axis(mixed, idx, fresh, 1)
    assert p.ep()[s, l, 0, 0, 0] == pytest.approx(cos_dist(mixed, new).mean(), rel=1e-4)
    assert p.cost["attention_rows"] == 2
