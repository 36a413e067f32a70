"""Pieces every method shares: network construction, initialising from the teacher, sampling a
denoiser with `config.sample`, the configured distance, and per-phase metrics.

The shared formulas themselves (noising, the EDM-weighted loss, labels and noise, named random
streams, distances) are in jaxdistill.objectives; a network's update (optimizer, EMAs, gradient
sanitising) is jaxdistill.methods.trainable.Trainable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdistill import diffusion, objectives, samplers
from jaxdistill import teacher as teacher_lib
from jaxdistill.networks.denoiser import EDMDenoiser


def build_denoiser(config) -> EDMDenoiser:
    """The trained network (student, or the teacher being trained) of `config.network`."""
    return teacher_lib.network_denoiser(config.network, config.model.sigma_data,
                                        config.model.compute_dtype, field="config.network")


def init_variables(config, denoiser: EDMDenoiser, rng: jax.Array) -> tuple[dict, dict]:
    """(params, consts): trainable params and the network's other collections (buffers)."""
    extra = {"noise_labels_s": jnp.zeros((1,))} if config.network.get("s_embedding") else {}
    variables = denoiser.init(rng, tuple(config.model.shape), config.model.label_dim, **extra)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def sample_with(config, denoise_labels, key: jax.Array, n: int, *, labels=None, num_steps=None,
                sampler=None, sigmas=None):
    """n samples of `denoise_labels(x, sigma, onehot)` with `config.sample` (sampler, grid,
    churn, guidance); `num_steps` / `sampler` / `sigmas` override the config's grid.

    Returns (samples, integer labels or None).
    """
    sc = config.sample
    label_dim = config.model.label_dim
    if labels is None:
        labels = objectives.draw_labels(objectives.stream(key, "labels"), n, label_dim)
    onehot = objectives.one_hot(labels, label_dim)
    if sc.get("guidance_scale", 1.0) != 1.0:
        denoise_labels = samplers.classifier_free_guidance(denoise_labels, sc.guidance_scale)

    def denoise(x, sigma):
        return denoise_labels(x, sigma, onehot)

    sampler = sampler or sc.sampler
    if sigmas is None:
        sigmas = diffusion.karras_sigmas(num_steps or sc.num_steps, sc.sigma_min, sc.sigma_max,
                                         sc.rho, append_zero=sampler != "multistep")
    kwargs = {}
    if sampler == "heun":
        kwargs = dict(s_churn=sc.get("s_churn", 0.0), s_min=sc.get("s_min", 0.0),
                      s_max=sc.get("s_max", float("inf")), s_noise=sc.get("s_noise", 1.0))
    elif sampler == "ddim":
        kwargs = dict(eta=sc.get("eta", 0.0))
    noise = objectives.draw_noise(objectives.stream(key, "noise"), n, config.model.shape)
    return samplers.sample(sampler, denoise, noise, sigmas, objectives.stream(key, "sampler"),
                           **kwargs), labels


def init_student(config, denoiser, rng: jax.Array, teacher=None) -> tuple[dict, dict]:
    """(params, consts) of a fresh `config.network`, with every param and buffer (e.g. NCSN++'s
    random Fourier frequencies, which the teacher was trained with) that matches the teacher's
    by name and shape copied from it. `teacher`: a jaxdistill.teacher.Teacher or None."""
    params, consts = init_variables(config, denoiser, rng)
    if teacher is None:
        return params, consts
    return (init_from_teacher(params, teacher.params),
            init_from_teacher(consts, teacher.params, collection=None))


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


def output_kernel(config, tree):
    """The output layer's kernel in a params-shaped tree (CTM's adaptive loss weights): the
    layer each network declares (`output_kernel` of jaxdistill.networks)."""
    return build_denoiser(config).net.output_kernel(tree)


def distance_params(config):
    """The frozen LPIPS weights when `config.method.distance == 'lpips'` (read from user-supplied
    files; a missing file fails here, before training), else None."""
    if config.method.distance != "lpips":
        return None
    from jaxdistill.networks import lpips

    return lpips.load_lpips_from_dir(config.method.lpips_weights_dir)


def distance(config, a, b, lpips_params=None):
    """Per-example `config.method.distance` between two batches (objectives.distance)."""
    return objectives.distance(config.method.distance, a, b, huber_c=config.method.get("huber_c", 0.0),
                               lpips_params=lpips_params)


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
