"""A resumable, chunked array store: a data stream made once (e.g. DMD's teacher ODE pairs) and
read back as deterministic batches.

A store is a directory of `chunk_00000.npz` files (named arrays with a common leading size) and a
`spec.json` saying what made them. Each chunk is written to a temporary name and renamed, so a
killed build resumes at the first missing chunk and never reads a half-written file; a chunk is a
deterministic function of its index, so rebuilding gives the same data. The trainer owns the store
(jaxdistill.train): a method only declares the stream (jaxdistill.methods.protocol.DataStream).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable

import numpy as np

from jaxdistill.data import _array_batches


def _chunk_path(directory: str, i: int) -> str:
    return os.path.join(directory, f"chunk_{i:05d}.npz")


def build(directory: str, spec: dict, *, num_items: int, chunk_size: int,
          make_chunk: Callable[[int], dict], write: bool = True,
          field: str = "the store's directory") -> None:
    """Makes the missing chunks of `num_items` items in `directory` with `make_chunk(i)` ->
    {name: array (chunk_size, ...)}. `spec` (JSON-able) records what makes them: a directory made
    with another spec is refused, naming `field` (the config field of the directory). All
    processes compute; only `write` ones write."""
    os.makedirs(directory, exist_ok=True)
    spec = dict(spec, num_items=num_items, chunk_size=chunk_size)
    spec_path = os.path.join(directory, "spec.json")
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            saved = json.load(f)
        if saved != spec:
            raise ValueError(f"{directory} holds data made with {saved}, not {spec}: set "
                             f"{field} to a new directory")
    elif write:
        with open(spec_path, "w") as f:
            json.dump(spec, f)
    for i in range(-(-num_items // chunk_size)):
        path = _chunk_path(directory, i)
        if os.path.exists(path):
            continue
        arrays = {k: np.asarray(v) for k, v in make_chunk(i).items()}
        if write:
            tmp = path + ".tmp.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, path)


def load(directory: str) -> dict:
    """{name: array} of the store's `num_items` items."""
    spec_path = os.path.join(directory, "spec.json")
    paths = sorted(glob.glob(os.path.join(directory, "chunk_*.npz")))
    if not paths or not os.path.exists(spec_path):
        raise FileNotFoundError(f"no stored data in {directory}: it is made at the start of the "
                                "run that needs it")
    with open(spec_path) as f:
        num_items = json.load(f)["num_items"]
    parts = [np.load(p) for p in paths]
    return {k: np.concatenate([p[k] for p in parts])[:num_items] for k in parts[0].files}


def batches(directory: str, *, batch_size: int, seed: int, start_step: int, process_index: int,
            process_count: int, rename: dict | None = None):
    """Per-process batches of the store's arrays (keys renamed by `rename`), deterministic by
    step: epoch-wise seeded permutations like every other data source."""
    arrays = load(directory)
    rename = rename or {}
    index = np.arange(len(next(iter(arrays.values()))))
    for b in _array_batches(index, index, batch_size=batch_size, seed=seed,
                            start_step=start_step, process_index=process_index,
                            process_count=process_count):
        yield {rename.get(k, k): v[b["x"]] for k, v in arrays.items()}
