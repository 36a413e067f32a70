"""Feature-space sample metrics: Fréchet distance (FID), Inception Score, precision / recall.

* Fréchet distance (Heusel et al. 2017, arXiv 1706.08500) between Gaussians fitted to two feature
  sets: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)). Statistics in float64 as EDM computes
  them (NVlabs/edm fid.py `calculate_inception_stats`: mu = sum f / N,
  sigma = (sum f f^T - N mu mu^T) / (N - 1)); the matrix square root is scipy.linalg.sqrtm, the
  non-finite fallback (add 1e-6 I to both covariances) and the real-part check follow pytorch-fid
  (src/pytorch_fid/fid_score.py `calculate_frechet_distance`), the final formula EDM's
  `calculate_fid_from_inception_stats`.
* Reference statistics files use EDM's layout (https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/):
  an .npz with float64 `mu` (D,) and `sigma` (D, D). Files written here may carry one more
  array, `features` (M, D) float32, a subset of the reference features for precision / recall;
  EDM's reader ignores it.
* Inception Score (Salimans et al. 2016, arXiv 1606.03498; openai/improved-gan
  inception_score.py): the samples are cut into 10 splits; per split
  exp(mean_x KL(p(y|x) || p(y))) with p(y) the split's mean prediction; mean and std over splits.
* Improved precision and recall (Kynkäänniemi et al. 2019, arXiv 1904.06991; code
  kynkaat/improved-precision-and-recall-metric, precision_recall.py `ManifoldEstimator`): each
  feature set's manifold is the union of balls around its points with radius the distance to the
  k-th nearest other point (k = 3); precision = share of generated points inside the real
  manifold, recall = share of real points inside the generated manifold. The paper uses VGG-16
  features; on Inception pool features, as here, it is what OpenAI's guided-diffusion evaluator
  (evaluations/evaluator.py, k = 3) reports for ImageNet 64.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special


class GaussianStats:
    """Streaming float64 mean / covariance of feature batches (EDM's accumulation)."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features) -> None:
        f = np.asarray(features, np.float64)
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"feature statistics need at least 2 examples, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 of an (N, D) feature array."""
    acc = GaussianStats(np.shape(features)[1])
    acc.update(features)
    return acc.result()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has a large imaginary component "
                             f"({np.max(np.abs(covmean.imag)):.3g}); too few samples?")
        covmean = covmean.real
    m = np.square(mu1 - mu2).sum()
    return float(np.real(m + np.trace(sigma1 + sigma2 - 2 * covmean)))


def save_stats(path: str, mu, sigma, features=None) -> None:
    """Writes EDM's reference .npz (mu, sigma) plus optional PR `features`."""
    out = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        out["features"] = np.asarray(features, np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to other names
        np.savez(f, **out)


def load_stats(path: str) -> dict[str, np.ndarray]:
    """{'mu', 'sigma'[, 'features']} of a reference .npz (EDM's files or `save_stats`')."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"reference statistics {path!r} not found: set config.eval.ref_stats to EDM's file "
            f"(https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/, e.g. cifar10-32x32.npz) or write "
            f"one with `python run.py --config=... --workdir=... --mode=ref_stats` (it is written "
            f"to config.eval.ref_stats)")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path!r} has keys {f.files}; reference statistics need 'mu' and "
                             f"'sigma' (EDM's layout)")
        return {k: np.asarray(f[k]) for k in f.files}


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` of exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits)."""
    logits = np.asarray(logits, np.float64)
    if logits.shape[0] < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} samples, "
                         f"got {logits.shape[0]}")
    scores = []
    for part in np.array_split(logits, splits):
        log_p = part - scipy.special.logsumexp(part, axis=1, keepdims=True)
        log_py = scipy.special.logsumexp(log_p, axis=0) - np.log(part.shape[0])
        kl = np.sum(np.exp(log_p) * (log_p - log_py), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


@jax.jit
def _sq_distances(a, b):
    d = (jnp.sum(a * a, axis=1)[:, None] - 2 * jnp.dot(a, b.T, precision="highest")
         + jnp.sum(b * b, axis=1)[None, :])
    return jnp.maximum(d, 0.0)


def _kth_radii(features, k: int, block: int) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point of the same set."""
    x = jnp.asarray(features, jnp.float32)
    kth = jax.jit(lambda a: -jax.lax.top_k(-_sq_distances(a, x), k + 1)[0][:, k])
    return np.concatenate([np.asarray(kth(x[i:i + block])) for i in range(0, len(x), block)])


def _inside(query, ref, ref_radii, block: int) -> np.ndarray:
    """Whether each query point lies in some ball (ref point, its radius)."""
    r = jnp.asarray(ref, jnp.float32)
    radii = jnp.asarray(ref_radii)
    fn = jax.jit(lambda q: jnp.any(_sq_distances(q, r) <= radii[None, :], axis=1))
    q = jnp.asarray(query, jnp.float32)
    return np.concatenate([np.asarray(fn(q[i:i + block])) for i in range(0, len(q), block)])


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall of `fake` (N, D) w.r.t. `real` (M, D) features."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got "
                         f"{len(real)} real and {len(fake)} generated")
    precision = _inside(fake, real, _kth_radii(real, k, block), block).mean()
    recall = _inside(real, fake, _kth_radii(fake, k, block), block).mean()
    return float(precision), float(recall)
