"""Tests for jaxdistill.data.tfds_images (offline: tfds mock data, empty data dirs).

Two kinds of fake data are used:
* plain ``tfds.testing.mock_data``: random examples built from the real feature specs
  (shapes, dtypes, num_classes) of cifar10 and imagenet_resized/64x64.  Its dataset
  ignores the requested split and the read config, so it cannot check sharding.
* ``mock_data(as_dataset_fn=_fake_as_dataset(...))``: N known, distinct examples whose
  split slicing is honoured (the ``tfds.even_splits`` object our code passes is resolved
  against a fake split of N examples), so each output image can be traced back to its
  source example; that makes epoch coverage, disjoint host shards and flips checkable.
"""
import itertools
import subprocess
import sys
import time

import numpy as np
import pytest

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from jaxdistill.data.tfds_images import TFDS_DATASETS, tfds_batches  # noqa: E402


def take(it, n):
    return list(itertools.islice(it, n))


def _raw_examples(shape, num_classes, n):
    rng = np.random.default_rng(1234)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images[0].flat[0], images[0].flat[1] = 0, 255  # make both ends of the range occur
    labels = (np.arange(n) * 7 + 3) % num_classes
    return images, labels.astype(np.int64)


def _fake_as_dataset(num_examples, calls):
    """`FileReaderBuilder._as_dataset` replacement: N fixed examples, split slicing honoured."""

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        calls.append(dict(split=split, read_config=read_config, **kwargs))
        images, labels = _raw_examples(self.info.features['image'].shape,
                                       self.info.features['label'].num_classes, num_examples)
        split_infos = tfds.core.SplitDict(
            [tfds.core.SplitInfo(name='train', shard_lengths=[num_examples], num_bytes=0)])
        spec = tfds.core.ReadInstruction.from_spec(split) if isinstance(split, str) else split
        (inst,) = spec.to_absolute(split_infos)
        lo = inst.from_ or 0
        hi = num_examples if inst.to is None else inst.to
        return tf.data.Dataset.from_tensor_slices({'image': images[lo:hi], 'label': labels[lo:hi]})

    return as_dataset


class Fake:
    """Runs tfds_batches on N known examples and maps outputs back to example indices."""

    def __init__(self, name, num_examples):
        self.name, self.n = name, num_examples
        _, shape, ncls = TFDS_DATASETS[name]
        self.images, self.labels = _raw_examples(shape, ncls, num_examples)
        self.index = {im.tobytes(): i for i, im in enumerate(self.images)}
        self.mirror_index = {im[:, ::-1].tobytes(): i for i, im in enumerate(self.images)}
        self.calls = []

    def batches(self, n_batches, data_dir, **kw):
        with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset(self.n, self.calls)):
            return take(tfds_batches(self.name, data_dir=str(data_dir), **kw), n_batches)

    def trace(self, batch):
        """[(example index, mirrored?)] for every image of a batch; checks exact pixel scaling."""
        x = batch['x']
        raw = (x.astype(np.float64) + 1.0) * 127.5
        np.testing.assert_allclose(raw, np.rint(raw), atol=1e-3)  # x == u8 / 127.5 - 1 exactly
        u8 = np.rint(raw).astype(np.uint8)
        out = []
        for im, label in zip(u8, batch['label']):
            b = im.tobytes()
            if b in self.index:
                i, mirrored = self.index[b], False
            else:
                assert b in self.mirror_index, 'output image is neither a source image nor its mirror'
                i, mirrored = self.mirror_index[b], True
            assert label == self.labels[i]
            out.append((i, mirrored))
        return out


def assert_same(a, b):
    assert len(a) == len(b)
    for ba, bb in zip(a, b):
        np.testing.assert_array_equal(ba['x'], bb['x'])
        np.testing.assert_array_equal(ba['label'], bb['label'])


# --------------------------------------------------------------------------- registry / errors


@pytest.mark.parametrize('name', sorted(TFDS_DATASETS))
def test_registry_matches_tfds_features(name, tmp_path):
    tfds_name, shape, ncls = TFDS_DATASETS[name]
    with tfds.testing.mock_data(num_examples=1):
        info = tfds.builder(tfds_name, data_dir=str(tmp_path)).info
    assert tuple(info.features['image'].shape) == shape
    assert info.features['label'].num_classes == ncls


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match='cifar10.*imagenet64'):
        tfds_batches('mnist', data_dir=str(tmp_path), batch_size=2, seed=0)


@pytest.mark.parametrize('name,needles', [
    ('cifar10', ['tfds build cifar10 --data_dir={d}', 'config.data.data_dir']),
    ('imagenet64', ['tfds build imagenet_resized/64x64 --data_dir={d}', '{d}/downloads/manual',
                    'config.data.data_dir']),
])
def test_missing_data_raises_file_not_found_fast(name, needles, tmp_path, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError('tfds_batches must never try to download')

    monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_download)
    empty = tmp_path / 'empty'
    empty.mkdir()
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        tfds_batches(name, data_dir=str(empty), batch_size=2, seed=0)
    assert time.perf_counter() - t0 < 10.0
    for needle in needles:
        assert needle.format(d=empty) in str(err.value)
    assert list(empty.iterdir()) == []  # nothing written / downloaded


def test_module_import_does_not_import_tensorflow():
    code = ('import sys, jaxdistill.data.tfds_images as m; '
            'assert "tensorflow" not in sys.modules and "tensorflow_datasets" not in sys.modules; '
            'print(sorted(m.TFDS_DATASETS))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['cifar10', 'imagenet64']" in out.stdout


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize('name', sorted(TFDS_DATASETS))
def test_shapes_dtypes_ranges_with_tfds_mock(name, tmp_path):
    _, (h, w, c), ncls = TFDS_DATASETS[name]
    with tfds.testing.mock_data(num_examples=8):
        batches = take(tfds_batches(name, data_dir=str(tmp_path), batch_size=4, seed=0,
                                    random_flip=True), 3)
    assert len(batches) == 3
    for b in batches:
        assert set(b) == {'x', 'label'}
        assert isinstance(b['x'], np.ndarray) and b['x'].shape == (4, h, w, c)
        assert b['x'].dtype == np.float32
        assert b['label'].shape == (4,) and b['label'].dtype == np.int32
        assert b['x'].min() >= -1.0 and b['x'].max() <= 1.0
        assert b['x'].min() < -0.99 and b['x'].max() > 0.99  # full range used (not x/255)
        raw = (b['x'] + 1.0) * 127.5
        np.testing.assert_allclose(raw, np.rint(raw), atol=1e-3)
        assert ((0 <= b['label']) & (b['label'] < ncls)).all()
    assert len({int(l) for b in batches for l in b['label']}) > 1  # labels really come through


@pytest.mark.parametrize('name', sorted(TFDS_DATASETS))
def test_exact_values_and_epochs(name, tmp_path):
    fake = Fake(name, 16)
    batches = fake.batches(8, tmp_path, batch_size=4, seed=5)  # two epochs
    traced = [fake.trace(b) for b in batches]
    ids = [i for t in traced for i, _ in t]
    assert not any(m for t in traced for _, m in t)  # random_flip defaults to False
    assert sorted(ids[:16]) == list(range(16))  # each epoch visits every example once
    assert sorted(ids[16:]) == list(range(16))
    assert ids[:16] != ids[16:]  # reshuffled each epoch
    assert ids[:16] != list(range(16))  # shuffled at all
    assert fake.calls and all(c.get('shuffle_files') for c in fake.calls)
    assert all(c['read_config'].shuffle_seed is not None for c in fake.calls)


def test_determinism_same_seed_same_batches(tmp_path):
    fake = Fake('cifar10', 40)
    kw = dict(batch_size=4, random_flip=True)
    a = fake.batches(14, tmp_path, seed=3, **kw)  # crosses the epoch boundary (10 batches/epoch)
    b = fake.batches(14, tmp_path, seed=3, **kw)
    c = fake.batches(14, tmp_path, seed=4, **kw)
    assert_same(a, b)
    assert not all(np.array_equal(x['x'], y['x']) for x, y in zip(a, c))
    ta = [fake.trace(x) for x in a]
    tc = [fake.trace(x) for x in c]
    assert [i for t in ta for i, _ in t] != [i for t in tc for i, _ in t]  # order depends on seed
    assert [m for t in ta for _, m in t] != [m for t in tc for _, m in t]  # flips depend on seed


def test_resume_start_step(tmp_path):
    fake = Fake('cifar10', 20)
    kw = dict(batch_size=4, seed=11, random_flip=True)
    fresh = fake.batches(7, tmp_path, **kw)  # 5 batches/epoch: resumed part crosses an epoch
    resumed = fake.batches(4, tmp_path, start_step=3, **kw)
    assert_same(resumed, fresh[3:7])
    assert not np.array_equal(resumed[0]['x'], fresh[0]['x'])


def test_host_sharding_disjoint_and_complete(tmp_path):
    fake = Fake('cifar10', 12)
    kw = dict(batch_size=3, seed=0)  # same seed on both hosts, as in a real job
    seen = []
    for p in range(2):
        batches = fake.batches(4, tmp_path, process_index=p, process_count=2, **kw)  # 2 epochs
        ids = [i for b in batches for i, _ in fake.trace(b)]
        assert sorted(ids[:6]) == sorted(ids[6:])  # one epoch of this host = its 6 examples
        seen.append(set(ids))
    assert len(seen[0]) == len(seen[1]) == 6
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(12))


def test_random_flip_mirrors_some_images_along_width(tmp_path):
    fake = Fake('imagenet64', 24)
    kw = dict(batch_size=8, seed=7)
    plain = fake.batches(6, tmp_path, random_flip=False, **kw)
    flipped = fake.batches(6, tmp_path, random_flip=True, **kw)
    n_same = n_mirrored = 0
    for p, f in zip(plain, flipped):
        np.testing.assert_array_equal(p['label'], f['label'])  # same examples, same order
        for xp, xf in zip(p['x'], f['x']):
            if np.array_equal(xp, xf):
                n_same += 1
            else:
                np.testing.assert_array_equal(xf, xp[:, ::-1, :])  # (H, W, C): width mirror
                n_mirrored += 1
    assert n_same + n_mirrored == 48
    assert n_same > 0 and n_mirrored > 0
    # the same example is not always flipped the same way across epochs (key = stream position)
    traced = [t for b in flipped for t in fake.trace(b)]
    per_example = {}
    for i, m in traced:
        per_example.setdefault(i, set()).add(m)
    assert any(len(v) == 2 for v in per_example.values())



# --------------------------------------------------------------------------- real tfrecord files


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """A tiny dataset actually prepared on disk (4 tfrecord shards): exercises tfds' real
    reader (file shuffling, interleave, even_splits over shards), which mock_data bypasses."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3)),
            'label': tfds.features.ClassLabel(num_classes=5)}))

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(24)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(0)
        for i in range(n):
            image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image[0, 0, 0] = i  # example id readable from the pixels
            yield i, {'image': image, 'label': i % 5}


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny_tfds')
    TinyImages(data_dir=str(d)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    return str(d)


def test_real_tfrecords_sharding_determinism_resume(tiny_dir, monkeypatch):
    monkeypatch.setitem(TFDS_DATASETS, 'tiny', ('tiny_images', (8, 8, 3), 5))

    def ids(n, **kw):
        kw = dict(dict(batch_size=3, seed=0, process_count=2, process_index=0), **kw)
        batches = take(tfds_batches('tiny', data_dir=tiny_dir, **kw), n)
        out = [int(round((v + 1) * 127.5)) for b in batches for v in b['x'][:, 0, 0, 0]]
        labels = [int(l) for b in batches for l in b['label']]
        assert labels == [i % 5 for i in out]
        return out

    p0, p1 = ids(8), ids(8, process_index=1)  # 2 epochs of 12 examples per host
    assert sorted(p0[:12]) == sorted(p0[12:]) and len(set(p0)) == 12
    assert sorted(p1[:12]) == sorted(p1[12:]) and len(set(p1)) == 12
    assert set(p0).isdisjoint(p1) and set(p0) | set(p1) == set(range(24))
    assert p0[:12] != p0[12:]  # reshuffled per epoch
    assert ids(8) == p0  # deterministic, file shuffling included
    assert ids(8, seed=1) != p0
    assert ids(6, start_step=2) == p0[6:]


def test_tfds_epoch_reads_every_example_once_in_order(tmp_path):
    from jaxdistill.data.tfds_images import tfds_epoch

    fake = Fake('cifar10', 11)
    with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset(fake.n, fake.calls)):
        batches = list(tfds_epoch('cifar10', data_dir=str(tmp_path), batch_size=4))
        first7 = list(tfds_epoch('cifar10', data_dir=str(tmp_path), batch_size=4,
                                 max_examples=7))
    assert [len(b) for b in batches] == [4, 4, 3]  # the last batch is partial, nothing repeats
    assert all(b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), fake.images)  # file order, no flips
    np.testing.assert_array_equal(np.concatenate(first7), fake.images[:7])
    assert not any(c.get('shuffle_files') for c in fake.calls)
