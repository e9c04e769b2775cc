"""Pictures of the method's files: sensitivity heatmaps, schedules, fidelity frontiers.

matplotlib with the Agg backend (files only, no display needed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_axes(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def random_note(weights: str | None) -> str:
    """What every picture made from random weights adds to its title."""
    return " - RANDOM WEIGHTS" if str(weights or "").startswith("random-init") else ""


def _save(fig, out: str | Path) -> None:
    from soda.outputs import atomic_output

    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)


def sensitivity_heatmap(profile, out: str | Path, age: int = 1) -> None:
    """E_c(s, l, m, k=age) as step x layer, one panel per module, log colour scale shared."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    ec = profile.ec()[:, :, :, profile.intervals.index(age)]  # [S, L, M]
    finite = ec[np.isfinite(ec) & (ec > 0)]
    norm = LogNorm(vmin=max(finite.min(), 1e-8), vmax=finite.max()) if finite.size else None
    M = len(profile.modules)
    fig, axes = plt.subplots(1, M, figsize=(4.5 * M, 0.12 * profile.num_steps + 2), squeeze=False)
    for m, name in enumerate(profile.modules):
        ax = axes[0, m]
        img = ax.imshow(np.ma.masked_invalid(np.where(ec[:, :, m] > 0, ec[:, :, m], np.nan)), aspect="auto",
                        cmap="magma", norm=norm, interpolation="nearest")
        ax.set_title(f"{name}: E_c at cache age {age}")
        _integer_axes(ax)
        ax.set_xlabel("layer")
        ax.set_ylabel("step (0 = noisiest)")
    fig.colorbar(img, ax=axes[0].tolist(), label="1 - cos(D(s-k), D(s))")
    fig.suptitle(f"{profile.model} {profile.sampler.get('kind')}-{profile.num_steps}, "
                 f"{profile.samples} calibration generations" + random_note(profile.weights))
    _save(fig, out)


ACTION_COLOURS = {"full": "#1b5e20", "reuse": "#e0e0e0", "skip": "#b71c1c"}
PRUNE_CMAP = "Blues"


def schedule_picture(schedule, out: str | Path) -> None:
    """step x layer, one panel per module; colour per action (full, reuse, each forecast order,
    each prune rate on the cache or on a forecast, skip)."""
    import matplotlib
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from soda.schedule import forecast_order, parse_action

    plt = _pyplot()

    def label(action: str) -> str:
        kind, a = parse_action(action)
        order = forecast_order(action)
        if kind == "prune":
            return f"prune@{a:g}" + ("+forecast" if order else "")
        return f"forecast@{order}" if order else kind

    S, L, M = schedule.num_steps, schedule.num_layers, len(schedule.modules)
    used = {label(a) for step in schedule.steps if step != "skip" for row in step for a in row}
    rates = schedule.prune_rates()
    forecasts = sorted(x for x in used if x.startswith("forecast@"))
    pruned = [f"prune@{a:g}" for a in rates if f"prune@{a:g}" in used]
    pruned_fc = [f"prune@{a:g}+forecast" for a in rates if f"prune@{a:g}+forecast" in used]
    shade = lambda cmap, i, n: matplotlib.colormaps[cmap](0.35 + 0.6 * i / max(1, n - 1))  # noqa: E731
    labels = ["reuse", *forecasts, *pruned, *pruned_fc, "full", "skip"]
    colours = [ACTION_COLOURS["reuse"], *[shade("Oranges", i, len(forecasts)) for i in range(len(forecasts))],
               *[shade(PRUNE_CMAP, i, len(pruned)) for i in range(len(pruned))],
               *[shade("Purples", i, len(pruned_fc)) for i in range(len(pruned_fc))],
               ACTION_COLOURS["full"], ACTION_COLOURS["skip"]]
    code = {lab: i for i, lab in enumerate(labels)}
    grid = np.zeros((S, L, M), dtype=np.int64)
    for s in range(S):
        if schedule.is_skip(s):
            grid[s] = code["skip"]
            continue
        for l in range(L):
            for m in range(M):
                grid[s, l, m] = code[label(schedule.action(s, l, m))]
    fig, axes = plt.subplots(1, M, figsize=(3.5 * M, 0.12 * S + 2), squeeze=False)
    cmap = ListedColormap(colours)
    for m, name in enumerate(schedule.modules):
        ax = axes[0, m]
        ax.imshow(grid[:, :, m], aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(labels) - 0.5, interpolation="nearest")
        ax.set_title(name)
        _integer_axes(ax)
        ax.set_xlabel("layer")
        ax.set_ylabel("step (0 = noisiest)")
    kinds = schedule.count_kinds()
    fig.suptitle(f"{schedule.policy} on {schedule.model} {schedule.sampler}-{S}: "
                 f"{kinds['full']} full, {kinds['partial']} partial, {kinds['skip']} skip steps"
                 + random_note((schedule.params.get("profile") or {}).get("weights")))
    fig.legend(handles=[Patch(color=c, label=lab) for lab, c in zip(labels, colours)],
               loc="center left", bbox_to_anchor=(0.92, 0.5), frameon=False)
    _save(fig, out)


def frontier_plot(rows: list[dict], out: str | Path, metric: str = "psnr_db", title: str = "") -> None:
    """Fidelity vs FLOPs speedup, one line per policy and variant (rows as bench writes them),
    with the 95% interval as error bars where the rows carry one (`psnr_ci95`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = dict.fromkeys((r["policy"], r.get("variant", "-")) for r in rows)
    colors = {}
    for policy, variant in names:
        pts = sorted((r["flops_speedup"], r[metric], r.get(metric.replace("_db", "") + "_ci95") or r.get("psnr_ci95"))
                     for r in rows if r["policy"] == policy and r.get("variant", "-") == variant
                     and r.get(metric) is not None)
        if not pts:
            continue
        xs, ys, cis = zip(*pts)
        lo = [y - c[0] if (c and metric == "psnr_db") else 0.0 for y, c in zip(ys, cis)]
        hi = [c[1] - y if (c and metric == "psnr_db") else 0.0 for y, c in zip(ys, cis)]
        label = policy if variant in ("-", None) else f"{policy} ({variant})"
        color = colors.setdefault(policy, f"C{len(colors)}")
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o" if variant != "tuned" else "s", capsize=3, label=label,
                    color=color, linestyle="--" if variant == "rule" else "-")
    ax.set_xlabel("FLOPs speedup (x)")
    ax.set_ylabel({"psnr_db": "PSNR vs full (dB), mean and 95% interval",
                   "cosine": "cosine vs full"}.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    _save(fig, out)
