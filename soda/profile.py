"""OFS: offline fine-grained sensitivity, measured on full-compute trajectories.

For every step s, layer l, module m and cache age k (`intervals`):

- E_c(s, l, m, k) = 1 - cos(D(s-k), D(s)): the damage of serving step s from a cache k steps
  old. D is the module's pre-gate output; the cosine is taken per batch row over all tokens
  and channels, then averaged over rows (with CFG the rows are the doubled batch as sampled:
  conditional and unconditional halves both count).
- E_p(s, l, m, a, k): the same distance when a fraction `a` of the tokens (those the SODA
  selector picks: top-k of the channel mean of |D(s-k)|, `soda.selectors.feature_mean`) are
  recomputed and the others stay at D(s-k). For the token-wise MLP the recomputed values are
  the fresh D(s) of those tokens (exact, no extra compute). For attention, a pruned step
  attends among the kept tokens only (as the executor runs it), so by default the profiler
  runs that pruned attention on the step's true inputs for every (k, a) and measures the
  mixture it really produces (`exact_attention=True`), on `attention_rows` evenly spread
  rows of each batch (both CFG halves) to bound the cost. With False it uses the fresh
  full-attention values instead: cheaper, but on dit-digits that approximation is wrong by
  an order of magnitude (it says pruning attention beats reuse 94-100% of the time; the
  exact measurement says it almost never does), so it is not the default.

- E_f(s, l, m, o, k, g) (format 2, for soda-forecast): the same distance when D(s) is served
  as an order-o Taylor forecast (soda/forecast.py, TaylorSeer's rule) from full computations at
  s-k, s-k-g, ..., s-k-o*g: the anchor k steps back and earlier anchors g apart (an even gap
  is assumed before the last anchor). E_pf(s, l, m, o, a, k, g): the forecast with the fraction
  a of the tokens recomputed (the same tokens and, for attention, the same pruned computation
  as E_p). A forecast is a fixed linear combination of stored outputs, so both come from
  per-token dot products between outputs (a rolling Gram matrix), not from forecast arrays.

The trajectories are teacher-forced: one full-compute generation per calibration sample, so
the table says what each single cached module would cost on the true trajectory. Entries
with s < k (or whose forecast needs steps before 0) do not exist and are stored as null (NaN
in memory). Format-1 profiles (no forecast tables) still load; soda-forecast asks for a new one.
"""
from __future__ import annotations

import resource
import sys
import time
import tracemalloc
from collections import deque
from functools import lru_cache
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from soda import seeds
from soda.errors import UserError
from soda.schedule import kept_tokens, read_json, write_json_atomic

FORMAT = 2
SUPPORTED_FORMATS = (1, 2)  # 1: no forecast tables
KIND = "soda-profile"
DEFAULT_INTERVALS = (1, 2, 3, 4, 5, 6)
DEFAULT_RATES = (0.25, 0.5, 0.75)
DEFAULT_ORDERS = (1, 2)
SUMS = ("sum_c", "sum_p", "rows", "rows_p", "sum_f", "sum_pf", "rows_f", "rows_pf")  # a batch's additive part
SELECTOR = "feature-mean"


@dataclass
class Profile:
    """Sensitivity tables plus the identity of what they were measured on."""

    model: str
    model_hash: str
    model_config: dict  # ModelConfig.to_dict(): lets a schedule be made (and its FLOPs counted) from the file alone
    weights: str
    sampler: dict  # SamplerConfig.to_dict()
    num_steps: int
    num_layers: int
    modules: list[str]
    intervals: list[int]
    rates: list[float]
    E_c: list  # [S][L][M][K], null where s < k
    E_p: list  # [S][L][M][A][K], null where s < k
    samples: int = 0
    seed: int = 0
    selector: str = SELECTOR
    cost: dict = field(default_factory=dict)
    orders: list = field(default_factory=list)  # forecast orders profiled ([] in format 1)
    gaps: list = field(default_factory=list)  # gaps g between earlier anchors: 1..max(intervals)+1
    E_f: list | None = None  # [S][L][M][O][K][G]
    E_pf: list | None = None  # [S][L][M][O][A][K][G]
    kind: str = KIND
    format: int = FORMAT

    # --- arrays ---------------------------------------------------------------------------
    def ec(self) -> np.ndarray:
        """E_c as float64 [S, L, M, K]; NaN where undefined."""
        return _to_array(self.E_c)

    def ep(self) -> np.ndarray:
        """E_p as float64 [S, L, M, A, K]; NaN where undefined."""
        return _to_array(self.E_p)

    @property
    def has_forecast(self) -> bool:
        return self.E_f is not None and bool(self.orders)

    def ef(self) -> np.ndarray:
        """E_f as float64 [S, L, M, O, K, G]; NaN where undefined."""
        return _to_array(self.E_f)

    def epf(self) -> np.ndarray:
        """E_pf as float64 [S, L, M, O, A, K, G]; NaN where undefined."""
        return _to_array(self.E_pf)

    @property
    def max_contiguous_interval(self) -> int:
        """Largest K with 1..K all profiled: the longest segment the DP may use is K + 1."""
        K = 0
        while K + 1 in self.intervals:
            K += 1
        return K

    # --- validation and identity ----------------------------------------------------------
    def validate(self) -> "Profile":
        S, L, M = self.num_steps, self.num_layers, len(self.modules)
        K, A = len(self.intervals), len(self.rates)
        if not self.intervals or any(not isinstance(k, int) or k < 1 for k in self.intervals) \
                or list(self.intervals) != sorted(set(self.intervals)):
            raise UserError(f"profile intervals must be distinct positive integers in order, got {self.intervals}")
        if not self.rates or any(not 0 < a < 1 for a in self.rates) or list(self.rates) != sorted(set(self.rates)):
            raise UserError(f"profile rates must be distinct values in (0, 1) in order, got {self.rates}")
        tables = [("E_c", self.E_c, (S, L, M, K)), ("E_p", self.E_p, (S, L, M, A, K))]
        if self.E_f is not None or self.E_pf is not None or self.orders:
            O, G = len(self.orders), len(self.gaps)
            if not self.orders or any(not isinstance(o, int) or not 1 <= o <= 4 for o in self.orders) \
                    or self.gaps != list(range(1, G + 1)) or G == 0:
                raise UserError(f"profile forecast orders {self.orders} / gaps {self.gaps} are malformed")
            tables += [("E_f", self.E_f, (S, L, M, O, K, G)), ("E_pf", self.E_pf, (S, L, M, O, A, K, G))]
        for name, table, shape in tables:
            try:
                arr = _to_array(table)
            except (ValueError, TypeError):
                raise UserError(f"profile table {name} is not a numeric nested list") from None
            if arr.shape != shape:
                raise UserError(f"profile table {name} has shape {list(arr.shape)}, expected {list(shape)}")
        return self

    def check_fits(self, model: str, model_hash: str, sampler: str, num_steps: int) -> None:
        """One clear error when a profile is used with a model or sampler it was not made for."""
        if self.model_hash != model_hash:
            raise UserError(f"profile was made for model {self.model} ({self.model_hash}), not {model} ({model_hash})")
        if self.num_steps != num_steps or self.sampler.get("kind") != sampler:
            raise UserError(f"profile was made for {self.sampler.get('kind')}-{self.num_steps}, not {sampler}-{num_steps}")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> "Profile":
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise UserError(f"{where} is not a SODA profile (make one with `cli.py profile`)")
        if d.get("format") not in SUPPORTED_FORMATS:
            raise UserError(f"{where}: profile format {d.get('format')} is not supported "
                            f"(expected one of {SUPPORTED_FORMATS})")
        try:
            return cls(**d).validate()
        except TypeError as e:
            raise UserError(f"{where}: malformed profile ({e})") from None

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls.from_dict(read_json(path, "profile"), str(path))


def _to_array(nested) -> np.ndarray:
    return np.array(nested, dtype=object).astype(np.float64)  # None -> nan


def _to_nested(arr: np.ndarray) -> list:
    """NaN -> None, other values rounded to 6 significant digits (the table stays small)."""
    obj = np.vectorize(lambda v: None if np.isnan(v) else float(f"{v:.6g}"), otypes=[object])(arr)
    return obj.tolist()


class SensitivityRecorder:
    """The executor's `recorder`: accumulates E_c and E_p from a full-compute trajectory.

    Keeps, per (layer, module), the last max(intervals) outputs D with their per-token squared
    norms; each new D(s) is compared with D(s - k) for every profiled k. Cosines are assembled
    from per-token dot products, so each rate costs a gather, not another pass over D.
    """

    def __init__(self, num_steps: int, num_layers: int, modules: tuple[str, ...], intervals, rates,
                 inputs: "InputTap | None" = None, attention_rows: int = 16, orders=(), unprunable=()):
        from soda.selectors.feature_mean import FeatureMeanSelector

        self.inputs = inputs  # when given, pruned token-mixing modules are recomputed on the kept tokens
        self.token_mixing = {s.name for s in inputs.specs if s.token_mixing} if inputs is not None else set()
        self.attention_rows = attention_rows
        self.unprunable = set(unprunable)  # modules declared full-or-reuse only: E_p stays empty (NaN)
        self.modules = tuple(modules)
        self.intervals = tuple(intervals)
        self.rates = tuple(rates)
        self.orders = tuple(orders)
        self.gaps = tuple(range(1, max(self.intervals) + 2)) if self.orders else ()
        self.selector = FeatureMeanSelector()
        S, L, M, K, A = num_steps, num_layers, len(modules), len(self.intervals), len(self.rates)
        O, G = len(self.orders), len(self.gaps)
        self.sum_c = np.zeros((S, L, M, K))
        self.sum_p = np.zeros((S, L, M, A, K))
        self.rows = np.zeros((S, L, M, K))
        self.rows_p = np.zeros((S, L, M, K))
        self.sum_f = np.zeros((S, L, M, O, K, G))
        self.sum_pf = np.zeros((S, L, M, O, A, K, G))
        self.rows_f = np.zeros((S, L, M, O, K, G))
        self.rows_pf = np.zeros((S, L, M, O, K, G))
        self.depth = max(self.intervals) + max(self.orders, default=0) * max(self.gaps, default=0)
        self.reset()

    def reset(self) -> None:
        """Between generation batches: the ring buffers belong to one trajectory."""
        self.history: dict[tuple[int, int], deque] = {}
        self.gram: dict[tuple[int, int], dict] = {}  # (l, m) -> {(s_a, s_b): per-token dot [B, N]}

    def __call__(self, s: int, l: int, name: str, D: np.ndarray) -> None:
        m = self.modules.index(name)
        hist = self.history.setdefault((l, m), deque(maxlen=self.depth))
        ff = np.einsum("bnc,bnc->bn", D, D, dtype=np.float64)  # [B, N]
        ff_sum = ff.sum(axis=1)
        B, N, _ = D.shape
        exact = self.inputs is not None and name in self.token_mixing
        rows = np.unique(np.linspace(0, B - 1, min(B, self.attention_rows)).round().astype(np.int64)) if exact \
            else np.arange(B)
        gram = self.gram.setdefault((l, m), {})
        if self.orders:
            for s_old, D_old, _ in hist:
                gram[(s_old, s)] = np.einsum("bnc,bnc->bn", D_old, D, dtype=np.float64)
            gram[(s, s)] = ff
        ages = []  # (j, D_old, ss, sf) for every profiled age this step has
        for j, k in enumerate(self.intervals):
            if k > len(hist):
                continue
            s_old, D_old, ss = hist[-k]
            assert s_old == s - k, "recorder must see every step of a full-compute trajectory"
            sf = gram[(s_old, s)] if self.orders else np.einsum("bnc,bnc->bn", D_old, D, dtype=np.float64)
            self.sum_c[s, l, m, j] += _cos_distance(sf.sum(1), ss.sum(1), ff_sum).sum()
            self.rows[s, l, m, j] += B
            if name not in self.unprunable:
                self.rows_p[s, l, m, j] += len(rows)
            ages.append((j, D_old, ss, sf))
        combos, fd, fsq = self._forecasts(s, gram, [j for j, *_ in ages])
        if combos:
            o_, j_, g_ = (np.array(v) for v in zip(*combos))
            self.sum_f[s, l, m, o_, j_, g_] += _cos_distance(fd.sum(2), fsq.sum(2), ff_sum).sum(1)
            self.rows_f[s, l, m, o_, j_, g_] += B
            if name not in self.unprunable:  # full-or-reuse modules have no prune entries
                self.rows_pf[s, l, m, o_, j_, g_] += len(rows)
        for i, a in enumerate(self.rates if name not in self.unprunable else ()):
            idxs = [self.selector.select(s, l, name, kept_tokens(a, N), None, D_old) for _, D_old, _, _ in ages]
            if exact and ages:
                # Token-mixing module: what the pruned module really computes on the kept tokens,
                # every age in one batched call (same number of kept tokens).
                parts = self.inputs.partial(l, name, [idx[rows] for idx in idxs], rows)
                for (j, D_old, _, _), idx, part in zip(ages, idxs, parts):
                    mixed = D_old[rows].copy()
                    np.put_along_axis(mixed, idx[rows, :, None], part, axis=1)
                    dot = np.einsum("bnc,bnc->b", mixed, D[rows], dtype=np.float64)
                    sq = np.einsum("bnc,bnc->b", mixed, mixed, dtype=np.float64)
                    self.sum_p[s, l, m, i, j] += _cos_distance(dot, sq, ff_sum[rows]).sum()
                    c = [n for n, combo in enumerate(combos) if combo[1] == j]
                    if c:  # the same recomputed tokens on top of each forecast instead of the cache
                        sel = np.zeros((len(rows), N), dtype=bool)
                        np.put_along_axis(sel, idx[rows], True, axis=1)
                        fresh = np.take_along_axis(D[rows], idx[rows, :, None], axis=1)
                        p_dot = np.einsum("bnc,bnc->b", part, fresh, dtype=np.float64)
                        p_sq = np.einsum("bnc,bnc->b", part, part, dtype=np.float64)
                        dot = np.where(sel, 0.0, fd[c][:, rows]).sum(2) + p_dot
                        sq = np.where(sel, 0.0, fsq[c][:, rows]).sum(2) + p_sq
                        self.sum_pf[s, l, m, o_[c], i, j, g_[c]] += _cos_distance(dot, sq, ff_sum[rows]).sum(1)
                continue
            for (j, _, ss, sf), idx in zip(ages, idxs):
                sel = np.zeros((B, N), dtype=bool)
                np.put_along_axis(sel, idx, True, axis=1)
                dot = np.where(sel, ff, sf).sum(1)  # fresh tokens agree with themselves
                mixed = np.where(sel, ff, ss).sum(1)
                self.sum_p[s, l, m, i, j] += _cos_distance(dot, mixed, ff_sum).sum()
                c = [n for n, combo in enumerate(combos) if combo[1] == j]
                if c:
                    dot = np.where(sel, ff, fd[c]).sum(2)
                    sq = np.where(sel, ff, fsq[c]).sum(2)
                    self.sum_pf[s, l, m, o_[c], i, j, g_[c]] += _cos_distance(dot, sq, ff_sum).sum(1)
        hist.append((s, D, ff))
        for key in [key for key in gram if key[0] <= s - self.depth]:
            del gram[key]

    def _forecasts(self, s: int, gram: dict, ages: list[int]):
        """Every (order, age, gap) index whose history exists, and per-token F.D(s) and F.F
        [C, B, N] for each, F the forecast of D(s) from full outputs at s-k-o*g, ..., s-k
        (sum_q w_q D(t_q): F.D(s) = sum_q w_q <D(t_q), D(s)>, F.F = sum_qr w_q w_r <D(t_q), D(t_r)>)."""
        combos, fd, fsq = [], [], []
        for oi, o in enumerate(self.orders):
            for j in ages:
                k = self.intervals[j]
                for gi, g in enumerate(self.gaps):
                    t = [s - k - (o - q) * g for q in range(o + 1)]  # oldest first
                    if t[0] < 0 or (t[0], s) not in gram:
                        continue
                    w = _weights(o, k, g)
                    combos.append((oi, j, gi))
                    fd.append(sum(w[q] * gram[(t[q], s)] for q in range(o + 1)))
                    fsq.append(sum((1 if q == r else 2) * w[q] * w[r] * gram[(t[q], t[r])]
                                   for q in range(o + 1) for r in range(q, o + 1)))
        if not combos:
            return [], None, None
        return combos, np.stack(fd), np.stack(fsq)

    def tables(self) -> tuple[np.ndarray, ...]:
        """E_c, E_p, E_f, E_pf (the last two empty without forecast orders)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            ec = np.where(self.rows > 0, self.sum_c / self.rows, np.nan)
            ep = np.where(self.rows_p[:, :, :, None, :] > 0, self.sum_p / self.rows_p[:, :, :, None, :], np.nan)
            ef = np.where(self.rows_f > 0, self.sum_f / self.rows_f, np.nan)
            rpf = self.rows_pf[:, :, :, :, None]
            epf = np.where(rpf > 0, self.sum_pf / rpf, np.nan)
        return ec, ep, ef, epf


@lru_cache(maxsize=None)
def _weights(order: int, k: int, g: int) -> tuple[float, ...]:
    """Forecast weights over full steps -k-o*g .. -k (oldest first) for step 0 (shift-invariant)."""
    from soda.forecast import forecast_weights

    return tuple(float(v) for v in forecast_weights([-k - (order - q) * g for q in range(order + 1)], 0, order))


class InputTap:
    """Wraps a backend and remembers each module's latest inputs, so the recorder can rerun a
    module on a subset of the same step's tokens (pruned attention, measured exactly)."""

    def __init__(self, backend):
        self.backend = backend
        self.specs = backend.specs
        self.modules = backend.modules
        self.num_layers = backend.num_layers
        self.last: dict[tuple[int, str], tuple[np.ndarray, tuple, dict | None]] = {}

    def prepare(self, cond):
        return self.backend.prepare(cond)

    def embed(self, x, t, context):
        return self.backend.embed(x, t, context)

    def modulation(self, layer, step):
        return self.backend.modulation(layer, step)

    def module(self, layer, name, tokens, *args, context=None):
        self.last[(layer, name)] = (tokens, args, context)
        return self.backend.module(layer, name, tokens, *args, context=context)

    def final(self, tokens, step):
        return self.backend.final(tokens, step)

    def partial(self, layer: int, name: str, idxs: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
        """For each idx [len(rows), k] (same k): the module output of batch `rows` on those kept
        tokens only (attending among them), all computed in one batched call."""
        tokens, args, context = self.last[(layer, name)]
        tokens = tokens[rows]
        part = np.concatenate([np.take_along_axis(tokens, idx[:, :, None], axis=1) for idx in idxs])
        reps = len(idxs)
        tile = lambda a: np.tile(a[rows], (reps,) + (1,) * (a.ndim - 1))  # noqa: E731
        ctx = None if context is None else {k: tile(v) for k, v in context.items()}
        out = self.backend.module(layer, name, part, *(tile(a) for a in args), context=ctx)[0]
        return np.split(out, reps)


def _cos_distance(dot: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray) -> np.ndarray:
    """1 - dot / (|a| |b|) per row; two zero vectors are at distance 0."""
    den = np.sqrt(sq_a * sq_b)
    return np.where(den > 0, 1.0 - dot / np.where(den > 0, den, 1.0), 0.0)


def calibrate_batch(
    model,
    sampler_cfg,
    labels,
    noise_seed,
    intervals=DEFAULT_INTERVALS,
    rates=DEFAULT_RATES,
    exact_attention: bool = True,
    attention_rows: int = 16,
    progress: Callable[[int], None] | None = None,
    orders=(),
) -> dict[str, np.ndarray]:
    """One calibration batch: a full-compute generation of `labels` (class labels or a
    `soda.sampling.Conditioning`) from `noise_seed`'s noise (an int or SeedSequence), and the
    recorder's sums over it (`SUMS`: E_c, E_p and the forecast sums).
    Batches are independent, so they may run anywhere (`profile(..., pool=...)`); their sums add up."""
    from soda.executor import Executor
    from soda.flops import FlopsModel
    from soda.policies import ScheduleSpec
    from soda.policies.full import full_schedule
    from soda.sampling import initial_noise, make_diffusion, sample_loop
    from soda.torch_backend import TorchBackend

    config = model.config
    modules = config.modules
    S = sampler_cfg.steps
    spec = ScheduleSpec.for_model(config, sampler_cfg.kind, S, modules)
    backend = InputTap(TorchBackend(model))
    recorder = SensitivityRecorder(S, config.depth, modules, intervals, rates, backend if exact_attention else None,
                                   attention_rows, orders, {m.name for m in config.interface.modules if not m.prunable})
    executor = Executor(backend, full_schedule(spec), FlopsModel.for_config(config), recorder=recorder)
    diffusion = make_diffusion(sampler_cfg, config.learn_sigma)
    shape = config.latent_shape
    z, rng = initial_noise(len(labels), shape, noise_seed)
    sample_loop(executor, diffusion, z, labels, config.null_label, config.in_channels, rng, progress)
    return {name: getattr(recorder, name) for name in SUMS}


def profile(
    model,
    sampler_cfg,
    samples: int = 32,
    seed: int = 0,
    intervals=DEFAULT_INTERVALS,
    rates=DEFAULT_RATES,
    progress: Callable[[int], None] | None = None,
    weights: str = "unknown",
    batch_size: int = 64,
    exact_attention: bool = True,
    attention_rows: int = 16,
    pool=None,
    conditioning=None,
    orders=DEFAULT_ORDERS,
) -> Profile:
    """Sensitivity tables from `samples` full-compute generations with random labels and noise
    from the calibration stream of `seed` (`soda.seeds`).

    Calibration samples are generated in batches of up to `batch_size` (CFG doubles the rows);
    `progress(s)` is called once per sampling step of every batch. With a `pool`
    (`soda.distributed.RayPool`) each batch runs on a worker; the sums are added in batch
    order, so the tables are bit-identical to a run in this process. `conditioning` (a
    `soda.sampling.Conditioning`, e.g. calibration captions) replaces the random labels; its
    rows are used in turn (cycled when `samples` exceeds them).
    """
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    intervals = tuple(sorted(set(int(k) for k in intervals)))
    rates = tuple(sorted(set(float(a) for a in rates)))
    orders = tuple(sorted(set(int(o) for o in orders)))
    if any(not 1 <= o <= 4 for o in orders):
        raise UserError(f"forecast orders must be in 1..4, got {list(orders)}")
    config = model.config
    modules = config.modules
    S = sampler_cfg.steps
    if conditioning is None and config.interface.cond != ("y",):
        raise UserError(f"{config.name} is text-conditioned: profiling needs calibration captions "
                        "(cli.py profile --prompt-embeds CALIBRATION.npz)")
    if conditioning is None:
        # Calibration stream (soda.seeds): never the noise any bench evaluation draws, whatever --seed.
        labels = np.random.default_rng(seeds.calibration(seed, seeds.PROFILE, 0)).integers(0, config.num_classes,
                                                                                            samples)
        batches = [(labels[start:start + batch_size], seeds.calibration(seed, seeds.PROFILE, 1 + b))
                   for b, start in enumerate(range(0, samples, batch_size))]
    else:
        rows = np.arange(samples) % len(conditioning)
        batches = [(conditioning.rows(rows[start:start + batch_size]), seeds.calibration(seed, seeds.PROFILE, 1 + b))
                   for b, start in enumerate(range(0, samples, batch_size))]
    options = {"intervals": intervals, "rates": rates, "exact_attention": exact_attention,
               "attention_rows": attention_rows, "orders": orders}

    tracing = not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    if pool is None:
        parts = (calibrate_batch(model, sampler_cfg, ys, noise_seed, progress=progress, **options)
                 for ys, noise_seed in batches)
    else:
        parts = pool.calibrate(sampler_cfg.to_dict(), batches, options, progress)
    recorder = SensitivityRecorder(S, config.depth, modules, intervals, rates, orders=orders)
    for part in parts:  # in batch order: the same additions, in the same order, as one recorder
        for name in SUMS:
            getattr(recorder, name)[...] += part[name]
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    if tracing:
        tracemalloc.stop()
    ec, ep, ef, epf = recorder.tables()
    cost = {
        "seconds": round(seconds, 3),
        "peak_traced_mb": round(peak / 2**20, 1),
        "max_rss_mb": round(_max_rss_mb(), 1),
        "generations": samples,
        "batch_rows": min(samples, batch_size) * (2 if sampler_cfg.uses_cfg else 1),
        "exact_attention": exact_attention,
        "attention_rows": attention_rows if exact_attention else None,
    }
    if pool is not None:
        cost["ray_workers"] = pool.size  # memory figures above are this process's only
    return Profile(
        model=config.name, model_hash=config.hash(), model_config=config.to_dict(), weights=weights,
        sampler=sampler_cfg.to_dict(), num_steps=S, num_layers=config.depth, modules=list(modules),
        intervals=list(intervals), rates=list(rates), E_c=_to_nested(ec), E_p=_to_nested(ep),
        samples=samples, seed=seed, cost=cost, orders=list(orders), gaps=list(recorder.gaps),
        E_f=_to_nested(ef) if orders else None, E_pf=_to_nested(epf) if orders else None,
    ).validate()


def _max_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
