"""MSD: multi-student distillation (Song et al. 2024, arXiv 2410.23274).

One conditional teacher is distilled into K one-step students, each owning a disjoint subset of
the classes; at inference a label is routed to the student that owns it (one student per sample,
NFE 1). Each student is trained independently with the DMD2 objective on its own classes, with its
own fake score and GAN head (the paper's "no weight sharing" independent distillation); DMD's
paired regression data, when used, is shared by all students unfiltered (paper Sec. 4.2).
Facts from shared/research/msd_lowdiff_dmd1.md section 1 (secondary sources: no official code or
full text was reachable): ImageNet-64 uses K = 4 students of 250 consecutive classes; smaller
students start with teacher score matching (TSM, `method.tsm_steps`), then DM (+ GAN).

How the K students train in one jitted step: their states are stacked along a leading axis and the
DMD2 update is `jax.vmap`-ed over it (the step counter stays shared and unbatched, so TTUR's
`lax.cond` remains a real branch). vmap rather than a 'student' mesh axis: students are equal in
shape, one program serves any K and any mesh, and the stacked leaves are sharded by the same FSDP
rule as every other state (the leading K axis is one more axis it may split). Each student makes
batch_size / K generated examples per step, so K students cost what one student of the full batch
costs; the GAN's real examples are the whole batch weighted to the student's classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import objectives
from jaxdistill.methods import dmd2
from jaxdistill.methods.dmd2 import DMD2State
from jaxdistill.methods.protocol import Method


def partition(config) -> list[list[int]]:
    """The classes of each student: `method.partition` (a list of class lists) or K consecutive
    equal ranges (the paper's default). Every class must belong to exactly one student."""
    mc = config.method
    label_dim = config.model.label_dim
    if not label_dim:
        raise ValueError("MSD splits the classes among students: config.model.label_dim must be > 0")
    if mc.partition:
        groups = [list(g) for g in mc.partition]
    else:
        if label_dim % mc.num_students:
            raise ValueError(f"config.method.num_students={mc.num_students} must divide the "
                             f"{label_dim} classes (or give config.method.partition)")
        size = label_dim // mc.num_students
        groups = [list(range(k * size, (k + 1) * size)) for k in range(mc.num_students)]
    flat = sorted(c for g in groups for c in g)
    if (flat != list(range(label_dim)) or len(groups) != mc.num_students
            or not all(groups)):
        raise ValueError(f"config.method.partition must split classes 0..{label_dim - 1} into "
                         f"{mc.num_students} non-empty groups with every class exactly once, got {groups}")
    return groups


def routing(config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner (label_dim,), class table (K, max group size) padded by repetition, sizes (K,))."""
    groups = partition(config)
    owner = np.zeros(config.model.label_dim, np.int32)
    for k, g in enumerate(groups):
        owner[g] = k
    width = max(len(g) for g in groups)
    table = np.array([[g[i % len(g)] for i in range(width)] for g in groups], np.int32)
    return owner, table, np.array([len(g) for g in groups], np.int32)


def _axes(mapped):
    """vmap axes for a DMD2State: the step is shared, every other field is stacked."""
    return DMD2State(step=None, generator=mapped, guide=mapped, phase_log=mapped)


def init(config, rng: jax.Array, teacher=None) -> DMD2State:
    partition(config)
    keys = jax.random.split(rng, config.method.num_students)
    return jax.vmap(lambda k: dmd2.init(config, k, teacher), out_axes=_axes(0))(keys)


def train_step(config):
    """step(state, teacher, batch, rng, frozen=None) -> (state, metrics averaged over students)."""
    update = dmd2.ttur_update(config)
    owner, table, sizes = (jnp.asarray(a) for a in routing(config))
    num_students = config.method.num_students
    per_student = config.train.batch_size // num_students
    if per_student < 1:
        raise ValueError(f"config.train.batch_size={config.train.batch_size} must be at least "
                         f"config.method.num_students={num_students}")

    def one_student(state, teacher, batch, key, k, frozen):
        picks = jax.random.randint(objectives.stream(key, "gen_labels"), (per_student,), 0,
                                   sizes[k])
        real_weight = (owner[batch["label"]] == k).astype(jnp.float32)
        return update(state, teacher, batch, objectives.stream(key, "update"), table[k][picks],
                      real_weight, frozen)

    def step(state: DMD2State, teacher, batch, rng, frozen=None):
        keys = jax.random.split(jax.random.fold_in(rng, state.step), num_students)
        state, metrics = jax.vmap(one_student, in_axes=(_axes(0), None, None, 0, 0, None),
                                  out_axes=(_axes(0), 0))(state, teacher, batch, keys,
                                                         jnp.arange(num_students), frozen)
        return state, jax.tree.map(jnp.mean, metrics)

    return step


def route(config, labels: jax.Array) -> jax.Array:
    """The student index that generates each label."""
    owner, _, _ = routing(config)
    return jnp.asarray(owner)[labels]


def sample(config, state: DMD2State, rng: jax.Array, n: int, *, labels=None, num_steps=None,
           weights=None):
    """n samples, each made by the student owning its label.

    Written for batched evaluation: every student runs on the whole batch and each example keeps
    its owner's output (K times the FLOPs of routing; a deployment runs each student on its own
    labels only, which is the same function per example).
    """
    if labels is None:
        labels = objectives.draw_labels(objectives.stream(rng, "labels"), n,
                                        config.model.label_dim)
    xs, _ = jax.vmap(lambda s: dmd2.sample(config, s, objectives.stream(rng, "students"), n,
                                           labels=labels, num_steps=num_steps, weights=weights),
                     in_axes=(_axes(0),))(state)
    x = jnp.take_along_axis(xs, route(config, labels).reshape((1, n) + (1,) * (xs.ndim - 2)),
                            axis=0)[0]
    return x, labels


def validate(config) -> None:
    """DMD2's fields, and a partition of the classes among the students."""
    dmd2.validate(config)
    partition(config)


# DMD's regression pairs, when used, are shared by all students unfiltered (as for DMD2).
METHOD = Method(name="msd", init=init, train_step=train_step, sample=sample,
                samplers=dmd2.METHOD.samplers, metrics=dmd2.metrics, validate=validate,
                extra_data=dmd2.extra_data, frozen_weights=dmd2.frozen_weights)
