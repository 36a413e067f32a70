"""The training loop: mesh, state, data, the jitted method step, checkpoints, logs, samples.

It knows nothing about which method runs: the method module gives `init`, `train_step` and
`sample` (jaxdistill.methods). Checkpoints resume exactly (data is a function of the step, keys are
`fold_in(seed key, step)` inside the step); a NaN/Inf loss stops the run before anything is saved
from the bad state, so the last good checkpoint stays.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from jaxdistill import checkpoint, data, eval as evaluation, methods, parallel, visualize


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
    methods.get(config.method.name)


def _abstract_state(method, config, mesh):
    abstract = jax.eval_shape(lambda k: method.init(config, k, None), jax.random.key(0))
    rep = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), abstract)


def load_state(config, workdir: str, mesh=None):
    """(state, meta) of the newest readable checkpoint in workdir/checkpoints; clear error if none."""
    method = methods.get(config.method.name)
    mesh = mesh or parallel.make_mesh(config.mesh)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    mngr = checkpoint.manager(ckpt_dir)
    state, meta = checkpoint.restore_latest(mngr, _abstract_state(method, config, mesh))
    mngr.close()
    if state is None:
        raise FileNotFoundError(f"no checkpoint found in {ckpt_dir}: train first with "
                                f"`python run.py --config=... --workdir={workdir}`")
    return state, meta


def generate(config, state, key: jax.Array, n: int, batch_size: int | None = None):
    """n samples (and labels) from a state, in jitted batches."""
    method = methods.get(config.method.name)
    batch_size = batch_size or min(n, config.eval.batch_size)
    fn = jax.jit(lambda s, k: method.sample(config, s, k, batch_size))
    xs, labels = [], []
    for i in range(0, n, batch_size):
        x, lab = fn(state, jax.random.fold_in(key, i))
        xs.append(np.asarray(x))
        if lab is not None:
            labels.append(np.asarray(lab))
    x = np.concatenate(xs)[:n]
    return x, (np.concatenate(labels)[:n] if labels else None)


def evaluate(config, state, key: jax.Array, n: int | None = None) -> dict:
    n = n or config.eval.num_samples
    k_gen, k_metric = jax.random.split(key)
    samples, _ = generate(config, state, k_gen, n)
    return evaluation.sample_metrics(config.data, samples, k_metric)


def train(config, workdir: str):
    """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns the final state."""
    from clu import metric_writers  # imports TensorFlow: keep it out of the functional API

    validate(config)
    method = methods.get(config.method.name)
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_size(config.train.batch_size, mesh)
    os.makedirs(workdir, exist_ok=True)
    is_chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)

    seed_key = jax.random.key(config.seed)
    k_init, k_train, k_sample = jax.random.split(seed_key, 3)
    abstract = _abstract_state(method, config, mesh)
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    state, meta = checkpoint.restore_latest(mngr, abstract)
    start = 0 if state is None else int(meta["step"])
    # The data pipeline is built before the (possibly expensive) init so that missing data fails fast.
    per_process = config.train.batch_size // jax.process_count()
    batches = data.batches(config.data, batch_size=per_process, seed=config.seed,
                           start_step=start, process_index=jax.process_index(),
                           process_count=jax.process_count())
    if state is None:
        state = jax.jit(lambda k: method.init(config, k, None),
                        out_shardings=jax.tree.map(lambda s: s.sharding, abstract))(k_init)
        logging.info("initialised %s from scratch", config.method.name)
    else:
        logging.info("resumed from step %d in %s", start, workdir)
    rep = parallel.replicated(mesh)
    state_shardings = jax.tree.map(lambda s: s.sharding, abstract)
    step_fn = jax.jit(method.train_step(config),
                      in_shardings=(state_shardings, None, parallel.batch_sharding(mesh), rep),
                      out_shardings=(state_shardings, rep), donate_argnums=0)

    meta_of = lambda step: {"step": step, "method": config.method.name,
                            "config": checkpoint.config_json(config)}
    num_steps = config.train.num_steps
    t0, last_logged = time.time(), start
    try:
        for step in range(start, num_steps):
            batch = parallel.shard_batch(next(batches), mesh)
            state, metrics = step_fn(state, None, batch, k_train)
            done = step + 1
            if done % config.train.log_every == 0 or done == num_steps:
                metrics = jax.device_get(metrics)
                if not all(np.isfinite(v) for v in jax.tree.leaves(metrics)):
                    raise NonFiniteLossError(
                        f"non-finite training metrics at step {done}: {metrics}. The run stopped "
                        f"without saving this state; the last good checkpoint in {workdir} is kept. "
                        f"Lower config.optim.lr or set config.optim.grad_clip.")
                elapsed = time.time() - t0
                steps_per_sec = (done - last_logged) / max(elapsed, 1e-9)
                scalars = {k: float(v) for k, v in metrics.items()}
                scalars.update(steps_per_sec=steps_per_sec,
                               examples_per_sec=steps_per_sec * config.train.batch_size)
                writer.write_scalars(done, scalars)
                logging.info("step %d/%d loss %.4f (%.1f steps/s, ETA %.0f s)", done, num_steps,
                             scalars.get("loss", float("nan")), steps_per_sec,
                             (num_steps - done) / max(steps_per_sec, 1e-9))
                t0, last_logged = time.time(), done
            if done % config.train.ckpt_every == 0 or done == num_steps:
                loss = jax.device_get(metrics.get("loss", 0.0))
                if not np.all(np.isfinite(loss)):
                    raise NonFiniteLossError(f"non-finite loss at step {done}; not saved, the last "
                                             f"good checkpoint in {workdir} is kept")
                checkpoint.save(mngr, done, state, meta_of(done))
            if done % config.train.sample_every == 0 or done == num_steps:
                samples, _ = generate(config, state, k_sample, config.train.num_grid_samples)
                if is_chief:
                    picture = visualize.picture(samples)
                    writer.write_images(done, {"samples": picture[None].astype(np.float32) / 255.0})
                    visualize.save_png(os.path.join(workdir, f"samples_{done:07d}.png"), samples)
        mngr.wait_until_finished()
    finally:
        mngr.close()
        writer.flush()
    if is_chief and num_steps > start:
        metrics = evaluate(config, state, jax.random.fold_in(k_sample, num_steps))
        metrics["step"] = num_steps
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        logging.info("final metrics: %s", metrics)
    return state
