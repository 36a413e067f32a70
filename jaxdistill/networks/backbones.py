"""The frozen pretrained feature networks of CTM's projected GAN: built from config, their weights
read from user-supplied files, and the official input preparation.

Official backbones (sony/ctm `code/cm/enc_dec_lib.py` load_discriminator_and_d_feature_extractor):
`deit_base_distilled_patch16_224` (jaxdistill.networks.deit) and `tf_efficientnet_lite0`
(jaxdistill.networks.efficientnet).  Input (enc_dec_lib.get_feature; normalisation statistics
from `pg_modules/projector.py` get_backbone_normstats and `feature_networks/constants.py`):
images in [-1, 1] (after DiffAugment) -> [0, 1] -> (x - mean) / std with ImageNet statistics
for DeiT and mean = std = 0.5 for EfficientNet-lite -> bilinear (align_corners=False) to 224.
Officially images of 256 px or more are not resized; they are here (to `image_size`), since the
official DeiT readout only works on a 14x14 token grid anyway.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.networks.deit import DeiTFeatures, load_deit_params
from jaxdistill.networks.efficientnet import EfficientNetLiteFeatures, load_efficientnet_variables
from jaxdistill.networks.lpips import resize_bilinear

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Collections read from the weight files; every other collection is random and frozen.
PRETRAINED_COLLECTIONS = ("params", "batch_stats")
PRETRAINED = ("deit", "efficientnet")


class Backbone(NamedTuple):
    module: nn.Module
    norm: Tuple[Sequence[float], Sequence[float]]
    image_size: int
    load: Callable[[], dict]   # () -> the pretrained collections, from the user's file


def prepare_images(x: jax.Array, mean, std, size: int) -> jax.Array:
    """NHWC images in [-1, 1] -> the backbone's input: RGB (gray repeated), [0, 1], normalised,
    bilinearly resized to size x size."""
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = ((x + 1.0) / 2.0 - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)
    return resize_bilinear(x, size)


def build(name: str, mc) -> Backbone:
    """The backbone `name` ('deit' or 'efficientnet') as configured in config.method.<name>."""
    if name == "deit":
        c = mc.deit
        module = DeiTFeatures(width=c.width, num_heads=c.num_heads, patch_size=c.patch_size,
                              image_size=c.image_size, hooks=tuple(c.hooks))
        return Backbone(module, IMAGENET_NORM, c.image_size,
                        lambda: {"params": load_deit_params(c.weights, module)})
    if name == "efficientnet":
        c = mc.efficientnet
        module = EfficientNetLiteFeatures(c.width_multiplier, c.depth_multiplier)
        return Backbone(module, INCEPTION_NORM, c.image_size,
                        lambda: load_efficientnet_variables(c.weights, module))
    raise ValueError(f"config.method.gan_backbones: {name!r} is not one of "
                     f"{('teacher',) + PRETRAINED}")


def features(backbone: Backbone, variables: dict, x: jax.Array):
    """The backbone's four feature maps of images x in [-1, 1] (gradients flow to x)."""
    return backbone.module.apply(variables, prepare_images(x, *backbone.norm, backbone.image_size))


def init_random(backbone: Backbone, key: jax.Array, image_shape: Sequence[int]):
    """(random frozen collections, abstract feature maps) for images of `image_shape` (HWC).

    The random collections (DeiT's readout convs) are drawn from `key`; the pretrained ones are
    not needed here (only shapes), so no weight file is read.
    """
    x = prepare_images(jnp.zeros((1,) + tuple(image_shape)), *backbone.norm, backbone.image_size)

    def random_collections(k):  # jitted so that the pretrained collections' draws are dropped
        variables = backbone.module.init(k, x)
        return {c: v for c, v in variables.items() if c not in PRETRAINED_COLLECTIONS}

    abstract = jax.eval_shape(backbone.module.init, key, x)
    return jax.jit(random_collections)(key), jax.eval_shape(backbone.module.apply, abstract, x)
