"""dit-digits: data, the official training loss, the training loop (smoke), the shipped
weights and classifier, the metrics, and the issue-3 acceptance check."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soda.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def split():
    from soda.digits.data import load_split

    return load_split()


@pytest.fixture(scope="module")
def classifier():
    from soda.digits.classifier import DigitClassifier

    return DigitClassifier.load_default()


# --- data -----------------------------------------------------------------------------------
def test_upsample_is_torch_bilinear():
    from soda.digits.data import upsample

    raw = np.random.default_rng(0).integers(0, 17, size=(5, 8, 8))
    ref = torch.nn.functional.interpolate(torch.tensor(raw / 16 * 2 - 1)[:, None], size=16, mode="bilinear",
                                          align_corners=False).numpy()
    np.testing.assert_allclose(upsample(raw), ref, atol=1e-6)
    assert upsample(np.zeros((1, 8, 8))).max() == -1.0 and upsample(np.full((1, 8, 8), 16)).min() == 1.0


def test_split_is_fixed_disjoint_and_stratified(split):
    from soda.digits.data import load_split

    assert split.train_images.shape == (1438, 1, 16, 16) and split.held_images.shape == (359, 1, 16, 16)
    assert split.train_images.min() >= -1 and split.train_images.max() <= 1
    counts = np.bincount(split.held_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    flat_train = {x.tobytes() for x in split.train_images}
    assert sum(x.tobytes() in flat_train for x in split.held_images) <= 2  # the raw data has a few duplicates
    again = load_split()
    np.testing.assert_array_equal(again.held_labels, split.held_labels)
    np.testing.assert_array_equal(again.held_images, split.held_images)


# --- metrics --------------------------------------------------------------------------------
def test_psnr_hand_values():
    from soda.metrics import psnr

    b = np.linspace(-1, 1, 200).reshape(2, 1, 10, 10)
    assert psnr(b + 0.1, b) == pytest.approx(10 * np.log10(4 / 0.01))  # peak = range of b = 2
    assert psnr(b + 0.1, b, peak=1.0) == pytest.approx(10 * np.log10(1 / 0.01))
    assert psnr(b, b) == float("inf")
    with pytest.raises(ValueError):
        psnr(b, b[:1])


def test_cosine_hand_values():
    from soda.metrics import cosine

    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(a, np.array([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx((0 + 1 / np.sqrt(2)) / 2)


def test_frechet_distance_closed_forms():
    from soda.metrics import feature_stats, frechet_distance

    f = np.random.default_rng(0).standard_normal((200, 4))
    mu, cov = feature_stats(f)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
    eye = np.eye(3)
    assert frechet_distance(np.ones(3), eye, np.zeros(3), eye) == pytest.approx(3.0)
    # Isotropic covariances s^2 I vs I: d * (s - 1)^2
    assert frechet_distance(np.zeros(3), 4 * eye, np.zeros(3), eye) == pytest.approx(3.0)


# --- the official training loss ---------------------------------------------------------------
def test_vb_and_mse_vanish_for_the_true_posterior():
    """Predicting the true noise and the posterior variance (frac = -1 -> the clipped posterior
    log-variance) makes both terms 0 for t >= 1; anything else costs more."""
    from soda.digits.train import TrainingDiffusion

    d = TrainingDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    t = torch.tensor([1, 5, 100, 400, 800, 999])
    noise = torch.randn(x0.shape, generator=g)
    xt = d.q_sample(x0, t, noise)
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    terms = d.training_losses(perfect, x0, xt, t, noise)
    assert terms["mse"].abs().max() < 1e-10
    assert terms["vb"].abs().max() < 1e-4
    worse = d.training_losses(torch.cat([noise, torch.ones_like(noise)], dim=1), x0, xt, t, noise)
    assert (worse["vb"][:2] > 1e-3).all()  # at large t, beta ~ posterior variance: both choices agree


def test_vb_at_t0_is_the_discretized_decoder_nll():
    from soda.digits.train import TrainingDiffusion, discretized_gaussian_log_likelihood

    x = torch.tensor([-1.0, 0.0, 1.0])
    ll = discretized_gaussian_log_likelihood(x, x.clone(), torch.full_like(x, np.log(1e-3)))
    # A sharp Gaussian centred on the bin: nearly all mass inside it (edges: half-line bins).
    assert torch.exp(ll).min() > 0.99
    d = TrainingDiffusion()
    x0 = torch.zeros(1, 1, 16, 16)
    t = torch.zeros(1, dtype=torch.long)
    out = torch.cat([torch.zeros_like(x0), -torch.ones_like(x0)], dim=1)
    vb = d.training_losses(out, x0, d.q_sample(x0, t, torch.zeros_like(x0)), t, torch.zeros_like(x0))["vb"]
    sigma = np.exp(0.5 * d.tables["post_log_var_clipped"][0])
    from scipy.stats import norm

    expected_bits = -np.log2(norm.cdf(1 / 255 / sigma) - norm.cdf(-1 / 255 / sigma))
    assert float(vb) == pytest.approx(expected_bits, rel=2e-3)


# --- training (smoke, seconds) ----------------------------------------------------------------
def test_training_smoke_is_reproducible_and_loadable(tmp_path):
    from safetensors.torch import load_file

    from soda.digits.train import TrainConfig, train
    from soda.models.loading import load_model

    cfg = TrainConfig(steps=3, batch_size=8, log_every=1, seed=5)
    a = train("dit-digits", cfg, tmp_path / "a.safetensors", tmp_path / "a.jsonl")
    train("dit-digits", cfg, tmp_path / "b.safetensors")
    train("dit-digits", TrainConfig(steps=3, batch_size=8, seed=6), tmp_path / "c.safetensors")
    wa, wb, wc = (load_file(str(tmp_path / f"{k}.safetensors")) for k in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(np.isfinite(x["loss"]) for x in lines)
    assert a["last"]["step"] == 3
    model, weights = load_model("dit-digits", tmp_path / "a.safetensors")
    assert len(weights) == 64


def test_cli_train_smoke_and_bad_input(tmp_path):
    out = tmp_path / "w.safetensors"
    r = run_cli("train", "--steps", "2", "--batch-size", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.is_file() and (tmp_path / "w.log.jsonl").is_file()
    r = run_cli("train", "--steps", "0", "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    r = run_cli("train", "--model", "dit-s-2", "--steps", "1", "--out", str(out))
    assert r.returncode == 2 and "digits" in r.stderr


# --- shipped assets -------------------------------------------------------------------------
def test_shipped_classifier_recognises_held_out_digits(classifier, split):
    assert classifier.accuracy(split.held_images, split.held_labels) >= 0.95
    # Real digits sit close to the reference; noise and blank images far away.
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(split.train_labels == k), 10, replace=False) for k in range(10)])
    real = classifier.frechet(split.train_images[idx])
    noise = classifier.frechet(rng.standard_normal((100, 1, 16, 16)).astype(np.float32))
    assert real < 20 and noise > 10 * real
    with pytest.raises(UserError, match=r"takes images \[n, 1, 16, 16\], got \[2, 1, 8, 8\]"):
        classifier.predict(np.zeros((2, 1, 8, 8), np.float32))


def test_shipped_weights_meet_the_issue(split):
    """100 samples, 10 per class, DDIM-50 at the default CFG: an independent SVC (fitted on the
    held-out split, not the shipped CNN) recognises >= 90%. The issue's "under 10 s" is a speed
    claim, measured by a command in docs/digits.md, not asserted here: a wall-clock limit in a
    unit test fails on a loaded machine and proves nothing on a quiet one."""
    from soda.digits.evaluate import DEFAULT_CFG_SCALE, digit_labels, independent_accuracy, sample_digits
    from soda.models.loading import PACKAGED, load_model

    assert PACKAGED["dit-digits"].is_file()
    model, _ = load_model("dit-digits")
    labels = digit_labels(10)
    x, _ = sample_digits(model, labels, DEFAULT_CFG_SCALE, 50, seed=0)
    assert x.shape == (100, 1, 16, 16) and np.isfinite(x).all()
    assert independent_accuracy(x, labels) >= 0.9


def test_cli_sample_default_weights(tmp_path):
    out = tmp_path / "grid.png"
    r = run_cli("sample", "--model", "dit-digits", "--labels", "0,1,2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(out).size[0] > 3 * 64
