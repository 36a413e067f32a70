"""End to end: run.py trains, checkpoints, resumes, samples and evaluates; bad input fails clearly."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdistill import train

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_edm import ROOT, load_config  # noqa: E402


def tiny_config(num_steps, name="edm_mixture2d"):
    cfg = load_config(name)
    cfg.network.hidden = 32
    cfg.train.update(batch_size=64, num_steps=num_steps, log_every=10, ckpt_every=20,
                     sample_every=40, num_grid_samples=256)
    cfg.eval.update(num_samples=256, batch_size=256)
    return cfg


def assert_resume_is_bit_identical(tmp_path, name, stop, end, **method):
    """Train `name` to `stop` (checkpointing there), resume to `end`, and compare every array of
    the state with an uninterrupted run to `end`."""
    def cfg_for(num_steps):
        cfg = tiny_config(num_steps, name)
        cfg.method.update(method)
        cfg.train.ckpt_every = stop
        return cfg

    train.train(cfg_for(stop), str(tmp_path / "resumed"))
    resumed = train.train(cfg_for(end), str(tmp_path / "resumed"))
    straight = train.train(cfg_for(end), str(tmp_path / "straight"))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def run_cli(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """A run trained 40 steps then resumed to 60, and an uninterrupted 60-step run."""
    resumed = str(tmp_path_factory.mktemp("resumed"))
    straight = str(tmp_path_factory.mktemp("straight"))
    train.train(tiny_config(40), resumed)
    state_resumed = train.train(tiny_config(60), resumed)
    state_straight = train.train(tiny_config(60), straight)
    return resumed, straight, state_resumed, state_straight


def test_train_writes_checkpoints_samples_and_metrics(workdirs):
    resumed, _, _, _ = workdirs
    files = os.listdir(resumed)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints")))[-1] == "60"
    assert "samples_0000040.png" in files and "samples_0000060.png" in files
    assert any(f.startswith("events.out.tfevents") for f in files)
    metrics = json.load(open(os.path.join(resumed, "metrics.json")))
    assert metrics["step"] == 60 and metrics["num_modes"] == 8 and "log_likelihood" in metrics


def test_resume_continues_exactly(workdirs):
    _, _, state_resumed, state_straight = workdirs
    assert int(state_resumed.step) == int(state_straight.step) == 60
    for a, b in zip(jax.tree.leaves(state_resumed), jax.tree.leaves(state_straight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_sample_and_eval(workdirs, tmp_path):
    resumed, _, _, _ = workdirs
    out = tmp_path / "s.npz"
    config = "--config=" + str(ROOT / "configs" / "edm_mixture2d.py")
    overrides = ["--config.network.hidden=32", "--config.eval.batch_size=256",
                 "--config.eval.num_samples=256"]
    r = run_cli(config, f"--workdir={resumed}", "--mode=sample", "--num_samples=10",
                f"--output={out}", *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    z = np.load(out)
    assert z["samples"].shape == (10, 2) and z["samples"].dtype == np.float32
    assert z["means"].shape == (8, 2) and z["stds"].shape == (8,)
    np.testing.assert_allclose(z["weights"].sum(), 1.0, rtol=1e-6)
    r = run_cli(config, f"--workdir={resumed}", "--mode=eval", *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.load(open(os.path.join(resumed, "eval_metrics.json")))
    assert metrics["step"] == 60 and metrics["modes_covered"] >= 1


def test_cli_unknown_config_field_names_it(tmp_path):
    r = run_cli("--config=configs/edm_mixture2d.py", f"--workdir={tmp_path}",
                "--config.optim.lrr=0.1")
    assert r.returncode == 2
    assert "unknown config field" in r.stderr and "lrr" in r.stderr


def test_cli_wrong_type_names_the_field(tmp_path):
    r = run_cli("--config=configs/edm_mixture2d.py", f"--workdir={tmp_path}",
                "--config.train.num_steps=abc")
    assert r.returncode != 0 and "config.train.num_steps" in r.stderr


def test_cli_sample_without_checkpoint(tmp_path):
    r = run_cli("--config=configs/edm_mixture2d.py", f"--workdir={tmp_path}", "--mode=sample")
    assert r.returncode != 0 and "no checkpoint found" in r.stderr


def test_model_shape_must_match_data():
    cfg = tiny_config(1)
    cfg.model.shape = (3,)
    with pytest.raises(ValueError, match=r"config.model.shape=\(3,\)"):
        train.validate(cfg)


def test_network_rejects_wrong_image_shape():
    cfg = load_config("edm_digits")
    cfg.model.shape = (8, 8, 1)  # the network is built for 16x16
    cfg.data.resolution = 8
    from jaxdistill.methods import edm

    with pytest.raises(ValueError, match="16"):
        edm.init(cfg, jax.random.key(0))


def test_missing_tfds_data_says_how_to_prepare(tmp_path):
    cfg = load_config("edm_cifar10")
    cfg.data.data_dir = str(tmp_path)
    cfg.train.batch_size = 8
    with pytest.raises(FileNotFoundError, match="tfds build"):
        train.train(cfg, str(tmp_path / "work"))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from jaxdistill import data

    real_batches = data.batches

    def poisoned(*args, **kwargs):
        for step, batch in enumerate(real_batches(*args, **kwargs)):
            if step >= 14:  # the 15th batch onwards is NaN
                batch = dict(batch, x=np.full_like(batch["x"], np.nan))
            yield batch

    monkeypatch.setattr(train.data, "batches", poisoned)
    cfg = tiny_config(40)
    cfg.train.ckpt_every = 10  # saves at 10; the NaN from step 15 is caught at the step-20 log
    with pytest.raises(train.NonFiniteLossError, match="last good checkpoint"):
        train.train(cfg, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
    state, meta = train.load_state(cfg, str(tmp_path))
    assert meta["step"] == 10
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
