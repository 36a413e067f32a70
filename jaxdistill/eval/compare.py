"""Teacher vs student at equal step counts: the table the README and the quickstart print.

For a distillation config with a teacher, samples the teacher's own Euler / Heun samplers at the
student's step counts and at 35 NFE (EDM's 18-step Heun), and the student at each step count, and
scores all of them with the same metrics (exact ones for analytic mixtures).

Samplers are compiled once: `student_sampler` and `teacher_sampler` return jitted functions from
a small cache keyed by what determines the compiled program, so the trainer's periodic
evaluations and sample grids (jaxdistill.train.generate), repeated calls from a notebook and every
row of the table reuse their executables instead of retracing. A config is an `ml_collections`
ConfigDict: mutable and unhashable, so it is keyed by its content (`config_key`, its sorted JSON),
never by object identity, and each cached function closes over a private deep copy taken when it
was built: editing a config after a call gives a different key (a new program), never a stale one.
"""
from __future__ import annotations

import collections
import copy
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxdistill import methods, parallel
from jaxdistill import teacher as teacher_lib
from jaxdistill.eval import sample_metrics

_CACHE_SIZE = 64  # compiled samplers kept; the oldest unused one is dropped beyond that
_compiled: collections.OrderedDict = collections.OrderedDict()


def config_key(config) -> str:
    """A hashable view of everything in `config` (its JSON with sorted keys)."""
    return config.to_json_best_effort(sort_keys=True)


def _cached(key, make: Callable[[], Callable]) -> Callable:
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = make()
        while len(_compiled) > _CACHE_SIZE:
            _compiled.popitem(last=False)
    else:
        _compiled.move_to_end(key)
    return fn


def clear_cache() -> None:
    """Drops every cached sampler (and with them their executables)."""
    _compiled.clear()


def replicated_like(tree):
    """Replicated sharding over the mesh `tree` lives on (None when it is not on a mesh).

    A replicated output is readable on every host of a multi-host run."""
    leaves = jax.tree.leaves(tree)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    return parallel.replicated(sharding.mesh) if isinstance(sharding, NamedSharding) else None


def student_sampler(config, n: int, out_sharding=None, *, num_steps=None,
                    weights=None) -> Callable:
    """`method.sample(config, state, key, n, num_steps=, weights=)` jitted as (state, key) ->
    (x, labels).

    Cached by (config content, n, out_sharding, num_steps, weights); the method is
    `config.method.name`, part of the content. jax.jit then compiles it once per state structure
    / shardings."""
    if num_steps == config.sample.num_steps:
        num_steps = None  # the config's own setting: one program either way

    def make():
        cfg = copy.deepcopy(config)  # the program's own snapshot: later edits cannot reach it
        method = methods.get(cfg.method.name)

        def sample_student(state, key):
            return method.sample(cfg, state, key, n, num_steps=num_steps, weights=weights)

        return jax.jit(sample_student, out_shardings=out_sharding)

    return _cached(("student", config_key(config), n, out_sharding, num_steps, weights), make)


def teacher_sampler(config, teacher, n: int, sampler: str, num_steps: int,
                    out_sharding=None) -> Callable:
    """The frozen teacher's `sampler` on EDM's Karras grid of `num_steps` steps, jitted as
    (teacher, key) -> n samples; cached by (the teacher's denoise function, config.model's shape
    and classes, n, sampler, num_steps, out_sharding): one program serves every student config
    distilled from the same teacher."""
    label_dim, shape = config.model.label_dim, tuple(config.model.shape)

    def make():
        def sample_teacher(tch, key):
            return teacher_lib.sample(tch, key, n, shape, label_dim, sampler, num_steps)[1]

        return jax.jit(sample_teacher, out_shardings=out_sharding)

    key = ("teacher", teacher.denoise, shape, label_dim, n, sampler, num_steps, out_sharding)
    return _cached(key, make)


def teacher_samples(config, teacher, key: jax.Array, n: int, sampler: str, num_steps: int):
    """n samples of the frozen teacher with EDM's Karras grid of `num_steps` steps."""
    run = teacher_sampler(config, teacher, n, sampler, num_steps, replicated_like(teacher))
    return np.asarray(run(teacher, key))


def student_samples(config, state, key: jax.Array, n: int, num_steps: int, weights=None):
    run = student_sampler(config, n, replicated_like(state), num_steps=num_steps,
                          weights=weights)
    x, _ = run(state, key)
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
