"""DhariwalUNet: EDM's re-implementation of ADM (Dhariwal & Nichol 2021), NHWC, flax.linen.

Architecture, defaults and initialisation follow NVlabs/edm `training/networks.py`
(class `DhariwalUNet`); the code is written here.  The network is EDM's raw F: preconditioning
(c_skip, c_out, c_in, c_noise) is applied outside.

Differences from SongUNet that matter for trained weights: positional noise embedding without
endpoint and without the sin/cos swap; the label embedding (bias-free, no sqrt(label_dim) input
scale) is added after map_layer1, before the final SiLU; blocks use adaptive scale/shift,
skip_scale 1, eps 1e-5, heads = channels // channels_per_head (64), attention in every block at
`attn_resolutions`; output = out_conv(silu(out_norm(x))).

Parameter naming rule (for the EDM checkpoint converter): EDM's state-dict path with the
ModuleDict dot after `enc`/`dec` replaced by `_`, torch leaf names mapped to flax ones, e.g.
  model.map_label.weight              -> params['map_label']['kernel']            (transposed)
  model.enc.64x64_conv.weight         -> params['enc_64x64_conv']['kernel']       (OIHW->HWIO)
  model.dec.8x8_in0.qkv.bias          -> params['dec_8x8_in0']['qkv']['bias']
  model.out_norm.weight               -> params['out_norm']['scale']
jaxdistill extensions, absent from EDM checkpoints: `map_layer0_s`, `map_layer1_s` and every
block's `affine_s` (s_embedding); `map_guidance` (guidance_embed); cond channels widen
`enc_{res}x{res}_conv` only.  `channels_per_head` is exposed (EDM hard-codes 64) so tiny test
networks with < 64 channels still get attention heads.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdistill.networks.layers import (
    Conv2d, GroupNorm, Init, Linear, PositionalEmbedding, block_class, check_vectors,
    image_data_fields, per_sample,
    positional_embedding, prepare_labels, unet_inputs)

# EDM's ADM init recipes: kaiming_uniform * sqrt(1/3) for weights and biases (= torch's default
# layer init); "zero" layers are exactly zero.
INIT = Init("kaiming_uniform", math.sqrt(1 / 3), math.sqrt(1 / 3))
INIT_ZERO = Init("kaiming_uniform", 0.0, 0.0)


class DhariwalUNet(nn.Module):
    """ADM U-Net F(x, c_noise, labels) with jaxdistill's optional extra inputs.

    Call: `apply({'params': p}, x, noise_labels, class_labels=None, *, train=False,
    noise_labels_s=None, guidance=None, cond=None, augment_labels=None, return_features=False)`
    with x (N, R, R, in_channels).  Returns (N, R, R, out_channels), or `(out, features)` with
    the encoder's lowest-resolution output (DMD2's bottleneck, before the decoder's in0/in1).
    As in EDM, class_labels are ignored when label_dim=0, and augment_labels=None means no
    augmentation (what sampling uses).
    """
    # The fields the data fixes (checked by networks.check_data_fields).
    data_fields = staticmethod(image_data_fields)

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 192
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: Sequence[int] = (32, 16, 8)
    dropout: float = 0.10
    label_dropout: float = 0.0
    channels_per_head: int = 64
    # jaxdistill extensions (defaults reproduce EDM exactly).
    cond_channels: int = 0                # low-res condition concatenated to x (LowDiff)
    s_embedding: bool = False             # second noise level s (CTM)
    guidance_embed: bool = False          # guidance-weight embedding (guided distillation)
    remat: bool = False                   # recompute block activations in backward (memory)

    def __post_init__(self):
        if self.img_resolution % (2 ** (len(self.channel_mult) - 1)):
            raise ValueError(f"DhariwalUNet: img_resolution={self.img_resolution} is not divisible "
                             f"by 2**(len(channel_mult)-1) = {2 ** (len(self.channel_mult) - 1)}")
        super().__post_init__()

    @staticmethod
    def output_kernel(params):
        """The output layer's kernel in a params-shaped tree (CTM's adaptive weight layer)."""
        return params["out_conv"]["kernel"]

    @property
    def emb_channels(self) -> int:
        return self.model_channels * self.channel_mult_emb

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, *, train: bool = False,
                 noise_labels_s=None, guidance=None, cond=None, augment_labels=None,
                 return_features: bool = False):
        net = "DhariwalUNet"
        res0 = self.img_resolution
        x = unet_inputs(net, self, x, cond, noise_labels_s, guidance, augment_labels)
        n = x.shape[0]
        mc, ec = self.model_channels, self.emb_channels

        # Mapping network.
        emb = PositionalEmbedding(mc, name="map_noise")(per_sample(net, "noise_labels",
                                                                   noise_labels, n))
        if self.augment_dim:
            # Bias-free and zero-init: zeros reproduce EDM's "skip when None" exactly while the
            # params exist whether or not init saw augment labels.
            if augment_labels is None:
                augment_labels = jnp.zeros((n, self.augment_dim), jnp.float32)
            check_vectors(net, "augment_labels", augment_labels, n, self.augment_dim)
            emb = emb + Linear(mc, use_bias=False, init_spec=INIT_ZERO, name="map_augment")(
                jnp.asarray(augment_labels, jnp.float32))
        emb = nn.silu(Linear(ec, init_spec=INIT, name="map_layer0")(emb))
        emb = Linear(ec, init_spec=INIT, name="map_layer1")(emb)
        if self.label_dim:
            labels = prepare_labels(self, net, class_labels, n, self.label_dim,
                                    self.label_dropout, train)
            # EDM: kaiming_normal * sqrt(label_dim) = unit-variance weights for one-hot inputs.
            emb = emb + Linear(ec, use_bias=False, name="map_label",
                               init_spec=Init("kaiming_normal", math.sqrt(self.label_dim)))(labels)
        if self.guidance_embed:
            # New branch, zero init: a warm-started student starts exactly as its teacher.
            g = positional_embedding(per_sample(net, "guidance", guidance, n), mc)
            emb = emb + Linear(ec, init_spec=INIT_ZERO, name="map_guidance")(g)
        emb = nn.silu(emb)
        emb_s = None
        if self.s_embedding:
            emb_s = positional_embedding(per_sample(net, "noise_labels_s", noise_labels_s, n), mc)
            emb_s = nn.silu(Linear(ec, init_spec=INIT, name="map_layer0_s")(emb_s))
            emb_s = nn.silu(Linear(ec, init_spec=INIT, name="map_layer1_s")(emb_s))

        block = functools.partial(
            block_class(self.remat), channels_per_head=self.channels_per_head, dropout=self.dropout,
            init_spec=INIT, init_zero=INIT_ZERO, s_embedding=self.s_embedding)
        run = lambda blk, h: blk(h, emb, emb_s, train)  # noqa: E731
        mults, attn_res = tuple(self.channel_mult), tuple(self.attn_resolutions)

        # Encoder: every output is a skip.
        skips = []
        for level, mult in enumerate(mults):
            res = res0 >> level
            tag = f"enc_{res}x{res}"
            if level == 0:
                x = Conv2d(mc * mult, 3, init_spec=INIT, name=f"{tag}_conv")(x)
            else:
                x = run(block(x.shape[-1], down=True, name=f"{tag}_down"), x)
            skips.append(x)
            for idx in range(self.num_blocks):
                x = run(block(mc * mult, attention=res in attn_res, name=f"{tag}_block{idx}"), x)
                skips.append(x)
            # Multi-scale encoder features for discriminator heads (read with
            # mutable=['intermediates']; no cost unless asked for).
            self.sow("intermediates", "encoder", x)

        # Decoder: blocks after in0/in1/up take [x, popped skip] on channels.
        # Bottleneck features: the encoder's output, before the decoder's in0/in1 blocks
        # (DMD2's `return_bottleneck`, tianweiy/DMD2 third_party/edm/training/networks.py).
        features = x
        for level, mult in reversed(list(enumerate(mults))):
            res = res0 >> level
            tag = f"dec_{res}x{res}"
            cout = x.shape[-1]
            if level == len(mults) - 1:
                x = run(block(cout, attention=True, name=f"{tag}_in0"), x)
                x = run(block(cout, name=f"{tag}_in1"), x)
            else:
                x = run(block(cout, up=True, name=f"{tag}_up"), x)
            for idx in range(self.num_blocks + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = run(block(mc * mult, attention=res in attn_res, name=f"{tag}_block{idx}"), x)
        x = nn.silu(GroupNorm(eps=1e-5, name="out_norm")(x))
        out = Conv2d(self.out_channels, 3, init_spec=INIT_ZERO, name="out_conv")(x)
        return (out, features) if return_features else out
