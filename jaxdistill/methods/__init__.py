"""Method objects: one module per objective, each owning its state, losses and sampler.

Protocol (DESIGN.md): `init(config, rng, teacher) -> state`,
`train_step(config) -> step(state, teacher, batch, rng) -> (state, metrics)`,
`sample(config, state, rng, n, labels=None) -> (x, labels)`, `SAMPLERS` (the values of
`config.sample.sampler` its `sample` accepts, checked at start); optionally
`extra_batches(config, teacher, workdir, *, batch_size, seed, start_step, process_index,
process_count) -> iterator of dicts | None`, fields merged into every batch (same leading size).
"""
from __future__ import annotations

import types

from jaxdistill.methods import ctm, dmd2, edm, msd

METHODS: dict[str, types.ModuleType] = {"edm": edm, "ctm": ctm, "dmd2": dmd2, "msd": msd}


def get(name: str) -> types.ModuleType:
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]
