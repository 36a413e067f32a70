"""Objectives: one module per method, each owning its state, losses and sampler.

Each module ends with `METHOD = Method(...)` (jaxdistill.methods.protocol): init, train_step,
sample, the samplers it accepts, a check of its own config fields and an optional data stream of
its own. `get(config.method.name)` is the only place a method is chosen by name; adding a method
is its module, one line in METHODS, its configs and its tests.
"""
from __future__ import annotations

from jaxdistill.methods import ctm, dmd2, edm, msd
from jaxdistill.methods.protocol import Method

METHODS: dict[str, Method] = {m.name: m for m in (edm.METHOD, ctm.METHOD, dmd2.METHOD,
                                                  msd.METHOD)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]
