"""Taylor forecasting: the executor serves what the official TaylorSeer code serves; composes with pruning."""
import json

import numpy as np
import pytest
import torch

from soda.errors import UserError
from soda.executor import Executor
from soda.flops import FlopsModel, schedule_flops
from soda.forecast import TaylorState, forecast_weights
from soda.models.interface import DIT
from soda.policies import ScheduleSpec, make_schedule
from soda.policies import scaling, taylorseer
from soda.policies.taylorseer import official_full_steps, scaled_full_steps
from soda.schedule import FULL, REUSE, Schedule, forecast, forecast_order, parse_action, prune
from tests.reference import taylorseer_reference as official

B, N, H = 2, 8, 4
MODULES = ("attn", "mlp")


def _signal(s: float, layer: int, m: int, token: np.ndarray) -> np.ndarray:
    """A smooth, non-polynomial output per (step, layer, module, token): [B, n, H]."""
    ch = np.arange(H)[None, None, :]
    tok = token[..., None].astype(np.float64)
    return (np.sin(0.3 * s + 0.7 * layer + 1.3 * m + 0.11 * ch + 0.05 * tok) + 0.02 * s * s).astype(np.float32)


class StepBackend:
    """Tokens never change (gate 0); a module's output is `_signal` of the step (carried in the
    step's conditioning) and of the token ids (carried in channel 0 of the tokens), so served
    values are known exactly."""

    specs = DIT.modules
    modules = MODULES

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def prepare(self, cond):
        return {}

    def embed(self, x, t, context):
        tokens = np.zeros((B, N, H), np.float32)
        tokens[:, :, 0] = np.arange(N)
        return tokens, (t.astype(np.float32),)

    def modulation(self, layer, step):
        return {m: ((step[0],), np.zeros((B, H), np.float32)) for m in MODULES}

    def module(self, layer, name, tokens, s, context=None):
        return _signal(float(s[0]), layer, MODULES.index(name), tokens[:, :, 0].astype(np.int64)), None

    def final(self, tokens, step):
        return tokens


FLOPS = FlopsModel(H, 4 * H, N, (("attn", "self_attn"), ("mlp", "mlp")), 1.0, 1.0, 1.0)


def _schedule(steps, num_layers, selector="none"):
    return Schedule("test", "m", "h", "ddim", len(steps), list(MODULES), num_layers, steps, selector=selector).validate()


def _serve(schedule):
    """Every (s, layer, module) output the executor serves over one run."""
    ex = Executor(StepBackend(schedule.num_layers), schedule, FLOPS)
    served, inner = {}, ex._module_output

    def spy(s, l, m, name, tokens, args):
        served[(s, l, name)] = out = inner(s, l, m, name, tokens, args)
        return out

    ex._module_output = spy
    for s in range(schedule.num_steps):
        ex(s, np.zeros((B, 1, 2, 2), np.float32), np.full(B, s), np.zeros(B, np.int64))
    return served, ex


@pytest.mark.parametrize("interval,order", [(3, 1), (3, 2), (4, 4), (2, 3)])
def test_taylorseer_schedule_serves_what_the_official_code_serves(interval, order):
    S, L = 14, 2
    full = official_full_steps(S, interval)
    steps = [[[FULL] * 2] * L if s in full else [[forecast(order)] * 2] * L for s in range(S)]
    served, _ = _serve(_schedule(steps, L))
    token = np.broadcast_to(np.arange(N), (B, N))

    def outputs(step, layer, module):  # official step counts down: our s = S-1-step
        return torch.from_numpy(_signal(S - 1 - step, layer, MODULES.index(module), token))

    ref = official.run(outputs, S, L, MODULES, interval, order)
    assert len(ref) == len(served)
    for (step, layer, module), value in ref.items():
        np.testing.assert_allclose(served[(S - 1 - step, layer, module)], value.numpy(), rtol=1e-5, atol=1e-5)
    # The forecast is not the frozen cache: a plain reuse schedule serves something else.
    reuse = [[[FULL] * 2] * L if s in full else [[REUSE] * 2] * L for s in range(S)]
    frozen, _ = _serve(_schedule(reuse, L))
    s = max(set(range(S)) - set(full))
    assert not np.allclose(frozen[(s, 0, "mlp")], served[(s, 0, "mlp")], atol=1e-3)


def test_official_full_steps_match_the_published_count():
    full = official_full_steps(50, 4)  # TaylorSeer-DiT.md: interval 4 -> 3.57x fewer computations
    assert full == [0, 1, *range(5, 50, 4)] and len(full) == 14


def test_forecast_values_by_hand():
    """TaylorSeer's factors are backward differences over the last spacing, used as derivatives:
    exact for a line at order 1, not for a parabola at order 2 (the midpoint offset is ignored)."""
    line = lambda s: np.array([3.0 - 2.0 * s])  # noqa: E731
    state = TaylorState(1)
    for s in (0, 2, 5):
        state.update(s, line(s))
    assert state.predict(9, 1)[0] == pytest.approx(line(9)[0]) and state.predict(9, 4)[0] == pytest.approx(line(9)[0])
    f = lambda s: np.array([3.0 - 2.0 * s + 0.5 * s * s])  # noqa: E731  f(0)=3, f(3)=1.5, f(6)=9
    state = TaylorState(2)
    for s in (0, 3, 6):
        state.update(s, f(s))
    # f1 = (9 - 1.5)/3 = 2.5, old f1 = (1.5 - 3)/3 = -0.5, f2 = (2.5 + 0.5)/3 = 1: 9 + 2.5*2 + 1*2^2/2
    assert state.predict(8, 2)[0] == pytest.approx(16.0)
    assert state.predict(8, 1)[0] == pytest.approx(14.0) and state.predict(8, 0)[0] == pytest.approx(9.0)
    assert state.extra_bytes() == 2 * 8
    # Weights: the same recursion on unit vectors.
    w = forecast_weights([0, 3, 6], 8, 2)
    assert w @ np.array([3.0, 1.5, 9.0]) == pytest.approx(16.0)
    np.testing.assert_allclose(forecast_weights([4, 6], 7, 1), [-0.5, 1.5])


def test_pruned_tokens_replace_forecast_values():
    L = 1
    steps = [[[FULL, FULL]], [[FULL, FULL]], [[FULL, FULL]],
             [[forecast(2), prune(0.5, 2)]], [[REUSE, prune(0.25)]], [[forecast(1), prune(0.25, 1)]]]
    sched = _schedule(steps, L, selector="feature-mean")
    served, ex = _serve(sched)
    token = np.broadcast_to(np.arange(N), (B, N))
    state = TaylorState(2)
    for s in (0, 1, 2):
        state.update(s, _signal(s, 0, 1, token))
    fc = state.predict(3, 2)
    fresh = _signal(3, 0, 1, token)
    out = served[(3, 0, "mlp")]
    is_fresh = np.isclose(out, fresh).all(axis=2)
    assert (is_fresh.sum(axis=1) == N // 2).all()
    np.testing.assert_allclose(out[~is_fresh], fc[~is_fresh], rtol=1e-6)
    # The cache got the recomputed tokens; the others stayed at step 2's output.
    cache_fresh = np.isclose(ex.cache[(0, 1)], _signal(5, 0, 1, token)).all(axis=2)
    assert cache_fresh.sum() == B * 2  # prune@0.25 of 8 tokens at step 5
    # A plain prune keeps serving the (partly refreshed) cache, not a forecast.
    assert np.isclose(served[(4, 0, "mlp")], _signal(2, 0, 1, token)).all(axis=2).sum() >= B * (N - 2 - N // 2)
    # Forecast costs no FLOPs; a composed prune costs its kept tokens.
    fm = FLOPS
    assert ex.flops_done == schedule_flops(sched, fm, B)
    assert ex.extra_cache_bytes() == {(0, 0): 2 * B * N * H * 4, (0, 1): 2 * B * N * H * 4}


def test_action_syntax_and_versioning(tmp_path):
    assert parse_action("forecast@2") == ("forecast", 0.0)
    assert parse_action("prune@0.5+forecast@1") == ("prune", 0.5) and forecast_order("prune@0.5+forecast@1") == 1
    assert forecast_order("prune@0.5") == 0 and forecast_order(REUSE) == 0
    for bad in ("forecast@0", "forecast@5", "forecast@x", "prune@0.5+forecast@9", "prune@abc"):
        said = "unknown action" if bad == "prune@abc" else "forecast order must be an integer in 1..4"
        with pytest.raises(UserError, match=f"{said}.*{bad.replace('+', '[+]')}"):
            parse_action(bad)
    with pytest.raises(UserError, match="step 0 of a schedule must compute everything"):
        _schedule([[[FULL, forecast(1)]], [[FULL, FULL]]], 1)
    old = _schedule([[[FULL, FULL]], [[REUSE, prune(0.5)]]], 1).to_dict()
    old["format"] = 1  # a file written before forecasting existed still loads
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert Schedule.load(tmp_path / "v1.json").format == 1
    old["steps"][1] = [[forecast(1), FULL]]
    (tmp_path / "v1f.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="needs schedule format 2"):
        Schedule.load(tmp_path / "v1f.json")


def test_taylorseer_policy_scales_to_a_speedup(tiny_config):
    spec = ScheduleSpec.for_model(tiny_config, "ddim", 50)
    fm = FlopsModel.for_config(tiny_config)
    pub = make_schedule("taylorseer", spec, flops=fm)
    assert pub.params["full_steps"] == official_full_steps(50, 4) and pub.forecast_orders() == [[4, 4]] * 2
    assert pub.params["forecast_cache"]["bytes_per_row"][0] == [4 * 16 * 32 * 4] * 2  # order x N x H x float32
    for target in (1.5, 2.0, 3.0):
        sched = make_schedule("taylorseer", spec, speedup=target, flops=fm, order=2)
        full = sched.params["full_steps"]
        assert full[:2] == [0, 1] and full[-1] == 49 and len(full) == sched.params["anchor_count"]
        # The most full steps whose speedup still reaches the target (whole anchors: maybe above the window).
        assert sched.params["achieved_speedup"] >= target
        more = taylorseer.steps_for(spec, scaled_full_steps(50, len(full) + 1), 2)
        other = Schedule("t", spec.model, spec.model_hash, "ddim", 50, list(spec.modules), 2, more)
        assert scaling.speedup_of(other, spec, fm) < target
        assert {a for s in range(50) if s not in full for row in sched.steps[s] for a in row} == {"forecast@2"}
    assert scaled_full_steps(50, 14) == [0, 1, *range(5, 50, 4)]  # warp 1: the official spacing
    with pytest.raises(UserError, match="order"):
        make_schedule("taylorseer", spec, order=7)
    with pytest.raises(UserError, match="cannot reach"):
        make_schedule("taylorseer", spec, speedup=80, flops=fm)


class _FakeTap:
    """Stands in for InputTap: a pruned 'attention' that returns 0.9 x the true kept outputs."""

    specs = DIT.modules

    def __init__(self):
        self.D = None

    def partial(self, layer, name, idxs, rows):
        return [0.9 * np.take_along_axis(self.D[rows], idx[:, :, None], axis=1) for idx in idxs]


def _cos_dist(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean(1 - (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))))


def test_profile_forecast_tables_equal_explicit_forecasts():
    """E_f and E_pf from the rolling Gram matrix equal forecasts built as arrays with TaylorState."""
    from soda.profile import SensitivityRecorder
    from soda.selectors.feature_mean import FeatureMeanSelector

    S, Bq, Nq, C = 9, 3, 8, 5
    rng = np.random.default_rng(0)
    steps = np.arange(S)[:, None, None, None]
    traj = {name: (rng.standard_normal((Bq, Nq, C)) + steps * rng.standard_normal((Bq, Nq, C))
                   + 0.05 * rng.standard_normal((S, Bq, Nq, C))).astype(np.float32) for name in MODULES}
    tap = _FakeTap()
    rec = SensitivityRecorder(S, 1, MODULES, (1, 2), (0.25, 0.5), inputs=tap, attention_rows=2, orders=(1, 2))
    for s in range(S):
        for name in MODULES:
            tap.D = traj[name][s]
            rec(s, 0, name, traj[name][s])
    ec, ep, ef, epf = rec.tables()
    assert ef.shape == (S, 1, 2, 2, 2, 3) and epf.shape == (S, 1, 2, 2, 2, 2, 3)
    sel = FeatureMeanSelector()
    rows = np.array([0, 2])  # attention_rows=2 of 3 rows, evenly spread
    checked = 0
    for m, name in enumerate(MODULES):
        D = traj[name]
        for oi, o in enumerate((1, 2)):
            for ki, k in enumerate((1, 2)):
                for gi, g in enumerate((1, 2, 3)):
                    for s in range(S):
                        full = [s - k - (o - q) * g for q in range(o + 1)]
                        if full[0] < 0:
                            assert np.isnan(ef[s, 0, m, oi, ki, gi])
                            continue
                        state = TaylorState(o)
                        for t in full:
                            state.update(t, D[t].astype(np.float64))
                        F = state.predict(s, o)
                        assert ef[s, 0, m, oi, ki, gi] == pytest.approx(_cos_dist(F, D[s]), rel=1e-6, abs=1e-9)
                        for ai, a in enumerate((0.25, 0.5)):
                            idx = sel.select(s, 0, name, max(1, round(a * Nq)), None, D[s - k])
                            r = rows if name == "attn" else np.arange(Bq)
                            mixed = F[r].copy()
                            fresh = np.take_along_axis(D[s][r], idx[r, :, None], axis=1)
                            np.put_along_axis(mixed, idx[r, :, None], 0.9 * fresh if name == "attn" else fresh, axis=1)
                            assert epf[s, 0, m, oi, ai, ki, gi] == pytest.approx(_cos_dist(mixed, D[s][r]), rel=1e-6,
                                                                                 abs=1e-9)
                            checked += 1
    assert checked > 100
    # Forecasting a smooth trajectory beats the frozen cache on average.
    assert np.nanmean(ef[:, :, :, 0, 0, 0]) < np.nanmean(ec[:, :, :, 0])
