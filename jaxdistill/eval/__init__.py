"""Quality metrics of generated samples.

Analytic mixtures get the exact metrics (log-likelihood under p0, mode coverage, sliced
Wasserstein to fresh p0 samples); the embedded digits get the sliced Wasserstein distance to an
equal number of data examples and FD_digits (Fréchet distance in a small digits classifier's
features, eval/digits_fd.py) to all of them; TFDS image data sets get FID, Inception Score and
precision / recall (eval/image_metrics.py) when `config.eval.inception_weights` names the FID
Inception weights file and `config.eval.ref_stats` the reference statistics, else nothing.
"""
from __future__ import annotations

import jax
import numpy as np
from absl import logging

from jaxdistill import data
from jaxdistill.data import digits, mixtures


def check_files(config) -> None:
    """Before sampling: fail fast if the configured Inception weights / reference stats are
    missing (no-op when no Inception metric is configured)."""
    if config.eval.inception_weights and data.spec(config.data).mixture is None \
            and config.data.name != "digits":
        from jaxdistill.eval import image_metrics

        image_metrics.check_files(config.eval)


def sample_metrics(config, samples: np.ndarray, key: jax.Array) -> dict[str, float]:
    data_cfg = config.data
    spec = data.spec(data_cfg)
    if spec.mixture is not None:
        return mixtures.exact_metrics(spec.mixture, samples, key)
    if data_cfg.name == "digits":
        from jaxdistill.eval import digits_fd

        k_ref, k_proj = jax.random.split(key)
        reference = data.reference_samples(data_cfg, samples.shape[0], k_ref)
        n = min(len(reference), samples.shape[0])
        images, _ = digits.load_digits(data_cfg.get("resolution", 8))
        return {"sliced_wasserstein": float(mixtures.sliced_wasserstein(k_proj, samples[:n],
                                                                        reference[:n])),
                "fd_digits": digits_fd.fd_digits(samples, images)}
    if config.eval.inception_weights:
        from jaxdistill.eval import image_metrics

        return image_metrics.inception_metrics(config, samples)
    logging.warning("no sample metrics for config.data.name=%r: set config.eval.inception_weights "
                    "and config.eval.ref_stats for FID / IS / precision-recall", data_cfg.name)
    return {}
