"""Formula tests: preconditioning, grids and schedule conversions against hand-derived values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import diffusion


def test_edm_precond_hand_values():
    # sigma = sigma_data = 0.5: total = 0.5, c_skip = 0.25/0.5, c_out = 0.25/sqrt(.5), c_in = 1/sqrt(.5)
    c_skip, c_out, c_in, c_noise = diffusion.edm_precond(jnp.array(0.5), 0.5)
    np.testing.assert_allclose(c_skip, 0.5, rtol=1e-6)
    np.testing.assert_allclose(c_out, 0.25 / math.sqrt(0.5), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / math.sqrt(0.5), rtol=1e-6)
    np.testing.assert_allclose(c_noise, math.log(0.5) / 4, rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.002, 0.3, 2.0, 80.0])
def test_edm_precond_unit_variance_and_weight(sigma):
    # With x0 of std sigma_data, the network input c_in (x0 + sigma n) has unit variance and the
    # effective target (x0 - c_skip x) / c_out too (EDM Appendix B.6); the loss weight is 1/c_out^2.
    sd = 0.5
    c_skip, c_out, c_in, _ = diffusion.edm_precond(jnp.array(sigma), sd)
    np.testing.assert_allclose(c_in**2 * (sd**2 + sigma**2), 1.0, rtol=1e-5)
    target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2
    np.testing.assert_allclose(target_var, 1.0, rtol=1e-4)
    np.testing.assert_allclose(diffusion.edm_loss_weight(jnp.array(sigma), sd) * c_out**2, 1.0,
                               rtol=1e-5)


def test_karras_grid_endpoints_and_rho_spacing():
    s = diffusion.karras_sigmas(18, 0.002, 80.0, 7.0)
    assert s.shape == (19,) and s[-1] == 0
    np.testing.assert_allclose([s[0], s[17]], [80.0, 0.002], rtol=1e-5)
    # sigma^(1/rho) is evenly spaced.
    root = np.asarray(s[:-1]) ** (1 / 7)
    np.testing.assert_allclose(np.diff(root), np.full(17, (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17),
                               rtol=1e-4)
    assert np.all(np.diff(np.asarray(s)) < 0)
    assert diffusion.karras_sigmas(1, append_zero=False).tolist() == [80.0]


def test_lognormal_sigma_moments():
    s = diffusion.sample_lognormal_sigma(jax.random.key(0), (200_000,), -1.2, 1.2)
    logs = np.log(np.asarray(s))
    assert abs(logs.mean() + 1.2) < 0.01 and abs(logs.std() - 1.2) < 0.01


def test_consistency_boundary():
    c_skip, c_out = diffusion.consistency_boundary(jnp.array(0.002), 0.002, 0.5)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    c_skip, c_out = diffusion.consistency_boundary(jnp.array(80.0), 0.002, 0.5)
    assert float(c_skip) < 1e-4 and abs(float(c_out) - 0.5) < 1e-3


def test_vp_ve_conversions_round_trip():
    sigma = jnp.array([0.01, 0.5, 3.0, 80.0])
    alpha, s = diffusion.alpha_sigma_from_logsnr(diffusion.logsnr_from_sigma(sigma))
    np.testing.assert_allclose(alpha**2 + s**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(s / alpha, sigma, rtol=1e-5)
    np.testing.assert_allclose(alpha, 1 / np.sqrt(1 + np.asarray(sigma) ** 2), rtol=1e-5)
    x = jnp.ones((4, 3))
    z, a, b = diffusion.vp_from_ve(x, sigma)
    x_back, sigma_back = diffusion.ve_from_vp(z, a, b)
    np.testing.assert_allclose(x_back, x, rtol=1e-5)
    np.testing.assert_allclose(sigma_back, sigma, rtol=1e-5)
    np.testing.assert_allclose(diffusion.sigma_from_logsnr(diffusion.logsnr_from_sigma(sigma)),
                               sigma, rtol=1e-5)


def test_vp_linear_schedule_hand_value_and_inverse():
    # EDM Table 1: sigma(t) = sqrt(exp(0.5 beta_d t^2 + beta_min t) - 1); at t = 1: exp(10.05) - 1.
    np.testing.assert_allclose(diffusion.vp_linear_sigma(jnp.array(1.0)), math.sqrt(math.exp(10.05) - 1),
                               rtol=1e-5)
    t = jnp.linspace(1e-3, 1.0, 7)
    np.testing.assert_allclose(diffusion.vp_linear_time(diffusion.vp_linear_sigma(t)), t, rtol=1e-4)


def test_cosine_schedule_endpoints_midpoint_and_inverse():
    np.testing.assert_allclose(diffusion.cosine_logsnr(jnp.array([0.0, 1.0])), [20.0, -20.0],
                               rtol=1e-4)
    # Without clipping (limits -> +-inf) alpha_t = cos(pi t / 2): logSNR(1/2) = 0.
    np.testing.assert_allclose(diffusion.cosine_logsnr(jnp.array(0.5), -80.0, 80.0), 0.0, atol=1e-5)
    t = jnp.linspace(0.05, 0.95, 5)
    lam = diffusion.cosine_logsnr(t, -80.0, 80.0)
    alpha, _ = diffusion.alpha_sigma_from_logsnr(lam)
    np.testing.assert_allclose(alpha, np.cos(np.pi * np.asarray(t) / 2), rtol=1e-5)
    np.testing.assert_allclose(diffusion.cosine_time(diffusion.cosine_logsnr(t)), t, rtol=1e-4)
