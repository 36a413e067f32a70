"""Projected-GAN style discriminator on frozen feature maps + GAN loss helpers (CTM's GAN), NHWC.

Sources (facts; the code is written here for flax.linen/NHWC):
- sony/ctm `code/pg_modules/projector.py` (`F_RandomProj`, `_make_scratch_ccm`): a FROZEN random
  1x1 conv ("cross-channel mixing", CCM, PyTorch-default init, with bias) per backbone scale,
  `cout=64`, `expand=True` -> widths 64, 128, 256, 512.  CTM freezes the whole feature extractor
  including these projections (`enc_dec_lib.load_discriminator_and_d_feature_extractor`:
  `requires_grad_(False)`).
- sony/ctm `code/pg_modules/discriminator.py` (`SingleDisc`, `SingleDiscCond`, `MultiScaleD`) and
  `code/pg_modules/blocks.py` (`DownBlock`, `conv2d`): per scale, DownBlocks (4x4 conv, stride 2,
  padding 1, bias; then norm; LeakyReLU(0.2)) halve the map from its (power-of-two snapped)
  size `start_sz` down to `end_sz=8`, then a 4x4 stride-1 VALID conv without bias gives a logits
  map (5x5 for an 8x8 input).  Channel widths follow the "midas" table
  {4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, ...} with the input width at
  `start_sz` (or one width `ndf` everywhere).  `MultiScaleD.forward` flattens each scale's map to
  (N, -1) and CONCATENATES the scales; CTM's losses (`karras_diffusion.get_GAN_loss`) then take
  the mean of the element-wise hinge over that (N, P) array, averaged over backbones.
- `SingleDiscCond`: the last conv outputs `cmap_dim=64` channels; a class embedding
  (`nn.Embedding` of the argmax of the one-hot label, pretrained from tf_efficientnet_lite0
  class embeddings, ~320-dim judging by the pickle's size) is mapped by a StyleGAN2
  `FullyConnectedLayer(activation='lrelu')` to `cmap`, and
  logits = sum_c(out * cmap) / sqrt(cmap_dim).
- Hinge / adaptive weight: sony/ctm `code/cm/karras_diffusion.py`
  (`get_GAN_loss`: D loss mean(relu(1 - real)) + mean(relu(1 + fake)), G loss -mean(fake);
  `calculate_adaptive_weight`: ||grad_L L1|| / (||grad_L L2|| + 1e-4), clamp [0, 1e4], detached;
  VQGAN's recipe).  See also /work/shared/research/ctm_dmd2_msd.md section 1.7.

Deviations from the official design (deliberate or simplifications):
- The heads use NO spectral norm and NO BatchNorm (official `conv2d` = `spectral_norm(Conv2d)`
  and `DownBlock` has `BatchNorm2d`): plain conv (bias) + LeakyReLU(0.2), so the module is
  stateless apart from the frozen projection.  The final conv has no bias, as official.
- Only the channel-mixing random projection (CCM, `proj_type=1`); the official default
  `proj_type=2` adds random cross-scale mixing (CSM: upsample-and-add FeatureFusionBlocks).
- The feature extractor itself is outside this module: pass the frozen feature maps in.  CTM
  uses two backbones (DeiT-base-distilled and EfficientNet-lite0), each with its own projection
  and multi-scale head: build one `ProjectedDiscriminator` per backbone and average the losses.
- Maps smaller than 4 pixels get a final kernel of min(4, h, w) (the official code needs >= 8).
- The class embedding is a trainable random table (no pretrained ImageNet embeddings, as
  official `rand_embedding=True`), applied as `labels @ table` (= lookup of argmax for one-hot
  labels); the StyleGAN2 FC layer's equalized learning rate is replaced by an ordinary dense layer
  initialised N(0, 1/fan_in) (same forward at init), followed by lrelu(0.2) * sqrt(2) as bias_act.
- NOTE: CTM's released `load_discriminator_and_d_feature_extractor` builds `MultiScaleD` without
  `cond`, i.e. the UNconditional `SingleDisc` that ignores the labels it is handed.  Accordingly,
  `label_dim=0` (default) ignores `labels`; the conditional head is the StyleGAN-XL option.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.networks.weights import torch_uniform as _torch_uniform

# Official per-resolution channel table (pg_modules/discriminator.py, "midas channels").
NFC_MIDAS = {4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}


def _snap_size(size: int) -> int:
    """The official rule for non-power-of-two `start_sz`: nearest key of the channel table."""
    sizes = np.array(sorted(NFC_MIDAS))
    return int(sizes[np.argmin(np.abs(sizes - size))])


class RandomProjection(nn.Module):
    """Frozen random 1x1 conv (CCM).  Its `kernel`/`bias` live in the `'projection'` collection.

    Initialised once (from the `'params'` rng at `init`), never returned in `params`, and wrapped
    in `stop_gradient`, so no optimizer sees or moves it; gradients still flow to the input
    features (the generator's GAN gradient passes through the projection).
    """
    features: int

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        init = _torch_uniform(cin)
        kernel = self.variable("projection", "kernel",
                               lambda: init(self.make_rng("params"), (cin, self.features)))
        bias = self.variable("projection", "bias",
                             lambda: init(self.make_rng("params"), (self.features,)))
        k = jax.lax.stop_gradient(kernel.value).astype(x.dtype)
        b = jax.lax.stop_gradient(bias.value).astype(x.dtype)
        return jnp.einsum("nhwc,cd->nhwd", x, k) + b


class ScaleHead(nn.Module):
    """Trainable head for one scale (official `SingleDisc` / `SingleDiscCond`, no SN/BN)."""
    ndf: Optional[int] = None
    end_size: int = 8
    label_dim: int = 0
    embed_dim: int = 320
    cmap_dim: int = 64

    @nn.compact
    def __call__(self, x, labels=None):
        h, w, nc = x.shape[1], x.shape[2], x.shape[-1]
        start = _snap_size(h)
        nfc = dict(NFC_MIDAS) if self.ndf is None else {k: self.ndf for k in NFC_MIDAS}
        nfc[start] = nc
        size = start
        while size > self.end_size:                        # official DownBlock loop
            cout = nfc[size // 2]
            x = nn.Conv(cout, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=True,
                        kernel_init=_torch_uniform(16 * x.shape[-1]),
                        bias_init=_torch_uniform(16 * x.shape[-1]), name=f"down_{size}")(x)
            x = nn.leaky_relu(x, 0.2)
            size //= 2
        k = min(4, x.shape[1], x.shape[2])
        conditional = self.label_dim > 0
        out = nn.Conv(self.cmap_dim if conditional else 1, (k, k), padding="VALID", use_bias=False,
                      kernel_init=_torch_uniform(k * k * x.shape[-1]), name="out")(x)
        if not conditional:
            return out                                     # (N, h', w', 1)
        if labels is None:
            raise ValueError("a conditional discriminator (label_dim > 0) needs one-hot labels")
        table = self.param("embed", nn.initializers.normal(1.0), (self.label_dim, self.embed_dim))
        e = labels.astype(out.dtype) @ table.astype(out.dtype)
        cmap = nn.Dense(self.cmap_dim, kernel_init=nn.initializers.normal(1.0 / math.sqrt(self.embed_dim)),
                        bias_init=nn.initializers.zeros, name="embed_proj")(e)
        cmap = nn.leaky_relu(cmap, 0.2) * math.sqrt(2.0)
        return jnp.sum(out * cmap[:, None, None, :], axis=-1, keepdims=True) / math.sqrt(self.cmap_dim)


class ProjectedDiscriminator(nn.Module):
    """Multi-scale projected discriminator on a list of frozen NHWC feature maps.

    Attributes:
      proj_dim: CCM width `cout` (official 64).  proj_expand: widths proj_dim * 2**i for scale i
        (official `expand=True`); else proj_dim everywhere.  proj_dim <= 0 skips the projection.
      ndf: head width for every DownBlock (official `ndf`); None uses the official midas table.
      end_size: DownBlocks halve each map down to this size (official `end_sz=8`).
      label_dim: number of classes; > 0 builds the conditional (cmap) heads.
      embed_dim, cmap_dim: class-embedding and cmap widths (official ~320 and 64).

    Variables: `'params'` (heads, trainable) and `'projection'` (frozen random 1x1 convs).
      variables = D.init({'params': key}, features, labels)
      logits = D.apply(variables, features, labels)                       # (N,)
      Train only `variables['params']`; pass `{'params': p, 'projection': variables['projection']}`.

    `__call__(features, labels=None, return_map=False)`: each scale gives a logits map, flattened
    to (N, P_i) and concatenated (official `MultiScaleD`) to (N, P).  Returns the per-example mean
    over those P positions, shape (N,), or the (N, P) array itself with `return_map=True`.  The mean
    weights every position equally, as CTM's loss does; when all scales give maps of one size
    (the official case: every map goes down to 8x8 then a 4x4 VALID conv -> 5x5) that is also the
    plain mean over scales.  The hinge is nonlinear: CTM applies it per position, so for exact
    parity feed `return_map=True` logits to `hinge_d_loss` (the (N,) means are a smoother variant;
    `hinge_g_loss` is linear and identical either way).
    """
    proj_dim: int = 64
    proj_expand: bool = True
    ndf: Optional[int] = None
    end_size: int = 8
    label_dim: int = 0
    embed_dim: int = 320
    cmap_dim: int = 64

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], labels: Optional[jax.Array] = None,
                 return_map: bool = False):
        if len(features) == 0:
            raise ValueError("ProjectedDiscriminator needs at least one feature map")
        n = features[0].shape[0]
        cond_labels = labels if self.label_dim > 0 else None
        if self.label_dim > 0 and (labels is None or labels.shape != (n, self.label_dim)):
            raise ValueError(f"a conditional discriminator (label_dim={self.label_dim}) needs one-hot "
                             f"labels of shape {(n, self.label_dim)}, got "
                             f"{None if labels is None else labels.shape}")
        all_logits = []
        for i, f in enumerate(features):
            if f.ndim != 4 or f.shape[0] != n:
                raise ValueError(f"feature map {i} must be NHWC with batch {n}, got {f.shape}")
            if self.proj_dim > 0:
                width = self.proj_dim * (2 ** i if self.proj_expand else 1)
                f = RandomProjection(width, name=f"proj_{i}")(f)
            out = ScaleHead(self.ndf, self.end_size, self.label_dim, self.embed_dim, self.cmap_dim,
                            name=f"head_{i}")(f, cond_labels)
            all_logits.append(out.reshape(n, -1))
        logits = jnp.concatenate(all_logits, axis=1)
        return logits if return_map else jnp.mean(logits, axis=1)


# ----------------------------------------------------------------------------------------------
# Losses (pure functions).

def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Discriminator hinge loss mean(relu(1 - real)) + mean(relu(1 + fake)) (means over all
    elements: pass (N,) logits or the (N, P) maps of `return_map=True`, as CTM does)."""
    return jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator hinge loss -mean(fake)."""
    return -jnp.mean(logits_fake)


def _global_norm(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def adaptive_weight(grad_main_last_layer, grad_other_last_layer,
                    clip: Optional[Tuple[float, float]] = (0.01, 10.0)) -> jax.Array:
    """VQGAN-style balancing weight ||g_main|| / (||g_other|| + 1e-4), clamped to [0, 1e4], then
    clipped to `clip` (skipped when `clip` is None); returned under `stop_gradient` (detached).

    The gradients are those of the two losses w.r.t. the generator's LAST layer weight (arrays or
    pytrees; the norm is the global L2 norm).  CTM (`karras_diffusion.calculate_adaptive_weight`)
    uses it twice, with L = CIFAR `dec['32x32_aux_conv'].weight` / ImageNet
    `output_blocks[15][0].out_layers[3].weight`:
    - GAN weight (`d_apply_adaptive_weight`): g_main = grad L_CTM, g_other = grad L_G (hinge G
      loss), then clipped to [0.01, 10] -> `clip=(0.01, 10.0)` (default);
    - DSM weight (`apply_adaptive_weight`): g_main = grad L_CTM, g_other = grad L_DSM, no extra
      clip -> `clip=None`.
    """
    w = _global_norm(grad_main_last_layer) / (_global_norm(grad_other_last_layer) + 1e-4)
    w = jnp.clip(w, 0.0, 1e4)
    if clip is not None:
        w = jnp.clip(w, clip[0], clip[1])
    return jax.lax.stop_gradient(w)
