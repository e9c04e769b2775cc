"""DPM-Solver++ (2M, multistep) in numpy, as diffusers' `DPMSolverMultistepScheduler()` runs it.

The defaults PixArt-alpha's converter ships: 1000 training steps, linear betas 1e-4..0.02,
algorithm "dpmsolver++", order 2, "midpoint" solver, epsilon prediction, "linspace" timestep
spacing, final sigma zero (so the last step is first order). diffusers keeps every table and
scalar in float32 (torch tensors); this copy does the same in numpy so that torch and the
runtime share one sampler that equals the scheduler to float32 rounding. Step index s runs 0
(noisiest) .. S-1 like the DDIM/DDPM samplers of `soda.sampling`.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32


def _alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """diffusers' table bit for bit: torch.linspace in float32 (each value start + step * i, or
    end - step * (T-1-i) past the middle, rounded once, as its fused multiply-add does), then
    torch.cumprod of 1 - beta (accumulated in double, stored as float32)."""
    n = num_train_timesteps
    start, end = F32(beta_start), F32(beta_end)
    step = np.float64((end - start) / F32(max(n - 1, 1)))
    i = np.arange(n, dtype=np.float64)
    betas = np.where(i < n // 2, np.float64(start) + step * i, np.float64(end) - step * (n - 1 - i)).astype(F32)
    return np.cumprod((F32(1) - betas).astype(np.float64)).astype(F32)


class DPMSolver:
    """DPM-Solver++(2M). `step` keeps the previous data prediction, so one instance runs one
    generation at a time; step 0 starts a new one."""

    def __init__(self, cfg, learn_sigma: bool = True):
        self.cfg = cfg
        self.learn_sigma = learn_sigma
        T = cfg.num_train_timesteps
        ac = _alphas_cumprod(T)
        S = cfg.steps
        self.timesteps = np.linspace(0, T - 1, S + 1).round()[::-1][:-1].copy().astype(np.int64)
        sigmas = (((F32(1) - ac) / ac) ** F32(0.5)).astype(F32)
        sigmas = np.interp(self.timesteps, np.arange(0, len(sigmas)), sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self._previous: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def model_timestep(self, s: int) -> int:
        return int(self.timesteps[s])

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha = F32(1) / ((sigma**2 + F32(1)) ** F32(0.5))
        return alpha, sigma * alpha

    @staticmethod
    def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
        with np.errstate(divide="ignore"):
            return np.log(alpha) - np.log(sigma)  # +inf at the final sigma 0

    def step(self, s: int, x: np.ndarray, model_out: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """x at step s -> x at step s+1 from the (guided) eps prediction (channels beyond x's dropped)."""
        eps = model_out[:, :x.shape[1]]
        if s == 0:
            self._previous = None
        sig = self.sigmas
        alpha_s0, sigma_s0 = self._alpha_sigma(sig[s])
        x0 = ((x - sigma_s0 * eps) / alpha_s0).astype(F32)  # data prediction (dpmsolver++)
        alpha_t, sigma_t = self._alpha_sigma(sig[s + 1])
        lam_t, lam_s0 = self._lambda(alpha_t, sigma_t), self._lambda(alpha_s0, sigma_s0)
        with np.errstate(invalid="ignore", over="ignore"):
            h = F32(lam_t - lam_s0)
            phi = alpha_t * (np.exp(-h) - F32(1))
            last = s == self.num_steps - 1  # final sigma zero: first order
            if self._previous is None or last:
                out = (sigma_t / sigma_s0) * x - phi * x0
            else:
                alpha_s1, sigma_s1 = self._alpha_sigma(sig[s - 1])
                h0 = F32(lam_s0 - self._lambda(alpha_s1, sigma_s1))
                r0 = h0 / h
                D1 = (F32(1) / r0) * (x0 - self._previous)
                out = (sigma_t / sigma_s0) * x - phi * x0 - F32(0.5) * phi * D1
        self._previous = x0
        return out.astype(F32)
