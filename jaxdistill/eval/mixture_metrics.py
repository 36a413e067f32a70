"""Metrics that show blur (or collapse), not only distance, for samples of an analytic mixture.

Sliced Wasserstein and mode coverage can look fine while every component is several times too
wide: a few-step student that lands near the right mode but spreads around it. These metrics are
pure functions of (mixture, samples[, key]) on an isotropic `GaussianMixture`
p0 = sum_k w_k N(mu_k, s_k^2 I) in D = prod(shape) dimensions:

- `log_likelihood_gap`: E_p0[log p0] - mean log p0(samples) in nats (total and per dimension),
  estimated with many fresh true samples. 0 for exact samples; for samples of the same mixture
  with every std scaled by c (well-separated components) it is D (c^2 - 1) / 2, since
  E||x - mu||^2 / s^2 is D c^2 instead of D and the normaliser is the same. Negative: the
  samples are too concentrated (collapse onto the means), not better than the data.
- `spread_ratios`: per component, the RMS distance per dimension of the samples assigned to it
  (most likely component) from its mean, over its std: sqrt(mean ||x - mu_k||^2 / (D s_k^2)).
  1 for exact samples of well-separated components, c for stds scaled by c.
- `outside_share`: share of samples outside every component's `level` region
  ||x - mu_k||^2 / s_k^2 <= chi2_D quantile(level): 1 - level for exact samples of
  well-separated components.
- `weight_ratios`: p_hat_k / w_k, p_hat the share of samples assigned to component k.
- `sliced_wasserstein_baseline`: the sliced Wasserstein distance between two independent sets of
  true samples of the same size with the same projections: the noise floor the row's distance
  is compared with.

`blur_metrics` bundles them (keyed like `mixtures.exact_metrics`, so with the same key its
`sliced_wasserstein` is the row's). Log-likelihoods, assignments and the sliced Wasserstein
distance are `jaxdistill.data.mixtures`' own functions.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from scipy import stats

from jaxdistill.data import mixtures

NUM_REFERENCE = 100_000   # true samples behind the reference log-likelihood
MIN_COUNT = 10            # samples a component needs for its spread ratio


def _flat(mix, x):
    xf = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
    return xf, np.asarray(mix.means, np.float64).reshape(mix.num_components, -1)


def scaled_distances(mix: mixtures.GaussianMixture, samples) -> np.ndarray:
    """||x - mu_k||^2 / s_k^2 for every sample and component, (N, K), in float64."""
    xf, mf = _flat(mix, samples)
    sq = np.sum(xf**2, 1)[:, None] - 2 * xf @ mf.T + np.sum(mf**2, 1)[None, :]
    return np.maximum(sq, 0.0) / np.asarray(mix.stds, np.float64)[None, :] ** 2


def assignments(mix: mixtures.GaussianMixture, samples) -> np.ndarray:
    """Each sample's most likely component (the posterior argmax, as `mixtures.mode_coverage`)."""
    return np.asarray(np.argmax(np.asarray(mixtures.component_log_probs(mix, samples)), axis=1))


def log_likelihood_gap(mix: mixtures.GaussianMixture, samples, key: jax.Array,
                       num_reference: int = NUM_REFERENCE) -> dict[str, float]:
    """Mean log p0 of `num_reference` fresh true samples minus that of `samples` (nats), per
    dimension too, with the standard error of the difference."""
    ll = np.asarray(mixtures.log_prob(mix, samples), np.float64)
    ref = np.asarray(mixtures.log_prob(mix, mixtures.sample(mix, key, num_reference)[0]),
                     np.float64)
    gap = float(ref.mean() - ll.mean())
    dim = math.prod(mix.shape)
    return {"true_log_likelihood": float(ref.mean()), "log_likelihood_gap": gap,
            "log_likelihood_gap_per_dim": gap / dim,
            "log_likelihood_gap_stderr": float(math.sqrt(ll.var() / ll.size
                                                         + ref.var() / ref.size))}


def spread_ratios(mix: mixtures.GaussianMixture, samples, min_count: int = MIN_COUNT):
    """(K,) sqrt(mean ||x - mu_k||^2 / (D s_k^2)) over the samples assigned to component k; NaN
    for a component with fewer than `min_count` samples."""
    d2 = scaled_distances(mix, samples)
    assign = assignments(mix, samples)
    dim = math.prod(mix.shape)
    out = np.full(mix.num_components, np.nan)
    for k in range(mix.num_components):
        mine = d2[assign == k, k]
        if mine.size >= min_count:
            out[k] = math.sqrt(mine.mean() / dim)
    return out


def chi2_quantile(level: float, dim: int) -> float:
    return float(stats.chi2.ppf(level, dim))


def outside_share(mix: mixtures.GaussianMixture, samples, level: float = 0.999) -> float:
    """Share of samples with ||x - mu_k||^2 / s_k^2 > chi2_D quantile(level) for every k."""
    q = chi2_quantile(level, math.prod(mix.shape))
    return float(np.mean(np.min(scaled_distances(mix, samples), axis=1) > q))


def weight_ratios(mix: mixtures.GaussianMixture, samples) -> np.ndarray:
    """(K,) share of samples assigned to component k over its weight w_k."""
    frac, _, _ = mixtures.mode_coverage(mix, samples)
    return np.asarray(frac, np.float64) / np.asarray(mix.weights, np.float64)


def baseline_keys(key: jax.Array):
    """(baseline key, projection key) that `blur_metrics(..., key)` uses."""
    return jax.random.split(jax.random.fold_in(key, 1))[1], jax.random.split(key)[1]


def sliced_wasserstein_baseline(mix: mixtures.GaussianMixture, n: int, key: jax.Array,
                                k_proj: jax.Array, repeats: int = 4) -> float:
    """Mean over `repeats` pairs of independent n-sample true sets of their sliced Wasserstein
    distance under the projections of `k_proj`."""
    vals = []
    for r in range(repeats):
        ka, kb = jax.random.split(jax.random.fold_in(key, r))
        vals.append(float(mixtures.sliced_wasserstein(
            k_proj, mixtures.sample(mix, ka, n)[0], mixtures.sample(mix, kb, n)[0])))
    return float(np.mean(vals))


def blur_metrics(mix: mixtures.GaussianMixture, samples, key: jax.Array,
                 level: float = 0.999, baseline: float | None = None) -> dict[str, float]:
    """All of the above for one sample set. `key` is split as in `mixtures.exact_metrics` (same
    reference set and projections), so `sliced_wasserstein` equals that function's value.
    `baseline`: the sliced Wasserstein baseline when already known (it depends only on the
    mixture, the sample count and `key`: one per table of rows scored with one key)."""
    k_ref, k_proj = jax.random.split(key)
    k_ll, k_base = jax.random.split(jax.random.fold_in(key, 1))  # as baseline_keys
    n = np.shape(samples)[0]
    reference, _ = mixtures.sample(mix, k_ref, n)
    sw = float(mixtures.sliced_wasserstein(k_proj, samples, reference))
    base = (sliced_wasserstein_baseline(mix, n, k_base, k_proj) if baseline is None
            else float(baseline))
    spread = spread_ratios(mix, samples)
    has = np.isfinite(spread)
    weights = weight_ratios(mix, samples)
    # max_k max(r_k, 1 / r_k) = max(max r, 1 / min r); infinite when a component gets nothing
    worst = float(max(weights.max(), 1 / weights.min())) if weights.min() > 0 else math.inf
    return {
        **log_likelihood_gap(mix, samples, k_ll),
        "spread_ratio_mean": float(spread[has].mean()) if has.any() else float("nan"),
        "spread_ratio_min": float(spread[has].min()) if has.any() else float("nan"),
        "spread_ratio_max": float(spread[has].max()) if has.any() else float("nan"),
        "outside_share": outside_share(mix, samples, level),
        "weight_ratio_min": float(weights.min()),
        "weight_ratio_max": float(weights.max()),
        "weight_ratio_worst": worst,
        "sliced_wasserstein": sw,
        "sliced_wasserstein_baseline": base,
        "sliced_wasserstein_ratio": sw / base,
    }
