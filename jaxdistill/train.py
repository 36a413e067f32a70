"""The training loop: mesh, sharded state, data, the jitted method step, checkpoints, logs.

It knows nothing about which method runs: the method module gives `init`, `train_step` and
`sample` (jaxdistill.methods). `build` compiles the method's step once with
`jax.jit(in_shardings, out_shardings, donate_argnums=0)` over the mesh (today's pjit). Checkpoints
resume exactly: data is a function of the step and keys are `fold_in(seed key, step)` inside the
step. A NaN/Inf loss stops the run before anything is saved from the bad state, so the last good
checkpoint stays; SIGTERM (TPU preemption) saves the current step and exits cleanly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from jaxdistill import checkpoint, data, eval as evaluation, methods, parallel, visualize
from jaxdistill import teacher as teacher_lib


class NonFiniteLossError(FloatingPointError):
    pass


def validate(config) -> None:
    """Checks fields that must agree with each other; each error names the fields."""
    spec = data.spec(config.data)
    if tuple(config.model.shape) != tuple(spec.shape):
        raise ValueError(f"config.model.shape={tuple(config.model.shape)} does not match the "
                         f"examples of config.data.name={config.data.name!r}: {spec.shape}")
    if config.model.label_dim not in (0, spec.num_classes):
        raise ValueError(f"config.model.label_dim={config.model.label_dim} must be 0 "
                         f"(unconditional) or the data's {spec.num_classes} classes")
    if config.model.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.compute_dtype={config.model.compute_dtype!r} must be "
                         "'float32' or 'bfloat16'")
    if config.eval.feature_batch_size < 1 or config.eval.pr_k < 1:
        raise ValueError(f"config.eval.feature_batch_size={config.eval.feature_batch_size} and "
                         f"config.eval.pr_k={config.eval.pr_k} must be positive")
    methods.get(config.method.name)


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything compiled for one (config, mesh): sharded init, train step and sampler."""
    method: Any
    mesh: Mesh
    abstract_state: Any          # ShapeDtypeStructs carrying the state's shardings
    init: Callable               # (key, teacher) -> state, created already sharded
    step: Callable               # (state, teacher, batch, key) -> (state, metrics); donates state
    teacher_shardings: Any       # shardings of the frozen teacher's params (None: no teacher)

    @property
    def state_shardings(self):
        return jax.tree.map(lambda s: s.sharding, self.abstract_state)


def build(config, mesh: Mesh | None = None, teacher=None) -> Program:
    """Shardings of the method's state (and teacher) by the FSDP rule; jitted init / step."""
    method = methods.get(config.method.name)
    mesh = mesh or parallel.make_mesh(config.mesh)
    init = lambda k, tch: method.init(config, k, tch)  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.key(0), teacher)
    shardings = parallel.tree_shardings(abstract, mesh, config.mesh.min_shard_size)
    teacher_shardings = (None if teacher is None else
                         parallel.tree_shardings(teacher, mesh, config.mesh.min_shard_size))
    rep = parallel.replicated(mesh)
    step = jax.jit(method.train_step(config),
                   in_shardings=(shardings, teacher_shardings, parallel.batch_sharding(mesh), rep),
                   out_shardings=(shardings, rep), donate_argnums=0)
    return Program(method=method, mesh=mesh,
                   abstract_state=parallel.with_shardings(abstract, shardings),
                   init=jax.jit(init, in_shardings=(rep, teacher_shardings),
                                out_shardings=shardings),
                   step=step, teacher_shardings=teacher_shardings)


def place_teacher(program: Program, teacher):
    """The teacher's params on the mesh, sharded like the state (None stays None)."""
    return None if teacher is None else jax.device_put(teacher, program.teacher_shardings)


def load_state(config, workdir: str, mesh: Mesh | None = None):
    """(state, meta) of the newest readable checkpoint in workdir/checkpoints; clear error if none.

    The state is placed on `mesh` by the current config's rule, whatever mesh it was saved from.
    """
    program = build(config, mesh, teacher_lib.load(config))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint found in {ckpt_dir}: train first with "
                                f"`python run.py --config=... --workdir={workdir}`")
    mngr = checkpoint.manager(ckpt_dir)
    state, meta = checkpoint.restore_latest(mngr, program.abstract_state)
    mngr.close()
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {ckpt_dir}: train first with "
                                f"`python run.py --config=... --workdir={workdir}`")
    return state, meta


def generate(config, state, key: jax.Array, n: int, batch_size: int | None = None):
    """n samples (and labels) from a state, in jitted batches; every process gets all of them."""
    method = methods.get(config.method.name)
    batch_size = batch_size or min(n, config.eval.batch_size)
    mesh = jax.tree.leaves(state)[0].sharding.mesh
    # Replicated outputs are readable on every host of a multi-host run.
    fn = jax.jit(lambda s, k: method.sample(config, s, k, batch_size),
                 out_shardings=parallel.replicated(mesh))
    xs, labels = [], []
    t0, num_batches = time.time(), -(-n // batch_size)
    for b, i in enumerate(range(0, n, batch_size)):
        x, lab = fn(state, jax.random.fold_in(key, i))
        xs.append(np.asarray(x))
        if lab is not None:
            labels.append(np.asarray(lab))
        if num_batches >= 20 and (b + 1) % (num_batches // 20) == 0:  # progress, ~20 lines
            done = min(i + batch_size, n)
            rate = done / max(time.time() - t0, 1e-9)
            logging.info("generated %d/%d samples (%.1f samples/s, ETA %.0f s)", done, n, rate,
                         (n - done) / rate)
    x = np.concatenate(xs)[:n]
    return x, (np.concatenate(labels)[:n] if labels else None)


def evaluate(config, state, key: jax.Array, n: int | None = None) -> dict:
    """Metrics of n fresh samples (exact metrics for analytic mixtures). Call on every process."""
    n = n or config.eval.num_samples
    evaluation.check_files(config)
    k_gen, k_metric = jax.random.split(key)
    samples, _ = generate(config, state, k_gen, n)
    return evaluation.sample_metrics(config, samples, k_metric)


class _Preemption:
    """Remembers a SIGTERM so the loop can save and exit at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step and exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            # All hosts must agree on the step at which they stop and save.
            from jax.experimental import multihost_utils

            return self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def _check_finite(metrics: dict, step: int, workdir: str) -> None:
    if not all(np.all(np.isfinite(v)) for v in jax.tree.leaves(metrics)):
        raise NonFiniteLossError(
            f"non-finite training metrics at step {step}: {metrics}. The run stopped without "
            f"saving this state; the last good checkpoint in {workdir} is kept. Lower "
            f"config.optim.lr or set config.optim.grad_clip.")


def train(config, workdir: str):
    """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns the final state."""
    from clu import metric_writers  # imports TensorFlow: keep it out of the functional API

    validate(config)
    teacher = teacher_lib.load(config)
    program = build(config, teacher=teacher)
    teacher = place_teacher(program, teacher)
    parallel.check_batch_size(config.train.batch_size, program.mesh)
    os.makedirs(workdir, exist_ok=True)
    is_chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)

    k_init, k_train, k_sample = jax.random.split(jax.random.key(config.seed), 3)
    tc = config.train
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                              best_metric=config.eval.best_metric, best_mode=config.eval.best_mode)
    state, meta = checkpoint.restore_latest(mngr, program.abstract_state)
    start = 0 if state is None else int(meta["step"])
    # The data pipeline is built before the (possibly expensive) init so that missing data fails fast.
    stream = dict(batch_size=tc.batch_size // jax.process_count(), seed=config.seed,
                  start_step=start, process_index=jax.process_index(),
                  process_count=jax.process_count())
    batches = data.batches(config.data, **stream)
    if hasattr(program.method, "extra_batches"):
        # A method's own data stream (e.g. DMD's regression pairs), merged into every batch.
        extra = program.method.extra_batches(config, teacher, workdir, **stream)
        if extra is not None:
            batches = ({**b, **e} for b, e in zip(batches, extra))
    if state is None:
        state = program.init(k_init, teacher)
        logging.info("initialised %s from scratch", config.method.name)
    else:
        logging.info("resumed from step %d in %s", start, workdir)
    if is_chief and start == 0:
        writer.write_hparams({k: str(v) for k, v in checkpoint.config_json(config).items()})

    def save(step, metrics=None):
        checkpoint.save(mngr, step, state, {
            "step": step, "method": config.method.name, "config": checkpoint.config_json(config),
            "teacher": {"kind": config.teacher.kind, "checkpoint": config.teacher.checkpoint}},
            metrics)

    t0, last_logged, step, eval_metrics = time.time(), start, start, None
    with _Preemption() as preemption:
        try:
            for step in range(start + 1, tc.num_steps + 1):
                batch = parallel.shard_batch(next(batches), program.mesh)
                state, metrics = program.step(state, teacher, batch, k_train)
                last = step == tc.num_steps
                if step % tc.log_every == 0 or last:
                    metrics = jax.device_get(metrics)
                    _check_finite(metrics, step, workdir)
                    rate = (step - last_logged) / max(time.time() - t0, 1e-9)
                    scalars = {k: float(v) for k, v in metrics.items()}
                    scalars.update(steps_per_sec=rate, images_per_sec=rate * tc.batch_size)
                    writer.write_scalars(step, scalars)
                    logging.info("step %d/%d loss %.4f (%.2f steps/s, %.1f images/s, ETA %.0f s)",
                                 step, tc.num_steps, scalars.get("loss", float("nan")), rate,
                                 rate * tc.batch_size, (tc.num_steps - step) / max(rate, 1e-9))
                    t0, last_logged = time.time(), step
                eval_metrics = None
                if tc.eval_every and (step % tc.eval_every == 0 or last):
                    eval_metrics = evaluate(config, state, jax.random.fold_in(k_sample, step))
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                if step % tc.sample_every == 0 or last:
                    samples, _ = generate(config, state, k_sample, tc.num_grid_samples)
                    if is_chief:
                        picture = visualize.picture(samples)
                        writer.write_images(step, {"samples": picture[None] / np.float32(255)})
                        visualize.save_png(os.path.join(workdir, f"samples_{step:07d}.png"),
                                           samples)
                preempted = preemption.reached(step)
                if step % tc.ckpt_every == 0 or last or preempted or eval_metrics is not None:
                    # Never save a state whose loss went non-finite since the last check.
                    _check_finite(jax.device_get(metrics), step, workdir)
                    has_best = eval_metrics and config.eval.best_metric in eval_metrics
                    save(step, eval_metrics if has_best else None)
                if preempted:
                    logging.warning("preempted: saved step %d in %s, exiting", step, workdir)
                    break
            mngr.wait_until_finished()
        finally:
            mngr.close()
            writer.flush()
    if step == tc.num_steps and tc.num_steps > start:
        final = eval_metrics or evaluate(config, state, jax.random.fold_in(k_sample, step))
        final = dict(final, step=step)
        if teacher is not None:
            # Distillation: the student beside its teacher's own samplers at equal step counts.
            from jaxdistill.eval import compare

            rows = compare.comparison_table(config, state, teacher, k_sample,
                                            config.eval.num_samples)
            final["comparison"] = rows
            if is_chief:
                print("\n" + compare.format_table(rows), flush=True)
        if is_chief:
            with open(os.path.join(workdir, "metrics.json"), "w") as f:
                json.dump(final, f, indent=2)
        logging.info("final metrics: %s", final)
    return state
