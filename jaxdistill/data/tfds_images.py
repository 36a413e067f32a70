"""Deterministic, resumable, host-sharded TFDS image pipelines (CIFAR-10, ImageNet 64x64).

`tfds_batches` yields an infinite stream of per-process numpy batches
``{'x': float32 (B, H, W, C) in [-1, 1], 'label': int32 (B,)}`` for training image
diffusion models.

Preprocessing follows EDM (Karras et al. 2022, github.com/NVlabs/edm):

* pixel scaling: ``training/training_loop.py`` feeds the network
  ``images.to(torch.float32) / 127.5 - 1``, i.e. uint8 [0, 255] -> [-1, 1]; we do the same
  (``x / 127.5 - 1``).
* horizontal flips: EDM's ``train.py --xflip`` ("Enable dataset x-flips") makes
  ``training/dataset.py`` double the dataset with mirrored copies (``image[:, :, ::-1]``
  on CHW, i.e. along the width).  We use the stochastic equivalent: each example is
  mirrored along the width with probability 0.5 (``random_flip=True``), decided by a
  *stateless* random op keyed on ``(seed, position in this process' example stream)``
  so flips are reproducible and survive resumption.

Determinism / resumption: file order (``shuffle_files`` + ``ReadConfig(shuffle_seed)``),
the shuffle buffer (seeded, reshuffled each epoch) and the flips are all functions of
``seed``, and ``tf.data.Options().deterministic`` is on, so the same arguments give the same
batches.  ``start_step=k`` skips the first ``k`` batches of that stream (``ds.skip(k)``,
O(k) work), so a restarted job sees exactly the batches it would have seen.
Note: tf.data's seeded shuffles combine their seed with TF's global seed; do not call
``tf.random.set_seed`` with different values in runs that must agree.

Host sharding: process ``i`` of ``n`` reads only ``tfds.split_for_jax_process(split, i, n)``
(a disjoint, equal-size slice of the split); callers pass ``jax.process_index()`` /
``jax.process_count()``.

Data is never downloaded here (``download=False``): an unprepared dataset raises a
``FileNotFoundError`` that says how to prepare it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import numpy as np

# short name -> (tfds name, image shape (H, W, C), num_classes)
TFDS_DATASETS: dict[str, tuple[str, tuple[int, int, int], int]] = {
    'cifar10': ('cifar10', (32, 32, 3), 10),
    'imagenet64': ('imagenet_resized/64x64', (64, 64, 3), 1000),
}

# Examples held in the tf.data shuffle buffer (uint8: ~30 MiB for cifar10, ~120 MiB for imagenet64).
SHUFFLE_BUFFER = 10_000

_PREPARE_HINT = {
    'cifar10': (
        'On a machine with internet access run\n'
        '    pip install tensorflow-datasets tensorflow-cpu importlib_resources\n'
        '    tfds build cifar10 --data_dir={dir}\n'
        'then copy {dir} to this machine if needed.'
    ),
    'imagenet64': (
        'imagenet_resized/64x64 is built from the downsampled-ImageNet archives of '
        'image-net.org (an ImageNet account is required): log in at https://image-net.org, '
        'download Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip and '
        'Imagenet64_val_npz.zip (from https://www.image-net.org/data/downsample/) into '
        '{dir}/downloads/manual/ (tfds uses files found there instead of downloading them), '
        'then run\n'
        '    pip install tensorflow-datasets tensorflow-cpu importlib_resources\n'
        '    tfds build imagenet_resized/64x64 --data_dir={dir}'
    ),
}


def _missing_data_error(name: str, tfds_name: str, data_dir: str | None, cause: Exception) -> FileNotFoundError:
    shown = data_dir if data_dir else os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
    where = shown if data_dir else f'{shown} (the tfds default; no data_dir was given)'
    msg = (
        f'TFDS dataset {tfds_name!r} (jaxdistill name {name!r}) is not prepared in {where}; '
        f'it is never downloaded during training.\n'
        + _PREPARE_HINT[name].format(dir=shown)
        + f'\nand finally set config.data.data_dir={shown!r}.\n(tfds said: {cause})'
    )
    return FileNotFoundError(msg)


def _hide_accelerators_from_tf(tf: Any) -> None:
    """Keep tf.data on the host so it never grabs GPU memory that JAX needs."""
    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError as e:  # TF devices were already initialised by someone else
        if tf.config.get_visible_devices('GPU'):
            logging.warning('tfds_images: could not hide GPUs from TensorFlow: %s', e)


def tfds_batches(name: str, *, split: str = 'train', data_dir: str | None, batch_size: int,
                 seed: int, start_step: int = 0, random_flip: bool = False,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of per-process batches {'x': float32 (B,H,W,C) in [-1,1], 'label': int32 (B,)}.

    Args:
      name: short dataset name, a key of `TFDS_DATASETS`.
      split: tfds split spec (e.g. 'train', 'train[:90%]'); each process reads its own
        disjoint, equal-size slice of it.
      data_dir: tfds data directory holding the prepared dataset (None: tfds default).
      batch_size: per-process batch size (incomplete trailing batches never occur: the
        stream is infinite and batched with drop_remainder).
      seed: controls file order, the shuffle buffer and flips; same seed -> same batches.
      start_step: number of batches to skip, so that a resumed run continues the stream.
      random_flip: mirror each image along the width with probability 0.5.
      process_index, process_count: this host's index and the number of hosts.
    """
    if name not in TFDS_DATASETS:
        raise ValueError(f'unknown dataset {name!r}; known: {sorted(TFDS_DATASETS)}')
    if batch_size <= 0:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    if start_step < 0:
        raise ValueError(f'start_step must be >= 0, got {start_step}')
    if not 0 <= process_index < process_count:
        raise ValueError(f'need 0 <= process_index < process_count, got {process_index}, {process_count}')
    tfds_name, _, _ = TFDS_DATASETS[name]

    import tensorflow as tf  # lazy: importing this module must stay cheap
    import tensorflow_datasets as tfds

    _hide_accelerators_from_tf(tf)
    seed = int(seed) % (1 << 63)  # tf int64 seeds

    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(shuffle_seed=seed, options=options)
    shard = tfds.split_for_jax_process(split, process_index=process_index,
                                       process_count=process_count, drop_remainder=True)
    try:
        ds = tfds.load(tfds_name, split=shard, data_dir=data_dir, download=False,
                       shuffle_files=True, read_config=read_config)
    except AssertionError as e:
        if 'could not find data' in str(e):
            raise _missing_data_error(name, tfds_name, data_dir, e) from e
        raise

    def keep(ex):  # drop e.g. cifar10's string 'id' before the shuffle buffer
        return {'image': ex['image'], 'label': ex['label']}

    def prep(index, ex):
        image = ex['image']
        if random_flip:
            key = tf.stack([tf.constant(seed, tf.int64), index * process_count + process_index])
            flip = tf.random.stateless_uniform([], seed=key) < 0.5
            image = tf.where(flip, tf.reverse(image, axis=[1]), image)  # (H, W, C): axis 1 = width
        x = tf.cast(image, tf.float32) / 127.5 - 1.0
        return {'x': x, 'label': tf.cast(ex['label'], tf.int32)}

    ds = ds.map(keep)
    ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat()
    ds = ds.enumerate()  # position in this process' stream: keys the flips
    ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    if start_step:
        ds = ds.skip(start_step)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    ds = ds.with_options(options)
    return iter(tfds.as_numpy(ds))


def tfds_epoch(name: str, *, split: str = 'train', data_dir: str | None, batch_size: int,
               max_examples: int = 0) -> Iterator[np.ndarray]:
    """One pass over a split in file order: uint8 image batches (B, H, W, C), the last one partial.

    For reference statistics (EDM's `fid.py ref` reads every training image once, unflipped).
    Every process reads the whole split, so all hold the same batches (the feature extractor
    then splits each batch over the mesh). `max_examples` > 0 stops after that many examples.
    """
    if name not in TFDS_DATASETS:
        raise ValueError(f'unknown dataset {name!r}; known: {sorted(TFDS_DATASETS)}')
    tfds_name, _, _ = TFDS_DATASETS[name]

    import tensorflow as tf  # lazy: importing this module must stay cheap
    import tensorflow_datasets as tfds

    _hide_accelerators_from_tf(tf)
    options = tf.data.Options()
    options.deterministic = True
    try:
        ds = tfds.load(tfds_name, split=split, data_dir=data_dir, download=False,
                       shuffle_files=False, read_config=tfds.ReadConfig(options=options))
    except AssertionError as e:
        if 'could not find data' in str(e):
            raise _missing_data_error(name, tfds_name, data_dir, e) from e
        raise
    ds = ds.map(lambda ex: ex['image'])
    if max_examples > 0:
        ds = ds.take(max_examples)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds))
