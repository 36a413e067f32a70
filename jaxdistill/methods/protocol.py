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
class Method:
    name: str
    # (config, rng, teacher) -> state: every trainable network, optimizer state, EMA and counter.
    init: Callable
    # config -> step(state, teacher, batch, rng) -> (state, metrics); pure, jitted by the trainer.
    train_step: Callable
    # (config, state, rng, n, labels=None) -> (samples, integer labels or None).
    sample: Callable
    # The values of config.sample.sampler that `sample` accepts (checked at start).
    samplers: tuple[str, ...]
    # config -> None: checks the method's own config.method fields at start, each error naming
    # its field (shared fields are checked by jaxdistill.train.validate).
    validate: Callable = no_checks
    # A data stream of its own merged into every batch (DMD's regression pairs), or None:
    # (config, teacher, workdir, *, batch_size, seed, start_step, process_index, process_count)
    # -> iterator of dicts with the batch's leading size, or None when the config needs none.
    extra_batches: Optional[Callable] = None
