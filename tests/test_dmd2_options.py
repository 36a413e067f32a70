"""DMD2's options through the public surface (issue 12 part 11): `method.real_guidance_scale`
(classifier-free guidance on the real / teacher score) and `method.backward_simulation=False`.

Only `jaxdistill.methods.get('dmd2')` (init / train_step), `jaxdistill.teacher` (load,
from_mixture: the analytic teacher, passed to the step as an argument) and the state's generator
and fake-score params (the accessors `generator` / `trainable` below) are used.
"""
import pathlib
import sys

import jax
import numpy as np
import pytest

from jaxdistill import data, methods, teacher as teacher_lib
from jaxdistill.data import mixtures

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from equality import assert_updates_close  # noqa: E402

try:  # issue 12 moves the shared helper into conftest.py
    from conftest import load_config  # noqa: E402
except ImportError:
    from test_edm import load_config  # noqa: E402

# Adam's eps for an SGD-like first update: lr * g / (|g| + EPS) * EPS = lr * g (1 - |g| / EPS),
# linear in the gradient to ~1e-6 for these O(1) gradients (tests/equality.py uses 1e3; the
# affine check below wants the update linear to well under its 1e-4 tolerance).
EPS = 1e6


def tiny(**method):
    """dmd2_mixture2d narrowed (MLP width 16, batch 64), no GAN (its terms never see the
    teacher), the generator updated every step, AdamW linear in the gradient (SGD regime with
    eps 1e6, no clipping, no warm-up)."""
    cfg = load_config("dmd2_mixture2d")
    cfg.network.update(hidden=16, embed=16)
    cfg.train.batch_size = 64
    cfg.method.update(gen_gan_weight=0.0, guidance_gan_weight=0.0, dfake_gen_update_ratio=1)
    cfg.method.update(method)
    cfg.optim.update(lr_rampup_images=0, grad_clip=0.0, eps=EPS, lr=cfg.optim.lr * EPS,
                     weight_decay=cfg.optim.weight_decay / EPS)
    cfg.method.guidance_lr *= EPS
    return cfg


_STEPS = {}


def step_fn(cfg):
    key = cfg.to_json_best_effort()
    if key not in _STEPS:
        _STEPS[key] = jax.jit(methods.get(cfg.method.name).train_step(cfg))
    return _STEPS[key]


def delta(after, before):
    """Every float leaf's change, float64."""
    return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                        jax.device_get(after), jax.device_get(before))


def max_abs(tree):
    return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------
# real_guidance_scale


def conditional(scale, **method):
    cfg = tiny(real_guidance_scale=scale, tsm_steps=1, **method)
    cfg.model.label_dim = 8      # the ring's 8 modes are its classes
    cfg.network.label_dim = 8
    return cfg


def padded_and_blind(mix):
    """Two mixtures of the same structure (8 classes x 8 components, so one compiled step serves
    both): `ring`, the shipped ring (class c = its mode c, the 7 other components of class c are
    copies of it with weight 0), and `blind`, whose every class holds a full copy of the ring
    (weights / 8).

    `blind`'s class-conditional denoiser is, for every class, the ring's unconditional denoiser,
    which is also its own unconditional one. So classifier-free guidance of `blind` is the identity
    for every scale, and its plain conditional output is what guidance scale 0 of `ring` must
    give (the zero label vector as the null class)."""
    k = mix.num_components
    means, stds, weights = (np.asarray(a) for a in (mix.means, mix.stds, mix.weights))
    classes = tuple(c for c in range(k) for _ in range(k))
    first = np.arange(k * k) % k == 0
    ring = teacher_lib.from_mixture(mixtures.GaussianMixture(
        means=np.repeat(means, k, axis=0), stds=np.repeat(stds, k),
        weights=np.where(first, np.repeat(weights, k), 0.0).astype(np.float32), classes=classes))
    blind = teacher_lib.from_mixture(mixtures.GaussianMixture(
        means=np.tile(means, (k, 1)), stds=np.tile(stds, k),
        weights=(np.tile(weights, k) / k).astype(np.float32), classes=classes))
    return ring, blind


@pytest.fixture(scope="module")
def guidance_runs():
    """One TSM step from a common init, then one DM step from a common post-TSM state, for the
    ring (8 one-mode classes) at scales 0, 1, 3 and its label-blind copy at 1 and 3."""
    cfg = conditional(1.0)
    ring, blind = padded_and_blind(teacher_lib.load(cfg).params)
    it = data.batches(cfg.data, batch_size=cfg.train.batch_size, seed=0)
    batches = [next(it), next(it)]
    init = methods.get("dmd2").init(cfg, jax.random.key(0), ring)
    runs = {("ring", 0.0): ring, ("ring", 1.0): ring, ("ring", 3.0): ring,
            ("blind", 1.0): blind, ("blind", 3.0): blind}
    tsm = {key: step_fn(conditional(key[1]))(init, teacher, batches[0], jax.random.key(1))
           for key, teacher in runs.items()}
    common = tsm[("blind", 1.0)][0]          # the state the DM steps start from
    dm = {key: step_fn(conditional(key[1]))(common, teacher, batches[1], jax.random.key(1))
          for key, teacher in runs.items()}
    for key in runs:   # both steps updated the generator
        assert float(tsm[key][1]["gen_updated"]) == float(dm[key][1]["gen_updated"]) == 1.0
    return (jax.device_get(init), {k: jax.device_get(v[0]) for k, v in tsm.items()},
            jax.device_get(common), {k: jax.device_get(v[0]) for k, v in dm.items()})


def generator(state):
    return {"params": state.generator.params}


def trainable(state):
    """The generator's and the fake score's params (the GAN head is off here)."""
    return {"params": state.generator.params, "fake_params": state.guide.params["fake"]}


def test_real_guidance_scale_zero_is_the_unconditional_teacher(guidance_runs):
    """Scale 0 (D_uncond + 0 (D_cond - D_uncond)) trains exactly as the plain conditional teacher
    whose every class is the unconditional ring: in the TSM step (generator and fake score
    regress the real denoiser) and in the DM step (the generator's distribution-matching
    gradient). Scale 1 (the plain conditional ring) differs from both by O(1)."""
    init, tsm, common, dm = guidance_runs
    assert_updates_close(trainable(tsm[("ring", 0.0)]), trainable(tsm[("blind", 1.0)]),
                         trainable(init))
    assert_updates_close(generator(dm[("ring", 0.0)]), generator(dm[("blind", 1.0)]),
                         generator(common))
    for runs, start in ((tsm, init), (dm, common)):
        d0 = delta(generator(runs[("ring", 0.0)]), generator(start))
        d1 = delta(generator(runs[("ring", 1.0)]), generator(start))
        assert max_abs(jax.tree.map(np.subtract, d1, d0)) > 0.1 * max_abs(d1)


def test_real_guidance_is_affine_in_the_scale(guidance_runs):
    """TSM regresses the guided real denoiser D_u + w (D_c - D_u): its gradient, and so (AdamW
    linear in the gradient here) the first update, is affine in w with the w = 1 end the plain
    conditional teacher: update(3) = 3 update(1) - 2 update(0), for generator and fake score.
    A formula such as D_c + w (D_c - D_u), w D_c, or a scale applied twice breaks it."""
    init, tsm, _, _ = guidance_runs
    d = {w: delta(trainable(tsm[("ring", w)]), trainable(init)) for w in (0.0, 1.0, 3.0)}
    expected = jax.tree.map(lambda a, b: 3 * a - 2 * b, d[1.0], d[0.0])
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(d[3.0]),
                                 jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max_abs(want) + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))


def test_real_guidance_of_a_label_blind_teacher_is_a_no_op(guidance_runs):
    """When D_cond == D_uncond (the label-blind ring) every scale gives the teacher itself: the
    guided output's coefficients sum to 1 (checked at w = 3 in the TSM and the DM step)."""
    init, tsm, common, dm = guidance_runs
    assert_updates_close(trainable(tsm[("blind", 3.0)]), trainable(tsm[("blind", 1.0)]),
                         trainable(init))
    assert_updates_close(generator(dm[("blind", 3.0)]), generator(dm[("blind", 1.0)]),
                         generator(common))


# ------------------------------------------------------------------------------------------------
# backward_simulation


@pytest.mark.parametrize("backward_simulation", [True, False])
def test_backward_simulation_decides_whether_the_step_reads_real_data(backward_simulation):
    """A 2-step generator (gen_steps=2), DM only (no TSM, GAN or regression), one generator +
    fake-score step on a batch and on the same batch moved by +0.7.

    backward_simulation=True: the generator's training input is its own rollout from pure noise
    (k of its own steps, re-noised), so nothing in the step reads the real data: the two states
    are bit-identical. backward_simulation=False: the input is the real data noised to the k-th
    generator sigma, so the generator and the fake score (trained on the generator's outputs
    from those inputs) both change with the batch.

    What this cannot see through the public API: which k was drawn and the exact noised input
    (the random streams are internal); a rollout that also read the batch would fail the True
    case, an input that ignored the batch the False case."""
    cfg = tiny(gen_steps=2, backward_simulation=backward_simulation, tsm_steps=0)
    teacher = teacher_lib.load(cfg)
    batch = next(data.batches(cfg.data, batch_size=cfg.train.batch_size, seed=0))
    moved = dict(batch, x=np.asarray(batch["x"]) + np.float32(0.7))
    init = methods.get("dmd2").init(cfg, jax.random.key(0), teacher)
    step = step_fn(cfg)
    a, metrics = jax.device_get(step(init, teacher, batch, jax.random.key(1)))
    b, _ = jax.device_get(step(init, teacher, moved, jax.random.key(1)))
    assert float(metrics["gen_updated"]) == 1.0
    for name, field in trainable(a).items():
        same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(field),
                                                        jax.tree.leaves(trainable(b)[name])))
        assert same == backward_simulation, name
    assert max_abs(delta(generator(a), generator(init))) > 0   # the generator did train
