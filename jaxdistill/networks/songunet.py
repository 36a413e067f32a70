"""SongUNet: EDM's re-implementation of DDPM++ and NCSN++ (Song et al. 2021), NHWC, flax.linen.

Architecture, defaults and initialisation follow NVlabs/edm `training/networks.py`
(class `SongUNet`); the code is written here.  DDPM++ = positional embedding, standard encoder,
filter [1,1]; NCSN++ = Fourier embedding (channel_mult_noise 2), residual encoder,
filter [1,3,3,1] (see `presets.py`).  The network is EDM's raw F: preconditioning
(c_skip, c_out, c_in, c_noise) is applied outside.

Parameter naming rule (for the EDM checkpoint converter): EDM's state-dict path with the
ModuleDict dot after `enc`/`dec` replaced by `_` and torch leaf names mapped to flax ones, e.g.
  model.map_layer0.weight              -> params['map_layer0']['kernel']         (transposed)
  model.enc.16x16_block0.conv0.weight  -> params['enc_16x16_block0']['conv0']['kernel'] (OIHW->HWIO)
  model.dec.32x32_aux_norm.weight      -> params['dec_32x32_aux_norm']['scale']
  model.map_noise.freqs (NCSN++)       -> buffers['map_noise']['freqs']
Parameter-free modules (`*_aux_down`, `*_aux_up`, positional `map_noise`) own no leaves.
jaxdistill extensions, absent from EDM checkpoints: `map_noise_s`, `map_layer0_s`, `map_layer1_s`
and every block's `affine_s` (s_embedding); `map_guidance` (guidance_embed).  cond channels are
concatenated to x before everything, so they widen `enc_{R}x{R}_conv` and the aux input path
(the first `aux_residual`, or every `aux_skip` conv).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdistill.networks.layers import (
    Conv2d, FourierEmbedding, GroupNorm, Init, Linear, PositionalEmbedding, block_class,
    check_vectors, image_data_fields, per_sample, positional_embedding, prepare_labels, unet_inputs)


# EDM's SongUNet init recipes: xavier everywhere; "zero" layers get a 1e-5 multiplier (not exactly
# zero, unlike ADM) and qkv a sqrt(0.2) multiplier.
INIT = Init("xavier_uniform")
INIT_ZERO = Init("xavier_uniform", 1e-5)
INIT_ATTN = Init("xavier_uniform", math.sqrt(0.2))


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net F(x, c_noise, labels) with jaxdistill's optional extra inputs.

    Call: `apply(variables, x, noise_labels, class_labels=None, *, train=False,
    noise_labels_s=None, guidance=None, cond=None, augment_labels=None, return_features=False)`
    with x (N, R, R, in_channels).  Returns (N, R, R, out_channels), or `(out, features)` with
    the encoder's lowest-resolution output (DMD2's bottleneck, before the decoder's in0/in1).
    NCSN++ (embedding_type 'fourier') has a "buffers" collection that `apply` needs as well.
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
    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    embedding_type: str = "positional"    # 'positional' (DDPM++) | 'fourier' (NCSN++)
    channel_mult_noise: int = 1           # 1 for DDPM++, 2 for NCSN++
    encoder_type: str = "standard"        # 'standard' (DDPM++) | 'skip' | 'residual' (NCSN++)
    decoder_type: str = "standard"        # 'standard' | 'skip'
    resample_filter: Sequence[int] = (1, 1)   # [1,1] DDPM++, [1,3,3,1] NCSN++
    # jaxdistill extensions (defaults reproduce EDM exactly).
    cond_channels: int = 0                # low-res condition concatenated to x (LowDiff)
    s_embedding: bool = False             # second noise level s (CTM)
    guidance_embed: bool = False          # guidance-weight embedding (guided distillation)
    remat: bool = False                   # recompute block activations in backward (memory)

    def __post_init__(self):
        choices = {"embedding_type": ("positional", "fourier"),
                   "encoder_type": ("standard", "skip", "residual"),
                   "decoder_type": ("standard", "skip")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"SongUNet: {field}={getattr(self, field)!r} is not one of "
                                 f"{allowed}")
        if self.img_resolution % (2 ** (len(self.channel_mult) - 1)):
            raise ValueError(f"SongUNet: img_resolution={self.img_resolution} is not divisible by "
                             f"2**(len(channel_mult)-1) = {2 ** (len(self.channel_mult) - 1)}")
        super().__post_init__()

    def output_kernel(self, params):
        """The output layer's kernel in a params-shaped tree (CTM's adaptive weight layer): the
        full-resolution decoder's last convolution."""
        res = self.img_resolution
        return params[f"dec_{res}x{res}_aux_conv"]["kernel"]

    @property
    def noise_channels(self) -> int:
        return self.model_channels * self.channel_mult_noise

    @property
    def emb_channels(self) -> int:
        return self.model_channels * self.channel_mult_emb

    def _noise_embedding(self, c_noise, suffix: str):
        """map_noise then EDM's half swap ([cos, sin] -> [sin, cos]); trained weights expect it."""
        nc = self.noise_channels
        if self.embedding_type == "positional":
            emb = PositionalEmbedding(nc, endpoint=True, name="map_noise" + suffix)(c_noise)
        else:
            emb = FourierEmbedding(nc, name="map_noise" + suffix)(c_noise)
        return jnp.concatenate([emb[:, nc // 2:], emb[:, :nc // 2]], axis=1)

    def _mapping_mlp(self, emb, suffix: str):
        emb = nn.silu(Linear(self.emb_channels, init_spec=INIT, name="map_layer0" + suffix)(emb))
        return nn.silu(Linear(self.emb_channels, init_spec=INIT, name="map_layer1" + suffix)(emb))

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, *, train: bool = False,
                 noise_labels_s=None, guidance=None, cond=None, augment_labels=None,
                 return_features: bool = False):
        net = "SongUNet"
        res0 = self.img_resolution
        x = unet_inputs(net, self, x, cond, noise_labels_s, guidance, augment_labels)
        n = x.shape[0]

        # Mapping network: noise embedding + label / guidance / augment embeddings, then 2 layers.
        emb = self._noise_embedding(per_sample(net, "noise_labels", noise_labels, n), "")
        if self.label_dim:
            labels = prepare_labels(self, net, class_labels, n, self.label_dim,
                                    self.label_dropout, train)
            emb = emb + Linear(self.noise_channels, init_spec=INIT, name="map_label")(
                labels * math.sqrt(self.label_dim))
        if self.guidance_embed:
            # New branch, near-zero init: a warm-started student starts as its teacher.
            g = positional_embedding(per_sample(net, "guidance", guidance, n),
                                     self.noise_channels, endpoint=True)
            emb = emb + Linear(self.noise_channels, init_spec=INIT_ZERO,
                               name="map_guidance")(g)
        if self.augment_dim:
            # Bias-free, so zeros (EDM skips the layer when augment_labels is None) add exactly 0;
            # running it anyway creates the params whether or not init saw augment labels.
            if augment_labels is None:
                augment_labels = jnp.zeros((n, self.augment_dim), jnp.float32)
            check_vectors(net, "augment_labels", augment_labels, n, self.augment_dim)
            emb = emb + Linear(self.noise_channels, use_bias=False, init_spec=INIT,
                               name="map_augment")(jnp.asarray(augment_labels, jnp.float32))
        emb = self._mapping_mlp(emb, "")
        emb_s = None
        if self.s_embedding:
            s = per_sample(net, "noise_labels_s", noise_labels_s, n)
            emb_s = self._mapping_mlp(self._noise_embedding(s, "_s"), "_s")

        block = functools.partial(
            block_class(self.remat), num_heads=1, dropout=self.dropout,
            skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=tuple(self.resample_filter),
            resample_proj=True, adaptive_scale=False, init_spec=INIT, init_zero=INIT_ZERO,
            init_attn=INIT_ATTN, s_embedding=self.s_embedding)
        run = lambda blk, h: blk(h, emb, emb_s, train)  # noqa: E731
        mc, mults = self.model_channels, tuple(self.channel_mult)
        attn_res = tuple(self.attn_resolutions)
        resample = tuple(self.resample_filter)

        # Encoder.  Every non-aux output is a skip; aux modules rewrite the latest skip.
        skips = []
        aux = x
        for level, mult in enumerate(mults):
            res = res0 >> level
            tag = f"enc_{res}x{res}"
            if level == 0:
                x = Conv2d(mc, 3, init_spec=INIT, name=f"{tag}_conv")(x)
                skips.append(x)
            else:
                cout = x.shape[-1]
                x = run(block(cout, down=True, name=f"{tag}_down"), x)
                skips.append(x)
                if self.encoder_type == "skip":
                    aux = Conv2d(aux.shape[-1], 0, down=True, resample_filter=resample,
                                 name=f"{tag}_aux_down")(aux)
                    x = skips[-1] = x + Conv2d(cout, 1, init_spec=INIT,
                                               name=f"{tag}_aux_skip")(aux)
                if self.encoder_type == "residual":
                    # Progressive-growing input path; EDM scales the sum by 1/sqrt(2).
                    aux = Conv2d(cout, 3, down=True, resample_filter=resample, fused_resample=True,
                                 init_spec=INIT, name=f"{tag}_aux_residual")(aux)
                    x = skips[-1] = aux = (x + aux) / math.sqrt(2)
            for idx in range(self.num_blocks):
                x = run(block(mc * mult, attention=res in attn_res, name=f"{tag}_block{idx}"), x)
                skips.append(x)
            # Multi-scale encoder features for discriminator heads (read with
            # mutable=['intermediates']; no cost unless asked for).
            self.sow("intermediates", "encoder", x)

        # Decoder.  Blocks after in0/in1/up take [x, popped skip] on channels.
        # Bottleneck features: the encoder's output, before the decoder's in0/in1 blocks
        # (DMD2's `return_bottleneck`, tianweiy/DMD2 third_party/edm/training/networks.py).
        features = x
        out = None
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
                attn = idx == self.num_blocks and res in attn_res
                x = run(block(mc * mult, attention=attn, name=f"{tag}_block{idx}"), x)
            if self.decoder_type == "skip" or level == 0:
                if self.decoder_type == "skip" and level < len(mults) - 1:
                    out = Conv2d(self.out_channels, 0, up=True, resample_filter=resample,
                                 name=f"{tag}_aux_up")(out)
                h = GroupNorm(eps=1e-6, name=f"{tag}_aux_norm")(x)
                h = Conv2d(self.out_channels, 3, init_spec=INIT_ZERO,
                           name=f"{tag}_aux_conv")(nn.silu(h))
                out = h if out is None else h + out
        return (out, features) if return_features else out
