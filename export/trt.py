"""TensorRT engines from the exported ONNX graphs (official TensorRT Python API).

One engine per graph. A module graph ("attn.{l}", "mlp.{l}") gets one optimization profile
per token count the schedule runs it with (N and each pruned k, `token_counts` in the
manifest), all inside the one engine: the runtime picks the profile whose n equals the
gathered token count. Block and step graphs (soda.blocks) get engines too (a step graph:
one profile, like embed). A block graph takes all N tokens and, per pruned module,
the indices of the k it recomputes (a dynamic axis `n_<module>_<layer>` each): it gets one
profile per pruned count k < N of the manifest for each such axis (every combination where a
block prunes several modules, up to MAX_BLOCK_PROFILES: past it, as for the pruned step over
every layer, no engine, and its layers run from their one-layer engines), or one profile when it
prunes none; a block that prunes while
the export prunes nothing gets no engine (the runtime runs that pattern module by module).
TensorRT engines hold their own weights: unlike the onnxruntime sessions (runtime.shared_weights)
a layer's module and block engines each carry a copy (docs/export.md "TensorRT"). Engines live
under `trt/<gpu>/trt-<version>/` in the engines folder, so a folder can hold engines for several
GPUs and TensorRT versions; a timing cache file in that folder makes rebuilds fast. Where `tensorrt` cannot be imported or no GPU is present,
one line says so and the export stays ONNX only. After a build, `cli.py export` checks every
engine against its ONNX graph in fp32 on recorded activations (`runtime.engine_check`) and
refuses engines over the tolerance of their precision.
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from export.manifest import file_sha256
from soda.errors import UserError

PRECISIONS = ("fp16", "bf16", "fp32")
WORKSPACE_BYTES = 4 << 30


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi, or None without a GPU or driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def availability() -> tuple[object | None, str | None, str]:
    """(tensorrt module or None, GPU name or None, one-line reason when unavailable)."""
    try:
        import tensorrt
    except ImportError as e:
        return None, None, f"TensorRT is not installed here ({e.msg}); exported ONNX only"
    gpu = gpu_name()
    if gpu is None:
        return tensorrt, None, "no GPU found (nvidia-smi); exported ONNX only"
    return tensorrt, gpu, ""


def precision_flag(trt, precision: str):
    """The builder flag that lets TensorRT pick fp16 or bf16 kernels (None for fp32). TensorRT 11
    removed these weak-typing flags (strongly typed networks only; mixed precision moves into the
    ONNX, via ModelOpt AutoCast): said in one line before any engine is built."""
    if precision == "fp32":
        return None
    flag = getattr(trt.BuilderFlag, precision.upper(), None)
    if flag is None:
        raise UserError(f"TensorRT {trt.__version__} has no {precision} builder flag (from TensorRT 11 networks are "
                        f"strongly typed): use --trt-precision fp32, or TensorRT 10 (pip install 'tensorrt<11')")
    return flag


def engine_dir(folder: Path, gpu: str, version: str) -> Path:
    """Engines are only valid for one GPU model and TensorRT version: both are in the path."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", gpu).strip("-")
    return folder / "trt" / slug / f"trt-{version}"


def build_engines(folder: Path, manifest: dict, precision: str = "fp16", max_batch: int = 16,
                  echo=print) -> dict | None:
    """Build (or reuse cached) engines for every artefact of `manifest` in `folder`.
    Returns the manifest's "trt" section, or None (one line printed) without TensorRT or GPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    trt, gpu, why = availability()
    if trt is None or gpu is None:
        echo(why)
        return None
    precision_flag(trt, precision)
    out = engine_dir(folder, gpu, trt.__version__)
    out.mkdir(parents=True, exist_ok=True)
    cache_file = out / "timing.cache"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    counts = manifest["token_counts"]
    max_caption = manifest["model"].get("caption_len") or 1
    from export.graphs import video_axes
    from soda.models.config import ModelConfig

    video = video_axes(ModelConfig.from_dict(manifest["model"]))  # engines are built for the exported video
    engines = {}
    for name, art in manifest["artefacts"].items():
        plan = out / f"{name}.{precision}.plan"
        profiles = _profiles(art, counts, max_batch, max_caption, video)
        if not profiles:  # a pruned block while the exported schedule prunes nothing, or too many combinations
            combos = block_combinations(art, counts, video)
            if combos > MAX_BLOCK_PROFILES:
                echo(f"TensorRT {name}: no engine ({combos} combinations of pruned counts, over {MAX_BLOCK_PROFILES}); "
                     "the runtime runs those layers from their one-layer block engines")
            continue
        key = {"onnx_sha256": art["sha256"], "precision": precision, "profiles": profiles}
        entry = {"file": str(plan.relative_to(folder)), "precision": precision, "profiles": profiles,
                 "onnx_sha256": art["sha256"]}
        old = (manifest.get("trt") or {}).get("engines", {}).get(name)
        if old and plan.is_file() and all(old.get(k) == v for k, v in key.items()) and old.get("sha256") == file_sha256(plan):
            engines[name] = old
            continue
        t = time.perf_counter()
        serialized = _build_one(trt, builder, logger, folder / art["file"], profiles, precision, cache_file)
        from soda.outputs import atomic_output

        with atomic_output(plan) as tmp:
            tmp.write_bytes(serialized)
        engines[name] = {**entry, "sha256": file_sha256(plan), "build_seconds": round(time.perf_counter() - t, 2)}
        echo(f"TensorRT {name}: {len(profiles)} profile(s), {engines[name]['build_seconds']} s")
    return {"gpu": gpu, "version": trt.__version__, "precision": precision, "max_batch": max_batch,
            "timing_cache": str(cache_file.relative_to(folder)), "engines": engines}


def profile_counts(entry: dict) -> list[int]:
    """The token counts an engine entry has optimization profiles for (empty: no token axis)."""
    return [p["n"] for p in entry.get("profiles", []) if p.get("n") is not None]


def pruned_axes(art: dict) -> list[str]:
    """A block graph's dynamic token-count axes, `n_<module>_<layer>`, in input order."""
    axes = []
    for t in art["inputs"]:
        axes += [d for d in t["shape"] if isinstance(d, str) and d.startswith("n_") and d not in axes]
    return axes


# A block engine over several pruned axes gets one optimization profile per combination of their
# counts; past this many it gets no engine (the pruned step over 12 layers: ToCa's DiT-S/2 schedule
# has 87 pruned counts, 87**12 combinations). A one-axis block keeps one profile per count, however many.
MAX_BLOCK_PROFILES = 64


def block_combinations(art: dict, counts: list[int], video: dict | None = None) -> int:
    """How many optimization profiles a block graph's pruned axes need: the pruned counts (k < N)
    to the power of its axes; 1 for a graph without pruned axes, and for a one-axis block (never
    capped: it is what a pruned layer runs)."""
    axes = pruned_axes(art)
    return 1 if len(axes) < 2 else len(_pruned_counts(art, counts, video)) ** len(axes)


def _pruned_counts(art: dict, counts: list[int], video: dict | None) -> list[int]:
    """The counts k < N a block graph's pruned modules run at: a block takes all N tokens (a video
    block's "N" is the exported video's)."""
    tokens = next(t["shape"] for t in art["inputs"] if t["name"] == "tokens")
    N = (video or {}).get(tokens[1], tokens[1])
    return [k for k in counts if k < N]


def _profiles(art: dict, counts: list[int], max_batch: int, max_caption: int = 1, video: dict | None = None
              ) -> list[dict]:
    """One profile per token count for graphs with a token axis "n"; for a block graph one per
    combination of pruned counts over its axes `n_<module>_<layer>` ("axes": {axis: k}); else
    one profile. Each maps input name -> [min, opt, max] shapes (B from 1 to max_batch, a caption
    axis L from 1 to the model's caption length; a video model's size axes fixed at the exported
    video, so TensorRT engines serve that size only, onnxruntime any). Empty: a pruned block with
    no pruned count to build for, or one over several axes with more combinations than
    MAX_BLOCK_PROFILES (`block_combinations`; `build_engines` says so): no engine, and the runtime
    runs those layers from their one-layer block engines."""
    import itertools

    video = video or {}
    has_n = any("n" in t["shape"] for t in art["inputs"])
    axes = pruned_axes(art)
    if axes:
        if block_combinations(art, counts, video) > MAX_BLOCK_PROFILES:  # e.g. a pruned step over every layer
            return []
        pruned = _pruned_counts(art, counts, video)
        combos = [dict(zip(axes, ks)) for ks in itertools.product(pruned, repeat=len(axes))]
    else:
        combos = [{}]
    out = []
    for n in (counts if has_n else [None]):
        for fixed in combos:
            sizes = {**video, **fixed, "n": n}
            shapes = {}
            for t in art["inputs"]:
                lo = [1 if d in ("B", "L") else sizes.get(d, d) for d in t["shape"]]
                opt = [max_batch if d == "B" else max_caption if d == "L" else sizes.get(d, d) for d in t["shape"]]
                shapes[t["name"]] = [lo, opt, opt]
            out.append({"n": n, **({"axes": fixed} if fixed else {}), "shapes": shapes})
    return out


def _build_one(trt, builder, logger, onnx_path: Path, profiles: list[dict], precision: str, cache_file: Path) -> bytes:
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode (and default) from TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so weights.bin next to it is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    flag = precision_flag(trt, precision)
    if flag is not None:
        config.set_flag(flag)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p["shapes"].items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name}")
    cache_file.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(serialized)
