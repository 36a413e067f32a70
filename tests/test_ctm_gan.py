"""CTM's GAN phase: alternating generator / discriminator steps on the teacher's features."""
import pathlib
import sys

import jax
import numpy as np
import pytest

from jaxdistill import data, parallel, teacher as teacher_lib, train

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_edm import load_config  # noqa: E402


@pytest.fixture(scope="module")
def mlp_teacher(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("edm2d"))
    cfg = load_config("edm_mixture2d")
    cfg.network.hidden = 32
    cfg.train.update(batch_size=64, num_steps=20, log_every=10, ckpt_every=20, sample_every=20,
                     num_grid_samples=64)
    cfg.eval.update(num_samples=64, batch_size=64)
    train.train(cfg, workdir)
    return workdir, dict(cfg.network)


def gan_config(teacher, gan_start_step=0):
    workdir, teacher_net = teacher
    cfg = load_config("ctm_mixture2d")
    cfg.teacher.kind = "checkpoint"
    cfg.teacher.checkpoint = workdir
    cfg.teacher.network = teacher_net
    cfg.network.hidden = 32
    cfg.train.batch_size = 64
    cfg.method.update(gan_weight=1.0, gan_start_step=gan_start_step, num_heun_step=4)
    return cfg


def run(cfg, num_steps, batch_size=64):
    tch, frozen = teacher_lib.load(cfg), train.frozen_weights(cfg)
    program = train.build(cfg, teacher=tch, frozen=frozen)
    tch, frozen = train.place_teacher(program, tch), train.place_frozen(program, frozen)
    state = program.init(jax.random.key(0), tch)
    batches = data.batches(cfg.data, batch_size=batch_size, seed=0)
    history = [(jax.device_get(state), None)]
    for _ in range(num_steps):
        state, metrics = program.step(state, tch, parallel.shard_batch(next(batches),
                                                                       program.mesh),
                                      jax.random.key(1), frozen)
        history.append((jax.device_get(state), jax.device_get(metrics)))
    return history


def changed(a, b):
    return any(np.any(np.asarray(x) != np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def alternating(mlp_teacher):
    """(state, metrics) before and after each of 4 GAN steps (G, D, G, D)."""
    return run(gan_config(mlp_teacher), 4)


def test_generator_and_discriminator_alternate(alternating):
    history = alternating
    for i in range(1, 5):
        (before, _), (after, metrics) = history[i - 1], history[i]
        if (i - 1) % 2 == 0:  # even step: generator
            assert changed(before.student.params, after.student.params)
            assert not changed(before.disc.params, after.disc.params)
            assert 0.01 <= metrics["gan_lambda"] <= 10.0 and np.isfinite(metrics["gan_g_loss"])
        else:                 # odd step: discriminator
            assert changed(before.disc.params, after.disc.params)
            assert not changed(before.student, after.student)  # params, EMAs, optimizer
            assert np.isfinite(metrics["d_loss"]) and metrics["d_loss"] > 0
        # The frozen random projections never change.
        assert not changed(before.disc.consts, after.disc.consts)


def test_every_step_reports_both_phases_from_their_last_update(alternating):
    """A logged step reports both phases (the trainer fetches metrics only every log_every-th
    step, which with an even log_every is always a D step): the generator's metrics from its last
    step, the discriminator's from its last (0 with d_last_step 0 before it ran), and the step
    numbers (as logged) each ran at."""
    metrics = [m for _, m in alternating[1:]]           # logged steps 1..4: G, D, G, D
    # Step 2 ran the discriminator only: it reports step 1's generator losses, not 0.
    assert float(metrics[1]["ctm_loss"]) == float(metrics[0]["ctm_loss"]) != 0.0
    gen = ("loss", "ctm_loss", "dsm_loss", "gan_g_loss", "gan_lambda", "grad_norm")
    for i, m in enumerate(metrics):
        g, d = (i // 2) * 2, (i - 1) // 2 * 2 + 1     # 0-based index of the last G / D step
        assert int(m["gen_last_step"]) == g + 1
        for k in gen:
            assert float(m[k]) == float(metrics[g][k]) and float(m[k]) != 0.0, (i, k)
        if i == 0:
            assert int(m["disc_last_step"]) == 0 and float(m["d_loss"]) == 0.0  # not run yet
        else:
            assert int(m["disc_last_step"]) == d + 1
            assert float(m["d_loss"]) == float(metrics[d]["d_loss"]) > 0
            assert float(m["d_grad_norm"]) == float(metrics[d]["d_grad_norm"]) > 0
    assert float(metrics[3]["ctm_loss"]) != float(metrics[1]["ctm_loss"])  # G step 3 is fresh


def test_gan_switches_on_at_its_start_step(mlp_teacher):
    history = run(gan_config(mlp_teacher, gan_start_step=2), 4)
    metrics = [m for _, m in history[1:]]  # metrics of steps 0..3
    assert metrics[0]["gan_lambda"] == 0 and metrics[1]["gan_lambda"] == 0  # before the start
    assert metrics[2]["gan_lambda"] >= 0.01                                   # step 2: G with GAN
    assert not changed(history[0][0].disc.params, history[3][0].disc.params)  # steps 0-2: no D
    assert changed(history[3][0].disc.params, history[4][0].disc.params)      # step 3: D


def test_ctm_dsm_state_has_the_discriminator(mlp_teacher):
    on, off = gan_config(mlp_teacher), gan_config(mlp_teacher)
    off.method.gan_weight = 0.0
    tch = teacher_lib.load(on)
    shape = lambda c: jax.eval_shape(lambda k: train.methods.get("ctm").init(c, k, tch),  # noqa
                                     jax.random.key(0))
    assert jax.tree.structure(shape(on)) == jax.tree.structure(shape(off))


@pytest.mark.slow  # ~100 s on a busy 2-core CPU (compiling both backbones' G and D steps)
def test_gan_on_pretrained_backbones_trains_heads_only(tmp_path):
    """CTM's official backbone pair (tiny DeiT + tiny EfficientNet-lite, weight files written here
    from the torch references of test_backbones) on the 8x8 image mixture with its exact teacher:
    one discriminator per backbone; the generator step moves the student, the discriminator step
    moves both heads; the frozen parts never change and the pretrained weights are not in the
    state (so in no optimizer)."""
    import test_backbones as tb

    tr = tb.torch_refs()
    tr.torch.manual_seed(0)
    deit_pth, _ = tr.save(tr.TDeiT(), tmp_path, "deit")
    _, effnet_npz = tr.save(tr.TEffNet(), tmp_path, "effnet")
    cfg = load_config("ctm_image_mixture")
    cfg.network.update(hidden=32, depth=2)
    cfg.method.update(tb.tiny_method_config(deit_pth, effnet_npz))
    cfg.method.update(gan_weight=1.0, num_heun_step=4, eval_emas=(0.999,))
    cfg.train.batch_size = 8
    history = run(cfg, 2, batch_size=8)
    (s0, _), (s1, m1), (s2, m2) = history
    assert set(s0.disc.params) == {"deit", "efficientnet"}
    assert changed(s0.student.params, s1.student.params)
    assert not changed(s0.disc.params, s1.disc.params)
    assert 0.01 <= m1["gan_lambda"] <= 10.0 and np.isfinite(m1["gan_g_loss"])
    assert changed(s1.disc.params["deit"], s2.disc.params["deit"])
    assert changed(s1.disc.params["efficientnet"], s2.disc.params["efficientnet"])
    assert not changed(s1.student.params, s2.student.params) and np.isfinite(m2["d_loss"])
    for a, b in ((s0, s1), (s1, s2)):
        assert not changed(a.disc.consts, b.disc.consts)   # projections + DeiT readout convs
    assert s0.disc.consts["deit"]["backbone"]["postprocess"]
    pos_embed_shape = (1, (tb.D_SIZE // tb.D_PATCH) ** 2 + 2, tb.D_WIDTH)
    assert all(leaf.shape != pos_embed_shape for leaf in jax.tree.leaves(s0))


def test_gan_backbone_config_errors():
    """Bad backbone settings fail when the frozen weights are read or the step is built, naming
    the field; no compilation."""
    from jaxdistill.methods import ctm

    cfg = load_config("ctm_image_mixture")
    cfg.method.update(gan_weight=1.0, gan_backbones=("deit", "efficientnet"))
    with pytest.raises(FileNotFoundError, match="config.method.deit.weights"):
        ctm.frozen_weights(cfg)
    cfg.method.gan_backbones = ("efficientnet",)
    with pytest.raises(FileNotFoundError, match="config.method.efficientnet.weights"):
        ctm.frozen_weights(cfg)
    for bad in (("vgg",), (), ("deit", "deit")):
        cfg.method.gan_backbones = bad
        with pytest.raises(ValueError, match="config.method.gan_backbones"):
            ctm.train_step(cfg)
    vectors = load_config("ctm_mixture2d")
    vectors.method.gan_backbones = ("deit",)
    with pytest.raises(ValueError, match="need images"):
        ctm.gan_backbone_names(vectors)
    cfg.method.d_optimizer = "sgd"
    with pytest.raises(ValueError, match="config.method.d_optimizer"):
        ctm.make_disc_optimizer(cfg)
