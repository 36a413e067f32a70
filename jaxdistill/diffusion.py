"""Noise schedules, their conversions, and EDM preconditioning.

Conventions. Everything is expressed in EDM's variance-exploding form x_sigma = x_0 + sigma * eps
(Karras et al. 2022, "Elucidating the Design Space...", Sec. 2). A variance-preserving process
z_t = alpha_t x_0 + s_t eps is the same process rescaled: sigma = s_t / alpha_t and
x_sigma = z_t / alpha_t, so every sampler here works on the VE sigma and the VP/cosine schedules are
only conversions into that sigma. logSNR lambda = log(alpha^2 / s^2) = -2 log(sigma).

Facts (checked against NVlabs/edm: training/networks.py EDMPrecond, training/loss.py EDMLoss,
generate.py edm_sampler; consistency-model boundary from openai/consistency_models_cifar10
jcm/models/utils.py and Song et al. 2023 Sec. 3): sigma_data = 0.5, P_mean = -1.2, P_std = 1.2,
sigma_min = 0.002, sigma_max = 80, rho = 7, VP beta_d = 19.9, beta_min = 0.1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def expand_to(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example vector (N,) to broadcast against x (N, ...)."""
    v = jnp.asarray(v, x.dtype)
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


# ----------------------------------------------------------------------------------------------
# EDM preconditioning, loss weight, training sigmas.

def edm_precond(sigma: jax.Array, sigma_data: float = SIGMA_DATA):
    """EDM's (c_skip, c_out, c_in, c_noise) so that D(x) = c_skip x + c_out F(c_in x, c_noise).

    Chosen so the network's input and training target both have unit variance
    (Karras et al. 2022, Table 1 and Appendix B.6).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / jnp.sqrt(total)
    c_in = 1.0 / jnp.sqrt(total)
    c_noise = jnp.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_lognormal_sigma(key: jax.Array, shape, p_mean: float = -1.2, p_std: float = 1.2):
    """Training sigmas with ln(sigma) ~ N(P_mean, P_std^2) (EDM Table 1)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape))


def sample_karras_position_sigma(key: jax.Array, shape, max_position: float = 0.7,
                                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                                 rho: float = RHO) -> jax.Array:
    """sigma on the continuous Karras curve at position r ~ U[0, max_position] (0 = sigma_max).

    CTM's DSM sampler draws half its sigmas this way (diffusion_mult = 0.7 gives sigma in
    [~0.32, 80]) to train the student's denoiser at large noise (sony/ctm cm/resample.py).
    """
    r = jax.random.uniform(key, shape, maxval=max_position)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + r * (lo - hi)) ** rho


def consistency_boundary(sigma: jax.Array, sigma_min: float = SIGMA_MIN,
                         sigma_data: float = SIGMA_DATA):
    """Consistency-model (c_skip, c_out): c_skip(sigma_min) = 1, c_out(sigma_min) = 0.

    So f(x, sigma_min) = x holds by construction (Song et al. 2023, Appendix C).
    """
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = shifted * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out


# ----------------------------------------------------------------------------------------------
# Discrete sigma grids.

def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO, append_zero: bool = True) -> jax.Array:
    """EDM's grid sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N.

    Decreasing from sigma_max to sigma_min; with `append_zero` a final 0 is added (the sampler's
    last step then lands on the denoised sample), as in NVlabs/edm generate.py.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        sigmas = jnp.array([sigma_max], jnp.float32)
    else:
        ramp = jnp.arange(num_steps, dtype=jnp.float32) / (num_steps - 1)
        lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
    if append_zero:
        sigmas = jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])
    return sigmas


# ----------------------------------------------------------------------------------------------
# Conversions between sigma (VE), (alpha, s) (VP), logSNR and time.

def logsnr_from_sigma(sigma: jax.Array) -> jax.Array:
    return -2.0 * jnp.log(sigma)


def sigma_from_logsnr(logsnr: jax.Array) -> jax.Array:
    return jnp.exp(-0.5 * logsnr)


def alpha_sigma_from_logsnr(logsnr: jax.Array):
    """VP (alpha_t, s_t) with alpha^2 + s^2 = 1 and alpha^2 / s^2 = exp(logsnr)."""
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def vp_from_ve(x_ve: jax.Array, sigma: jax.Array):
    """(z_t, alpha_t, s_t) of the VP process equivalent to x_ve at noise level sigma."""
    alpha, s = alpha_sigma_from_logsnr(logsnr_from_sigma(sigma))
    return expand_to(alpha, x_ve) * x_ve, alpha, s


def ve_from_vp(z: jax.Array, alpha: jax.Array, s: jax.Array):
    """(x_sigma, sigma) from a VP sample z_t = alpha x_0 + s eps."""
    return z / expand_to(alpha, z), s / alpha


def vp_linear_sigma(t: jax.Array, beta_d: float = 19.9, beta_min: float = 0.1) -> jax.Array:
    """DDPM's continuous linear-beta VP schedule as a VE sigma (EDM Table 1, 'VP' column).

    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t in [eps_t, 1].
    """
    return jnp.sqrt(jnp.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_linear_time(sigma: jax.Array, beta_d: float = 19.9, beta_min: float = 0.1) -> jax.Array:
    """Inverse of `vp_linear_sigma`."""
    return (jnp.sqrt(beta_min**2 + 2.0 * beta_d * jnp.log1p(sigma**2)) - beta_min) / beta_d


def cosine_logsnr(t: jax.Array, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
    """Cosine schedule as logSNR(t) = -2 log tan(a t + b), clipped to [logsnr_min, logsnr_max].

    a, b make logSNR(0) = logsnr_max and logSNR(1) = logsnr_min (Salimans & Ho 2022,
    google-research diffusion_distillation/diffusion_distillation/schedules.py, cosine schedule).
    Without clipping this is alpha_t = cos(pi t / 2).
    """
    b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
    a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
    return -2.0 * jnp.log(jnp.tan(a * t + b))


def cosine_time(logsnr: jax.Array, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
    """Inverse of `cosine_logsnr`."""
    b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
    a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
    return (jnp.arctan(jnp.exp(-0.5 * logsnr)) - b) / a
