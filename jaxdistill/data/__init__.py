"""Input pipelines: one entry point for every data set a config can name.

`config.data.name` is one of
  - 'mixture2d'      2-D ring of Gaussians (exact teacher, exact metrics);
  - 'image_mixture'  one Gaussian per digit class in image space (exact teacher, exact metrics);
  - 'mixture'        a user's Gaussian mixture read from `config.data.mixture_file` (.npz / .json
                     with means, stds, weights, optional classes; mixtures.load_file);
  - 'digits'         scikit-learn's embedded 8x8 digits (no download);
  - 'cifar10', 'imagenet64'   TFDS pipelines (data prepared with `tfds build`).

Every pipeline is a deterministic function of (seed, step), so a resumed run that starts at
`start_step` sees exactly the batches an uninterrupted run would have seen; each process yields its
own slice of the global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator

import jax
import numpy as np

from jaxdistill.data import digits, mixtures

NAMES = ("mixture2d", "image_mixture", "mixture", "digits", "cifar10", "imagenet64")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: example shape, classes, exact density if any."""
    shape: tuple[int, ...]
    num_classes: int
    mixture: mixtures.GaussianMixture | None = None


def mixture_of(cfg) -> mixtures.GaussianMixture | None:
    """The Gaussian mixture of `config.data` (None for data sets without an exact density)."""
    if cfg.name == "mixture":
        path = cfg.get("mixture_file", "")
        if path and os.path.isfile(path):  # read once per file version, not at every call
            st = os.stat(path)
            return _mixture_file(os.path.abspath(path), path, st.st_mtime_ns, st.st_size)
        return mixtures.load_file(path)  # raises, naming the field and the file
    if cfg.name == "mixture2d":
        return mixtures.ring2d(cfg.get("num_modes", 8), cfg.get("radius", 1.0), cfg.get("std", 0.08))
    if cfg.name == "image_mixture":
        return mixtures.digit_mixture(cfg.get("resolution", 8), cfg.get("std", 0.2))
    return None


@functools.lru_cache(maxsize=8)
def _mixture_file(abspath: str, path: str, mtime_ns: int, size: int):
    del abspath, mtime_ns, size  # the cache key: a changed file is read again
    return mixtures.load_file(path)


def spec(cfg) -> DataSpec:
    """The DataSpec of `config.data`; fails naming the field when the name is unknown."""
    if cfg.name not in NAMES:
        raise ValueError(f"config.data.name={cfg.name!r} is not one of {NAMES}")
    if cfg.get("mixture_file", "") and cfg.name != "mixture":
        raise ValueError(f"config.data.mixture_file={cfg.mixture_file} is set but "
                         f"config.data.name={cfg.name!r}: set config.data.name='mixture' to use "
                         "the file (or clear mixture_file)")
    mix = mixture_of(cfg)
    if mix is not None:
        return DataSpec(mix.shape, mix.num_classes, mix)
    if cfg.name == "digits":
        res = cfg.get("resolution", 8)
        return DataSpec((res, res, 1), 10)
    from jaxdistill.data import tfds_images

    _, shape, num_classes = tfds_images.TFDS_DATASETS[cfg.name]
    return DataSpec(tuple(shape), num_classes)


def _mixture_batches(mix, *, batch_size, seed, start_step, process_index, process_count):
    """Each process draws the whole global batch of the step and keeps its slice, so the data of
    a step does not depend on how many processes share it."""
    sampler = jax.jit(lambda key: mixtures.sample(mix, key, batch_size * process_count))
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    step = start_step
    while True:
        x, comp = sampler(jax.random.fold_in(jax.random.key(seed), step))
        label = mixtures.class_of(mix, np.asarray(comp, np.int32))
        yield {"x": np.asarray(x)[rows], "label": np.asarray(label, np.int32)[rows]}
        step += 1


def _array_batches(images, labels, *, batch_size, seed, start_step, process_index, process_count):
    """Epoch-wise seeded permutations; the global batch is split into per-process slices."""
    global_batch = batch_size * process_count
    steps_per_epoch = len(images) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"global batch {global_batch} exceeds the data set size {len(images)}")
    step = start_step
    while True:
        epoch, within = divmod(step, steps_per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(len(images))
        start = within * global_batch + process_index * batch_size
        idx = perm[start:start + batch_size]
        yield {"x": images[idx], "label": labels[idx]}
        step += 1


def batches(cfg, *, batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
            process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of per-process batches {'x': float32, 'label': int32}."""
    spec(cfg)  # validates the name
    mix = mixture_of(cfg)
    if mix is not None:
        return _mixture_batches(mix, batch_size=batch_size, seed=seed, start_step=start_step,
                                process_index=process_index, process_count=process_count)
    if cfg.name == "digits":
        images, labels = digits.load_digits(cfg.get("resolution", 8))
        return _array_batches(images, labels, batch_size=batch_size, seed=seed,
                              start_step=start_step, process_index=process_index,
                              process_count=process_count)
    from jaxdistill.data import tfds_images

    return tfds_images.tfds_batches(
        cfg.name, split=cfg.get("split", "train"), data_dir=cfg.get("data_dir") or None,
        batch_size=batch_size, seed=seed, start_step=start_step,
        random_flip=cfg.get("random_flip", False), process_index=process_index,
        process_count=process_count)


def reference_samples(cfg, n: int, key: jax.Array) -> np.ndarray | None:
    """Samples of the data distribution to compare generated samples with (None for TFDS)."""
    mix = mixture_of(cfg)
    if mix is not None:
        return np.asarray(mixtures.sample(mix, key, n)[0])
    if cfg.name == "digits":
        images, _ = digits.load_digits(cfg.get("resolution", 8))
        idx = np.random.default_rng(0).permutation(len(images))[:n]
        return images[idx]
    return None
