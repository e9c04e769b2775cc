"""soda command line: thin click commands; each imports what it needs inside the command, so
`run` works where torch is not installed."""
from __future__ import annotations

import sys

import click

from soda.errors import UserError

MODEL_HELP = "dit-xl-2 | dit-l-4 | ... | dit-digits (shipped) | dit (infer from --ckpt)"


def model_options(f):
    """--model, --ckpt, --num-heads, --random-init: how every command finds its weights."""
    f = click.option("--random-init", is_flag=True, help="Random weights (toolchain check only; outputs say so).")(f)
    f = click.option("--num-heads", type=int, default=None, help="Heads, for a non-standard width with --model dit.")(f)
    f = click.option("--ckpt", type=click.Path(dir_okay=False), default=None, help="Checkpoint (.pt or .safetensors).")(f)
    f = click.option("--model", "model_name", default="dit-digits", show_default=True, help=MODEL_HELP)(f)
    return f


def sampler_options(f):
    f = click.option("--cfg-channels", type=click.Choice(["official", "all"]), default=None,
                     help="Guide the first 3 channels (official DiT quirk) or all eps channels. "
                          "Default: official for 4-channel latents, all otherwise.")(f)
    f = click.option("--cfg-scale", type=float, default=4.0, show_default=True, help="1 disables guidance.")(f)
    f = click.option("--steps", type=int, default=50, show_default=True)(f)
    f = click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)(f)
    return f


def make_sampler(config, sampler: str, steps: int, cfg_scale: float, cfg_channels: str | None):
    from soda.sampling import SamplerConfig

    if cfg_channels is None:
        cfg_channels = "official" if config.in_channels == 4 else "all"
    return SamplerConfig(sampler, steps, cfg_scale, 3 if cfg_channels == "official" else None)


def load(model_name, ckpt, num_heads, random_init):
    """(model, weights id) with a note on stderr when the weights are random."""
    from soda.models.loading import load_model

    model, weights = load_model(model_name, ckpt, num_heads, random_init)
    if random_init:
        click.echo(f"note: {model_name} has RANDOM weights; outputs show the toolchain, not a real model", err=True)
    return model, weights


@click.group()
def cli():
    """SODA: sensitivity-oriented dynamic acceleration for Diffusion Transformers."""


# --- sample ----------------------------------------------------------------------------------
@cli.command()
@model_options
@sampler_options
@click.option("--labels", default="0,1,2,3", show_default=True, help="Comma-separated class labels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--noise", type=click.Path(dir_okay=False), default=None, help="Initial noise .npy [n, C, H, W].")
@click.option("--policy", default="full", show_default=True, help="full | fora | toca | duca | soda")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False), default=None, help="Schedule JSON.")
@click.option("--speedup", type=float, default=None, help="Target FLOPs speedup for the policy.")
@click.option("--profile", "profile_file", type=click.Path(dir_okay=False), default=None,
              help="Sensitivity profile for --policy soda (profiled first when absent).")
@click.option("--save-latents", type=click.Path(dir_okay=False), default=None, help="Final samples .npy.")
@click.option("--vae", type=click.Path(file_okay=False), default=None, help="Local diffusers AutoencoderKL folder.")
@click.option("--out", type=click.Path(dir_okay=False), default="sample.png", show_default=True)
def sample(model_name, ckpt, num_heads, random_init, sampler, steps, cfg_scale, cfg_channels, labels, seed,
           noise, policy, schedule_file, speedup, profile_file, save_latents, vae, out):
    """Generate samples with the PyTorch reference executor."""
    import numpy as np
    from tqdm import tqdm

    from soda.generate import generate, load_noise, parse_labels
    from soda.pictures import save_samples_png
    from soda.pipeline import resolve_schedule
    from soda.torch_backend import TorchBackend

    model, weights = load(model_name, ckpt, num_heads, random_init)
    config = model.config
    sampler_cfg = make_sampler(config, sampler, steps, cfg_scale, cfg_channels)
    ys = parse_labels(labels, config.num_classes)
    z = load_noise(noise, len(ys), config) if noise else None
    schedule = resolve_schedule(model, weights, sampler_cfg, policy, schedule_file, speedup, profile_file, echo=click.echo)
    with tqdm(total=steps, desc=f"sample {policy}", unit="step", file=sys.stderr) as bar:
        x, stats = generate(TorchBackend(model), config, sampler_cfg, schedule, ys, seed, z, lambda s: bar.update())
    from soda.generate import full_flops

    speed = full_flops(config, sampler_cfg, len(ys)) / stats.flops
    click.echo(f"{len(ys)} samples, {sampler}-{steps}, policy {policy}: {stats.seconds:.2f} s "
               f"({stats.seconds / steps * 1000:.0f} ms/step), FLOPs speedup {speed:.2f}x")
    if save_latents:
        np.save(save_latents, x)
        click.echo(f"latents -> {save_latents}")
    save_samples_png(x, ys, out, config, vae=vae, random_init=random_init)
    click.echo(f"image -> {out}")


# --- train (issue 3) -------------------------------------------------------------------------

# --- profile / schedule / bench (issue 4) ----------------------------------------------------

# --- export (issue 5) ------------------------------------------------------------------------

# --- run (issue 6) ---------------------------------------------------------------------------

# --- demo (issue 7) --------------------------------------------------------------------------


def main() -> None:
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


if __name__ == "__main__":
    main()
