"""Sampling options through the public `Method.sample` (issue 12 part 11): classifier-free
guidance (`config.sample.guidance_scale`) and sampling from a chosen EMA (`config.sample.ema_index`,
EDM's EMA instead of the raw params).

Only `jaxdistill.methods.get(name)` (init / sample), `jaxdistill.teacher.load`, config fields and
the state's trained network (EDM's `net`, CTM's `student`: online `params` and `emas`) are used
(plus the MLP's label-embedding kernel, found by its name and shape, for the null-label model).
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import methods, teacher as teacher_lib

sys.path.insert(0, str(pathlib.Path(__file__).parent))
try:  # issue 12 moves the shared helper into conftest.py
    from conftest import load_config  # noqa: E402
except ImportError:
    from test_edm import load_config  # noqa: E402

N = 64
LABELS = jnp.arange(N) % 8
OTHER_LABELS = (LABELS + 3) % 8
KEY = jax.random.key(5)

_SAMPLERS = {}


def sample(cfg, state, labels=LABELS, key=KEY):
    """`Method.sample` of `cfg`, jitted once per config content."""
    name = cfg.to_json_best_effort()
    if name not in _SAMPLERS:
        method = methods.get(cfg.method.name)
        _SAMPLERS[name] = jax.jit(lambda s, lab, k: method.sample(cfg, s, k, N, labels=lab)[0])
    return np.asarray(_SAMPLERS[name](state, labels, key))


def perturbed(tree, seed, scale=0.3):
    """`tree` plus N(0, scale^2) noise on every leaf: a network whose every weight (the label
    embedding included) is well away from its init (zero-initialised layers become live)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance


def edm_config(**sample_fields):
    cfg = load_config("edm_mixture2d")
    cfg.model.label_dim = 8
    cfg.network.update(hidden=16, embed=16, label_dim=8)
    cfg.sample.update(sample_fields)
    return cfg


@pytest.fixture(scope="module")
def edm_state():
    """A conditional EDM state whose EMA (what EDM samples from) is a random, live network."""
    cfg = edm_config()
    state = methods.get("edm").init(cfg, jax.random.key(0), None)
    assert len(state.net.emas) == 1
    return with_net(state, emas={k: perturbed(v, 1) for k, v in state.net.emas.items()})


def with_net(state, **fields):
    """EDM's state with fields of its network (`params`, `emas`) replaced."""
    return state.replace(net=state.net.replace(**fields))


def null_label_model(state, label_dim=8, hidden=16):
    """The same network with its label embedding kernel zeroed: the embedding of every one-hot
    label is then its bias, exactly the embedding of the zero (null) label vector in the original
    network, so this model's conditional output is the original's unconditional one."""
    def zero_label_kernel(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        hits = [i for i, (path, x) in enumerate(flat)
                if "label" in jax.tree_util.keystr(path) and x.shape == (label_dim, hidden)]
        assert len(hits) == 1, [jax.tree_util.keystr(p) for p, _ in flat]
        leaves = [jnp.zeros_like(x) if i in hits else x for i, (_, x) in enumerate(flat)]
        return jax.tree.unflatten(treedef, leaves)

    return with_net(state, params=zero_label_kernel(state.net.params),
                    emas={k: zero_label_kernel(v) for k, v in state.net.emas.items()})


def test_guidance_scale_zero_is_the_unconditional_model(edm_state):
    """18-step Heun: scale 0 ignores the labels (bit for bit the same samples for two label sets)
    and equals the plain conditional sampler of the null-label model; at scale 1 (plain
    conditional) and scale 2 the labels change every sample."""
    cfg0 = edm_config(guidance_scale=0.0)
    x0 = sample(cfg0, edm_state)
    np.testing.assert_array_equal(x0, sample(cfg0, edm_state, OTHER_LABELS))
    null = null_label_model(edm_state)
    np.testing.assert_allclose(x0, sample(edm_config(), null), rtol=1e-5, atol=1e-5)
    for scale in (1.0, 2.0):
        cfg = edm_config(guidance_scale=scale)
        a, b = sample(cfg, edm_state), sample(cfg, edm_state, OTHER_LABELS)
        assert np.all(np.abs(a - b).max(axis=1) > 1e-3), scale
    # Guiding the null-label model (D_cond == D_uncond) at any scale is the model itself.
    np.testing.assert_allclose(sample(edm_config(guidance_scale=2.0), null),
                               sample(edm_config(), null), rtol=1e-5, atol=1e-5)


def test_guidance_scale_w_is_uncond_plus_w_times_the_difference(edm_state):
    """One Euler step from sigma_max to 0 returns the (guided) denoiser's output, so the sample
    at scale w equals uncond + w (cond - uncond) built by hand from the scale-0 and the plain
    conditional (scale 1) samplers' outputs, for w = 2.5 and w = -0.5. The rounding of
    x + (0 - 80) (x - D) / 80 with |x| ~ 80-250 is a few 1e-5."""
    x_uncond = sample(edm_config(sampler="euler", num_steps=1, guidance_scale=0.0), edm_state)
    x_cond = sample(edm_config(sampler="euler", num_steps=1), edm_state)
    assert np.abs(x_cond - x_uncond).max() > 0.05
    for w in (2.5, -0.5):
        x_w = sample(edm_config(sampler="euler", num_steps=1, guidance_scale=w), edm_state)
        np.testing.assert_allclose(x_w, x_uncond + w * (x_cond - x_uncond), rtol=0, atol=2e-4)


# ------------------------------------------------------------------------------------------------
# Which weights are sampled


def test_edm_samples_from_its_ema_not_the_raw_params(edm_state):
    """EDM evaluates its EMA: replacing the online params changes nothing, replacing the EMA
    does."""
    cfg = edm_config(sampler="euler", num_steps=2)
    x = sample(cfg, edm_state)
    garbage = with_net(edm_state, params=perturbed(edm_state.net.params, 7, scale=5.0))
    np.testing.assert_array_equal(sample(cfg, garbage), x)
    other = with_net(edm_state, emas={k: perturbed(v, 8) for k, v in edm_state.net.emas.items()})
    assert np.abs(sample(cfg, other) - x).max() > 1e-3


def ctm_config(**sample_fields):
    cfg = load_config("ctm_mixture2d")
    cfg.method.eval_emas = (0.999, 0.9999)
    cfg.network.update(hidden=16, embed=16)
    cfg.sample.update(sample_fields)
    return cfg


# The names of CTM's evaluation EMAs in the state (ctm.py's CTMState layout: the student's emas
# are {target EMA, 'ema0', 'ema1', ...}, 'ema<i>' for config.method.eval_emas[i]).
EVAL_EMAS = ("ema0", "ema1")


def with_student(state, **fields):
    return state.replace(student=state.student.replace(**fields))


@pytest.fixture(scope="module")
def ctm_state():
    """A CTM state whose every set of weights is a different live network: the online params, the
    target EMA and the two evaluation EMAs."""
    cfg = ctm_config()
    state = methods.get("ctm").init(cfg, jax.random.key(0), teacher_lib.load(cfg))
    emas = state.student.emas
    assert set(EVAL_EMAS) < set(emas), sorted(emas)   # + the target EMA
    return with_student(state, params=perturbed(state.student.params, 10),
                        emas={k: perturbed(v, 11 + i) for i, (k, v) in
                              enumerate(sorted(emas.items()))})


@pytest.mark.parametrize("sampler", [dict(sampler="gamma", num_steps=1),
                                     dict(sampler="euler", num_steps=2)],
                         ids=["gamma_1_step", "euler_2_steps"])
def test_ctm_ema_index_picks_that_ema(ctm_state, sampler):
    """ema_index = i samples exactly what ema_index = 0 gives with evaluation EMA 0 replaced by
    EMA i; the two EMAs give different samples, and neither the online params nor any other EMA
    (the target EMA included) is used: replacing all of them with garbage changes nothing."""
    xs = []
    emas = ctm_state.student.emas
    for i in (0, 1):
        x = sample(ctm_config(ema_index=i, **sampler), ctm_state)
        moved = with_student(ctm_state, emas=dict(emas, ema0=emas[EVAL_EMAS[i]]))
        np.testing.assert_array_equal(x, sample(ctm_config(ema_index=0, **sampler), moved))
        garbage = with_student(
            ctm_state, params=perturbed(ctm_state.student.params, 13, scale=5.0),
            emas={k: v if k == EVAL_EMAS[i] else perturbed(v, 14, scale=5.0)
                  for k, v in emas.items()})
        np.testing.assert_array_equal(x, sample(ctm_config(ema_index=i, **sampler), garbage))
        xs.append(x)
    assert np.abs(xs[0] - xs[1]).max() > 1e-3


def test_ctm_ema_index_out_of_range_is_a_config_error():
    """An ema_index with no such evaluation EMA fails at start, naming the field."""
    from jaxdistill import train

    cfg = ctm_config(ema_index=2)
    with pytest.raises(ValueError, match=r"config\.sample\.ema_index=2"):
        train.validate(cfg)
    train.validate(ctm_config(ema_index=1))


def test_ctm_gamma_sampling_refuses_guidance():
    """Gamma-sampling has no CFG: a guidance scale with it fails at start, naming the field."""
    from jaxdistill import train

    cfg = ctm_config(ema_index=0)
    cfg.sample.update(sampler="gamma", guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"config\.sample\.guidance_scale=2\.0: gamma-sampling"):
        train.validate(cfg)
    cfg.sample.sampler = "heun"  # a diffusion sampler of the student's own denoiser takes it
    train.validate(cfg)
