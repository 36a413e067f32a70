"""Samplers over a decreasing sigma grid, all `lax.scan` loops with explicit PRNG keys.

A sampler takes `denoise(x, sigma) -> x0_hat` with `sigma` a per-example vector (N,), the initial
`x` (already scaled to the first sigma, e.g. sigma_max * N(0, I)) and the grid `sigmas`
(decreasing, usually ending with 0). Any trained network, the analytic teacher, or a guided
combination of either is turned into such a `denoise` by closing over its params and labels.

Facts: Euler / Heun with churn are EDM's Algorithms 1-2 (Karras et al. 2022; NVlabs/edm
generate.py edm_sampler: gamma = min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], no second
order correction on the step that lands on sigma = 0). DDIM (Song et al. 2021, eq. 12) is written
in the VE variables, where eta = 0 coincides with Euler on the probability-flow ODE. The
stochastic multistep sampler is the consistency-model multistep sampler (Song et al. 2023,
Algorithm 1): denoise to x0, re-noise to the next sigma.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Denoise = Callable[[jax.Array, jax.Array], jax.Array]


def _sigma_vec(sigma: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.full((x.shape[0],), sigma, jnp.float32)


def _steps(sigmas: jax.Array):
    return sigmas[:-1], sigmas[1:]


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def heun_step(denoise: Denoise, x: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
    """One EDM Heun step from per-example noise levels t (N,) to t_next (N,), all t_next > 0.

    The single implementation of the 2nd-order step: the sampler below and the teacher solves of
    the distillation methods (e.g. CTM's t -> u target) both use it.
    """
    d = (x - denoise(x, t)) / _bcast(t, x)
    x_euler = x + _bcast(t_next - t, x) * d
    d_next = (x_euler - denoise(x_euler, t_next)) / _bcast(t_next, x)
    return x + _bcast(t_next - t, x) * 0.5 * (d + d_next)


def euler(denoise: Denoise, x: jax.Array, sigmas: jax.Array) -> jax.Array:
    """First-order probability-flow ODE solver: dx/dsigma = (x - D(x, sigma)) / sigma."""

    def step(x, ts):
        t, t_next = ts
        d = (x - denoise(x, _sigma_vec(t, x))) / t
        return x + (t_next - t) * d, None

    x, _ = jax.lax.scan(step, x, _steps(sigmas))
    return x


def heun(denoise: Denoise, x: jax.Array, sigmas: jax.Array, key: jax.Array | None = None, *,
         s_churn: float = 0.0, s_min: float = 0.0, s_max: float = float("inf"),
         s_noise: float = 1.0) -> jax.Array:
    """EDM's second-order (Heun) sampler with optional churn.

    NFE = 2 (len(sigmas) - 1) - 1 when the grid ends at 0 (the last step is Euler), e.g. 35 for
    EDM's 18-step CIFAR-10 setting.
    """
    num_steps = sigmas.shape[0] - 1
    if s_churn > 0 and key is None:
        raise ValueError("heun with s_churn > 0 needs a PRNG key")
    keys = jax.random.split(key if key is not None else jax.random.key(0), num_steps)
    gamma_max = min(s_churn / num_steps, 2**0.5 - 1)

    def step(x, inputs):
        t, t_next, k = inputs
        gamma = jnp.where((t >= s_min) & (t <= s_max), gamma_max, 0.0)
        t_hat = t * (1.0 + gamma)
        if s_churn > 0:
            # sqrt(t_hat^2 - t^2) written so rounding can never make the radicand negative.
            churn_std = t * jnp.sqrt(gamma * (2.0 + gamma))
            x = x + churn_std * s_noise * jax.random.normal(k, x.shape, x.dtype)
        t_hat_vec, t_next_vec = _sigma_vec(t_hat, x), _sigma_vec(t_next, x)

        def last_step(x):  # landing on sigma = 0: a 2nd-order correction would divide by 0
            return x + (t_next - t_hat) * (x - denoise(x, t_hat_vec)) / t_hat

        return jax.lax.cond(t_next > 0, lambda v: heun_step(denoise, v, t_hat_vec, t_next_vec),
                            last_step, x), None

    t, t_next = _steps(sigmas)
    x, _ = jax.lax.scan(step, x, (t, t_next, keys))
    return x


def ddim(denoise: Denoise, x: jax.Array, sigmas: jax.Array, key: jax.Array | None = None, *,
         eta: float = 0.0) -> jax.Array:
    """DDIM in VE variables: x_s = D + sqrt(s^2 - c^2) eps_hat + c z, c = eta s sqrt(1 - s^2/t^2).

    Rewriting DDIM's VP update with x = z / alpha gives this form: eta = 0 is deterministic DDIM
    (equal to Euler in sigma), eta = 1 is DDPM's ancestral posterior step.
    """
    if eta > 0 and key is None:
        raise ValueError("ddim with eta > 0 needs a PRNG key")
    num_steps = sigmas.shape[0] - 1
    keys = jax.random.split(key if key is not None else jax.random.key(0), num_steps)

    def step(x, inputs):
        t, s, k = inputs
        x0 = denoise(x, _sigma_vec(t, x))
        eps_hat = (x - x0) / t
        c = eta * s * jnp.sqrt(jnp.clip(1.0 - (s / t) ** 2, 0.0))
        x = x0 + jnp.sqrt(jnp.clip(s**2 - c**2, 0.0)) * eps_hat
        if eta > 0:
            x = x + c * jax.random.normal(k, x.shape, x.dtype)
        return x, None

    t, s = _steps(sigmas)
    x, _ = jax.lax.scan(step, x, (t, s, keys))
    return x


def denoise_renoise(predict: Callable, x: jax.Array, key: jax.Array, num_steps,
                    noise_std: Callable) -> jax.Array:
    """x <- predict(i, x) + noise_std(i) n_i for i = 0 .. num_steps - 1, n_i ~ N(0, I) drawn from
    fold_in(key, i); `num_steps` may be traced (DMD2's backward simulation runs a random number).

    The one "denoise, then re-noise" chain: consistency / multistep sampling
    (`stochastic_multistep`), DMD2's backward simulation and K-step generator, and CTM's
    gamma-sampling (whose `predict` is a jump to s <= the next sigma) all run it.
    """

    def body(i, x):
        x = predict(i, x)
        return x + noise_std(i) * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)

    return jax.lax.fori_loop(0, num_steps, body, x)


def stochastic_multistep(denoise: Denoise, x: jax.Array, sigmas: jax.Array, key: jax.Array, *,
                         sigma_floor: float = 0.0) -> jax.Array:
    """Denoise to x0 at each sigma, then re-noise to the next: x <- x0 + sqrt(s^2 - floor^2) z.

    `sigmas` lists the noise levels at which the model is evaluated (no trailing 0); the output is
    the last x0. `sigma_floor` = sigma_min reproduces consistency models' sqrt(t^2 - eps^2).
    """
    last = sigmas.shape[0] - 1
    x = denoise_renoise(lambda i, x: denoise(x, _sigma_vec(sigmas[i], x)), x, key, last,
                        lambda i: jnp.sqrt(jnp.clip(sigmas[i + 1] ** 2 - sigma_floor**2, 0.0)))
    return denoise(x, _sigma_vec(sigmas[last], x))


def classifier_free_guidance(denoise_cond: Callable, scale: float) -> Callable:
    """D_w = D(x | null) + w (D(x | c) - D(x | null)) for a denoise(x, sigma, labels).

    The null condition is the all-zero label vector, which is what label dropout trains
    (NVlabs/edm SongUNet label_dropout; Ho & Salimans 2022). w = 1 is the plain conditional
    model; w = 0 the unconditional one. Both branches run as one batch.
    """

    def guided(x, sigma, labels):
        if labels is None:
            raise ValueError("classifier-free guidance needs class labels")
        both = denoise_cond(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                            jnp.concatenate([labels, jnp.zeros_like(labels)]))
        cond, uncond = jnp.split(both, 2)
        return uncond + scale * (cond - uncond)

    return guided


SAMPLERS = {"euler": euler, "heun": heun, "ddim": ddim, "multistep": stochastic_multistep}


def sample(name: str, denoise: Denoise, noise: jax.Array, sigmas: jax.Array, key: jax.Array,
           **kwargs) -> jax.Array:
    """Runs sampler `name` from x = sigmas[0] * noise (noise ~ N(0, I))."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not one of {sorted(SAMPLERS)}")
    x = noise * sigmas[0]
    if name == "euler":
        return SAMPLERS[name](denoise, x, sigmas, **kwargs)
    return SAMPLERS[name](denoise, x, sigmas, key, **kwargs)

