"""The video an Open-Sora model makes, as plain data (no torch): the runtime sets it too.

A video is given in pixels, as the official config gives it: height, width, frames and the frame
rate. It fixes the latent grid (the VAE: 8x per side; Open-Sora 1.2's temporal compression), the
position-embedding scale sqrt(height * width) / 512, the timestep transform and the fps the model
sees. The exported graphs take the latent size and the scale as inputs, so one engines folder runs
any video; a profile or schedule is made for one (the config carries it, like DiT's resolution).
"""
from __future__ import annotations

from dataclasses import replace

from soda.errors import UserError

VAE_SPATIAL = 8  # OpenSoraVAE_V1_2: SDXL VAE, 8x per side
VAE_MICRO_FRAMES, VAE_MICRO_LATENTS, VAE_TEMPORAL = 17, 5, 4  # 17 frames -> 5 latents; 4x inside a chunk
INPUT_SQ_SIZE = 512  # STDiT3Config.input_sq_size: the position embedding's reference resolution
IMG_FPS = 120  # opensora.datasets.IMG_FPS: the fps the model sees for a single image
OFFICIAL_VIDEO = (240, 426, 51, 24)  # configs/opensora-v1-2/inference/sample.py: 240p 9:16, 51 frames, 24 fps
DEFAULT_VIDEO = {"opensora-tiny": (64, 64, 17, 24)}  # (height, width, num_frames, fps); others: OFFICIAL_VIDEO


def latent_frames(num_frames: int) -> int:
    """Latent frames Open-Sora 1.2's VAE makes of `num_frames` pixel frames (`get_latent_size`):
    17-frame chunks of 5 latents each, the remainder padded to a multiple of 4 and divided by 4."""
    if num_frames < 1:
        raise UserError(f"--num-frames must be at least 1, got {num_frames}")
    whole, rest = divmod(num_frames, VAE_MICRO_FRAMES)
    return whole * VAE_MICRO_LATENTS + -(-rest // VAE_TEMPORAL)


def video_config(config, height: int, width: int, num_frames: int):
    """`config` for a `height` x `width` pixel video of `num_frames` frames: the latent grid
    and the position-embedding scale sqrt(height * width) / 512 (`STDiT3.forward`)."""
    if height < VAE_SPATIAL or width < VAE_SPATIAL:
        raise UserError(f"--height and --width must be at least {VAE_SPATIAL} pixels, got {height}x{width}")
    return replace(config, frames=latent_frames(num_frames), input_size=height // VAE_SPATIAL,
                   input_width=width // VAE_SPATIAL, pe_interpolation=(height * width) ** 0.5 / INPUT_SQ_SIZE)


def resolve_video(config, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                  fps: float | None = None, default: tuple | None = None):
    """(config for the video, (height, width, num_frames, fps the model sees)): unset flags take
    `default` (height, width, frames, fps; else the model's default video); the fps the model sees
    is 120 for a single image, as in the official code."""
    from soda.rflow import check_num_frames

    h0, w0, f0, fps0 = default or DEFAULT_VIDEO.get(config.name, OFFICIAL_VIDEO)
    height, width = h0 if height is None else height, w0 if width is None else width
    num_frames = f0 if num_frames is None else num_frames
    fps = fps0 if fps is None else fps
    check_num_frames(num_frames)
    if not 0 < fps < float("inf"):
        raise UserError(f"--fps must be a positive number, got {fps}")
    return video_config(config, height, width, num_frames), (height, width, num_frames,
                                                             float(fps if num_frames > 1 else IMG_FPS))
