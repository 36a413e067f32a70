"""Flax networks (NHWC) and the factory that builds them from a config.

Every network is a raw function F(x_in, noise_labels, class_labels, ...) in EDM's sense: the
EDM preconditioning (c_skip, c_out, c_in, c_noise) is applied outside by
`jaxdistill.networks.denoiser`, so one network class serves teachers, students and fake-score
networks of every method.

Shared call signature (all networks):
    net.apply({'params': p}, x, noise_labels, class_labels=None, *, train=False,
              noise_labels_s=None, guidance=None, cond=None, augment_labels=None,
              return_features=False, rngs={'dropout': key})
"""
from jaxdistill.networks.mlp import MLPDenoiser
from jaxdistill.networks.songunet import SongUNet
from jaxdistill.networks.dhariwal import DhariwalUNet

NETWORKS = {
    "mlp": MLPDenoiser,
    "songunet": SongUNet,
    "dhariwal": DhariwalUNet,
}


def create(name: str, **kwargs):
    """Builds the network called `name` with keyword settings `kwargs` (config data)."""
    if name not in NETWORKS:
        raise ValueError(f"config.network.name={name!r} is not one of {sorted(NETWORKS)}")
    return NETWORKS[name](**kwargs)
