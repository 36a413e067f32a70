"""The training loop: mesh, sharded state, data, the jitted method step, checkpoints, logs.

It knows nothing about which method runs: the method module gives `init`, `train_step` and
`sample` (jaxdistill.methods). `build` compiles the method's step once with
`jax.jit(in_shardings, out_shardings, donate_argnums=0)` over the mesh (today's pjit). Checkpoints
resume exactly: data is a function of the step and keys are `fold_in(seed key, step)` inside the
step.

What the loop guarantees (tests/test_faults.py): one run per workdir (jaxdistill.lock); every
saved checkpoint is verified at restore and a corrupt one is set aside for the previous good one
(jaxdistill.checkpoint); a state with NaN/Inf is never saved, and a checkpoint whose next step's
loss is NaN/Inf (a diverged state) is set aside, so a resume starts from the last good one;
SIGTERM (TPU preemption) saves the current step and exits cleanly; a finished run started again
writes its final metrics if they are missing.
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

from jaxdistill import checkpoint, data, eval as evaluation, lock, methods, networks, parallel
from jaxdistill.data import chunk_store
from jaxdistill import teacher as teacher_lib, visualize
from jaxdistill.errors import NonFiniteStateError
from jaxdistill.eval import compare


class NonFiniteLossError(NonFiniteStateError):
    pass


def _require(ok: bool, field: str, value, what: str) -> None:
    if not ok:
        raise ValueError(f"config.{field}={value!r}: {what}")


def _validate_numbers(config) -> None:
    """Every numeric field a run depends on, checked before anything is built or written."""
    tc, ec = config.train, config.eval
    _require(tc.batch_size > 0, "train.batch_size", tc.batch_size, "must be a positive integer")
    _require(tc.num_steps >= 0, "train.num_steps", tc.num_steps, "must be 0 or more")
    for name in ("log_every", "ckpt_every", "sample_every", "num_grid_samples"):
        _require(tc[name] > 0, f"train.{name}", tc[name], "must be a positive integer")
    _require(tc.eval_every >= 0, "train.eval_every", tc.eval_every,
             "must be 0 (evaluate only at the end) or a positive interval")
    _require(tc.keep_checkpoints >= 1, "train.keep_checkpoints", tc.keep_checkpoints,
             "must be at least 1, or no checkpoint would be kept")
    _require(config.optim.lr > 0, "optim.lr", config.optim.lr, "must be positive")
    _require(ec.num_samples > 0, "eval.num_samples", ec.num_samples, "must be positive")
    _require(ec.batch_size > 0, "eval.batch_size", ec.batch_size, "must be positive")
    sampler = config.sample.sampler
    known = list(methods.get(config.method.name).samplers)
    _require(sampler in known, "sample.sampler", sampler, f"must be one of {known}")
    _require(config.sample.num_steps > 0, "sample.num_steps", config.sample.num_steps,
             "must be positive")


def validate(config) -> None:
    """Checks every field's range and the fields that must agree; each error names the field."""
    method = methods.get(config.method.name)
    _validate_numbers(config)
    method.validate(config)
    spec = data.spec(config.data)
    if tuple(config.model.shape) != tuple(spec.shape):
        raise ValueError(f"config.model.shape={tuple(config.model.shape)} does not match the "
                         f"examples of config.data.name={config.data.name!r}: {spec.shape}")
    if config.model.label_dim not in (0, spec.num_classes):
        raise ValueError(f"config.model.label_dim={config.model.label_dim} must be 0 "
                         f"(unconditional) or the data's {spec.num_classes} classes")
    networks.check_data_fields(config.network, spec.shape, config.model.label_dim,
                               "config.network")
    if config.teacher.kind == "checkpoint":
        networks.check_data_fields(config.teacher.network, spec.shape, config.model.label_dim,
                                   "config.teacher.network")
    if config.model.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.compute_dtype={config.model.compute_dtype!r} must be "
                         "'float32' or 'bfloat16'")
    if config.eval.feature_batch_size < 1 or config.eval.pr_k < 1:
        raise ValueError(f"config.eval.feature_batch_size={config.eval.feature_batch_size} and "
                         f"config.eval.pr_k={config.eval.pr_k} must be positive")


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything compiled for one (config, mesh): sharded init, train step and sampler."""
    method: Any
    mesh: Mesh
    abstract_state: Any          # ShapeDtypeStructs carrying the state's shardings
    init: Callable               # (key, teacher) -> state, created already sharded
    # (state, teacher, batch, key, frozen) -> (state, metrics); donates state. `frozen`: the
    # method's pretrained frozen weights (`place_frozen`) or None.
    step: Callable
    teacher_shardings: Any       # shardings of the frozen teacher's params (None: no teacher)
    frozen_shardings: Any        # shardings of the frozen feature networks (None: none)

    @property
    def state_shardings(self):
        return jax.tree.map(lambda s: s.sharding, self.abstract_state)


def build(config, mesh: Mesh | None = None, teacher=None, frozen=None) -> Program:
    """Shardings of the method's state, teacher and frozen weights (`frozen_weights(config)`,
    None when the method has none) by the FSDP rule; jitted init / step."""
    method = methods.get(config.method.name)
    mesh = mesh or parallel.make_mesh(config.mesh)
    init = lambda k, tch: method.init(config, k, tch)  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.key(0), teacher)
    shardings = parallel.tree_shardings(abstract, mesh, config.mesh.min_shard_size)
    teacher_shardings = (None if teacher is None else
                         parallel.tree_shardings(teacher, mesh, config.mesh.min_shard_size))
    frozen_shardings = (None if frozen is None else
                        parallel.tree_shardings(frozen, mesh, config.mesh.min_shard_size))
    rep = parallel.replicated(mesh)
    step = jax.jit(method.train_step(config),
                   in_shardings=(shardings, teacher_shardings, parallel.batch_sharding(mesh), rep,
                                 frozen_shardings),
                   out_shardings=(shardings, rep), donate_argnums=0)
    return Program(method=method, mesh=mesh,
                   abstract_state=parallel.with_shardings(abstract, shardings),
                   init=jax.jit(init, in_shardings=(rep, teacher_shardings),
                                out_shardings=shardings),
                   step=step, teacher_shardings=teacher_shardings,
                   frozen_shardings=frozen_shardings)


def place_teacher(program: Program, teacher):
    """The teacher's params on the mesh, sharded like the state (None stays None)."""
    return None if teacher is None else jax.device_put(teacher, program.teacher_shardings)


def place_frozen(program: Program, frozen):
    """The frozen feature networks' weights on the mesh (None stays None)."""
    return None if frozen is None else jax.device_put(frozen, program.frozen_shardings)


def frozen_weights(config):
    """The method's pretrained frozen weights for `config` (read from the user's files), or None."""
    method = methods.get(config.method.name)
    return method.frozen_weights(config) if method.frozen_weights else None


def extra_batches(config, teacher, workdir: str, **stream):
    """The method's own data stream (DMD's regression pairs) as batches, or None: the store is
    built once (resuming an interrupted build) in the stream's directory, by default
    <workdir>/<stream name>; all processes compute its chunks, process 0 writes them."""
    decl = methods.get(config.method.name).extra_data
    decl = decl(config) if decl else None
    if decl is None:
        return None
    directory = decl.directory or os.path.join(workdir, decl.name)
    make = jax.jit(decl.make_chunk)
    seed_key = jax.random.key(config.seed)
    chunk_store.build(directory, dict(decl.spec, seed=config.seed), num_items=decl.num_items,
                      chunk_size=decl.chunk_size,
                      make_chunk=lambda i: make(teacher, jax.random.fold_in(seed_key, i)),
                      write=jax.process_index() == 0, field=decl.directory_field)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"{decl.name} built")
    # A stream of its own, independent of the training data's order (seed + 1).
    return chunk_store.batches(directory, **dict(stream, seed=stream["seed"] + 1),
                               rename=decl.batch_keys)


def load_state(config, workdir: str, mesh: Mesh | None = None, teacher=None):
    """(state, meta) of the newest readable checkpoint in workdir/checkpoints; clear error if none.

    The state is placed on `mesh` by the current config's rule, whatever mesh it was saved from.
    `teacher`: the run's Teacher when it was not described by config.teacher.
    """
    program = build(config, mesh, teacher if teacher is not None else teacher_lib.load(config))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint found in {ckpt_dir}: train first with "
                                f"`python run.py --config=... --workdir={workdir}`")
    mngr = checkpoint.manager(ckpt_dir)
    try:
        state, meta = checkpoint.restore_latest(mngr, program.abstract_state,
                                                checkpoint.config_json(config))
    finally:
        mngr.close()
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {ckpt_dir}: train first with "
                                f"`python run.py --config=... --workdir={workdir}`")
    return state, meta


def generate(config, state, key: jax.Array, n: int, batch_size: int | None = None):
    """n samples (and labels) from a state, in jitted batches; every process gets all of them.

    The jitted sampler is compiled once per (config content, batch size, mesh) and reused by every
    later call, periodic evaluations and sample grids included (compare.student_sampler)."""
    batch_size = batch_size or min(n, config.eval.batch_size)
    # Replicated outputs are readable on every host of a multi-host run.
    fn = compare.student_sampler(config, batch_size, compare.replicated_like(state))
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


def _finite(metrics: dict) -> bool:
    return all(np.all(np.isfinite(v)) for v in jax.tree.leaves(metrics))


def _nonfinite_error(metrics: dict, step: int, workdir: str, diverged_step=None):
    bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(v)))
    aside = (f"; checkpoint step {diverged_step} led to it and was set aside as diverged"
             if diverged_step is not None else "")
    return NonFiniteLossError(
        f"non-finite training metrics ({', '.join(bad)}) at step {step}: the run stopped without "
        f"saving this state{aside}; the last good checkpoint in {workdir} is kept: lower "
        "config.optim.lr or set config.optim.grad_clip")


def _write_json(path: str, obj) -> None:
    """Writes atomically: a reader never sees half a file, even if the job is killed."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _final_metrics_step(workdir: str) -> int | None:
    try:
        with open(os.path.join(workdir, "metrics.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _set_aside_run(workdir: str) -> None:
    """--restart: moves the previous run's checkpoints and metrics into replaced-<time>/."""
    names = [n for n in ("checkpoints", "metrics.json", "eval_metrics.json")
             if os.path.exists(os.path.join(workdir, n))]
    if not names or jax.process_index() != 0:
        return
    aside = os.path.join(workdir, f"replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(aside)
    for n in names:
        os.rename(os.path.join(workdir, n), os.path.join(aside, n))
    logging.warning("restart: moved the previous run's %s to %s", ", ".join(names), aside)


def train(config, workdir: str, *, restart: bool = False, teacher=None):
    """Trains `config` in `workdir`, resuming from its newest good checkpoint. Returns the state.

    `teacher`: a jaxdistill.teacher.Teacher (e.g. a notebook's own denoiser callable) instead of
    the one `config.teacher` describes. `restart=True` starts over, moving an earlier run's
    checkpoints aside (never deleting them). Raises WorkdirLockedError while another run uses
    `workdir`.
    """
    validate(config)
    with lock.held(workdir):
        if restart:
            _set_aside_run(workdir)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("restart")
        return _train(config, workdir, teacher)


def _train(config, workdir: str, teacher=None):
    from clu import metric_writers  # imports TensorFlow: keep it out of the functional API

    if teacher is None:
        teacher = teacher_lib.load(config)
    if teacher is None and methods.get(config.method.name).needs_teacher:
        raise ValueError(f"config.method.name={config.method.name!r} distils a teacher: set "
                         "config.teacher.kind to 'analytic' or 'checkpoint' (or pass teacher= "
                         "to jaxdistill.train.train)")
    frozen = frozen_weights(config)
    program = build(config, teacher=teacher, frozen=frozen)
    teacher, frozen = place_teacher(program, teacher), place_frozen(program, frozen)
    parallel.check_batch_size(config.train.batch_size, program.mesh)
    os.makedirs(workdir, exist_ok=True)
    is_chief = jax.process_index() == 0

    k_init, k_train, k_sample = jax.random.split(jax.random.key(config.seed), 3)
    tc = config.train
    config_now = checkpoint.config_json(config)
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                              best_metric=config.eval.best_metric, best_mode=config.eval.best_mode)
    try:
        state, meta = checkpoint.restore_latest(mngr, program.abstract_state, config_now)
    except BaseException:
        mngr.close()
        raise
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    start = 0 if state is None else int(meta["step"])
    # The data pipeline is built before the (possibly expensive) init so that missing data fails fast.
    stream = dict(batch_size=tc.batch_size // jax.process_count(), seed=config.seed,
                  start_step=start, process_index=jax.process_index(),
                  process_count=jax.process_count())
    batches = data.batches(config.data, **stream)
    extra = extra_batches(config, teacher, workdir, **stream)
    if extra is not None:  # a method's own data stream, merged into every batch
        batches = ({**b, **e} for b, e in zip(batches, extra))
    if state is None:
        state = program.init(k_init, teacher)
        logging.info("initialised %s from scratch", config.method.name)
    else:
        changed = checkpoint.config_diff(meta.get("config", config_now), config_now)
        logging.info("resumed from step %d in %s%s", start, workdir,
                     f" (config changed since: {'; '.join(changed)})" if changed else "")
    if is_chief and start == 0:
        writer.write_hparams({k: str(v) for k, v in config_now.items()})

    def save(step, metrics=None):
        checkpoint.save(mngr, step, state, {
            "step": step, "method": config.method.name, "config": config_now,
            "teacher": {"kind": config.teacher.kind, "checkpoint": config.teacher.checkpoint}},
            metrics)

    # A checkpoint is confirmed by the first step after it: when that step's loss is non-finite
    # the checkpoint holds a diverged state (finite weights that blow up), and it is set aside so
    # that a resume starts from the last good one. Confirming costs one device sync per save.
    unconfirmed = None if start == 0 else start
    t0, last_logged, step, eval_metrics = time.time(), start, start, None
    with _Preemption() as preemption:
        try:
            for step in range(start + 1, tc.num_steps + 1):
                batch = parallel.shard_batch(next(batches), program.mesh)
                state, metrics = program.step(state, teacher, batch, k_train, frozen)
                last = step == tc.num_steps
                if unconfirmed is not None or step % tc.log_every == 0 or last:
                    metrics = jax.device_get(metrics)
                    if not _finite(metrics):
                        if unconfirmed is not None:
                            checkpoint.set_aside_step(mngr, unconfirmed, "diverged")
                        raise _nonfinite_error(metrics, step, workdir, unconfirmed)
                    unconfirmed = None
                if step % tc.log_every == 0 or last:
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
                    has_best = eval_metrics and config.eval.best_metric in eval_metrics
                    save(step, eval_metrics if has_best else None)  # refuses a NaN/Inf state
                    unconfirmed = None if last else step
                if preempted:
                    logging.warning("preempted: saved step %d in %s, exiting", step, workdir)
                    break
            mngr.wait_until_finished()
        finally:
            mngr.close()
            writer.flush()
    # The final metrics are written once per finished run; a run killed before writing them (e.g.
    # SIGTERM during the final evaluation) writes them when it is started again.
    if step == tc.num_steps and _final_metrics_step(workdir) != step:
        final = eval_metrics or evaluate(config, state, jax.random.fold_in(k_sample, step))
        final = dict(final, step=step)
        if teacher is not None:
            # Distillation: the student beside its teacher's own samplers at equal step counts.
            rows = compare.comparison_table(config, state, teacher, k_sample,
                                            config.eval.num_samples)
            final["comparison"] = rows
            if is_chief:
                print("\n" + compare.format_table(rows), flush=True)
        if is_chief:
            _write_json(os.path.join(workdir, "metrics.json"), final)
        logging.info("final metrics: %s", final)
    return state
