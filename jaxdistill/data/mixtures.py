"""Isotropic Gaussian mixtures: data with an exact teacher and exact quality metrics.

For p0 = sum_k w_k N(mu_k, s_k^2 I) the data noised to level sigma is
p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I), so the ideal denoiser is closed form:
    E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
with posterior responsibilities r_k(x) proportional to w_k N(x; mu_k, (s_k^2 + sigma^2) I), and the
score is (E[x0 | x] - x) / sigma^2 (Tweedie). `AnalyticTeacher` exposes this denoiser with the call
signature of a trained network teacher, so every method can distill it and its error is
measurable by exact log-likelihood, mode coverage and sliced Wasserstein distance.
"""
from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.data import digits


@flax.struct.dataclass
class GaussianMixture:
    """means (K, *shape), stds (K,), weights (K,) summing to 1. A pytree: it is the teacher's params."""
    means: jax.Array
    stds: jax.Array
    weights: jax.Array

    @property
    def shape(self):
        return tuple(self.means.shape[1:])

    @property
    def num_components(self):
        return self.means.shape[0]


def ring2d(num_modes: int = 8, radius: float = 1.0, std: float = 0.08,
           weights=None) -> GaussianMixture:
    """Modes evenly spaced on a circle; the default 2-D benchmark."""
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    w = np.full(num_modes, 1.0 / num_modes) if weights is None else np.asarray(weights, float)
    return GaussianMixture(jnp.asarray(means, jnp.float32), jnp.full((num_modes,), std, jnp.float32),
                           jnp.asarray(w / w.sum(), jnp.float32))


def digit_mixture(resolution: int = 8, std: float = 0.2) -> GaussianMixture:
    """One component per digit class: mean image of the class, class frequency as weight."""
    images, labels = digits.load_digits(resolution)
    means = np.stack([images[labels == k].mean(0) for k in range(10)])
    counts = np.bincount(labels, minlength=10).astype(np.float64)
    return GaussianMixture(jnp.asarray(means, jnp.float32), jnp.full((10,), std, jnp.float32),
                           jnp.asarray(counts / counts.sum(), jnp.float32))


def _flat(mix: GaussianMixture, x: jax.Array):
    return x.reshape(x.shape[0], -1), mix.means.reshape(mix.num_components, -1)


def component_log_probs(mix: GaussianMixture, x: jax.Array, sigma=0.0) -> jax.Array:
    """log w_k + log N(x; mu_k, (s_k^2 + sigma^2) I) for every sample and component: (N, K)."""
    xf, mf = _flat(mix, x)
    dim = xf.shape[1]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (xf.shape[0],))
    var = mix.stds[None, :] ** 2 + sigma[:, None] ** 2
    sq = (jnp.sum(xf**2, 1)[:, None] - 2 * xf @ mf.T + jnp.sum(mf**2, 1)[None, :])
    sq = jnp.maximum(sq, 0.0)
    return jnp.log(mix.weights)[None] - 0.5 * (sq / var + dim * jnp.log(2 * math.pi * var))


def log_prob(mix: GaussianMixture, x: jax.Array, sigma=0.0) -> jax.Array:
    return jax.nn.logsumexp(component_log_probs(mix, x, sigma), axis=1)


def denoise(mix: GaussianMixture, x: jax.Array, sigma: jax.Array, labels=None) -> jax.Array:
    """E[x0 | x_sigma] (and E[x0 | x_sigma, k] when one-hot `labels` pick the component)."""
    xf, mf = _flat(mix, x)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (xf.shape[0],))
    logits = component_log_probs(mix, x, sigma)
    if labels is not None:
        # A zero label vector is the null condition (classifier-free guidance): no restriction.
        has_label = jnp.sum(labels, axis=1, keepdims=True) > 0
        logits = jnp.where(has_label, jnp.where(labels > 0, logits, -jnp.inf), logits)
    resp = jax.nn.softmax(logits, axis=1)                              # (N, K)
    shrink = mix.stds[None] ** 2 / (mix.stds[None] ** 2 + sigma[:, None] ** 2)  # (N, K)
    # sum_k r_k (mu_k + shrink_k (x - mu_k)) = sum_k r_k (1 - shrink_k) mu_k + (sum_k r_k shrink_k) x
    x0 = (resp * (1 - shrink)) @ mf + jnp.sum(resp * shrink, 1, keepdims=True) * xf
    return x0.reshape(x.shape)


def score(mix: GaussianMixture, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """grad_x log p_sigma(x) = (E[x0 | x] - x) / sigma^2."""
    return (denoise(mix, x, sigma) - x) / jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1)) ** 2


def sample(mix: GaussianMixture, key: jax.Array, n: int, labels: jax.Array | None = None):
    """n exact samples of p0 and their component indices (given `labels` fixes the components)."""
    k_comp, k_noise = jax.random.split(key)
    comp = (jax.random.categorical(k_comp, jnp.log(mix.weights), shape=(n,))
            if labels is None else jnp.asarray(labels, jnp.int32))
    noise = jax.random.normal(k_noise, (n,) + mix.shape)
    std = mix.stds[comp].reshape((n,) + (1,) * len(mix.shape))
    return mix.means[comp] + std * noise, comp


class AnalyticTeacher:
    """The exact denoiser with a trained teacher's call signature.

    `teacher(variables, x, sigma, labels=None, **unused)` where `variables` is the
    `GaussianMixture` (the frozen teacher "params"); extra keywords a network takes (train, rng,
    ...) are accepted and ignored, so it plugs in wherever a network denoiser does.
    """

    def __call__(self, variables: GaussianMixture, x, sigma, labels=None, **unused):
        return denoise(variables, x, sigma, labels)


# ----------------------------------------------------------------------------------------------
# Exact metrics.

def mode_coverage(mix: GaussianMixture, x: jax.Array):
    """Fraction of samples assigned (by posterior at sigma=0) to each component vs its weight.

    Returns (fractions (K,), total variation distance to the weights, number of components that
    received at least a quarter of their expected share).
    """
    assign = jnp.argmax(component_log_probs(mix, x), axis=1)
    frac = jnp.bincount(assign, length=mix.num_components) / x.shape[0]
    tv = 0.5 * jnp.sum(jnp.abs(frac - mix.weights))
    covered = jnp.sum(frac >= 0.25 * mix.weights)
    return frac, tv, covered


def sliced_wasserstein(key: jax.Array, x: jax.Array, y: jax.Array, num_projections: int = 256):
    """Sliced 2-Wasserstein distance between two equal-size sample sets (flattened).

    sqrt(E_theta W2^2(theta^T x, theta^T y)) with theta uniform on the sphere; 1-D W2 between
    empirical measures of equal size is the distance between sorted projections.
    """
    xf, yf = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if xf.shape != yf.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {xf.shape} and {yf.shape}")
    theta = jax.random.normal(key, (xf.shape[1], num_projections))
    theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
    px, py = jnp.sort(xf @ theta, axis=0), jnp.sort(yf @ theta, axis=0)
    return jnp.sqrt(jnp.mean((px - py) ** 2))


def exact_metrics(mix: GaussianMixture, samples: jax.Array, key: jax.Array) -> dict[str, float]:
    """Mean log-likelihood under p0, mode coverage, and sliced W2 to fresh p0 samples."""
    k_ref, k_proj = jax.random.split(key)
    reference, _ = sample(mix, k_ref, samples.shape[0])
    _, tv, covered = mode_coverage(mix, samples)
    ll = log_prob(mix, samples)
    return {
        "log_likelihood": float(jnp.mean(ll)),
        "log_likelihood_stderr": float(jnp.std(ll) / math.sqrt(samples.shape[0])),
        "mode_tv": float(tv),
        "modes_covered": int(covered),
        "num_modes": int(mix.num_components),
        "sliced_wasserstein": float(sliced_wasserstein(k_proj, samples, reference)),
    }
