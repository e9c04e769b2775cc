import numpy as np
import pytest

from soda.errors import UserError
from soda.sampling import Diffusion, SamplerConfig, space_timesteps


def test_respacing_matches_official_examples():
    assert sorted(space_timesteps(1000, "50"))[:3] == [0, 20, 41]
    assert len(space_timesteps(1000, "250")) == 250
    assert sorted(space_timesteps(1000, "1")) == [0]


def test_timestep_order_noisiest_first():
    d = Diffusion(SamplerConfig("ddim", 50))
    assert d.model_timestep(0) == 999 and d.model_timestep(49) == 0


@pytest.mark.parametrize("kw, match", [(dict(steps=0), "--steps must be at least 1, got 0"),
                                       (dict(kind="euler"), "unknown sampler 'euler'; choose one of: ddim"),
                                       (dict(cfg_scale=0.5), "--cfg-scale must be >= 1"),
                                       (dict(steps=1001), "--steps 1001 exceeds the 1000 training timesteps")])
def test_bad_sampler_config_is_a_user_error(kw, match):
    with pytest.raises(UserError, match=match):
        SamplerConfig(**kw)


def test_ddim_step_recovers_x0_from_exact_eps():
    """With the true noise as eps, DDIM's last step lands on x0."""
    d = Diffusion(SamplerConfig("ddim", 10))
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    s = d.num_steps - 1
    ac = d.alphas_cumprod[0]
    xt = (np.sqrt(ac) * x0 + np.sqrt(1 - ac) * eps).astype(np.float32)
    out = d.step(s, xt, np.concatenate([eps, np.zeros_like(eps)], axis=1))
    np.testing.assert_allclose(out, x0, atol=1e-5)
