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

The pieces are module-level functions that MSD composes and SiD / LowDiff reuse:
`distribution_matching_loss` (the generator's DM term), `fake_score_loss` (the fake score's
denoising loss on generated samples), `gan_generator_loss` / `gan_discriminator_loss` (the
bottleneck head's losses), `regression_loss`, `tsm_loss` and `backward_simulate`; `ttur_update`
runs one TTUR step of them. Every random draw comes from a named stream (objectives.stream).
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxdistill import diffusion, objectives, samplers
from jaxdistill import teacher as teacher_lib
from jaxdistill.methods import common, trainable
from jaxdistill.methods.protocol import DataStream, Method
from jaxdistill.methods.trainable import Trainable
from jaxdistill.networks import bottleneck_head
from jaxdistill.networks.bottleneck_head import BottleneckClassifier


@flax.struct.dataclass
class DMD2State:
    step: jax.Array
    generator: Trainable  # consts: the networks' buffers (the fake score shares the architecture)
    guide: Trainable      # params {'fake': fake-score params, 'head': GAN classifier head params}
    phase_log: Any        # each phase's metrics at its last update (common.init_phase_log(PHASES))


# The metrics each phase records when it runs (the same for every config, so the state's
# structure is too): teacher score matching (MSD), the generator's update and the fake-score /
# GAN-head update. 'gen_loss' / 'guide_loss' are each side's total objective.
PHASES = {
    "tsm": ("tsm_loss", "tsm_fake_loss", "tsm_grad_norm"),
    "gen": ("gen_loss", "dm_loss", "gen_gan_loss", "reg_loss", "gen_grad_norm"),
    "guide": ("guide_loss", "fake_loss", "guide_gan_loss", "guide_grad_norm"),
}


def reported_phases(config) -> dict:
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


def metrics(config) -> tuple[str, ...]:
    """Every reported phase metric with `<phase>_last_step`, 'loss' and 'gen_updated'."""
    return (*common.phase_metrics(common.init_phase_log(PHASES), reported_phases(config)),
            "loss", "gen_updated")


def sigma_table(num: int) -> jax.Array:
    """DMD2's discrete Karras sigmas, ascending (index 0 = sigma_min, num - 1 = sigma_max)."""
    return diffusion.karras_sigmas(num, append_zero=False)[::-1]


def table_sigmas(key: jax.Array, table: jax.Array, n: int, low: int, high: int) -> jax.Array:
    """n sigmas table[i], i ~ U{low..high - 1}."""
    return table[jax.random.randint(key, (n,), low, high)]


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
    x <- generate(x, sigmas[i]) + sigmas[i + 1] n_i (samplers.denoise_renoise). k = 0 gives pure
    noise."""
    x = samplers.denoise_renoise(lambda i, x: generate(x, jnp.full((x.shape[0],), sigmas[i])),
                                 z * sigmas[0], key, k, lambda i: sigmas[i + 1])
    return jax.lax.stop_gradient(x)


def real_score(teacher, x, sigma, onehot, guidance_scale: float = 1.0):
    """The teacher's denoiser D_real, with classifier-free guidance `guidance_scale` when != 1
    and the model is conditional (DMD2's real_guidance_scale)."""
    denoise = teacher.__call__
    if guidance_scale != 1.0 and onehot is not None:
        denoise = samplers.classifier_free_guidance(denoise, guidance_scale)
    return denoise(x, sigma, onehot)


def distribution_matching_loss(x, teacher, fake_denoise, key, table, low: int, high: int,
                               onehot, guidance_scale: float = 1.0) -> jax.Array:
    """The generator's DM loss on its samples x: both scores at x_t = x + sigma n with
    sigma = table[i], i ~ U{low..high - 1}; `fake_denoise(x, sigma, onehot)` is the fake score."""
    sigma = table_sigmas(objectives.stream(key, "dm_sigma"), table, x.shape[0], low, high)
    x_t = objectives.add_noise(objectives.stream(key, "dm_noise"), x, sigma)
    return dm_loss(x, real_score(teacher, x_t, sigma, onehot, guidance_scale),
                   fake_denoise(x_t, sigma, onehot))


def fake_score_loss(fake_denoise, x, key, table, onehot, sigma_data: float) -> jax.Array:
    """The fake score's EDM-weighted denoising loss on (detached) generator samples x, sigma over
    the whole table."""
    sigma = table_sigmas(objectives.stream(key, "fake_sigma"), table, x.shape[0], 0,
                         table.shape[0])
    d = fake_denoise(objectives.add_noise(objectives.stream(key, "fake_noise"), x, sigma), sigma,
                     onehot)
    return jnp.mean(objectives.denoising_loss(d, x, sigma, sigma_data))


def gan_logits(denoiser, variables, head_params, x, sigma, onehot):
    """The classifier head on the fake-score network's bottleneck features."""
    _, feats = denoiser(variables, x, sigma, onehot, return_features=True)
    return BottleneckClassifier().apply({"params": head_params}, feats)


def gan_generator_loss(logits_fn, x, key, table, max_index: int, onehot) -> jax.Array:
    """Softplus generator loss of the head's logits on x noised to table[j], j < max_index.
    `logits_fn(x, sigma, onehot)` is `gan_logits` with the current fake / head params."""
    sigma = table_sigmas(objectives.stream(key, "gan_g_sigma"), table, x.shape[0], 0, max_index)
    x_t = objectives.add_noise(objectives.stream(key, "gan_g_noise"), x, sigma)
    return bottleneck_head.g_loss(logits_fn(x_t, sigma, onehot))


def gan_discriminator_loss(logits_fn, x_real, onehot_real, x_fake, onehot_fake, key, table,
                           max_index: int, real_weight=None) -> jax.Array:
    """Softplus head loss: real examples (weighted by `real_weight`, None = 1) against generated
    ones, each noised to table[j], j < max_index."""
    s_r = table_sigmas(objectives.stream(key, "gan_d_real_sigma"), table, x_real.shape[0], 0,
                       max_index)
    s_f = table_sigmas(objectives.stream(key, "gan_d_fake_sigma"), table, x_fake.shape[0], 0,
                       max_index)
    logits_real = logits_fn(objectives.add_noise(objectives.stream(key, "gan_d_real_noise"),
                                                 x_real, s_r), s_r, onehot_real)
    logits_fake = logits_fn(objectives.add_noise(objectives.stream(key, "gan_d_fake_noise"),
                                                 x_fake, s_f), s_f, onehot_fake)
    return bottleneck_head.d_loss(logits_real, logits_fake, real_weight)


def regression_loss(config, generate, batch, lpips_params=None) -> jax.Array:
    """DMD's regression loss: distance(G(z_ref), y_ref) on the batch's teacher ODE pairs;
    `generate(x, sigma, onehot)` is the one-step generator at sigma_max."""
    sigma_max = generator_sigmas(config.method.gen_steps)[0]
    pairs = batch["pair_noise"]
    pred = generate(pairs * sigma_max, jnp.full((pairs.shape[0],), sigma_max),
                    objectives.one_hot(batch["pair_label"], config.model.label_dim))
    return jnp.mean(common.distance(config, pred, batch["pair_target"], lpips_params))


def tsm_loss(denoise, teacher, x_real, key, onehot, *, p_mean, p_std, sigma_data,
             guidance_scale=1.0, real_weight=None) -> jax.Array:
    """Teacher score matching: `denoise(x, sigma, onehot)` regresses the teacher's output at
    lognormal sigmas on real data, EDM-weighted (`real_weight` weights the examples)."""
    sigma = diffusion.sample_lognormal_sigma(objectives.stream(key, "tsm_sigma"),
                                             (x_real.shape[0],), p_mean, p_std)
    x_t = objectives.add_noise(objectives.stream(key, "tsm_noise"), x_real, sigma)
    target = jax.lax.stop_gradient(real_score(teacher, x_t, sigma, onehot, guidance_scale))
    return weighted_mean(objectives.denoising_loss(denoise(x_t, sigma, onehot), target, sigma,
                                                   sigma_data), real_weight)


def weighted_mean(per_example, weight=None):
    if weight is None:
        return jnp.mean(per_example)
    return jnp.sum(weight * per_example) / jnp.maximum(jnp.sum(weight), 1.0)


def make_optimizers(config):
    """(generator, guidance) AdamW optimizers: config.optim and the same with guidance_lr."""
    oc = config.optim
    adamw = functools.partial(optax.adamw, weight_decay=oc.get("weight_decay", 0.0))
    guide_cfg = oc.copy_and_resolve_references()
    guide_cfg.lr = config.method.guidance_lr
    batch = config.train.batch_size
    return (trainable.make_optimizer(oc, batch, optimizer=adamw),
            trainable.make_optimizer(guide_cfg, batch, optimizer=adamw))


def uses_gan(config) -> bool:
    return config.method.gen_gan_weight > 0 or config.method.guidance_gan_weight > 0


def init(config, rng: jax.Array, teacher=None) -> DMD2State:
    """Generator and fake score from the teacher (by parameter name), a fresh classifier head."""
    denoiser = common.build_denoiser(config)
    params, consts = common.init_student(config, denoiser, rng, teacher)
    x = jnp.zeros((1,) + tuple(config.model.shape))
    labels = jnp.zeros((1, config.model.label_dim)) if config.model.label_dim else None
    _, feats = denoiser({"params": params, **consts}, x, jnp.ones((1,)), labels,
                        return_features=True)
    head = BottleneckClassifier().init(jax.random.fold_in(rng, 1), feats)["params"]
    gen_tx, guide_tx = make_optimizers(config)
    return DMD2State(step=jnp.zeros((), jnp.int32),
                     generator=Trainable.create(params, gen_tx, consts=consts),
                     guide=Trainable.create({"fake": jax.tree.map(jnp.copy, params),
                                             "head": head}, guide_tx),
                     phase_log=common.init_phase_log(PHASES))


def frozen_weights(config) -> dict:
    """LPIPS's weights when the regression loss uses them (read once from the user's files)."""
    if config.method.regression_weight > 0 and config.method.distance == "lpips":
        return {"lpips": common.distance_params(config)}
    return {}


def ttur_update(config):
    """update(state, teacher, batch, key, gen_labels, real_weight, frozen) -> (state, metrics).

    One TTUR step: the fake score and head always, the generator when its turn comes (or one TSM
    step while step < tsm_steps); each phase records its metrics in `state.phase_log` and the
    metrics are every phase's last recorded ones (`reported_phases`) with `<phase>_last_step`,
    'loss' (the TSM loss during TSM, then generator + fake-score objective) and 'gen_updated'
    (1 when this step updated the generator). `gen_labels` (M,) are the classes of the M
    generated examples (None: unconditional); `real_weight` (N,) weights the real examples of the
    GAN / TSM terms (None: all 1). MSD calls this once per student with that student's classes.
    """
    mc = config.method
    label_dim = config.model.label_dim
    sigma_data = config.model.sigma_data
    denoiser = common.build_denoiser(config)
    gen_tx, guide_tx = make_optimizers(config)
    table = sigma_table(mc.num_train_timesteps)
    gen_sigmas = generator_sigmas(mc.gen_steps)
    min_step = int(mc.min_step_percent * mc.num_train_timesteps)
    max_step = int(mc.max_step_percent * mc.num_train_timesteps)
    gan = uses_gan(config)
    regression = mc.regression_weight > 0
    reported = reported_phases(config)
    guidance = mc.real_guidance_scale

    def update(state: DMD2State, teacher, batch, key, gen_labels, real_weight, frozen=None):
        stream = lambda name: objectives.stream(key, name)  # noqa: E731
        net = lambda p: functools.partial(denoiser, state.generator.variables(p))  # noqa: E731
        x_real = batch["x"]
        onehot_real = objectives.one_hot(batch["label"], label_dim)
        onehot_gen = objectives.one_hot(gen_labels, label_dim)
        n_gen = x_real.shape[0] if gen_labels is None else gen_labels.shape[0]

        def record(state, phase, metrics):
            zeros = {m: 0.0 for m in PHASES[phase]}  # terms this config's objective lacks
            return state.replace(phase_log=common.record_phase(
                state.phase_log, phase, state.step + 1, dict(zeros, **metrics)))

        def tsm_update(state):
            loss_fn = lambda p: tsm_loss(net(p), teacher, x_real, stream("tsm"),  # noqa: E731
                                         onehot_real, p_mean=mc.p_mean, p_std=mc.p_std,
                                         sigma_data=sigma_data, guidance_scale=guidance,
                                         real_weight=real_weight)
            l_gen, g_gen = jax.value_and_grad(loss_fn)(state.generator.params)
            generator, gnorm = state.generator.apply_gradients(gen_tx, g_gen)
            l_fake, g_fake = jax.value_and_grad(loss_fn)(state.guide.params["fake"])
            g_guide = {"fake": g_fake, "head": jax.tree.map(jnp.zeros_like,
                                                            state.guide.params["head"])}
            guide, _ = state.guide.apply_gradients(guide_tx, g_guide)
            # The head waits for the GAN (AdamW's weight decay would move it even at zero grad).
            guide = guide.replace(params={"fake": guide.params["fake"],
                                          "head": state.guide.params["head"]})
            state = state.replace(generator=generator, guide=guide)
            return record(state, "tsm", {"tsm_loss": l_gen, "tsm_fake_loss": l_fake,
                                         "tsm_grad_norm": gnorm})

        def generator_input(params):
            """(x, sigma, one-hot labels) the generator is trained at: pure noise, or after k of
            its own steps, or (no backward simulation) real data noised to the k-th sigma."""
            z = objectives.draw_noise(stream("gen_noise"), n_gen, config.model.shape)
            if mc.gen_steps == 1:
                return z * gen_sigmas[0], jnp.full((n_gen,), gen_sigmas[0]), onehot_gen
            k = jax.random.randint(stream("gen_step"), (), 0, mc.gen_steps)
            sigma = jnp.full((n_gen,), gen_sigmas[k])
            if mc.backward_simulation:
                generate = lambda x, s: net(params)(x, s, onehot_gen)  # noqa: E731
                x = backward_simulate(generate, z, gen_sigmas, k, stream("backward_simulation"))
                return x, sigma, onehot_gen
            # Real examples noised to the k-th sigma, generated under their own labels
            # (sd_unified_model without backward simulation uses the real images' prompts); MSD
            # draws them from the student's own classes (uniformly from the batch if it has none).
            n_real = x_real.shape[0]
            if real_weight is None:
                idx = jnp.arange(n_gen) % n_real
            else:
                p = jnp.where(jnp.sum(real_weight) > 0, real_weight, jnp.ones_like(real_weight))
                idx = jax.random.choice(stream("gen_input_examples"), n_real, (n_gen,),
                                        p=p / jnp.sum(p))
            x = objectives.add_noise(stream("gen_input_noise"), x_real[idx], sigma)
            return x, sigma, objectives.one_hot(batch["label"][idx], label_dim)

        x_in, sigma_in, onehot_in = generator_input(state.generator.params)
        generate = lambda p: net(p)(x_in, sigma_in, onehot_in)  # noqa: E731

        def logits_fn(guide_params):
            return functools.partial(gan_logits, denoiser,
                                     state.generator.variables(guide_params["fake"]),
                                     guide_params["head"])

        def generator_update(state):
            guide_params = state.guide.params

            def loss_fn(p):
                x = generate(p)
                aux = {"dm_loss": distribution_matching_loss(
                    x, teacher, net(guide_params["fake"]), stream("dm"), table, min_step,
                    max_step + 1, onehot_in, guidance)}
                total = aux["dm_loss"]
                if gan:
                    aux["gen_gan_loss"] = gan_generator_loss(
                        logits_fn(guide_params), x, stream("gan_g"), table,
                        mc.diffusion_gan_max_timestep, onehot_in)
                    total = total + mc.gen_gan_weight * aux["gen_gan_loss"]
                if regression:
                    lpips_params = (frozen or {}).get("lpips")
                    aux["reg_loss"] = regression_loss(config, net(p), batch, lpips_params)
                    total = total + mc.regression_weight * aux["reg_loss"]
                return total, aux

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.generator.params)
            generator, gnorm = state.generator.apply_gradients(gen_tx, grads)
            state = state.replace(generator=generator)
            return record(state, "gen", dict(aux, gen_loss=loss, gen_grad_norm=gnorm))

        def skip_generator(state):
            return state

        def guidance_update(state):
            x = jax.lax.stop_gradient(generate(state.generator.params))

            def loss_fn(gp):
                aux = {"fake_loss": fake_score_loss(net(gp["fake"]), x, stream("fake"), table,
                                                    onehot_in, sigma_data)}
                total = aux["fake_loss"]
                if gan:
                    aux["guide_gan_loss"] = gan_discriminator_loss(
                        logits_fn(gp), x_real, onehot_real, x, onehot_in, stream("gan_d"),
                        table, mc.diffusion_gan_max_timestep, real_weight)
                    total = total + mc.guidance_gan_weight * aux["guide_gan_loss"]
                return total, aux

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.guide.params)
            guide, gnorm = state.guide.apply_gradients(guide_tx, grads)
            state = state.replace(guide=guide)
            return record(state, "guide", dict(aux, guide_loss=loss, guide_grad_norm=gnorm))

        in_tsm = state.step < mc.tsm_steps
        is_gen_step = (state.step - mc.tsm_steps) % mc.dfake_gen_update_ratio == 0

        def distill_update(state):
            # The generator's step uses the fake score before this step's update (official order).
            new_state = jax.lax.cond(is_gen_step, generator_update, skip_generator, state)
            guided = guidance_update(state)
            return new_state.replace(guide=guided.guide,
                                     phase_log=dict(new_state.phase_log,
                                                    guide=guided.phase_log["guide"]))

        if mc.tsm_steps > 0:
            state = jax.lax.cond(in_tsm, tsm_update, distill_update, state)
        else:
            state = distill_update(state)
        log = state.phase_log
        out = common.phase_metrics(log, reported)
        loss = log["gen"]["gen_loss"] + log["guide"]["guide_loss"]
        out["loss"] = jnp.where(in_tsm, log["tsm"]["tsm_loss"], loss)
        out["gen_updated"] = (in_tsm | is_gen_step).astype(jnp.float32)
        return state.replace(step=state.step + 1), out

    return update


def train_step(config):
    """step(state, teacher, batch, rng, frozen=None) -> (state, metrics): one DMD2 (TTUR) step."""
    update = ttur_update(config)
    label_dim = config.model.label_dim

    def step(state: DMD2State, teacher, batch, rng, frozen=None):
        key = jax.random.fold_in(rng, state.step)
        gen_labels = objectives.draw_labels(objectives.stream(key, "gen_labels"),
                                            batch["x"].shape[0], label_dim)
        return update(state, teacher, batch, objectives.stream(key, "update"), gen_labels, None,
                      frozen)

    return step


def sample(config, state: DMD2State, rng: jax.Array, n: int, *, labels=None, num_steps=None,
           weights=None):
    """n samples of the K-step generator (K = num_steps, default config.sample.num_steps):
    x0 = G(x, sigma_i), re-noised to sigma_{i+1} (the 'multistep' sampler on
    `generator_sigmas(K)`); `weights` 'online' (the only ones DMD2 keeps). Returns (samples,
    labels)."""
    denoiser = common.build_denoiser(config)
    variables = state.generator.variables(state.generator.weights(weights or trainable.ONLINE))
    return common.sample_with(config, functools.partial(denoiser, variables), rng, n,
                              labels=labels, sampler="multistep",
                              sigmas=generator_sigmas(num_steps or config.sample.num_steps))


PAIR_CHUNK = 1024  # pairs per stored chunk


def extra_data(config):
    """DMD's paired (noise, teacher ODE output) data when regression_weight > 0, else None: made
    once by a teacher Heun run (teacher.ode_pairs) into regression_pairs_dir (default
    <workdir>/regression_pairs); an interrupted build resumes where it stopped."""
    mc = config.method
    if mc.regression_weight <= 0:
        return None
    shape, label_dim, num_steps = tuple(config.model.shape), config.model.label_dim, \
        mc.regression_heun_steps

    def make_chunk(teacher, key):
        z, y, labels = teacher_lib.ode_pairs(teacher, key, PAIR_CHUNK, shape, label_dim,
                                             num_steps)
        return {"z": z, "y": y,
                "label": jnp.zeros(PAIR_CHUNK, jnp.int32) if labels is None else labels}

    return DataStream(name="regression_pairs", directory=mc.regression_pairs_dir,
                      directory_field="config.method.regression_pairs_dir",
                      spec={"what": "teacher Heun ODE pairs", "num_steps": num_steps,
                            "shape": list(shape), "label_dim": label_dim},
                      num_items=mc.regression_pairs, chunk_size=PAIR_CHUNK, make_chunk=make_chunk,
                      batch_keys={"z": "pair_noise", "y": "pair_target", "label": "pair_label"})


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
                samplers=("generator",), metrics=metrics, validate=validate,
                extra_data=extra_data, frozen_weights=frozen_weights)
