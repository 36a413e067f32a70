"""EDM-preconditioned denoiser around any raw network F (NVlabs/edm training/networks.py EDMPrecond).

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), labels, ...).
`EDMDenoiser` has the call signature every teacher / student / fake-score network shares:
`denoiser(variables, x, sigma, labels=None, *, train=False, rng=None, **net_kwargs)`, the same as
`jaxdistill.data.mixtures.AnalyticTeacher`, so exact and trained teachers are interchangeable.

Mixed precision: with `compute_dtype=bfloat16` the network runs on bf16 copies of the fp32 params
and of its inputs (flax layers compute in the promoted dtype of inputs and params, so both must be
cast), while the preconditioning, the output combination and therefore the loss stay in fp32, and
gradients reach the fp32 params through the casts.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill import diffusion


@dataclasses.dataclass(frozen=True)
class EDMDenoiser:
    net: nn.Module
    sigma_data: float = diffusion.SIGMA_DATA
    compute_dtype: str = "float32"

    def init(self, rng: jax.Array, example_shape: tuple[int, ...], label_dim: int = 0,
             **net_kwargs) -> dict:
        """Variables of the network for examples of `example_shape` (params and any buffers)."""
        x = jnp.zeros((1,) + tuple(example_shape), jnp.float32)
        labels = jnp.zeros((1, label_dim), jnp.float32) if label_dim else None
        rng_params, rng_dropout = jax.random.split(rng)
        return self.net.init({"params": rng_params, "dropout": rng_dropout}, x,
                             jnp.zeros((1,), jnp.float32), labels, **net_kwargs)

    def __call__(self, variables: dict, x: jax.Array, sigma: jax.Array, labels=None, *,
                 train: bool = False, rng: jax.Array | None = None, return_features: bool = False,
                 **net_kwargs):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
        c_skip, c_out, c_in, c_noise = diffusion.edm_precond(sigma, self.sigma_data)
        rngs = {"dropout": rng} if rng is not None else {}
        if train and rng is None:
            raise ValueError("a training-mode forward pass needs an rng (dropout, label dropout)")
        net_in = diffusion.expand_to(c_in, x) * x
        if self.compute_dtype != "float32":
            cast = lambda v: (v.astype(self.compute_dtype)  # noqa: E731
                              if v is not None and jnp.issubdtype(v.dtype, jnp.floating) else v)
            variables, net_in, c_noise, labels = jax.tree.map(
                cast, (variables, net_in, c_noise, labels))
            net_kwargs = jax.tree.map(cast, net_kwargs)
        out = self.net.apply(variables, net_in, c_noise, labels, train=train,
                             return_features=return_features, rngs=rngs, **net_kwargs)
        f, features = out if return_features else (out, None)
        d = diffusion.expand_to(c_skip, x) * x + diffusion.expand_to(c_out, x) * f.astype(jnp.float32)
        return (d, features) if return_features else d
