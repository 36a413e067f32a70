"""A small residual MLP denoiser for vector data (the 2-D mixtures), with the UNets' signature.

Same conditioning options as the UNets, so every method runs on 2-D data with the network it
uses on images: class labels (zero vector = null label), a second noise level (CTM's s), a guidance
weight, an extra condition vector, and returned features for discriminator heads.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.networks.layers import PositionalEmbedding


class MLPDenoiser(nn.Module):
    """F(x, c_noise) for x of shape (N, dim); residual SiLU blocks with the embedding added."""
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
        del augment_labels  # no augmentation pipeline for vector data
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPDenoiser expects x of shape (N, {self.dim}), got {x.shape}")
        emb = self._noise_embedding(noise_labels, "map_noise")
        if self.s_embedding:
            if noise_labels_s is None:
                raise ValueError("this network has s_embedding=True: pass noise_labels_s")
            emb = emb + self._noise_embedding(noise_labels_s, "map_noise_s")
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("this network has guidance_embed=True: pass guidance")
            emb = emb + self._noise_embedding(guidance, "map_guidance")
        if self.label_dim:
            labels = (jnp.zeros((x.shape[0], self.label_dim), x.dtype) if class_labels is None
                      else class_labels.astype(x.dtype))
            if train and self.label_dropout:
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.label_dropout,
                                            (x.shape[0], 1))
                labels = labels * keep
            emb = emb + nn.Dense(self.hidden, name="map_label")(labels)
        emb = nn.silu(nn.Dense(self.hidden, name="map_layer0")(nn.silu(emb)))

        h = x
        if self.cond_channels:
            if cond is None or cond.shape != (x.shape[0], self.cond_channels):
                raise ValueError(f"expected cond of shape ({x.shape[0]}, {self.cond_channels}), "
                                 f"got {None if cond is None else cond.shape}")
            h = jnp.concatenate([h, cond.astype(x.dtype)], axis=1)
        h = nn.Dense(self.hidden, name="input")(h)
        for i in range(self.depth):
            r = nn.silu(nn.LayerNorm(name=f"block{i}_norm")(h) + emb)
            r = nn.Dropout(self.dropout, deterministic=not train)(r)
            h = h + nn.Dense(self.hidden, name=f"block{i}_dense")(r)
        features = h
        out = nn.Dense(self.dim, kernel_init=nn.initializers.zeros, name="output")(nn.silu(h))
        return (out, features) if return_features else out
