"""tf_efficientnet_lite0 feature network for CTM's projected discriminator (Flax, NHWC).

Sources (facts; the code is written here):
- timm `timm/models/efficientnet.py` (`_gen_efficientnet_lite`, `tf_efficientnet_lite0`:
  channel/depth multipliers 1.0, `bn_eps=1e-3` (BN_EPS_TF_DEFAULT), `pad_type='same'`) and
  `timm/models/_efficientnet_builder.py` (`decode_arch_def(..., fix_first_last=True)`,
  `round_channels` / `make_divisible`, depth scaling with 'ceil') and
  `_efficientnet_blocks.py` (`DepthwiseSeparableConv`, `InvertedResidual`):
  stem 3x3 stride-2 conv to 32 channels (fixed, `fix_stem=True`) + BN + ReLU6, then 7 stages
      ds  r1 k3 s1 e1 c16 | ir r2 k3 s2 e6 c24 | ir r2 k5 s2 e6 c40 | ir r3 k3 s2 e6 c80 |
      ir  r3 k5 s1 e6 c112 | ir r4 k5 s2 e6 c192 | ir r1 k3 s1 e6 c320
  (stride on a stage's first block; no squeeze-excite in the lite models).  ds: depthwise kxk,
  BN, ReLU6, 1x1, BN (no act).  ir: 1x1 expand, BN, ReLU6, depthwise kxk, BN, ReLU6, 1x1
  project, BN (no act).  Residual add when stride 1 and in == out channels.  Convs have no bias.
  "same" padding of the tf_ variants is TensorFlow's: total padding
  max((ceil(n/s) - 1) s + k - n, 0), the smaller half before (timm `pad_same` / Conv2dSame);
  `lax` 'SAME' padding is defined identically.  BN in eval mode with the running statistics.
- sony/ctm `code/feature_networks/pretrained_builder.py` (`_make_efficientnet`): the four taps are
  the outputs of stem+blocks[0:2], blocks[2:3], blocks[3:5], blocks[5:9] (= stages 1, 2, 4, 6):
  24, 40, 112, 320 channels at strides 4, 8, 16, 32 (56, 28, 14, 7 pixels at 224).
  Input normalisation for tf_efficientnet_lite0 is the "inception" one, mean = std = 0.5
  (sony/ctm `code/feature_networks/constants.py`, `pg_modules/projector.py`).

Variables: `'params'` (conv kernels, BN scale/bias) and `'batch_stats'` (BN running mean/var), both
from the user-supplied timm state dict (`load_efficientnet_variables`).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from jaxdistill.networks.weights import conv_kernel, read_state_dict, take, timm_missing_message

TIMM_NAME = "tf_efficientnet_lite0"
WEIGHTS_URL = ("https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
               "tf_efficientnet_lite0-0aa007d2.pth")
CONFIG_FIELD = "config.method.efficientnet.weights"
BN_EPS = 1e-3
STEM = 32
# (block type, repeats, kernel, stride, expansion, out channels) per stage.
ARCH = (("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40),
        ("ir", 3, 3, 2, 6, 80), ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192),
        ("ir", 1, 3, 1, 6, 320))
TAP_STAGES = (1, 2, 4, 6)


class BlockSpec(NamedTuple):
    kind: str
    kernel: int
    stride: int
    cin: int
    mid: int
    cout: int


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm `make_divisible`: nearest multiple of `divisor` (>= divisor), bumped up when the
    rounding lost more than 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def block_specs(width_multiplier: float = 1.0, depth_multiplier: float = 1.0
                ) -> List[List[BlockSpec]]:
    """The blocks of every stage (timm's builder): channels rounded by `make_divisible`, repeats
    ceil(r * depth_multiplier) except the first and last stage (`fix_first_last`)."""
    stages, cin = [], STEM
    for i, (kind, repeats, k, stride, exp, cout) in enumerate(ARCH):
        fixed = i in (0, len(ARCH) - 1)
        n = repeats if fixed else int(math.ceil(repeats * depth_multiplier))
        cout = make_divisible(cout * width_multiplier)
        blocks = []
        for j in range(n):
            mid = cin if kind == "ds" else make_divisible(cin * exp)
            blocks.append(BlockSpec(kind, k, stride if j == 0 else 1, cin, mid, cout))
            cin = cout
        stages.append(blocks)
    return stages


def _conv(features, kernel, stride=1, groups=1, name=None):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                   feature_group_count=groups, use_bias=False, name=name)


def _bn(name):
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name=name)


class Block(nn.Module):
    """timm DepthwiseSeparableConv ('ds') or InvertedResidual ('ir') without SE, ReLU6."""
    spec: BlockSpec

    @nn.compact
    def __call__(self, x):
        s = self.spec
        h = x
        if s.kind == "ir":
            h = nn.relu6(_bn("bn1")(_conv(s.mid, 1, name="conv_pw")(h)))
        dw_bn = "bn1" if s.kind == "ds" else "bn2"
        h = nn.relu6(_bn(dw_bn)(_conv(s.mid, s.kernel, s.stride, s.mid, name="conv_dw")(h)))
        if s.kind == "ds":
            h = _bn("bn2")(_conv(s.cout, 1, name="conv_pw")(h))
        else:
            h = _bn("bn3")(_conv(s.cout, 1, name="conv_pwl")(h))
        return x + h if s.stride == 1 and s.cin == s.cout else h


class EfficientNetLiteFeatures(nn.Module):
    """The four official CTM taps of tf_efficientnet_lite0 (NHWC), for normalised input images.

    width_multiplier / depth_multiplier shrink the network for tests (1.0 = lite0).
    """
    width_multiplier: float = 1.0
    depth_multiplier: float = 1.0

    @nn.compact
    def __call__(self, x):
        x = nn.relu6(_bn("bn1")(_conv(STEM, 3, 2, name="conv_stem")(x)))
        taps = []
        for i, stage in enumerate(block_specs(self.width_multiplier, self.depth_multiplier)):
            for j, spec in enumerate(stage):
                x = Block(spec, name=f"blocks_{i}_{j}")(x)
            if i in TAP_STAGES:
                taps.append(x)
        return taps


def variables_from_state_dict(state, module: EfficientNetLiteFeatures, source: str) -> dict:
    """Flax {'params', 'batch_stats'} of `module` from a timm state dict; checks every shape."""
    params, stats = {}, {}

    def conv(scope, key, cout, cin_per_group, k):
        scope[key.rsplit(".", 1)[-1]] = {"kernel": take(state, f"{key}.weight",
                                                        (cout, cin_per_group, k, k), source,
                                                        conv_kernel)}

    def bn(p_scope, s_scope, key, c):
        name = key.rsplit(".", 1)[-1]
        p_scope[name] = {"scale": take(state, f"{key}.weight", (c,), source),
                         "bias": take(state, f"{key}.bias", (c,), source)}
        s_scope[name] = {"mean": take(state, f"{key}.running_mean", (c,), source),
                         "var": take(state, f"{key}.running_var", (c,), source)}

    conv(params, "conv_stem", STEM, 3, 3)
    bn(params, stats, "bn1", STEM)
    for i, stage in enumerate(block_specs(module.width_multiplier, module.depth_multiplier)):
        for j, s in enumerate(stage):
            key, p, st = f"blocks.{i}.{j}", {}, {}
            if s.kind == "ir":
                conv(p, f"{key}.conv_pw", s.mid, s.cin, 1)
                bn(p, st, f"{key}.bn1", s.mid)
            conv(p, f"{key}.conv_dw", s.mid, 1, s.kernel)
            bn(p, st, f"{key}.bn1" if s.kind == "ds" else f"{key}.bn2", s.mid)
            conv(p, f"{key}.conv_pw" if s.kind == "ds" else f"{key}.conv_pwl", s.cout, s.mid, 1)
            bn(p, st, f"{key}.bn2" if s.kind == "ds" else f"{key}.bn3", s.cout)
            params[f"blocks_{i}_{j}"], stats[f"blocks_{i}_{j}"] = p, st
    return {"params": params, "batch_stats": stats}


def load_efficientnet_variables(path: str,
                                module: EfficientNetLiteFeatures = EfficientNetLiteFeatures()
                                ) -> dict:
    """{'params', 'batch_stats'} from a user-supplied timm `tf_efficientnet_lite0` file (.pth or
    .npz).  Missing file -> FileNotFoundError saying what to get and which config field to set;
    a missing key or a shape that does not fit `module` -> an error naming the parameter."""
    missing = timm_missing_message("EfficientNet backbone", CONFIG_FIELD, TIMM_NAME, WEIGHTS_URL)
    return variables_from_state_dict(read_state_dict(path, missing), module, repr(path))

