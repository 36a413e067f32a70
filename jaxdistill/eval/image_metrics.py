"""FID / IS / precision-recall of generated images, and reference statistics of a TFDS data set.

Protocol (NVlabs/edm generate.py and fid.py): images in [-1, 1] are turned into uint8 as EDM
saves them, (x * 127.5 + 128).clip(0, 255) truncated to integers, and the Inception network sees
those values (`input_range="[0,255]"`); the feature statistics are float64 and FID uses the
reference .npz in EDM's layout. Reference statistics (`reference_stats`, `run.py
--mode=ref_stats`) go over every image of the config's TFDS split once, unflipped, as EDM's
`fid.py ref` does over the training set. The published numbers use 50,000 generated images.
Inception Score uses the bias-free logits (see eval/inception.py), 10 splits. Precision / recall
compare the first min(N, M) generated samples with the M reference features stored in the
reference file (`eval.pr_num_features`, default 10,000; EDM's own files have none, so then no
precision / recall is reported).

Extraction runs in fixed-size batches, each split over every device of the mesh
(`parallel.batch_sharding`, Inception params replicated); the last batch is padded. Every process
passes the same images (train.generate returns all samples on every process) and gets all
features back. Progress (images, images/s, ETA) is logged about 20 times per pass.
"""
from __future__ import annotations

import functools
import time
from typing import Iterable, Iterator

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from jaxdistill import parallel
from jaxdistill.eval import fid, inception

IS_SPLITS = 10


def to_uint8(images) -> np.ndarray:
    """[-1, 1] images -> uint8 exactly as EDM writes its samples."""
    x = np.asarray(images, np.float32) * 127.5 + 128
    return np.clip(x, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def _load_params(path: str):
    return inception.load_inception_params(path)


@functools.lru_cache(maxsize=4)
def _jitted_outputs(mesh: Mesh):
    rep = parallel.replicated(mesh)
    return jax.jit(lambda p, x: inception.inception_outputs(p, x, "[0,255]"),
                   in_shardings=(rep, parallel.batch_sharding(mesh)), out_shardings=rep)


def extract(params, batches: Iterable[np.ndarray], mesh: Mesh, batch_size: int,
            total: int | None = None, what: str = "images") -> Iterator[dict[str, np.ndarray]]:
    """Inception outputs (pool, logits, logits_unbiased) of uint8 NHWC batches, batch by batch.

    `batch_size` is rounded up to a multiple of the mesh size; input batches may be up to that
    size (shorter ones are padded, their padding dropped from the outputs).
    """
    batch_size = -(-batch_size // mesh.size) * mesh.size
    fn = _jitted_outputs(mesh)
    params = jax.device_put(params, parallel.replicated(mesh))
    sharding = parallel.batch_sharding(mesh)
    done, t0, next_log = 0, time.time(), 0
    step = max(1, (total or 0) // 20)
    for batch in batches:
        n = len(batch)
        if n > batch_size:
            raise ValueError(f"batch of {n} exceeds the extraction batch size {batch_size}")
        padded = np.zeros((batch_size,) + batch.shape[1:], np.uint8)
        padded[:n] = batch
        x = jax.make_array_from_callback(padded.shape, sharding, lambda idx: padded[idx])
        out = jax.device_get(fn(params, x))
        yield {k: v[:n] for k, v in out.items()}
        done += n
        if done >= next_log or (total and done >= total):
            rate = done / max(time.time() - t0, 1e-9)
            eta = f", ETA {(total - done) / rate:.0f} s" if total else ""
            logging.info("Inception features of %s: %d%s (%.1f images/s%s)", what, done,
                         f"/{total}" if total else "", rate, eta)
            next_log = done + step


def _slices(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def check_files(eval_cfg) -> None:
    """Fails fast (before sampling) when the Inception weights or reference stats are missing."""
    _load_params(eval_cfg.inception_weights)
    fid.load_stats(eval_cfg.ref_stats)


def inception_metrics(config, samples: np.ndarray) -> dict[str, float]:
    """fid, inception_score(_std) and, if the reference file has features, precision / recall."""
    ec = config.eval
    ref = fid.load_stats(ec.ref_stats)
    params = _load_params(ec.inception_weights)
    mesh = parallel.make_mesh(config.mesh)
    images = to_uint8(samples)
    outs = list(extract(params, _slices(images, ec.feature_batch_size), mesh,
                        ec.feature_batch_size, len(images), "generated samples"))
    pool = np.concatenate([o["pool"] for o in outs])
    logits = np.concatenate([o["logits_unbiased"] for o in outs])
    mu, sigma = fid.feature_stats(pool)
    metrics = {"fid": fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    metrics["inception_score"], metrics["inception_score_std"] = fid.inception_score(
        logits, IS_SPLITS)
    if "features" in ref:
        n = min(len(ref["features"]), len(pool))
        metrics["precision"], metrics["recall"] = fid.precision_recall(
            ref["features"][:n], pool[:n], k=ec.pr_k)
    return metrics


def reference_stats(config, path: str) -> dict[str, np.ndarray]:
    """Writes EDM-layout stats (+ up to eval.pr_num_features features) of the TFDS data set."""
    from jaxdistill.data import tfds_images

    dc, ec = config.data, config.eval
    if dc.name not in tfds_images.TFDS_DATASETS:
        raise ValueError(f"reference statistics are for TFDS image data sets "
                         f"({sorted(tfds_images.TFDS_DATASETS)}), not config.data.name="
                         f"{dc.name!r}")
    if not path:
        raise ValueError("set config.eval.ref_stats to the .npz file to write")
    params = _load_params(ec.inception_weights)
    mesh = parallel.make_mesh(config.mesh)
    batches = tfds_images.tfds_epoch(dc.name, split=dc.split, data_dir=dc.data_dir or None,
                                     batch_size=ec.feature_batch_size,
                                     max_examples=ec.ref_num_images)
    acc = fid.GaussianStats(inception.FEATURE_DIM)
    kept = []
    for out in extract(params, batches, mesh, ec.feature_batch_size, ec.ref_num_images or None,
                       f"{dc.name}:{dc.split}"):
        acc.update(out["pool"])
        room = ec.pr_num_features - sum(len(k) for k in kept)
        if room > 0:
            kept.append(out["pool"][:room])
    mu, sigma = acc.result()
    features = np.concatenate(kept) if kept else None
    if jax.process_index() == 0:
        fid.save_stats(path, mu, sigma, features)
    logging.info("wrote reference statistics of %d images of %s:%s to %s", acc.n, dc.name,
                 dc.split, path)
    return {"mu": mu, "sigma": sigma, "num_images": acc.n}
