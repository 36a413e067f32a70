"""DeiT-base-distilled feature network for CTM's projected discriminator (Flax, NHWC).

Sources (facts; the code is written here):
- timm `deit_base_distilled_patch16_224` (`timm/models/deit.py` VisionTransformerDistilled on
  `timm/models/vision_transformer.py`): 16x16 patch conv (bias), a cls and a dist token before the
  196 patch tokens, learned position embedding (1, 198, 768), 12 pre-norm blocks
  x + attn(norm1(x)), x + mlp(norm2(x)) with LayerNorm eps 1e-6, attention from one `qkv` Linear
  (rows [q | k | v], heads contiguous), scale head_dim^-0.5, `proj` Linear, MLP fc1 -> exact GELU
  -> fc2 (ratio 4).  State-dict keys `cls_token`, `dist_token`, `pos_embed`,
  `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`.
- sony/ctm `code/feature_networks/pretrained_builder.py` (`_make_vit`: 'base' -> hooks
  [2, 5, 8, 11], features [96, 192, 384, 768], size 224, start_index 2 for DeiT) and
  `code/feature_networks/vit.py` (`_make_vit_b16_backbone`, `forward_vit`, `forward_flex`):
  forward hooks on the OUTPUTS of blocks 2, 5, 8, 11 (before the final norm); readout 'ignore'
  (`Slice(start_index=2)`: the cls and dist tokens are dropped); tokens reshaped to the 14x14
  grid; then per tap a 1x1 conv (bias) to 96 / 192 / 384 / 768 channels followed by a
  ConvTranspose 4x4 stride 4 (-> 56x56), a ConvTranspose 2x2 stride 2 (-> 28x28), nothing
  (14x14), and a 3x3 stride-2 padding-1 conv (-> 7x7).  Those "act_postprocess" layers are NOT
  pretrained: they keep PyTorch's default random init and are frozen with the backbone
  (`enc_dec_lib.load_discriminator_and_d_feature_extractor`: `requires_grad_(False)`).
- Input (sony/ctm `code/cm/enc_dec_lib.py` get_feature, `pg_modules/projector.py`
  get_backbone_normstats): images in [-1, 1] -> [0, 1] -> ImageNet mean/std -> bilinear to 224
  (see `jaxdistill.networks.backbones.prepare_images`).  At 224 the official `_resize_pos_embed` is
  the identity, so no position-embedding interpolation is done here.

Variables: `'params'` = the timm weights (load with `load_deit_params`), `'postprocess'` = the
random frozen readout convs (from `init`).  Blocks after the last hook (and timm's final norm and
heads) never influence the taps and are not built; the depth is `max(hooks) + 1`.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.networks.weights import (conv_kernel, dense_kernel, read_state_dict, take,
                                         timm_missing_message, torch_uniform)

TIMM_NAME = "deit_base_distilled_patch16_224"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth"
CONFIG_FIELD = "config.method.deit.weights"
NUM_PREFIX_TOKENS = 2          # cls + dist
LN_EPS = 1e-6                  # timm ViT LayerNorm


class Attention(nn.Module):
    """timm `Attention`: one qkv Linear, softmax(q k^T / sqrt(head_dim)) v, proj Linear."""
    num_heads: int

    @nn.compact
    def __call__(self, x):
        n, t, d = x.shape
        head_dim = d // self.num_heads
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(n, t, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        weights = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) * head_dim ** -0.5, axis=-1)
        out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, d)
        return nn.Dense(d, name="proj")(out)


class Mlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
        return nn.Dense(x.shape[-1], name="fc2")(h)


class Block(nn.Module):
    """timm ViT `Block` (pre-norm, no layer scale, no dropout at eval)."""
    num_heads: int
    mlp_ratio: float

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.num_heads, name="attn")(nn.LayerNorm(LN_EPS, name="norm1")(x))
        hidden = int(x.shape[-1] * self.mlp_ratio)
        return x + Mlp(hidden, name="mlp")(nn.LayerNorm(LN_EPS, name="norm2")(x))


class Readout(nn.Module):
    """One official act_postprocess branch on the token grid: 1x1 conv, then `resample`:
    4 or 2 = ConvTranspose (kernel = stride = resample), 1 = nothing, -2 = 3x3 stride-2 conv
    (padding 1).  Random PyTorch-default init, kept in the frozen `'postprocess'` collection."""
    features: int
    resample: int

    def _frozen(self, name, shape, fan_in):
        init = torch_uniform(fan_in)
        return self.variable("postprocess", name,
                             lambda: init(self.make_rng("params"), shape)).value

    @nn.compact
    def __call__(self, x):
        cin, f = x.shape[-1], self.features
        x = jnp.einsum("nhwc,cf->nhwf", x, self._frozen("proj_kernel", (cin, f), cin))
        x = x + self._frozen("proj_bias", (f,), cin)
        if self.resample in (2, 4):
            r = self.resample
            # torch ConvTranspose2d fan_in is computed from weight dim 1 (= out channels) * r * r.
            kernel = self._frozen("up_kernel", (r, r, f, f), f * r * r)
            n, h, w, _ = x.shape
            x = jnp.einsum("nhwc,abco->nhawbo", x, kernel).reshape(n, h * r, w * r, f)
            return x + self._frozen("up_bias", (f,), f * r * r)
        if self.resample == -2:
            kernel = self._frozen("down_kernel", (3, 3, f, f), 9 * f)
            x = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return x + self._frozen("down_bias", (f,), 9 * f)
        return x


# Per tap: (fraction of the width, resample) of the official layer1..layer4.
READOUTS: Tuple[Tuple[int, int], ...] = ((8, 4), (4, 2), (2, 1), (1, -2))


class DeiTFeatures(nn.Module):
    """Four NHWC feature maps of a (distilled) DeiT, as CTM's projected-GAN backbone.

    Defaults are deit_base_distilled_patch16_224 (maps 56x56x96, 28x28x192, 14x14x384, 7x7x768);
    tests use tiny settings.  Input: NHWC images of size `image_size`, already normalised
    (`backbones.prepare_images`).  Readout widths are width/8, width/4, width/2, width as
    officially (base 96..768, tiny DeiT 24..192).
    """
    width: int = 768
    num_heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    hooks: Sequence[int] = (2, 5, 8, 11)
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x):
        n = x.shape[0]
        if x.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"DeiTFeatures expects (N, {self.image_size}, {self.image_size}, 3) "
                             f"images, got {x.shape}")
        if len(self.hooks) != len(READOUTS) or list(self.hooks) != sorted(set(self.hooks)):
            raise ValueError(f"DeiTFeatures.hooks={tuple(self.hooks)} must be {len(READOUTS)} "
                             "increasing block indices (config.method.deit.hooks)")
        if self.image_size % self.patch_size:
            raise ValueError(f"DeiTFeatures: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        d, p = self.width, self.patch_size
        grid = self.image_size // p
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(x)
        init = nn.initializers.normal(0.02)
        prefix = [jnp.broadcast_to(self.param(name, init, (1, 1, d)), (n, 1, d))
                  for name in ("cls_token", "dist_token")]
        pos = self.param("pos_embed", init, (1, grid * grid + NUM_PREFIX_TOKENS, d))
        x = jnp.concatenate(prefix + [x.reshape(n, grid * grid, d)], axis=1) + pos
        taps = []
        for i in range(max(self.hooks) + 1):
            x = Block(self.num_heads, self.mlp_ratio, name=f"blocks_{i}")(x)
            if i in self.hooks:
                taps.append(x[:, NUM_PREFIX_TOKENS:].reshape(n, grid, grid, d))
        return [Readout(d // frac, resample, name=f"readout_{j}")(t)
                for j, (t, (frac, resample)) in enumerate(zip(taps, READOUTS))]


def params_from_state_dict(state, module: DeiTFeatures, source: str) -> dict:
    """Flax `'params'` of `module` from a timm state dict (torch layouts); checks every shape."""
    d, p = module.width, module.patch_size
    hidden = int(d * module.mlp_ratio)
    tokens = (module.image_size // p) ** 2 + NUM_PREFIX_TOKENS
    get = lambda key, shape, layout=lambda a: a: take(state, key, shape, source, layout)  # noqa: E731
    linear = lambda key, out, inp: {"kernel": get(f"{key}.weight", (out, inp), dense_kernel),  # noqa: E731
                                    "bias": get(f"{key}.bias", (out,))}
    norm = lambda key: {"scale": get(f"{key}.weight", (d,)), "bias": get(f"{key}.bias", (d,))}  # noqa: E731
    params = {
        "cls_token": get("cls_token", (1, 1, d)),
        "dist_token": get("dist_token", (1, 1, d)),
        "pos_embed": get("pos_embed", (1, tokens, d)),
        "patch_embed": {"kernel": get("patch_embed.proj.weight", (d, 3, p, p), conv_kernel),
                        "bias": get("patch_embed.proj.bias", (d,))},
    }
    for i in range(max(module.hooks) + 1):
        b = f"blocks.{i}"
        params[f"blocks_{i}"] = {
            "norm1": norm(f"{b}.norm1"), "norm2": norm(f"{b}.norm2"),
            "attn": {"qkv": linear(f"{b}.attn.qkv", 3 * d, d),
                     "proj": linear(f"{b}.attn.proj", d, d)},
            "mlp": {"fc1": linear(f"{b}.mlp.fc1", hidden, d),
                    "fc2": linear(f"{b}.mlp.fc2", d, hidden)},
        }
    return params


def load_deit_params(path: str, module: DeiTFeatures = DeiTFeatures()) -> dict:
    """`'params'` from a user-supplied timm `deit_base_distilled_patch16_224` file (.pth or .npz).

    Missing file -> FileNotFoundError saying what to get and which config field to set; a missing
    key or a shape that does not fit `module` -> an error naming the parameter.
    """
    missing = timm_missing_message("DeiT backbone", CONFIG_FIELD, TIMM_NAME, WEIGHTS_URL,
                                   "facebookresearch/deit, the file timm loads")
    return params_from_state_dict(read_state_dict(path, missing), module, repr(path))
