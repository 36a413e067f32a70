"""Method objects: one module per objective, each owning its state, losses and sampler.

Protocol (DESIGN.md): `init(config, rng, teacher) -> state`,
`train_step(config) -> step(state, teacher, batch, rng) -> (state, metrics)`,
`sample(config, state, rng, n, labels=None) -> (x, labels)`.
"""
from __future__ import annotations

import types

from jaxdistill.methods import ctm, edm

METHODS: dict[str, types.ModuleType] = {"edm": edm, "ctm": ctm}


def get(name: str) -> types.ModuleType:
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]
