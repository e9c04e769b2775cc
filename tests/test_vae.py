"""`sample --vae DIR`: latents decoded by a local diffusers AutoencoderKL (an optional extra)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    import diffusers  # a test dependency: a broken install fails, not skips
    import torch

    torch.manual_seed(0)
    # A tiny VAE with the SD layout: 4 latent channels, 8x upsampling (3 up blocks after the first).
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64,
    )
    out = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(out)
    return out


def test_vae_decodes_latents_to_a_picture(vae_dir, tmp_path):
    from PIL import Image

    from soda.pictures import decode_vae

    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    images = decode_vae(latents, str(vae_dir))
    assert images.shape == (2, 3, 64, 64) and np.isfinite(images).all()
    r = subprocess.run([sys.executable, "cli.py", "sample", "--model", "dit-s-8", "--random-init", "--labels", "1,2",
                        "--steps", "2", "--vae", str(vae_dir), "--out", str(tmp_path / "x.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "x.png").size[0] >= 2 * 64  # decoded 256 px tiles, not an 32 px latent preview


def test_missing_vae_folder_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "cli.py", "sample", "--model", "dit-s-8", "--random-init", "--labels", "1",
                        "--steps", "1", "--vae", str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: VAE folder not found")
