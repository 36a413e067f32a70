"""LPIPS-VGG perceptual distance in JAX/Flax (linen, NHWC), with loaders for user-supplied weights.

What LPIPS computes (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", arXiv 1801.03924; reference code github.com/richzhang/PerceptualSimilarity,
files lpips/lpips.py and lpips/pretrained_networks.py), version 0.1, trunk 'vgg':

1. Input images in [-1, 1] go through the *scaling layer* (x - shift) / scale with per-channel
   shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450)  [lpips.py ScalingLayer].
   These equal the ImageNet statistics rewritten for [-1, 1] inputs: shift = 2*mean - 1,
   scale = 2*std with mean = (0.485, 0.456, 0.406), std = (0.229, 0.224, 0.225). So the piq
   library's LPIPS (which takes [0, 1] images and normalises with the ImageNet mean/std) sees the
   same network input as official LPIPS given the same picture in [-1, 1].
2. torchvision's `vgg16().features` (Simonyan & Zisserman 2014), tapped after relu1_2, relu2_2,
   relu3_3, relu4_3, relu5_3; pretrained_networks.py slices `features` at indices [0:4], [4:9],
   [9:16], [16:23], [23:30], so the network used is 13 3x3 convs (padding 1, with bias) each
   followed by ReLU, and the 4 2x2/stride-2 max-pools between the blocks (torchvision's 5th pool,
   index 30, is never reached). Conv indices in `features`: 0 2 | 5 7 | 10 12 14 | 17 19 21 |
   24 26 28; pools at 4 9 16 23 (30).
3. Each tap is unit-normalised over channels, f / (sqrt(sum_c f^2) + 1e-10)
   [lpips normalize_tensor], the two images' normalised taps are subtracted and squared, a
   1x1 conv `linK` with one output channel and no bias (weights learned non-negative; a Dropout
   precedes it during training, hence the state-dict key `linK.model.1.weight`) maps the squared
   difference to one channel, which is averaged over space [lpips.py spatial_average]; the five
   per-tap numbers are summed. The result is one distance per example.

Use in CTM (Kim et al. 2023, code github.com/sony/ctm, code/cm/karras_diffusion.py
get_CTM_loss and code/cm/enc_dec_lib.py; notes in shared/research/ctm_dmd2_msd.md section 1.5):
images in [-1, 1] smaller than 256 px are upsampled bilinearly to 224x224
(`F.interpolate(..., size=224, mode="bilinear")`, i.e. align_corners=False, no antialias), mapped to
[0, 1] and fed to `piq.LPIPS(replace_pooling=True, reduction="none")`. piq expects [0, 1] inputs
and applies the ImageNet mean/std (equivalent to step 1 above, see there), uses the same
VGG16/taps/normalisation/learned weights, but `replace_pooling=True` swaps every max-pool for a
2x2/stride-2 *average* pool (piq/perceptual.py ContentLoss.replace_pooling). `lpips_distance`
therefore takes [-1, 1] images (no [0, 1] mapping is needed here: the scaling layer already does
the equivalent) and has `pooling="max"` (official LPIPS, the default) or `pooling="avg"`
(piq with replace_pooling=True, as CTM trains).

Weights cannot be downloaded here; the user supplies two files (see `load_lpips_from_dir`):
  * `vgg.pth`: the LPIPS linear layers, shipped inside the `lpips` pip package at
    lpips/weights/v0.1/vgg.pth (also in the PerceptualSimilarity repo); a torch state dict with
    keys `lin{k}.model.1.weight` of shape (1, C_k, 1, 1), C = 64, 128, 256, 512, 512.
  * `vgg16-397923af.pth`: torchvision's ImageNet VGG16 weights (the file torchvision downloads for
    `vgg16(weights=VGG16_Weights.IMAGENET1K_V1)`, https://download.pytorch.org/models/
    vgg16-397923af.pth); keys `features.{i}.weight` (OIHW) and `features.{i}.bias`.
Either may instead be an `.npz` holding the same keys and torch layouts (see `convert_pth_to_npz`),
so that torch is only needed once, on any machine, to convert.

The params pytree is plain: {"vgg": {"conv1_1": {"kernel": HWIO, "bias": (O,)}, ...},
"lin": {"lin0": (1, 1, 64, 1) HWIO, ..., "lin4": (1, 1, 512, 1)}}.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.networks.weights import TORCH_PIN, read_state_dict

# --- constants (sources: see module docstring) -------------------------------------------------

# LPIPS ScalingLayer constants [lpips/lpips.py], for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# ImageNet statistics used by torchvision and piq for inputs in [0, 1] (for documentation/tests).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Added to the channel norm before dividing [lpips normalize_tensor, piq EPS].
NORM_EPS = 1e-10

# VGG16 convs by block: (name, torchvision `features` index, in channels, out channels).
VGG16_CONVS: Tuple[Tuple[str, int, int, int], ...] = (
    ("conv1_1", 0, 3, 64), ("conv1_2", 2, 64, 64),
    ("conv2_1", 5, 64, 128), ("conv2_2", 7, 128, 128),
    ("conv3_1", 10, 128, 256), ("conv3_2", 12, 256, 256), ("conv3_3", 14, 256, 256),
    ("conv4_1", 17, 256, 512), ("conv4_2", 19, 512, 512), ("conv4_3", 21, 512, 512),
    ("conv5_1", 24, 512, 512), ("conv5_2", 26, 512, 512), ("conv5_3", 28, 512, 512),
)
# Blocks of conv names; a 2x2/2 pool sits between consecutive blocks (4 pools in total).
VGG16_BLOCKS: Tuple[Tuple[str, ...], ...] = (
    ("conv1_1", "conv1_2"), ("conv2_1", "conv2_2"), ("conv3_1", "conv3_2", "conv3_3"),
    ("conv4_1", "conv4_2", "conv4_3"), ("conv5_1", "conv5_2", "conv5_3"),
)
# LPIPS taps (the ReLU after the last conv of each block) and their torchvision indices.
LPIPS_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
LPIPS_TAP_INDICES = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)

# File names expected by `load_lpips_from_dir`.
LIN_FILES = ("vgg.npz", "vgg.pth")
VGG_FILES = ("vgg16.npz", "vgg16-397923af.pth")
CONFIG_FIELD = "config.method.lpips_weights_dir"


# --- network -----------------------------------------------------------------------------------

class VGG16Features(nn.Module):
    """torchvision `vgg16().features` up to relu5_3, NHWC; returns the five LPIPS taps.

    13 3x3 convs (stride 1, padding 1, bias) each followed by ReLU, with a 2x2 stride-2 pool
    (no padding, odd sizes floor like torch) between blocks. `pooling="max"` is torchvision /
    official LPIPS; `pooling="avg"` is piq's `replace_pooling=True`. Kernel init follows
    torchvision's VGG (kaiming-normal, fan_out, ReLU gain; zero bias), only for random params.
    """
    pooling: str = "max"

    @nn.compact
    def __call__(self, x):
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"VGG16Features: pooling={self.pooling!r} is not 'max' or 'avg'")
        pool = nn.max_pool if self.pooling == "max" else nn.avg_pool
        out_ch = {name: o for name, _, _, o in VGG16_CONVS}
        taps = []
        for b, block in enumerate(VGG16_BLOCKS):
            if b > 0:
                x = pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
            for name in block:
                x = nn.Conv(out_ch[name], (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                            bias_init=nn.initializers.zeros, name=name)(x)
                x = nn.relu(x)
            taps.append(x)
        return tuple(taps)


def _unit_normalize(f):
    """f / (||f||_channels + 1e-10), as lpips normalize_tensor; NaN-free gradient at f == 0."""
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + NORM_EPS)


def lpips_head(feats0: Sequence[jax.Array], feats1: Sequence[jax.Array],
               lin: Mapping[str, jax.Array]) -> jax.Array:
    """LPIPS on given taps: sum_k mean_hw( sum_c w_kc (n0_k - n1_k)^2 ), per example -> (N,).

    feats*: NHWC feature maps (one per tap); lin: {"lin{k}": HWIO kernel (1, 1, C_k, 1)}.
    Follows lpips.py LPIPS.forward (lpips=True, spatial=False).
    """
    total = 0.0
    for k, (f0, f1) in enumerate(zip(feats0, feats1)):
        d = jnp.square(_unit_normalize(f0) - _unit_normalize(f1))
        w = lin[f"lin{k}"].reshape(-1).astype(d.dtype)
        total = total + jnp.mean(jnp.einsum("nhwc,c->nhw", d, w), axis=(1, 2))
    return total


def resize_bilinear(x: jax.Array, size: Union[int, Tuple[int, int]]) -> jax.Array:
    """Bilinear NHWC resize with torch `F.interpolate(mode="bilinear", align_corners=False)`
    semantics (half-pixel centres, edge clamping, no antialiasing when shrinking)."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if (x.shape[1], x.shape[2]) == (h, w):
        return x
    return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="bilinear",
                            antialias=False)


def _prepare(x, name):
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"lpips_distance: {name} must be NHWC with 1 or 3 channels, "
                         f"got shape {x.shape}")
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return x


def lpips_distance(params, x: jax.Array, y: jax.Array, *,
                   resize_to: Optional[Union[int, Tuple[int, int]]] = 224,
                   pooling: str = "max") -> jax.Array:
    """LPIPS-VGG distance between NHWC image batches in [-1, 1]; returns shape (N,).

    Pure and jittable (make `resize_to` / `pooling` static, e.g. with functools.partial).
    Grayscale (1-channel) inputs are repeated to 3 channels. Both batches are bilinearly resized
    to `resize_to` (int = square, or (H, W); None = keep size), as CTM does with 224 (see module
    docstring; CTM only resizes images smaller than 256 px, pass None for larger ones). The
    input needs at least 16x16 pixels after resizing (4 pools).
    `pooling="avg"` reproduces piq.LPIPS(replace_pooling=True) as used by CTM.
    """
    x, y = _prepare(x, "x"), _prepare(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"lpips_distance: x {x.shape} and y {y.shape} differ in shape")
    if resize_to is not None:
        x, y = resize_bilinear(x, resize_to), resize_bilinear(y, resize_to)
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    n = x.shape[0]
    both = (jnp.concatenate([x, y], axis=0) - shift) / scale
    feats = VGG16Features(pooling=pooling).apply({"params": params["vgg"]}, both)
    return lpips_head([f[:n] for f in feats], [f[n:] for f in feats], params["lin"])


# --- parameters --------------------------------------------------------------------------------

def init_lpips_params(key: jax.Array):
    """Random params with the real shapes, for tests and shape checks (no pretrained values).

    VGG kernels kaiming-normal (fan_out, ReLU gain) with zero bias, as torchvision initialises
    VGG; lin weights uniform in [0, 2/C) (non-negative, as the trained LPIPS weights are). The
    tree equals `VGG16Features().init(...)["params"]` in structure and shapes. The 14.7M numbers
    are drawn with numpy seeded from `key` (deterministic; a jitted jax.random draw of that size
    takes >10 s to compile on CPU), so `key` must be concrete (not traced).
    """
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(data).astype(np.uint32).ravel().tolist())
    vgg = {}
    for name, _, cin, cout in VGG16_CONVS:
        std = np.float32((2.0 / (9 * cout)) ** 0.5)
        kernel = rng.standard_normal((3, 3, cin, cout), dtype=np.float32) * std
        vgg[name] = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((cout,), jnp.float32)}
    lin = {f"lin{k}": jnp.asarray(rng.uniform(0.0, 2.0 / c, (1, 1, c, 1)).astype(np.float32))
           for k, c in enumerate(LPIPS_CHANNELS)}
    return {"vgg": vgg, "lin": lin}


def params_to_torch_layout(params) -> Tuple[dict, dict]:
    """Inverse of loading: (lin_state, vgg_state) numpy dicts with the torch keys and layouts
    (OIHW kernels), e.g. to write test fixtures or share converted weights."""
    lin = {f"lin{k}.model.1.weight":
           np.transpose(np.asarray(params["lin"][f"lin{k}"]), (3, 2, 0, 1))
           for k in range(len(LPIPS_CHANNELS))}
    vgg = {}
    for name, idx, _, _ in VGG16_CONVS:
        p = params["vgg"][name]
        vgg[f"features.{idx}.weight"] = np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1))
        vgg[f"features.{idx}.bias"] = np.asarray(p["bias"])
    return lin, vgg


def _missing_file_message(what: str, directory: str) -> str:
    return (
        f"LPIPS weights: {what} not found in {directory!r}. {CONFIG_FIELD} must name a directory "
        f"holding (1) 'vgg.pth' (or 'vgg.npz'): the LPIPS v0.1 linear layers, shipped in the "
        f"`lpips` pip package as lpips/weights/v0.1/vgg.pth (also in github.com/richzhang/"
        f"PerceptualSimilarity), and (2) 'vgg16-397923af.pth' (or 'vgg16.npz'): torchvision's "
        f"ImageNet VGG16 weights, https://download.pytorch.org/models/vgg16-397923af.pth. Nothing "
        f"is downloaded automatically; .pth files are read with torch ({TORCH_PIN}) or convert "
        f"them once with jaxdistill.networks.lpips.convert_pth_to_npz(src, dst).")


def _read_state(path: str) -> dict:
    """State dict of numpy arrays from a torch .pth/.pt file or an .npz file."""
    return read_state_dict(
        path, _missing_file_message(repr(os.path.basename(os.fspath(path))),
                                    os.path.dirname(os.fspath(path)) or "."),
        convert_hint="convert the file to .npz on a machine with torch via "
                     "jaxdistill.networks.lpips.convert_pth_to_npz(src, dst) and point at the .npz "
                     "(load_lpips_from_dir looks for 'vgg.npz' and 'vgg16.npz').")


def convert_pth_to_npz(src: str, dst: str) -> None:
    """Writes the tensors of torch state dict `src` (.pth) to `dst` (.npz), same keys/layouts."""
    state = _read_state(src)
    np.savez(dst, **state)


def _lin_from_state(state: Mapping[str, np.ndarray], path: str) -> dict:
    lin = {}
    pattern = re.compile(r"^(?:.*\.)?lin(\d)\.model\.(\d+)\.weight$")
    for key, value in state.items():
        m = pattern.match(key)
        if m:
            lin[int(m.group(1))] = value
    out = {}
    for k, c in enumerate(LPIPS_CHANNELS):
        if k not in lin:
            raise ValueError(f"{path!r}: no 'lin{k}.model.1.weight' (LPIPS linear layer); keys "
                             f"found: {sorted(state)[:12]}")
        w = np.asarray(lin[k], np.float32)
        if w.shape != (1, c, 1, 1):
            raise ValueError(f"{path!r}: lin{k} weight has shape {w.shape}, "
                             f"expected (1, {c}, 1, 1)")
        out[f"lin{k}"] = jnp.asarray(np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO
    return out


def _vgg_key(state: Mapping[str, np.ndarray], idx: int, kind: str) -> Optional[str]:
    # torchvision: features.{i}.*; a full LPIPS module state dict: net.slice{s}.{i}.*
    if f"features.{idx}.{kind}" in state:
        return f"features.{idx}.{kind}"
    pattern = re.compile(rf"^(?:.*\.)?slice\d\.{idx}\.{kind}$")
    for key in state:
        if pattern.match(key):
            return key
    return None


def _vgg_from_state(state: Mapping[str, np.ndarray], path: str) -> dict:
    out = {}
    for name, idx, cin, cout in VGG16_CONVS:
        kw, kb = _vgg_key(state, idx, "weight"), _vgg_key(state, idx, "bias")
        if kw is None or kb is None:
            raise ValueError(f"{path!r}: no 'features.{idx}.weight'/'bias' ({name}); is this "
                             f"torchvision's vgg16-397923af.pth? keys found: {sorted(state)[:12]}")
        w, b = np.asarray(state[kw], np.float32), np.asarray(state[kb], np.float32)
        if w.shape != (cout, cin, 3, 3) or b.shape != (cout,):
            raise ValueError(f"{path!r}: {name} (features.{idx}) has weight {w.shape} / bias "
                             f"{b.shape}, expected ({cout}, {cin}, 3, 3) / ({cout},)")
        out[name] = {"kernel": jnp.asarray(np.transpose(w, (2, 3, 1, 0))),  # OIHW -> HWIO
                     "bias": jnp.asarray(b)}
    return out


def load_lpips_params(lin_path: str, vgg_path: str):
    """Params pytree from the LPIPS linear-layer file and torchvision's VGG16 file.

    Each path may be a torch .pth (needs torch) or an .npz with the same keys and layouts.
    """
    for path in (lin_path, vgg_path):
        if not os.path.isfile(os.fspath(path)):
            raise FileNotFoundError(_missing_file_message(
                repr(os.path.basename(os.fspath(path))), os.path.dirname(os.fspath(path)) or "."))
    lin = _lin_from_state(_read_state(lin_path), os.fspath(lin_path))
    vgg = _vgg_from_state(_read_state(vgg_path), os.fspath(vgg_path))
    return {"vgg": vgg, "lin": lin}


def _find(directory: str, names: Sequence[str]) -> Optional[str]:
    for name in names:  # .npz first: no torch needed
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def load_lpips_from_dir(directory: Optional[str]):
    """Loads params from `directory` (= config.method.lpips_weights_dir) holding
    'vgg.npz' or 'vgg.pth' (LPIPS linear layers) and 'vgg16.npz' or 'vgg16-397923af.pth'
    (torchvision VGG16). Raises FileNotFoundError naming what is missing and where it comes from.
    """
    if not directory:
        raise FileNotFoundError(_missing_file_message("the weights directory (unset)", "<unset>"))
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(_missing_file_message("the directory itself", directory))
    lin_path, vgg_path = _find(directory, LIN_FILES), _find(directory, VGG_FILES)
    missing = []
    if lin_path is None:
        missing.append("'vgg.pth' / 'vgg.npz' (LPIPS linear layers)")
    if vgg_path is None:
        missing.append("'vgg16-397923af.pth' / 'vgg16.npz' (torchvision VGG16)")
    if missing:
        raise FileNotFoundError(_missing_file_message(" and ".join(missing), directory))
    return load_lpips_params(lin_path, vgg_path)


def count_params(tree) -> int:
    """Number of scalars in a pytree."""
    return int(sum(np.prod(np.shape(a)) for a in jax.tree_util.tree_leaves(tree)))


lpips_distance_jit = jax.jit(lpips_distance, static_argnames=("resize_to", "pooling"))
__all__ = [
    "VGG16Features", "lpips_head", "lpips_distance", "lpips_distance_jit", "resize_bilinear",
    "init_lpips_params", "load_lpips_params", "load_lpips_from_dir", "convert_pth_to_npz",
    "params_to_torch_layout", "count_params",
]
