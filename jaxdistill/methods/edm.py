"""EDM teacher training (Karras et al. 2022, Sec. 5 and Appendix B.6; NVlabs/edm
training/loss.py EDMLoss and training/training_loop.py).

Loss: sigma ~ logNormal(P_mean, P_std), y = x0 + sigma n, weight lambda(sigma) =
(sigma^2 + sigma_data^2) / (sigma sigma_data)^2, loss = lambda ||D(y; sigma) - x0||^2 summed over
pixels and averaged over the batch (EDM reduces with loss.sum() / batch). Adam with linear lr
warm-up, EMA by half-life in images, NaN/Inf gradients sanitised, class labels with dropout.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from jaxdistill import diffusion, objectives, samplers
from jaxdistill.methods import common, trainable
from jaxdistill.methods.protocol import Method
from jaxdistill.methods.trainable import Trainable

EMA = "ema"  # the evaluation EMA's name (EDM keeps one)


@flax.struct.dataclass
class EDMState:
    step: jax.Array
    net: Trainable      # the denoiser; emas = {EMA: the EDM half-life EMA}


def make_optimizer(config):
    return trainable.make_optimizer(config.optim, config.train.batch_size)


def init(config, rng: jax.Array, teacher=None) -> EDMState:
    """Fresh network, EMA copy and Adam state. EDM training has no teacher."""
    del teacher
    params, consts = common.init_variables(config, common.build_denoiser(config), rng)
    return EDMState(step=jnp.zeros((), jnp.int32),
                    net=Trainable.create(params, make_optimizer(config), consts=consts,
                                         emas=(EMA,)))


def edm_loss(denoiser, variables, x0, labels, key, *, p_mean, p_std, sigma_data, train=True):
    """Per-example EDM loss (N,) (squared error summed over elements, as NVlabs/edm) and the
    sigmas drawn, sigma ~ logNormal(p_mean, p_std)."""
    n = x0.shape[0]
    sigma = diffusion.sample_lognormal_sigma(objectives.stream(key, "sigma"), (n,), p_mean, p_std)
    noisy = objectives.add_noise(objectives.stream(key, "noise"), x0, sigma)
    d = denoiser(variables, noisy, sigma, labels, train=train,
                 rng=objectives.stream(key, "dropout"))
    return objectives.denoising_loss(d, x0, sigma, sigma_data, reduce="sum"), sigma


def train_step(config):
    """step(state, teacher, batch, rng, frozen=None) -> (state, metrics); jit it (the trainer does)."""
    denoiser = common.build_denoiser(config)
    tx = make_optimizer(config)
    mc = config.method

    def step(state: EDMState, teacher, batch, rng, frozen=None):
        del teacher, frozen
        key = jax.random.fold_in(rng, state.step)
        labels = objectives.one_hot(batch["label"], config.model.label_dim)

        def loss_fn(params):
            losses, _ = edm_loss(denoiser, state.net.variables(params), batch["x"], labels, key,
                                 p_mean=mc.p_mean, p_std=mc.p_std,
                                 sigma_data=config.model.sigma_data)
            return jnp.mean(losses)

        loss, grads = jax.value_and_grad(loss_fn)(state.net.params)
        # The EMA half-life counts the images of this batch (its global size under jit).
        beta = trainable.ema_beta(state.step, batch["x"].shape[0], config.ema.halflife_images,
                                  config.ema.rampup_ratio)
        net, grad_norm = state.net.apply_gradients(tx, grads, {EMA: beta})
        metrics = {"loss": loss, "grad_norm": grad_norm, "ema_beta": beta}
        return state.replace(step=state.step + 1, net=net), metrics

    return step


def metrics(config) -> tuple[str, ...]:
    del config
    return ("loss", "grad_norm", "ema_beta")


def sample(config, state: EDMState, rng: jax.Array, n: int, *, labels=None, num_steps=None,
           weights=None):
    """n samples with `config.sample` from the EMA network (weights=EMA, default) or the online
    one ('online'); returns (samples, labels)."""
    denoiser = common.build_denoiser(config)
    variables = state.net.variables(state.net.weights(weights or EMA))
    return common.sample_with(config, lambda x, s, lab: denoiser(variables, x, s, lab), rng, n,
                              labels=labels, num_steps=num_steps)


METHOD = Method(name="edm", init=init, train_step=train_step, sample=sample,
                samplers=tuple(sorted(samplers.SAMPLERS)), metrics=metrics, needs_teacher=False)
