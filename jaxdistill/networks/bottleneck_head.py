"""DMD2's GAN classifier: a small head on the fake-score network's bottleneck features.

Facts (tianweiy/DMD2 main/edm/edm_guidance.py, `cls_pred_branch`, `compute_cls_logits`,
`compute_generator_clean_cls_loss`, `compute_guidance_clean_cls_loss`; shared/research/ctm_dmd2_msd.md
section 2.4): for the 8x8 ADM bottleneck the head is conv 4x4 stride 2 pad 1 -> GroupNorm(32) ->
SiLU -> conv 4x4 stride 4 -> GroupNorm(32) -> SiLU -> conv 1x1 to one logit per image. Losses are
the non-saturating softplus forms.

Generalised here: the second conv takes the whole remaining map (kernel = stride = its size, so an
8x8 input reproduces the official 4x4 / stride 4), and vector features (the MLP's (N, C)) go
through the same layers as 1x1 maps (dense layers).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _norm(channels: int, pixels: int) -> nn.GroupNorm:
    """GroupNorm(32) as official (768 channels); fewer groups when a group would hold fewer than 4
    values (a 1x1 map of 32 channels in 32 groups would normalise every value to 0)."""
    groups = min(32, channels)
    while groups > 1 and (channels % groups or (channels // groups) * pixels < 4):
        groups -= 1
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5)


class BottleneckClassifier(nn.Module):
    """Logit (N,) of "real" for bottleneck features (N, H, W, C) or (N, C)."""

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        c = features.shape[-1]
        if features.ndim == 2:
            h = nn.silu(_norm(c, 1)(nn.Dense(c, name="conv0")(features)))
            h = nn.silu(_norm(c, 1)(nn.Dense(c, name="conv1")(h)))
            return nn.Dense(1, name="out")(h)[:, 0]
        if features.ndim != 4 or min(features.shape[1:3]) < 2:
            raise ValueError("BottleneckClassifier needs (N, C) vectors or (N, H, W, C) maps with "
                             f"H, W >= 2, got {features.shape}")
        h = nn.Conv(c, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv0")(features)
        h = nn.silu(_norm(c, h.shape[1] * h.shape[2])(h))
        k = (h.shape[1], h.shape[2])
        h = nn.silu(_norm(c, 1)(nn.Conv(c, k, strides=k, padding="VALID", name="conv1")(h)))
        return jnp.mean(nn.Conv(1, (1, 1), name="out")(h), axis=(1, 2, 3))


def d_loss(logits_real: jax.Array, logits_fake: jax.Array, real_weight=None) -> jax.Array:
    """softplus(fake) + softplus(-real), means over the batch; `real_weight` (N,) restricts the
    real term to some examples (MSD: a student's own classes)."""
    real = jax.nn.softplus(-logits_real)
    if real_weight is None:
        real_term = jnp.mean(real)
    else:
        real_term = jnp.sum(real_weight * real) / jnp.maximum(jnp.sum(real_weight), 1.0)
    return jnp.mean(jax.nn.softplus(logits_fake)) + real_term


def g_loss(logits_fake: jax.Array) -> jax.Array:
    """Non-saturating generator loss softplus(-fake)."""
    return jnp.mean(jax.nn.softplus(-logits_fake))
