"""scikit-learn's 8x8 digits (1797 images, 10 classes), embedded in its wheel: no download.

Pixels are integers 0..16; they are scaled to [-1, 1] (the image convention of NVlabs/edm) and
optionally resized by an integer factor (bilinear, via jax.image.resize) to a UNet-friendly size.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def load_digits(resolution: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Returns images (1797, resolution, resolution, 1) float32 in [-1, 1] and labels int32."""
    from sklearn.datasets import load_digits as sklearn_digits

    if resolution < 8 or resolution % 8:
        raise ValueError(f"digits resolution must be a multiple of 8, got {resolution}")
    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32) / 8.0 - 1.0          # 0..16 -> [-1, 1]
    images = images[..., None]
    if resolution != 8:
        import jax

        images = np.asarray(jax.image.resize(images, (images.shape[0], resolution, resolution, 1),
                                              method="bilinear"))
        images = np.clip(images, -1.0, 1.0)
    images.setflags(write=False)
    labels = bunch.target.astype(np.int32)
    labels.setflags(write=False)
    return images, labels
