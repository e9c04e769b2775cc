"""bench: every policy on the same evaluation noise and labels, against full compute, at equal FLOPs.

What a reviewer needs from a comparison, in one run:
- equal budget and tolerance: every schedule lands in [target, 1.03 x target] FLOPs speedup
  (`soda.policies.scaling.in_window`; a row that cannot, e.g. FORA's whole anchors, says so);
- equal tuning: each baseline appears twice, `variant` "rule" (its published rule scaled to the
  target) and "tuned" (its free parameters chosen on calibration seeds by the PSNR this bench
  reports, `soda.tuning`); SODA chooses its own setting on its calibration profile;
- disjoint data: calibration (profiling, tuning) and evaluation draw from separate seed streams
  (`soda.seeds`), whatever `--seed` the user passes;
- spread: the samples are split over `eval_seeds` evaluation seeds; `psnr_db` is the mean of the
  per-seed PSNRs and `psnr_ci95` its 95% t-interval;
- wall speedup by interleaved rounds: each evaluation seed is one round that runs full and every
  schedule once; a row's wall speedup is the median over rounds of (full seconds / its seconds)
  in the same round (`soda.timing.wall_speedup`, the runtime report's definition).

Fidelity is measured against the full model's samples from the same noise (PSNR and cosine,
`soda.metrics`); for `dit-digits` and `pixart-digits` the digit classifier adds accuracy on the requested labels (on the classes the captions name) and
a Frechet distance to held-out real digits. The backend is pluggable: `backend_for("torch",
...)` is the PyTorch reference; `"ort"` runs an exported engines folder through the runtime's
`make_backend` (imported lazily, so bench works without the runtime package).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from soda.errors import UserError

FORMAT = 1
BACKENDS = ("torch", "ort")
FIELDS = ("policy", "variant", "target_speedup", "flops_speedup", "wall_speedup", "psnr_db", "psnr_ci95", "cosine",
          "class_accuracy", "frechet")


def backend_for(kind: str, model, engines_dir: str | None = None, blocks: bool = True, device: str = "cpu",
                precision: str = "fp32", weights: str | None = None):
    """The backend the bench runs: "torch" (the reference) or "ort" (an exported engines folder,
    opened by the runtime's own `make_backend`, so bench measures exactly what `run` runs).
    device "cuda": torch keeps weights and every loop array on the GPU (in `precision`); ort
    runs the CUDA provider on device arrays. `weights`: the bench's weights id, which the engines'
    must equal (else the report would name weights the graphs do not hold)."""
    if kind == "torch":
        from soda.torch_backend import DTYPES, TorchBackend

        if device == "cpu":
            if precision != "fp32":
                raise UserError(f"--precision {precision} needs --device cuda (the CPU reference is fp32)")
            return TorchBackend(model)
        return TorchBackend(model, device=device, dtype=DTYPES[precision])
    if kind == "ort":
        if not engines_dir:
            raise UserError("--backend ort needs --engines DIR (made by `cli.py export`)")
        try:
            from runtime.engines import open_engines
            from runtime.run import make_backend
        except ImportError as e:
            raise UserError(f"--backend ort needs the runtime package ({e})") from None
        engines = open_engines(engines_dir)
        if getattr(model, "video", None):  # a video model's engines run any video size
            if engines.config.frames is None:
                raise UserError(f"{engines_dir} was exported from {engines.config.name}, not {model.config.name}")
            engines = engines.at_video(*model.video)
        if engines.config.hash() != model.config.hash():
            raise UserError(f"{engines_dir} was exported from {engines.config.name}, not {model.config.name}")
        if weights is not None:  # the graphs carry their own weights: the bench's must be the same
            engines.manifest.check_matches(weights=weights)
        if precision != "fp32":
            raise UserError(f"--precision {precision} is for --backend torch (onnxruntime runs the exported fp32 graphs)")
        return make_backend(engines, "ort", device=device, blocks=blocks)
    raise UserError(f"unknown backend {kind!r}; choose one of: {', '.join(BACKENDS)}")


@dataclass
class BenchSetup:
    policies: list[str]
    speedup: float
    samples: int = 100
    seed: int = 0
    frontier: list[float] = field(default_factory=list)
    backend: str = "torch"
    engines_dir: str | None = None
    profile_file: str | None = None
    profile_samples: int = 32
    batch_size: int = 50
    timing_images: int = 2  # --backend ort: images for the runtime-vs-monolithic timing
    timing_repeats: int = 5  # interleaved rounds of that timing
    timing_per_module: bool = False  # also time every schedule module by module (no block graphs)
    keep_samples: int = 0  # > 0: report["kept_samples"] = {name: first n samples at `speedup`} (arrays, not JSON)
    eval_seeds: int = 5  # evaluation seeds (= timing rounds); the samples are split evenly over them
    tune: bool = True  # add a "tuned" row for every baseline with a tuning space
    tune_samples: int = 16  # calibration samples each tuning candidate is scored on
    planner: str = "uas"  # SODA's planner: "uas" (the paper) or "joint" (soda.dp_joint)
    ablation: bool = False  # also SODA with planners fixed / dcs / uas / joint at `speedup`
    prompt_embeds: str | None = None  # text-conditioned models: an npz of captions (soda.captions)
    calibration_prompts: int | None = None  # the first K captions calibrate (profile, tuning); default half
    device: str = "cpu"  # "cuda": the loop's arrays stay on the GPU (torch tensors, or CuPy for ort)
    precision: str = "fp32"  # --backend torch --device cuda: fp16 / bf16 weights and activations


def parse_policies(text: str) -> list[str]:
    from soda.policies import POLICIES

    names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not names:
        raise UserError("--policies is empty")
    bad = [p for p in names if p not in POLICIES]
    if bad:
        raise UserError(f"unknown policy {', '.join(bad)}; choose from: {', '.join(POLICIES)}")
    return names


def parse_speedups(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--frontier must be comma-separated numbers, got {text!r}") from None
    if any(not (1 <= v < math.inf) for v in values):
        raise UserError(f"--frontier speedups must be finite and at least 1, got {text}")
    return values


def check_setup(setup: BenchSetup) -> None:
    """Every bad combination is one user error, before any work."""
    if setup.samples < 1:
        raise UserError(f"--samples must be at least 1, got {setup.samples}")
    if not 1 <= setup.eval_seeds <= setup.samples:
        raise UserError(f"--eval-seeds must be between 1 and --samples ({setup.samples}), got {setup.eval_seeds}")
    if setup.tune_samples < 1:
        raise UserError(f"--tune-samples must be at least 1, got {setup.tune_samples}")
    if setup.planner not in ("uas", "joint"):
        raise UserError(f"--planner must be uas or joint, got {setup.planner!r}")


@dataclass
class Cell:
    """One schedule the bench evaluates: a row of the report."""

    policy: str
    variant: str  # "rule" / "tuned" for baselines, "-" for full and soda, the planner in the ablation
    target: float | None
    schedule: object
    tuning: dict | None = None

    @property
    def name(self) -> str:
        return self.policy if self.variant == "-" else f"{self.policy} {self.variant}"


class Runner:
    """Runs schedules on fixed noise and labels, in chunks of `batch_size`."""

    def __init__(self, backend, model, sampler, batch_size: int, progress: Callable | None = None, pool=None):
        self.backend, self.model, self.sampler, self.batch_size = backend, model, sampler, batch_size
        self.progress = progress
        self.pool = pool  # soda.distributed.RayPool: the chunks run on Ray workers, timed there

    def run(self, schedule, labels: np.ndarray, noise: np.ndarray, seqs, desc: str | None = None):
        """(samples, FLOPs, seconds); `seqs(c)` seeds chunk c's DDPM noise."""
        from soda.generate import generate, make_executor

        outs, flops, seconds = [], 0.0, 0.0
        bs = self.batch_size
        steps = self.sampler.steps * math.ceil(len(labels) / bs)
        tick = self.progress(desc, steps) if (self.progress and desc) else None
        if self.pool is not None:
            chunks = [(labels[a:a + bs], seqs(c), noise[a:a + bs]) for c, a in enumerate(range(0, len(labels), bs))]
            try:
                parts = self.pool.generate(self.sampler.to_dict(), schedule.to_dict(), chunks,
                                           tick and (lambda i: tick.update(self.sampler.steps)))
            finally:
                if tick is not None:
                    tick.close()
            return np.concatenate([x for x, _, _ in parts]), sum(f for _, f, _ in parts), sum(t for _, _, t in parts)
        executor = make_executor(self.backend, self.model.config, schedule)
        try:
            for c, start in enumerate(range(0, len(labels), bs)):
                sl = slice(start, start + bs)
                x, stats = generate(self.backend, self.model.config, self.sampler, schedule, labels[sl], seqs(c),
                                    noise[sl], tick and (lambda s: tick.update()), executor=executor)
                outs.append(x)
                flops += stats.flops
                seconds += stats.seconds
        finally:
            if tick is not None:
                tick.close()
        return np.concatenate(outs), flops, seconds


def draw(seq, n: int, config) -> np.ndarray:
    """n initial latents from a seed sequence."""
    shape = config.latent_shape
    return np.random.default_rng(seq).standard_normal((n, *shape)).astype(np.float32)


DIGITS_MODELS = ("dit-digits", "pixart-digits")


def caption_classes(setup: BenchSetup, k: int, n: int) -> np.ndarray | None:
    """The digit each of the n evaluation samples' captions names (prompts k.. cycled, as
    `conditions` cycles them), from the npz's `captions`; None where the file has none."""
    from soda.captions import load_caption_texts
    from soda.digits.captions import caption_labels

    texts = load_caption_texts(setup.prompt_embeds)
    if texts is None:
        return None
    try:
        classes = caption_labels(texts[k:])
    except UserError:
        return None
    return classes[np.arange(n) % len(classes)]


def _scores(model_name: str, echo):
    """(metrics module, classifier or None)."""
    try:
        from soda import metrics
    except ImportError:
        raise UserError("bench needs soda/metrics.py (psnr, cosine), which this checkout lacks") from None
    classifier = None
    if model_name in DIGITS_MODELS:
        try:
            from soda.digits.classifier import DigitClassifier

            classifier = DigitClassifier.load_default()
        except (ImportError, UserError, FileNotFoundError) as e:
            echo(f"note: no digit classifier ({e}); accuracy and Frechet are null")
    return metrics, classifier


def mean_ci95(values: list[float]) -> tuple[float, list[float] | None]:
    """Mean and its 95% t-interval (None for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, None
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, [mean - half, mean + half]


def pruned_share(schedule) -> float | None:
    """Fraction of the reused (non-full) module actions that recompute some tokens."""
    reused = pruned = 0
    for s in range(schedule.num_steps):
        if schedule.is_skip(s):
            continue
        for row in schedule.steps[s]:
            for a in row:
                if a != "full":
                    reused += 1
                    pruned += a.startswith("prune@")
    return pruned / reused if reused else None


def split_prompts(model, setup: BenchSetup, sampler=None):
    """(calibration, evaluation) captions of a text-conditioned model, disjoint: the first K
    prompts of --prompt-embeds calibrate (profile, tuning), the others are evaluated. (None, None)
    for a label-conditioned model."""
    config = model.config
    if config.interface.cond == ("y",):
        if setup.prompt_embeds or setup.calibration_prompts is not None:
            flag = "--prompt-embeds" if setup.prompt_embeds else "--calibration-prompts"
            raise UserError(f"{flag} is for text-conditioned models; {config.name} takes class labels")
        return None, None
    if not setup.prompt_embeds:
        raise UserError(f"{config.name} is text-conditioned: bench needs --prompt-embeds FILE.npz "
                        "(its first prompts calibrate, the rest are evaluated)")
    from soda.captions import caption_conditioning, load_prompt_embeds

    prompts = load_prompt_embeds(setup.prompt_embeds, config.caption_channels)
    n = len(prompts)
    k = setup.calibration_prompts if setup.calibration_prompts is not None else n // 2
    if n < 2 or not 1 <= k < n:
        raise UserError(f"--prompt-embeds has {n} prompts; bench needs at least one calibration and one evaluation "
                        f"prompt (--calibration-prompts {k})")
    null = model.null_caption_table() if hasattr(model, "null_caption_table") else None
    from soda.generate import with_video

    return (with_video(caption_conditioning(prompts.rows(slice(0, k)), null), config, sampler),
            with_video(caption_conditioning(prompts.rows(slice(k, n)), null), config, sampler))


def bench(model, weights: str, sampler, setup: BenchSetup, echo: Callable = print,
          progress: Callable | None = None, pool=None) -> dict:
    """All policies at `setup.speedup` (plus the frontier speedups) -> the bench report dict.

    With a `pool` (`soda.distributed.RayPool`) each `batch_size` chunk runs on a Ray worker
    (samples and scores are bit-identical); the wall speedups then come from the workers' own
    timings of each round, so they are fair only on a cluster of like machines."""
    from soda import seeds
    from soda.flops import FlopsModel
    from soda.pipeline import forecast_orders, load_or_profile, spec_for
    from soda.policies import PROFILED, baseline_schedule, make_schedule
    from soda.policies.scaling import in_window
    from soda.timing import wall_speedup

    check_setup(setup)
    config = model.config
    metrics, classifier = _scores(config.name, echo)
    backend = backend_for(setup.backend, model, setup.engines_dir, device=setup.device, precision=setup.precision,
                          weights=weights)
    runner = Runner(backend, model, sampler, setup.batch_size, progress, pool)
    spec, fm = spec_for(model, sampler), FlopsModel.for_config(config)
    targets = list(dict.fromkeys([setup.speedup, *setup.frontier]))
    cal_cond, eval_cond = split_prompts(model, setup, sampler)
    # Every policy must reach the main --speedup (the README promises an error): said before any
    # profiling or sampling. Frontier points a policy cannot reach are only skipped.
    for policy in setup.policies:
        if policy not in ("full", *PROFILED):
            baseline_schedule(policy, spec, config, speedup=setup.speedup)
        elif policy == "soda" and not setup.profile_file:
            from soda.policies.soda import check_reach_before_profiling

            check_reach_before_profiling(setup.speedup, config, sampler.steps)
    prof = None
    if any(p in PROFILED for p in setup.policies) or setup.ablation:
        prof = load_or_profile(model, weights, sampler, setup.profile_file, echo, setup.profile_samples,
                               seed=setup.seed, progress=progress,  # the calibration stream of --seed (soda.seeds)
                               conditioning=cal_cond, orders=forecast_orders(setup.policies))
    pixels = config.in_channels in (1, 3)

    def conditions(n: int, calibration: bool):
        """Balanced class labels, or captions cycled from the calibration / evaluation split."""
        c = cal_cond if calibration else eval_cond
        return seeds.labels_for(n, config.num_classes) if c is None else c.rows(np.arange(n) % len(c))

    def view(x):  # pixel models are judged on what a person sees (clipped to [-1, 1]); latents as they are
        return np.clip(x, -1, 1) if pixels else x

    full_schedule = make_schedule("full", spec)

    # --- calibration set for tuning: its own stream, scored exactly as the bench scores ----------
    cal: dict = {}

    def calibration_psnr(schedule) -> float:
        if not cal:
            labels = conditions(setup.tune_samples, calibration=True)
            noise = draw(seeds.calibration(setup.seed, seeds.TUNING, 0), setup.tune_samples, config)
            seqs = lambda c: seeds.calibration(setup.seed, seeds.TUNING, 1 + c)  # noqa: E731
            cal.update(labels=labels, noise=noise, seqs=seqs)
            cal["ref"] = view(runner.run(full_schedule, labels, noise, seqs)[0])
        x = runner.run(schedule, cal["labels"], cal["noise"], cal["seqs"])[0]
        return float(metrics.psnr(view(x), cal["ref"]))

    # --- every schedule first (rule, tuned, soda), then the interleaved evaluation rounds ---------
    from soda import tuning

    cells = [Cell("full", "-", None, full_schedule)]
    for target in targets:
        for policy in setup.policies:
            if policy == "full":
                continue
            if policy in PROFILED:
                kw = {"planner": setup.planner} if policy == "soda" else {}
                try:
                    cells.append(Cell(policy, "-", target, make_schedule(
                        policy, spec, speedup=target, profile=prof, **kw)))
                except UserError as e:
                    if target == setup.speedup:
                        raise
                    echo(f"skipped {policy} at {target:g}x: {e}")
                continue
            try:
                cells.append(Cell(policy, "rule", target, baseline_schedule(policy, spec, config, speedup=target)))
            except UserError as e:
                if target == setup.speedup:
                    raise
                echo(f"skipped {policy} rule at {target:g}x: {e}")
            if setup.tune and tuning.tunable(policy):
                build = lambda p=policy, t=target, **kw: make_schedule(p, spec, speedup=t, flops=fm, **kw)  # noqa: E731
                try:
                    tuned = tuning.tune(policy, build, calibration_psnr, target, progress)
                except UserError as e:
                    echo(f"skipped {policy} tuned at {target:g}x: {e}")
                    continue
                cells.append(Cell(policy, "tuned", target, tuned.schedule, tuned.summary()))
    ablation = []
    if setup.ablation:
        for planner in ("fixed", "dcs", "uas", "joint"):
            try:
                ablation.append(Cell("soda", planner, setup.speedup, make_schedule(
                    "soda", spec, speedup=setup.speedup, profile=prof, planner=planner)))
            except UserError as e:
                echo(f"skipped ablation {planner}: {e}")
    all_cells = cells + ablation
    if not any(c.target == setup.speedup for c in cells) and len(setup.policies) > 1:
        raise UserError(f"no policy reaches {setup.speedup:g}x FLOPs on {config.name}; lower --speedup")

    groups = np.array_split(np.arange(setup.samples), setup.eval_seeds)
    labels = conditions(setup.samples, calibration=False)
    truth = labels  # the class each evaluation sample should show
    if eval_cond is not None:
        truth = caption_classes(setup, len(cal_cond), setup.samples) if classifier is not None else None
        if classifier is not None and truth is None:
            echo("note: --prompt-embeds has no digit captions; class accuracy is null")
    outs = {id(c): [] for c in all_cells}
    secs = {id(c): [] for c in all_cells}
    flops = {id(c): 0.0 for c in all_cells}
    for j, idx in enumerate(groups):
        noise = draw(seeds.evaluation(setup.seed, j, 0), len(idx), config)
        seqs = lambda c, j=j: seeds.evaluation(setup.seed, j, 1 + c)  # noqa: E731
        tick = progress(f"evaluation seed {j + 1}/{len(groups)} ({len(all_cells)} schedules)",
                        len(all_cells)) if progress else None
        for c in all_cells:
            x, f, sec = runner.run(c.schedule, labels[idx], noise, seqs)
            outs[id(c)].append(x)
            secs[id(c)].append(sec)
            flops[id(c)] += f
            if tick is not None:
                tick.update()
        if tick is not None:
            tick.close()

    full_cell = cells[0]
    full_x = np.concatenate(outs[id(full_cell)])
    full_parts = [view(x) for x in outs[id(full_cell)]]
    kept: dict[str, np.ndarray] = {}
    main_schedules = {"full": full_schedule}  # what the --backend ort runtime timing replays

    def row(c: Cell) -> dict:
        x = np.concatenate(outs[id(c)])
        is_full = c.policy == "full"
        if not is_full:
            per_seed = [float(metrics.psnr(view(a), b)) for a, b in zip(outs[id(c)], full_parts)]
            psnr, ci = mean_ci95(per_seed)
        flops_x = flops[id(full_cell)] / flops[id(c)]
        images = np.clip(x, -1, 1)
        r = {
            "policy": c.policy,
            "variant": c.variant,
            "target_speedup": c.target,
            "flops_speedup": round(flops_x, 4),
            "in_window": True if is_full else bool(in_window(flops_x, c.target)),
            "wall_speedup": round(wall_speedup(secs[id(full_cell)], secs[id(c)]), 4),
            "psnr_db": None if is_full else round(psnr, 4),
            "psnr_ci95": None if is_full or ci is None else [round(ci[0], 4), round(ci[1], 4)],
            "psnr_per_seed": None if is_full else [round(v, 4) for v in per_seed],
            "cosine": round(float(metrics.cosine(view(x), view(full_x))), 6),
            "class_accuracy": None if classifier is None or truth is None else round(float(classifier.accuracy(images, truth)), 4),
            "frechet": None if classifier is None else round(float(classifier.frechet(images)), 4),
            "pruned_share": None if is_full else pruned_share(c.schedule),
            "seconds": round(sum(secs[id(c)]), 3),
        }
        if r["pruned_share"] is not None:
            r["pruned_share"] = round(r["pruned_share"], 4)
        if c.tuning is not None:
            r["tuning"] = c.tuning
        if setup.keep_samples > 0 and c.target in (None, setup.speedup) and id(c) in in_main:
            kept[c.name] = x[:setup.keep_samples]
        if c.target == setup.speedup and id(c) in in_main:
            main_schedules[c.name] = c.schedule
        return r

    in_main = {id(c) for c in cells}
    rows = [(c, row(c)) for c in all_cells]
    results = [r for c, r in rows if id(c) in in_main and c.target in (None, setup.speedup)]
    frontier = [r for c, r in rows if id(c) in in_main and c.target is not None and c.target != setup.speedup]
    report = {
        "format": FORMAT,
        "model": config.name,
        "weights": weights,
        "sampler": sampler.to_dict(),
        "samples": setup.samples,
        "seed": setup.seed,
        "eval_seeds": setup.eval_seeds,
        "backend": getattr(backend, "describe", lambda: setup.backend)(),
        "speedup": setup.speedup,
        "tolerance": "every schedule aims at [target, 1.03 x target] FLOPs speedup; in_window says if it got there",
        "wall_speedup": "median over the evaluation seeds (interleaved rounds) of full seconds / schedule seconds",
        "psnr": "mean over evaluation seeds of the PSNR vs full of that seed's samples; psnr_ci95: 95% t-interval",
        "tuning": None if not setup.tune else {
            "samples": setup.tune_samples, "stream": "calibration (soda.seeds), disjoint from evaluation",
            "spaces": {p: tuning.SPACES[p].grid for p in setup.policies if tuning.tunable(p)},
            "refine": tuning.REFINE},
        "planner": setup.planner,
        "profile": None if prof is None else {"samples": prof.samples, "seconds": prof.cost.get("seconds"),
                                              "weights": prof.weights},
        "results": results,
        "frontier": frontier,
    }
    if ablation:
        report["ablation"] = [r for c, r in rows if id(c) not in in_main]
    if setup.backend == "ort" and eval_cond is not None:
        echo("note: the runtime-vs-monolithic timing is for label-conditioned models; skipped")
    elif setup.backend == "ort":
        # The deploy runtime's own claim, measured in this run: stitched vs one monolithic ONNX.
        from soda.bench_runtime import runtime_report

        echo(f"runtime timing: {setup.timing_images} images x {setup.timing_repeats} interleaved rounds, "
             f"against one monolithic ONNX of the model ...")
        # Opened now, as the monolithic session is: the sessions `backend` opened during the run
        # (after the profile) may sit in a fragmented heap (docs/runtime.md "Timing in one process").
        # On a GPU that is not the host heap's concern, and a second backend would upload the weights again.
        timed_backend = backend if setup.device == "cuda" else backend_for("ort", model, setup.engines_dir)
        module_backend = (backend_for("ort", model, setup.engines_dir, blocks=False, device=setup.device)
                          if setup.timing_per_module else None)
        report["runtime"] = runtime_report(model, timed_backend, sampler, main_schedules, labels[:setup.timing_images],
                                           setup.timing_repeats, progress=progress, module_backend=module_backend)
    if setup.keep_samples > 0:
        report["kept_samples"] = kept
    return report


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the bench rows (None shown as '-'; '*' marks a FLOPs speedup outside
    [target, 1.03 x target])."""
    heads = ("policy", "variant", "target", "FLOPs x", "wall x", "PSNR dB", "95% CI", "cosine", "accuracy", "Frechet",
             "pruned")

    def num(v, digits=4):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.{digits}f}" if abs(v) < 10 else f"{v:.2f}"
        return str(v)

    def line(r):
        ci = r.get("psnr_ci95")
        flops = num(r.get("flops_speedup"), 3) + ("" if r.get("in_window", True) else "*")
        share = r.get("pruned_share")
        return (r["policy"], r.get("variant", "-"), num(r.get("target_speedup"), 2), flops, num(r.get("wall_speedup"), 2),
                num(r.get("psnr_db"), 2), "-" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]", num(r.get("cosine")),
                num(r.get("class_accuracy"), 2), num(r.get("frechet"), 2), "-" if share is None else f"{share:.0%}")

    table = [heads] + [line(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(heads))]
    return "\n".join("  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     for row in table)
