"""Isotropic Gaussian mixtures: data with an exact teacher and exact quality metrics.

For p0 = sum_k w_k N(mu_k, s_k^2 I) the data noised to level sigma is
p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I), so the ideal denoiser is closed form:
    E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
with posterior responsibilities r_k(x) proportional to w_k N(x; mu_k, (s_k^2 + sigma^2) I), and the
score is (E[x0 | x] - x) / sigma^2 (Tweedie). `AnalyticTeacher` exposes this denoiser with the call
signature of a trained network teacher, so every method can distill it and its error is
measurable by exact log-likelihood, mode coverage and sliced Wasserstein distance.

A component may carry a class (`classes`, e.g. several components per class); without it each
component is its own class. `load_file` builds a mixture from a user's `.npz` / `.json` file
(`config.data.name='mixture'`), `save_file` writes one.
"""
from __future__ import annotations

import dataclasses

import json
import math
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.data import digits


@flax.struct.dataclass
class GaussianMixture:
    """means (K, *shape), stds (K,), weights (K,) summing to 1. A pytree: it is the teacher's params.

    `classes` (static, a tuple of K ints using every class 0..C-1) is the class of each component;
    None means component k is class k. Class labels (batches' 'label', one-hot conditioning of the
    denoiser, `sample(labels=...)`) are classes, so several components can share one.
    """
    means: jax.Array
    stds: jax.Array
    weights: jax.Array
    classes: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def shape(self):
        return tuple(self.means.shape[1:])

    @property
    def num_components(self):
        return self.means.shape[0]

    @property
    def num_classes(self) -> int:
        return self.num_components if self.classes is None else max(self.classes) + 1


def class_of(mix: GaussianMixture, comp: jax.Array) -> jax.Array:
    """The class of each component index in `comp`."""
    return comp if mix.classes is None else jnp.asarray(mix.classes, jnp.int32)[comp]


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
    """E[x0 | x_sigma] (and E[x0 | x_sigma, class c] when one-hot `labels` (N, num_classes) pick
    a class: the posterior over that class's components)."""
    xf, mf = _flat(mix, x)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (xf.shape[0],))
    logits = component_log_probs(mix, x, sigma)
    if labels is not None:
        # A zero label vector is the null condition (classifier-free guidance): no restriction.
        has_label = jnp.sum(labels, axis=1, keepdims=True) > 0
        comp_labels = labels if mix.classes is None else labels[:, np.asarray(mix.classes)]
        logits = jnp.where(has_label, jnp.where(comp_labels > 0, logits, -jnp.inf), logits)
    resp = jax.nn.softmax(logits, axis=1)                              # (N, K)
    shrink = mix.stds[None] ** 2 / (mix.stds[None] ** 2 + sigma[:, None] ** 2)  # (N, K)
    # sum_k r_k (mu_k + shrink_k (x - mu_k)) = sum_k r_k (1 - shrink_k) mu_k + (sum_k r_k shrink_k) x
    x0 = (resp * (1 - shrink)) @ mf + jnp.sum(resp * shrink, 1, keepdims=True) * xf
    return x0.reshape(x.shape)


def score(mix: GaussianMixture, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """grad_x log p_sigma(x) = (E[x0 | x] - x) / sigma^2."""
    return (denoise(mix, x, sigma) - x) / jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1)) ** 2


def sample(mix: GaussianMixture, key: jax.Array, n: int, labels: jax.Array | None = None):
    """n exact samples of p0 and their component indices (`class_of` gives their classes).

    Given class `labels` (n,), sample k draws from its class's components only (by weight).
    """
    k_comp, k_noise = jax.random.split(key)
    if labels is None:
        comp = jax.random.categorical(k_comp, jnp.log(mix.weights), shape=(n,))
    elif mix.classes is None:
        comp = jnp.asarray(labels, jnp.int32)
    else:
        member = jnp.asarray(labels, jnp.int32)[:, None] == jnp.asarray(mix.classes)[None]
        comp = jax.random.categorical(
            k_comp, jnp.where(member, jnp.log(mix.weights)[None], -jnp.inf), axis=1)
    noise = jax.random.normal(k_noise, (n,) + mix.shape)
    std = mix.stds[comp].reshape((n,) + (1,) * len(mix.shape))
    return mix.means[comp] + std * noise, comp


@dataclasses.dataclass(frozen=True)
class AnalyticTeacher:
    """The exact denoiser with a trained teacher's call signature.

    `teacher(variables, x, sigma, labels=None, **unused)` where `variables` is the
    `GaussianMixture` (the frozen teacher "params"); extra keywords a network takes (train, rng,
    ...) are accepted and ignored, so it plugs in wherever a network denoiser does.
    """

    def __call__(self, variables: GaussianMixture, x, sigma, labels=None, **unused):
        return denoise(variables, x, sigma, labels)


# ----------------------------------------------------------------------------------------------
# Mixture files: a user's own analytic mixture (config.data.name='mixture').

FILE_KEYS = ("means", "stds", "weights", "classes")
FILE_FORMAT = ("means (K, D) or (K, H, W, C), stds (K,) > 0, weights (K,) > 0 (normalised on "
               "load), optional classes (K,) integers")


def load_file(path: str, field: str = "config.data.mixture_file") -> GaussianMixture:
    """The `GaussianMixture` of an `.npz` (named arrays) or `.json` (an object of nested lists)
    file with keys means, stds, weights and optionally classes (see `FILE_FORMAT`).

    A missing file raises FileNotFoundError, anything else wrong ValueError: one line starting
    `{field}={path}: ` that names the offending key.
    """
    where = f"{field}={path}"
    if not path:
        raise ValueError(f"{field} is empty: config.data.name='mixture' reads the mixture from an "
                         f".npz or .json file holding {FILE_FORMAT}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npz", ".json"):
        raise ValueError(f"{where}: the file must end in .npz or .json, not {ext or 'nothing'!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: no such file: give the path of an {ext} file holding "
                                f"{FILE_FORMAT}")
    if not os.path.isfile(path):
        raise ValueError(f"{where}: is not a file")
    try:
        if ext == ".json":
            with open(path) as f:
                raw = json.load(f)
            if not isinstance(raw, dict):
                raise ValueError(f"the top level is a {type(raw).__name__}, not an object with "
                                 "keys means, stds, weights")
        else:
            npz = np.load(path, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):  # an .npy file under another name
                raise ValueError("it holds one array, not named arrays")
            with npz:
                raw = {k: npz[k] for k in npz.files}
    except Exception as e:  # noqa: BLE001 -- any failure to read is the file's problem
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{where}: cannot read the file as {ext} ({reason}): it must hold "
                         f"{FILE_FORMAT}") from e
    missing = [k for k in FILE_KEYS[:3] if k not in raw]
    if missing:
        raise ValueError(f"{where}: {', '.join(missing)} missing (the file has "
                         f"{sorted(raw) or 'no keys'}): it must hold {FILE_FORMAT}")
    unknown = sorted(set(raw) - set(FILE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}: the keys are means, stds, weights "
                         "and optionally classes")

    def array(key):
        try:
            a = np.asarray(raw[key], np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {key} is not a rectangular array of numbers "
                             f"({' '.join(str(e).split())})") from e
        with np.errstate(over="ignore"):
            if not np.all(np.isfinite(a.astype(np.float32))):
                raise ValueError(f"{where}: {key} has non-finite values (NaN / Inf, or beyond "
                                 "float32's range)")
        return a

    means, stds, weights = array("means"), array("stds"), array("weights")
    if means.ndim not in (2, 4) or means.shape[0] == 0 or means.size == 0:
        raise ValueError(f"{where}: means has shape {means.shape}: it must be (K, D) or "
                         "(K, H, W, C) with K >= 1 components")
    k = means.shape[0]
    for key, a in (("stds", stds), ("weights", weights)):
        if a.shape != (k,):
            raise ValueError(f"{where}: {key} has shape {a.shape} but means has {k} components: "
                             f"give one value per component, shape ({k},)")
        if np.any(a.astype(np.float32) <= 0):  # (a positive value below float32's range is 0)
            bad = int(np.argmax(a.astype(np.float32) <= 0))
            raise ValueError(f"{where}: {key} must be positive, but {key}[{bad}] = {a[bad]:g}")
    classes = None
    if "classes" in raw:
        c = array("classes")
        if c.shape != (k,):
            raise ValueError(f"{where}: classes has shape {c.shape} but means has {k} components: "
                             f"give one class per component, shape ({k},)")
        wrong = (c < 0) | (c != np.round(c))
        if np.any(wrong):
            bad = int(np.argmax(wrong))
            raise ValueError(f"{where}: classes must be non-negative integers, but classes[{bad}] "
                             f"= {c[bad]:g}")
        classes = tuple(int(v) for v in c)
        unused = sorted(set(range(max(classes) + 1)) - set(classes))
        if unused:
            raise ValueError(f"{where}: classes must use every class 0..{max(classes)}, but "
                             f"{unused} have no component")
    return GaussianMixture(jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32),
                           jnp.asarray(weights / weights.sum(), jnp.float32), classes)


def save_file(path: str, mix: GaussianMixture) -> None:
    """Writes `mix` as an `.npz` or `.json` file that `load_file` reads back exactly."""
    arrays = {"means": np.asarray(mix.means), "stds": np.asarray(mix.stds),
              "weights": np.asarray(mix.weights)}
    if mix.classes is not None:
        arrays["classes"] = np.asarray(mix.classes, np.int64)
    if path.lower().endswith(".json"):
        with open(path, "w") as f:  # float32 -> float64 -> repr is exact
            json.dump({k: v.tolist() for k, v in arrays.items()}, f)
    elif path.lower().endswith(".npz"):
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    else:
        raise ValueError(f"{path}: a mixture file must end in .npz or .json")


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
