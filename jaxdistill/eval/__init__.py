"""Quality metrics of generated samples that need no downloaded weights.

Analytic mixtures get the exact metrics (log-likelihood under p0, mode coverage, sliced
Wasserstein to fresh p0 samples); other embedded data (digits) get the sliced Wasserstein distance
to an equal number of data examples.
"""
from __future__ import annotations

import jax
import numpy as np

from jaxdistill import data
from jaxdistill.data import mixtures


def sample_metrics(data_cfg, samples: np.ndarray, key: jax.Array) -> dict[str, float]:
    spec = data.spec(data_cfg)
    if spec.mixture is not None:
        return mixtures.exact_metrics(spec.mixture, samples, key)
    k_ref, k_proj = jax.random.split(key)
    reference = data.reference_samples(data_cfg, samples.shape[0], k_ref)
    if reference is None:
        return {}
    n = min(len(reference), samples.shape[0])
    return {"sliced_wasserstein": float(mixtures.sliced_wasserstein(k_proj, samples[:n],
                                                                    reference[:n]))}
