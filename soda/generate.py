"""Generate samples by running a schedule over a backend: the shared body of `sample`, `run`
and `bench`. numpy only; the caller supplies the backend (torch reference or runtime)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soda.errors import UserError
from soda.executor import Backend, Executor
from soda.flops import FlopsModel
from soda.models.config import ModelConfig
from soda.sampling import Conditioning, SamplerConfig, initial_noise, make_diffusion, sample_loop
from soda.schedule import Schedule


@dataclass
class RunStats:
    flops: float  # FLOPs actually executed (per generation batch)
    seconds: float


def parse_labels(text: str, num_classes: int) -> np.ndarray:
    try:
        labels = [int(v) for v in text.split(",")] if text.strip() else []
    except ValueError:
        raise UserError(f"--labels must be comma-separated integers, got {text!r}") from None
    if not labels:
        raise UserError("--labels is empty")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise UserError(f"labels {bad} out of range: this model has classes 0..{num_classes - 1}")
    return np.array(labels, dtype=np.int64)


def with_video(cond: Conditioning, config: ModelConfig, sampler: SamplerConfig | None) -> Conditioning:
    """A video model (Open-Sora) is also conditioned on the video the sampler makes
    (`SamplerConfig.video`) and `config` holds: its frame rate ("fps" [n]), its latent grid ("grid"
    [n, 3]: frames, height, width) and position-embedding scale ("pe_scale" [n]); the same for the
    conditional and unconditional rows."""
    if "fps" not in config.interface.cond:
        return cond
    if sampler is None or sampler.video is None:
        raise UserError(f"{config.name} needs the video size and frame rate (--height, --width, --num-frames, --fps)")

    def video(d: dict) -> dict:
        n = len(next(iter(d.values())))
        return {**d, "fps": np.full(n, sampler.video[3], dtype=np.float32),
                "grid": np.tile(np.array(config.latent_shape[1:], dtype=np.int64), (n, 1)),
                "pe_scale": np.full(n, config.pe_interpolation, dtype=np.float32)}

    return Conditioning(video(cond.cond), None if cond.uncond is None else video(cond.uncond))


def default_prompt_embeds(config: ModelConfig, labels: str | None, prompt_embeds: str | None,
                          echo=None) -> str | None:
    """`prompt_embeds`, or, for a text model that ships captions (pixart-digits) when neither
    captions nor labels are given, its shipped file; `echo` is told which file was taken."""
    from soda.models.config import shipped_prompt_embeds

    shipped = shipped_prompt_embeds(config.name)
    if prompt_embeds or labels is not None or shipped is None:
        return prompt_embeds
    if echo is not None:
        echo(f"note: no --prompt-embeds: the shipped captions of {config.name} ({shipped})")
    return shipped


def make_conditioning(config: ModelConfig, labels: str | None, prompt_embeds: str | None,
                      null_caption: np.ndarray | None = None, sampler: SamplerConfig | None = None) -> Conditioning:
    """What to generate: class labels for a label-conditioned model, captions from an npz for a
    text-conditioned one (unconditional rows: its negatives, else `null_caption`); for a video
    model also the frame rate of `sampler`'s video."""
    if config.interface.cond == ("y",):
        if prompt_embeds:
            raise UserError(f"--prompt-embeds is for text-conditioned models; {config.name} takes --labels")
        return Conditioning.from_labels(parse_labels(labels or "0,1,2,3", config.num_classes), config.null_label)
    if labels is not None:
        raise UserError(f"{config.name} is text-conditioned: give --prompt-embeds FILE.npz, not --labels")
    if not prompt_embeds:
        raise UserError(f"{config.name} is text-conditioned: give --prompt-embeds FILE.npz (prompt_embeds "
                        "[n, L, C] and prompt_attention_mask [n, L], diffusers' names)")
    from soda.captions import caption_conditioning, load_prompt_embeds

    cond = caption_conditioning(load_prompt_embeds(prompt_embeds, config.caption_channels), null_caption)
    return with_video(cond, config, sampler)


def load_noise(path: str | Path, n: int, config: ModelConfig) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"noise file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as a .npy array ({e})") from None
    if not isinstance(z, np.ndarray):  # an .npz archive (np.load returns an NpzFile)
        z.close()
        raise UserError(f"{path} is an .npz archive; give the noise as one .npy array (np.save)")
    want = (n, *config.latent_shape)
    if z.shape != want and config.frames is not None:
        raise UserError(f"noise in {path} has shape {list(z.shape)}, expected {list(want)}: [n, C, T, H, W] with the "
                        f"latent frames, height and width of --num-frames, --height and --width (one per prompt)")
    if z.shape != want:
        raise UserError(f"noise in {path} has shape {list(z.shape)}, expected {list(want)} (one per label)")
    if not (np.issubdtype(z.dtype, np.floating) or np.issubdtype(z.dtype, np.integer)):
        raise UserError(f"noise in {path} must be real numbers, not {z.dtype}")
    if not np.isfinite(z).all():
        raise UserError(f"noise in {path} must be finite numbers")
    return z.astype(np.float32)


def available_memory() -> int | None:
    """Bytes this process can still get (Linux `MemAvailable`), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(config: ModelConfig, rows: int, caches: int, available: int | None = None) -> None:
    """Refuse, before any work, a generation whose float32 token caches (one [rows, N, D] per
    layer and module, plus a few working copies) cannot fit: a video size or batch too large is
    then one line, not a process killed for memory half-way."""
    need = 4 * rows * config.num_tokens * config.hidden_size * (caches + 4)
    available = available_memory() if available is None else available
    if available is not None and need > available:
        raise UserError(f"this generation needs about {need / 2**30:,.1f} GiB for its token caches ({rows} rows x "
                        f"{config.num_tokens:,} tokens x width {config.hidden_size} x {caches} layer modules, "
                        f"float32) and {available / 2**30:,.1f} GiB is available: use a smaller "
                        f"video or fewer prompts per batch")


def generate(
    backend: Backend,
    config: ModelConfig,
    sampler: SamplerConfig,
    schedule: Schedule,
    labels: np.ndarray | Conditioning,
    seed: int = 0,
    noise: np.ndarray | None = None,
    progress=None,
    rng=None,
    executor: Executor | None = None,
) -> tuple[np.ndarray, RunStats]:
    """Final samples [n, C, H, W] (before any VAE) and what it cost. `labels`: class labels, or a
    `Conditioning` (captions) for a text-conditioned model. `rng` (default: the generator after
    `seed`'s initial noise) draws DDPM's per-step noise. `executor` (`make_executor`): one to
    reuse, reset before and after, so a caller generating batch after batch makes the graph
    choice of each step once (on dit-digits a new executor per generation cost ~2% of its time,
    docs/runtime.md)."""
    cond = labels if isinstance(labels, Conditioning) else Conditioning.from_labels(labels, config.null_label)
    check_memory(config, len(cond) * (2 if sampler.uses_cfg else 1), backend.num_layers * len(backend.modules))
    diffusion = make_diffusion(sampler, config.learn_sigma)
    shape = config.latent_shape
    z, seed_rng = initial_noise(len(cond), shape, seed)
    rng = seed_rng if rng is None else rng
    if noise is not None:
        z = noise
    given = executor is not None
    if not given:
        executor = make_executor(backend, config, schedule)
    elif (executor.backend is not backend or executor.schedule is not schedule
          or executor.flops != FlopsModel.for_config(config)):
        raise ValueError("the executor was made for another backend, schedule or model")
    else:
        executor.reset()
    t0 = time.perf_counter()
    x = sample_loop(executor, diffusion, z, cond, None, config.in_channels, rng, progress)
    stats = RunStats(executor.flops_done, time.perf_counter() - t0)
    if given:
        executor.reset()  # it holds no caches between generations (a bench keeps one per schedule)
    return x, stats


def make_executor(backend: Backend, config: ModelConfig, schedule: Schedule) -> Executor:
    """The executor `generate` runs `schedule` with (FLOPs counted for `config`)."""
    return Executor(backend, schedule, FlopsModel.for_config(config))


def full_flops(config: ModelConfig, sampler: SamplerConfig, batch: int, modules=None) -> float:
    """FLOPs of full compute for one generation batch of `batch` images (CFG doubles the rows)."""
    from soda.flops import schedule_flops
    from soda.policies import ScheduleSpec
    from soda.policies.full import full_schedule

    spec = ScheduleSpec.for_model(config, sampler.kind, sampler.steps, modules or config.modules)
    rows = batch * (2 if sampler.uses_cfg else 1)
    return schedule_flops(full_schedule(spec), FlopsModel.for_config(config), rows)
