"""UAS + the soda policy on hand-made profiles, resolve_schedule, and the CLI's bad-input paths."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soda.dp import optimal_anchors, step_errors
from soda.errors import UserError
from soda.flops import FlopsModel, schedule_flops
from soda.models.config import get_config
from soda.policies import ScheduleSpec, make_schedule
from soda.policies.full import full_schedule
from soda.profile import Profile
from soda.schedule import FULL, REUSE, parse_action

ROOT = Path(__file__).resolve().parent.parent
RATES = [0.25, 0.5, 0.75]


def synthetic_profile(config, S=20, intervals=(1, 2, 3, 4, 5, 6), ep_factor=(0.3, 0.3), seed=0):
    """E_c grows with age and is largest early; E_p = factor * E_c * (1 - a) per module (the
    factors cycled over the model's modules)."""
    rng = np.random.default_rng(seed)
    L, M, K = config.depth, len(config.modules), len(intervals)
    ep_factor = np.resize(np.array(ep_factor, dtype=float), M)
    ec = np.full((S, L, M, K), np.nan)
    ep = np.full((S, L, M, len(RATES), K), np.nan)
    for s in range(S):
        for j, k in enumerate(intervals):
            if s >= k:
                base = k * (1.0 + 3.0 * (S - s) / S) * 0.01 * (1 + 0.5 * rng.random((L, M)))
                ec[s, :, :, j] = base
                for i, a in enumerate(RATES):
                    ep[s, :, :, i, j] = base * ep_factor[None, :] * (1 - a)
    to_list = lambda a: np.where(np.isnan(a), None, a).tolist()
    return Profile(model=config.name, model_hash=config.hash(), model_config=config.to_dict(), weights="synthetic",
                   sampler={"kind": "ddim", "steps": S}, num_steps=S, num_layers=L, modules=list(config.modules),
                   intervals=list(intervals), rates=RATES, E_c=to_list(ec), E_p=to_list(ep), samples=1).validate()


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return tiny_config


def spec_of(config, S=20):
    return ScheduleSpec.for_model(config, "ddim", S)


def speedup_of(sched, config):
    fm = FlopsModel.for_config(config)
    return schedule_flops(full_schedule(spec_of(config, sched.num_steps)), fm, 2) / schedule_flops(sched, fm, 2)


@pytest.mark.parametrize("target", [1.0, 1.5, 2.0, 2.5, 3.0])
def test_speedup_is_met_within_three_percent(cfg, target):
    prof = synthetic_profile(cfg)
    sched = make_schedule("soda", spec_of(cfg), speedup=target, profile=prof)
    got = speedup_of(sched, cfg)
    assert target <= got <= target * 1.03 + 1e-9
    assert sched.params["flops_speedup"] == pytest.approx(got, rel=1e-3)
    assert sched.selector == "feature-mean" and sched.policy == "soda"
    # The anchors are the DP's optimum for the anchor count the search chose.
    anchors = sched.params["anchors"]
    assert [s for s in range(20) if sched.step_kind(s) == FULL] == anchors
    err = step_errors(prof.ec(), prof.intervals)
    assert optimal_anchors(err, len(anchors))[0] == anchors
    assert set(sched.prune_rates()) <= set(RATES)


def test_prunes_only_where_the_profile_says_it_helps(cfg):
    """E_p >= E_c for the MLP everywhere: UAS must never prune the MLP, and does prune attention."""
    prof = synthetic_profile(cfg, ep_factor=(0.3, 2.0))
    sched = make_schedule("soda", spec_of(cfg), speedup=2.0, profile=prof)
    kinds = {(m, parse_action(sched.action(s, l, m))[0]) for s in range(20) if not sched.is_skip(s)
             for l in range(cfg.depth) for m in range(2)}
    assert (1, "prune") not in kinds and (0, "prune") in kinds


def test_more_sensitive_modules_get_higher_rates(cfg):
    """a = lam * E_c + beta snapped up: within a step, rate order follows E_c order."""
    prof = synthetic_profile(cfg, seed=3)
    sched = make_schedule("soda", spec_of(cfg), speedup=2.0, profile=prof, lam=2.0)
    ec = prof.ec()
    anchors = sched.params["anchors"]
    pairs = 0
    for s in range(20):
        if s in anchors:
            continue
        k = s - max(a for a in anchors if a <= s)
        entries = [(ec[s, l, m, k - 1], parse_action(sched.action(s, l, m))[1]) for l in range(cfg.depth) for m in range(2)]
        for e1, r1 in entries:
            for e2, r2 in entries:
                if e1 > e2:
                    assert r1 >= r2
                    pairs += 1
    assert pairs > 0 and sched.prune_rates()


def test_anchors_alone_fix_the_count_and_prune_nothing(cfg):
    prof = synthetic_profile(cfg)
    sched = make_schedule("soda", spec_of(cfg), anchors=5, profile=prof)
    assert sched.count_kinds()["full"] == 5 and sched.prune_rates() == []
    assert all(a in (FULL, REUSE) for s in range(20) for row in sched.steps[s] for a in row)
    both = make_schedule("soda", spec_of(cfg), anchors=8, speedup=2.0, profile=prof)
    assert both.count_kinds()["full"] == 8 and 2.0 <= speedup_of(both, cfg) <= 2.06
    with pytest.raises(UserError, match="reach at most"):
        make_schedule("soda", spec_of(cfg), anchors=15, speedup=3.0, profile=prof)


@pytest.mark.parametrize("kw,match", [
    (dict(speedup=50.0), "not reachable"),
    (dict(speedup=0.5), "at least 1"),
    (dict(anchors=2), "cannot cover 20 steps"),
    (dict(), "needs --speedup X or --anchors N"),
    (dict(speedup=2.0, rates=[0.3]), "not profiled"),
])
def test_bad_requests_are_user_errors(cfg, kw, match):
    with pytest.raises(UserError, match=match):
        make_schedule("soda", spec_of(cfg), profile=synthetic_profile(cfg), **kw)


def test_profile_for_another_sampler_is_refused(cfg):
    with pytest.raises(UserError, match="ddim-20, not ddim-50"):
        make_schedule("soda", spec_of(cfg, 50), speedup=2.0, profile=synthetic_profile(cfg))


def test_resolve_schedule_profiles_first_and_says_so(tiny_model):
    from soda.pipeline import resolve_schedule
    from soda.sampling import SamplerConfig

    said, bars = [], []

    class Bar:
        def __init__(self, desc, total):
            self.desc, self.total, self.n, self.closed = desc, total, 0, False
            bars.append(self)

        def update(self):
            self.n += 1

        def close(self):
            self.closed = True

    sampler = SamplerConfig("ddim", 4, 4.0, None)
    sched = resolve_schedule(tiny_model, "w", sampler, "soda", speedup=1.3, echo=said.append, progress=Bar)
    assert any(m.startswith("profiling 32 generations first") and "--profile" in m for m in said)
    # The profiling run shows a progress bar: one tick per sampling step of its one batch.
    assert [(b.desc, b.total, b.n, b.closed) for b in bars] == [("profile 32 generations", 4, 4, True)]
    assert sched.policy == "soda" and sched.num_steps == 4 and sched.params["flops_speedup"] >= 1.3
    assert resolve_schedule(tiny_model, "w", sampler, "full").count_kinds()["full"] == 4
    with pytest.raises(UserError, match="unknown policy 'fast'"):
        resolve_schedule(tiny_model, "w", sampler, "fast")


def test_on_the_fly_profile_measures_forecast_tables_only_for_soda_forecast(tiny_model, monkeypatch):
    """Forecast tables triple the profiling time: soda alone must not pay for them."""
    import soda.profile
    from soda.pipeline import resolve_schedule
    from soda.sampling import SamplerConfig

    asked, real = [], soda.profile.profile

    def spy(*args, **kwargs):
        asked.append(tuple(kwargs.get("orders", ())))
        return real(*args, **kwargs)

    monkeypatch.setattr(soda.profile, "profile", spy)
    sampler = SamplerConfig("ddim", 4, 4.0, None)
    resolve_schedule(tiny_model, "w", sampler, "soda", speedup=1.3, echo=lambda m: None)
    resolve_schedule(tiny_model, "w", sampler, "soda-forecast", speedup=1.3, echo=lambda m: None)
    assert asked == [(), soda.profile.DEFAULT_ORDERS]


@pytest.mark.parametrize("policy", ["fora", "toca", "duca"])
def test_resolve_schedule_builds_baselines(tiny_model, policy):
    """Baselines through the pipeline: published settings, or tuned to --speedup (FLOPs within 3%)."""
    from soda.pipeline import resolve_schedule
    from soda.sampling import SamplerConfig

    sampler = SamplerConfig("ddim", 50, 4.0, None)
    published = resolve_schedule(tiny_model, "w", sampler, policy)
    assert published.policy == policy and published.count_kinds()["full"] < 50
    tuned = resolve_schedule(tiny_model, "w", sampler, policy, speedup=2.0)
    assert 2.0 * (1 - 1e-9) <= speedup_of(tuned, tiny_model.config) <= 2.0 * 1.03


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def one_error_line(r, match):
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if not l.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.stderr


@pytest.fixture(scope="module")
def digits_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "digits.json"
    synthetic_profile(get_config("dit-digits"), S=10).save(path)
    return path


def test_cli_schedule_writes_json_and_picture(digits_profile, tmp_path):
    r = run_cli("schedule", "--profile", str(digits_profile), "--speedup", "2", "--out", "s.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "FLOPs speedup 2.0" in r.stdout and "full," in r.stdout
    assert (tmp_path / "s.png").stat().st_size > 1000
    one_error_line(run_cli("schedule", "--profile", str(digits_profile), "--speedup", "40", cwd=tmp_path), "not reachable")


def test_cli_schedule_planners(digits_profile, tmp_path):
    import json

    for planner in ("joint", "dcs"):
        r = run_cli("schedule", "--profile", str(digits_profile), "--speedup", "2", "--planner", planner,
                    "--out", f"{planner}.json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / f"{planner}.json").read_text())["params"]["planner"] == planner
    one_error_line(run_cli("schedule", "--profile", str(digits_profile), "--anchors", "4", "--planner", "joint",
                           cwd=tmp_path), "takes --speedup only")


def test_cli_sample_refuses_a_profile_for_other_steps(digits_profile, tmp_path):
    r = run_cli("sample", "--random-init", "--policy", "soda", "--profile", str(digits_profile), "--steps", "12",
                "--labels", "1", cwd=tmp_path)
    one_error_line(r, "profile was made for ddim-10, not ddim-12")


def test_cli_sample_refuses_a_profile_for_another_model(tmp_path):
    path = tmp_path / "xl.json"
    synthetic_profile(get_config("dit-s-8"), S=10).save(path)
    r = run_cli("sample", "--random-init", "--policy", "soda", "--profile", str(path), "--steps", "10",
                "--labels", "1", cwd=tmp_path)
    one_error_line(r, "profile was made for model dit-s-8")


def test_cli_schedule_file_for_another_step_count(digits_profile, tmp_path):
    assert run_cli("schedule", "--profile", str(digits_profile), "--anchors", "4", "--out", "s.json",
                   cwd=tmp_path).returncode == 0
    r = run_cli("sample", "--random-init", "--schedule", "s.json", "--steps", "20", "--labels", "1", cwd=tmp_path)
    one_error_line(r, "schedule was made for ddim-10, not ddim-20")


def test_cli_unknown_policy(tmp_path):
    one_error_line(run_cli("sample", "--random-init", "--policy", "fast", cwd=tmp_path), "unknown policy 'fast'")


@pytest.mark.parametrize("target", [1.5, 2.0, 2.5, 3.0])
def test_joint_planner_never_predicts_worse_than_uas(cfg, target):
    """Same objective, same budget: the exact joint DP's predicted error is at most the paper
    rule's (the tiny model's costs are integers with a small gcd, so the DP is exact here)."""
    prof = synthetic_profile(cfg, ep_factor=(0.8, 0.3))
    uas = make_schedule("soda", spec_of(cfg), speedup=target, profile=prof)
    joint = make_schedule("soda", spec_of(cfg), speedup=target, profile=prof, planner="joint")
    assert joint.params["planner"] == "joint" and joint.params["beta"] is None
    assert joint.params["predicted_error"] <= uas.params["predicted_error"] + 1e-9
    assert target <= speedup_of(joint, cfg)


def test_joint_planner_counts_the_once_per_generation_flops():
    """PixArt computes its captions' K/V once per generation (FlopsModel.condition > 0). The joint
    DP's budget and plan include that term as the paper rule's do; without it the plan missed
    its target by that much and failed the schedule's FLOPs assertion."""
    from soda.models.config import get_config

    config = get_config("pixart-digits")
    assert FlopsModel.for_config(config).condition(1) > 0
    prof = synthetic_profile(config, ep_factor=(0.8, 0.3, 0.3))
    for target in (1.5, 2.0, 3.0):
        joint = make_schedule("soda", spec_of(config), speedup=target, profile=prof, planner="joint")
        uas = make_schedule("soda", spec_of(config), speedup=target, profile=prof)
        assert target * (1 - 1e-9) <= speedup_of(joint, config) <= target * 1.03
        assert joint.params["predicted_error"] <= uas.params["predicted_error"] + 1e-9


def test_ablation_planners_prune_nothing(cfg):
    prof = synthetic_profile(cfg)
    for planner in ("dcs", "fixed"):
        sched = make_schedule("soda", spec_of(cfg), speedup=2.0, profile=prof, planner=planner)
        assert sched.prune_rates() == [] and speedup_of(sched, cfg) >= 2.0
    fixed = make_schedule("soda", spec_of(cfg), speedup=2.0, profile=prof, planner="fixed")
    n = fixed.params["num_anchors"]
    assert fixed.params["anchors"] == sorted({(i * 20) // n for i in range(n)})
    with pytest.raises(UserError, match="unknown planner"):
        make_schedule("soda", spec_of(cfg), speedup=2.0, profile=prof, planner="magic")


def test_reach_is_said_before_profiling_and_agrees_with_the_planner(cfg):
    """`unreachable` (no profile: what `sample`/`bench` check before profiling) refuses exactly
    the targets the planner refuses on a profile with the same intervals."""
    import re

    from soda.policies.soda import unreachable

    prof = synthetic_profile(cfg)  # intervals 1..6, the profiler's default
    err = unreachable(1000.0, FlopsModel.for_config(cfg), 20, cfg.depth, cfg.modules, 6)
    best = float(re.search(r"at most ([\d.]+)x", str(err)).group(1))
    for target in (best * 0.999, best * 1.001):  # `best` is rounded to 0.01: both sides of the real bound
        said = unreachable(target, FlopsModel.for_config(cfg), 20, cfg.depth, cfg.modules, 6)
        try:
            make_schedule("soda", spec_of(cfg), speedup=target, profile=prof)
            planned = None
        except UserError as e:
            planned = str(e)
        assert (said is None) == (planned is None) and (said is None or str(said) == planned), (target, said, planned)
