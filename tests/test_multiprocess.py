"""Real processes: 2-process jax.distributed training, SIGKILL + resume, SIGTERM save, TensorBoard."""
import glob
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdistill import train

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from equality import assert_updates_close, sgd_regime  # noqa: E402
from test_edm import ROOT  # noqa: E402
from test_run import tiny_config  # noqa: E402

CONFIG = "--config=" + str(ROOT / "configs" / "edm_mixture2d.py")
TINY = ["--config.network.hidden=32", "--config.train.batch_size=64",
        "--config.train.log_every=10", "--config.train.sample_every=100000",
        "--config.train.num_grid_samples=256", "--config.eval.num_samples=256",
        "--config.eval.batch_size=256"]


def cli(args, devices=8, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), CONFIG, *TINY, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def saved_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def wait_for_step(workdir, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(s >= step for s in saved_steps(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no checkpoint >= {step} within {timeout} s")


def params_of(workdir, num_steps):
    state, meta = train.load_state(tiny_config(num_steps), workdir)
    return state, meta


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    return train.train(tiny_config(120), workdir), workdir


def test_sigkill_then_resume_is_bit_identical(straight_run, tmp_path):
    reference, _ = straight_run
    workdir = str(tmp_path)
    proc = cli([f"--workdir={workdir}", "--config.train.num_steps=120",
                "--config.train.ckpt_every=20"])
    wait_for_step(workdir, 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(saved_steps(workdir))
    assert killed_at < 120, "the run finished before it could be killed"
    proc = cli([f"--workdir={workdir}", "--config.train.num_steps=120",
                "--config.train.ckpt_every=20"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from step {killed_at}" in err
    state, meta = params_of(workdir, 120)
    assert meta["step"] == 120
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_then_exits(tmp_path):
    workdir = str(tmp_path)
    proc = cli([f"--workdir={workdir}", "--config.train.num_steps=100000",
                "--config.train.ckpt_every=50"])
    wait_for_step(workdir, 50, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: saved step" in err
    last = max(saved_steps(workdir))
    state, meta = params_of(workdir, 100000)
    assert meta["step"] == last == int(state.step) and last >= 50


def test_tensorboard_events_hold_scalars_and_images(straight_run):
    from tensorboard.backend.event_processing import event_accumulator

    _, workdir = straight_run
    (events,) = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    acc = event_accumulator.EventAccumulator(events, size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert {"loss", "grad_norm", "steps_per_sec", "images_per_sec", "samples"} <= set(tags)
    loss = acc.Tensors("loss")
    assert [e.step for e in loss] == [10 * i for i in range(1, 13)]
    assert all(np.isfinite(float(np.asarray(
        __import__("tensorflow").make_ndarray(e.tensor_proto)))) for e in loss)
    image = acc.Tensors("samples")[-1]
    assert image.step == 120


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    """jax.distributed on localhost: 2 processes x 2 CPU devices train like 1 process x 8."""
    workdir = str(tmp_path / "two")
    port = _free_port()
    # 4 devices against 8: gradients are reassociated, so compare in Adam's SGD regime (no warm-up,
    # so that 6 steps move the params well above rounding); tolerances in equality.py.
    cfg = sgd_regime(tiny_config(6))
    cfg.optim.lr_rampup_images = 0
    optim = [f"--config.optim.{k}={cfg.optim[k]!r}" for k in ("lr", "eps", "lr_rampup_images")]
    common = [f"--workdir={workdir}", "--config.train.num_steps=6", "--config.train.ckpt_every=6",
              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", *optim]
    procs = [cli([*common, f"--process_id={i}"], devices=2) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # Both processes wrote their shards of the checkpoint.
    assert glob.glob(os.path.join(workdir, "checkpoints", "6", "state", "ocdbt.process_1*"))
    state, meta = train.load_state(cfg, workdir)
    assert meta["step"] == 6
    single = train.train(cfg, str(tmp_path / "one"))
    # Both runs started from the state train.train initialises (key split as it does).
    init = jax.device_get(train.build(cfg).init(jax.random.split(jax.random.key(cfg.seed), 3)[0],
                                                None))
    # (checked: 6 small steps stay near it; another key would put the params O(1) away.)
    pairs = list(zip(jax.tree.leaves(jax.device_get(single.net.params)),
                     jax.tree.leaves(init.net.params)))
    moved = np.sqrt(sum(np.sum((np.asarray(p, np.float64) - p0) ** 2) for p, p0 in pairs))
    assert moved < 0.5 * np.sqrt(sum(np.sum(np.asarray(p0, np.float64) ** 2) for _, p0 in pairs))
    assert_updates_close(state, single, init)
