"""Samplers against closed forms: the probability-flow ODE of a single Gaussian is solvable."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import diffusion, samplers
from jaxdistill.data import mixtures

MU, S = 0.7, 0.5


def gaussian_denoise(x, sigma):
    """Exact E[x0 | x_sigma] for x0 ~ N(MU, S^2 I)."""
    shrink = S**2 / (S**2 + diffusion.expand_to(sigma, x) ** 2)
    return MU + shrink * (x - MU)


def exact_flow(x, sigma_from, sigma_to):
    """PF-ODE solution: x(sigma') = mu + (x - mu) sqrt(s^2 + sigma'^2) / sqrt(s^2 + sigma^2)."""
    return MU + (x - MU) * np.sqrt(S**2 + sigma_to**2) / np.sqrt(S**2 + sigma_from**2)


@pytest.fixture(scope="module")
def x_T():
    return 80.0 * jax.random.normal(jax.random.key(0), (256, 3))


def _ode_error(sampler, x_T, n):
    sigmas = diffusion.karras_sigmas(n, append_zero=False)
    out = jax.jit(lambda x: sampler(gaussian_denoise, x, sigmas))(x_T)
    return float(jnp.max(jnp.abs(out - exact_flow(x_T, 80.0, float(sigmas[-1])))))


def test_heun_matches_closed_form_and_is_second_order(x_T):
    errors = [_ode_error(samplers.heun, x_T, n) for n in (17, 33, 65, 129)]
    assert errors[-1] < 2e-3, errors  # values are O(1) at sigma_min; x_T is O(80)
    # Halving the step (in the rho-warped variable) divides a 2nd-order global error by ~4.
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > 1.7), (errors, orders)


def test_euler_is_first_order(x_T):
    errors = [_ode_error(samplers.euler, x_T, n) for n in (17, 33, 65)]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders > 0.8) & (orders < 1.3)), (errors, orders)


def test_heun_grid_ending_at_zero_lands_on_x0(x_T):
    # The final Euler step to sigma = 0 returns D(x, sigma_min), the flow's x0 up to O(sigma_min^2).
    out = samplers.heun(gaussian_denoise, x_T, diffusion.karras_sigmas(129))
    np.testing.assert_allclose(out, exact_flow(x_T, 80.0, 0.0), atol=2e-3)


def test_heun_nfe_counts_35_for_18_steps(x_T):
    calls = []

    def counting(x, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return gaussian_denoise(x, sigma)

    jax.block_until_ready(samplers.heun(counting, x_T, diffusion.karras_sigmas(18)))
    assert len(calls) == 35


def test_heun_churn_is_stochastic_and_keyed(x_T):
    sig = diffusion.karras_sigmas(18)
    a = samplers.heun(gaussian_denoise, x_T, sig, jax.random.key(1), s_churn=40.0, s_min=0.05,
                      s_max=50.0)
    b = samplers.heun(gaussian_denoise, x_T, sig, jax.random.key(1), s_churn=40.0, s_min=0.05,
                      s_max=50.0)
    c = samplers.heun(gaussian_denoise, x_T, sig, jax.random.key(2), s_churn=40.0, s_min=0.05,
                      s_max=50.0)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3
    # Still samples the target: mean MU and std S per coordinate.
    big = 80.0 * jax.random.normal(jax.random.key(3), (4000, 2))
    out = samplers.heun(gaussian_denoise, big, diffusion.karras_sigmas(64), jax.random.key(4),
                        s_churn=40.0, s_min=0.05, s_max=50.0)
    assert abs(float(out.mean()) - MU) < 0.03 and abs(float(out.std()) - S) < 0.03


def test_ddim_eta0_equals_euler_and_eta1_samples_target(x_T):
    sig = diffusion.karras_sigmas(25)
    np.testing.assert_allclose(samplers.ddim(gaussian_denoise, x_T, sig),
                               samplers.euler(gaussian_denoise, x_T, sig), rtol=1e-5, atol=1e-5)
    big = 80.0 * jax.random.normal(jax.random.key(5), (20000, 1))
    out = samplers.ddim(gaussian_denoise, big, diffusion.karras_sigmas(256), jax.random.key(6),
                        eta=1.0)
    # Ancestral (DDPM) sampling with the exact denoiser converges to the data distribution as the
    # steps shrink (it drops Var[x0 | x_t] from the reverse kernel, an O(step) error).
    assert abs(float(out.mean()) - MU) < 0.02 and abs(float(out.std()) - S) < 0.02


def test_stochastic_multistep_renoises_between_denoisings(x_T):
    sig = jnp.array([80.0, 1.0, 0.3])
    out = samplers.stochastic_multistep(gaussian_denoise, x_T, sig, jax.random.key(0))
    # By hand: x0 = D(x, 80); x = x0 + 1.0 z1; x0 = D(x, 1); x = x0 + 0.3 z2; x0 = D(x, 0.3).
    k1, k2 = jax.random.split(jax.random.key(0), 2)
    x0 = gaussian_denoise(x_T, jnp.full((256,), 80.0))
    x0 = gaussian_denoise(x0 + jax.random.normal(k1, x0.shape), jnp.full((256,), 1.0))
    x0 = gaussian_denoise(x0 + 0.3 * jax.random.normal(k2, x0.shape), jnp.full((256,), 0.3))
    np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-5)


def test_classifier_free_guidance_is_linear_in_scale():
    mix = mixtures.ring2d()
    teacher = mixtures.AnalyticTeacher()
    den = lambda x, s, lab: teacher(mix, x, s, lab)
    x = jax.random.normal(jax.random.key(0), (16, 2))
    sigma = jnp.full((16,), 0.7)
    labels = jax.nn.one_hot(jnp.arange(16) % 8, 8)
    cond, uncond = den(x, sigma, labels), den(x, sigma, None)
    np.testing.assert_allclose(samplers.classifier_free_guidance(den, 1.0)(x, sigma, labels), cond,
                               atol=1e-5)
    np.testing.assert_allclose(samplers.classifier_free_guidance(den, 0.0)(x, sigma, labels), uncond,
                               atol=1e-5)
    np.testing.assert_allclose(samplers.classifier_free_guidance(den, 3.0)(x, sigma, labels),
                               uncond + 3.0 * (cond - uncond), atol=1e-4)
