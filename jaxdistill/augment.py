"""DiffAugment (differentiable augmentation for GAN discriminators), NHWC, explicit PRNG keys.

Sources (facts; the code is written here for JAX/NHWC):
- Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training" (arXiv 2006.10738),
  reference code mit-han-lab/data-efficient-gans `DiffAugment_pytorch.py`
  (`rand_brightness`, `rand_color`/`rand_saturation`, `rand_contrast`, `rand_translation`,
  `rand_cutout`, policy dict `'color' -> [brightness, saturation, contrast]`).
- sony/ctm `code/pg_modules/diffaug.py` + `code/cm/enc_dec_lib.py::get_xl_feature`: CTM draws the
  random parameters OUTSIDE the augmentation (so real and fake can share or not share them,
  `gan_different_augment`) with `shift_ratio=0.125` and `cutout_ratio=0.2`; sizes are
  `int(size * ratio + 0.5)`.  This module mirrors that split: `sample_diff_augment_params` draws
  the per-example parameters, `apply_diff_augment` applies them, `diff_augment` does both.

Per-example random parameters (images in [-1, 1], shape (N, H, W, C)):
- brightness  b ~ U(-0.5, 0.5):  x <- x + b
- saturation  s ~ U(0, 2):       x <- (x - mean_C(x)) * s + mean_C(x)       (per-pixel channel mean)
- contrast    c ~ U(0.5, 1.5):   x <- (x - mean_HWC(x)) * c + mean_HWC(x)   (per-image mean)
- translation (tx, ty) integers uniform in [-shift_h, shift_h] x [-shift_w, shift_w],
  shift = int(size * translation_ratio + 0.5):  out[n, i, j] = x[n, i + tx, j + ty], zero where the
  source index leaves the image (the official code zero-pads by one pixel and clamps, which is the
  same thing).  Image CONTENT therefore moves by (-tx, -ty): a pixel at (r, c) lands at
  (r - tx, c - ty).  (tx is the official `translation_x`, which indexes dim 2 = H in NCHW.)
- cutout      a square (cut_h, cut_w) = int(size * cutout_ratio + 0.5) centred-ish at offset
  (ox, oy), ox uniform in [0, H + (1 - cut_h % 2)) (official bound); rows
  [ox - cut_h // 2, ox - cut_h // 2 + cut_h) and the analogous columns are zeroed, clipped to the
  image (the official clamp only re-zeroes border rows that are inside the clipped square anyway).

Everything is jittable (no Python loop over the batch: translation is a batched gather plus a
validity mask, cutout a comparison mask) and differentiable w.r.t. `x`; the random parameters
are constants for autodiff.

Not implemented: CTM's `prob_aug` (augment only the first `int(N * prob_aug)` examples; CTM uses
1.0, i.e. every example).
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

POLICIES = ("color", "translation", "cutout")


def _parse_policy(policy: str):
    ops = [p.strip() for p in policy.split(",") if p.strip()] if policy else []
    for p in ops:
        if p not in POLICIES:
            raise ValueError(f"unknown DiffAugment policy {p!r}; expected a subset of {POLICIES}")
    return ops


def _ratio_size(size: int, ratio: float) -> int:
    """The official `int(size * ratio + 0.5)` (round half up)."""
    return int(size * ratio + 0.5)


def sample_diff_augment_params(key: jax.Array, batch: int, height: int, width: int,
                               translation_ratio: float = 0.125, cutout_ratio: float = 0.2,
                               dtype=jnp.float32) -> Dict[str, jax.Array]:
    """Draws one set of DiffAugment parameters per example (all policies, always).

    Returns a dict of arrays with leading dim `batch`: `brightness`, `saturation`, `contrast`
    (float, shape (N,)), `translation_x`, `translation_y`, `offset_x`, `offset_y` (int32, (N,)).
    `_x` refers to the height axis, `_y` to the width axis (the official NCHW naming).
    Drawing every parameter regardless of policy keeps the draws for a given key identical
    across policies.
    """
    kb, ks, kc, ktx, kty, kox, koy = jax.random.split(key, 7)
    shift_x, shift_y = _ratio_size(height, translation_ratio), _ratio_size(width, translation_ratio)
    cut_x, cut_y = _ratio_size(height, cutout_ratio), _ratio_size(width, cutout_ratio)
    return {
        "brightness": jax.random.uniform(kb, (batch,), dtype) - 0.5,
        "saturation": jax.random.uniform(ks, (batch,), dtype) * 2.0,
        "contrast": jax.random.uniform(kc, (batch,), dtype) + 0.5,
        "translation_x": jax.random.randint(ktx, (batch,), -shift_x, shift_x + 1),
        "translation_y": jax.random.randint(kty, (batch,), -shift_y, shift_y + 1),
        "offset_x": jax.random.randint(kox, (batch,), 0, height + (1 - cut_x % 2)),
        "offset_y": jax.random.randint(koy, (batch,), 0, width + (1 - cut_y % 2)),
    }


def _bcast(v):
    return v[:, None, None, None]


def _brightness(x, b):
    return x + _bcast(b).astype(x.dtype)


def _saturation(x, s):
    m = jnp.mean(x, axis=-1, keepdims=True)
    return (x - m) * _bcast(s).astype(x.dtype) + m


def _contrast(x, c):
    m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - m) * _bcast(c).astype(x.dtype) + m


def _translation(x, tx, ty):
    _, h, w, _ = x.shape
    rows = jnp.arange(h)[None, :] + tx[:, None]          # (N, H) source row for each output row
    cols = jnp.arange(w)[None, :] + ty[:, None]          # (N, W)
    row_ok = (rows >= 0) & (rows < h)
    col_ok = (cols >= 0) & (cols < w)
    rows = jnp.clip(rows, 0, h - 1)
    cols = jnp.clip(cols, 0, w - 1)
    # Batched gathers (the transpose is a scatter-add, so gradients flow back to x).
    out = jax.vmap(lambda xi, r, c: xi[r][:, c])(x, rows, cols)
    mask = (row_ok[:, :, None] & col_ok[:, None, :]).astype(x.dtype)[..., None]
    return out * mask


def cutout_mask(offset_x, offset_y, height: int, width: int, cutout_ratio: float = 0.2,
                dtype=jnp.float32):
    """(N, H, W, 1) mask that is 0 inside each example's cutout square and 1 elsewhere."""
    cut_x, cut_y = _ratio_size(height, cutout_ratio), _ratio_size(width, cutout_ratio)
    lo_x = offset_x[:, None] - cut_x // 2
    lo_y = offset_y[:, None] - cut_y // 2
    i = jnp.arange(height)[None, :]
    j = jnp.arange(width)[None, :]
    in_x = (i >= lo_x) & (i < lo_x + cut_x)               # (N, H)
    in_y = (j >= lo_y) & (j < lo_y + cut_y)               # (N, W)
    cut = in_x[:, :, None] & in_y[:, None, :]
    return (~cut).astype(dtype)[..., None]


def apply_diff_augment(x: jax.Array, params: Dict[str, jax.Array],
                       policy: str = "color,translation,cutout",
                       cutout_ratio: float = 0.2) -> jax.Array:
    """Applies DiffAugment with given per-example `params` (from `sample_diff_augment_params`).

    Ops run in the order the policy names them (as the official loop over `policy.split(',')`);
    `'color'` = brightness, saturation, contrast.  `cutout_ratio` must match the one used to draw
    the offsets (it sets the square's size).  An empty policy returns `x` unchanged.
    """
    if x.ndim != 4:
        raise ValueError(f"DiffAugment expects NHWC images, got shape {x.shape}")
    _, h, w, _ = x.shape
    for p in _parse_policy(policy):
        if p == "color":
            x = _brightness(x, params["brightness"])
            x = _saturation(x, params["saturation"])
            x = _contrast(x, params["contrast"])
        elif p == "translation":
            x = _translation(x, params["translation_x"], params["translation_y"])
        elif p == "cutout":
            x = x * cutout_mask(params["offset_x"], params["offset_y"], h, w, cutout_ratio, x.dtype)
    return x


def diff_augment(key: jax.Array, x: jax.Array, policy: str = "color,translation,cutout",
                 translation_ratio: float = 0.125, cutout_ratio: float = 0.2) -> jax.Array:
    """DiffAugment of NHWC images `x` in [-1, 1] with fresh per-example parameters drawn from `key`.

    Defaults are CTM's (`'color,translation,cutout'`, shift ratio 0.125, cutout ratio 0.2).  For
    independent augmentations of real and fake batches (CTM's `gan_different_augment=True`) call
    it with two different keys; for shared ones, with the same key and batch size.
    """
    n, h, w, _ = x.shape
    params = sample_diff_augment_params(key, n, h, w, translation_ratio, cutout_ratio, x.dtype)
    return apply_diff_augment(x, params, policy, cutout_ratio)
