"""Noise schedule, respacing, DDIM/DDPM steps and CFG, in numpy: one copy for torch and runtime.

This is facebookresearch/DiT's `diffusion/` reduced to sampling: linear betas over 1000
steps, `space_timesteps` respacing, coefficient tables in float64 cast to float32 when
applied (as `_extract_into_tensor` does), learned-range variance. Step index s runs 0
(noisiest) .. S-1; the model sees the original timestep `timestep_map[S-1-s]`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from soda.errors import UserError

SAMPLERS = ("ddim", "ddpm", "dpm-solver", "rflow")


@dataclass(frozen=True)
class SamplerConfig:
    kind: str = "ddim"
    steps: int = 50
    cfg_scale: float = 4.0
    cfg_channels: int | None = 3  # guidance on the first 3 channels (official); None = all eps channels
    num_train_timesteps: int = 1000
    # rflow only: the pixel video (height, width, num_frames, fps) it makes; the timestep transform
    # reads the sizes, a video model's conditioning the frame rate
    video: tuple[int, int, int, float] | None = None

    def __post_init__(self):
        if self.kind not in SAMPLERS:
            raise UserError(f"unknown sampler {self.kind!r}; choose one of: {', '.join(SAMPLERS)}")
        if self.video is not None:
            h, w, f, fps = self.video  # JSON gives a list
            object.__setattr__(self, "video", (int(h), int(w), int(f), float(fps)))
        if (self.kind == "rflow") != (self.video is not None):
            raise UserError("the rflow sampler (and only it) needs the video size: --height, --width, --num-frames")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.steps > self.num_train_timesteps:
            raise UserError(f"--steps {self.steps} exceeds the {self.num_train_timesteps} training timesteps")
        if not 1.0 <= self.cfg_scale < float("inf"):
            raise UserError(f"--cfg-scale must be >= 1 (1 disables guidance), got {self.cfg_scale}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["video"] is None:
            del d["video"]  # an image sampler's dict (and every identity made from it) as before
        else:
            d["video"] = list(d["video"])
        return d


def space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """The official respacing: evenly strided (rounded) original timesteps per section."""
    if section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for i in range(1, num_timesteps):
            if len(range(0, num_timesteps, i)) == desired:
                return set(range(0, num_timesteps, i))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
    counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, all_steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            all_steps.append(start + round(cur))
            cur += stride
        start += size
    return set(all_steps)


class Diffusion:
    """Respaced Gaussian diffusion for sampling, with the official coefficient tables."""

    def __init__(self, cfg: SamplerConfig, learn_sigma: bool = True):
        self.cfg = cfg
        self.learn_sigma = learn_sigma
        T = cfg.num_train_timesteps
        scale = 1000 / T
        base_betas = np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
        base_ac = np.cumprod(1.0 - base_betas)
        use = space_timesteps(T, str(cfg.steps))
        last, betas, self.timestep_map = 1.0, [], []
        for i, ac in enumerate(base_ac):
            if i in use:
                betas.append(1 - ac / last)
                last = ac
                self.timestep_map.append(i)
        b = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        self.betas = b
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.sqrt_recip_ac = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / ac - 1)
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        self.post_log_var_clipped = (
            np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.array([])
        )
        self.post_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.post_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)
        # Fixed-large variance, used when the model does not learn sigma.
        self.fixed_large_log_var = np.log(np.append(post_var[1], b[1:])) if len(b) > 1 else np.log(b)

    @property
    def num_steps(self) -> int:
        return len(self.timestep_map)

    def model_timestep(self, s: int) -> int:
        """Original-scale timestep the model sees at sampling step s (s = 0 is the noisiest)."""
        return self.timestep_map[self.num_steps - 1 - s]

    def step(self, s: int, x: np.ndarray, model_out: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """x_{s} -> x_{s+1} from the (guided) model output, exactly as p_sample / ddim_sample (eta 0)."""
        i = self.num_steps - 1 - s  # index into the respaced tables
        f = np.float32
        C = x.shape[1]
        eps = model_out[:, :C]
        pred_x0 = f(self.sqrt_recip_ac[i]) * x - f(self.sqrt_recipm1_ac[i]) * eps
        if self.cfg.kind == "ddim":
            eps = (f(self.sqrt_recip_ac[i]) * x - pred_x0) / f(self.sqrt_recipm1_ac[i])
            abp = f(self.alphas_cumprod_prev[i])
            return (pred_x0 * np.sqrt(abp) + np.sqrt(f(1) - abp - f(0)) * eps).astype(np.float32)
        mean = f(self.post_coef1[i]) * pred_x0 + f(self.post_coef2[i]) * x
        if self.learn_sigma:
            frac = (model_out[:, C:] + 1) / 2
            log_var = frac * f(np.log(self.betas[i])) + (1 - frac) * f(self.post_log_var_clipped[i])
        else:
            log_var = np.full_like(x, f(self.fixed_large_log_var[i]))
        if i == 0:
            return mean.astype(np.float32)
        if noise is None:
            raise ValueError("DDPM needs noise for every step but the last")
        return (mean + np.exp(0.5 * log_var) * noise).astype(np.float32)


def make_diffusion(cfg: SamplerConfig, learn_sigma: bool = True):
    """The sampler process for `cfg.kind`: num_steps, model_timestep(s), step(s, x, out, noise)."""
    if cfg.kind == "dpm-solver":
        from soda.dpm_solver import DPMSolver

        return DPMSolver(cfg, learn_sigma=learn_sigma)
    if cfg.kind == "rflow":
        from soda.rflow import RFlow

        return RFlow.from_config(cfg)
    return Diffusion(cfg, learn_sigma=learn_sigma)


def cfg_combine(model_out: np.ndarray, n: int, scale: float, channels: int | None, in_channels: int) -> np.ndarray:
    """The official `forward_with_cfg` on a doubled batch [cond; uncond] -> guided output for n.

    Guidance applies to the first `channels` output channels (3 in the official code, which on
    a 4-channel latent leaves channel 3 unguided); None means all eps channels.
    """
    k = in_channels if channels is None else channels
    cond, uncond = model_out[:n], model_out[n:]
    guided = uncond[:, :k] + np.float32(scale) * (cond[:, :k] - uncond[:, :k])
    return np.concatenate([guided, cond[:, k:]], axis=1)


class Conditioning:
    """What a generation batch is conditioned on, as named batch-leading arrays.

    `cond` holds the n conditional rows, `uncond` the rows classifier-free guidance pairs them
    with (same names and trailing shapes). DiT: {"y": labels} and the null label; PixArt:
    {"caption", "mask"} and the negative (or learned null) caption. The sampling loop only
    concatenates and slices these; the model adapter is the one that reads them.
    """

    def __init__(self, cond: dict[str, np.ndarray], uncond: dict[str, np.ndarray] | None = None):
        self.cond = dict(cond)
        self.uncond = None if uncond is None else dict(uncond)
        sizes = {len(v) for v in self.cond.values()}
        if len(sizes) != 1:
            raise ValueError(f"conditioning arrays disagree on the batch size: {sorted(sizes)}")
        if self.uncond is not None and set(self.uncond) != set(self.cond):
            raise ValueError("conditional and unconditional rows must have the same entries")

    @classmethod
    def from_labels(cls, labels: np.ndarray, null_label: int) -> "Conditioning":
        labels = np.asarray(labels, dtype=np.int64)
        return cls({"y": labels}, {"y": np.full(len(labels), null_label, dtype=np.int64)})

    def __len__(self) -> int:
        return len(next(iter(self.cond.values())))

    def rows(self, sl) -> "Conditioning":
        """The conditioning of a slice of the batch (uncond rows broadcast from one are kept whole)."""
        pick = lambda d: {k: (v if len(v) == 1 and len(self) > 1 else v[sl]) for k, v in d.items()}  # noqa: E731
        cond = {k: v[sl] for k, v in self.cond.items()}
        return Conditioning(cond, None if self.uncond is None else pick(self.uncond))

    def __getitem__(self, idx) -> "Conditioning":
        return self.rows(idx)

    @property
    def labels(self) -> np.ndarray | None:
        """Class labels, for a label-conditioned model (pictures, classifier accuracy)."""
        return self.cond.get("y")

    def batch(self, guided: bool) -> dict[str, np.ndarray]:
        """The model batch: [cond; uncond] rows with CFG, cond alone without."""
        if not guided:
            return self.cond
        if self.uncond is None:
            raise ValueError("classifier-free guidance needs unconditional rows")
        n = len(self)
        out = {}
        for k, v in self.cond.items():
            u = self.uncond[k]
            if len(u) == 1 and n > 1:
                u = np.repeat(u, n, axis=0)
            out[k] = np.concatenate([v, u.astype(v.dtype, copy=False)])
        return out


ModelFn = Callable[[int, np.ndarray, np.ndarray, dict], np.ndarray]  # (s, x, t, cond) -> out


def as_conditioning(labels, null_label: int | None) -> Conditioning:
    """A Conditioning, or class labels turned into one with the null label as uncond."""
    if isinstance(labels, Conditioning):
        return labels
    if null_label is None:
        raise ValueError("class labels need the null label for guidance")
    return Conditioning.from_labels(labels, null_label)


def sample_loop(
    model_fn: ModelFn,
    diffusion: Diffusion,
    noise: np.ndarray,
    labels,
    null_label: int | None,
    in_channels: int,
    rng: np.random.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Run all sampling steps; `model_fn` sees the step index, the (doubled, with CFG) batch and
    its conditioning as a dict of arrays. `labels` is a `Conditioning` or class labels."""
    cfg = diffusion.cfg
    x = noise.astype(np.float32)
    n = x.shape[0]
    cond = as_conditioning(labels, null_label)
    if len(cond) != n:
        raise ValueError(f"{n} noise rows but {len(cond)} conditioning rows")
    y = cond.batch(cfg.uses_cfg)
    rows = 2 * n if cfg.uses_cfg else n
    for s in range(diffusion.num_steps):
        t = np.full(rows, diffusion.model_timestep(s), dtype=getattr(diffusion, "timestep_dtype", np.int64))
        if cfg.uses_cfg:
            out = model_fn(s, np.concatenate([x, x]), t, y)
            out = cfg_combine(out, n, cfg.cfg_scale, cfg.cfg_channels, in_channels)
        else:
            out = model_fn(s, x, t, y)
        step_noise = None
        if cfg.kind == "ddpm" and s < diffusion.num_steps - 1:
            if rng is None:
                raise ValueError("DDPM sampling needs an rng for the per-step noise")
            step_noise = rng.standard_normal(x.shape).astype(np.float32)
        x = diffusion.step(s, x, out, step_noise)
        if progress is not None:
            progress(s)
    return x


def initial_noise(n: int, config_shape: tuple[int, int, int], seed) -> tuple[np.ndarray, np.random.Generator]:
    """Initial latents from `seed` (an int or a `numpy.random.SeedSequence`, see `soda.seeds`), and
    the generator that then draws DDPM's per-step noise."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *config_shape)).astype(np.float32), rng
