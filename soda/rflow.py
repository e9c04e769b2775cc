"""Open-Sora 1.2's rectified-flow sampler (`opensora/schedulers/rf`), in numpy: one copy for torch and
the runtime.

Timesteps t_i = (1 - i/N) * 1000, then (use_timestep_transform) t' = r t / (1 + (r - 1) t) on
t in [0, 1] with r = sqrt(H*W / 512^2) * sqrt(num_frames // 17 * 5) (pixel sizes; a single image
counts as one frame). The model predicts a velocity (the first half of its output channels); CFG
doubles the batch as [cond; uncond] and guides v = u + g (c - u) on all of them
(`soda.sampling.cfg_combine` with every channel); Euler steps z += v * dt / 1000 with dt the gap to
the next transformed timestep (the last step uses t itself, ending at 0). Arithmetic is float32 in
the official order, so the grid equals the official one computed with a float32 model. (The
official bf16 inference also builds height and width in bf16, which rounds H*W: 240 x 426 = 102240
becomes 102400, moving r by 0.08%. We follow the float32 path.)
"""
from __future__ import annotations

import numpy as np

from soda.errors import UserError

BASE_RESOLUTION = 512 * 512
FRAMES_PER_CHUNK, LATENTS_PER_CHUNK = 17, 5  # the transform's hard-coded VAE temporal reduction


def check_num_frames(num_frames: int) -> None:
    """The timestep transform's r is 0 for 2..16 frames (num_frames // 17 * 5 == 0): every timestep
    would collapse to 0, so the official sampler cannot express those lengths."""
    if num_frames < 1:
        raise UserError(f"--num-frames must be at least 1, got {num_frames}")
    if 1 < num_frames < FRAMES_PER_CHUNK:
        raise UserError(f"--num-frames {num_frames}: rflow's timestep transform needs 1 frame (an image) or at "
                        f"least {FRAMES_PER_CHUNK} (num_frames // 17 * 5 would be 0)")


def timestep_transform(t: np.ndarray, height: float, width: float, num_frames: float,
                       num_timesteps: int = 1000, scale: float = 1.0) -> np.ndarray:
    """`rectified_flow.timestep_transform` on float32 arrays."""
    f = np.float32
    t = t.astype(f) / f(num_timesteps)
    resolution = f(height) * f(width)
    ratio_space = np.sqrt(resolution / f(BASE_RESOLUTION))
    frames = f(1) if num_frames == 1 else np.floor_divide(f(num_frames), f(FRAMES_PER_CHUNK)) * f(LATENTS_PER_CHUNK)
    ratio_time = np.sqrt(frames / f(1))
    ratio = ratio_space * ratio_time * f(scale)
    new_t = ratio * t / (f(1) + (ratio - f(1)) * t)
    return (new_t * f(num_timesteps)).astype(f)


class RFlow:
    """The timestep grid for one video size, and the Euler step (the `make_diffusion` protocol:
    num_steps, model_timestep(s), step(s, x, model_out, noise))."""

    timestep_dtype = np.float32

    def __init__(self, cfg, height: int, width: int, num_frames: int, use_timestep_transform: bool = True):
        self.cfg = cfg
        check_num_frames(num_frames)
        T = cfg.num_train_timesteps
        raw = np.array([(1.0 - i / cfg.steps) * T for i in range(cfg.steps)]).astype(np.float32)
        if use_timestep_transform:
            raw = timestep_transform(raw, height, width, num_frames, T)
        self.timesteps = raw
        nxt = np.append(raw[1:], np.float32(0))
        self.dt = ((raw - nxt) / np.float32(T)).astype(np.float32)

    @classmethod
    def from_config(cls, cfg) -> "RFlow":
        """From a `soda.sampling.SamplerConfig` of kind rflow (its `video` = height, width, frames, fps)."""
        height, width, num_frames = cfg.video[:3]
        return cls(cfg, height, width, num_frames)

    @property
    def num_steps(self) -> int:
        return self.cfg.steps

    def model_timestep(self, s: int) -> np.float32:
        return self.timesteps[s]

    def step(self, s: int, z: np.ndarray, model_out: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """z + v * dt with v the first C channels of the (guided) output; `noise` is unused."""
        return (z + model_out[:, : z.shape[1]] * self.dt[s]).astype(np.float32)
