"""DMD2: improved distribution matching distillation (Yin et al., NeurIPS 2024, arXiv 2405.14867),
with DMD's regression loss (Yin et al., CVPR 2024, arXiv 2311.18828) as an option.

Facts checked against tianweiy/DMD2 (main/edm/edm_guidance.py, edm_unified_model.py, train_edm.py,
main/sd_unified_model.py) and the DMD paper's Algorithms 1-3 / Appendix B (summarised in
shared/research/ctm_dmd2_msd.md section 2 and msd_lowdiff_dmd1.md section 3):
  - Generator G(z) = D_gen(80 z; sigma = 80) (the EDM denoiser at sigma_max, initialised from the
    teacher); K-step generators use the sigmas `generator_sigmas(K)` and re-noise between steps.
  - Distribution matching: sigma = table[i], i ~ U{20..980} of the ascending 1000-entry Karras
    table; with x_t = x + sigma n, p_real = x - D_real(x_t), p_fake = x - D_fake(x_t) (both
    stop-grad), w = mean |p_real| per example, g = (p_real - p_fake) / w (NaN -> 0) and
    L_DM = 0.5 mean (x - sg(x - g))^2, whose gradient in x is g / numel.
  - Fake score: EDM-weighted denoising loss on detached generator samples, sigma over the full
    table, weight 1/sigma^2 + 1/sigma_data^2.
  - GAN: a classifier head on the fake-score network's bottleneck at sigma = table[j],
    j ~ U{0..999}, for real (with labels) and generated images; softplus losses, weights 3e-3
    (generator) and 1e-2 (fake-score side); the D gradient also trains the fake network.
  - TTUR: the fake score and head update every step, the generator every 5th step (step % 5 == 0),
    both inside one jitted step (`lax.cond`, no recompiles). Each phase (TSM, generator, fake
    score) records its metrics in the state when it runs and every step reports the last recorded
    ones with `<phase>_last_step` (common.record_phase), so a logging step that is not a
    generator step still shows the generator's last losses.
  - AdamW (0.9, 0.999), weight decay 0.01, constant lr after 500 warm-up updates, clip norm 10.
  - Backward simulation (K > 1, main/sd_unified_model.py): one k ~ U{0..K-1} per batch; the
    current generator (no grad) runs k steps from pure noise and its output is re-noised to the
    k-th sigma, which is the training input.
  - DMD regression (weight > 0): distance(G(z_ref), y_ref) on pairs from a teacher Heun run
    (jaxdistill.data.pairs), separate from the DM batch.
  - Teacher score matching (MSD, `tsm_steps`): before distillation, generator and fake score
    regress the teacher's denoiser output at lognormal sigmas on real data.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxdistill import diffusion, samplers
from jaxdistill.methods import common
from jaxdistill.methods.protocol import Method
from jaxdistill.networks import bottleneck_head
from jaxdistill.networks.bottleneck_head import BottleneckClassifier



@flax.struct.dataclass
class DMD2State:
    step: jax.Array
    params: Any           # generator
    consts: Any           # the networks' buffers (generator and fake score share an architecture)
    guide_params: Any     # {'fake': fake-score params, 'head': GAN classifier head params}
    opt_state: Any
    guide_opt_state: Any
    phase_log: Any        # each phase's metrics at its last update (common.init_phase_log(PHASES))


# The metrics each phase records when it runs (the same for every config, so the state's
# structure is too): teacher score matching (MSD), the generator's update and the fake-score /
# GAN-head update. 'gen_loss' / 'guide_loss' are each side's total objective.
PHASES = {
    "tsm": ("tsm_loss", "tsm_fake_loss", "tsm_grad_norm"),
    "gen": ("gen_loss", "dm_loss", "gen_gan_loss", "reg_loss", "gen_grad_norm"),
    "guide": ("guide_loss", "fake_loss", "guide_gan_loss", "guide_grad_norm"),
}


def reported_metrics(config) -> dict:
    """{phase: metrics} a step reports for `config`: the phases and loss terms it has."""
    mc = config.method
    skip = set()
    if not uses_gan(config):
        skip |= {"gen_gan_loss", "guide_gan_loss"}
    if mc.regression_weight <= 0:
        skip.add("reg_loss")
    phases = {p: tuple(m for m in names if m not in skip) for p, names in PHASES.items()}
    if mc.tsm_steps <= 0:
        del phases["tsm"]
    return phases


def sigma_table(num: int) -> jax.Array:
    """DMD2's discrete Karras sigmas, ascending (index 0 = sigma_min, num - 1 = sigma_max)."""
    return diffusion.karras_sigmas(num, append_zero=False)[::-1]


def generator_sigmas(num_steps: int) -> jax.Array:
    """The K sigmas a K-step generator starts each step at: the first K of a (K+1)-point Karras
    grid (sigma_max first; like DMD2's DDPM list range(999, 0, -1000 // K), the end is left out)."""
    return diffusion.karras_sigmas(num_steps + 1, append_zero=False)[:-1]


def dm_loss(x: jax.Array, d_real: jax.Array, d_fake: jax.Array) -> jax.Array:
    """DMD's surrogate 0.5 mean (x - sg(x - g))^2 with g = (D_fake - D_real) / mean|x - D_real|."""
    axes = tuple(range(1, x.ndim))
    p_real, p_fake = x - d_real, x - d_fake
    w = jnp.mean(jnp.abs(p_real), axis=axes, keepdims=True)
    grad = jax.lax.stop_gradient(jnp.nan_to_num((p_real - p_fake) / w))
    return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - grad)) ** 2)


def backward_simulate(generate, z: jax.Array, sigmas: jax.Array, k: jax.Array,
                      key: jax.Array) -> jax.Array:
    """The input of a K-step generator's k-th step (no gradient): from x = sigmas[0] z, k times
    x <- generate(x, sigmas[i]) + sigmas[i + 1] n_i. k = 0 gives pure noise."""

    def body(i, x):
        x0 = generate(x, jnp.full((x.shape[0],), sigmas[i]))
        return x0 + sigmas[i + 1] * jax.random.normal(jax.random.fold_in(key, i), x.shape)

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, k, body, z * sigmas[0]))


def make_optimizers(config):
    """(generator, guidance) AdamW optimizers: config.optim and the same with guidance_lr."""
    oc = config.optim
    adamw = functools.partial(optax.adamw, weight_decay=oc.get("weight_decay", 0.0))
    guide_cfg = oc.copy_and_resolve_references()
    guide_cfg.lr = config.method.guidance_lr
    batch = config.train.batch_size
    return (common.make_optimizer(oc, batch, optimizer=adamw),
            common.make_optimizer(guide_cfg, batch, optimizer=adamw))


def uses_gan(config) -> bool:
    return config.method.gen_gan_weight > 0 or config.method.guidance_gan_weight > 0


def init(config, rng: jax.Array, teacher=None) -> DMD2State:
    """Generator and fake score from the teacher (by parameter name), a fresh classifier head."""
    denoiser = common.build_denoiser(config)
    params, consts = common.init_student(config, denoiser, rng, teacher)
    variables = {"params": params, **consts}
    x = jnp.zeros((1,) + tuple(config.model.shape))
    labels = jnp.zeros((1, config.model.label_dim)) if config.model.label_dim else None
    _, feats = denoiser(variables, x, jnp.ones((1,)), labels, return_features=True)
    head = BottleneckClassifier().init(jax.random.fold_in(rng, 1), feats)["params"]
    guide = {"fake": jax.tree.map(jnp.copy, params), "head": head}
    gen_tx, guide_tx = make_optimizers(config)
    return DMD2State(step=jnp.zeros((), jnp.int32), params=params, consts=consts,
                     guide_params=guide, opt_state=gen_tx.init(params),
                     guide_opt_state=guide_tx.init(guide),
                     phase_log=common.init_phase_log(PHASES))


def make_update(config):
    """update(state, teacher, batch, key, gen_labels, real_weight) -> (state, metrics).

    One TTUR step: the fake score and head always, the generator when its turn comes (or one TSM
    step while step < tsm_steps); each phase records its metrics in `state.phase_log` and the
    metrics are every phase's last recorded ones (`reported_metrics`) with `<phase>_last_step`,
    'loss' (the TSM loss during TSM, then generator + fake-score objective) and 'gen_updated'
    (1 when this step updated the generator). `gen_labels` (M,) are the classes of the M
    generated examples (None: unconditional); `real_weight` (N,) weights the real examples of the
    GAN / TSM terms (None: all 1). MSD calls this once per student with that student's classes.
    """
    mc = config.method
    label_dim = config.model.label_dim
    sigma_data = config.model.sigma_data
    denoiser = common.build_denoiser(config)
    teacher_net = common.teacher_denoiser(config)
    gen_tx, guide_tx = make_optimizers(config)
    head = BottleneckClassifier()
    table = sigma_table(mc.num_train_timesteps)
    gen_sigmas = generator_sigmas(mc.gen_steps)
    min_step = int(mc.min_step_percent * mc.num_train_timesteps)
    max_step = int(mc.max_step_percent * mc.num_train_timesteps)
    gan = uses_gan(config)
    regression = mc.regression_weight > 0
    lpips_params = common.distance_params(config) if regression else None
    reported = reported_metrics(config)

    def real_denoise(teacher, x, sigma, onehot):
        d = functools.partial(teacher_net, teacher)
        if mc.real_guidance_scale != 1.0 and onehot is not None:
            d = samplers.classifier_free_guidance(d, mc.real_guidance_scale)
        return d(x, sigma, onehot)

    def noised(key, x, sigma):
        return x + diffusion.expand_to(sigma, x) * jax.random.normal(key, x.shape)

    def table_sigmas(key, n, low, high):
        return table[jax.random.randint(key, (n,), low, high)]

    def update(state: DMD2State, teacher, batch, key, gen_labels, real_weight):
        var = lambda p: {"params": p, **state.consts}  # noqa: E731
        x_real = batch["x"]
        onehot_real = common.one_hot(batch["label"], label_dim)
        onehot_gen = common.one_hot(gen_labels, label_dim)
        n_gen = x_real.shape[0] if gen_labels is None else gen_labels.shape[0]
        shape = (n_gen,) + tuple(config.model.shape)
        keys = iter(jax.random.split(key, 16))  # drawn in a fixed order at trace time

        def weighted_mean(per_example):
            if real_weight is None:
                return jnp.mean(per_example)
            return jnp.sum(real_weight * per_example) / jnp.maximum(jnp.sum(real_weight), 1.0)

        def record(state, phase, metrics):
            zeros = {m: 0.0 for m in PHASES[phase]}  # terms this config's objective lacks
            return state.replace(phase_log=common.record_phase(
                state.phase_log, phase, state.step + 1, dict(zeros, **metrics)))

        def apply(tx, grads, opt_state, params):
            grads = common.sanitize_grads(grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

        def tsm_update(state):
            sigma = diffusion.sample_lognormal_sigma(next(keys), (x_real.shape[0],), mc.p_mean,
                                                     mc.p_std)
            x_t = noised(next(keys), x_real, sigma)
            target = jax.lax.stop_gradient(real_denoise(teacher, x_t, sigma, onehot_real))
            weight = diffusion.edm_loss_weight(sigma, sigma_data)

            def loss_fn(p):
                d = denoiser(var(p), x_t, sigma, onehot_real)
                per = jnp.mean(((d - target) ** 2).reshape(d.shape[0], -1), axis=1)
                return weighted_mean(weight * per)

            l_gen, g_gen = jax.value_and_grad(loss_fn)(state.params)
            params, opt_state, gnorm = apply(gen_tx, g_gen, state.opt_state, state.params)
            l_fake, g_fake = jax.value_and_grad(loss_fn)(state.guide_params["fake"])
            g_guide = {"fake": g_fake, "head": jax.tree.map(jnp.zeros_like,
                                                            state.guide_params["head"])}
            guide, guide_opt, _ = apply(guide_tx, g_guide, state.guide_opt_state,
                                        state.guide_params)
            # The head waits for the GAN (AdamW's weight decay would move it even at zero grad).
            guide = {"fake": guide["fake"], "head": state.guide_params["head"]}
            state = state.replace(params=params, opt_state=opt_state, guide_params=guide,
                                  guide_opt_state=guide_opt)
            return record(state, "tsm", {"tsm_loss": l_gen, "tsm_fake_loss": l_fake,
                                         "tsm_grad_norm": gnorm})

        def generator_input(params):
            """(x, sigma) the generator is trained at: pure noise, or after k of its own steps."""
            z = jax.random.normal(next(keys), shape)
            k_step, k_noise = next(keys), next(keys)
            if mc.gen_steps == 1:
                return z * gen_sigmas[0], jnp.full((n_gen,), gen_sigmas[0])
            k = jax.random.randint(k_step, (), 0, mc.gen_steps)
            if mc.backward_simulation:
                x = backward_simulate(lambda x, s: denoiser(var(params), x, s, onehot_gen), z,
                                      gen_sigmas, k, k_noise)
            else:
                # Real data of the batch noised to the k-th sigma (sd_unified_model without
                # backward simulation).
                x = noised(k_noise, x_real[:n_gen], gen_sigmas[k])
            return x, jnp.full((n_gen,), gen_sigmas[k])

        def gan_logits(fake_params, head_params, x, sigma, onehot):
            _, feats = denoiser(var(fake_params), x, sigma, onehot, return_features=True)
            return head.apply({"params": head_params}, feats)

        x_in, sigma_in = generator_input(state.params)
        generate = lambda p: denoiser(var(p), x_in, sigma_in, onehot_gen)  # noqa: E731
        k_dm_idx, k_dm_noise, k_gan_idx, k_gan_noise = (next(keys) for _ in range(4))

        def generator_update(state):
            fake = state.guide_params

            def loss_fn(p):
                x = generate(p)
                sigma = table_sigmas(k_dm_idx, n_gen, min_step, max_step + 1)
                x_t = noised(k_dm_noise, x, sigma)
                d_real = real_denoise(teacher, x_t, sigma, onehot_gen)
                d_fake = denoiser(var(fake["fake"]), x_t, sigma, onehot_gen)
                l_dm = dm_loss(x, d_real, d_fake)
                aux = {"dm_loss": l_dm}
                total = l_dm
                if gan:
                    sigma_g = table_sigmas(k_gan_idx, n_gen, 0, mc.diffusion_gan_max_timestep)
                    logits = gan_logits(fake["fake"], fake["head"],
                                        noised(k_gan_noise, x, sigma_g), sigma_g, onehot_gen)
                    aux["gen_gan_loss"] = bottleneck_head.g_loss(logits)
                    total = total + mc.gen_gan_weight * aux["gen_gan_loss"]
                if regression:
                    s_max = jnp.full((batch["pair_noise"].shape[0],), gen_sigmas[0])
                    pred = denoiser(var(p), batch["pair_noise"] * gen_sigmas[0], s_max,
                                    common.one_hot(batch["pair_label"], label_dim))
                    aux["reg_loss"] = jnp.mean(
                        common.distance(config, pred, batch["pair_target"], lpips_params))
                    total = total + mc.regression_weight * aux["reg_loss"]
                return total, aux

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            params, opt_state, gnorm = apply(gen_tx, grads, state.opt_state, state.params)
            state = state.replace(params=params, opt_state=opt_state)
            return record(state, "gen", dict(aux, gen_loss=loss, gen_grad_norm=gnorm))

        def skip_generator(state):
            return state

        def guidance_update(state):
            x = jax.lax.stop_gradient(generate(state.params))
            k_fake_idx, k_fake_noise, k_idx_r, k_noise_r, k_idx_f, k_noise_f = (
                next(keys) for _ in range(6))

            def loss_fn(gp):
                sigma = table_sigmas(k_fake_idx, n_gen, 0, mc.num_train_timesteps)
                d = denoiser(var(gp["fake"]), noised(k_fake_noise, x, sigma), sigma, onehot_gen)
                per = jnp.mean(((d - x) ** 2).reshape(n_gen, -1), axis=1)
                l_fake = jnp.mean(diffusion.edm_loss_weight(sigma, sigma_data) * per)
                aux = {"fake_loss": l_fake}
                total = l_fake
                if gan:
                    n_real = x_real.shape[0]
                    s_r = table_sigmas(k_idx_r, n_real, 0, mc.diffusion_gan_max_timestep)
                    s_f = table_sigmas(k_idx_f, n_gen, 0, mc.diffusion_gan_max_timestep)
                    logits_real = gan_logits(gp["fake"], gp["head"], noised(k_noise_r, x_real, s_r),
                                             s_r, onehot_real)
                    logits_fake = gan_logits(gp["fake"], gp["head"], noised(k_noise_f, x, s_f),
                                             s_f, onehot_gen)
                    aux["guide_gan_loss"] = bottleneck_head.d_loss(logits_real, logits_fake,
                                                                   real_weight)
                    total = total + mc.guidance_gan_weight * aux["guide_gan_loss"]
                return total, aux

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.guide_params)
            guide, guide_opt, gnorm = apply(guide_tx, grads, state.guide_opt_state,
                                            state.guide_params)
            state = state.replace(guide_params=guide, guide_opt_state=guide_opt)
            return record(state, "guide", dict(aux, guide_loss=loss, guide_grad_norm=gnorm))

        in_tsm = state.step < mc.tsm_steps
        is_gen_step = (state.step - mc.tsm_steps) % mc.dfake_gen_update_ratio == 0

        def distill_update(state):
            # The generator's step uses the fake score before this step's update (official order).
            new_state = jax.lax.cond(is_gen_step, generator_update, skip_generator, state)
            guided = guidance_update(state)
            return new_state.replace(guide_params=guided.guide_params,
                                     guide_opt_state=guided.guide_opt_state,
                                     phase_log=dict(new_state.phase_log,
                                                    guide=guided.phase_log["guide"]))

        if mc.tsm_steps > 0:
            state = jax.lax.cond(in_tsm, tsm_update, distill_update, state)
        else:
            state = distill_update(state)
        log = state.phase_log
        metrics = common.phase_metrics(log, reported)
        loss = log["gen"]["gen_loss"] + log["guide"]["guide_loss"]
        metrics["loss"] = jnp.where(in_tsm, log["tsm"]["tsm_loss"], loss)
        metrics["gen_updated"] = (in_tsm | is_gen_step).astype(jnp.float32)
        return state.replace(step=state.step + 1), metrics

    return update


def train_step(config):
    """step(state, teacher, batch, rng) -> (state, metrics): one DMD2 (TTUR) step."""
    update = make_update(config)
    label_dim = config.model.label_dim

    def step(state: DMD2State, teacher, batch, rng):
        key = jax.random.fold_in(rng, state.step)
        k_labels, k_update = jax.random.split(key)
        gen_labels = common.random_labels(k_labels, batch["x"].shape[0], label_dim)
        return update(state, teacher, batch, k_update, gen_labels, None)

    return step


def generate_steps(denoiser, variables, noise, labels, sigmas, key):
    """K-step generator sampling: x0 = G(x, sigma_i), then re-noise to sigma_{i+1}; returns the
    last x0 (one step: G(80 z))."""
    x = noise * sigmas[0]
    keys = jax.random.split(key, sigmas.shape[0])
    for i in range(sigmas.shape[0]):
        x0 = denoiser(variables, x, jnp.full((x.shape[0],), sigmas[i]), labels)
        if i + 1 < sigmas.shape[0]:
            x = x0 + sigmas[i + 1] * jax.random.normal(keys[i], x.shape)
    return x0


def sample(config, state: DMD2State, rng: jax.Array, n: int, labels=None):
    """n samples of the generator with config.sample.num_steps steps; returns (samples, labels)."""
    denoiser = common.build_denoiser(config)
    k_labels, k_noise, k_steps = jax.random.split(rng, 3)
    if labels is None:
        labels = common.random_labels(k_labels, n, config.model.label_dim)
    noise = jax.random.normal(k_noise, (n,) + tuple(config.model.shape))
    x = generate_steps(denoiser, {"params": state.params, **state.consts}, noise,
                       common.one_hot(labels, config.model.label_dim),
                       generator_sigmas(config.sample.num_steps), k_steps)
    return x, labels


def extra_batches(config, teacher, workdir: str, *, batch_size: int, seed: int, start_step: int,
                  process_index: int, process_count: int):
    """DMD's paired (noise, teacher output) batches when regression_weight > 0, else None.

    The pairs are made once by a teacher Heun run and stored under regression_pairs_dir
    (default <workdir>/regression_pairs); an interrupted build resumes where it stopped.
    """
    mc = config.method
    if mc.regression_weight <= 0:
        return None
    from jaxdistill.data import pairs

    directory = mc.regression_pairs_dir or os.path.join(workdir, "regression_pairs")
    pairs.build(config, teacher, directory, num_pairs=mc.regression_pairs,
                num_steps=mc.regression_heun_steps, seed=config.seed,
                write=process_index == 0)
    return pairs.batches(directory, batch_size=batch_size, seed=seed, start_step=start_step,
                         process_index=process_index, process_count=process_count)


def validate(config) -> None:
    """DMD2's own fields that would otherwise fail inside the compiled step."""
    mc = config.method
    for name in ("gen_steps", "dfake_gen_update_ratio", "num_train_timesteps"):
        if mc[name] < 1:
            raise ValueError(f"config.method.{name}={mc[name]!r}: must be a positive integer")
    if not 0 <= mc.min_step_percent < mc.max_step_percent <= 1:
        raise ValueError(f"config.method.min_step_percent={mc.min_step_percent!r} and "
                         f"max_step_percent={mc.max_step_percent!r}: need 0 <= min < max <= 1")
    if mc.guidance_lr <= 0:
        raise ValueError(f"config.method.guidance_lr={mc.guidance_lr!r}: must be positive")


# The (K-step) generator is the only sampler of a DMD2 student.
METHOD = Method(name="dmd2", init=init, train_step=train_step, sample=sample,
                samplers=("generator",), validate=validate, extra_batches=extra_batches)
