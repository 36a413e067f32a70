"""Building blocks shared by SongUNet (DDPM++/NCSN++) and DhariwalUNet (ADM), NHWC, flax.linen.

Facts (init formulas, resampling padding, GroupNorm group rule, embedding formulas, the attention
qkv channel layout) follow NVlabs/edm `training/networks.py` (classes `weight_init`, `Linear`,
`Conv2d`, `GroupNorm`, `AttentionOp`, `UNetBlock`, `PositionalEmbedding`, `FourierEmbedding`);
the code is written here for NHWC tensors.

Parameter layout (what an EDM checkpoint converter has to produce):
- `Linear`: leaf `kernel` of shape (in, out) = EDM `weight` (out, in) transposed; leaf `bias`.
- `Conv2d`: leaf `kernel` HWIO (k, k, in, out) = EDM `weight` OIHW transposed by (2, 3, 1, 0);
  leaf `bias`.  A kernel-0 `Conv2d` is a pure resampler and owns no leaves.
- `GroupNorm`: leaves `scale` (= EDM `weight`) and `bias`.
- `FourierEmbedding`: its random frequencies live in the non-trainable collection `"buffers"`
  (leaf `freqs`), so `params` holds trainable leaves only and a converter can overwrite the
  frequencies with the ones pickled in an official NCSN++ checkpoint.
- Resampling filters are compile-time constants (EDM stores them as derivable buffers).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_CONV_DIMS = ("NHWC", "HWIO", "NHWC")
INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


# ----------------------------------------------------------------------------------------------
# Initialisation.

@dataclasses.dataclass(frozen=True)
class Init:
    """EDM's init recipe: a `weight_init` mode plus multipliers for the weight and the bias.

    EDM draws the bias with the same formula as the weight (same fan_in/fan_out) and multiplies it
    by `bias`; the default 0 therefore gives a zero bias.  Frozen so modules can hash it.
    """
    mode: str = "kaiming_normal"
    weight: float = 1.0
    bias: float = 0.0

    def __post_init__(self):
        if self.mode not in INIT_MODES:
            raise ValueError(f"init mode {self.mode!r} is not one of {INIT_MODES}")


def edm_initializer(mode: str, fan_in: int, fan_out: int, multiplier: float):
    """Returns a flax initializer `(key, shape, dtype) -> array` for EDM's `weight_init(...) * m`.

    xavier_uniform sqrt(6/(fan_in+fan_out)) U(-1,1); xavier_normal sqrt(2/(fan_in+fan_out)) N(0,1);
    kaiming_uniform sqrt(3/fan_in) U(-1,1); kaiming_normal sqrt(1/fan_in) N(0,1).
    """
    if mode not in INIT_MODES:
        raise ValueError(f"init mode {mode!r} is not one of {INIT_MODES}")

    def init(key, shape, dtype=jnp.float32):
        if multiplier == 0:  # EDM's init_zero (ADM): exactly zero, no random draw needed
            return jnp.zeros(shape, dtype)
        if mode.endswith("uniform"):
            unit = jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
        else:
            unit = jax.random.normal(key, shape, dtype)
        std = {
            "xavier_uniform": math.sqrt(6 / (fan_in + fan_out)),
            "xavier_normal": math.sqrt(2 / (fan_in + fan_out)),
            "kaiming_uniform": math.sqrt(3 / fan_in),
            "kaiming_normal": math.sqrt(1 / fan_in),
        }[mode]
        return unit * jnp.asarray(std * multiplier, dtype)

    return init


# ----------------------------------------------------------------------------------------------
# Dense and convolution layers.

class Linear(nn.Module):
    """Fully connected layer y = x @ kernel + bias with EDM init (fan_in = in, fan_out = out)."""
    features: int
    use_bias: bool = True
    init_spec: Init = Init()

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        spec = self.init_spec
        kernel = self.param("kernel",
                            edm_initializer(spec.mode, fan_in, self.features, spec.weight),
                            (fan_in, self.features))
        y = x @ kernel.astype(x.dtype)
        if self.use_bias:
            bias = self.param("bias", edm_initializer(spec.mode, fan_in, self.features, spec.bias),
                              (self.features,))
            y = y + bias.astype(x.dtype)
        return y


def resample_filter_2d(taps: Sequence[float]) -> np.ndarray:
    """EDM's 2-D FIR filter outer(f, f) / sum(f)^2 (sums to 1; [1,1] is a 2x2 box of 0.25)."""
    f = np.asarray(tuple(taps), dtype=np.float64)
    return (np.outer(f, f) / f.sum() ** 2).astype(np.float32)


def _depthwise(x, f2d, *, stride: int, pad: tuple, lhs_dilation: int = 1):
    """Applies the same 2-D filter to every channel separately (grouped conv, groups = C)."""
    c = x.shape[-1]
    kernel = jnp.tile(jnp.asarray(f2d, x.dtype)[:, :, None, None], (1, 1, 1, c))
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=(pad, pad),
        lhs_dilation=(lhs_dilation, lhs_dilation), dimension_numbers=_CONV_DIMS,
        feature_group_count=c)


def fir_down(x, f2d, pad: int):
    """EDM down-sampling: depthwise conv with the filter, stride 2, symmetric padding `pad`."""
    return _depthwise(x, f2d, stride=2, pad=(pad, pad))


def fir_up(x, f2d, pad: int):
    """EDM up-sampling: torch `conv_transpose2d(x, 4*f, stride=2, padding=pad, groups=C)`.

    A transposed conv equals a stride-1 conv of the 2x zero-dilated input with the flipped
    kernel and padding K-1-pad per side; the factor 4 restores the mean lost to the inserted zeros.
    """
    k = f2d.shape[0]
    flipped = np.ascontiguousarray(f2d[::-1, ::-1]) * 4
    return _depthwise(x, flipped, stride=1, pad=(k - 1 - pad, k - 1 - pad), lhs_dilation=2)


def _conv(x, w, pad: int):
    return jax.lax.conv_general_dilated(x, w.astype(x.dtype), (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=_CONV_DIMS)


class Conv2d(nn.Module):
    """k x k convolution ('same' padding) with optional FIR up/down-sampling (EDM `Conv2d`).

    Non-fused order: resample (up: transposed filter conv; down: strided filter conv, both with
    padding (len(f)-1)//2), then the k x k conv, then the bias.  `fused_resample` with `down`
    (only NCSN++'s residual-encoder `aux_residual` uses it) convolves first with padding
    k//2 + (len(f)-1)//2 and then filters with stride 2 and no padding.  `kernel=0` gives a
    parameter-free resampler.  fan_in = in*k*k, fan_out = out*k*k as in EDM.
    """
    out_channels: int
    kernel: int
    use_bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: Sequence[int] = (1, 1)
    fused_resample: bool = False
    init_spec: Init = Init()

    @nn.compact
    def __call__(self, x):
        if self.up and self.down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        if self.fused_resample and self.up and self.kernel:
            # EDM defines this branch but no network uses it, and with its padding
            # (k//2 + f_pad on the transposed conv, none on the conv) a 3x3 kernel returns
            # 2H-4 pixels, so there is nothing correct to reproduce.
            raise NotImplementedError("Conv2d: fused up-sampling is not supported")
        cin = x.shape[-1]
        k, spec = self.kernel, self.init_spec
        fan_in, fan_out = cin * k * k, self.out_channels * k * k
        w = b = None
        if k:
            w = self.param("kernel", edm_initializer(spec.mode, fan_in, fan_out, spec.weight),
                           (k, k, cin, self.out_channels))
            if self.use_bias:
                b = self.param("bias", edm_initializer(spec.mode, fan_in, fan_out, spec.bias),
                               (self.out_channels,))
        elif cin != self.out_channels:
            raise ValueError(f"Conv2d: kernel=0 resampler cannot map {cin} to {self.out_channels} "
                             "channels")
        f = resample_filter_2d(self.resample_filter) if (self.up or self.down) else None
        w_pad = k // 2
        f_pad = (f.shape[0] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.down and w is not None:
            x = _conv(x, w, w_pad + f_pad)
            x = _depthwise(x, f, stride=2, pad=(0, 0))
        else:
            if self.up:
                x = fir_up(x, f, f_pad)
            if self.down:
                x = fir_down(x, f, f_pad)
            if w is not None:
                x = _conv(x, w, w_pad)
        if b is not None:
            x = x + b.astype(x.dtype)
        return x


# ----------------------------------------------------------------------------------------------
# Normalisation.

def group_count(num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """EDM's rule min(num_groups, C // min_channels_per_group): narrow layers keep >= 4 ch/group."""
    groups = min(num_groups, num_channels // min_channels_per_group)
    if groups < 1 or num_channels % groups:
        raise ValueError(f"GroupNorm: {num_channels} channels cannot form {groups} equal groups "
                         f"(need >= {min_channels_per_group} channels, divisible)")
    return groups


class GroupNorm(nn.Module):
    """Group normalisation over (spatial, channels-in-group) with per-channel affine (EDM init 1/0).

    Statistics are computed in float32 with the two-pass (biased) variance, as torch does.
    """
    num_groups: int = 32
    min_channels_per_group: int = 4
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        g = group_count(c, self.num_groups, self.min_channels_per_group)
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.float32).reshape(x.shape[0], -1, g, c // g)
        mean = xf.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale + bias).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Scalar embeddings.

def positional_embedding(x, num_channels: int, max_positions: int = 10000,
                         endpoint: bool = False):
    """[cos(x f_i), sin(x f_i)], f_i = (1/max_positions)^(i / (C/2 - endpoint)), i < C/2.

    SongUNet uses endpoint=True (lowest frequency exactly 1/max_positions), ADM endpoint=False.
    """
    half = num_channels // 2
    freqs = np.arange(half, dtype=np.float32) / (half - (1 if endpoint else 0))
    freqs = (1.0 / max_positions) ** freqs
    x = jnp.asarray(x, jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class PositionalEmbedding(nn.Module):
    """Module form of `positional_embedding` (no variables), named like EDM's `map_noise`."""
    num_channels: int
    max_positions: int = 10000
    endpoint: bool = False

    def __call__(self, x):
        return positional_embedding(x, self.num_channels, self.max_positions, self.endpoint)


class FourierEmbedding(nn.Module):
    """[cos(2 pi x f), sin(2 pi x f)] with C/2 random frequencies f ~ N(0, scale^2) (NCSN++).

    The frequencies are a non-trainable variable in collection "buffers" (leaf `freqs`), drawn
    from the 'params' rng at init: they are part of a trained model (official NCSN++ pickles
    carry them), so they must travel with the params and a converter must be able to replace them.
    """
    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, x):
        if not self.is_initializing() and not self.has_variable("buffers", "freqs"):
            raise ValueError(
                f"{type(self).__name__} ({self.name}): the 'buffers' collection is missing; pass "
                "the variables returned by init, e.g. apply({'params': p, 'buffers': b}, ...)")
        freqs = self.variable(
            "buffers", "freqs",
            lambda: jax.random.normal(self.make_rng("params"), (self.num_channels // 2,),
                                      jnp.float32) * self.scale)
        x = jnp.asarray(x, jnp.float32)[:, None] * (2 * np.pi * freqs.value)[None, :]
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


# ----------------------------------------------------------------------------------------------
# Attention and the U-Net block.

def attention(qkv, num_heads: int):
    """Multi-head self-attention over pixels from the qkv 1x1-conv output (N, H, W, 3C).

    Channel layout as EDM's `reshape(N*heads, C/heads, 3, H*W)` of the NCHW qkv tensor: channel
    index = (head * C/heads + c) * 3 + {0: q, 1: k, 2: v}; the result's channel index is
    head * C/heads + c.  Logits q.k / sqrt(C/heads) and the softmax are computed in float32.
    """
    n, h, w, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    qkv = qkv.reshape(n, h * w, num_heads, d, 3)
    q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
    logits = jnp.einsum("nqhc,nkhc->nhqk", q.astype(jnp.float32),
                        k.astype(jnp.float32) / np.sqrt(d))
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhc->nqhc", weights, v)
    return out.reshape(n, h, w, c)


class UNetBlock(nn.Module):
    """EDM's unified residual block (DDPM++, NCSN++ and ADM), optional up/down and attention.

    h = conv0(silu(norm0(x)))                     (conv0 carries the resampling)
    p = affine(emb) [+ affine_s(emb_s)]           (broadcast over pixels)
    adaptive_scale: h = silu(shift + norm1(h) * (scale + 1)), (scale, shift) = split(p)
    else:           h = silu(norm1(h + p))
    h = (conv1(dropout(h)) + skip(x)) * skip_scale
    attention:      h = (proj(attn(qkv(norm2(h)))) + h) * skip_scale

    `skip` exists iff channels change or the block resamples; it is a 1x1 conv if `resample_proj`
    or channels change, else a parameter-free resampler.  `affine_s` (jaxdistill extension for
    CTM's second time s) is created when `s_embedding`; it uses `init_s` (default `init_zero`) so
    a block warm-started from an EDM checkpoint starts as (ADM: exactly) the teacher's block.
    """
    out_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: Optional[int] = None
    channels_per_head: int = 64
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-5
    resample_filter: Sequence[int] = (1, 1)
    resample_proj: bool = False
    adaptive_scale: bool = True
    init_spec: Init = Init()
    init_zero: Init = Init(weight=0.0)
    init_attn: Optional[Init] = None
    s_embedding: bool = False
    init_s: Optional[Init] = None

    @property
    def heads(self) -> int:
        """EDM: 0 without attention, else num_heads or out_channels // channels_per_head.

        Like EDM, a block narrower than channels_per_head silently gets no attention (0 heads).
        """
        if not self.attention:
            return 0
        return self.num_heads if self.num_heads is not None else (
            self.out_channels // self.channels_per_head)

    @nn.compact
    def __call__(self, x, emb, emb_s=None, train: bool = False):
        cin, cout = x.shape[-1], self.out_channels
        resample = dict(up=self.up, down=self.down, resample_filter=tuple(self.resample_filter))

        h = Conv2d(cout, 3, init_spec=self.init_spec, name="conv0", **resample)(
            nn.silu(GroupNorm(eps=self.eps, name="norm0")(x)))

        width = cout * (2 if self.adaptive_scale else 1)
        p = Linear(width, init_spec=self.init_spec, name="affine")(emb)
        if self.s_embedding:
            if emb_s is None:
                raise ValueError(f"UNetBlock {self.name}: s_embedding=True needs emb_s")
            init_s = self.init_s if self.init_s is not None else self.init_zero
            p = p + Linear(width, init_spec=init_s, name="affine_s")(emb_s)
        p = p[:, None, None, :].astype(h.dtype)
        if self.adaptive_scale:
            scale, shift = jnp.split(p, 2, axis=-1)
            h = nn.silu(shift + GroupNorm(eps=self.eps, name="norm1")(h) * (scale + 1))
        else:
            h = nn.silu(GroupNorm(eps=self.eps, name="norm1")(h + p))

        h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
        h = Conv2d(cout, 3, init_spec=self.init_zero, name="conv1")(h)
        if cout != cin or self.up or self.down:
            kernel = 1 if (self.resample_proj or cout != cin) else 0
            x = Conv2d(cout, kernel, init_spec=self.init_spec, name="skip", **resample)(x)
        h = (h + x) * self.skip_scale

        heads = self.heads
        if heads:
            if cout % heads:
                raise ValueError(f"UNetBlock {self.name}: {cout} channels not divisible by "
                                 f"{heads} heads")
            init_attn = self.init_attn if self.init_attn is not None else self.init_spec
            qkv = Conv2d(cout * 3, 1, init_spec=init_attn, name="qkv")(
                GroupNorm(eps=self.eps, name="norm2")(h))
            a = Conv2d(cout, 1, init_spec=self.init_zero, name="proj")(attention(qkv, heads))
            h = (a + h) * self.skip_scale
        return h


# ----------------------------------------------------------------------------------------------
# Input handling shared by the U-Nets (validation, per-sample vectors, label dropout).

def check_image(net: str, what: str, x, resolution: int, channels: int):
    """Raises ValueError unless x is (N, resolution, resolution, channels) NHWC."""
    expected = (resolution, resolution, channels)
    if getattr(x, "ndim", None) != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{net}: expected {what} of shape (N, {resolution}, {resolution}, {channels}) "
            f"(NHWC, resolution {resolution}, {channels} channels), got "
            f"{tuple(getattr(x, 'shape', ()))}")


def check_vectors(net: str, what: str, v, n: int, dim: int):
    """Raises ValueError unless v is (n, dim)."""
    if tuple(jnp.shape(v)) != (n, dim):
        raise ValueError(f"{net}: expected {what} of shape ({n}, {dim}), got {tuple(jnp.shape(v))}")


def per_sample(net: str, what: str, v, n: int):
    """Returns v as a float32 (n,) vector; a scalar/size-1 value is broadcast to the batch."""
    v = jnp.asarray(v, jnp.float32)
    if v.size == 1:
        return jnp.broadcast_to(v.reshape(()), (n,))
    if v.size != n:
        raise ValueError(f"{net}: {what} must have shape ({n},) (one per sample), "
                         f"got {tuple(v.shape)}")
    return v.reshape(n)


def prepare_labels(module: nn.Module, net: str, class_labels, n: int, label_dim: int,
                   label_dropout: float, train: bool):
    """Class labels as (n, label_dim) float32; None means zeros (= unconditional).

    Label dropout (train only, 'dropout' rng) zeroes whole label vectors with probability
    label_dropout, as EDM does for classifier-free guidance.
    """
    if class_labels is None:
        return jnp.zeros((n, label_dim), jnp.float32)
    check_vectors(net, "class_labels", class_labels, n, label_dim)
    labels = jnp.asarray(class_labels, jnp.float32)
    if train and label_dropout:
        keep = jax.random.uniform(module.make_rng("dropout"), (n, 1)) >= label_dropout
        labels = labels * keep.astype(labels.dtype)
    return labels


def check_extensions(net: str, *, s_embedding: bool, noise_labels_s, guidance_embed: bool,
                     guidance, cond_channels: int, cond, augment_dim: int, augment_labels):
    """Clear errors for inputs that the module's switches require or forbid."""
    if s_embedding and noise_labels_s is None:
        raise ValueError(f"{net}: s_embedding=True requires noise_labels_s (N,)")
    if not s_embedding and noise_labels_s is not None:
        raise ValueError(f"{net}: noise_labels_s given but s_embedding=False")
    if guidance_embed and guidance is None:
        raise ValueError(f"{net}: guidance_embed=True requires guidance (N,)")
    if not guidance_embed and guidance is not None:
        raise ValueError(f"{net}: guidance given but guidance_embed=False")
    if cond_channels and cond is None:
        raise ValueError(f"{net}: cond_channels={cond_channels} requires cond (N, H, W, "
                         f"{cond_channels})")
    if not cond_channels and cond is not None:
        raise ValueError(f"{net}: cond given but cond_channels=0")
    if not augment_dim and augment_labels is not None:
        raise ValueError(f"{net}: augment_labels given but augment_dim=0")


def unet_inputs(net: str, module: nn.Module, x, cond, noise_labels_s, guidance, augment_labels):
    """Validates a U-Net's inputs against its switches and joins the condition to x on channels."""
    check_image(net, "x", x, module.img_resolution, module.in_channels)
    check_extensions(net, s_embedding=module.s_embedding, noise_labels_s=noise_labels_s,
                     guidance_embed=module.guidance_embed, guidance=guidance,
                     cond_channels=module.cond_channels, cond=cond,
                     augment_dim=module.augment_dim, augment_labels=augment_labels)
    if cond is not None:
        check_image(net, "cond", cond, module.img_resolution, module.cond_channels)
        x = jnp.concatenate([x, jnp.asarray(cond, x.dtype)], axis=-1)
    return x


def block_class(remat: bool):
    """UNetBlock, or its rematerialised form that recomputes activations in the backward pass.

    `train` (argument 4, counting self) is static under remat because it switches dropout.
    """
    return nn.remat(UNetBlock, static_argnums=(4,)) if remat else UNetBlock



def image_data_fields(shape: tuple, label_dim: int) -> dict:
    """The U-Nets' constructor fields that the data fixes: (R, R, C) images and their classes."""
    if len(shape) != 3 or shape[0] != shape[1]:
        raise ValueError(f"config.model.shape={tuple(shape)}: a U-Net needs square (R, R, C) "
                         "images; use the mlp network for vector data")
    return {"img_resolution": shape[0], "in_channels": shape[2], "out_channels": shape[2],
            "label_dim": label_dim}
