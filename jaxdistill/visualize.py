"""Sample grids as PNG: image batches tiled, 2-D point clouds as density images."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def image_grid(x: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(N, H, W, C) in [-1, 1] -> one uint8 (rows*H, cols*W, C) picture."""
    x = np.asarray(x, np.float32)
    n, h, w, c = x.shape
    cols = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * h, cols * w, c), -1.0, np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    return np.clip(np.round((grid + 1.0) * 127.5), 0, 255).astype(np.uint8)


def point_density(x: np.ndarray, size: int = 128, extent: float = 1.6) -> np.ndarray:
    """(N, 2) points -> uint8 (size, size, 1) log-density picture over [-extent, extent]^2.

    (N, 1) points are drawn on the horizontal axis; (N, D > 2) by their first two coordinates.
    """
    if x.shape[1] == 1:
        x = np.concatenate([x, np.zeros_like(x)], axis=1)
    hist, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=size, range=[[-extent, extent]] * 2)
    img = np.log1p(hist[::-1])
    img = img / max(img.max(), 1e-8)
    return (255 * (1.0 - img)).astype(np.uint8)[..., None]


def picture(x: np.ndarray) -> np.ndarray:
    """The picture of a batch of samples, whatever their kind."""
    return point_density(x) if x.ndim == 2 else image_grid(x)


def save_png(path: str, x: np.ndarray) -> None:
    img = picture(x)
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
