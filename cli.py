"""soda command line: thin click commands; each imports what it needs inside the command, so
`run` works where torch is not installed."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from soda.errors import UserError

MODEL_HELP = ("dit-xl-2 | dit-l-4 | ... | dit-digits (shipped) | dit (infer from --ckpt) | "
              "pixart-alpha-256 | pixart-alpha-512 | pixart-digits (shipped, captions) | pixart (infer from --ckpt: official .pth or diffusers folder) | "
              "opensora-v1.2 | opensora-tiny (random-weights toy) | opensora (infer from --ckpt)")


def model_options(f):
    """--model, --ckpt, --num-heads, --random-init: how every command finds its weights."""
    f = click.option("--random-init", is_flag=True, help="Random weights (toolchain check only; outputs say so).")(f)
    f = click.option("--num-heads", type=click.IntRange(min=1), default=None,
                     help="Heads, for a non-standard width with --model dit or pixart.")(f)
    f = click.option("--ckpt", type=click.Path(), default=None,
                     help="Checkpoint (.pt, .pth or .safetensors; for PixArt also a diffusers folder).")(f)
    f = click.option("--model", "model_name", default="dit-digits", show_default=True, help=MODEL_HELP)(f)
    return f


def ray_options(f):
    """--ray and --workers: spread the work over a Ray cluster (soda.distributed); absent, no Ray."""
    f = click.option("--workers", type=int, default=None,
                     help="Ray workers (default: one per GPU for --engines on a GPU cluster, else one per CPU).")(f)
    f = click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS|local:K",
                     help="Run on Ray: the running cluster (auto), one at ADDRESS, or K workers on this machine.")(f)
    return f


def sampler_options(f):
    f = click.option("--cfg-channels", type=click.Choice(["official", "all"]), default=None,
                     help="Guide the first 3 channels (official DiT quirk) or all eps channels. "
                          "Default: official for 4-channel DiT latents, all otherwise.")(f)
    f = click.option("--cfg-scale", type=float, default=None,
                     help="Guidance scale; 1 disables it. Default: 4.0 (DiT), 2.0 (dit-digits), 4.5 (PixArt).")(f)
    f = click.option("--steps", type=int, default=None, help="Default: 50 (ddim/ddpm), 20 (dpm-solver), 30 (rflow).")(f)
    f = click.option("--sampler", type=click.Choice(["ddim", "ddpm", "dpm-solver", "rflow"]), default=None,
                     help="Default: ddim for DiT, dpm-solver (DPM-Solver++ 2M) for PixArt, rflow (rectified flow) "
                          "for Open-Sora.")(f)
    return f


def video_options(f):
    """The video an Open-Sora model makes, in pixels (the official config's inputs)."""
    f = click.option("--fps", type=float, default=None, help="Video models: frame rate the model sees [24].")(f)
    f = click.option("--num-frames", type=int, default=None,
                     help="Video models: frames (1, or 17 and more) [51; opensora-tiny 17].")(f)
    f = click.option("--width", type=int, default=None, help="Video models: width in pixels [426; opensora-tiny 64].")(f)
    f = click.option("--height", type=int, default=None, help="Video models: height in pixels [240; opensora-tiny 64].")(f)
    return f


PROMPT_EMBEDS_HELP = ("Text-conditioned models: an .npz with prompt_embeds [n, L, C], prompt_attention_mask [n, L] "
                      "and optional negative_prompt_embeds / negative_prompt_attention_mask.")


def prompt_embeds_option(f, help: str = PROMPT_EMBEDS_HELP):
    return click.option("--prompt-embeds", type=click.Path(dir_okay=False), default=None, help=help)(f)


def toca_official_loop_option(f):
    return click.option("--toca-official-loop", is_flag=True,
                        help="With --policy toca: the official code's literal layer loop (a full step's new interval "
                             "can send layers 1..L-1 to the partial branch; 18 full steps on DDIM-50, not 20). "
                             "Default: every layer follows layer 0, as the papers describe.")(f)


def make_sampler(config, sampler: str | None, steps: int | None, cfg_scale: float, cfg_channels: str | None,
                 video: tuple | None = None):
    """The sampler for `config`; `video` (height, width, frames, fps) for a video model (rflow)."""
    from soda.sampling import SamplerConfig

    from soda.models.config import default_cfg_scale

    text = config.arch != "dit"
    video_model = config.frames is not None
    if sampler is None:
        sampler = "rflow" if video_model else "dpm-solver" if text else "ddim"
    if video_model != (sampler == "rflow"):
        raise UserError(f"--sampler rflow is Open-Sora's (video models); {config.name} samples with "
                        f"{'rflow' if video_model else 'ddim, ddpm or dpm-solver'}")
    if steps is None:
        steps = {"dpm-solver": 20, "rflow": 30}.get(sampler, 50)
    if cfg_channels is None:  # the 3-channel quirk is DiT's forward_with_cfg only
        cfg_channels = "official" if config.in_channels == 4 and not text else "all"
    if cfg_scale is None:
        cfg_scale = default_cfg_scale(config.name, config.arch)
    return SamplerConfig(sampler, steps, cfg_scale, 3 if cfg_channels == "official" else None,
                         video=video if sampler == "rflow" else None)


def conditioning(model, labels: str | None, prompt_embeds: str | None, sampler=None):
    """Class labels (DiT) or captions from --prompt-embeds (text-conditioned models; a video
    model also gets the sampler's frame rate)."""
    from soda.generate import make_conditioning

    null = model.null_caption_table() if hasattr(model, "null_caption_table") else None
    return make_conditioning(model.config, labels, prompt_embeds, null, sampler)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_out_suffix(path: str | None, flag: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> None:
    """Refuse an output we cannot write (wrong suffix, unwritable place) before the work, not after."""
    from soda.outputs import check_writable

    if path and not path.lower().endswith(suffixes):
        raise UserError(f"{flag} {path}: use one of {', '.join(suffixes)}")
    if path:
        _say_created(check_writable(path, flag), flag)


def check_out_folder(path: str, flag: str = "--out") -> None:
    from soda.outputs import check_writable

    created = check_writable(path, flag, folder=True)
    if created is not None and Path(created) != Path(path):  # the output folder itself is expected to be new
        _say_created(created, flag)


def _say_created(folder, flag: str) -> None:
    """Output folders are created as needed (like `mkdir -p`), but never silently."""
    if folder is not None:
        click.echo(f"note: {flag}: creating the folder {folder}", err=True)


def policy_or_schedule(policy: str | None, schedule_file: str | None, profile_file: str | None = None) -> str:
    """The policy asked for (default full); --profile only where it is read (SODA's planner)."""
    from soda.policies import PROFILED

    if policy and schedule_file:
        raise UserError("give --policy or --schedule, not both")
    if profile_file and schedule_file:
        raise UserError("--profile does not apply to a --schedule file (it is planned already)")
    if profile_file and (policy or "full") not in PROFILED:
        raise UserError(f"--profile plans --policy {' or '.join(PROFILED)}; --policy {policy or 'full'} does not read it")
    return policy or "full"


def load(model_name, ckpt, num_heads, random_init, video: tuple | None = None):
    """(model, weights id) with a note on stderr when the weights are random. `video`: the
    --height/--width/--num-frames/--fps flags; a video model is set to that video (its default
    for flags not given) and keeps the result as `model.video`."""
    from soda.models.loading import load_model

    if ckpt and random_init:
        raise UserError("give --ckpt or --random-init, not both")

    model, weights = load_model(model_name, ckpt, num_heads, random_init)
    if model.config.arch == "opensora":
        from soda.models.opensora import apply_video

        model.video = apply_video(model, *(video or (None,) * 4))
    elif video is not None and any(v is not None for v in video):
        raise UserError(f"--height, --width, --num-frames and --fps are for video models; {model.config.name} "
                        "is an image model")
    if random_init:
        click.echo(f"note: {model_name} has RANDOM weights; outputs show the toolchain, not a real model", err=True)
    return model, weights


def progress_bar(desc: str, total: int):
    """A progress bar on stderr for long work inside a command (profiling, timing rounds)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)


@click.group()
def cli():
    """SODA: sensitivity-oriented dynamic acceleration for Diffusion Transformers."""


# --- sample ----------------------------------------------------------------------------------
@cli.command()
@model_options
@sampler_options
@click.option("--labels", default=None, help="Comma-separated class labels [0,1,2,3].")
@prompt_embeds_option
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--noise", type=click.Path(dir_okay=False), default=None,
              help="Initial noise .npy [n, C, H, W] (video: [n, C, T, H, W]).")
@click.option("--policy", default=None, help="full (default) | fora | toca | duca | taylorseer | soda | soda-forecast")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False), default=None, help="Schedule JSON.")
@click.option("--speedup", type=float, default=None, help="Target FLOPs speedup for the policy.")
@click.option("--profile", "profile_file", type=click.Path(dir_okay=False), default=None,
              help="Sensitivity profile for --policy soda (profiled first when absent).")
@click.option("--save-latents", type=click.Path(dir_okay=False), default=None, help="Final samples .npy.")
@click.option("--vae", type=click.Path(file_okay=False), default=None, help="Local diffusers AutoencoderKL folder.")
@toca_official_loop_option
@video_options
@click.option("--out", type=click.Path(dir_okay=False), default="sample.png", show_default=True)
def sample(model_name, ckpt, num_heads, random_init, sampler, steps, cfg_scale, cfg_channels, labels, prompt_embeds, seed,
           noise, policy, schedule_file, speedup, profile_file, save_latents, vae, toca_official_loop, height, width,
           num_frames, fps, out):
    """Generate samples with the PyTorch reference executor."""
    import numpy as np
    from tqdm import tqdm

    from soda.generate import generate, load_noise
    from soda.pictures import save_samples_png
    from soda.pipeline import resolve_schedule
    from soda.torch_backend import TorchBackend

    policy = policy_or_schedule(policy, schedule_file, profile_file)
    check_out_suffix(out, "--out")
    check_out_suffix(save_latents, "--save-latents", (".npy",))
    model, weights = load(model_name, ckpt, num_heads, random_init, (height, width, num_frames, fps))
    config = model.config
    if vae and config.frames is not None:
        raise UserError("--vae decodes image latents; Open-Sora's video VAE is not supported (the PNG shows the "
                        "latent frames)")
    if vae and config.in_channels in (1, 3):
        raise UserError(f"--vae is for latent models; {config.name} makes pixels")
    if vae:  # a wrong folder or a missing diffusers fails now, not after the sampling
        from soda.pictures import load_vae

        vae = load_vae(vae)
    sampler_cfg = make_sampler(config, sampler, steps, cfg_scale, cfg_channels, getattr(model, "video", None))
    sampler, steps = sampler_cfg.kind, sampler_cfg.steps
    from soda.generate import default_prompt_embeds

    prompt_embeds = default_prompt_embeds(config, labels, prompt_embeds, lambda m: click.echo(m, err=True))
    ys = conditioning(model, labels, prompt_embeds, sampler_cfg)
    z = load_noise(noise, len(ys), config) if noise else None
    schedule = resolve_schedule(model, weights, sampler_cfg, policy, schedule_file, speedup, profile_file, echo=click.echo,
                                toca_official_loop=toca_official_loop, progress=progress_bar)
    with tqdm(total=steps, desc=f"sample {schedule.policy}", unit="step", file=sys.stderr) as bar:
        x, stats = generate(TorchBackend(model), config, sampler_cfg, schedule, ys, seed, z, lambda s: bar.update())
    from soda.generate import full_flops

    speed = full_flops(config, sampler_cfg, len(ys)) / stats.flops
    click.echo(f"{len(ys)} samples, {sampler}-{steps}, policy {schedule.policy}: {stats.seconds:.2f} s "
               f"({stats.seconds / steps * 1000:.0f} ms/step), FLOPs speedup {speed:.2f}x")
    if save_latents:
        from soda.outputs import atomic_output

        with atomic_output(save_latents) as tmp:
            np.save(tmp, x)
        click.echo(f"latents -> {save_latents}")
    from soda.captions import load_caption_texts

    texts = load_caption_texts(prompt_embeds) if prompt_embeds else None
    save_samples_png(x, ys, out, config, vae=vae, random_init=random_init, captions=texts)
    click.echo(f"image -> {out}")


# --- train (issue 3) -------------------------------------------------------------------------
@cli.command()
@click.option("--model", "model_name", default="dit-digits", show_default=True,
              help="A registered digits-shaped config: dit-digits (class labels) or pixart-digits (captions).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--steps", type=int, default=None, help="Default: the shipped weights' recipe (dit-digits 7000, pixart-digits 4000).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--ema", "ema_decay", type=float, default=0.999, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads (results are bitwise reproducible for the same count).")
@click.option("--warm-start", default=None, metavar="MODEL|FILE|none",
              help="Seed the init with the same-named tensors of a shipped model or a weights file. "
                   "Default: the recipe's (pixart-digits: dit-digits; dit-digits: none).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Weights file. Default: the model's name, e.g. dit_digits.safetensors, pixart_digits.safetensors.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), default=None,
              help="Loss log, JSON lines (default: OUT with .log.jsonl).")
def train(model_name, seed, steps, batch_size, lr, ema_decay, threads, warm_start, out, log_file):
    """Train dit-digits or pixart-digits on scikit-learn's digits (EMA weights -> safetensors)."""
    from pathlib import Path

    from tqdm import tqdm

    from soda.digits.train import TrainConfig, digits_config, recipe, train as run_training

    digits_config(model_name)  # refuse a non-digits model before anything else
    out = out or model_name.replace("-", "_") + ".safetensors"
    steps = steps if steps is not None else recipe(model_name)["steps"]
    warm_start = recipe(model_name)["warm_start"] if warm_start is None else None if warm_start == "none" else warm_start
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, seed=seed, threads=threads,
                      warm_start=warm_start)
    if warm_start:
        from soda.models.loading import PACKAGED

        if not Path(PACKAGED.get(warm_start, warm_start)).is_file():
            raise UserError(f"--warm-start {warm_start}: no such shipped model or file")
    log_file = log_file or str(Path(out).with_suffix(".log.jsonl"))
    check_out_suffix(out, "--out", (".safetensors",))
    check_out_suffix(log_file, "--log", (".jsonl", ".json", ".log", ".txt"))
    with tqdm(total=steps, desc=f"train {model_name}", unit="step", file=sys.stderr) as bar:
        def progress(step, last):
            bar.update()
            if last:
                bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)

        result = run_training(model_name, cfg, out, log_file, progress)
    click.echo(f"{steps} steps in {result['seconds']:.0f} s, last loss {result['last']['loss']:.4f}; "
               f"weights -> {out}, loss log -> {log_file}")


@cli.command()
@click.option("--model", "model_name", default="pixart-digits", show_default=True,
              help="The model whose word table encodes the captions (pixart-digits).")
@click.option("--captions", "caption_text", required=True,
              help='Comma-separated captions, e.g. "a thin seven,a bold zero,a two".')
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The .npz to write (--prompt-embeds reads it).")
def encode(model_name, caption_text, out):
    """Captions -> prompt embeddings (.npz with diffusers' names) from pixart-digits' shipped word table."""
    from soda.digits.captions import parse_caption_list, save_captions
    from soda.models.config import get_config

    if get_config(model_name).name != "pixart-digits":
        raise UserError(f"encode knows pixart-digits' word table only; {model_name} needs its own text encoder "
                        "(write its prompt_embeds npz with it)")
    check_out_suffix(out, "--out", (".npz",))
    captions = parse_caption_list(caption_text)
    save_captions(captions, out)
    click.echo(f"{len(captions)} caption{'s' if len(captions) != 1 else ''} -> {out}")


# --- profile / schedule / bench (issue 4) ----------------------------------------------------
@cli.command("profile")
@model_options
@sampler_options
@click.option("--samples", type=int, default=32, show_default=True, help="Calibration generations (random labels).")
@prompt_embeds_option
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--intervals", default="1,2,3,4,5,6", show_default=True, help="Cache ages k to measure.")
@click.option("--rates", default="0.25,0.5,0.75", show_default=True, help="Recompute fractions a to measure.")
@click.option("--orders", default="1,2", show_default=True,
              help="Taylor forecast orders to measure for soda-forecast ('none': cache and prune only).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Generations per batch (CFG doubles rows).")
@video_options
@click.option("--out", type=click.Path(dir_okay=False), default="profile.json", show_default=True)
@ray_options
def profile_cmd(model_name, ckpt, num_heads, random_init, sampler, steps, cfg_scale, cfg_channels, samples,
                prompt_embeds, seed, intervals, rates, orders, batch_size, height, width, num_frames, fps, out,
                ray_address, workers):
    """OFS: measure cache and prune sensitivity on full trajectories (-> JSON + heatmap PNG)."""
    from tqdm import tqdm

    from soda.pipeline import schedule_path_png
    from soda.plots import sensitivity_heatmap
    from soda.profile import profile

    ks, rs = _numbers(intervals, int, "--intervals"), _numbers(rates, float, "--rates")
    if 1 not in ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise UserError(f"--intervals must be distinct cache ages >= 1 including 1, got {intervals}")
    if not all(0 < r < 1 for r in rs):
        raise UserError(f"--rates must be fractions strictly between 0 and 1, got {rates}")
    os_ = () if orders.strip() == "none" else _numbers(orders, int, "--orders")
    if not all(1 <= o <= 4 for o in os_):
        raise UserError(f"--orders must be integers in 1..4 (or 'none'), got {orders}")
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    check_out_suffix(out, "--out", (".json",))
    model, weights = load(model_name, ckpt, num_heads, random_init, (height, width, num_frames, fps))
    sampler_cfg = make_sampler(model.config, sampler, steps, cfg_scale, cfg_channels, getattr(model, "video", None))
    steps = sampler_cfg.steps
    # Text-conditioned models calibrate on the captions given (cycled to --samples).
    cal = conditioning(model, None, prompt_embeds, sampler_cfg) if model.config.arch != "dit" or prompt_embeds else None
    total = steps * -(-samples // max(1, batch_size))
    from soda.shards import WorkerSpec, worker_pool

    spec = WorkerSpec(model_name, ckpt, num_heads, random_init, video=getattr(model, "video", None))
    with worker_pool(spec, ray_address, workers, click.echo) as pool, \
            tqdm(total=total, desc=f"profile {samples} generations", unit="step", file=sys.stderr) as bar:
        prof = profile(model, sampler_cfg, samples, seed, ks, rs, lambda s: bar.update(), weights, batch_size,
                       pool=pool, conditioning=cal, orders=os_)
    prof.save(out)
    png = schedule_path_png(out)
    sensitivity_heatmap(prof, png)
    c = prof.cost
    click.echo(f"profiled {samples} generations ({c['batch_rows']} rows per batch) in {c['seconds']:.1f} s; "
               f"peak traced memory {c['peak_traced_mb']:.0f} MiB, process max RSS {c['max_rss_mb']:.0f} MiB")
    click.echo(f"profile -> {out}, heatmap -> {png}")


def _numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


@cli.command("schedule")
@click.option("--profile", "profile_file", type=click.Path(dir_okay=False), required=True, help="From `cli.py profile`.")
@click.option("--policy", type=click.Choice(["soda", "soda-forecast"]), default="soda", show_default=True,
              help="soda: the paper's method; soda-forecast: also Taylor forecasts (TaylorSeer) of cached outputs.")
@click.option("--speedup", type=float, default=None, help="Target FLOPs speedup (anchors + pruning fill it).")
@click.option("--anchors", type=int, default=None, help="Exactly N anchor steps (no pruning unless --speedup too).")
@click.option("--lam", type=click.FloatRange(min=0, max=1e6), default=None, help="UAS lambda in units of 1/mean(E_c) (default: best of a grid).")
@click.option("--planner", type=click.Choice(["uas", "joint", "dcs", "fixed"]), default="uas", show_default=True,
              help="uas: the paper (DCS anchors, lambda*E_c+beta rates); joint: exact joint DP; dcs / fixed: "
                   "DP / evenly spaced anchors without pruning (ablation).")
@click.option("--out", type=click.Path(dir_okay=False), default="schedule.json", show_default=True)
def schedule_cmd(profile_file, policy, speedup, anchors, lam, planner, out):
    """DCS + UAS: a SODA (or soda-forecast) schedule from a profile (-> JSON + picture PNG)."""
    from soda.models.config import ModelConfig
    from soda.pipeline import schedule_path_png
    from soda.plots import schedule_picture
    from soda.policies import ScheduleSpec, make_schedule
    from soda.profile import Profile

    if speedup is None and anchors is None:
        raise UserError("give --speedup X or --anchors N")
    check_out_suffix(out, "--out", (".json",))
    prof = Profile.load(profile_file)
    spec = ScheduleSpec.for_model(ModelConfig.from_dict(prof.model_config), prof.sampler["kind"], prof.num_steps,
                                  tuple(prof.modules))
    if policy != "soda" and planner != "uas":
        raise UserError(f"--planner {planner} applies to --policy soda only")
    kw = {"planner": planner} if policy == "soda" else {}
    sched = make_schedule(policy, spec, speedup=speedup, anchors=anchors, profile=prof, lam=lam, **kw)
    sched.save(out)
    png = schedule_path_png(out)
    schedule_picture(sched, png)
    kinds = sched.count_kinds()
    p = sched.params
    click.echo(f"FLOPs speedup {p['flops_speedup']:.3f}x with {p['num_anchors']} anchors: {kinds['full']} full, "
               f"{kinds['partial']} partial, {kinds['skip']} skip steps; prune rates {sched.prune_rates() or 'none'}")
    if "forecast_cache" in p:
        fc = p["forecast_cache"]
        click.echo(f"forecast orders per layer x module {fc['orders']}: {fc['total_bytes_per_row'] / 2**10:.0f} KiB "
                   f"extra cache per batch row ({fc['bytes_per_row'][0][0] / 2**10:.0f} KiB per (layer, module) at "
                   f"order {fc['orders'][0][0]})")
    click.echo(f"schedule -> {out}, picture -> {png}")


@cli.command("bench")
@model_options
@sampler_options
@click.option("--policies", default="full,fora,toca,duca,soda", show_default=True)
@click.option("--speedup", type=float, default=2.5, show_default=True, help="FLOPs speedup every policy is tuned to.")
@click.option("--samples", type=int, default=100, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--profile", "profile_file", type=click.Path(dir_okay=False), default=None,
              help="Profile for soda (measured first when absent).")
@click.option("--profile-samples", type=int, default=32, show_default=True)
@click.option("--frontier", default=None, help="More speedups for the fidelity frontier, e.g. 1.5,2.5,3,4.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Frontier PNG (PSNR vs FLOPs speedup).")
@click.option("--backend", type=click.Choice(["torch", "ort"]), default="torch", show_default=True)
@click.option("--engines", "engines_dir", type=click.Path(file_okay=False), default=None, help="For --backend ort.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: tokens, caches and selectors stay on the GPU (torch tensors; CuPy for --backend ort).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="--backend torch --device cuda: weights and activations in this precision.")
@click.option("--eval-seeds", type=int, default=None,
              help="Evaluation seeds the samples are split over (mean and 95% interval; timing rounds). "
                   "Default: 5, or --samples if fewer.")
@click.option("--tune/--no-tune", default=True, show_default=True,
              help="Add a 'tuned' row per baseline, its parameters chosen on calibration seeds.")
@click.option("--tune-samples", type=int, default=16, show_default=True, help="Calibration samples per tuning candidate.")
@click.option("--planner", type=click.Choice(["uas", "joint"]), default="uas", show_default=True,
              help="SODA's planner: the paper's lambda*E_c+beta rule, or the exact joint DP.")
@click.option("--ablation", is_flag=True, help="Also SODA with fixed-interval / DCS-only / DCS+UAS / joint planners.")
@prompt_embeds_option
@click.option("--calibration-prompts", type=click.IntRange(min=1), default=None,
              help="With --prompt-embeds: the first K prompts calibrate (profile, tuning), the rest are evaluated "
                   "[half].")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads; 1 is fastest on a shared machine (10x faster than 2 under a load of 10).")
@click.option("--timing-rounds", type=click.IntRange(min=1), default=None,
              help="--backend ort: interleaved rounds of the runtime-vs-monolithic timing [5].")
@click.option("--timing-images", type=click.IntRange(min=1), default=None,
              help="--backend ort: images in each timing round, the first of the evaluation samples [2, or "
                   "--samples if fewer]; the fixed per-step cost of streaming the weights weighs less with more.")
@click.option("--timing-per-module", is_flag=True,
              help="--backend ort: also time every schedule module by module (no block graphs), in the same rounds.")
@video_options
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default="bench.json", show_default=True)
@click.option("--grid", "grid_png", type=click.Path(dir_okay=False), default=None,
              help="PNG of the first 10 evaluation samples of every policy at --speedup, one row per policy.")
@ray_options
def bench_cmd(model_name, ckpt, num_heads, random_init, sampler, steps, cfg_scale, cfg_channels, policies, speedup,
              samples, seed, batch_size, profile_file, profile_samples, frontier, plot, backend, engines_dir, device,
              precision, eval_seeds, tune, tune_samples, planner, ablation, prompt_embeds, calibration_prompts, threads,
              timing_rounds, timing_images, timing_per_module, height, width, num_frames, fps, json_out, grid_png, ray_address, workers):
    """Fidelity and speed of every policy against full compute, on the same noise."""
    import shlex

    from tqdm import tqdm

    from soda.bench import BenchSetup, bench, check_setup, format_table, parse_policies, parse_speedups
    from soda.schedule import write_json_atomic

    setup = BenchSetup(parse_policies(policies), speedup, samples, seed, parse_speedups(frontier), backend,
                       engines_dir, profile_file, profile_samples, batch_size,
                       eval_seeds=min(5, max(samples, 1)) if eval_seeds is None else eval_seeds, tune=tune,
                       tune_samples=tune_samples, planner=planner, ablation=ablation, prompt_embeds=prompt_embeds,
                       calibration_prompts=calibration_prompts, keep_samples=min(10, samples) if grid_png else 0,
                       timing_repeats=timing_rounds or 5, timing_images=timing_images or max(1, min(2, samples)),
                       timing_per_module=timing_per_module, device=device,
                       precision=precision)
    if device == "cuda" and (ray_address or workers):
        raise UserError("--device cuda runs in this process on this machine's GPU; drop --ray/--workers")
    if precision != "fp32" and (device != "cuda" or backend != "torch"):
        raise UserError(f"--precision {precision} needs --backend torch --device cuda")
    if device == "cuda" and backend == "torch":
        from soda.torch_backend import check_device

        check_device("cuda")  # one clear line before any loading where there is no GPU
    if not 1 <= speedup < float("inf"):
        raise UserError(f"--speedup must be at least 1 and finite, got {speedup:g}")
    check_setup(setup)
    if engines_dir and backend != "ort":
        raise UserError("--engines is for --backend ort")
    timing_asked = timing_rounds is not None or timing_images is not None or timing_per_module
    if backend != "ort" and timing_asked:
        raise UserError(f"--timing-rounds, --timing-images and --timing-per-module are for --backend ort (the "
                        f"runtime-vs-monolithic timing), not --backend {backend}")
    if timing_images is not None and timing_images > samples:
        raise UserError(f"--timing-images {timing_images} times the first {timing_images} evaluation samples: "
                        f"give at least --samples {timing_images} (got {samples})")
    if profile_samples < 1:
        raise UserError(f"--profile-samples must be at least 1, got {profile_samples}")
    check_out_suffix(plot, "--plot", (".png", ".pdf", ".svg", ".jpg"))
    check_out_suffix(json_out, "--json", (".json",))
    check_out_suffix(grid_png, "--grid", (".png",))
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    import torch

    torch.set_num_threads(threads)
    model, weights = load(model_name, ckpt, num_heads, random_init, (height, width, num_frames, fps))
    if timing_asked and model.config.interface.cond != ("y",):
        # said now, not as a note after the whole bench: the monolithic reference takes class labels
        raise UserError(f"--timing-rounds, --timing-images and --timing-per-module time the runtime against one "
                        f"monolithic ONNX of a label-conditioned model; {model.config.name} is text-conditioned (for a video model, "
                        "scripts/video_blocks_timing.py times block graphs against module by module)")
    sampler_cfg = make_sampler(model.config, sampler, steps, cfg_scale, cfg_channels, getattr(model, "video", None))
    bar = lambda desc, total: tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    from soda.shards import WorkerSpec, worker_pool

    spec = WorkerSpec(model_name, ckpt, num_heads, random_init, engines_dir, backend,
                      video=getattr(model, "video", None))  # Ray workers sample the same video
    with worker_pool(spec, ray_address, workers, click.echo) as pool:
        report = bench(model, weights, sampler_cfg, setup, echo=click.echo, progress=bar, pool=pool)
    report["command"] = "python cli.py " + shlex.join(sys.argv[1:])
    kept = report.pop("kept_samples", None)
    write_json_atomic(json_out, report)
    click.echo(format_table(report["results"]))
    if report["frontier"]:
        click.echo("frontier:")
        click.echo(format_table(report["frontier"]))
    if report.get("ablation"):
        click.echo("ablation (SODA planners at --speedup):")
        click.echo(format_table(report["ablation"]))
    if "runtime" in report:
        from soda.bench_runtime import runtime_lines

        click.echo("\n".join(runtime_lines(report["runtime"])))
    if plot:
        from soda.plots import frontier_plot, random_note

        frontier_plot(report["results"] + report["frontier"], plot,
                      title=f"{model.config.name} {sampler_cfg.kind}-{sampler_cfg.steps}, {samples} samples"
                      + random_note(weights))
        click.echo(f"frontier plot -> {plot}")
    if grid_png:
        from soda.pictures import policy_grid_png

        what = "labels"
        if prompt_embeds:
            from soda.captions import load_caption_texts

            texts = load_caption_texts(prompt_embeds)  # the first evaluation prompts are the grid's columns
            texts = texts[(calibration_prompts or len(texts) // 2):][:len(next(iter(kept.values())))] if texts else None
            what = f"captions ({texts[0]!r} .. {texts[-1]!r})" if texts else "captions"
        policy_grid_png(kept, model.config, report["results"], grid_png, weights.startswith("random-init"),
                        title=f"{model.config.name} at {speedup:g}x: one row per policy, same noise and {what}")
        click.echo(f"samples per policy -> {grid_png}")
    click.echo(f"results -> {json_out}")
    click.echo(f"reproduce: {report['command']}")


# --- export (issue 5) ------------------------------------------------------------------------
@cli.command("export")
@model_options
@sampler_options
@click.option("--policy", default=None, help="full (default) | fora | toca | duca | taylorseer | soda | soda-forecast")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False), default=None, help="Schedule JSON.")
@click.option("--speedup", type=float, default=None, help="Target FLOPs speedup for the policy.")
@click.option("--profile", "profile_file", type=click.Path(dir_okay=False), default=None,
              help="Sensitivity profile for --policy soda.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Engines folder [engines/<model>].")
@click.option("--opset", type=click.IntRange(14, 20), default=17, show_default=True)
@click.option("--exporter", type=click.Choice(["legacy", "dynamo"]), default="legacy", show_default=True,
              help="torch.onnx TorchScript exporter (fast) or the dynamo exporter.")
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs tensorrt and a GPU).")
@click.option("--trt-precision", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True,
              help="TensorRT engine precision (fp32: for parity checks against onnxruntime).")
@video_options
@click.option("--force", is_flag=True, help="Export even when the folder already holds the same export.")
@toca_official_loop_option
def export_cmd(model_name, ckpt, num_heads, random_init, sampler, steps, cfg_scale, cfg_channels, policy,
               schedule_file, speedup, profile_file, out, opset, exporter, trt, trt_precision, force, height, width, num_frames, fps, toca_official_loop):
    """Export ONNX subgraphs, one weights file, the schedule and a manifest (engines/<model>/)."""
    from pathlib import Path

    from export.onnx_export import export_model, summary
    from soda.pipeline import resolve_schedule

    if trt:
        from runtime.engine_check import check_trt_engines

    policy = policy_or_schedule(policy, schedule_file, profile_file)
    check_out_folder(out or str(Path("engines") / model_name))
    model, weights = load(model_name, ckpt, num_heads, random_init, (height, width, num_frames, fps))
    sampler_cfg = make_sampler(model.config, sampler, steps, cfg_scale, cfg_channels, getattr(model, "video", None))
    schedule = resolve_schedule(model, weights, sampler_cfg, policy, schedule_file, speedup, profile_file, echo=click.echo,
                                toca_official_loop=toca_official_loop, progress=progress_bar)
    res = export_model(model, weights, schedule, sampler_cfg, Path(out or Path("engines") / model.config.name),
                       opset=opset, exporter=exporter, trt_precision=trt_precision if trt else None,
                       force=force, echo=click.echo, check_engines=check_trt_engines if trt else None)
    for line in summary(res):
        click.echo(line)


# --- run (issue 6) ---------------------------------------------------------------------------
@cli.command()
@click.option("--engines", "engines_dir", required=True, type=click.Path(), help="Folder written by `cli.py export`.")
@click.option("--policy", type=click.Choice(["full", "fora", "toca", "duca", "taylorseer", "soda", "soda-forecast"]),
              default=None,
              help="full, fora, toca, duca, taylorseer: scheduled here (no torch); soda, soda-forecast: the engines' "
                   "exported schedule, which must be that policy's. Default: the exported schedule, whatever its policy.")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False), default=None, help="Schedule JSON.")
@click.option("--speedup", type=float, default=None, help="Target FLOPs speedup for a baseline policy.")
@click.option("--labels", default=None, help="Comma-separated class labels [0,1,2,3].")
@prompt_embeds_option
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--noise", type=click.Path(dir_okay=False), default=None, help="Initial noise .npy [n, C, H, W].")
@click.option("--save-latents", type=click.Path(dir_okay=False), default=None, help="Final samples .npy.")
@click.option("--out", type=click.Path(dir_okay=False), default="run.png", show_default=True)
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--sampler", type=click.Choice(["ddim", "ddpm", "dpm-solver"]), default=None,
              help="Default: the exported sampler.")
@click.option("--steps", type=int, default=None, help="Default: the exported sampler's.")
@click.option("--cfg-scale", type=float, default=None, help="Default: the exported sampler's.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads (default: all cores).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime: CUDA EP when onnxruntime-gpu has a GPU (auto), or force one.")
@toca_official_loop_option
@video_options
def run(engines_dir, policy, schedule_file, speedup, labels, prompt_embeds, seed, noise, save_latents, out, backend,
        sampler, steps, cfg_scale, threads, device, toca_official_loop, height, width, num_frames, fps):
    """Generate with exported graphs: numpy + onnxruntime (or TensorRT), no torch. A video model runs
    at any --height/--width/--num-frames (default: the exported video)."""
    from runtime.run import run_command

    check_out_suffix(out, "--out")
    check_out_suffix(save_latents, "--save-latents", (".npy",))

    run_command(engines_dir, labels, policy, schedule_file, speedup, seed, noise, save_latents, out, backend,
                sampler, steps, cfg_scale, threads, device, echo=click.echo, progress_bar=progress_bar,
                toca_official_loop=toca_official_loop, prompt_embeds=prompt_embeds, video=(height, width, num_frames, fps))


# --- generate (issue 14) ---------------------------------------------------------------------
@cli.command("generate")
@model_options
@sampler_options
@click.option("--engines", "engines_dir", type=click.Path(file_okay=False), default=None,
              help="Exported engines folder (runs on onnxruntime / TensorRT instead of torch).")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True, help="With --engines.")
@click.option("--policy", default=None, help="full (default) | fora | toca | duca | soda")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False), default=None, help="Schedule JSON.")
@click.option("--speedup", type=float, default=None, help="Target FLOPs speedup for the policy.")
@click.option("--profile", "profile_file", type=click.Path(dir_okay=False), default=None,
              help="Sensitivity profile for --policy soda.")
@click.option("--num-samples", type=int, required=True, help="How many samples (e.g. 50000 for FID-50k).")
@functools.partial(prompt_embeds_option, help=PROMPT_EMBEDS_HELP + " Sample i uses prompt i % n_prompts, its noise "
                   "still from (seed, i) (class-label models draw each sample's label uniformly instead).")
@click.option("--shard-size", type=int, default=64, show_default=True, help="Samples per shard (one batch each).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--vae", type=click.Path(file_okay=False), default=None, help="Local diffusers AutoencoderKL folder "
              "(latent models: the .npz holds decoded images).")
@video_options
@click.option("--out", type=click.Path(), required=True, help="Folder: manifest.json, shards/, samples.npz.")
@ray_options
def generate_cmd(model_name, ckpt, num_heads, random_init, sampler, steps, cfg_scale, cfg_channels, engines_dir,
                 backend, policy, schedule_file, speedup, profile_file, num_samples, prompt_embeds, shard_size, seed,
                 vae, height, width, num_frames, fps, out, ray_address, workers):
    """Many samples, sharded and resumable (optionally on Ray) -> shards + ADM-layout samples.npz for FID
    (a video model: its latents, [N, C, T, H, W] float32)."""
    from pathlib import Path

    from tqdm import tqdm

    from soda.shards import GenerateJob, WorkerSpec, check_ray_request, file_sha256, generate_to_folder

    check_ray_request(ray_address, workers)
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    check_out_folder(out)
    if vae and not Path(vae).is_dir():
        raise UserError(f"VAE folder not found: {vae}")
    if engines_dir and (ckpt or random_init):
        raise UserError("give --engines or --ckpt/--random-init, not both")
    if engines_dir:  # the folder fixes the model and how it was made: a flag about those would be ignored
        ctx = click.get_current_context()
        ignored = [p.opts[0] for p in ctx.command.params if p.name in ("model_name", "num_heads", "cfg_channels",
                   "profile_file") and ctx.get_parameter_source(p.name).name != "DEFAULT"]
        if ignored:
            raise UserError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply with --engines "
                            f"(the folder holds its model, sampler channels and schedule inputs)")
    video = (height, width, num_frames, fps)
    if engines_dir:
        from runtime.engines import open_engines

        engines = open_engines(engines_dir).at_video(*video)  # a video model's engines run any size
        config, weights, loaded = engines.config, engines.weights, None  # the local worker opens the engines
        random_init = engines.random_init
        given = lambda name, v: None if click.get_current_context().get_parameter_source(name).name == "DEFAULT" else v
        sampler_cfg = engines.sampler_with(given("sampler", sampler), given("steps", steps), cfg_scale)
    else:
        model, weights = load(model_name, ckpt, num_heads, random_init, video)
        config = model.config
        from soda.torch_backend import TorchBackend

        loaded = (TorchBackend(model), config, model, weights)
        sampler_cfg = make_sampler(config, sampler, steps, cfg_scale, cfg_channels, getattr(model, "video", None))
    # Workers load the model (or engines) themselves: they get the resolved video too.
    spec = WorkerSpec(model_name, ckpt, num_heads, random_init if not engines_dir else False, engines_dir,
                      backend if engines_dir else "torch", vae=vae, video=sampler_cfg.video)
    prompts = None  # a text model's captions, read and checked here, handed to each worker once
    if config.interface.cond == ("y",):
        if prompt_embeds:
            raise UserError(f"--prompt-embeds is for text-conditioned models; {config.name} takes class labels, "
                            f"which generate draws uniformly")
    else:
        from soda.generate import make_conditioning

        prompts = make_conditioning(config, None, prompt_embeds, engines.null_caption(), sampler_cfg) \
            if engines_dir else conditioning(model, None, prompt_embeds, sampler_cfg)
    pixels = config.in_channels in (1, 3)
    if config.frames is not None:  # a video model: the .npz holds its latents (no video VAE here)
        if vae:
            raise UserError("--vae decodes image latents; Open-Sora's video VAE is not supported (the .npz holds "
                            "the latents)")
    elif not pixels and not vae:
        raise UserError(f"{config.name} makes {config.in_channels}-channel latents: give --vae DIR so the .npz "
                        f"holds images")
    if pixels and vae:
        raise UserError(f"--vae is for latent models; {config.name} makes pixels")
    if engines_dir:
        from runtime.engines import resolve_schedule

        schedule = resolve_schedule(engines, sampler_cfg, policy, schedule_file, speedup)
    else:
        from soda.pipeline import resolve_schedule

        schedule = resolve_schedule(model, weights, sampler_cfg, policy_or_schedule(policy, schedule_file, profile_file),
                                    schedule_file, speedup, profile_file, echo=click.echo, progress=progress_bar)
    if random_init:
        click.echo("note: RANDOM weights: the samples show the toolchain, not a real model", err=True)
    # what would otherwise fail inside the first shard, after OUT/ and its manifest exist
    from soda.generate import check_memory

    rows = min(shard_size, num_samples) * (2 if sampler_cfg.uses_cfg else 1)
    check_memory(config, rows, config.depth * len(config.modules))
    if vae:
        from soda.pictures import load_vae

        load_vae(vae)  # a wrong folder or a missing diffusers: one line now (each worker loads its own)
    job = GenerateJob(config.name, config.hash(), weights, spec.backend, sampler_cfg.to_dict(), schedule.to_dict(),
                      num_samples, shard_size, seed, str(Path(vae).resolve()) if vae else None,
                      prompt_embeds_sha256=file_sha256(Path(prompt_embeds)) if prompts is not None else None)

    def progress(total, initial):
        return tqdm(total=total, initial=initial, desc="generate", unit="shard", file=sys.stderr)

    res = generate_to_folder(spec, loaded, job, out, ray_address, workers, echo=click.echo, progress=progress,
                             prompts=prompts)
    click.echo(f"{len(res['computed'])} shards generated by {len(res['workers'])} worker(s) in {res['seconds']:.1f} s, "
               f"{res['skipped']} reused")
    labels = f"prompt indices (i % {len(prompts)})" if prompts is not None else "class labels"
    what = "float32 latents" if config.frames is not None else "uint8"
    click.echo(f"samples -> {res['npz']} (arr_0: {what} {res['shape']}, arr_1: {labels})")


# --- demo (issue 7) --------------------------------------------------------------------------
@cli.command()
@model_options
@sampler_options
@click.option("--speedup", type=float, default=2.5, show_default=True, help="FLOPs speedup every policy is tuned to.")
@click.option("--frontier", default="1.5,3,4", show_default=True, help="More speedups for the fidelity plot.")
@click.option("--samples", type=int, default=100, show_default=True, help="Samples per policy (labels cycle 0..9).")
@click.option("--profile-samples", type=int, default=32, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="demo", show_default=True)
def demo(model_name, ckpt, num_heads, random_init, sampler, steps, cfg_scale, cfg_channels, speedup, frontier,
         samples, profile_samples, seed, out):
    """The whole toolchain: profile, schedule, export, run on onnxruntime, bench, report."""
    from pathlib import Path

    from tqdm import tqdm

    from demo import DemoConfig, run_demo
    from soda.bench import parse_speedups

    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    if profile_samples < 1:
        raise UserError(f"--profile-samples must be at least 1, got {profile_samples}")
    if not 1 <= speedup < float("inf"):
        raise UserError(f"--speedup must be at least 1 and finite, got {speedup:g}")
    check_out_folder(out)
    out_dir = Path(out)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not any((out_dir / n).is_file() for n in ("report.md", "profile.json")):
        raise UserError(f"refusing to write into {out}: it holds other files (no report.md); choose another --out")
    model, weights = load(model_name, ckpt, num_heads, random_init)
    if model.config.interface.cond != ("y",):  # demo has no --prompt-embeds nor video flags
        raise UserError(f"demo runs class-label models (dit-digits, dit-*); {model.config.name} takes captions: "
                        f"use sample, bench and export with --prompt-embeds")
    sampler_cfg = make_sampler(model.config, sampler, steps, cfg_scale, cfg_channels)
    cfg = DemoConfig(Path(out), speedup, parse_speedups(frontier), samples, profile_samples, seed=seed)

    def progress(desc, total):
        return tqdm(total=total, desc=f"  {desc}", unit="step", file=sys.stderr, leave=False)

    report = run_demo(model, weights, sampler_cfg, cfg, echo=click.echo, progress=progress)
    click.echo(f"report -> {report}")
    click.echo(f"pictures -> {', '.join(str(report.parent / n) for n in ('samples.png', 'sensitivity.png', 'schedule.png', 'frontier.png'))}")



def _interrupt_on_sigterm() -> None:
    """SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so temporary files and folders
    are removed by the `finally` blocks that own them. Only SIGKILL can leave one behind."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    _interrupt_on_sigterm()
    try:
        cli(standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:  # a full disk, a read-only folder: the file system's word, in one line
        from soda.outputs import FILE_SYSTEM_ERRNOS

        if e.errno not in FILE_SYSTEM_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
