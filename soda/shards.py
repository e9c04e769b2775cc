"""Generation in shards: the job, the worker that runs whole shards, and the folder that holds them.

`cli.py generate` writes N samples into OUT/ as shards of `shard_size` consecutive samples, each
written atomically (temporary file, then rename) and recorded in OUT/manifest.json with its
sha256, so a rerun of the same command skips every finished shard. At the end the shards'
images are streamed into OUT/samples.npz in the layout of the ADM evaluation suite (the file
facebookresearch/DiT's `sample_ddp.py` writes for FID): `arr_0` uint8 [N, H, W, 3] (grayscale
repeated to 3 channels) and, as guided-diffusion's `image_sample.py` adds for class-conditional
models, `arr_1` the class labels.

Sample i depends only on (seed, i): its class label (uniform over the classes, as `sample_ddp.py`
draws them) and its initial noise (and DDPM's per-step noise) come from its own generator,
`soda.seeds.generation(seed, i)`. A text-conditioned model takes `--prompt-embeds` instead:
sample i uses prompt i % n_prompts (`arr_1` then holds those prompt indices), its noise still
drawn from sample i's own generator; workers receive the prompts once, when they start. Shard k always holds samples [k*shard_size, (k+1)*shard_size)
and is generated as one batch, so the result is bit-for-bit the same whichever worker, and however
many workers, ran it (changing `shard_size` changes the batch composition, so float results may
differ in the last bits).

This module knows nothing about Ray: `ShardWorker` runs in this process when there is no `--ray`,
and inside a Ray actor (`soda.distributed`) when there is.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from soda.errors import UserError
from soda.sampling import Conditioning

FORMAT = 1
KIND = "soda-generate"
MANIFEST = "manifest.json"
NPZ = "samples.npz"
PREVIEW = "preview.png"
SHARDS = "shards"


# --- what a worker loads -------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to load the model (or engines) by itself, once.

    Paths must be readable on every node that runs a worker (the same path, e.g. a shared
    filesystem); the shipped dit-digits weights travel with the package.
    """

    model: str = "dit-digits"
    ckpt: str | None = None
    num_heads: int | None = None
    random_init: bool = False
    engines: str | None = None  # an exported engines folder: runtime backends, no torch
    backend: str = "torch"  # torch | ort | trt
    device: str = "auto"  # onnxruntime: auto | cpu | cuda
    threads: int | None = None  # torch / onnxruntime intra-op threads in the worker
    vae: str | None = None  # diffusers AutoencoderKL folder (latent models, for the .npz)
    video: tuple | None = None  # a video model's (height, width, num_frames, fps the model sees)

    def absolute(self) -> "WorkerSpec":
        """The same spec with absolute paths, so a worker with another working directory finds them."""
        fix = lambda p: None if p is None else str(Path(p).resolve())
        return WorkerSpec(self.model, fix(self.ckpt), self.num_heads, self.random_init, fix(self.engines),
                          self.backend, self.device, self.threads, fix(self.vae), self.video)


def load_backend(spec: WorkerSpec):
    """(backend, model config, torch model or None, weights id) for a spec."""
    if spec.engines:
        from runtime.engines import open_engines
        from runtime.run import make_backend

        engines = open_engines(spec.engines).at_video(*(spec.video or ()))
        return make_backend(engines, spec.backend, device=spec.device, threads=spec.threads), engines.config, None, \
            engines.weights
    from soda.models.loading import load_model
    from soda.torch_backend import TorchBackend

    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    model, weights = load_model(spec.model, spec.ckpt, spec.num_heads, spec.random_init)
    if spec.video:
        from soda.models.opensora import apply_video

        model.video = apply_video(model, *spec.video)
    return TorchBackend(model), model.config, model, weights


# --- per-sample randomness -----------------------------------------------------------------------
class SampleRNGs:
    """One numpy generator per sample (`soda.seeds.generation`): a batch draws row i from sample
    i's own stream, so no sample's randomness depends on which others share its batch.
    Duck-types the `standard_normal(shape)` that `sample_loop` calls for DDPM's per-step noise."""

    def __init__(self, seed: int, indices: Iterable[int]):
        from soda import seeds

        self.rngs = [np.random.default_rng(seeds.generation(seed, i)) for i in indices]

    def labels(self, num_classes: int) -> np.ndarray:
        return np.array([r.integers(0, num_classes) for r in self.rngs], dtype=np.int64)

    def standard_normal(self, shape) -> np.ndarray:
        assert shape[0] == len(self.rngs), "one row per sample"
        return np.stack([r.standard_normal(shape[1:]) for r in self.rngs])


def sample_inputs(seed: int, start: int, stop: int, config, n_prompts: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, SampleRNGs]:
    """(labels, initial noise float32, generators for DDPM's step noise) of samples [start, stop).
    With `n_prompts` (a text model) the "labels" are prompt indices i % n_prompts, and nothing
    is drawn for them."""
    rngs = SampleRNGs(seed, range(start, stop))
    if n_prompts:
        labels = np.arange(start, stop, dtype=np.int64) % n_prompts
    else:
        labels = rngs.labels(config.num_classes)  # drawn first, then the noise, from each sample's stream
    shape = (stop - start, *config.latent_shape)
    return labels, rngs.standard_normal(shape).astype(np.float32), rngs


def adm_uint8(images: np.ndarray) -> np.ndarray:
    """[n, C, H, W] in [-1, 1] -> uint8 [n, H, W, 3] exactly as DiT's sample_ddp.py converts
    (clamp(127.5 x + 128, 0, 255), truncated), grayscale repeated to 3 channels."""
    u8 = np.clip(np.float32(127.5) * images.astype(np.float32) + np.float32(128.0), 0, 255).astype(np.uint8)
    u8 = u8.transpose(0, 2, 3, 1)
    if u8.shape[-1] == 1:
        u8 = np.repeat(u8, 3, axis=-1)
    if u8.shape[-1] != 3:
        raise UserError(f"cannot make RGB images from {u8.shape[-1]} channels")
    return np.ascontiguousarray(u8)


# --- the job -------------------------------------------------------------------------------------
LABELS_RANDOMNESS = "labels uniform, noise normal: default_rng(soda.seeds.generation(seed, sample index))"
PROMPTS_RANDOMNESS = "prompt i % n_prompts, noise normal: default_rng(soda.seeds.generation(seed, sample index i))"


@dataclass(frozen=True)
class GenerateJob:
    """What is generated: its identity decides whether an existing OUT/ can be resumed."""

    model: str
    model_hash: str
    weights: str
    backend: str
    sampler: dict  # SamplerConfig.to_dict()
    schedule: dict  # Schedule.to_dict()
    num_samples: int
    shard_size: int
    seed: int
    vae: str | None = None
    randomness: str = LABELS_RANDOMNESS
    prompt_embeds_sha256: str | None = None  # text models: the --prompt-embeds file's content

    def __post_init__(self):
        if self.prompt_embeds_sha256 and self.randomness == LABELS_RANDOMNESS:
            object.__setattr__(self, "randomness", PROMPTS_RANDOMNESS)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min(self.num_samples, (k + 1) * self.shard_size)

    def identity(self) -> dict:
        """The job as the manifest records it (the schedule as its hash; OUT/schedule.json holds it)."""
        d = asdict(self)
        d["schedule"] = _sha256_bytes(json.dumps(self.schedule, sort_keys=True).encode())[:16]
        if self.prompt_embeds_sha256 is None:
            del d["prompt_embeds_sha256"]  # class-label jobs: manifests written before prompts stay resumable
        return json.loads(json.dumps(d))  # JSON-normalised, so it compares equal to the manifest's copy

    def hash(self) -> str:
        return _sha256_bytes(json.dumps(self.identity(), sort_keys=True).encode())[:16]

    def to_dict(self) -> dict:
        return asdict(self)


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the worker ----------------------------------------------------------------------------------
class ShardWorker:
    """Loads the model (or engines) and the VAE once; then runs whole generations.

    One lives in this process without `--ray`; with `--ray` each Ray actor holds one. Every
    call builds its own executor, so a schedule's caches never leave the worker.
    """

    def __init__(self, spec: WorkerSpec, loaded=None, prompts: Conditioning | None = None):
        self.spec = spec
        self.backend, self.config, self.model, self.weights = loaded or load_backend(spec)
        self.prompts = prompts  # a text model's captions (all of --prompt-embeds), given once
        self._vae = None
        self.where = f"{socket.gethostname()} pid {os.getpid()}"

    def describe(self) -> str:
        return getattr(self.backend, "describe", lambda: self.spec.backend)()

    def vae(self):
        if self._vae is None:
            from soda.pictures import load_vae

            self._vae = load_vae(self.spec.vae)
        return self._vae

    def generate(self, sampler: dict, schedule: dict, labels: np.ndarray | Conditioning, seed: int,
                 noise: np.ndarray | None, rng=None) -> tuple[np.ndarray, float, float]:
        """(samples, FLOPs, seconds) of one generation batch: `soda.generate.generate` on this worker."""
        from soda.generate import generate
        from soda.sampling import SamplerConfig
        from soda.schedule import Schedule

        x, stats = generate(self.backend, self.config, SamplerConfig(**sampler), Schedule.from_dict(schedule), labels,
                            seed, noise, rng=rng)
        return x, stats.flops, stats.seconds

    def shard(self, job: dict, k: int) -> dict:
        """Shard k of the job: raw samples, labels (prompt indices for a text model) and ADM uint8
        images, all of it generated here."""
        job = GenerateJob(**job)
        if (job.prompt_embeds_sha256 is None) != (self.prompts is None):
            raise RuntimeError("a text job needs a worker given its prompts, and only a text job may have them")
        start, stop = job.shard_range(k)
        labels, noise, rngs = sample_inputs(job.seed, start, stop, self.config,
                                            None if self.prompts is None else len(self.prompts))
        cond = labels if self.prompts is None else self.prompts.rows(labels)
        x, flops, seconds = self.generate(job.sampler, job.schedule, cond, job.seed, noise, rng=rngs)
        if self.config.frames is not None:  # a video model: no video decoder here, the .npz holds its latents
            images = np.asarray(x, dtype=np.float32)
        elif self.config.in_channels in (1, 3):
            images = adm_uint8(x)
        else:
            from soda.pictures import decode_vae

            images = adm_uint8(decode_vae(x, self.vae()))
        return {"k": k, "indices": np.arange(start, stop), "labels": labels, "samples": x, "images": images,
                "flops": flops, "seconds": seconds, "worker": self.where}

    def calibrate(self, sampler: dict, labels: np.ndarray, noise_seed: int, options: dict) -> dict:
        """One profiling batch (`soda.profile.calibrate_batch`) on this worker."""
        from soda.profile import calibrate_batch
        from soda.sampling import SamplerConfig

        if self.model is None:
            raise UserError("profiling needs the torch model, not an engines folder")
        return calibrate_batch(self.model, SamplerConfig(**sampler), labels, noise_seed, **options)


# --- the output folder ---------------------------------------------------------------------------
class ShardStore:
    """OUT/: manifest.json, schedule.json, shards/NNNNN.npz, samples.npz, preview.png. Only the driver
    writes here."""

    def __init__(self, out: str | Path, job: GenerateJob):
        self.out, self.job = Path(out), job
        self.manifest_path = self.out / MANIFEST
        self.shards: dict[int, dict] = {}
        self.npz: dict | None = None  # the finished .npz, once written
        self._open()

    def _open(self) -> None:
        from soda.schedule import read_json

        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file; give a folder")
        if self.manifest_path.is_file():
            m = read_json(self.manifest_path, "manifest")
            if m.get("kind") != KIND or m.get("format") != FORMAT:
                raise UserError(f"{self.manifest_path} is not a soda generate manifest (format {FORMAT})")
            a, b = m.get("job", {}), self.job.identity()
            if a != b:
                diff = ", ".join(f"{k} {a.get(k)!r} -> {b[k]!r}" for k in b if a.get(k) != b[k])
                raise UserError(f"{self.out} holds another generation ({diff}); rerun with its flags to resume, "
                                f"or choose another --out")
            for key, entry in m.get("shards", {}).items():
                path = self.out / entry["file"]
                if path.is_file() and file_sha256(path) == entry["sha256"]:
                    self.shards[int(key)] = entry
            if m.get("npz") and len(self.shards) == self.job.num_shards and (self.out / NPZ).is_file():
                self.npz = m["npz"]
        elif self.out.is_dir() and any(self.out.iterdir()):
            raise UserError(f"refusing to write into {self.out}: it holds other files and no {MANIFEST}; "
                            f"choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / SHARDS).mkdir(exist_ok=True)
        from soda.outputs import write_json_atomic

        write_json_atomic(self.out / "schedule.json", self.job.schedule)
        self._write_manifest()

    def todo(self) -> list[int]:
        return [k for k in range(self.job.num_shards) if k not in self.shards]

    def shard_path(self, k: int) -> Path:
        return self.out / SHARDS / f"{k:05d}.npz"

    def write_shard(self, result: dict) -> None:
        """Atomically write one shard, then record it. A shard already recorded is never rewritten."""
        k = result["k"]
        if k in self.shards:
            raise RuntimeError(f"shard {k} was already written")  # the scheduler must never hand it out twice
        start, stop = self.job.shard_range(k)
        if list(result["indices"]) != list(range(start, stop)):
            raise RuntimeError(f"shard {k} came back with samples {result['indices'][:3]}..., not {start}..{stop - 1}")
        path = self.shard_path(k)
        _atomic(path, lambda f: np.savez(f, indices=result["indices"], labels=result["labels"],
                                         samples=result["samples"], images=result["images"]))
        self.shards[k] = {"file": str(path.relative_to(self.out)), "samples": [start, stop],
                          "sha256": file_sha256(path), "worker": result["worker"],
                          "seconds": round(float(result["seconds"]), 3), "flops": float(result["flops"])}
        self.npz = None
        self._write_manifest()

    def _write_manifest(self) -> None:
        from soda.outputs import write_json_atomic

        m = {"format": FORMAT, "kind": KIND, "job": self.job.identity(), "job_hash": self.job.hash(),
             "num_shards": self.job.num_shards, "done": len(self.shards),
             "shards": {str(k): v for k, v in sorted(self.shards.items())}}
        if self.npz:
            m["npz"] = self.npz
        write_json_atomic(self.manifest_path, m)

    def load_shard(self, k: int) -> dict:
        with np.load(self.shard_path(k)) as z:
            return {name: z[name] for name in z.files}

    def write_npz(self) -> Path:
        """Stream every shard's images into OUT/samples.npz (arr_0 images, arr_1 labels), one shard in
        memory at a time; written atomically. Needs every shard. (A video model's "images" are its
        latents, float32 [n, C, T, H, W].)"""
        missing = self.todo()
        if missing:
            raise RuntimeError(f"shards {missing[:5]} are missing")
        first = self.load_shard(0)["images"]
        shape = (self.job.num_samples, *first.shape[1:])
        labels = np.concatenate([self.load_shard(k)["labels"] for k in range(self.job.num_shards)])

        def write(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_2_0(
                        member, {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                                 "shape": shape})
                    for k in range(self.job.num_shards):
                        images = self.load_shard(k)["images"]
                        assert images.dtype == first.dtype and images.shape[1:] == shape[1:]
                        member.write(np.ascontiguousarray(images).tobytes())
                with zf.open("arr_1.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, labels)

        path = self.out / NPZ
        _atomic(path, write)
        self.npz = {"file": NPZ, "arr_0": list(shape), "arr_1": [self.job.num_samples], "sha256": file_sha256(path)}
        self._write_manifest()
        self.write_preview(labels)
        return path

    def write_preview(self, labels: np.ndarray, n: int = 100) -> Path:
        """OUT/preview.png: the first n images with their class (or prompt), to look at before computing FID."""
        from soda.pictures import grid_image

        images = np.concatenate([self.load_shard(k)["images"] for k in range(min(self.job.num_shards,
                                                                                 -(-n // self.job.shard_size)))])[:n]
        random = str(self.job.weights).startswith("random-init")
        if images.ndim == 5:  # a video model's latents: the latent frames of the first few, one row each
            from types import SimpleNamespace

            from soda.pictures import save_video_strips_png

            path = self.out / PREVIEW
            what = "prompt" if self.job.prompt_embeds_sha256 else "class"
            save_video_strips_png(images[:4], None, path, SimpleNamespace(name=self.job.model), random,
                                  names=[f"sample {i} ({what} {int(v)})" for i, v in enumerate(labels[:4])])
            return path
        scale = max(1, 64 // images.shape[1])
        title = f"{self.job.model} {self.job.schedule.get('policy', '')}, samples 0..{len(images) - 1} of " \
                f"{self.job.num_samples}" + (" RANDOM WEIGHTS" if str(self.job.weights).startswith("random-init") else "")
        path = self.out / PREVIEW
        what = "prompt" if self.job.prompt_embeds_sha256 else "class"
        _atomic(path, lambda f: grid_image(images, [f"{what} {int(v)}" for v in labels[:n]], scale=scale,
                                           title=title).save(f, format="PNG"))
        return path


def _atomic(path: Path, write: Callable) -> None:
    """write(f) into a unique temporary file beside `path`, renamed over it on success (`soda.outputs`)."""
    from soda.outputs import atomic_output

    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


# --- running a job -------------------------------------------------------------------------------
def run_job(store: ShardStore, results: Callable[[list[int]], Iterator[dict]], progress=None,
            on_shard: Callable[[int], None] | None = None) -> dict:
    """Generate every shard the store lacks (`results(todo)` yields finished shards in any order),
    write each as it arrives, then the .npz. Returns a summary."""
    todo = store.todo()
    skipped = store.job.num_shards - len(todo)
    t0 = time.perf_counter()
    computed, workers = [], set()
    for result in results(todo):
        store.write_shard(result)
        computed.append(result["k"])
        workers.add(result["worker"])
        if progress is not None:
            progress(result)
        if on_shard is not None:
            on_shard(result["k"])
    npz = store.write_npz()
    return {"computed": computed, "skipped": skipped, "seconds": time.perf_counter() - t0, "npz": npz,
            "shape": store.npz["arr_0"], "workers": sorted(workers)}


def local_results(worker: ShardWorker, job: GenerateJob) -> Callable[[list[int]], Iterator[dict]]:
    """Shards run one after another in this process."""
    job_dict = job.to_dict()
    return lambda todo: (worker.shard(job_dict, k) for k in todo)


def check_ray_request(address: str | None, workers: int | None = None) -> tuple[str, int | None] | None:
    """Check --ray / --workers before any work (without importing Ray): None without --ray, else
    ('local', K) or (address, None). A HOST:PORT address must accept a TCP connection, since
    `ray.init` would retry an unreachable one for minutes."""
    import socket

    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if not address:
        if workers is not None:
            raise UserError("--workers needs --ray")
        return None
    if address.startswith("local:"):
        k = address[len("local:"):]
        if not k.isdigit() or int(k) < 1:
            raise UserError(f"--ray local:K needs a worker count K >= 1, got {address!r}")
        return "local", int(k)
    if address == "auto" or "://" in address:
        return address, None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address!r}: give auto, HOST:PORT (the head's GCS port, 6379 by default), "
                        f"ray://HOST:PORT or local:K")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address} ({e}); start one with `ray start --head`, "
                        f"or use --ray local:K") from None
    return address, None


@contextmanager
def worker_pool(spec: WorkerSpec, ray_address: str | None, workers: int | None = None, echo: Callable = print,
                prompts: Conditioning | None = None):
    """`--ray ADDRESS` -> a `soda.distributed.RayPool` (closed on exit; `prompts` handed to each
    worker once); no `--ray` -> None, and Ray is never imported."""
    if check_ray_request(ray_address, workers) is None:
        yield None
        return
    from soda.distributed import RayPool

    pool = RayPool(spec, ray_address, workers, echo, prompts)
    try:
        yield pool
    finally:
        pool.close()


def generate_to_folder(spec: WorkerSpec, loaded, job: GenerateJob, out: str | Path, ray_address: str | None = None,
                       workers: int | None = None, echo: Callable = print, progress=None,
                       on_shard: Callable[[int], None] | None = None, prompts: Conditioning | None = None) -> dict:
    """The body of `cli.py generate` once the model and schedule are resolved: open (or resume)
    OUT/, run the missing shards here or on Ray workers, write the .npz.

    `loaded` is `load_backend(spec)`'s result from this process, reused when running locally.
    `prompts`: a text model's captions (every row of --prompt-embeds; the job holds the file's hash).
    `progress(total, initial)` returns a bar with `update()`; `on_shard(k)` runs after shard k
    is written (tests interrupt there).
    """
    store = ShardStore(out, job)
    todo = store.todo()
    echo(f"{job.num_samples} samples in {job.num_shards} shards of {job.shard_size}: "
         f"{job.num_shards - len(todo)} already done, {len(todo)} to generate -> {store.out}")
    npz = store.out / NPZ
    if not todo and store.npz:
        return {"computed": [], "skipped": job.num_shards, "seconds": 0.0, "npz": npz, "shape": store.npz["arr_0"],
                "workers": []}
    with worker_pool(spec, ray_address if todo else None, workers if todo else None, echo, prompts) as pool:
        results = pool.shards(job.to_dict()) if pool else local_results(ShardWorker(spec, loaded, prompts), job)
        bar = progress(job.num_shards, job.num_shards - len(todo)) if progress else None
        try:
            return run_job(store, results, bar and (lambda r: bar.update()), on_shard)
        finally:
            if bar is not None:
                bar.close()

