"""EDM teacher training (Karras et al. 2022, Sec. 5 and Appendix B.6; NVlabs/edm
training/loss.py EDMLoss and training/training_loop.py).

Loss: sigma ~ logNormal(P_mean, P_std), y = x0 + sigma n, weight lambda(sigma) =
(sigma^2 + sigma_data^2) / (sigma sigma_data)^2, loss = lambda ||D(y; sigma) - x0||^2 summed over
pixels and averaged over the batch (EDM reduces with loss.sum() / batch). Adam with linear lr
warm-up, EMA by half-life in images, NaN/Inf gradients sanitised, class labels with dropout.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxdistill import diffusion, samplers
from jaxdistill.methods import common
from jaxdistill.methods.protocol import Method


@flax.struct.dataclass
class EDMState:
    step: jax.Array
    params: Any
    ema_params: Any
    consts: Any          # non-trainable network variables (e.g. NCSN++ Fourier frequencies)
    opt_state: Any


def init(config, rng: jax.Array, teacher=None) -> EDMState:
    """Fresh network, EMA copy and Adam state. EDM training has no teacher."""
    del teacher
    denoiser = common.build_denoiser(config)
    params, consts = common.init_variables(config, denoiser, rng)
    tx = common.make_optimizer(config.optim, config.train.batch_size)
    return EDMState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), consts=consts,
                    opt_state=tx.init(params))


def edm_loss(denoiser, variables, x0, labels, key, *, p_mean, p_std, sigma_data, train=True):
    """Per-example EDM loss (N,) and the sigmas drawn; the one implementation every method uses."""
    k_sigma, k_noise, k_dropout = jax.random.split(key, 3)
    n = x0.shape[0]
    sigma = diffusion.sample_lognormal_sigma(k_sigma, (n,), p_mean, p_std)
    noisy = x0 + diffusion.expand_to(sigma, x0) * jax.random.normal(k_noise, x0.shape)
    d = denoiser(variables, noisy, sigma, labels, train=train, rng=k_dropout)
    sq = jnp.sum(((d - x0) ** 2).reshape(n, -1), axis=1)
    return diffusion.edm_loss_weight(sigma, sigma_data) * sq, sigma


def train_step(config):
    """Returns step(state, teacher, batch, rng) -> (state, metrics); jit it (the trainer does)."""
    denoiser = common.build_denoiser(config)
    tx = common.make_optimizer(config.optim, config.train.batch_size)
    mc = config.method

    def step(state: EDMState, teacher, batch, rng):
        del teacher
        key = jax.random.fold_in(rng, state.step)
        labels = common.one_hot(batch["label"], config.model.label_dim)

        def loss_fn(params):
            losses, _ = edm_loss(denoiser, {"params": params, **state.consts}, batch["x"], labels,
                                 key, p_mean=mc.p_mean, p_std=mc.p_std,
                                 sigma_data=config.model.sigma_data)
            return jnp.mean(losses)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        grads = common.sanitize_grads(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        beta = common.ema_beta(state.step, config.train.batch_size, config.ema.halflife_images,
                               config.ema.rampup_ratio)
        ema = common.ema_update(state.ema_params, params, beta)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "ema_beta": beta}
        return state.replace(step=state.step + 1, params=params, ema_params=ema,
                             opt_state=opt_state), metrics

    return step


def sample(config, state: EDMState, rng: jax.Array, n: int, labels=None):
    """n samples from the EMA network with `config.sample`; returns (samples, labels)."""
    denoiser = common.build_denoiser(config)
    return common.sample_with(config, denoiser, {"params": state.ema_params, **state.consts},
                              rng, n, labels)


METHOD = Method(name="edm", init=init, train_step=train_step, sample=sample,
                samplers=tuple(sorted(samplers.SAMPLERS)))
