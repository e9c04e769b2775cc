"""`--ray auto|ADDRESS|local:K`: generation, profiling and bench batches spread over a Ray cluster.

One Ray actor per worker (one per GPU for engines on a GPU cluster, otherwise one per CPU) holds
a `soda.shards.ShardWorker`: it loads the model or engines once and runs whole generations, so a
schedule's caches never leave it. Work is handed out one shard at a time to whichever actor is
free. When an actor dies (its process or its node), the shard it held goes back to the queue and
runs on another actor, and a replacement actor is started; results come back to this process
(the driver), which alone writes files, so no shard is written twice and nodes need no shared
output folder.

Only Ray Core is used (actors, `ray.wait`): Ray Data's streaming executor would bring pandas and
pyarrow and hand back rows, while resumable, write-once shards need per-shard control here.
Nothing imports this module (or Ray) unless `--ray` is given.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Callable, Iterator

from soda.errors import UserError
from soda.shards import ShardWorker, WorkerSpec, check_ray_request

try:
    import ray
    from ray.exceptions import RayActorError, RayTaskError
except ImportError as e:  # pragma: no cover - the message is the point
    raise UserError(f"--ray needs Ray: pip install -e '.[ray]' ({e})") from None

MAX_ATTEMPTS = 3  # a shard whose worker dies this many times stops the run
START_TIMEOUT_S = 600  # with nothing running, how long to wait for a replacement worker to start


class RayShardWorker(ShardWorker):
    """The actor: a ShardWorker that says which node and process it runs on."""

    def __init__(self, spec: WorkerSpec, prompts=None):
        import socket

        super().__init__(spec, prompts=prompts)
        node = ray.get_runtime_context().get_node_id()
        self.where = f"node {node[:12]} ({socket.gethostname()}) pid {os.getpid()}"

    def ready(self) -> str:
        return self.where


class RayPool:
    """Actors over a Ray cluster, fed one item at a time; a dead actor's item is retried elsewhere."""

    def __init__(self, spec: WorkerSpec, address: str, workers: int | None = None, echo: Callable = print,
                 prompts=None):
        kind, k = check_ray_request(address, workers)
        self.owns_ray = False
        if ray.is_initialized():
            pass  # already connected (e.g. by a test): use that cluster, leave it running
        else:
            try:
                if kind == "local":
                    ray.init(num_cpus=k, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=kind, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise UserError(f"cannot reach the Ray cluster at {address!r} ({str(e).splitlines()[0]}); "
                                f"start one with `ray start --head`, or use --ray local:K") from None
            self.owns_ray = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_gpu = bool(spec.engines) and spec.device != "cpu" and gpus > 0
        total = gpus if use_gpu else int(resources.get("CPU", 0))
        n = min(workers or total, total) if total else 0
        if n < 1:
            self.close()
            raise UserError(f"the Ray cluster at {address!r} has no {'GPU' if use_gpu else 'CPU'} for a worker")
        # One thread per worker: the actors already fill the CPUs.
        self.spec = WorkerSpec(**{**spec.absolute().__dict__, "threads": spec.threads or 1})
        self.options = {"num_cpus": 1, "num_gpus": 1 if use_gpu else 0, "max_restarts": 0}
        # A text model's captions: put in the object store once, handed to each actor as it starts.
        self.prompts = None if prompts is None else ray.put(prompts)
        self.actors = [self._start() for _ in range(n)]
        self.replacements = n  # at most as many replacement actors as there were workers
        self.in_flight: dict = {}  # object ref -> (actor, item index); tests kill actors from here
        self.starting: dict = {}  # ready() ref -> replacement actor not yet loaded
        echo(f"ray: {n} workers ({'1 GPU' if use_gpu else '1 CPU'} each) on {len(ray.nodes())} node(s)")

    @property
    def size(self) -> int:
        return len(self.actors)

    def _start(self):
        return ray.remote(RayShardWorker).options(**self.options).remote(self.spec, self.prompts)

    def map(self, method: str, items: list[tuple]) -> Iterator[tuple[int, object]]:
        """(index, actor.method(*items[index])) for every item, in the order they finish."""
        pending = deque(range(len(items)))
        attempts = [0] * len(items)
        idle = [a for a in self.actors if a not in self.starting.values()]
        try:
            while pending or self.in_flight:
                while pending and idle:
                    actor, i = idle.pop(), pending.popleft()
                    self.in_flight[getattr(actor, method).remote(*items[i])] = (actor, i)
                if not self.in_flight and not self.starting:
                    raise UserError("every Ray worker died; see the Ray logs (`ray logs` on the head node)")
                ready, _ = ray.wait(list(self.in_flight) + list(self.starting), num_returns=1,
                                    timeout=None if self.in_flight else START_TIMEOUT_S)
                if not ready:
                    raise UserError(f"no Ray worker could be started in {START_TIMEOUT_S} s (does the cluster "
                                    f"have a free CPU or GPU?)")
                ref = ready[0]
                if ref in self.starting:  # a replacement is ready (or failed to start)
                    actor = self.starting.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(actor)
                    except RayActorError as e:
                        self._fail_start(actor, e)
                    continue
                actor, i = self.in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayActorError as e:  # the worker (process or node) died: its item runs elsewhere
                    if e.actor_init_failed:  # loading failed (a path missing on that node, ...): say why
                        raise UserError(f"a Ray worker could not load: {_reason(str(e))}") from None
                    attempts[i] += 1
                    if attempts[i] >= MAX_ATTEMPTS:
                        raise UserError(f"item {i} lost its worker {attempts[i]} times; last: "
                                        f"{str(e).splitlines()[0]}") from None
                    pending.appendleft(i)
                    self._drop(actor)
                    self._replace()
                    continue
                except RayTaskError as e:  # the work itself failed: deterministic, so no retry
                    cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
                    if isinstance(cause, UserError):
                        raise cause from None
                    raise
                idle.append(actor)
                yield i, result
        finally:
            self.in_flight.clear()

    def _replace(self) -> None:
        """Start a replacement actor; it gets work once it has loaded (a dead node's replacement may
        wait for resources, so nothing is queued on it meanwhile)."""
        if self.replacements > 0:
            self.replacements -= 1
            new = self._start()
            self.actors.append(new)
            self.starting[new.ready.remote()] = new

    def _fail_start(self, actor, e: Exception) -> None:
        self._drop(actor)
        if getattr(e, "actor_init_failed", False):
            raise UserError(f"a Ray worker could not load: {_reason(str(e))}") from None

    def _drop(self, actor) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
        ray.kill(actor, no_restart=True)

    def ordered(self, method: str, items: list[tuple], progress: Callable | None = None) -> list:
        """Every result, in item order (progress(i) as each finishes)."""
        out = [None] * len(items)
        for i, result in self.map(method, items):
            out[i] = result
            if progress is not None:
                progress(i)
        return out

    # --- the three uses -------------------------------------------------------------------------
    def shards(self, job: dict) -> Callable[[list[int]], Iterator[dict]]:
        """For `soda.shards.run_job`: the shards to do -> finished shards as they come."""
        return lambda todo: (result for _, result in self.map("shard", [(job, k) for k in todo]))

    def calibrate(self, sampler: dict, batches: list[tuple], options: dict, progress=None) -> list[dict]:
        """Profiling batches (labels, noise seed) -> their sums, in batch order."""
        tick = None if progress is None else (lambda i: [progress(s) for s in range(sampler["steps"])])
        return self.ordered("calibrate", [(sampler, ys, seed, options) for ys, seed in batches], tick)

    def generate(self, sampler: dict, schedule: dict, batches: list[tuple], progress=None) -> list[tuple]:
        """Bench batches (labels, seed, noise) -> (samples, FLOPs, seconds), in batch order."""
        return self.ordered("generate", [(sampler, schedule, ys, seed, z) for ys, seed, z in batches], progress)

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            ray.kill(actor, no_restart=True)
        self.actors, self.starting = [], {}
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(message: str) -> str:
    """The user-facing line of a remote traceback: the UserError's message when there is one."""
    lines = [l.strip() for l in message.splitlines() if l.strip()]
    for line in reversed(lines):
        if "UserError:" in line:
            return line.split("UserError:", 1)[1].strip()
    return lines[-1] if lines else "unknown error"
