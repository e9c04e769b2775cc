"""pixart-digits: the trained small PixArt conditioned only through captions of shipped word vectors.

The word table and caption encoding (exact), caption dropout, a reproducible training smoke run,
the shipped weights (they load, sample and draw the digit the caption names), bad captions (one
line), and the runtime equal to `sample` for every policy at 2.5x on the shipped weights.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def one_error_line(r, msg: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.stderr


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- captions ---------------------------------------------------------------------------------
def test_shipped_word_table_is_the_documented_draw():
    from soda.digits.captions import VOCABULARY, WordTable, make_word_table

    table = WordTable.load()
    assert table.words == list(VOCABULARY) and table.width == 32
    assert np.array_equal(table.table, make_word_table())


def test_encode_is_the_words_rows_with_padding():
    from soda.digits.captions import WordTable

    table = WordTable.load()
    p = table.encode(["a thin seven", "A  two"])
    row = {w: table.table[i] for i, w in enumerate(table.words)}
    assert p.embeds.shape == (2, 3, 32) and p.mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert np.array_equal(p.embeds[0], np.stack([row["a"], row["thin"], row["seven"]]))
    assert np.array_equal(p.embeds[1, :2], np.stack([row["a"], row["two"]])) and not p.embeds[1, 2].any()


def test_shipped_caption_set_and_cli_encode(tmp_path):
    from soda.captions import load_caption_texts, load_prompt_embeds
    from soda.digits.captions import CAPTIONS_PATH, WordTable, caption_labels, standard_captions

    shipped = load_prompt_embeds(CAPTIONS_PATH, 32)
    want = WordTable.load().encode(standard_captions())
    assert np.array_equal(shipped.embeds, want.embeds) and np.array_equal(shipped.mask, want.mask)
    assert load_caption_texts(CAPTIONS_PATH) == standard_captions()
    assert caption_labels(standard_captions()[:10]).tolist() == list(range(10))
    r = cli("encode", "--model", "pixart-digits", "--captions", "a thin seven,a bold zero, a two", "--out",
            str(tmp_path / "c.npz"))
    assert r.returncode == 0, r.stderr
    got = load_prompt_embeds(tmp_path / "c.npz", 32)
    assert np.array_equal(got.embeds, WordTable.load().encode(["a thin seven", "a bold zero", "a two"]).embeds)
    assert load_caption_texts(tmp_path / "c.npz") == ["a thin seven", "a bold zero", "a two"]


def test_bad_captions_one_line(tmp_path):
    out = tmp_path / "c.npz"
    one_error_line(cli("encode", "--captions", "a big seven", "--out", str(out)),
                   "unknown word 'big' in caption 'a big seven'; the vocabulary is: a, thin, bold, zero")
    one_error_line(cli("encode", "--captions", "a seven,,a two", "--out", str(out)), "caption 2 is empty")
    one_error_line(cli("encode", "--model", "dit-digits", "--captions", "a two", "--out", str(out)),
                   "encode knows pixart-digits' word table only")
    assert not out.exists()
    np.savez(tmp_path / "wide.npz", prompt_embeds=np.zeros((1, 3, 16), np.float32),
             prompt_attention_mask=np.ones((1, 3), np.float32))
    one_error_line(cli("sample", "--model", "pixart-digits", "--prompt-embeds", str(tmp_path / "wide.npz"),
                       "--out", str(tmp_path / "x.png")), "caption dimension 16, the checkpoint expects 32")


def test_token_drop_gives_the_null_caption_under_the_same_mask():
    from soda.models.config import get_config
    from soda.models.pixart import PixArt

    torch.manual_seed(0)
    model = PixArt(get_config("pixart-digits"))
    caption = torch.randn(3, 4, 32)
    out = model.y_embedder.token_drop(caption, torch.tensor([False, True, False]))
    assert torch.equal(out[0], caption[0]) and torch.equal(out[2], caption[2])
    assert torch.equal(out[1], model.y_embedder.y_embedding[:4])


# --- training ---------------------------------------------------------------------------------
def test_training_smoke_is_reproducible_warm_started_and_loadable(tmp_path):
    from safetensors.torch import load_file

    from soda.digits.train import Captions, TrainConfig, train, warm_start
    from soda.digits.data import load_split
    from soda.models.config import get_config
    from soda.models.loading import PACKAGED, load_model

    cfg = TrainConfig(steps=3, batch_size=8, log_every=1, seed=5, warm_start="dit-digits")
    train("pixart-digits", cfg, tmp_path / "a.safetensors", tmp_path / "a.jsonl")
    train("pixart-digits", cfg, tmp_path / "b.safetensors")
    train("pixart-digits", TrainConfig(steps=3, batch_size=8, seed=6, warm_start="dit-digits"), tmp_path / "c.safetensors")
    wa, wb, wc = (load_file(str(tmp_path / f"{k}.safetensors")) for k in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(np.isfinite(x["loss"]) for x in lines)
    model, weights = load_model("pixart-digits", tmp_path / "a.safetensors")
    assert model.config.name == "pixart-digits" and len(weights) == 64

    # Warm start: the shared tensors are dit-digits', PixArt's own keep the official init.
    torch.manual_seed(0)
    fresh = Captions(get_config("pixart-digits"), load_split()).build()
    copied = warm_start(fresh, "dit-digits")
    dit = load_file(str(PACKAGED["dit-digits"]))
    assert "blocks.3.attn.qkv.weight" in copied and "t_block.1.weight" not in copied
    assert all(torch.equal(fresh.state_dict()[k], dit[k]) for k in copied)
    assert not fresh.blocks[0].cross_attn.proj.weight.any() and fresh.blocks[0].scale_shift_table.any()


def test_cli_train_smoke(tmp_path):
    """Without --out the weights are named after the model (not dit-digits' default)."""
    out = tmp_path / "pixart_digits.safetensors"
    r = cli("train", "--model", "pixart-digits", "--steps", "2", "--batch-size", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pixart_digits.log.jsonl", "pixart_digits.safetensors"]
    assert "train pixart-digits" in r.stderr and "weights -> pixart_digits.safetensors" in r.stdout
    one_error_line(cli("train", "--model", "pixart-digits", "--steps", "1", "--warm-start", str(tmp_path / "no.pt"),
                       "--out", str(out)), "no such shipped model or file")


# --- the shipped weights ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    from soda.models.loading import PACKAGED, load_model

    assert PACKAGED["pixart-digits"].is_file()
    return load_model("pixart-digits")


def test_shipped_weights_draw_the_captioned_digit(shipped):
    """30 samples ("a zero" .. "a nine", "a thin ...", "a bold ..."), DPM-Solver-20 at the
    default CFG: an independent SVC (fitted on held-out real digits) recognises >= 90%."""
    from soda.digits.captions import caption_labels, standard_captions
    from soda.digits.evaluate import caption_conditioning_for, independent_accuracy, sample_digits
    from soda.models.config import default_cfg_scale

    model, _ = shipped
    captions = standard_captions()
    x, _ = sample_digits(model, caption_conditioning_for(model, captions), default_cfg_scale("pixart-digits"), 20,
                         seed=0, sampler="dpm-solver")
    assert x.shape == (30, 1, 16, 16) and np.isfinite(x).all()
    assert independent_accuracy(x, caption_labels(captions)) >= 0.9


def test_cli_sample_with_the_shipped_captions(tmp_path):
    r = cli("sample", "--model", "pixart-digits", "--prompt-embeds", "soda/assets/pixart_digits_captions.npz",
            "--out", str(tmp_path / "x.png"), "--save-latents", str(tmp_path / "x.npy"))
    assert r.returncode == 0, r.stderr
    assert "dpm-solver-20" in r.stdout and np.load(tmp_path / "x.npy").shape == (30, 1, 16, 16)
    # Without --prompt-embeds: the same shipped captions, said in a note (as dit-digits draws 0,1,2,3).
    r = cli("sample", "--model", "pixart-digits", "--out", str(tmp_path / "y.png"), "--save-latents",
            str(tmp_path / "y.npy"))
    assert r.returncode == 0, r.stderr
    assert "note: no --prompt-embeds: the shipped captions of pixart-digits" in r.stderr, r.stderr
    assert np.array_equal(np.load(tmp_path / "y.npy"), np.load(tmp_path / "x.npy"))


def test_runtime_equals_sample_for_every_policy(shipped, tmp_path):
    """export + `run --engines DIR --prompt-embeds FILE` equals `sample` (SODA at 2.5x, through
    the CLI), and the runtime's backend equals the PyTorch executor for full, FORA, ToCa and
    DuCa at 2.5x on the same engines, to 1e-4 of the samples' magnitude."""
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.captions import caption_conditioning, load_prompt_embeds
    from soda.generate import generate
    from soda.pipeline import spec_for
    from soda.policies import baseline_schedule
    from soda.torch_backend import TorchBackend

    model, _ = shipped
    prompts = tmp_path / "p.npz"
    assert cli("encode", "--captions", "a thin seven,a bold zero,a two,a five", "--out", str(prompts)).returncode == 0
    noise = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    common = ["--prompt-embeds", str(prompts), "--noise", str(tmp_path / "noise.npy")]
    m = ["--model", "pixart-digits"]
    r = cli("profile", *m, "--prompt-embeds", "soda/assets/pixart_digits_captions.npz", "--samples", "4",
            "--orders", "none", "--out", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    soda = ["--policy", "soda", "--speedup", "2.5", "--profile", str(tmp_path / "p.json")]
    r = cli("export", *m, *soda, "--out", str(tmp_path / "eng"))
    assert r.returncode == 0, r.stderr
    r = cli("sample", *m, *common, *soda, "--save-latents", str(tmp_path / "s.npy"), "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr
    r = cli("run", "--engines", str(tmp_path / "eng"), *common, "--policy", "soda", "--save-latents",
            str(tmp_path / "r.npy"), "--out", str(tmp_path / "r.png"))
    assert r.returncode == 0, r.stderr
    assert rel(np.load(tmp_path / "r.npy"), np.load(tmp_path / "s.npy")) < 1e-4

    engines = open_engines(tmp_path / "eng")
    sampler = engines.sampler_with()  # the exported dpm-solver-20 at pixart-digits' default CFG
    cond = caption_conditioning(load_prompt_embeds(prompts, 32), engines.null_caption())
    spec = spec_for(model, sampler)
    for policy in ("full", "fora", "toca", "duca"):
        sched = baseline_schedule(policy, spec, model.config, None if policy == "full" else 2.5)
        got, _ = generate(OrtBackend(engines, threads=1), model.config, sampler, sched, cond, noise=noise)
        want, _ = generate(TorchBackend(model), model.config, sampler, sched, cond, noise=noise)
        assert rel(got, want) < 1e-4, policy


def test_default_prompt_embeds_only_where_captions_ship():
    """`sample` and `run` share this choice: the shipped file for pixart-digits when nothing is
    given, what the user gave otherwise, and nothing for a model without shipped captions."""
    from soda.generate import default_prompt_embeds
    from soda.models.config import get_config
    from soda.models.loading import PACKAGED

    said = []
    got = default_prompt_embeds(get_config("pixart-digits"), None, None, said.append)
    assert Path(got).resolve() == PACKAGED["pixart-digits"].parent / "pixart_digits_captions.npz" and len(said) == 1
    assert default_prompt_embeds(get_config("pixart-digits"), None, "mine.npz", said.append) == "mine.npz"
    assert default_prompt_embeds(get_config("pixart-digits"), "1,2", None, said.append) is None  # labels: its error
    assert default_prompt_embeds(get_config("pixart-alpha-256"), None, None, said.append) is None
    assert len(said) == 1
