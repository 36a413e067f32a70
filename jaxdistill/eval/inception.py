"""The FID Inception-v3 (TF graph inception-2015-12-05) in Flax, NHWC, with its weight loader.

What is computed (the network every published FID / IS number uses, Heusel et al. 2017; Salimans
et al. 2016), as pytorch-fid reproduces it (github.com/mseitzer/pytorch-fid, file
src/pytorch_fid/inception.py, v0.3.0: `fid_inception_v3` and `InceptionV3`):

* torchvision's Inception3 (torchvision/models/inception.py) with 1008 output classes and no aux
  head, whose `BasicConv2d` is conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU,
  with four blocks patched to match the TF graph: `FIDInceptionA` (Mixed_5b/c/d) and
  `FIDInceptionC` (Mixed_6b-e) and `FIDInceptionE_1` (Mixed_7b) average-pool their pool branch
  with `count_include_pad=False` (TF's average pool ignores padding); `FIDInceptionE_2`
  (Mixed_7c) max-pools there instead (a quirk of the TF graph).
* Input: pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)` resizes to 299x299
  with `F.interpolate(mode='bilinear', align_corners=False)` (no antialiasing) and maps [0, 1] to
  [-1, 1]. Here `preprocess` takes images in [-1, 1] (`input_range="[-1,1]"`, this library's
  convention) or [0, 255] (`"[0,255]"`, e.g. uint8 values; mapped by x / 127.5 - 1, which is
  pytorch-fid's x / 255 * 2 - 1) and resizes bilinearly with the same half-pixel convention.
* Outputs: the 2048-d global average pool ("pool_3", the FID features) and the 1008-way logits of
  the `fc` layer, with and without its bias. The original Inception Score code
  (openai/improved-gan inception_score.py) takes the softmax of pool_3 @ W without the bias,
  which StyleGAN3 reproduces with `no_output_bias=True` (metrics/inception_score.py); use
  `logits_unbiased` for IS to match published numbers.

Weights are never downloaded. The user supplies pytorch-fid's state dict
`pt_inception-2015-12-05-6726825d.pth` (torch needed to read it) or an `.npz` with the same keys
and torch layouts (`convert_pth_to_npz`), and points `config.eval.inception_weights` at it.
EDM / StyleGAN3's `inception-2015-12-05.pkl` is not read: see `PKL_NOT_SUPPORTED`.

Params are a plain pytree mirroring torch's module names, e.g.
{"Mixed_5b": {"branch1x1": {"conv": {"kernel": HWIO}, "bn": {"scale", "bias", "mean", "var"}}},
 ..., "fc": {"kernel": (2048, 1008), "bias": (1008,)}}.
"""
from __future__ import annotations

import functools
import os
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.networks import weights

RESOLUTION = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
CONFIG_FIELD = "config.eval.inception_weights"
INPUT_RANGES = ("[-1,1]", "[0,255]")
PKL_NOT_SUPPORTED = (
    "EDM / StyleGAN3's inception-2015-12-05.pkl is not supported: it is a plain Python pickle, not "
    "a torch state dict, whose network object is rebuilt while unpickling by calling code the "
    "pickle itself names (the translated TF graph is a module object, not a tensor dict). "
    "torch.load(weights_only=True) refuses such files, and pickle.load would execute that code. "
    "Use pytorch-fid's state dict of the same TF graph instead: " + WEIGHTS_URL)
_HIGHEST = jax.lax.Precision.HIGHEST


# --- network -----------------------------------------------------------------------------------

class _FrozenBatchNorm(nn.Module):
    """Inference BatchNorm with its running statistics stored as (frozen) params."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class BasicConv(nn.Module):
    """torchvision BasicConv2d: conv without bias, BatchNorm(eps 1e-3), ReLU."""
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride,
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST,
                    name="conv")(x)
        return nn.relu(_FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3(x):
    """3x3 / stride 1 / pad 1 average that ignores the padding (TF; count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b/5c/5d)."""
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision InceptionB (Mixed_6a): grid reduction 35 -> 17."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b-6e): factorised 7x7 convolutions."""
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision InceptionD (Mixed_7a): grid reduction 17 -> 8."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (pool="avg", Mixed_7b) / FIDInceptionE_2 (pool="max", Mixed_7c)."""
    pool: str

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, **row, name="branch3x3_2a")(b3),
                              BasicConv(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
                              BasicConv(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:  # max pool with -inf padding, as F.max_pool2d(padding=1)
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Logits(nn.Module):
    """The fc layer, returning (pool @ W + b, pool @ W)."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
        bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
        unbiased = jnp.dot(x, kernel, precision=_HIGHEST)
        return unbiased + bias, unbiased


class InceptionV3(nn.Module):
    """The FID Inception-v3 on preprocessed NHWC input (see `preprocess`).

    Returns {"pool": (N, 2048), "logits": (N, 1008), "logits_unbiased": (N, 1008)}.
    """

    @nn.compact
    def __call__(self, x):
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits, unbiased = _Logits(name="fc")(pool)
        return {"pool": pool, "logits": logits, "logits_unbiased": unbiased}


def preprocess(images: jax.Array, input_range: str = "[-1,1]") -> jax.Array:
    """NHWC images (1 or 3 channels) in `input_range` -> float32 (N, 299, 299, 3) in [-1, 1].

    Bilinear resize with torch's `align_corners=False` convention and no antialiasing, as
    pytorch-fid's `F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)`;
    mapping to [-1, 1] and resizing commute (both linear), so the order differs from
    pytorch-fid's (resize first) only by float rounding.
    """
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range={input_range!r} is not one of {INPUT_RANGES}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Inception input must be NHWC with 1 or 3 channels, got {images.shape}")
    x = images.astype(jnp.float32)
    if input_range == "[0,255]":
        x = x / 127.5 - 1.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (RESOLUTION, RESOLUTION):
        x = jax.image.resize(x, (x.shape[0], RESOLUTION, RESOLUTION, 3), method="bilinear",
                             antialias=False)
    return x


def inception_outputs(params, images: jax.Array, input_range: str = "[-1,1]") -> dict:
    """Pool features and logits (see `InceptionV3`) of NHWC images in `input_range`. Jittable."""
    return InceptionV3().apply({"params": params}, preprocess(images, input_range))


# --- parameters --------------------------------------------------------------------------------

_BN_KEYS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@functools.lru_cache(maxsize=1)
def _abstract_params():
    return jax.eval_shape(lambda: InceptionV3().init(
        jax.random.key(0), jnp.zeros((1, RESOLUTION, RESOLUTION, 3)))["params"])


def _torch_key(path: Sequence[str]) -> str:
    """Flax param path -> pytorch-fid state-dict key (kernel -> weight, BN stats -> running_*)."""
    *modules, leaf = path
    if modules[-1] == "bn":
        leaf = _BN_KEYS[leaf]
    elif leaf == "kernel":
        leaf = "weight"
    return ".".join([*modules, leaf])


def _to_torch_layout(path, value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    return value.T if value.ndim == 2 else np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW


def _from_torch_layout(path, value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    return value.T if value.ndim == 2 else np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO


def _paths(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [tuple(k.key for k in path) for path, _ in leaves], [x for _, x in leaves], treedef


def init_inception_params(seed: int = 0):
    """Random params with the real shapes (tests, shape checks), drawn with numpy (fast, no jit).

    He-normal kernels, BatchNorm at identity (scale 1, bias 0, mean 0, var 1), small fc.
    """
    rng = np.random.default_rng(seed)
    paths, leaves, treedef = _paths(_abstract_params())
    out = []
    for path, leaf in zip(paths, leaves):
        if path[-1] == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape, np.float32) * np.float32(np.sqrt(2 / fan_in))
        elif path[-1] in ("scale", "var"):
            value = np.ones(leaf.shape, np.float32)
        else:
            value = np.zeros(leaf.shape, np.float32)
        out.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, out)


def params_to_state_dict(params) -> dict[str, np.ndarray]:
    """Inverse of loading: numpy arrays under pytorch-fid's keys and torch layouts (for .npz)."""
    paths, leaves, _ = _paths(params)
    return {_torch_key(p): _to_torch_layout(p, np.asarray(x)) for p, x in zip(paths, leaves)}


def params_from_state_dict(state: Mapping[str, np.ndarray], source: str = "state dict"):
    """Params from pytorch-fid's FID Inception state dict (keys such as
    'Mixed_5b.branch1x1.conv.weight', '...bn.running_var', 'fc.weight'); extra keys such as
    'num_batches_tracked' are ignored, missing or misshaped ones raise naming the key."""
    paths, leaves, treedef = _paths(_abstract_params())
    out = []
    for path, leaf in zip(paths, leaves):
        key = _torch_key(path)
        if key not in state:
            raise ValueError(f"{source}: no {key!r}; is this pytorch-fid's {WEIGHTS_FILE}? "
                             f"keys found: {sorted(state)[:8]}...")
        value = _from_torch_layout(path, np.asarray(state[key], np.float32))
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"{source}: {key!r} has shape {np.shape(state[key])}, which does "
                             f"not fit {tuple(leaf.shape)} (flax layout) of the FID Inception")
        out.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, out)


def _missing_file_message(path: str) -> str:
    return (f"FID Inception weights {path!r} not found. Download pytorch-fid's {WEIGHTS_FILE} "
            f"on a machine with internet access ({WEIGHTS_URL}), copy it here and set "
            f"{CONFIG_FIELD}=/path/to/{WEIGHTS_FILE} (on the command line "
            f"--{CONFIG_FIELD}=...). Reading a .pth needs torch; or convert it once with "
            f"jaxdistill.eval.inception.convert_pth_to_npz(src, dst) and point at the .npz.")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Numpy state dict from a torch .pth/.pt (read with weights_only=True) or an .npz file."""
    path = os.fspath(path)
    if not path:
        raise FileNotFoundError(_missing_file_message("<unset>"))
    if path.endswith(".pkl"):
        raise ValueError(f"{path!r}: {PKL_NOT_SUPPORTED}")
    return weights.read_state_dict(
        path, _missing_file_message(path),
        convert_hint="convert the file to .npz on a machine with torch via "
                     "jaxdistill.eval.inception.convert_pth_to_npz(src, dst).")


def convert_pth_to_npz(src: str, dst: str) -> None:
    """Writes the tensors of torch state dict `src` to `dst` (.npz), same keys and layouts."""
    np.savez(dst, **read_state_dict(src))


def load_inception_params(path: str):
    """Params of the FID Inception from `path` (= config.eval.inception_weights): pytorch-fid's
    .pth state dict or an .npz with its keys. Missing file: FileNotFoundError saying where to get
    it and which config field to set."""
    return params_from_state_dict(read_state_dict(path), repr(os.fspath(path)))
