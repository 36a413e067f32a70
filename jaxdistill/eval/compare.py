"""Teacher vs student at equal step counts: the table the README and the quickstart print.

For a distillation config with a teacher, samples the teacher's own Euler / Heun samplers at the
student's step counts and at 35 NFE (EDM's 18-step Heun), and the student at each step count, and
scores all of them with the same metrics (exact ones for analytic mixtures).
"""
from __future__ import annotations

import copy

import jax
import numpy as np

from jaxdistill import diffusion, methods, samplers
from jaxdistill.eval import sample_metrics
from jaxdistill.methods import common


def teacher_samples(config, teacher, key: jax.Array, n: int, sampler: str, num_steps: int):
    """n samples of the frozen teacher with EDM's Karras grid of `num_steps` steps."""
    denoise_fn = common.teacher_denoiser(config)
    k_labels, k_noise, k_sampler = jax.random.split(key, 3)
    labels = common.one_hot(common.random_labels(k_labels, n, config.model.label_dim),
                            config.model.label_dim)
    noise = jax.random.normal(k_noise, (n,) + tuple(config.model.shape))
    sigmas = diffusion.karras_sigmas(num_steps)
    run = jax.jit(lambda tch, z: samplers.sample(
        sampler, lambda x, s: denoise_fn(tch, x, s, labels), z, sigmas, k_sampler))
    return np.asarray(run(teacher, noise))


def student_samples(config, state, key: jax.Array, n: int, num_steps: int, **sample_overrides):
    cfg = copy.deepcopy(config)
    cfg.sample.num_steps = num_steps
    cfg.sample.update(sample_overrides)
    method = methods.get(cfg.method.name)
    x, _ = jax.jit(lambda s, k: method.sample(cfg, s, k, n))(state, key)
    return np.asarray(x)


def comparison_table(config, state, teacher, key: jax.Array, n: int,
                     student_steps=(1, 2)) -> list[dict]:
    """Rows {'model', 'sampler', 'steps', 'nfe', metrics...}, teacher rows first."""
    rows = []
    k_t, k_s, k_m = jax.random.split(key, 3)
    for sampler, steps in [("euler", s) for s in student_steps] + [("heun", 2), ("heun", 18)]:
        x = teacher_samples(config, teacher, k_t, n, sampler, steps)
        nfe = steps if sampler == "euler" else 2 * steps - 1
        rows.append({"model": "teacher", "sampler": sampler, "steps": steps, "nfe": nfe,
                     **sample_metrics(config, x, k_m)})
    for steps in student_steps:
        x = student_samples(config, state, k_s, n, steps)
        rows.append({"model": "student", "sampler": config.sample.sampler, "steps": steps,
                     "nfe": steps, **sample_metrics(config, x, k_m)})
    return rows


def format_table(rows: list[dict]) -> str:
    keys = [k for k in ("log_likelihood", "sliced_wasserstein", "mode_tv", "modes_covered",
                        "fd_digits", "fid", "inception_score", "precision", "recall")
            if k in rows[0]]
    head = "| model | sampler | steps | NFE | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (4 + len(keys))]
    for r in rows:
        vals = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)
