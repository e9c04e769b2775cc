"""Train `dit-digits` as the official DiT trains (facebookresearch/DiT train.py + diffusion/):
uniform timesteps over 1000, q_sample, MSE on epsilon plus the variational-bound term that
teaches the learned-range variance, class dropout for classifier-free guidance, AdamW, EMA.

The same loop trains `pixart-digits` (PixArt-alpha's blocks, which train with the same
diffusion loss): what differs is only the conditioning (`ClassLabels`, `Captions` below), i.e.
which model is built and what it is fed. PixArt's captions come from the shipped word table
(soda/digits/captions.py) and are dropped to the null caption for CFG as the official
`token_drop` does.

Everything random is drawn from the seed, so `cli.py train --seed S` reproduces a file bit
for bit on the same torch build and thread count. The output is the EMA weights as
safetensors (the format `load_model` reads), with the recipe in the file's metadata.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from soda.errors import UserError

FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 7000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    log_every: int = 50
    save_every: int = 500  # EMA weights written to `out` this often, so a long run can be checked early
    warm_start: str | None = None  # a model name (its shipped weights) or file whose same-named tensors seed the init

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise UserError("--steps and --batch-size must be at least 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"--ema must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.lr < float("inf") or self.threads < 1:
            raise UserError("--lr must be positive and --threads at least 1")


# Per-model defaults of `cli.py train` (the shipped weights were made with these).
RECIPES = {
    "dit-digits": {"steps": 7000, "warm_start": None},
    # The blocks' attention/MLP, the patch and timestep embedders and the output linear start from
    # the shipped dit-digits weights (same names and shapes); everything PixArt adds starts from
    # the official init. This is what makes 4000 steps enough (docs/pixart.md).
    "pixart-digits": {"steps": 4000, "warm_start": "dit-digits"},
}


def recipe(model_name: str) -> dict:
    return RECIPES.get(model_name, {"steps": 7000, "warm_start": None})


def digits_config(model_name: str):
    """The registered config, refused unless it fits the digits data (1x16x16) and is conditioned
    on its 10 classes (DiT) or on captions of the shipped word table's width (PixArt)."""
    from soda.digits.captions import WIDTH
    from soda.models.config import get_config

    config = get_config(model_name)
    fits = (config.in_channels, config.input_size) == (1, 16) and (
        config.num_classes == 10 if config.arch == "dit" else config.arch == "pixart" and config.caption_channels == WIDTH)
    if not fits:
        raise UserError(f"train knows the digits data only (1x16x16, 10 classes or {WIDTH}-d captions); "
                        f"{model_name} is not such a model")
    return config


class ClassLabels:
    """dit-digits: the class label; DiT's LabelEmbedder drops it to the null class itself
    (`torch.rand` from the global generator, as the official code)."""

    def __init__(self, config, data):
        self.config = config
        self.labels = torch.from_numpy(data.train_labels)

    def build(self) -> torch.nn.Module:
        from soda.models.dit import DiT

        return DiT(self.config)

    def forward(self, model, xt: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, gen: torch.Generator):
        return model(xt, t, self.labels[idx])


class Captions:
    """pixart-digits: each image's caption from the shipped word table. A thin or bold digit is
    captioned "a thin seven" or "a seven" (a fair coin from `gen`, so the plain caption covers
    every stroke); then, as PixArt's `token_drop`, a `class_dropout_prob` share of the rows
    (global `torch.rand`) gets the null caption under the same mask."""

    def __init__(self, config, data):
        from soda.digits.captions import WordTable, training_captions

        self.config = config
        table = WordTable.load()
        self.table = torch.from_numpy(table.table)
        ids_p, mask_p, ids_a, mask_a = training_captions(table, data.train_images, data.train_labels)
        self.ids = torch.from_numpy(np.stack([ids_p, ids_a]))  # [2, n, L]
        self.mask = torch.from_numpy(np.stack([mask_p, mask_a]))

    def build(self) -> torch.nn.Module:
        from soda.models.pixart import PixArt

        model = PixArt(self.config)
        model.initialize_weights()
        return model

    def forward(self, model, xt: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, gen: torch.Generator):
        which = (torch.rand(len(idx), generator=gen) < 0.5).long()
        ids, mask = self.ids[which, idx], self.mask[which, idx]
        caption = self.table[ids] * mask[..., None]
        drop = torch.rand(len(idx)) < self.config.class_dropout_prob
        return model(xt, t, model.y_embedder.token_drop(caption, drop), mask)


def conditioning_for(config, data):
    return ClassLabels(config, data) if config.arch == "dit" else Captions(config, data)


def warm_start(model: torch.nn.Module, source: str) -> list[str]:
    """Copy every tensor of `source` (a shipped model's name, or a weights file) whose name and
    shape the model shares, except the fixed position embedding; returns the names copied."""
    from soda.models.loading import PACKAGED, read_state_dict

    path = PACKAGED.get(source, source)
    state = read_state_dict(path)
    own = model.state_dict()
    shared = sorted(k for k, v in state.items() if k in own and own[k].shape == v.shape and k != "pos_embed")
    if not shared:
        raise UserError(f"--warm-start {source}: no tensor of it fits {model.config.name}")
    with torch.no_grad():
        for k in shared:
            own[k].copy_(state[k])
    return shared


# --- the official loss (diffusion/gaussian_diffusion.py, losses.py), torch, linear betas ----
class TrainingDiffusion:
    """Coefficient tables of the 1000-step linear schedule (float64, as the official code)."""

    def __init__(self, num_timesteps: int = 1000):
        betas = np.linspace(0.0001, 0.02, num_timesteps, dtype=np.float64)
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.num_timesteps = num_timesteps
        self.tables = {
            "sqrt_ac": np.sqrt(ac),
            "sqrt_1m_ac": np.sqrt(1.0 - ac),
            "sqrt_recip_ac": np.sqrt(1.0 / ac),
            "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1),
            "log_betas": np.log(betas),
            "post_log_var_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "post_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "post_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        }

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`_extract_into_tensor`: table[t] as float32, broadcast to `like`."""
        v = torch.from_numpy(self.tables[name])[t].float()
        return v.view(-1, *([1] * (like.dim() - 1))).expand_as(like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_ac", t, x0) * x0 + self._at("sqrt_1m_ac", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        mean = self._at("post_coef1", t, xt) * x0 + self._at("post_coef2", t, xt) * xt
        return mean, self._at("post_log_var_clipped", t, xt)

    def training_losses(self, model_out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample "mse", "vb" and "loss" = mse + vb (LossType.MSE, learned-range sigma)."""
        C = x0.shape[1]
        eps, var_values = model_out[:, :C], model_out[:, C:]
        # The vb term trains only the variance: the mean comes from the detached eps.
        frozen_eps = eps.detach()
        min_log = self._at("post_log_var_clipped", t, xt)
        max_log = self._at("log_betas", t, xt)
        frac = (var_values + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._at("sqrt_recip_ac", t, xt) * xt - self._at("sqrt_recipm1_ac", t, xt) * frozen_eps
        model_mean, _ = self.q_posterior(pred_x0, xt, t)
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        nll = mean_flat(nll) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = mean_flat((noise - eps) ** 2)
        return {"mse": mse, "vb": vb, "loss": mse + vb}


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (the t = 0 decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# --- the loop -------------------------------------------------------------------------------
def debias_ema(ema: dict[str, torch.Tensor], init: dict[str, torch.Tensor], decay: float,
               step: int) -> dict[str, torch.Tensor]:
    """EMA without its start value: (ema - decay^step * init) / (1 - decay^step).

    The EMA starts as a copy of the initial weights (as the official train.py does); in a short
    run that copy still weighs decay^step (0.999^1000 = 37%), so the saved weights remove it,
    exactly as Adam corrects its moment estimates. Integer buffers and constants pass through.
    """
    w = decay**step
    if w == 0.0 or step == 0:
        return {k: v.clone() for k, v in ema.items()}
    out = {}
    for k, v in ema.items():
        if not v.is_floating_point() or torch.equal(v, init[k]):
            out[k] = v.clone()
        else:
            out[k] = ((v.double() - w * init[k].double()) / (1.0 - w)).to(v.dtype)
    return out


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def train(
    model_name: str,
    cfg: TrainConfig,
    out: str | Path,
    log_path: str | Path | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train (from the init, or warm-started) and write the EMA weights to `out`; returns a summary."""
    import copy

    from soda.digits.data import load_split

    config = digits_config(model_name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # restored on return; results depend on it
    torch.manual_seed(cfg.seed)  # init and caption/class dropout draw from the global generator
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # batches, timesteps, noise (and caption words)
    data = load_split()
    images = torch.from_numpy(data.train_images)
    cond = conditioning_for(config, data)
    model = cond.build()
    if cfg.warm_start:
        warm_start(model, cfg.warm_start)
    ema = copy.deepcopy(model).requires_grad_(False)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    diffusion = TrainingDiffusion()
    log = open(log_path, "w") if log_path else None
    sums, count, t0 = {"loss": 0.0, "mse": 0.0, "vb": 0.0}, 0, time.perf_counter()
    last: dict = {}
    try:
        for step in range(1, cfg.steps + 1):
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
            x0 = images[idx]
            t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            xt = diffusion.q_sample(x0, t, noise)
            terms = diffusion.training_losses(cond.forward(model, xt, t, idx, gen), x0, xt, t, noise)
            loss = terms["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            update_ema(ema, model, cfg.ema_decay)
            for k in sums:
                sums[k] += float(terms[k].detach().mean())
            count += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                last = {"step": step, **{k: v / count for k, v in sums.items()},
                        "seconds": round(time.perf_counter() - t0, 2)}
                sums, count = {k: 0.0 for k in sums}, 0
                if log:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
            if progress:
                progress(step, last)
            if cfg.save_every > 0 and step % cfg.save_every == 0 and step < cfg.steps:
                _save(ema, init, out, config, cfg, step, time.perf_counter() - t0, last)
        seconds = time.perf_counter() - t0
        _save(ema, init, out, config, cfg, cfg.steps, seconds, last)
    finally:
        if log:
            log.close()
        torch.set_num_threads(threads_before)
    return {"out": str(out), "seconds": seconds, "steps": cfg.steps, "last": last}


def _save(ema: torch.nn.Module, init: dict[str, torch.Tensor], out: Path, config, cfg: TrainConfig, step: int,
          seconds: float, last: dict) -> None:
    """Bias-corrected EMA weights as safetensors (atomic), with the recipe as string metadata."""
    from safetensors.torch import save_file

    raw = {k: v.detach() for k, v in ema.state_dict().items()}
    state = {k: v.contiguous() for k, v in debias_ema(raw, init, cfg.ema_decay, step).items()}
    meta = {"format": str(FORMAT), "model": json.dumps(config.to_dict()), "train": json.dumps(asdict(cfg)),
            "step": str(step), "ema": "bias-corrected", "train_seconds": f"{seconds:.1f}", "last_loss": json.dumps(last)}
    from soda.outputs import atomic_output

    with atomic_output(out) as tmp:
        save_file(state, str(tmp), metadata=meta)
