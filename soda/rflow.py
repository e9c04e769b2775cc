"""Open-Sora 1.2's rectified-flow sampler (`opensora/schedulers/rf`), in numpy: one copy for torch and
the runtime.

Timesteps t_i = (1 - i/N) * 1000, then (use_timestep_transform) t' = r t / (1 + (r - 1) t) on
t in [0, 1] with r = sqrt(H*W / 512^2) * sqrt(num_frames // 17 * 5) (pixel sizes; a single image
counts as one frame). The model predicts a velocity (the first half of its output channels); CFG
doubles the batch as [cond; uncond] and guides v = u + g (c - u); Euler steps z += v * dt / 1000
with dt the gap to the next transformed timestep (the last step uses t itself, ending at 0).
Arithmetic is float32 in the official order, so the grid equals the official one computed with a
float32 model. (The official bf16 inference also builds height and width in bf16, which rounds
H*W: 240 x 426 = 102240 becomes 102400, moving r by 0.08%. We follow the float32 path.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from soda.errors import UserError

BASE_RESOLUTION = 512 * 512
FRAMES_PER_CHUNK, LATENTS_PER_CHUNK = 17, 5  # the transform's hard-coded VAE temporal reduction


@dataclass(frozen=True)
class RFlowConfig:
    steps: int = 30
    cfg_scale: float = 7.0
    num_timesteps: int = 1000
    use_timestep_transform: bool = True
    kind: str = "rflow"

    def __post_init__(self):
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if not 1.0 <= self.cfg_scale < float("inf"):
            raise UserError(f"--cfg-scale must be >= 1 (1 disables guidance), got {self.cfg_scale}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    def to_dict(self) -> dict:
        return asdict(self)


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
    """The timestep grid for one video size, and the Euler step."""

    def __init__(self, cfg: RFlowConfig, height: int, width: int, num_frames: int):
        self.cfg = cfg
        check_num_frames(num_frames)
        raw = np.array([(1.0 - i / cfg.steps) * cfg.num_timesteps for i in range(cfg.steps)]).astype(np.float32)
        if cfg.use_timestep_transform:
            raw = timestep_transform(raw, height, width, num_frames, cfg.num_timesteps)
        self.timesteps = raw
        nxt = np.append(raw[1:], np.float32(0))
        self.dt = ((raw - nxt) / np.float32(cfg.num_timesteps)).astype(np.float32)

    @property
    def num_steps(self) -> int:
        return self.cfg.steps

    def model_timestep(self, s: int) -> np.float32:
        return self.timesteps[s]

    def step(self, s: int, z: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (z + v * self.dt[s]).astype(np.float32)


def guided_velocity(model_out: np.ndarray, n: int, scale: float, channels: int) -> np.ndarray:
    """Velocity of the first n rows from a [cond; uncond] batch: the first `channels` output channels
    (learned sigma dropped), v = u + g (c - u). Without CFG (model_out has n rows) the channels only."""
    v = model_out[:, :channels]
    if model_out.shape[0] == n:
        return v
    cond, uncond = v[:n], v[n:]
    return (uncond + np.float32(scale) * (cond - uncond)).astype(np.float32)


VelocityFn = Callable[[int, np.ndarray, np.ndarray], np.ndarray]  # (s, z batch, t batch) -> model output


def sample_loop(model_fn: VelocityFn, rflow: RFlow, noise: np.ndarray,
                progress: Callable[[int], None] | None = None,
                trajectory: list | None = None) -> np.ndarray:
    """All steps; `model_fn` sees [z; z] and [t; t] under CFG (its caption batch is [cond; uncond])."""
    cfg = rflow.cfg
    z = noise.astype(np.float32)
    n, C = z.shape[0], z.shape[1]
    for s in range(rflow.num_steps):
        zin = np.concatenate([z, z]) if cfg.uses_cfg else z
        t = np.full(zin.shape[0], rflow.model_timestep(s), dtype=np.float32)
        v = guided_velocity(model_fn(s, zin, t), n, cfg.cfg_scale, C)
        z = rflow.step(s, z, v)
        if trajectory is not None:
            trajectory.append(z.copy())
        if progress is not None:
            progress(s)
    return z
