"""PNG output a person can read: sample grids (pixels, VAE-decoded, or latent previews)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from soda.errors import UserError


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[n, C, H, W] in [-1, 1] -> [n, H, W, C] uint8."""
    return np.clip((images + 1) * 127.5, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def latent_preview(latents: np.ndarray) -> np.ndarray:
    """Each latent as its first 3 channels, normalised per image (a preview, not a decode)."""
    x = latents[:, :3]
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-8) * 2 - 1


def grid_image(tiles: np.ndarray, captions: list[str] | None = None, scale: int = 1, cols: int | None = None,
               title: str | None = None) -> Image.Image:
    """Tiles [n, H, W, C] uint8 -> one image, with a caption under each tile."""
    n, h, w, c = tiles.shape
    cols = cols or min(n, 10)
    rows = (n + cols - 1) // cols
    th, tw = h * scale, w * scale
    cap = 12 if captions else 0
    top = 14 if title else 0
    # As wide as the title (and every caption) needs: a 2-image grid must not cut "RANDOM WEIGHTS" off.
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = int(measure.textlength(title)) if title else 0
    cell_w = int(max([tw] + [measure.textlength(text) for text in captions or []]))
    canvas = Image.new("RGB", (max(cols * (cell_w + 4) + 4, text_w + 8), top + rows * (th + cap + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 1), title, fill="black")
    for i in range(n):
        r, q = divmod(i, cols)
        tile = Image.fromarray(tiles[i].squeeze(-1) if c == 1 else tiles[i]).convert("RGB")
        tile = tile.resize((tw, th), Image.NEAREST)
        x0, y0 = 4 + q * (cell_w + 4), top + 4 + r * (th + cap + 4)
        canvas.paste(tile, (x0, y0))
        if captions:
            draw.text((x0, y0 + th), captions[i], fill="black")
    return canvas


def load_vae(vae_dir: str):
    """A local diffusers AutoencoderKL folder, loaded (once per worker in `cli.py generate`)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise UserError("--vae needs the optional 'diffusers' package: pip install -e '.[vae]'") from None
    if not Path(vae_dir).is_dir():
        raise UserError(f"VAE folder not found: {vae_dir}")
    try:
        # low_cpu_mem_usage=False: what diffusers falls back to without `accelerate`, said so it does not warn
        return AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, low_cpu_mem_usage=False).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a diffusers AutoencoderKL from {vae_dir}: {e}") from None


def decode_vae(latents: np.ndarray, vae) -> np.ndarray:
    """Latents -> pixels in [-1, 1]; `vae` is a folder or a loaded AutoencoderKL."""
    if isinstance(vae, (str, Path)):
        vae = load_vae(str(vae))
    import torch

    with torch.inference_mode():
        return vae.decode(torch.from_numpy(latents) / 0.18215).sample.numpy()


def captions_for(labels, n: int) -> list[str]:
    """Tile captions: "class k" for class labels (an array or a label Conditioning), else "prompt i"."""
    labels = getattr(labels, "labels", labels)
    if labels is None:
        return [f"prompt {i}" for i in range(n)]
    return [f"class {int(v)}" for v in labels]


def save_samples_png(samples: np.ndarray, labels, out: str | Path, config, vae: str | None = None,
                     random_init: bool = False, captions: list[str] | None = None) -> None:
    """Pixel-space models are shown as they are; latents are VAE-decoded or previewed. `labels`:
    class labels, a `soda.sampling.Conditioning`, or None (captions: "prompt i"); `captions`, when
    the prompt file carries their text, replaces those tile captions. Video latents
    [n, C, T, H, W]: one row per sample, its T latent frames left to right."""
    if samples.ndim == 5:
        return save_video_strips_png(samples, labels, out, config, random_init)
    if vae:
        images, kind = decode_vae(samples, vae), "decoded"
    elif config.in_channels in (1, 3):
        images, kind = samples, "pixels"
    else:
        images, kind = latent_preview(samples), "latent preview (no --vae)"
    scale = max(1, 64 // images.shape[-1])
    title = f"{config.name} {kind}" + (" RANDOM WEIGHTS" if random_init else "")
    tiles = captions if captions is not None and len(captions) == len(images) else captions_for(labels, len(images))
    img = grid_image(to_uint8(images), tiles, scale=scale, title=title)
    from soda.outputs import atomic_output

    with atomic_output(out) as tmp:
        img.save(tmp)


def save_video_strips_png(samples: np.ndarray, labels, out: str | Path, config, random_init: bool = False,
                          names: list[str] | None = None) -> None:
    """[n, C, T, H, W] latents -> a strip of T frame previews per sample (first 3 channels,
    normalised over the whole clip so brightness changes between frames stay visible); `names`
    (one per sample) replace the captions made from `labels`."""
    n, C, T = samples.shape[:3]
    clips = latent_preview(samples.reshape(n, C, T * samples.shape[3], samples.shape[4]))  # per clip
    frames = clips.reshape(n, min(C, 3), T, samples.shape[3], samples.shape[4]).transpose(0, 2, 1, 3, 4)
    tiles = to_uint8(frames.reshape(n * T, *frames.shape[2:]))
    names = names or captions_for(labels, n)
    captions = [f"{names[i]} f{t}" if names else f"f{t}" for i in range(n) for t in range(T)]
    scale = max(1, 48 // tiles.shape[1])
    title = f"{config.name} latent frames, one row per sample" + (" RANDOM WEIGHTS" if random_init else "")
    img = grid_image(tiles, captions, scale=scale, cols=T, title=title)
    from soda.outputs import atomic_output

    with atomic_output(out) as tmp:
        img.save(tmp)


def policy_grid_png(kept: dict[str, np.ndarray], config, rows: list[dict], path: str | Path,
                    random_init: bool = False, title: str = "one row per policy, same noise and labels") -> None:
    """The bench's kept samples: one row per policy (each row's first caption: the policy and its
    FLOPs speedup), the same noise and conditioning in every row."""
    from soda.outputs import atomic_output

    label = lambda r: r["policy"] if r.get("variant", "-") == "-" else f"{r['policy']} {r['variant']}"  # noqa: E731
    rows = [r for r in rows if label(r) in kept]
    names = [label(r) for r in rows]
    if not names:
        raise UserError("no samples were kept for the grid")
    n = len(kept[names[0]])
    tiles = np.concatenate([kept[p] for p in names])
    if config.in_channels not in (1, 3):
        tiles = latent_preview(tiles)
    captions = [f"{p} {r['flops_speedup']:.2f}x" if i == 0 else "" for p, r in zip(names, rows) for i in range(n)]
    scale = max(1, 48 // tiles.shape[-1])
    with atomic_output(path) as tmp:
        grid_image(to_uint8(np.clip(tiles, -1, 1)), captions, scale=scale, cols=n,
                   title=title + (" - RANDOM WEIGHTS" if random_init else "")).save(tmp)
