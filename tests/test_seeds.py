"""Calibration and evaluation never draw the same noise, whatever seeds the user passes."""
import itertools

import numpy as np

from soda import seeds


def test_streams_are_disjoint_by_construction():
    """Every calibration key starts with CALIBRATION, every evaluation key with EVALUATION: two keys
    from different streams differ in that word for ANY user seeds and indices."""
    assert seeds.CALIBRATION != seeds.EVALUATION
    for a, b, i, j in itertools.product([0, 1, 7, 2**40], [0, 1, 7], range(3), range(3)):
        cal = seeds.calibration(a, seeds.PROFILE, i)
        ev = seeds.evaluation(b, j)
        assert seeds.stream_of(cal) == "calibration" and seeds.stream_of(ev) == "evaluation"
        assert (cal.entropy, cal.spawn_key) != (ev.entropy, ev.spawn_key)
    assert seeds.stream_of(np.random.SeedSequence(3)) == "plain"


def test_issue_scenario_profile_seed0_bench_seed1():
    """`profile --seed 0` then `bench --seed 1` used to replay calibration batch 0 as evaluation
    noise (calibration drew from seed + 1 + b). No calibration draw equals any evaluation draw."""
    shape = (8, 1, 16, 16)
    cal = [np.random.default_rng(seeds.calibration(s, p, i)).standard_normal(shape)
           for s in range(4) for p in (seeds.PROFILE, seeds.TUNING) for i in range(4)]
    ev = [np.random.default_rng(seeds.evaluation(s, j, c)).standard_normal(shape)
          for s in range(4) for j in range(5) for c in range(2)]
    firsts = {float(x.flat[0]) for x in cal}
    assert len(firsts) == len(cal)  # calibration draws differ among themselves too
    assert not firsts & {float(x.flat[0]) for x in ev}
    # ...and neither stream is the plain default_rng(seed) that `sample --seed` uses.
    plain = {float(np.random.default_rng(s).standard_normal(shape).flat[0]) for s in range(10)}
    assert not plain & firsts


def test_profile_draws_from_the_calibration_stream(tiny_model):
    """The profiler's noise is the calibration stream's, not default_rng(seed + 1) as before."""
    from soda.profile import profile
    from soda.sampling import SamplerConfig

    seen = []
    import soda.sampling as sampling

    orig = sampling.initial_noise

    def spy(n, shape, seed):
        seen.append(seed)
        return orig(n, shape, seed)

    sampling.initial_noise = spy
    try:
        profile(tiny_model, SamplerConfig("ddim", 2, 1.0, None), samples=2, seed=1)
    finally:
        sampling.initial_noise = orig
    assert seen and all(isinstance(s, np.random.SeedSequence) and seeds.stream_of(s) == "calibration" for s in seen)
