"""Sharded training equals single-device training; FSDP really shards; restores move across meshes."""
import os
import pathlib
import sys

import jax
import numpy as np
import ml_collections as mlc
import pytest

from jaxdistill import checkpoint, data, parallel, train

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from equality import (UPDATE_RTOL, assert_losses_close, assert_updates_close,  # noqa: E402
                      sgd_regime)
from test_edm import load_config  # noqa: E402

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]


def small_config():
    cfg = load_config("edm_mixture2d")
    cfg.network.hidden = 64
    cfg.train.batch_size = 64
    cfg.mesh.min_shard_size = 256  # shard the 64x64 kernels too
    cfg.optim.lr_rampup_images = 64 * 2
    return cfg


def equality_config():
    """small_config with Adam in its SGD regime (tests/equality.py): the updates are linear in
    the gradients, so sharded and single-device states agree at float32 tolerance."""
    return sgd_regime(small_config())


def run_steps(cfg, mesh, num_steps=3):
    """(state, init, losses, grad_norms) after `num_steps` steps; `init` on the host."""
    program = train.build(cfg, mesh)
    state = program.init(jax.random.key(0), None)
    init = jax.device_get(state)  # the step donates its input
    batches = data.batches(cfg.data, batch_size=cfg.train.batch_size, seed=0)
    losses, grad_norms = [], []
    for _ in range(num_steps):
        state, metrics = program.step(state, None, parallel.shard_batch(next(batches), mesh),
                                      jax.random.key(1), None)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return state, init, losses, grad_norms


def mesh_of(shape):
    return parallel.make_mesh(mlc.ConfigDict({"data": shape[0], "fsdp": shape[1]}))


@pytest.fixture(scope="module")
def single_device_run():
    cfg = equality_config()
    mesh = parallel.make_mesh(mlc.ConfigDict({"data": 1, "fsdp": 1}), devices=jax.devices()[:1])
    return run_steps(cfg, mesh)


def test_eight_devices_are_present():
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_step_equals_single_device(shape, single_device_run):
    # Not Adam's params at a fixed tolerance: Adam turns reassociation noise in a tiny gradient
    # into an update change of up to lr (3.4e-6 seen on another machine against atol 2e-6), and
    # is blind to the gradient's scale. In the SGD regime every leaf's change from init is linear
    # in the gradients and agrees to float32 reassociation error (derivation in equality.py).
    ref_state, init, ref_losses, ref_grad_norms = single_device_run
    state, _, losses, grad_norms = run_steps(equality_config(), mesh_of(shape))
    assert_losses_close(losses, ref_losses)
    # Global gradient norms: dominated by the largest gradients, which agree to UPDATE_RTOL.
    np.testing.assert_allclose(grad_norms, ref_grad_norms, rtol=UPDATE_RTOL)
    assert_updates_close(state, ref_state, init)
    if shape[1] > 1:
        kernel = state.net.params["block0_dense"]["kernel"]
        assert "fsdp" in kernel.sharding.spec, kernel.sharding
        # Each device holds 1/fsdp of the kernel, and the Adam moments follow the params.
        assert kernel.addressable_shards[0].data.size == kernel.size // shape[1]
        moments = [x for x in jax.tree.leaves(state.net.opt_state) if x.shape == kernel.shape]
        assert moments and all(m.sharding.spec == kernel.sharding.spec for m in moments)


def test_fsdp_rule():
    assert parallel.leaf_spec((3, 3, 128, 256), 4, 1) == jax.sharding.PartitionSpec(
        None, None, None, "fsdp")
    assert parallel.leaf_spec((6, 5), 4, 1) == jax.sharding.PartitionSpec()      # nothing divides
    assert parallel.leaf_spec((1024,), 4, 2**14) == jax.sharding.PartitionSpec()  # small: replicate
    assert parallel.leaf_spec((256, 512), 1, 1) == jax.sharding.PartitionSpec()   # fsdp = 1


def test_bad_mesh_is_a_clear_error():
    with pytest.raises(ValueError, match="config.mesh"):
        mesh_of((3, 1))
    with pytest.raises(ValueError, match="batch_size"):
        parallel.check_batch_size(12, mesh_of((8, 1)))


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    cfg = small_config()
    cfg.mesh.update(data=8, fsdp=1)
    cfg.train.update(num_steps=2, log_every=1, ckpt_every=2, sample_every=100,
                     num_grid_samples=16)
    cfg.eval.update(num_samples=64, batch_size=64)
    saved = train.train(cfg, str(tmp_path))
    cfg.mesh.update(data=2, fsdp=4)
    restored, meta = train.load_state(cfg, str(tmp_path))
    assert meta["step"] == 2
    kernel = restored.net.params["block0_dense"]["kernel"]
    assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4} and "fsdp" in kernel.sharding.spec
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_corrupt_latest_checkpoint_falls_back_without_deleting(tmp_path):
    cfg = small_config()
    cfg.train.update(num_steps=4, log_every=2, ckpt_every=2, sample_every=100,
                     num_grid_samples=16)
    cfg.eval.update(num_samples=64, batch_size=64)
    train.train(cfg, str(tmp_path))
    ckpt = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["2", "4"]
    # Truncate every data file of the latest step (a half-written save).
    for f in (ckpt / "4" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    state, meta = train.load_state(cfg, str(tmp_path))
    assert meta["step"] == 2 and int(state.step) == 2
    names = sorted(os.listdir(ckpt))  # nothing was deleted; the damaged step was set aside
    assert names[0] == "2" and names[1].startswith("4.unreadable-") and len(names) == 2
    # Training resumes from the good step 2 and saves steps 4 and 6 again.
    cfg.train.num_steps = 6
    state = train.train(cfg, str(tmp_path))
    assert int(state.step) == 6
    assert {"2", "4", "6"} <= set(os.listdir(ckpt))


def test_best_checkpoint_is_kept_beside_the_latest(tmp_path):
    mngr = checkpoint.manager(str(tmp_path), keep=1, best_metric="sliced_wasserstein")
    state = {"w": np.zeros(3, np.float32)}
    for step, sw in [(1, 0.5), (2, 0.1), (3, 0.4), (4, 0.3)]:
        checkpoint.save(mngr, step, state, {"step": step}, {"sliced_wasserstein": sw})
        mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 4]  # best (2) + latest (4)
    mngr.close()
