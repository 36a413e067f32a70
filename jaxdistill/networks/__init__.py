"""Flax networks (NHWC) and the factory that builds them from a config.

Every network is a raw function F(x_in, noise_labels, class_labels, ...) in EDM's sense: the
EDM preconditioning (c_skip, c_out, c_in, c_noise) is applied outside by
`jaxdistill.networks.denoiser`, so one network class serves teachers, students and fake-score
networks of every method.

Every network class also declares `data_fields(shape, label_dim)` (the constructor fields the
data fixes) and `output_kernel(params)` (its output layer's kernel in a params-shaped tree, whose
gradient norm sets CTM's adaptive loss weights).

Shared call signature (all networks):
    net.apply({'params': p}, x, noise_labels, class_labels=None, *, train=False,
              noise_labels_s=None, guidance=None, cond=None, augment_labels=None,
              return_features=False, rngs={'dropout': key})
"""
import dataclasses

from jaxdistill.networks.mlp import MLPDenoiser
from jaxdistill.networks.songunet import SongUNet
from jaxdistill.networks.dhariwal import DhariwalUNet

NETWORKS = {
    "mlp": MLPDenoiser,
    "songunet": SongUNet,
    "dhariwal": DhariwalUNet,
}


def check_data_fields(net_cfg, shape: tuple, label_dim: int, field: str) -> None:
    """Fails naming both fields when a network field the data fixes (each network's
    `data_fields`: input size or resolution, channels, classes) disagrees with config.model."""
    if net_cfg.name not in NETWORKS:
        raise ValueError(f"{field}.name={net_cfg.name!r} is not one of {sorted(NETWORKS)}")
    cls = NETWORKS[net_cfg.name]
    source = {"dim": "config.model.shape", "img_resolution": "config.model.shape",
              "in_channels": "config.model.shape", "out_channels": "config.model.shape",
              "label_dim": "config.model.label_dim"}
    for name, wanted in cls.data_fields(tuple(shape), label_dim).items():
        default = cls.__dataclass_fields__[name].default
        given = net_cfg.get(name, default)
        if given != wanted:
            shown = "unset" if given is dataclasses.MISSING else (
                f"{given!r}" + ("" if name in net_cfg else " (default)"))
            raise ValueError(f"{field}.{name}={shown} disagrees with {source[name]}="
                             f"{tuple(shape) if 'shape' in source[name] else label_dim} (the "
                             f"data): set {field}.{name}={wanted}")


def create(name: str, **kwargs):
    """Builds the network called `name` with keyword settings `kwargs` (config data)."""
    if name not in NETWORKS:
        raise ValueError(f"config.network.name={name!r} is not one of {sorted(NETWORKS)}")
    return NETWORKS[name](**kwargs)
