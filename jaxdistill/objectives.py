"""The formulas every objective shares, each written once.

  - `stream(key, name)`: named random streams. A step derives each draw from its name
    (fold_in by a fixed hash of the name), so adding a draw to a method changes no other draw;
    positional splitting (`split(key, 16)` consumed in order) would reshuffle every later stream.
  - `add_noise`: forward noising x_sigma = x + sigma n (VE / EDM parameterisation).
  - `denoising_loss`: the EDM-weighted denoising loss lambda(sigma) ||D - target||^2 per example,
    with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022 eq. 8;
    NVlabs/edm training/loss.py EDMLoss sums over pixels, DMD2's fake-score loss and CTM's DSM
    term average over them: `reduce` picks).
  - `one_hot` / `draw_labels` / `draw_noise`: the class labels and Gaussian noise a sampler or a
    generator step starts from.
  - `distance`: the per-example distances of CTM's loss and DMD's regression loss (l2,
    pseudo-Huber, LPIPS).
The multistep "denoise, then re-noise" chain shared by every sampler and DMD2's backward
simulation is `jaxdistill.samplers.denoise_renoise`.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

from jaxdistill import diffusion


def stream(key: jax.Array, name: str) -> jax.Array:
    """The random stream called `name` of `key`: fold_in by the CRC-32 of the name (stable across
    Python runs, unlike hash())."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def add_noise(key: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """x + sigma n with n ~ N(0, I); sigma per example (N,) or a scalar."""
    return x + diffusion.expand_to(jnp.asarray(sigma), x) * jax.random.normal(key, x.shape, x.dtype)


def denoising_loss(denoised: jax.Array, target: jax.Array, sigma: jax.Array, sigma_data: float,
                   *, reduce: str = "mean") -> jax.Array:
    """Per-example EDM-weighted denoising loss (N,): lambda(sigma) times the squared error summed
    (`reduce='sum'`, EDM) or averaged (`'mean'`, DMD2 / CTM) over the example's elements."""
    n = denoised.shape[0]
    sq = ((denoised - target) ** 2).reshape(n, -1)
    per_example = jnp.sum(sq, axis=1) if reduce == "sum" else jnp.mean(sq, axis=1)
    return diffusion.edm_loss_weight(sigma, sigma_data) * per_example


def one_hot(labels: jax.Array | None, label_dim: int):
    """Integer labels -> one-hot float (N, label_dim); None when the model is unconditional."""
    if not label_dim or labels is None:
        return None
    return jax.nn.one_hot(labels, label_dim, dtype=jnp.float32)


def draw_labels(key: jax.Array, n: int, label_dim: int):
    """n uniform class labels (None when unconditional)."""
    return jax.random.randint(key, (n,), 0, label_dim) if label_dim else None


def draw_noise(key: jax.Array, n: int, shape) -> jax.Array:
    """n standard normal examples of `shape` (a sampler's z, scaled by sigma_max by the sampler)."""
    return jax.random.normal(key, (n,) + tuple(shape))


def distance(kind: str, a: jax.Array, b: jax.Array, *, huber_c: float = 0.0,
             lpips_params=None) -> jax.Array:
    """Per-example distance between two batches: 'l2' (mean squared), 'pseudo_huber' or 'lpips'."""
    n = a.shape[0]
    diff = (a - b).reshape(n, -1)
    if kind == "l2":
        return jnp.mean(diff**2, axis=1)
    if kind == "pseudo_huber":
        # c = 0.00054 sqrt(d) (Song & Dhariwal 2023, improved consistency training) unless set.
        c = huber_c or 0.00054 * diff.shape[1] ** 0.5
        return jnp.sqrt(jnp.sum(diff**2, axis=1) + c**2) - c
    if kind == "lpips":
        from jaxdistill.networks import lpips

        # CTM uses piq.LPIPS(replace_pooling=True) and DMD piq's LPIPS too: VGG with average
        # pooling, inputs bilinearly resized to 224 (sony/ctm code/cm/enc_dec_lib.py).
        return lpips.lpips_distance(lpips_params, a, b, pooling="avg")
    raise ValueError(f"config.method.distance={kind!r} is not l2, pseudo_huber or lpips")
