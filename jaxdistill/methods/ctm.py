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
    and LPIPS's are the step's `frozen` argument (`frozen_weights`, read once by the trainer and
    sharded like the teacher: never checkpointed, never in an optimizer, never baked into the
    compiled program as constants); their random frozen parts (DeiT readout convs, the
    projections) are the discriminator Trainable's consts.  Discriminator optimiser RAdam with betas (0.5, 0.9) and
    lr 2e-3 (sony/ctm train_util.py); `d_optimizer='adam'` gives the paper's Adam(0.5, 0.9).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxdistill import augment, diffusion, objectives, samplers
from jaxdistill.methods import common, trainable
from jaxdistill.methods.protocol import Method
from jaxdistill.methods.trainable import ONLINE, Trainable
from jaxdistill.networks import backbones
from jaxdistill.networks.denoiser import EDMDenoiser
from jaxdistill.networks.discriminator import (ProjectedDiscriminator, adaptive_weight,
                                               hinge_d_loss, hinge_g_loss)

TARGET = "target"  # the student's EMA theta^- used inside the loss (fixed rate)


def eval_ema_names(config) -> tuple[str, ...]:
    """The student's evaluation EMAs, one per rate in config.method.eval_emas: ema0, ema1, ..."""
    return tuple(f"ema{i}" for i in range(len(config.method.eval_emas)))


@flax.struct.dataclass
class CTMState:
    step: jax.Array
    student: Trainable   # emas: {TARGET: theta^-, 'ema0', 'ema1', ...: evaluation EMAs}
    disc: Trainable      # params {backbone: discriminator heads} ({} when not buildable);
    #                      consts {backbone: {"disc": projections, "backbone": random frozen parts}}
    phase_log: Any       # each phase's metrics at its last update (init_phase_log(PHASES))


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


def backbone_features(config, teacher, x):
    """The frozen network teacher's multi-scale encoder features of images x (GAN backbone).

    Images are shown to the teacher at the small noise level `config.method.gan_feature_sigma`.
    """
    sigma = jnp.full((x.shape[0],), config.method.gan_feature_sigma)
    _, _, c_in, c_noise = diffusion.edm_precond(sigma)
    label_dim = config.model.label_dim
    labels = jnp.zeros((x.shape[0], label_dim)) if label_dim else None
    _, inter = teacher.denoise.net.apply(teacher.params, diffusion.expand_to(c_in, x) * x,
                                         c_noise, labels, mutable=["intermediates"])
    # No stop_gradient: the generator's GAN gradient flows through the frozen backbone.
    return list(inter["intermediates"]["encoder"])


def init_backbone(config, name, key, teacher):
    """(random frozen collections, zero feature maps of the right shapes) of backbone `name`."""
    shape = tuple(config.model.shape)
    if name == "teacher":
        return {}, backbone_features(config, teacher, jnp.zeros((1,) + shape))
    frozen, abstract = backbones.init_random(backbones.build(name, config.method), key, shape)
    return frozen, [jnp.zeros(a.shape, a.dtype) for a in abstract]


def gan_enabled(config) -> bool:
    return config.method.gan_weight > 0


def frozen_weights(config) -> dict:
    """The pretrained frozen weights the step takes as its `frozen` argument, read once from the
    user's files (a missing file fails here, before training): LPIPS's when
    config.method.distance = 'lpips', each pretrained GAN backbone's when the GAN is on."""
    frozen = {}
    if config.method.distance == "lpips":
        frozen["lpips"] = common.distance_params(config)
    if gan_enabled(config):
        frozen["backbones"] = {name: backbones.build(name, config.method).load()
                               for name in gan_backbone_names(config)
                               if name in backbones.PRETRAINED}
    return frozen


def make_optimizer(config) -> optax.GradientTransformation:
    """The student's RAdam (sony/ctm), built by the shared optimizer factory."""
    return trainable.make_optimizer(config.optim, config.train.batch_size, optimizer=optax.radam)


def init(config, rng: jax.Array, teacher=None) -> CTMState:
    """Student with an s-branch, initialised from the teacher by parameter name."""
    if not config.network.get("s_embedding"):
        raise ValueError("CTM's student needs the target-time input: set "
                         "config.network.s_embedding=True")
    params, consts = common.init_student(config, common.build_denoiser(config), rng, teacher)
    disc_params, disc_consts = {}, {}
    names = gan_backbone_names(config)
    if "teacher" not in names or isinstance(getattr(teacher, "denoise", None), EDMDenoiser):
        # Always built when possible, so a CTM+DSM run can switch its GAN phase on.
        k_gan = jax.random.fold_in(rng, 1)
        for i, name in enumerate(names):
            k_backbone, k_disc = jax.random.split(jax.random.fold_in(k_gan, i))
            frozen, feats = init_backbone(config, name, k_backbone, teacher)
            disc_vars = dict(ProjectedDiscriminator().init({"params": k_disc}, feats))
            disc_params[name] = disc_vars.pop("params")
            disc_consts[name] = {"disc": disc_vars, "backbone": frozen}
    student = Trainable.create(params, make_optimizer(config), consts=consts,
                               emas=(TARGET, *eval_ema_names(config)))
    disc = Trainable.create(disc_params, make_disc_optimizer(config), consts=disc_consts)
    return CTMState(step=jnp.zeros((), jnp.int32), student=student, disc=disc,
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


def _needs(frozen, key: str, what: str):
    if frozen is None or key not in frozen:
        raise ValueError(f"{what} needs its pretrained weights as the step's `frozen` argument: "
                         "pass frozen=METHOD.frozen_weights(config) (the trainer does)")
    return frozen[key]


def train_step(config):
    """step(state, teacher, batch, rng, frozen=None) -> (state, metrics): one CTM + DSM generator
    update, or with the GAN on, a generator or discriminator update; the metrics are then both
    phases' last recorded ones with `gen_last_step` / `disc_last_step` (0: not run yet).
    `frozen` is `frozen_weights(config)` (LPIPS / pretrained GAN backbones; None when unused)."""
    mc = config.method
    denoiser = common.build_denoiser(config)
    tx = make_optimizer(config)
    grid = diffusion.karras_sigmas(mc.num_scales, append_zero=False)
    ema_decays = {TARGET: mc.target_ema, **dict(zip(eval_ema_names(config), mc.eval_emas))}
    gan = gan_enabled(config)
    names = gan_backbone_names(config)
    disc = ProjectedDiscriminator()
    d_tx = make_disc_optimizer(config)
    pretrained = {name: backbones.build(name, mc) for name in names
                  if gan and name in backbones.PRETRAINED}

    def step(state: CTMState, teacher, batch, rng, frozen=None):
        if gan and "teacher" in names and not isinstance(teacher.denoise, EDMDenoiser):
            raise ValueError("config.method.gan_weight > 0 with the 'teacher' GAN backbone needs "
                             "a network teacher for the discriminator's features: "
                             "config.teacher.kind='checkpoint' (or other "
                             "config.method.gan_backbones)")
        lpips_params = (_needs(frozen, "lpips", "config.method.distance='lpips'")
                        if mc.distance == "lpips" else None)
        backbone_weights = (_needs(frozen, "backbones", f"config.method.gan_backbones={names}")
                            if pretrained else {})
        key = jax.random.fold_in(rng, state.step)
        stream = lambda name: objectives.stream(key, name)  # noqa: E731
        x0 = batch["x"]
        n = x0.shape[0]
        labels = objectives.one_hot(batch["label"], config.model.label_dim)
        student = state.student
        var = student.variables
        sigma_min = jnp.full((n,), diffusion.SIGMA_MIN)

        k = sample_heun_steps(stream("heun_steps"), mc.num_heun_step, mc.heun_step_multiplier)
        n_t, n_u, n_s = sample_indices(stream("indices"), n, mc.num_scales, k)
        t, u, s = grid[n_t], grid[n_u], grid[n_s]
        x_t = objectives.add_noise(stream("noise"), x0, t)

        def estimate_fn(params):
            """G_sg-(G_theta(x_t, t, s), s, sigma_min): the CTM estimate and the GAN's fake."""
            x_s = jump(denoiser, var(params), x_t, t, s, labels, train=True,
                       rng=stream("dropout"))
            return jump(denoiser, var(student.emas[TARGET]), x_s, s, sigma_min, labels)

        def features(name, random_frozen, x):
            if name == "teacher":
                return backbone_features(config, teacher, x)
            return backbones.features(pretrained[name],
                                      {**backbone_weights[name], **random_frozen}, x)

        def disc_logits(disc_params, images, aug_stream):
            """One (N, P) logits map per backbone, each on its own DiffAugment draw."""
            logits = []
            for i, name in enumerate(names):
                x = images
                if mc.diffaug and images.ndim == 4:  # DiffAugment is for images, not vectors
                    x = augment.diff_augment(jax.random.fold_in(stream(aug_stream), i), images,
                                             mc.diffaug)
                consts = state.disc.consts[name]
                feats = features(name, consts["backbone"], x)
                logits.append(disc.apply({"params": disc_params[name], **consts["disc"]}, feats,
                                         return_map=True))
            return logits

        def generator_update(state):
            # Target: teacher t -> u, stop-grad student u -> s, target network s -> sigma_min.
            teacher_denoise = lambda x, sig: teacher(x, sig, labels)  # noqa: E731
            x_u = teacher_solve(teacher_denoise, x_t, grid, n_t, k)
            x_s_target = jump(denoiser, var(), x_u, u, s, labels)
            target = jax.lax.stop_gradient(
                jump(denoiser, var(student.emas[TARGET]), x_s_target, s, sigma_min, labels))

            def dsm_loss(params):
                sigma = dsm_sigmas(stream("dsm_sigma"), n, mc)
                noisy = objectives.add_noise(stream("dsm_noise"), x0, sigma)
                d = own_denoiser(denoiser, var(params), noisy, sigma, labels, train=True,
                                 rng=stream("dsm_dropout"))
                return jnp.mean(objectives.denoising_loss(d, x0, sigma, config.model.sigma_data))

            # One forward of the estimate, pulled back for each loss that uses it.
            estimate, pullback = jax.vjp(estimate_fn, student.params)
            l_ctm, d_ctm = jax.value_and_grad(
                lambda e: jnp.mean(common.distance(config, e, target, lpips_params)))(estimate)
            (g_ctm,) = pullback(d_ctm)
            l_dsm, g_dsm = jax.value_and_grad(dsm_loss)(student.params)
            last = denoiser.net.output_kernel
            lam = (adaptive_weight(last(g_ctm), last(g_dsm), clip=None) if mc.dsm_adaptive
                   else jnp.ones(()))
            lam = jax.lax.stop_gradient(lam) * mc.dsm_weight
            grads = jax.tree.map(lambda a, b: a + lam * b, g_ctm, g_dsm)
            metrics = {"ctm_loss": l_ctm, "dsm_loss": l_dsm, "dsm_lambda": lam}
            loss = l_ctm + lam * l_dsm
            if gan:
                l_gan, d_gan = jax.value_and_grad(
                    lambda e: mean_over_backbones(
                        map(hinge_g_loss, disc_logits(state.disc.params, e, "aug_fake"))))(
                        estimate)
                (g_gan,) = pullback(d_gan)
                on = (state.step >= mc.gan_start_step).astype(jnp.float32)
                lam_gan = on * mc.gan_weight * adaptive_weight(last(g_ctm), last(g_gan),
                                                               clip=(0.01, 10.0))
                grads = jax.tree.map(lambda a, b: a + lam_gan * b, grads, g_gan)
                loss = loss + lam_gan * l_gan
                metrics.update(gan_g_loss=l_gan, gan_lambda=lam_gan)
            new_student, grad_norm = student.apply_gradients(tx, grads, ema_decays)
            metrics.update(loss=loss, heun_steps=k.astype(jnp.float32), grad_norm=grad_norm)
            log = common.record_phase(state.phase_log, "gen", state.step + 1,
                                      dict({m: 0.0 for m in _GAN_ONLY}, **metrics))
            return state.replace(step=state.step + 1, student=new_student, phase_log=log)

        def discriminator_update(state):
            fake = jax.lax.stop_gradient(estimate_fn(student.params))

            def d_loss(disc_params):
                return mean_over_backbones(map(hinge_d_loss,
                                               disc_logits(disc_params, x0, "aug_real"),
                                               disc_logits(disc_params, fake, "aug_fake")))

            l_d, g_d = jax.value_and_grad(d_loss)(state.disc.params)
            new_disc, d_grad_norm = state.disc.apply_gradients(d_tx, g_d)
            log = common.record_phase(state.phase_log, "disc", state.step + 1,
                                      {"d_loss": l_d, "d_grad_norm": d_grad_norm})
            return state.replace(step=state.step + 1, disc=new_disc, phase_log=log)

        if not gan:
            # Every step is a generator step: its fresh metrics (the GAN's left out).
            state = generator_update(state)
            return state, {m: state.phase_log["gen"][m] for m in metrics(config)}
        # Official alternation (g_learning_period = 2): even steps generator, odd discriminator.
        is_d_step = ((state.step >= mc.gan_start_step)
                     & (state.step % mc.g_learning_period == mc.g_learning_period - 1))
        state = jax.lax.cond(is_d_step, discriminator_update, generator_update, state)
        return state, common.phase_metrics(state.phase_log)

    return step


def metrics(config) -> tuple[str, ...]:
    """Without the GAN, the generator's metrics; with it, both phases' and their last steps."""
    if not gan_enabled(config):
        return tuple(m for m in PHASES["gen"] if m not in _GAN_ONLY)
    return tuple(common.phase_metrics(common.init_phase_log(PHASES)))


def gamma_sample(denoiser, variables, noise, labels, *, num_steps: int, gamma: float,
                 key: jax.Array, sigma_min: float = diffusion.SIGMA_MIN,
                 sigma_max: float = diffusion.SIGMA_MAX, rho: float = diffusion.RHO):
    """CTM gamma-sampling with `num_steps` jumps from sigma_max (NFE = num_steps): the shared
    denoise / re-noise chain (samplers.denoise_renoise) whose step i jumps from sigma_i to
    s_i = sigma_{i+1} - gap_i and re-noises to sigma_{i+1}."""
    sigmas = diffusion.karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho, append_zero=False)
    sigmas = sigmas.at[-1].set(sigma_min)  # exact, so the last step adds no noise
    gaps = (1.0 - (1.0 - gamma**2) ** 0.5) * (sigmas[1:] - sigma_min)  # sigma_{i+1} - s_i
    s = sigmas[1:] - gaps
    n = noise.shape[0]

    def predict(i, x):
        return jump(denoiser, variables, x, jnp.full((n,), sigmas[i]), jnp.full((n,), s[i]),
                    labels)

    # Re-noise with std sqrt(sigma_{i+1}^2 - s_i^2) = sqrt(gap (sigma_{i+1} + s)): written
    # without cancellation so it is exactly 0 for gamma = 0 and on the last step, as in the
    # official samplers, which add no noise there (cross-checked against sony/ctm).
    return samplers.denoise_renoise(predict, noise * sigma_max, key, num_steps,
                                    lambda i: jnp.sqrt(gaps[i] * (sigmas[i + 1] + s[i])))


def sample(config, state: CTMState, rng: jax.Array, n: int, *, labels=None, num_steps=None,
           weights=None):
    """n samples from the student's `weights` (default: the evaluation EMA
    `config.sample.ema_index`, or the online weights without EMAs); returns (samples, labels).

    config.sample.sampler == 'gamma' runs gamma-sampling with `num_steps` (default
    config.sample.num_steps) jumps and config.sample.gamma; any other sampler (heun, euler, ...)
    runs the student's own denoiser g(x, sigma, sigma) as a diffusion model.
    """
    sc = config.sample
    denoiser = common.build_denoiser(config)
    ema_names = eval_ema_names(config)
    if weights is None:
        weights = ema_names[sc.ema_index] if ema_names else ONLINE
    variables = state.student.variables(state.student.weights(weights))
    if sc.sampler != "gamma":
        return common.sample_with(
            config, lambda x, sigma, lab: own_denoiser(denoiser, variables, x, sigma, lab), rng,
            n, labels=labels, num_steps=num_steps)
    if labels is None:
        labels = objectives.draw_labels(objectives.stream(rng, "labels"), n,
                                        config.model.label_dim)
    noise = objectives.draw_noise(objectives.stream(rng, "noise"), n, config.model.shape)
    x = gamma_sample(denoiser, variables, noise, objectives.one_hot(labels, config.model.label_dim),
                     num_steps=num_steps or sc.num_steps, gamma=sc.gamma,
                     key=objectives.stream(rng, "sampler"), sigma_min=sc.sigma_min,
                     sigma_max=sc.sigma_max, rho=sc.rho)
    return x, labels


def validate(config) -> None:
    """CTM's own fields: GAN backbones, discriminator optimizer, guidance with gamma-sampling,
    the evaluation EMA index."""
    gan_backbone_names(config)
    make_disc_optimizer(config)
    if config.sample.sampler == "gamma" and config.sample.guidance_scale != 1.0:
        raise ValueError(f"config.sample.guidance_scale={config.sample.guidance_scale}: "
                         "gamma-sampling has no classifier-free guidance; set it to 1.0 or use "
                         "a diffusion sampler (config.sample.sampler=heun, euler, ...)")
    num = len(config.method.eval_emas)
    if num and not 0 <= config.sample.ema_index < num:
        raise ValueError(f"config.sample.ema_index={config.sample.ema_index} must index "
                         f"config.method.eval_emas={tuple(config.method.eval_emas)}")


# Samplers: the student's own denoiser under every generic sampler, or gamma-sampling.
METHOD = Method(name="ctm", init=init, train_step=train_step, sample=sample,
                samplers=(*sorted(samplers.SAMPLERS), "gamma"), metrics=metrics,
                validate=validate, frozen_weights=frozen_weights)
