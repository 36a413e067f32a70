"""Pieces every method shares: network construction, optimizer with warm-up, EDM's EMA,
gradient sanitising, labels, and turning a denoiser into a sampler's `denoise(x, sigma)`.

Facts from NVlabs/edm training/training_loop.py: lr ramp lr * min(nimg / rampup_nimg, 1); EMA
half-life in images with ema_halflife_nimg = min(halflife, nimg * rampup_ratio) and
beta = 0.5 ** (batch / halflife_nimg); gradients nan_to_num(nan=0, posinf=1e5, neginf=-1e5).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxdistill import diffusion, networks, samplers
from jaxdistill.networks.denoiser import EDMDenoiser


def _denoiser_from(config, net_cfg, field: str) -> EDMDenoiser:
    """The EDM-preconditioned network named by `net_cfg` (name + constructor fields)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in net_cfg.items() if k != "name"}
    try:
        net = networks.create(net_cfg.name, **kwargs)
    except TypeError as e:
        raise ValueError(f"{field} has a field the network {net_cfg.name!r} does not take: "
                         f"{e}") from None
    return EDMDenoiser(net, sigma_data=config.model.sigma_data,
                       compute_dtype=config.model.compute_dtype)


def build_denoiser(config) -> EDMDenoiser:
    """The trained network (student, or the teacher being trained) of `config.network`."""
    return _denoiser_from(config, config.network, "config.network")


def init_variables(config, denoiser: EDMDenoiser, rng: jax.Array) -> tuple[dict, dict]:
    """(params, consts): trainable params and the network's other collections (buffers)."""
    extra = {"noise_labels_s": jnp.zeros((1,))} if config.network.get("s_embedding") else {}
    variables = denoiser.init(rng, tuple(config.model.shape), config.model.label_dim, **extra)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def lr_schedule(optim_cfg, batch_size: int):
    """Linear warm-up over `lr_rampup_images` images, then constant (EDM)."""
    rampup_steps = optim_cfg.lr_rampup_images / batch_size
    if rampup_steps <= 0:
        return optim_cfg.lr
    return lambda step: optim_cfg.lr * jnp.minimum(step / rampup_steps, 1.0)


def make_optimizer(optim_cfg, batch_size: int,
                   optimizer=optax.adam) -> optax.GradientTransformation:
    """`optimizer`(b1, b2, eps) (Adam for EDM, RAdam for CTM) with the warm-up schedule and
    optional global-norm clipping (grad_clip > 0)."""
    chain = []
    if optim_cfg.get("grad_clip", 0.0) > 0:
        chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    chain.append(optimizer(lr_schedule(optim_cfg, batch_size), b1=optim_cfg.b1, b2=optim_cfg.b2,
                           eps=optim_cfg.eps))
    return optax.chain(*chain)


def sanitize_grads(grads):
    """Replace NaN by 0 and +-Inf by +-1e5 so one bad batch cannot poison the weights (EDM)."""
    return jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)


def ema_beta(step: jax.Array, batch_size: int, halflife_images: float, rampup_ratio: float | None):
    nimg = step.astype(jnp.float32) * batch_size
    halflife = jnp.asarray(halflife_images, jnp.float32)
    if rampup_ratio:
        halflife = jnp.minimum(halflife, nimg * rampup_ratio)
    return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def ema_update(ema, params, beta):
    return jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, ema, params)


def one_hot(labels: jax.Array | None, label_dim: int):
    """Integer labels -> one-hot float (N, label_dim); None when the model is unconditional."""
    if not label_dim:
        return None
    return jax.nn.one_hot(labels, label_dim, dtype=jnp.float32)


def random_labels(key: jax.Array, n: int, label_dim: int):
    return jax.random.randint(key, (n,), 0, label_dim) if label_dim else None


def sample_with(config, denoiser, variables, key: jax.Array, n: int, labels=None):
    """Samples n examples with `config.sample` (sampler, grid, churn, guidance) from `denoiser`.

    Returns (samples, integer labels or None).
    """
    sc = config.sample
    label_dim = config.model.label_dim
    k_labels, k_noise, k_sampler = jax.random.split(key, 3)
    if labels is None:
        labels = random_labels(k_labels, n, label_dim)
    onehot = one_hot(labels, label_dim)

    def denoise_labels(x, sigma, lab):
        return denoiser(variables, x, sigma, lab)

    if sc.get("guidance_scale", 1.0) != 1.0:
        denoise_labels = samplers.classifier_free_guidance(denoise_labels, sc.guidance_scale)

    def denoise(x, sigma):
        return denoise_labels(x, sigma, onehot)

    append_zero = sc.sampler != "multistep"
    sigmas = diffusion.karras_sigmas(sc.num_steps, sc.sigma_min, sc.sigma_max, sc.rho,
                                     append_zero=append_zero)
    kwargs = {}
    if sc.sampler == "heun":
        kwargs = dict(s_churn=sc.get("s_churn", 0.0), s_min=sc.get("s_min", 0.0),
                      s_max=sc.get("s_max", float("inf")), s_noise=sc.get("s_noise", 1.0))
    elif sc.sampler == "ddim":
        kwargs = dict(eta=sc.get("eta", 0.0))
    noise = jax.random.normal(k_noise, (n,) + tuple(config.model.shape))
    return samplers.sample(sc.sampler, denoise, noise, sigmas, k_sampler, **kwargs), labels


def teacher_denoiser(config):
    """The frozen teacher's denoiser with the shared signature (variables, x, sigma, labels)."""
    from jaxdistill.data.mixtures import AnalyticTeacher

    if config.teacher.kind == "analytic":
        return AnalyticTeacher()
    if config.teacher.kind == "checkpoint":
        return _denoiser_from(config, config.teacher.network, "config.teacher.network")
    raise ValueError(f"config.method.name={config.method.name!r} needs a teacher: set "
                     "config.teacher.kind to 'analytic' or 'checkpoint'")


def init_student(config, denoiser, rng: jax.Array, teacher=None) -> tuple[dict, dict]:
    """(params, consts) of a fresh `config.network`, with every param and buffer (e.g. NCSN++'s
    random Fourier frequencies, which the teacher was trained with) that matches the teacher's
    by name and shape copied from it."""
    params, consts = init_variables(config, denoiser, rng)
    if teacher is None:
        return params, consts
    return (init_from_teacher(params, teacher),
            init_from_teacher(consts, teacher, collection=None))


def init_from_teacher(student_params, teacher_variables, collection: str | None = "params"):
    """Student entries whose name and shape match the teacher's copied from it.

    `collection='params'` copies the trainable params; `collection=None` takes a dict of the other
    collections (the consts of `init_variables`, e.g. NCSN++'s Fourier frequencies) and copies those
    from the teacher's non-param collections. New branches (e.g. CTM's s-embedding) keep their
    fresh init (ctm-cifar10 cm_train.py copies by name the same way). An analytic teacher has no
    network variables: the student stays fresh.
    """
    if not isinstance(teacher_variables, dict):
        return student_params
    teacher_tree = (teacher_variables.get(collection) if collection else
                    {k: v for k, v in teacher_variables.items() if k != "params"})
    if not teacher_tree:
        return student_params
    flat_teacher = dict(jax.tree_util.tree_flatten_with_path(teacher_tree)[0])

    def pick(path, leaf):
        t = flat_teacher.get(path)
        return t.astype(leaf.dtype) if t is not None and t.shape == leaf.shape else leaf

    return jax.tree_util.tree_map_with_path(pick, student_params)


def last_layer_kernel(config, tree):
    """The output layer's kernel in a params-shaped tree (for adaptive loss weights)."""
    net = config.network
    name = {"mlp": "output", "dhariwal": "out_conv",
            "songunet": f"dec_{net.get('img_resolution', 0)}x{net.get('img_resolution', 0)}_aux_conv"
            }[net.name]
    return tree[name]["kernel"]


def distance_params(config):
    """The frozen LPIPS weights when `config.method.distance == 'lpips'` (read from user-supplied
    files; a missing file fails here, before training), else None."""
    if config.method.distance != "lpips":
        return None
    from jaxdistill.networks import lpips

    return lpips.load_lpips_from_dir(config.method.lpips_weights_dir)


def distance(config, a, b, lpips_params=None):
    """Per-example distance between two batches (`config.method.distance`): l2 (mean squared),
    pseudo_huber or lpips. CTM's loss and DMD's regression loss."""
    mc = config.method
    n = a.shape[0]
    diff = (a - b).reshape(n, -1)
    if mc.distance == "l2":
        return jnp.mean(diff**2, axis=1)
    if mc.distance == "pseudo_huber":
        # c = 0.00054 sqrt(d) (Song & Dhariwal 2023, improved consistency training) unless set.
        c = mc.huber_c or 0.00054 * diff.shape[1] ** 0.5
        return jnp.sqrt(jnp.sum(diff**2, axis=1) + c**2) - c
    if mc.distance == "lpips":
        from jaxdistill.networks import lpips

        # CTM uses piq.LPIPS(replace_pooling=True) and DMD piq's LPIPS too: VGG with average
        # pooling, inputs bilinearly resized to 224 (sony/ctm code/cm/enc_dec_lib.py).
        return lpips.lpips_distance(lpips_params, a, b, pooling="avg")
    raise ValueError(f"config.method.distance={mc.distance!r} is not l2, pseudo_huber or lpips")


# ------------------------------------------------------------------------------------------------
# Per-phase metrics of methods whose phases alternate (DMD2's TTUR, CTM's GAN).
#
# The trainer fetches metrics only at logging steps, which may never be a step that ran a given
# phase (DMD2's generator runs every 5th step: with log_every = 5 it never runs on a logged step).
# So each phase records its metrics in the state when it runs (inside its lax.cond branch) and
# every step reports the recorded values of every phase, plus `<phase>_last_step`: the step
# number (as the trainer logs it, state.step after that update) of the last update that ran the
# phase; 0 = not run yet (its metrics are then the initial zeros).


def init_phase_log(phases) -> dict:
    """{phase: {metric: 0.0 for each metric, 'last_step': 0}} for `phases` {phase: metric names}.

    Metric names must be unique across phases (they are reported flat)."""
    names = [m for metrics in phases.values() for m in metrics]
    if len(names) != len(set(names)) or "last_step" in names:
        raise ValueError(f"phase metric names must be unique and not 'last_step': {phases}")
    return {phase: {"last_step": jnp.zeros((), jnp.int32),
                    **{m: jnp.zeros((), jnp.float32) for m in metrics}}
            for phase, metrics in phases.items()}


def record_phase(log: dict, phase: str, step: jax.Array, metrics: dict) -> dict:
    """`log` with `phase`'s entry replaced by `metrics` ran at the update to step number `step`.

    Call it in the branch that runs the phase. `metrics` must hold exactly the phase's metrics.
    """
    entry = log[phase]
    if set(metrics) != set(entry) - {"last_step"}:
        raise ValueError(f"phase {phase!r} records {sorted(set(entry) - {'last_step'})}, "
                         f"got {sorted(metrics)}")
    new = {k: jnp.asarray(v, entry[k].dtype).reshape(entry[k].shape) for k, v in metrics.items()}
    return {**log, phase: dict(new, last_step=jnp.asarray(step, jnp.int32))}


def phase_metrics(log: dict, phases=None) -> dict:
    """The recorded metrics flat, plus `<phase>_last_step` for each phase: of every phase, or of
    `phases` {phase: metric names} only (what a config's objective has)."""
    if phases is None:
        phases = {p: [m for m in entry if m != "last_step"] for p, entry in log.items()}
    out = {}
    for phase, names in phases.items():
        out.update({m: log[phase][m] for m in names})
        out[f"{phase}_last_step"] = log[phase]["last_step"]
    return out
