"""configs/ctm_cifar10.py end to end: clear errors without teacher / data, and a real (tiny) run
on TFDS mock data with an EDM teacher trained in the test."""
import pathlib
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from jaxdistill import train
from jaxdistill.networks import presets

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_edm import ROOT, load_config  # noqa: E402

TINY = presets.tiny_songunet(img_resolution=32, in_channels=3)


def test_cli_without_teacher_says_what_to_provide(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config=configs/ctm_cifar10.py",
                        f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode != 0
    assert "config.teacher.checkpoint" in r.stderr and "edm_" in r.stderr


def test_missing_lpips_weights_say_which_files(tmp_path):
    cfg = load_config("ctm_cifar10")
    cfg.method.lpips_weights_dir = str(tmp_path)
    from jaxdistill.methods import ctm

    with pytest.raises(FileNotFoundError, match="vgg"):  # read once, before anything compiles
        ctm.METHOD.frozen_weights(cfg)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("edm_teacher"))
    cfg = load_config("edm_cifar10")
    cfg.network = dict(name="songunet", **TINY)
    cfg.train.update(batch_size=8, num_steps=2, log_every=1, ckpt_every=2, sample_every=2,
                     num_grid_samples=4)
    cfg.eval.update(num_samples=8, batch_size=8)
    cfg.sample.num_steps = 2
    with tfds.testing.mock_data(num_examples=32):
        train.train(cfg, workdir)
    return workdir


# Slow: the tiny teacher (~90 s) and the CIFAR CTM step's compile (~220 s) on 2 cores; the
# teacher-mismatch message is also checked on the 2-D mixture in the default suite (test_faults).
@pytest.mark.slow
def test_ctm_cifar10_trains_end_to_end_on_mock_data(tiny_teacher, tmp_path):
    cfg = load_config("ctm_cifar10")
    cfg.teacher.checkpoint = tiny_teacher
    cfg.teacher.network = dict(name="songunet", **TINY)
    cfg.network = dict(name="songunet", s_embedding=True, **TINY)
    cfg.method.distance = "pseudo_huber"
    cfg.method.num_heun_step = 3
    cfg.method.gan_weight = 1.0  # step 1: generator with GAN, step 2: discriminator
    cfg.train.update(batch_size=8, num_steps=2, log_every=1, ckpt_every=2, sample_every=2,
                     num_grid_samples=4)
    cfg.eval.update(num_samples=8, batch_size=8)
    with tfds.testing.mock_data(num_examples=32):
        state = train.train(cfg, str(tmp_path))
    assert int(state.step) == 2
    assert (tmp_path / "samples_0000002.png").exists() and (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_teacher_network_mismatch_is_named(tiny_teacher):
    from jaxdistill import teacher

    cfg = load_config("ctm_cifar10")
    cfg.teacher.checkpoint = tiny_teacher  # but config.teacher.network is the full DDPM++
    with pytest.raises(ValueError, match="config.teacher.network does not match"):
        teacher.load(cfg)
