"""A trained network's state and its one update: params, frozen buffers, optimizer state, EMAs.

Every method keeps each network it trains (EDM's denoiser, CTM's student and discriminator,
DMD2's generator and fake score + GAN head) as a `Trainable`, and every update goes through
`Trainable.apply_gradients`: gradients NaN-sanitised, the optimizer applied, every EMA updated.

Facts from NVlabs/edm training/training_loop.py: lr ramp lr * min(nimg / rampup_nimg, 1); EMA
half-life in images with ema_halflife_nimg = min(halflife, nimg * rampup_ratio) and
beta = 0.5 ** (batch / halflife_nimg); gradients nan_to_num(nan=0, posinf=1e5, neginf=-1e5).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

# The name of a Trainable's raw (non-averaged) weights in `weights(name)`.
ONLINE = "online"


@flax.struct.dataclass
class Trainable:
    params: Any       # trainable parameters
    opt_state: Any
    emas: dict        # {name: params-shaped exponential moving average}
    consts: Any       # the network's other collections (buffers such as NCSN++'s Fourier
    #                   frequencies, a discriminator's frozen projections): never updated

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, *, consts=None,
               emas: tuple[str, ...] = ()) -> "Trainable":
        return cls(params=params, opt_state=tx.init(params),
                   emas={name: jax.tree.map(jnp.copy, params) for name in emas},
                   consts={} if consts is None else consts)

    def variables(self, params=None) -> dict:
        """Flax variables of the network with `params` (default: the trainable ones)."""
        return {"params": self.params if params is None else params, **self.consts}

    def weights(self, name: str):
        """The weights called `name`: ONLINE (the trained params) or one of the EMAs."""
        if name == ONLINE:
            return self.params
        if name not in self.emas:
            raise ValueError(f"weights {name!r} are not one of {[ONLINE, *self.emas]}")
        return self.emas[name]

    def apply_gradients(self, tx: optax.GradientTransformation, grads,
                        ema_decays: dict | None = None) -> tuple["Trainable", jax.Array]:
        """(updated Trainable, global norm of the sanitised gradients).

        `ema_decays` {name: beta} gives every EMA's decay for this update: ema <- beta ema +
        (1 - beta) params, with the updated params.
        """
        grads = sanitize_grads(grads)
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        ema_decays = ema_decays or {}
        if set(ema_decays) != set(self.emas):
            raise ValueError(f"apply_gradients needs a decay for each EMA {sorted(self.emas)}, "
                             f"got {sorted(ema_decays)}")
        emas = {name: ema_update(ema, params, ema_decays[name]) for name, ema in self.emas.items()}
        return (self.replace(params=params, opt_state=opt_state, emas=emas),
                optax.tree.norm(grads))


def sanitize_grads(grads):
    """Replace NaN by 0 and +-Inf by +-1e5 so one bad batch cannot poison the weights (EDM)."""
    return jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)


def ema_update(ema, params, beta):
    return jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, ema, params)


def ema_beta(step: jax.Array, batch_size: int, halflife_images: float, rampup_ratio: float | None):
    """EDM's EMA decay for one update of `batch_size` images after `step` updates."""
    nimg = step.astype(jnp.float32) * batch_size
    halflife = jnp.asarray(halflife_images, jnp.float32)
    if rampup_ratio:
        halflife = jnp.minimum(halflife, nimg * rampup_ratio)
    return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def lr_schedule(optim_cfg, batch_size: int):
    """Linear warm-up over `lr_rampup_images` images, then constant (EDM)."""
    rampup_steps = optim_cfg.lr_rampup_images / batch_size
    if rampup_steps <= 0:
        return optim_cfg.lr
    return lambda step: optim_cfg.lr * jnp.minimum(step / rampup_steps, 1.0)


def make_optimizer(optim_cfg, batch_size: int,
                   optimizer=optax.adam) -> optax.GradientTransformation:
    """`optimizer`(b1, b2, eps) (Adam for EDM, RAdam for CTM, AdamW for DMD2) with the warm-up
    schedule and optional global-norm clipping (grad_clip > 0)."""
    chain = []
    if optim_cfg.get("grad_clip", 0.0) > 0:
        chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    chain.append(optimizer(lr_schedule(optim_cfg, batch_size), b1=optim_cfg.b1, b2=optim_cfg.b2,
                           eps=optim_cfg.eps))
    return optax.chain(*chain)
