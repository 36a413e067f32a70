"""The Method protocol: everything the trainer, evaluation and command line know about an objective.

Each module in jaxdistill.methods ends with one `METHOD = Method(...)`; `jaxdistill.methods.get`
looks it up by `config.method.name`. Nothing outside that table branches on a method's name.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional


def no_checks(config) -> None:
    """`validate` of a method whose fields need no check beyond the shared ones."""
    del config


@dataclasses.dataclass(frozen=True)
class DataStream:
    """A data set a method needs beside the training batches (DMD's teacher ODE pairs): made once
    at the start of a run into a chunk store (jaxdistill.data.chunk_store) that the trainer owns,
    then merged into every batch."""
    name: str              # the store's directory under the workdir when `directory` is ""
    directory: str         # a shared location (e.g. pairs made once for many runs), or ""
    directory_field: str   # the config field `directory` comes from (named in errors)
    spec: dict             # JSON-able: what makes the data (a store made otherwise is refused)
    num_items: int
    chunk_size: int
    # (teacher, key) -> {array name: (chunk_size, ...)}: one chunk, a pure function (jitted).
    make_chunk: Callable
    batch_keys: dict       # array name -> the batch key it is merged in as


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    # (config, rng, teacher) -> state: every trainable network (methods.trainable.Trainable),
    # counters and phase logs. `teacher` is a jaxdistill.teacher.Teacher or None.
    init: Callable
    # config -> step(state, teacher, batch, rng, frozen=None) -> (state, metrics); pure, jitted
    # by the trainer. `frozen` is `frozen_weights(config)`.
    train_step: Callable
    # (config, state, rng, n, *, labels=None, num_steps=None, weights=None) -> (samples, integer
    # labels or None). num_steps overrides config.sample.num_steps; weights names the weights to
    # sample with (e.g. 'online' or an EMA; None: the method's default for `config`).
    sample: Callable
    # The values of config.sample.sampler that `sample` accepts (checked at start).
    samplers: tuple[str, ...]
    # config -> the names of the metrics every step reports (the keys of train_step's metrics).
    metrics: Callable
    # Whether the method distils a teacher (every method but teacher training itself).
    needs_teacher: bool = True
    # config -> None: checks the method's own config.method fields at start, each error naming
    # its field (shared fields are checked by jaxdistill.train.validate).
    validate: Callable = no_checks
    # config -> DataStream or None: a data set of its own the trainer builds and merges into
    # every batch.
    extra_data: Optional[Callable] = None
    # config -> pytree or None: pretrained frozen networks the step needs (LPIPS, GAN feature
    # backbones), read once from the user's files; the trainer shards them like the teacher and
    # passes them as the step's `frozen` argument, so they are never compiled in as constants.
    frozen_weights: Optional[Callable] = None
