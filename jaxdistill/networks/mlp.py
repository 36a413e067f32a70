"""A small residual MLP denoiser for vector data and small images, with the UNets' signature.

Image-shaped inputs (N, H, W, C) are flattened to H*W*C = `dim` features and the output reshaped
back: on CPU this trains far faster than a convolutional U-Net, which is what the analytic
image-mixture benchmarks need.

Same conditioning options as the UNets, so every method runs on 2-D data with the network it
uses on images: class labels (zero vector = null label), a second noise level (CTM's s), a guidance
weight, an extra condition vector, and returned features for discriminator heads.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxdistill.networks.layers import (PositionalEmbedding, check_extensions, check_vectors,
                                         prepare_labels)


class MLPDenoiser(nn.Module):
    """F(x, c_noise) for x of shape (N, dim) or (N, ...) with dim elements per example."""

    @staticmethod
    def data_fields(shape: tuple, label_dim: int) -> dict:
        """The constructor fields the data fixes (networks.check_data_fields)."""
        return {"dim": math.prod(shape), "label_dim": label_dim}

    @staticmethod
    def output_kernel(params):
        """The output layer's kernel in a params-shaped tree (CTM's adaptive weight layer)."""
        return params["output"]["kernel"]

    dim: int = 2
    hidden: int = 128
    depth: int = 3
    embed: int = 64
    label_dim: int = 0
    label_dropout: float = 0.0
    s_embedding: bool = False
    guidance_embed: bool = False
    cond_channels: int = 0
    dropout: float = 0.0

    def _noise_embedding(self, labels_c_noise, name):
        emb = PositionalEmbedding(num_channels=self.embed, endpoint=True)(labels_c_noise)
        return nn.Dense(self.hidden, name=name)(emb)

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, *, train=False, noise_labels_s=None,
                 guidance=None, cond=None, augment_labels=None, return_features=False):
        net = "MLPDenoiser"
        example_shape = x.shape[1:]
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"{net}: expected x of shape (N, {self.dim}) or (N, ...) with "
                             f"{self.dim} elements per example, got {(x.shape[0],) + example_shape}")
        check_extensions(net, s_embedding=self.s_embedding, noise_labels_s=noise_labels_s,
                         guidance_embed=self.guidance_embed, guidance=guidance,
                         cond_channels=self.cond_channels, cond=cond, augment_dim=0,
                         augment_labels=augment_labels)
        n = x.shape[0]
        emb = self._noise_embedding(noise_labels, "map_noise")
        if self.s_embedding:
            emb = emb + self._noise_embedding(noise_labels_s, "map_noise_s")
        if self.guidance_embed:
            emb = emb + self._noise_embedding(guidance, "map_guidance")
        if self.label_dim:
            labels = prepare_labels(self, net, class_labels, n, self.label_dim,
                                    self.label_dropout, train)
            emb = emb + nn.Dense(self.hidden, name="map_label")(labels)
        emb = nn.silu(nn.Dense(self.hidden, name="map_layer0")(nn.silu(emb)))

        h = x
        if self.cond_channels:
            cond = cond.reshape(n, -1)
            check_vectors(net, "cond", cond, n, self.cond_channels)
            h = jnp.concatenate([h, cond.astype(x.dtype)], axis=1)
        h = nn.Dense(self.hidden, name="input")(h)
        for i in range(self.depth):
            r = nn.silu(nn.LayerNorm(name=f"block{i}_norm")(h) + emb)
            r = nn.Dropout(self.dropout, deterministic=not train)(r)
            h = h + nn.Dense(self.hidden, name=f"block{i}_dense")(r)
            # Per-block features for discriminator heads, shaped like 1x1 feature maps.
            self.sow("intermediates", "encoder", h[:, None, None, :])
        features = h
        out = nn.Dense(self.dim, kernel_init=nn.initializers.zeros, name="output")(nn.silu(h))
        out = out.reshape((x.shape[0],) + example_shape)
        return (out, features) if return_features else out
