"""DMD's paired regression data: (noise z, teacher ODE output y) made once by a teacher sampler run.

DMD (arXiv 2311.18828, Appendix B) builds its pairs with EDM's deterministic Heun sampler (churn
0; 256 steps on ImageNet-64, 18 on CIFAR-10) from z * sigma_max. Stored as a directory of chunk
files `chunk_00000.npz` (z, y, label), each written to a temporary name and renamed, so a killed
build resumes at the first missing chunk and never reads a half-written file. A chunk is a
deterministic function of (seed, chunk index): rebuilding gives the same pairs.
"""
from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np

from jaxdistill import diffusion, samplers
from jaxdistill.data import _array_batches
from jaxdistill.methods import common

CHUNK = 1024


def _chunk_path(directory: str, i: int) -> str:
    return os.path.join(directory, f"chunk_{i:05d}.npz")


def build(config, teacher, directory: str, *, num_pairs: int, num_steps: int, seed: int,
          write: bool = True) -> None:
    """Makes the missing chunks of `num_pairs` pairs in `directory` (all processes compute;
    only `write` ones write)."""
    os.makedirs(directory, exist_ok=True)
    spec_path = os.path.join(directory, "spec.json")
    spec = {"num_pairs": num_pairs, "num_steps": num_steps, "seed": seed,
            "shape": list(config.model.shape), "label_dim": config.model.label_dim}
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            saved = json.load(f)
        if saved != spec:
            raise ValueError(f"{directory} holds regression pairs made with {saved}, not {spec}: "
                             "set config.method.regression_pairs_dir to a new directory")
    elif write:
        with open(spec_path, "w") as f:
            json.dump(spec, f)
    denoise = common.teacher_denoiser(config)
    label_dim = config.model.label_dim
    sigmas = diffusion.karras_sigmas(num_steps)

    @jax.jit
    def make(tch, key):
        k_labels, k_noise = jax.random.split(key)
        labels = common.random_labels(k_labels, CHUNK, label_dim)
        onehot = common.one_hot(labels, label_dim)
        z = jax.random.normal(k_noise, (CHUNK,) + tuple(config.model.shape))
        y = samplers.sample("heun", lambda x, s: denoise(tch, x, s, onehot), z, sigmas, key)
        return z, y, labels

    for i in range(-(-num_pairs // CHUNK)):
        path = _chunk_path(directory, i)
        if os.path.exists(path):
            continue
        z, y, labels = make(teacher, jax.random.fold_in(jax.random.key(seed), i))
        if write:
            tmp = path + ".tmp.npz"
            np.savez(tmp, z=np.asarray(z), y=np.asarray(y),
                     label=np.zeros(CHUNK, np.int32) if labels is None else np.asarray(labels))
            os.replace(tmp, path)


def load(directory: str, num_pairs: int | None = None):
    """(z, y, labels) arrays of the pairs in `directory`."""
    paths = sorted(glob.glob(os.path.join(directory, "chunk_*.npz")))
    if not paths:
        raise FileNotFoundError(f"no regression pairs in {directory}: they are made at the start "
                                "of a run with config.method.regression_weight > 0")
    parts = [np.load(p) for p in paths]
    z, y, lab = (np.concatenate([p[k] for p in parts]) for k in ("z", "y", "label"))
    return (z[:num_pairs], y[:num_pairs], lab[:num_pairs]) if num_pairs else (z, y, lab)


def batches(directory: str, *, batch_size: int, seed: int, start_step: int, process_index: int,
            process_count: int):
    """Per-process batches {'pair_noise', 'pair_target', 'pair_label'}, deterministic by step."""
    with open(os.path.join(directory, "spec.json")) as f:
        num_pairs = json.load(f)["num_pairs"]
    z, y, labels = load(directory, num_pairs)
    index = np.arange(len(z))
    for b in _array_batches(index, labels, batch_size=batch_size, seed=seed + 1,
                            start_step=start_step, process_index=process_index,
                            process_count=process_count):
        idx = b["x"]
        yield {"pair_noise": z[idx], "pair_target": y[idx], "pair_label": b["label"]}
