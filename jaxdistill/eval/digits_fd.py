"""FD_digits: Fréchet distance in the feature space of a small classifier of the embedded digits.

The FID recipe (Heusel et al. 2017) with the Inception network replaced by an MLP trained here on
scikit-learn's 8x8 digits (jaxdistill.data.digits; no download): features are the 64-d
penultimate layer before its ReLU (no dead units, so the covariances have full rank), distances
`fid.frechet_distance` of float64 Gaussian fits. The classifier is trained deterministically
(fixed split, init and full-batch AdamW; a few seconds on a CPU) at the resolution of the
samples, on 80% of the 1797 images; the other 20% measure its accuracy.
Numbers are comparable only between runs at the same resolution (and this code version).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdistill.data import digits
from jaxdistill.eval import fid

FEATURE_DIM = 64
TRAIN_STEPS = 500
TEST_FRACTION = 0.2


class DigitsClassifier(nn.Module):
    """MLP on (N, H, W, 1) images in [-1, 1]; returns (features (N, 64), logits (N, 10))."""

    @nn.compact
    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(256)(h))
        features = nn.Dense(FEATURE_DIM)(h)
        return features, nn.Dense(10)(nn.relu(features))


def split(resolution: int):
    """(train images, train labels, test images, test labels): a fixed 80 / 20 split."""
    images, labels = digits.load_digits(resolution)
    perm = np.random.default_rng(0).permutation(len(images))
    n_test = int(len(images) * TEST_FRACTION)
    test, train = perm[:n_test], perm[n_test:]
    return images[train], labels[train], images[test], labels[test]


@functools.lru_cache(maxsize=4)
def trained_classifier(resolution: int = 8):
    """(params, test accuracy) of the classifier at `resolution`; trained once per process."""
    x, y, x_test, y_test = split(resolution)
    model = DigitsClassifier()
    params = model.init(jax.random.key(0), x[:1])["params"]
    opt = optax.adamw(1e-3, weight_decay=1e-4)

    def loss_fn(p):
        _, logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, _):
        p, s = carry
        grads = jax.grad(loss_fn)(p)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    train = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, TRAIN_STEPS)[0][0])
    params = train(params)
    _, logits = model.apply({"params": params}, x_test)
    accuracy = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y_test))
    return params, accuracy


def digit_features(images, resolution: int | None = None) -> np.ndarray:
    """64-d classifier features of (N, H, W, 1) images (clipped to [-1, 1], as saved images)."""
    images = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    resolution = resolution or images.shape[1]
    params, _ = trained_classifier(resolution)
    feats, _ = jax.jit(DigitsClassifier().apply)({"params": params}, images)
    return np.asarray(feats)


def fd_digits(samples, reference) -> float:
    """Fréchet distance between digit samples and reference images in classifier features."""
    if np.shape(samples)[1:] != np.shape(reference)[1:]:
        raise ValueError(f"samples {np.shape(samples)} and reference {np.shape(reference)} "
                         f"differ in image shape")
    mu1, s1 = fid.feature_stats(digit_features(samples))
    mu2, s2 = fid.feature_stats(digit_features(reference))
    return fid.frechet_distance(mu1, s1, mu2, s2)
