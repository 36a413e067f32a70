"""FID / IS / PR of image samples through the sharded Inception extractor, and reference
statistics of a TFDS data set (tfds mock data, random-weights Inception file made here).

One module fixture runs the whole protocol once (one compile of the 8-device extractor): reference
statistics of 12 mock CIFAR-10 images, then those same images scored as generated samples. The
2048 x 2048 scipy.linalg.sqrtm of the FID takes 90-120 s on the shared 2-core CI machine, so
the default suite records the statistics handed to the Fréchet distance and the slow test
evaluates it.
"""
import jax
import numpy as np
import pytest

from jaxdistill import parallel
from jaxdistill.eval import check_files, fid, image_metrics, inception, sample_metrics

import tensorflow_datasets as tfds  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weights FID Inception file in pytorch-fid's layout (.npz: no torch needed)."""
    path = str(tmp_path_factory.mktemp("weights") / "inception.npz")
    np.savez(path, **inception.params_to_state_dict(inception.init_inception_params(0)))
    return path


def _cifar_config(tmp_path, weights):
    import configs.edm_cifar10 as edm_cifar10

    cfg = edm_cifar10.get_config()
    cfg.data.data_dir = str(tmp_path / "tfds")
    cfg.eval.update(inception_weights=weights, ref_stats=str(tmp_path / "ref.npz"),
                    feature_batch_size=8)
    return cfg


@pytest.fixture(scope="module")
def protocol(tmp_path_factory, weights):
    """(config, the 12 uint8 images, ref_stats' return, metrics, stats given to the FD)."""
    from jaxdistill.data import tfds_images

    cfg = _cifar_config(tmp_path_factory.mktemp("run"), weights)
    with tfds.testing.mock_data(num_examples=12):
        images = np.concatenate(list(tfds_images.tfds_epoch(
            "cifar10", split="train", data_dir=cfg.data.data_dir, batch_size=5)))
        stats = image_metrics.reference_stats(cfg, cfg.eval.ref_stats)
    check_files(cfg)
    recorded = []
    mp = pytest.MonkeyPatch()
    mp.setattr(fid, "frechet_distance", lambda *a: recorded.append(a) or 0.0)
    try:
        metrics = sample_metrics(cfg, images.astype(np.float32) / 127.5 - 1, jax.random.key(0))
    finally:
        mp.undo()
    return cfg, images, stats, metrics, recorded[0]


def test_to_uint8_inverts_the_data_scaling_and_follows_edm():
    u8 = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(image_metrics.to_uint8(u8.astype(np.float32) / 127.5 - 1), u8)
    # EDM: (x * 127.5 + 128).clip(0, 255).to(uint8)
    np.testing.assert_array_equal(image_metrics.to_uint8(np.array([-2.0, -1.0, 0.0, 0.999, 3.0])),
                                  [0, 0, 128, 255, 255])


def test_ref_stats_file(protocol):
    cfg, _, stats, _, _ = protocol
    assert stats["num_images"] == 12
    ref = fid.load_stats(cfg.eval.ref_stats)
    assert set(ref) == {"mu", "sigma", "features"}
    assert ref["mu"].dtype == np.float64 and ref["sigma"].shape == (2048, 2048)
    assert ref["features"].shape == (12, 2048)
    mu, sigma = fid.feature_stats(ref["features"])  # streamed stats == stats of the features
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-5, atol=1e-10)


def test_sharded_extraction_equals_single_device(protocol, weights):
    """The reference features came from the 8-device extractor (batches of 8, the last padded)."""
    cfg, images, _, _, _ = protocol
    assert parallel.make_mesh(cfg.mesh).size == 8
    params = inception.load_inception_params(weights)
    single = jax.jit(lambda p, x: inception.inception_outputs(p, x, "[0,255]"))(params, images)
    np.testing.assert_allclose(fid.load_stats(cfg.eval.ref_stats)["features"],
                               np.asarray(single["pool"]), rtol=1e-5, atol=1e-6)


def test_scoring_the_data_itself(protocol):
    cfg, _, _, metrics, fd_args = protocol
    assert set(metrics) == {"fid", "inception_score", "inception_score_std", "precision",
                            "recall"}
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert 1.0 <= metrics["inception_score"] < 1008
    ref = fid.load_stats(cfg.eval.ref_stats)
    mu, sigma, mu_ref, sigma_ref = fd_args  # samples' stats first, then the file's
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-4, atol=1e-10)
    np.testing.assert_array_equal(sigma_ref, ref["sigma"])


@pytest.mark.slow
def test_fid_of_the_data_itself_is_zero(protocol):
    mu, sigma, mu_ref, sigma_ref = protocol[4]
    value = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    assert abs(value) < 1e-5 * np.trace(sigma_ref)


def test_missing_files_fail_before_sampling(tmp_path, weights):
    cfg = _cifar_config(tmp_path, weights)
    with pytest.raises(FileNotFoundError, match="config.eval.ref_stats"):
        check_files(cfg)  # ref.npz not written
    cfg.eval.inception_weights = str(tmp_path / inception.WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match="config.eval.inception_weights"):
        check_files(cfg)
    cfg.eval.inception_weights = ""
    check_files(cfg)  # nothing configured: nothing to check, no metrics
    assert sample_metrics(cfg, np.zeros((4, 32, 32, 3), np.float32), jax.random.key(0)) == {}


def test_cli_ref_stats_mode(tmp_path, weights, protocol, capsys, monkeypatch):
    """`run.py --mode=ref_stats` in-process (tfds mock data does not reach a subprocess).
    ml_collections registers the --config.* override flags from sys.argv, once per process."""
    import sys

    from absl import flags

    import run

    out = str(tmp_path / "cli_ref.npz")
    argv = ["run.py", "--config=configs/edm_cifar10.py", f"--workdir={tmp_path}",
            "--mode=ref_stats", f"--config.data.data_dir={tmp_path / 'tfds'}",
            f"--config.eval.inception_weights={weights}", f"--config.eval.ref_stats={out}",
            "--config.eval.feature_batch_size=8"]
    monkeypatch.setattr(sys, "argv", argv)
    flags.FLAGS(argv)
    try:
        with tfds.testing.mock_data(num_examples=12):
            run.main(["run.py"])
    finally:
        flags.FLAGS.unparse_flags()
    assert "wrote reference statistics of 12 images" in capsys.readouterr().out
    np.testing.assert_allclose(fid.load_stats(out)["mu"],
                               fid.load_stats(protocol[0].eval.ref_stats)["mu"], rtol=1e-6)
