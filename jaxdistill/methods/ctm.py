"""CTM: Consistency Trajectory Models (Kim et al., ICLR 2024, arXiv 2310.02279).

The student G_theta(x_t, t, s) jumps from any time t to any earlier s along the teacher's
probability-flow ODE. Facts checked against the official code (sony/ctm code/cm/karras_diffusion.py,
resample.py, sample_util.py; Kim-Dongjun/ctm-cifar10 cm/networks.py, cm_train.py; summarised in
shared/research/ctm_dmd2_msd.md section 1):
  - G = (s/t) x_t + (1 - s/t) g_theta(x_t, t, s), with g the EDM-preconditioned network at t and the
    second time s fed as c_noise(s) through its own embedding branch ("euler" outer / "edm" inner).
  - Training times on the N-point Karras grid: one k ~ P(k) proportional to k^m (m = 1) shared by
    the batch; per example n_t ~ U{0..N-1-k}, u = grid[n_t + k], n_s ~ U{n_t+k..N-1}.
  - CTM loss d(G_sg-(G_theta(x_t, t, s), s, sigma_min), G_sg-(G_sg(x_u, u, s), s, sigma_min)) where
    x_u is k teacher Heun steps from x_t and sg- is the target (fixed-rate EMA) network.
  - DSM on the student's own denoiser g(x, sigma, sigma): EDM weight, half lognormal / half
    Karras-position sigmas; weighted adaptively by ||grad_L L_CTM|| / ||grad_L L_DSM|| at the last
    layer L.
  - Optimiser RAdam; target EMA with a fixed rate; evaluation EMAs.
  - gamma-sampling: s = sqrt(1 - gamma^2) (sigma_{i+1} - sigma_min) + sigma_min, x <- G(x, sigma_i, s),
    then re-noise to sigma_{i+1}; gamma = 0 is deterministic long jumps, gamma = 1 consistency
    multistep.
  - GAN (config.method.gan_weight > 0): a projected discriminator (frozen random projections +
    trainable multi-scale heads, jaxdistill.networks.discriminator) on frozen backbone features of
    DiffAugment-ed images, hinge losses, real data as positives, fake = the CTM estimate
    G_sg-(G_theta(x_t, t, s), s, sigma_min), generator weight ||grad_L L_CTM|| / ||grad_L L_G||
    clipped to [0.01, 10], generator and discriminator steps alternating (g_learning_period = 2,
    even steps generator), switched on at `gan_start_step` (e.g. after a CTM+DSM phase: the state
    always carries the discriminator, so a CTM+DSM checkpoint resumes with the GAN on). Each
    phase records its metrics in the state when it runs and, with the GAN on, every step reports
    both phases' last recorded metrics with `gen_last_step` / `disc_last_step`
    (common.record_phase), so a logging step shows both whichever phase it ran.
    Backbones (`config.method.gan_backbones`), one discriminator each, losses averaged over them
    (sony/ctm karras_diffusion.get_GAN_loss / enc_dec_lib.get_xl_feature, which also draws
    separate DiffAugment parameters per backbone): "teacher" = the frozen teacher network's
    multi-scale encoder features (default; needs nothing downloaded), "deit" / "efficientnet" =
    CTM's official deit_base_distilled_patch16_224 + tf_efficientnet_lite0
    (jaxdistill.networks.backbones) from user-supplied weight files.  Pretrained backbone weights
    are read once when the step is built and stay outside the state (like the teacher: never
    checkpointed, never in an optimizer; closed over by the step, so the compiled program holds
    them as constants, as it does LPIPS's weights); their random frozen parts (DeiT readout
    convs, the projections) live in `disc_consts`.  Discriminator optimiser RAdam with betas (0.5, 0.9) and
    lr 2e-3 (sony/ctm train_util.py); `d_optimizer='adam'` gives the paper's Adam(0.5, 0.9).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxdistill import augment, diffusion, samplers
from jaxdistill.methods import common
from jaxdistill.methods.protocol import Method
from jaxdistill.networks import backbones
from jaxdistill.networks.denoiser import EDMDenoiser
from jaxdistill.networks.discriminator import (ProjectedDiscriminator, adaptive_weight,
                                               hinge_d_loss, hinge_g_loss)




@flax.struct.dataclass
class CTMState:
    step: jax.Array
    params: Any
    target_params: Any        # theta^-: fixed-rate EMA used inside the loss
    ema_params: tuple         # evaluation EMAs, one per rate in config.method.eval_emas
    consts: Any
    opt_state: Any
    disc_params: Any          # {backbone: discriminator heads} ({} when not buildable)
    disc_consts: Any          # {backbone: {"disc": projections, "backbone": random frozen parts}}
    disc_opt_state: Any
    phase_log: Any            # each phase's metrics at its last update (init_phase_log(PHASES))


# The metrics each phase records when it runs (the same with the GAN on or off, so the state's
# structure is too): the generator's update ('loss' is its objective) and the discriminator's.
PHASES = {
    "gen": ("loss", "ctm_loss", "dsm_loss", "dsm_lambda", "gan_g_loss", "gan_lambda",
            "heun_steps", "grad_norm"),
    "disc": ("d_loss", "d_grad_norm"),
}
_GAN_ONLY = ("gan_g_loss", "gan_lambda")


def make_disc_optimizer(config) -> optax.GradientTransformation:
    """RAdam (sony/ctm train_util.py) or Adam (the paper), lr d_lr, betas (d_b1, d_b2)."""
    mc = config.method
    optimizers = {"radam": optax.radam, "adam": optax.adam}
    if mc.d_optimizer not in optimizers:
        raise ValueError(f"config.method.d_optimizer={mc.d_optimizer!r} is not radam or adam")
    return optimizers[mc.d_optimizer](mc.d_lr, b1=mc.d_b1, b2=mc.d_b2)


def gan_backbone_names(config) -> tuple:
    """config.method.gan_backbones, checked."""
    names = tuple(config.method.gan_backbones)
    allowed = ("teacher",) + backbones.PRETRAINED
    if not names or any(n not in allowed for n in names) or len(set(names)) != len(names):
        raise ValueError(f"config.method.gan_backbones={names!r}: give distinct names from "
                         f"{allowed}")
    if any(n in backbones.PRETRAINED for n in names) and len(config.model.shape) != 3:
        raise ValueError(f"config.method.gan_backbones={names!r}: pretrained backbones need "
                         f"images (config.model.shape={tuple(config.model.shape)})")
    return names


def backbone_features(config, teacher_net, teacher, x):
    """The frozen teacher network's multi-scale encoder features of images x (GAN backbone).

    Images are shown to the teacher at the small noise level `config.method.gan_feature_sigma`.
    """
    sigma = jnp.full((x.shape[0],), config.method.gan_feature_sigma)
    _, _, c_in, c_noise = diffusion.edm_precond(sigma)
    label_dim = config.model.label_dim
    labels = jnp.zeros((x.shape[0], label_dim)) if label_dim else None
    _, inter = teacher_net.net.apply(teacher, diffusion.expand_to(c_in, x) * x, c_noise, labels,
                                     mutable=["intermediates"])
    # No stop_gradient: the generator's GAN gradient flows through the frozen backbone.
    return list(inter["intermediates"]["encoder"])


def init_backbone(config, name, key, teacher):
    """(random frozen collections, zero feature maps of the right shapes) of backbone `name`."""
    shape = tuple(config.model.shape)
    if name == "teacher":
        return {}, backbone_features(config, common.teacher_denoiser(config), teacher,
                                     jnp.zeros((1,) + shape))
    frozen, abstract = backbones.init_random(backbones.build(name, config.method), key, shape)
    return frozen, [jnp.zeros(a.shape, a.dtype) for a in abstract]


def feature_fn(config, name, teacher_net):
    """(teacher, random frozen collections, images) -> feature maps of backbone `name`.

    Pretrained weights are read here, once (a missing file fails before training), and closed
    over: no optimizer ever sees them; gradients flow through them to the images.
    """
    if name == "teacher":
        return lambda teacher, frozen, x: backbone_features(config, teacher_net, teacher, x)
    backbone = backbones.build(name, config.method)
    pretrained = backbone.load()
    return lambda teacher, frozen, x: backbones.features(backbone, {**pretrained, **frozen}, x)


def make_optimizer(config) -> optax.GradientTransformation:
    """The student's RAdam (sony/ctm), built by the shared optimizer factory."""
    return common.make_optimizer(config.optim, config.train.batch_size, optimizer=optax.radam)


def init(config, rng: jax.Array, teacher=None) -> CTMState:
    """Student with an s-branch, initialised from the teacher by parameter name."""
    if not config.network.get("s_embedding"):
        raise ValueError("CTM's student needs the target-time input: set "
                         "config.network.s_embedding=True")
    denoiser = common.build_denoiser(config)
    params, consts = common.init_student(config, denoiser, rng, teacher)
    copy = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731
    disc_params, disc_consts = {}, {}
    names = gan_backbone_names(config)
    if "teacher" not in names or config.teacher.kind == "checkpoint":
        # Always built when possible, so a CTM+DSM run can switch its GAN phase on.
        k_gan = jax.random.fold_in(rng, 1)
        for i, name in enumerate(names):
            k_backbone, k_disc = jax.random.split(jax.random.fold_in(k_gan, i))
            frozen, feats = init_backbone(config, name, k_backbone, teacher)
            disc_vars = dict(ProjectedDiscriminator().init({"params": k_disc}, feats))
            disc_params[name] = disc_vars.pop("params")
            disc_consts[name] = {"disc": disc_vars, "backbone": frozen}
    return CTMState(step=jnp.zeros((), jnp.int32), params=params, target_params=copy(),
                    ema_params=tuple(copy() for _ in config.method.eval_emas), consts=consts,
                    opt_state=make_optimizer(config).init(params), disc_params=disc_params,
                    disc_consts=disc_consts,
                    disc_opt_state=make_disc_optimizer(config).init(disc_params),
                    phase_log=common.init_phase_log(PHASES))


def jump(denoiser, variables, x, t, s, labels=None, *, train=False, rng=None):
    """G(x_t, t, s) = (s/t) x_t + (1 - s/t) g(x_t, t, s); t, s per example (N,)."""
    _, _, _, c_noise_s = diffusion.edm_precond(s)
    g = denoiser(variables, x, t, labels, train=train, rng=rng, noise_labels_s=c_noise_s)
    ratio = diffusion.expand_to(s / t, x)
    return ratio * x + (1.0 - ratio) * g


def own_denoiser(denoiser, variables, x, sigma, labels=None, *, train=False, rng=None):
    """The student as a diffusion model: g(x, sigma, s = sigma)."""
    _, _, _, c_noise = diffusion.edm_precond(sigma)
    return denoiser(variables, x, sigma, labels, train=train, rng=rng, noise_labels_s=c_noise)


def mean_over_backbones(losses) -> jax.Array:
    """The official average of per-backbone GAN losses (sum / number of backbones)."""
    return jnp.mean(jnp.stack(list(losses)))


def sample_heun_steps(key: jax.Array, max_steps: int, multiplier: float = 1.0) -> jax.Array:
    """k in {1..max_steps} with P(k) proportional to k^multiplier ('weighted' strategy)."""
    ks = jnp.arange(1, max_steps + 1, dtype=jnp.float32)
    return jax.random.categorical(key, multiplier * jnp.log(ks)) + 1


def sample_indices(key: jax.Array, n: int, num_scales: int, k: jax.Array):
    """Per-example grid indices (n_t, n_u = n_t + k, n_s ~ U{n_u..N-1})."""
    k_t, k_s = jax.random.split(key)
    n_t = jax.random.randint(k_t, (n,), 0, num_scales - k)
    n_u = n_t + k
    n_s = jax.random.randint(k_s, (n,), n_u, num_scales)
    return n_t, n_u, n_s


def teacher_solve(teacher_denoise, x, grid, n_t, k):
    """k Heun steps of the teacher from grid[n_t] to grid[n_t + k], per example; inside jit."""

    def body(j, x):
        return samplers.heun_step(teacher_denoise, x, grid[n_t + j], grid[n_t + j + 1])

    return jax.lax.fori_loop(0, k, body, x)


def dsm_sigmas(key: jax.Array, n: int, mc):
    """First half lognormal(P_mean, P_std), second half Karras position in [0, 0.7]."""
    k_ln, k_kp = jax.random.split(key)
    half = n // 2
    return jnp.concatenate([
        diffusion.sample_lognormal_sigma(k_ln, (half,), mc.p_mean, mc.p_std),
        diffusion.sample_karras_position_sigma(k_kp, (n - half,), mc.dsm_max_position)])


def train_step(config):
    """step(state, teacher, batch, rng) -> (state, metrics): one CTM + DSM generator update, or
    with the GAN on, a generator or discriminator update; the metrics are then both phases' last
    recorded ones with `gen_last_step` / `disc_last_step` (0: not run yet)."""
    mc = config.method
    denoiser = common.build_denoiser(config)
    teacher_net = common.teacher_denoiser(config)
    tx = make_optimizer(config)
    grid = diffusion.karras_sigmas(mc.num_scales, append_zero=False)
    lpips_params = common.distance_params(config)

    gan = mc.gan_weight > 0
    names = gan_backbone_names(config)
    if gan and "teacher" in names and not isinstance(teacher_net, EDMDenoiser):
        raise ValueError("config.method.gan_weight > 0 with the 'teacher' GAN backbone needs a "
                         "network teacher for the discriminator's features: "
                         "config.teacher.kind='checkpoint' (or other config.method.gan_backbones)")
    features = {name: feature_fn(config, name, teacher_net) for name in names} if gan else {}
    disc = ProjectedDiscriminator()
    d_tx = make_disc_optimizer(config)

    def step(state: CTMState, teacher, batch, rng):
        key = jax.random.fold_in(rng, state.step)
        (k_heun, k_idx, k_noise, k_drop, k_dsm, k_dsm_noise, k_dsm_drop, k_aug_fake,
         k_aug_real) = jax.random.split(key, 9)
        x0 = batch["x"]
        n = x0.shape[0]
        labels = common.one_hot(batch["label"], config.model.label_dim)
        var = lambda p: {"params": p, **state.consts}  # noqa: E731
        sigma_min = jnp.full((n,), diffusion.SIGMA_MIN)

        k = sample_heun_steps(k_heun, mc.num_heun_step, mc.heun_step_multiplier)
        n_t, n_u, n_s = sample_indices(k_idx, n, mc.num_scales, k)
        t, u, s = grid[n_t], grid[n_u], grid[n_s]
        x_t = x0 + diffusion.expand_to(t, x0) * jax.random.normal(k_noise, x0.shape)

        def estimate_fn(params):
            """G_sg-(G_theta(x_t, t, s), s, sigma_min): the CTM estimate and the GAN's fake."""
            x_s = jump(denoiser, var(params), x_t, t, s, labels, train=True, rng=k_drop)
            return jump(denoiser, var(state.target_params), x_s, s, sigma_min, labels)

        def disc_logits(disc_params, images, aug_key):
            """One (N, P) logits map per backbone, each on its own DiffAugment draw."""
            logits = []
            for i, name in enumerate(names):
                x = images
                if mc.diffaug and images.ndim == 4:  # DiffAugment is for images, not vectors
                    x = augment.diff_augment(jax.random.fold_in(aug_key, i), images, mc.diffaug)
                consts = state.disc_consts[name]
                feats = features[name](teacher, consts["backbone"], x)
                logits.append(disc.apply({"params": disc_params[name], **consts["disc"]}, feats,
                                         return_map=True))
            return logits

        def generator_update(state):
            # Target: teacher t -> u, stop-grad student u -> s, target network s -> sigma_min.
            teacher_denoise = lambda x, sig: teacher_net(teacher, x, sig, labels)  # noqa: E731
            x_u = teacher_solve(teacher_denoise, x_t, grid, n_t, k)
            x_s_target = jump(denoiser, var(state.params), x_u, u, s, labels)
            target = jax.lax.stop_gradient(
                jump(denoiser, var(state.target_params), x_s_target, s, sigma_min, labels))

            def dsm_loss(params):
                sigma = dsm_sigmas(k_dsm, n, mc)
                noisy = x0 + diffusion.expand_to(sigma, x0) * jax.random.normal(k_dsm_noise,
                                                                                x0.shape)
                d = own_denoiser(denoiser, var(params), noisy, sigma, labels, train=True,
                                 rng=k_dsm_drop)
                per_example = jnp.mean(((d - x0) ** 2).reshape(n, -1), axis=1)
                return jnp.mean(diffusion.edm_loss_weight(sigma, config.model.sigma_data)
                                * per_example)

            # One forward of the estimate, pulled back for each loss that uses it.
            estimate, pullback = jax.vjp(estimate_fn, state.params)
            l_ctm, d_ctm = jax.value_and_grad(
                lambda e: jnp.mean(common.distance(config, e, target, lpips_params)))(estimate)
            (g_ctm,) = pullback(d_ctm)
            l_dsm, g_dsm = jax.value_and_grad(dsm_loss)(state.params)
            last = lambda g: common.last_layer_kernel(config, g)  # noqa: E731
            lam = (adaptive_weight(last(g_ctm), last(g_dsm), clip=None) if mc.dsm_adaptive
                   else jnp.ones(()))
            lam = jax.lax.stop_gradient(lam) * mc.dsm_weight
            grads = jax.tree.map(lambda a, b: a + lam * b, g_ctm, g_dsm)
            metrics = {"ctm_loss": l_ctm, "dsm_loss": l_dsm, "dsm_lambda": lam}
            loss = l_ctm + lam * l_dsm
            if gan:
                l_gan, d_gan = jax.value_and_grad(
                    lambda e: mean_over_backbones(
                        map(hinge_g_loss, disc_logits(state.disc_params, e, k_aug_fake))))(
                        estimate)
                (g_gan,) = pullback(d_gan)
                on = (state.step >= mc.gan_start_step).astype(jnp.float32)
                lam_gan = on * mc.gan_weight * adaptive_weight(last(g_ctm), last(g_gan),
                                                               clip=(0.01, 10.0))
                grads = jax.tree.map(lambda a, b: a + lam_gan * b, grads, g_gan)
                loss = loss + lam_gan * l_gan
                metrics.update(gan_g_loss=l_gan, gan_lambda=lam_gan)
            grads = common.sanitize_grads(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            target_params = common.ema_update(state.target_params, params, mc.target_ema)
            ema_params = tuple(common.ema_update(e, params, rate)
                               for e, rate in zip(state.ema_params, mc.eval_emas))
            metrics.update(loss=loss, heun_steps=k.astype(jnp.float32),
                           grad_norm=optax.tree.norm(grads))
            log = common.record_phase(state.phase_log, "gen", state.step + 1,
                                      dict({m: 0.0 for m in _GAN_ONLY}, **metrics))
            return state.replace(step=state.step + 1, params=params, target_params=target_params,
                                 ema_params=ema_params, opt_state=opt_state, phase_log=log)

        def discriminator_update(state):
            fake = jax.lax.stop_gradient(estimate_fn(state.params))

            def d_loss(disc_params):
                return mean_over_backbones(map(hinge_d_loss,
                                               disc_logits(disc_params, x0, k_aug_real),
                                               disc_logits(disc_params, fake, k_aug_fake)))

            l_d, g_d = jax.value_and_grad(d_loss)(state.disc_params)
            updates, disc_opt_state = d_tx.update(common.sanitize_grads(g_d),
                                                  state.disc_opt_state, state.disc_params)
            log = common.record_phase(state.phase_log, "disc", state.step + 1,
                                      {"d_loss": l_d, "d_grad_norm": optax.tree.norm(g_d)})
            return state.replace(step=state.step + 1,
                                 disc_params=optax.apply_updates(state.disc_params, updates),
                                 disc_opt_state=disc_opt_state, phase_log=log)

        if not gan:
            # Every step is a generator step: its fresh metrics (the GAN's left out).
            state = generator_update(state)
            return state, {m: state.phase_log["gen"][m] for m in PHASES["gen"]
                           if m not in _GAN_ONLY}
        # Official alternation (g_learning_period = 2): even steps generator, odd discriminator.
        is_d_step = ((state.step >= mc.gan_start_step)
                     & (state.step % mc.g_learning_period == mc.g_learning_period - 1))
        state = jax.lax.cond(is_d_step, discriminator_update, generator_update, state)
        return state, common.phase_metrics(state.phase_log)

    return step


def gamma_sample(denoiser, variables, noise, labels, *, num_steps: int, gamma: float,
                 key: jax.Array, sigma_min: float = diffusion.SIGMA_MIN,
                 sigma_max: float = diffusion.SIGMA_MAX, rho: float = diffusion.RHO):
    """CTM gamma-sampling with `num_steps` jumps from sigma_max (NFE = num_steps)."""
    sigmas = diffusion.karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho, append_zero=False)
    sigmas = sigmas.at[-1].set(sigma_min)  # exact, so the last step adds no noise
    n = noise.shape[0]
    keys = jax.random.split(key, num_steps)

    def body(x, inputs):
        t, t_next, k = inputs
        gap = (1.0 - (1.0 - gamma**2) ** 0.5) * (t_next - sigma_min)  # t_next - s
        s = t_next - gap
        x = jump(denoiser, variables, x, jnp.full((n,), t), jnp.full((n,), s), labels)
        # Re-noise with std sqrt(t_next^2 - s^2) = sqrt(gap (t_next + s)): written without
        # cancellation so it is exactly 0 for gamma = 0 and on the last step (t_next = sigma_min),
        # as in the official samplers, which add no noise there (cross-checked against sony/ctm).
        return x + jnp.sqrt(gap * (t_next + s)) * jax.random.normal(k, x.shape), None

    x, _ = jax.lax.scan(body, noise * sigma_max, (sigmas[:-1], sigmas[1:], keys))
    return x


def sample(config, state: CTMState, rng: jax.Array, n: int, labels=None):
    """n samples from the evaluation EMA `config.sample.ema_index` (returns samples, labels).

    config.sample.sampler == 'gamma' runs gamma-sampling with config.sample.num_steps jumps and
    config.sample.gamma; any other sampler (heun, euler, ...) runs the student's own denoiser
    g(x, sigma, sigma) as a diffusion model.
    """
    sc = config.sample
    denoiser = common.build_denoiser(config)
    params = state.ema_params[sc.ema_index] if state.ema_params else state.params
    variables = {"params": params, **state.consts}
    if sc.sampler != "gamma":
        student_as_diffusion = lambda v, x, sigma, lab: own_denoiser(denoiser, v, x, sigma, lab)  # noqa: E731
        return common.sample_with(config, student_as_diffusion, variables, rng, n, labels)
    k_labels, k_noise, k_gamma = jax.random.split(rng, 3)
    if labels is None:
        labels = common.random_labels(k_labels, n, config.model.label_dim)
    noise = jax.random.normal(k_noise, (n,) + tuple(config.model.shape))
    x = gamma_sample(denoiser, variables, noise, common.one_hot(labels, config.model.label_dim),
                     num_steps=sc.num_steps, gamma=sc.gamma, key=k_gamma,
                     sigma_min=sc.sigma_min, sigma_max=sc.sigma_max, rho=sc.rho)
    return x, labels


def validate(config) -> None:
    """CTM's own fields: GAN backbones and discriminator optimizer names."""
    gan_backbone_names(config)
    make_disc_optimizer(config)


# Samplers: the student's own denoiser under every generic sampler, or gamma-sampling.
METHOD = Method(name="ctm", init=init, train_step=train_step, sample=sample,
                samplers=(*sorted(samplers.SAMPLERS), "gamma"), validate=validate)
