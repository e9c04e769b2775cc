"""The body of `cli.py run`: engines folder + policy or schedule -> samples, numpy + ORT/TRT only."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np

from soda.errors import UserError
from runtime.engines import Engines, open_engines, resolve_schedule

BACKENDS = ("ort", "trt")


def make_backend(engines: Engines, backend: str = "ort", device: str = "auto", threads: int | None = None,
                 blocks: bool = True):
    """An executor Backend over the engines: onnxruntime (CPU or CUDA EP) or TensorRT.
    blocks=False: onnxruntime runs module by module even where block graphs exist."""
    if backend == "ort":
        from runtime.ort_backend import OrtBackend

        return OrtBackend(engines, device=device, threads=threads, blocks=blocks)
    if backend == "trt":
        from runtime.trt_backend import TrtBackend

        return TrtBackend(engines)
    raise UserError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def run_command(
    engines_dir: str,
    labels: str,
    policy: str | None = None,
    schedule_file: str | None = None,
    speedup: float | None = None,
    seed: int = 0,
    noise: str | None = None,
    save_latents: str | None = None,
    out: str | None = "run.png",
    backend: str = "ort",
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    threads: int | None = None,
    device: str = "auto",
    echo: Callable[[str], None] = print,
    progress_bar: Callable[[str, int], Any] | None = None,
    toca_official_loop: bool = False,
    prompt_embeds: str | None = None,
    video: tuple | None = None,
) -> np.ndarray:
    """Generate with the deployed graphs; returns the final samples [n, C, H, W]. `labels` for a
    label-conditioned model (None: 0,1,2,3), `prompt_embeds` (an npz) for a text-conditioned one;
    `video` (height, width, num_frames, fps; None entries: the exported video's) for a video model."""
    from soda.generate import default_prompt_embeds, full_flops, generate, load_noise, make_conditioning

    engines = open_engines(engines_dir).at_video(*(video or ()))
    config = engines.config
    sampler_cfg = engines.sampler_with(sampler, steps, cfg_scale)
    prompt_embeds = default_prompt_embeds(config, labels, prompt_embeds, echo)
    ys = make_conditioning(config, labels, prompt_embeds, engines.null_caption(), sampler_cfg)
    z = load_noise(noise, len(ys), config) if noise else None
    schedule = resolve_schedule(engines, sampler_cfg, policy, schedule_file, speedup, toca_official_loop)
    impl = make_backend(engines, backend, device=device, threads=threads)
    if hasattr(impl, "check_schedule"):
        impl.check_schedule(schedule, len(ys) * (2 if sampler_cfg.uses_cfg else 1))
    if engines.random_init:
        echo(f"note: {engines.folder} holds RANDOM weights ({engines.weights}); outputs show the toolchain only")
    bar = progress_bar(f"run {schedule.policy}", sampler_cfg.steps) if progress_bar else contextlib.nullcontext()
    with bar:
        step_done = (lambda s: bar.update()) if progress_bar else None
        x, stats = generate(impl, config, sampler_cfg, schedule, ys, seed, z, step_done)
    speed = full_flops(config, sampler_cfg, len(ys), engines.modules) / stats.flops
    n_steps = sampler_cfg.steps
    echo(f"{len(ys)} samples, {sampler_cfg.kind}-{n_steps}, policy {schedule.policy}, {impl.describe()}: "
         f"{stats.seconds:.2f} s ({stats.seconds / n_steps * 1000:.0f} ms/step), FLOPs speedup {speed:.2f}x")
    if save_latents:
        from soda.outputs import atomic_output

        with atomic_output(save_latents) as tmp:
            np.save(tmp, x)
        echo(f"latents -> {save_latents}")
    if out:
        from soda.captions import load_caption_texts
        from soda.pictures import save_samples_png

        texts = load_caption_texts(prompt_embeds) if prompt_embeds else None  # titles, as `sample` writes them
        save_samples_png(x, ys, out, config, random_init=engines.random_init, captions=texts)
        echo(f"image -> {out}")
    return x
