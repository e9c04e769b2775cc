"""`cli.py generate --prompt-embeds` on a text-conditioned model (a tiny random PixArt): sample i
uses prompt i % n_prompts with the noise of (seed, i), so generate equals `sample` given those
prompts and that noise; a resume with another prompt file is refused; bad input is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cli_in_process, write_tiny_pixart

SEED, STEPS = 3, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_pixart(tmp_path_factory.mktemp("pixart"))


def model_args(pth) -> list[str]:
    return ["--model", "pixart", "--ckpt", str(pth), "--num-heads", "2", "--steps", str(STEPS)]


def generate(tiny, out, monkeypatch, capsys, *extra: str):
    pth, prompts = tiny
    return cli_in_process(["generate", *model_args(pth), "--prompt-embeds", str(prompts), "--seed", str(SEED),
                           "--out", str(out), *extra], monkeypatch, capsys)


def test_generate_equals_sample_with_prompt_i_mod_n(tiny, tmp_path, monkeypatch, capsys):
    from soda import seeds

    pth, prompts = tiny
    r = generate(tiny, tmp_path / "gen", monkeypatch, capsys, "--num-samples", "5", "--shard-size", "2")
    assert r.returncode == 0, r.stderr
    assert "3 shards generated" in r.stdout and "arr_1: prompt indices (i % 3)" in r.stdout
    shards = [np.load(tmp_path / "gen" / "shards" / f"{k:05d}.npz") for k in range(3)]
    samples = np.concatenate([s["samples"] for s in shards])
    with np.load(tmp_path / "gen" / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_1"], [0, 1, 2, 0, 1])
        assert z["arr_0"].shape == (5, 8, 8, 3) and z["arr_0"].dtype == np.uint8

    # `sample` in one batch, given prompt i % 3 and the noise of (seed, i) by hand.
    with np.load(prompts) as p:
        rows = [0, 1, 2, 0, 1]
        np.savez(tmp_path / "rows.npz", prompt_embeds=p["prompt_embeds"][rows],
                 prompt_attention_mask=p["prompt_attention_mask"][rows])
    noise = np.stack([np.random.default_rng(seeds.generation(SEED, i)).standard_normal((1, 8, 8)) for i in range(5)])
    np.save(tmp_path / "noise.npy", noise.astype(np.float32))
    r = cli_in_process(["sample", *model_args(pth), "--prompt-embeds", str(tmp_path / "rows.npz"), "--noise",
                        str(tmp_path / "noise.npy"), "--save-latents", str(tmp_path / "x.npy"),
                        "--out", str(tmp_path / "x.png")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    want = np.load(tmp_path / "x.npy")
    scale = np.abs(want).max()
    np.testing.assert_allclose(samples, want, rtol=0, atol=1e-5 * scale)  # batches of 2 vs one of 5
    job = json.loads((tmp_path / "gen" / "manifest.json").read_text())["job"]
    assert job["prompt_embeds_sha256"] and job["randomness"].startswith("prompt i % n_prompts")


def test_the_caption_moves_the_sample(tiny, tmp_path, monkeypatch, capsys):
    """Guard for the test above: a wrong prompt for the right noise would be seen."""
    from soda import seeds

    pth, prompts = tiny
    noise = np.random.default_rng(seeds.generation(SEED, 0)).standard_normal((2, 1, 8, 8)).astype(np.float32)
    noise[1] = noise[0]
    np.save(tmp_path / "noise.npy", noise)
    with np.load(prompts) as p:
        np.savez(tmp_path / "two.npz", prompt_embeds=p["prompt_embeds"][:2],
                 prompt_attention_mask=p["prompt_attention_mask"][:2])
    r = cli_in_process(["sample", *model_args(pth), "--prompt-embeds", str(tmp_path / "two.npz"), "--noise",
                        str(tmp_path / "noise.npy"), "--save-latents", str(tmp_path / "x.npy"),
                        "--out", str(tmp_path / "x.png")], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    x = np.load(tmp_path / "x.npy")
    assert np.abs(x[0] - x[1]).max() > 1e-2 * np.abs(x).max()


def test_resume_with_another_prompt_file_is_refused(tiny, tmp_path, monkeypatch, capsys):
    pth, prompts = tiny
    out = tmp_path / "gen"
    r = generate(tiny, out, monkeypatch, capsys, "--num-samples", "2", "--shard-size", "2")
    assert r.returncode == 0, r.stderr
    same = tmp_path / "copy.npz"  # the same content under another name resumes
    same.write_bytes(prompts.read_bytes())
    r = cli_in_process(["generate", *model_args(pth), "--prompt-embeds", str(same), "--seed", str(SEED),
                        "--num-samples", "2", "--shard-size", "2", "--out", str(out)], monkeypatch, capsys)
    assert r.returncode == 0 and "1 reused" in r.stdout, r.stderr
    _, other = write_tiny_pixart(tmp_path, n_prompts=3, seed=1)
    r = cli_in_process(["generate", *model_args(pth), "--prompt-embeds", str(other), "--seed", str(SEED),
                        "--num-samples", "2", "--shard-size", "2", "--out", str(out)], monkeypatch, capsys)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "holds another generation (prompt_embeds_sha256" in lines[0]


def test_bad_input_one_line(tiny, tmp_path, monkeypatch, capsys):
    pth, prompts = tiny
    np.savez(tmp_path / "wrongdim.npz", prompt_embeds=np.zeros((2, 3, 5), np.float32),
             prompt_attention_mask=np.ones((2, 3), np.float32))
    cases = [
        (["--model", "dit-digits", "--steps", "2", "--prompt-embeds", str(prompts)],
         "--prompt-embeds is for text-conditioned models; dit-digits takes class labels"),
        (model_args(pth), "text-conditioned: give --prompt-embeds FILE.npz"),
        (model_args(pth) + ["--prompt-embeds", str(tmp_path / "wrongdim.npz")], "has caption dimension 5"),
        (model_args(pth) + ["--prompt-embeds", str(tmp_path / "missing.npz")], "prompt embeddings file not found"),
    ]
    for args, message in cases:
        r = cli_in_process(["generate", *args, "--num-samples", "2", "--out", str(tmp_path / "o")], monkeypatch,
                           capsys)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], (args, r.stderr)
        assert not (tmp_path / "o").exists()
