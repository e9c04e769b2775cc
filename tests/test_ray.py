"""`--ray`: a local 2-node Ray cluster (one CPU per node), shared by this module's tests.

Generation on actors on both nodes is bit-identical to a run in this process; a worker killed in
the middle of a run costs nothing (every sample comes back exactly once); profiling and bench give
the same numbers through Ray as without it."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import ray  # a test dependency (pyproject's `test` extra): a broken install fails here, not skips

from conftest import cli_in_process
from soda.shards import GenerateJob, ShardStore, WorkerSpec, generate_to_folder, load_backend, run_job

STEPS = 5


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    r = cli_in_process(args, monkeypatch, capsys)
    return r.returncode, r.stdout, r.stderr
quiet = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, one CPU each, no dashboard; shut down after the module."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def digits():
    from soda.policies import ScheduleSpec, make_schedule
    from soda.sampling import SamplerConfig

    spec = WorkerSpec("dit-digits")
    loaded = load_backend(spec)
    _, config, model, weights = loaded
    sampler = SamplerConfig("ddpm", STEPS, 2.0, None)
    schedule = make_schedule("toca", ScheduleSpec.for_model(config, "ddpm", STEPS, ("attn", "mlp")))

    def job(num_samples=8, shard_size=2, seed=3) -> GenerateJob:
        return GenerateJob(config.name, config.hash(), weights, "torch", sampler.to_dict(), schedule.to_dict(),
                           num_samples, shard_size, seed)

    return spec, loaded, job


def shards_of(out, job) -> list[dict]:
    store = ShardStore(out, job)
    return [store.load_shard(k) for k in range(job.num_shards)]


@pytest.fixture(scope="module")
def local_run(digits, tmp_path_factory):
    spec, loaded, job = digits
    out = tmp_path_factory.mktemp("local")
    generate_to_folder(spec, loaded, job(), out, echo=quiet)
    return out


def test_two_nodes_bit_identical_to_one_process(cluster, digits, local_run, tmp_path):
    spec, loaded, job = digits
    res = generate_to_folder(spec, None, job(), tmp_path, ray_address=cluster.address, echo=quiet)
    assert sorted(res["computed"]) == list(range(job().num_shards))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    nodes = {e["worker"].split()[1] for e in manifest["shards"].values()}
    assert len(nodes) == 2, manifest["shards"]  # actors on both nodes did work
    assert {n["NodeID"][:12] for n in ray.nodes() if n["Alive"]} == nodes
    for mine, theirs in zip(shards_of(local_run, job()), shards_of(tmp_path, job())):
        np.testing.assert_array_equal(theirs["samples"], mine["samples"])  # bit for bit
        np.testing.assert_array_equal(theirs["labels"], mine["labels"])
    with np.load(local_run / "samples.npz") as a, np.load(tmp_path / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_a_killed_worker_loses_nothing_and_writes_nothing_twice(cluster, digits, local_run, tmp_path, monkeypatch):
    from soda.distributed import RayPool

    spec, _, job = digits
    writes = Counter()
    original = ShardStore.write_shard

    def counting(self, result):
        writes[result["k"]] += 1
        return original(self, result)

    monkeypatch.setattr(ShardStore, "write_shard", counting)
    killed = []
    with RayPool(spec, cluster.address, echo=quiet) as pool:
        first_actors = list(pool.actors)

        def kill_a_busy_worker(k):
            if not killed and pool.in_flight:  # the other actor is in the middle of a shard
                actor, item = next(iter(pool.in_flight.values()))
                ray.kill(actor, no_restart=True)
                killed.append((actor, item))

        store = ShardStore(tmp_path, job())
        res = run_job(store, pool.shards(job().to_dict()), on_shard=kill_a_busy_worker)
        assert killed, "no shard was in flight to kill"
        dead, lost_shard = killed[0]
        assert dead not in pool.actors and len(pool.actors) == 2  # replaced
        assert any(a not in first_actors for a in pool.actors)
    assert sorted(res["computed"]) == list(range(job().num_shards))
    assert set(writes.values()) == {1} and len(writes) == job().num_shards
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["done"] == job().num_shards
    for mine, theirs in zip(shards_of(local_run, job()), shards_of(tmp_path, job())):
        np.testing.assert_array_equal(theirs["samples"], mine["samples"])
    with np.load(tmp_path / "samples.npz") as z:
        assert len(z["arr_0"]) == job().num_samples
    idx = np.concatenate([s["indices"] for s in shards_of(tmp_path, job())])
    np.testing.assert_array_equal(idx, np.arange(job().num_samples))  # every sample exactly once


def test_profile_on_ray_equals_profile_here(cluster, digits):
    from soda.distributed import RayPool
    from soda.profile import profile
    from soda.sampling import SamplerConfig

    spec, (_, _, model, weights), _ = digits
    sampler = SamplerConfig("ddim", STEPS, 2.0, None)
    here = profile(model, sampler, samples=4, seed=2, batch_size=2, weights=weights, intervals=(1, 2))
    ticks = []
    with RayPool(spec, cluster.address, echo=quiet) as pool:
        there = profile(model, sampler, samples=4, seed=2, batch_size=2, weights=weights, intervals=(1, 2),
                        pool=pool, progress=ticks.append)
    assert len(ticks) == 2 * STEPS
    assert there.E_c == here.E_c and there.E_p == here.E_p
    assert there.cost["ray_workers"] == 2


def test_bench_on_ray_equals_bench_here(cluster, digits):
    from soda.bench import BenchSetup, bench
    from soda.distributed import RayPool
    from soda.sampling import SamplerConfig

    spec, (_, _, model, weights), _ = digits
    sampler = SamplerConfig("ddim", STEPS, 2.0, None)
    setup = BenchSetup(["full", "fora"], 1.5, samples=4, seed=1, batch_size=1, eval_seeds=2, tune=False)
    here = bench(model, weights, sampler, setup, echo=quiet)
    with RayPool(spec, cluster.address, echo=quiet) as pool:
        there = bench(model, weights, sampler, setup, echo=quiet, pool=pool)
    keys = ("policy", "variant", "flops_speedup", "psnr_db", "psnr_per_seed", "cosine", "class_accuracy", "frechet")
    assert [{k: r[k] for k in keys} for r in there["results"]] == [{k: r[k] for k in keys} for r in here["results"]]


def test_cli_generate_with_ray_address(cluster, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["generate", "--num-samples", "3", "--shard-size", "2", "--steps", "3",
                                     "--out", str(tmp_path / "g"), "--ray", cluster.address, "--workers", "1"],
                                    monkeypatch, capsys)
    assert code == 0, err
    assert "ray: 1 workers" in out and "2 shards generated by 1 worker(s)" in out
    assert ray.is_initialized()  # the command used the test's connection and left it open


def test_text_model_on_ray_bit_identical_to_one_process(cluster, tmp_path, monkeypatch, capsys):
    """A tiny PixArt with --prompt-embeds: actors (given the prompts once, when they start) on both
    nodes write the same shards as this process."""
    from conftest import write_tiny_pixart

    pth, prompts = write_tiny_pixart(tmp_path)
    args = ["generate", "--model", "pixart", "--ckpt", str(pth), "--num-heads", "2", "--steps", "3",
            "--prompt-embeds", str(prompts), "--num-samples", "4", "--shard-size", "1"]
    code, _, err = run_cli(args + ["--out", str(tmp_path / "here")], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(args + ["--out", str(tmp_path / "ray"), "--ray", cluster.address], monkeypatch, capsys)
    assert code == 0, err
    assert "ray: 2 workers" in out and "arr_1: prompt indices (i % 3)" in out
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert len({e["worker"].split()[1] for e in manifest["shards"].values()}) == 2
    for k in range(4):
        with np.load(tmp_path / "here" / "shards" / f"{k:05d}.npz") as a, \
                np.load(tmp_path / "ray" / "shards" / f"{k:05d}.npz") as b:
            np.testing.assert_array_equal(b["samples"], a["samples"])
            assert int(b["labels"][0]) == k % 3


def test_cli_profile_and_bench_with_ray(cluster, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p.json"
    code, stdout, err = run_cli(["profile", "--samples", "2", "--batch-size", "1", "--steps", "3",
                                        "--intervals", "1,2", "--out", str(out), "--ray", cluster.address],
                                       monkeypatch, capsys)
    assert code == 0, err
    assert "ray: 2 workers (1 CPU each) on 2 node(s)" in stdout
    assert json.loads(out.read_text())["cost"]["ray_workers"] == 2
    code, stdout, err = run_cli(["bench", "--policies", "full,fora", "--speedup", "1.5", "--samples", "2",
                                        "--batch-size", "1", "--steps", "3", "--no-tune", "--json", str(tmp_path / "b.json"),
                                        "--ray", cluster.address, "--workers", "1"], monkeypatch, capsys)
    assert code == 0, err
    assert "ray: 1 workers" in stdout and json.loads((tmp_path / "b.json").read_text())["results"][1]["policy"] == "fora"


def test_a_lost_node_loses_nothing(cluster, digits, local_run, tmp_path):
    """A third node joins, its worker takes shards, then the node goes away mid-run: its shard runs
    on the remaining nodes, and the replacement worker, which finds no free CPU, never holds work."""
    from soda.distributed import RayPool

    spec, _, job = digits
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    removed = []
    try:
        with RayPool(spec, cluster.address, echo=quiet) as pool:
            assert pool.size == 3

            def remove_the_third_node(k):
                if not removed:
                    cluster.remove_node(node)
                    removed.append(k)

            res = run_job(ShardStore(tmp_path, job()), pool.shards(job().to_dict()), on_shard=remove_the_third_node)
            # Whether the removed node's worker held a shard at that moment depends on timing (it may
            # have finished first); either way no replacement took work without a free CPU.
            assert len(pool.starting) <= 1 and len(pool.actors) - len(pool.starting) >= 2
    finally:
        if not removed:
            cluster.remove_node(node)
    assert sorted(res["computed"]) == list(range(job().num_shards))
    for mine, theirs in zip(shards_of(local_run, job()), shards_of(tmp_path, job())):
        np.testing.assert_array_equal(theirs["samples"], mine["samples"])


def test_video_model_on_ray_bit_identical_to_one_process(cluster, tmp_path, monkeypatch, capsys):
    """opensora-tiny at a video size other than its default (34 frames of 48 x 80): actors on both
    nodes, which load the model themselves, write the same latents as this process; samples.npz
    holds them (float32 [N, C, T, H, W]: no video decoder)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "p.npz", prompt_embeds=rng.standard_normal((3, 16, 32)).astype(np.float32),
             prompt_attention_mask=(np.arange(16)[None] < np.array([[3], [8], [13]])).astype(np.int64))
    args = ["generate", "--model", "opensora-tiny", "--random-init", "--steps", "2", "--prompt-embeds",
            str(tmp_path / "p.npz"), "--num-samples", "4", "--shard-size", "1", "--num-frames", "34", "--height", "48",
            "--width", "80", "--policy", "toca"]
    code, out, err = run_cli(args + ["--out", str(tmp_path / "here")], monkeypatch, capsys)
    assert code == 0, err
    assert "arr_0: float32 latents [4, 4, 10, 6, 10]" in out
    code, out, err = run_cli(args + ["--out", str(tmp_path / "ray"), "--ray", cluster.address], monkeypatch, capsys)
    assert code == 0, err
    assert "ray: 2 workers" in out
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert len({e["worker"].split()[1] for e in manifest["shards"].values()}) == 2
    with np.load(tmp_path / "here" / "samples.npz") as a, np.load(tmp_path / "ray" / "samples.npz") as b:
        assert a["arr_0"].shape == (4, 4, 10, 6, 10) and a["arr_0"].dtype == np.float32
        np.testing.assert_array_equal(b["arr_0"], a["arr_0"])
        np.testing.assert_array_equal(b["arr_1"], [0, 1, 2, 0])
    assert (tmp_path / "ray" / "preview.png").stat().st_size > 0


def test_video_profile_on_ray_equals_profile_here(cluster, tmp_path, monkeypatch, capsys):
    """`profile --ray` at a video size other than the model's default: the actors profile that size
    (they are given the video), so the numbers equal a profile in this process."""
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "p.npz", prompt_embeds=rng.standard_normal((2, 16, 32)).astype(np.float32),
             prompt_attention_mask=(np.arange(16)[None] < np.array([[5], [11]])).astype(np.int64))
    args = ["profile", "--model", "opensora-tiny", "--random-init", "--prompt-embeds", str(tmp_path / "p.npz"),
            "--samples", "2", "--batch-size", "1", "--steps", "3", "--intervals", "1,2", "--rates", "0.5",
            "--orders", "none", "--num-frames", "34", "--height", "48", "--width", "80"]
    code, _, err = run_cli(args + ["--out", str(tmp_path / "here.json")], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(args + ["--out", str(tmp_path / "ray.json"), "--ray", cluster.address],
                             monkeypatch, capsys)
    assert code == 0, err
    here, there = (json.loads((tmp_path / f).read_text()) for f in ("here.json", "ray.json"))
    assert here["model_config"]["frames"] == 10 and there["model_config"] == here["model_config"]
    assert there["E_c"] == here["E_c"] and there["E_p"] == here["E_p"]
