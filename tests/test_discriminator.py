"""DiffAugment (jaxdistill.augment) and the projected discriminator + GAN losses
(jaxdistill.networks.discriminator)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdistill.augment import (apply_diff_augment, cutout_mask, diff_augment,
                                sample_diff_augment_params)
from jaxdistill.networks.discriminator import (ProjectedDiscriminator, adaptive_weight,
                                               hinge_d_loss, hinge_g_loss)

_augment = jax.jit(apply_diff_augment, static_argnames=("policy", "cutout_ratio"))
_sample = jax.jit(sample_diff_augment_params, static_argnums=(1, 2, 3))

H = W = 16  # shift = int(16 * 0.125 + 0.5) = 2, cutout = int(16 * 0.2 + 0.5) = 3
N = 8       # one batch size for the random draws -> one compilation of the sampler


# ------------------------------------------------------------------------------------------------
# DiffAugment


def _params(n, **over):
    p = {"brightness": jnp.zeros(n), "saturation": jnp.ones(n), "contrast": jnp.ones(n),
         "translation_x": jnp.zeros(n, jnp.int32), "translation_y": jnp.zeros(n, jnp.int32),
         "offset_x": jnp.zeros(n, jnp.int32), "offset_y": jnp.zeros(n, jnp.int32)}
    p.update({k: jnp.asarray(v) for k, v in over.items()})
    return p


def test_param_ranges_follow_official():
    p = jax.tree.map(np.asarray, _sample(jax.random.PRNGKey(0), 2000, H, W))
    assert -0.5 <= p["brightness"].min() < -0.45 and 0.45 < p["brightness"].max() <= 0.5
    assert 0.0 <= p["saturation"].min() < 0.05 and 1.95 < p["saturation"].max() <= 2.0
    assert 0.5 <= p["contrast"].min() < 0.55 and 1.45 < p["contrast"].max() <= 1.5
    for k in ("translation_x", "translation_y"):
        assert set(np.unique(p[k])) == {-2, -1, 0, 1, 2}
    # cutout size 3 is odd -> offsets in [0, H + (1 - 3 % 2)) = [0, 16)
    for k in ("offset_x", "offset_y"):
        assert p[k].min() == 0 and p[k].max() == H - 1


def test_translation_moves_single_pixel_by_drawn_shift():
    n, r, c = N, 7, 9
    x = jnp.zeros((n, H, W, 3)).at[:, r, c, :].set(1.0)
    p = _sample(jax.random.PRNGKey(3), n, H, W)
    tx, ty = np.asarray(p["translation_x"]), np.asarray(p["translation_y"])
    assert np.any(tx != 0) and np.any(ty != 0)            # the draw is not trivial
    y = np.asarray(_augment(x, p, policy="translation"))
    assert y.shape == x.shape
    for i in range(n):
        expected = np.zeros((H, W, 3))
        expected[r - tx[i], c - ty[i], :] = 1.0             # content moves by (-tx, -ty)
        np.testing.assert_array_equal(y[i], expected)


def test_translation_zero_pads_and_hand_shifts():
    x = jnp.zeros((2, H, W, 1)).at[:, 1, 1, :].set(1.0)
    p = _params(2, translation_x=[3, -2], translation_y=[0, -3])
    y = np.asarray(_augment(x, p, policy="translation"))
    assert y[0].sum() == 0.0                                 # source row 1 + ... shifted out
    assert y[1, 3, 4, 0] == 1.0 and y[1].sum() == 1.0
    # a full image shifted by +1 row: last row comes from outside -> zero padding
    ones = jnp.ones((1, H, W, 1))
    z = np.asarray(_augment(ones, _params(1, translation_x=[1]), policy="translation"))
    assert np.all(z[0, :-1] == 1.0) and np.all(z[0, -1] == 0.0)


def test_cutout_zeroes_exact_square():
    x = jnp.ones((3, H, W, 2))
    # centre (8, 5): rows [7, 10), cols [4, 7) -> 9 pixels; corner (0, 15): rows [-1, 2) ∩ -> 2x2;
    p = _params(3, offset_x=[8, 0, 15], offset_y=[5, 15, 0])
    y = np.asarray(_augment(x, p, policy="cutout"))
    exp = np.ones((3, H, W, 2))
    exp[0, 7:10, 4:7] = 0
    exp[1, 0:2, 14:16] = 0
    exp[2, 14:16, 0:2] = 0
    np.testing.assert_array_equal(y, exp)
    assert (y[0, ..., 0] == 0).sum() == 9
    # random draws: the zero set is the clipped square predicted from the drawn offsets
    p = _sample(jax.random.PRNGKey(5), N, H, W)
    y = np.asarray(_augment(jnp.ones((N, H, W, 1)), p, policy="cutout"))
    for i in range(N):
        lo_x, lo_y = int(p["offset_x"][i]) - 1, int(p["offset_y"][i]) - 1
        e = np.ones((H, W))
        e[max(lo_x, 0):lo_x + 3, max(lo_y, 0):lo_y + 3] = 0
        np.testing.assert_array_equal(y[i, ..., 0], e)
    np.testing.assert_array_equal(np.asarray(cutout_mask(p["offset_x"], p["offset_y"], H, W))[..., 0],
                                  y[..., 0])


def test_color_ops():
    n = N
    gray = jnp.full((n, H, W, 3), 0.2)
    p = _sample(jax.random.PRNGKey(7), n, H, W)
    y = np.asarray(_augment(gray, p, policy="color"))
    # saturation and contrast leave a constant image alone; brightness shifts every pixel equally
    expected = 0.2 + np.asarray(p["brightness"])[:, None, None, None] * np.ones((n, H, W, 3))
    np.testing.assert_allclose(y, expected, atol=1e-6)
    assert np.ptp(np.asarray(p["brightness"])) > 0.0
    # hand parameters on a non-gray image
    x = jax.random.uniform(jax.random.PRNGKey(8), (2, H, W, 3), minval=-1, maxval=1)
    sat = np.asarray(_augment(x, _params(2, saturation=[0.0, 2.0]), policy="color"))
    m = np.asarray(x).mean(-1, keepdims=True)
    np.testing.assert_allclose(sat[0], np.broadcast_to(m[0], (H, W, 3)), atol=1e-6)   # grayscale
    np.testing.assert_allclose(sat[1], 2 * (np.asarray(x[1]) - m[1]) + m[1], atol=1e-5)
    con = np.asarray(_augment(x, _params(2, contrast=[0.5, 1.5]), policy="color"))
    mi = np.asarray(x).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(con, (np.asarray(x) - mi) * np.array([0.5, 1.5])[:, None, None, None] + mi,
                               atol=1e-5)


def test_keys_jit_and_gradients():
    x = jax.random.uniform(jax.random.PRNGKey(1), (N, H, W, 3), minval=-1, maxval=1)
    k1, k2 = jax.random.PRNGKey(10), jax.random.PRNGKey(11)

    @jax.jit
    def run(k, x):   # augmented images and the gradients of sum(y) and sum(y**2), one compilation
        y, vjp = jax.vjp(lambda u: diff_augment(k, u), x)
        return y, vjp(jnp.ones_like(y))[0], vjp(2 * y)[0]

    a, g1, g = run(k1, x)
    b, c = run(k1, x)[0], run(k2, x)[0]
    assert a.shape == x.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    # = drawing the parameters from the key and applying them (separately compiled)
    np.testing.assert_allclose(np.asarray(_augment(x, _sample(k1, N, H, W))), np.asarray(a), atol=1e-6)
    for gg in (np.asarray(g), np.asarray(g1)):
        assert np.all(np.isfinite(gg)) and np.abs(gg).sum() > 0
    assert np.asarray(diff_augment(k1, x, policy="")).tobytes() == np.asarray(x).tobytes()
    with pytest.raises(ValueError):
        diff_augment(k1, x, policy="color,flip")


# ------------------------------------------------------------------------------------------------
# Discriminator

FEATS_SHAPES = [(2, 8, 8, 16), (2, 4, 4, 32)]


def _feats(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(FEATS_SHAPES))
    return [jax.random.normal(k, s) for k, s in zip(keys, FEATS_SHAPES)]


def test_discriminator_shapes_and_frozen_projection():
    D = ProjectedDiscriminator(proj_dim=8, ndf=16)
    feats, fake = _feats(), [f + 0.5 for f in _feats(1)]
    v = jax.jit(D.init)({"params": jax.random.PRNGKey(0)}, feats)
    assert set(v) == {"params", "projection"}
    assert set(v["projection"]) == {"proj_0", "proj_1"}
    assert v["projection"]["proj_1"]["kernel"].shape == (32, 16)     # expand: 8 * 2**1
    assert not any("proj" in "/".join(str(k) for k in path)
                   for path, _ in jax.tree_util.tree_flatten_with_path(v["params"])[0])
    proj0 = jax.tree.map(np.array, v["projection"])
    opt = optax.adam(1e-2)

    def d_loss(params, proj):
        vv = {"params": params, "projection": proj}
        return hinge_d_loss(D.apply(vv, feats, return_map=True), D.apply(vv, fake, return_map=True))

    @jax.jit
    def run(v, labels):   # everything in one compilation (CPU time)
        params, proj = v["params"], v["projection"]
        r = {"out": D.apply(v, feats), "lmap": D.apply(v, feats, return_map=True),
             "out_labels": D.apply(v, feats, labels)}
        r["loss"], (r["gp"], r["gproj"]) = jax.value_and_grad(d_loss, argnums=(0, 1))(params, proj)
        upd, _ = opt.update(r["gp"], opt.init(params), params)
        r["new"] = optax.apply_updates(params, upd)
        r["new_out"] = D.apply({"params": r["new"], "projection": proj}, feats)
        r["new_loss"] = d_loss(r["new"], proj)
        r["gf"] = jax.grad(lambda fs: hinge_g_loss(D.apply(v, fs)))(fake)
        return r

    r = run(v, jax.nn.one_hot(jnp.array([1, 2]), 3))
    out = np.asarray(r["out"])
    assert out.shape == (2,)
    assert r["lmap"].shape == (2, 5 * 5 + 1 * 1)                     # 8x8 -> 5x5, 4x4 -> 1x1
    np.testing.assert_allclose(np.asarray(r["lmap"].mean(1)), out, rtol=1e-5, atol=1e-6)
    # gradients reach the heads, never the projection (stop_gradient)
    assert sum(float(jnp.abs(l).sum()) for l in jax.tree_util.tree_leaves(r["gp"])) > 0
    assert all(float(jnp.abs(l).sum()) == 0 for l in jax.tree_util.tree_leaves(r["gproj"]))
    # an optax step on params moves the logits and lowers the loss; the projection is untouched
    assert not np.allclose(np.asarray(r["new_out"]), out)
    assert float(r["new_loss"]) < float(r["loss"])
    jax.tree.map(np.testing.assert_array_equal, proj0, jax.tree.map(np.asarray, v["projection"]))
    assert jax.tree.structure(r["new"]) == jax.tree.structure(v["params"])
    # the generator's gradient flows through projection and heads into the features
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in r["gf"])
    # labels are ignored by the unconditional discriminator (as CTM's released config)
    np.testing.assert_array_equal(np.asarray(r["out_labels"]), out)


def test_default_midas_widths_and_downblocks():
    D = ProjectedDiscriminator(proj_dim=4, proj_expand=False)       # ndf=None -> midas table
    feats = [jnp.ones((1, 16, 16, 5))]
    v = jax.eval_shape(D.init, {"params": jax.random.PRNGKey(0)}, feats)      # shapes only
    head = v["params"]["head_0"]
    assert head["down_16"]["kernel"].shape == (4, 4, 4, 512)          # 16 -> 8, nfc[8] = 512
    assert head["out"]["kernel"].shape == (4, 4, 512, 1) and "bias" not in head["out"]
    assert jax.eval_shape(lambda vv: D.apply(vv, feats, return_map=True), v).shape == (1, 25)


def test_conditional_logits_depend_on_labels():
    D = ProjectedDiscriminator(proj_dim=8, ndf=16, label_dim=4, embed_dim=8, cmap_dim=8)
    feats = _feats()
    la = jax.nn.one_hot(jnp.array([0, 1]), 4)
    lb = jax.nn.one_hot(jnp.array([2, 3]), 4)
    # Shapes from tracing init; values from numpy (a real init compiles ~10 RNG ops: seconds of CPU).
    shapes = jax.eval_shape(D.init, {"params": jax.random.PRNGKey(0)}, feats, la)
    assert shapes["params"]["head_0"]["embed"].shape == (4, 8)
    assert shapes["params"]["head_1"]["embed_proj"]["kernel"].shape == (8, 8)
    assert shapes["params"]["head_0"]["out"]["kernel"].shape == (4, 4, 8, 8)  # cmap_dim outputs
    rng = np.random.default_rng(0)
    v = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
    apply = jax.jit(D.apply)
    oa, ob = apply(v, feats, la), apply(v, feats, lb)
    assert oa.shape == (2,)
    assert np.all(np.abs(np.asarray(oa) - np.asarray(ob)) > 1e-6)
    # same label -> same logits (per-example: swap order of examples and labels)
    swapped = apply(v, [np.asarray(f)[::-1] for f in feats], np.asarray(la)[::-1])
    np.testing.assert_allclose(np.asarray(swapped)[::-1], np.asarray(oa), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        D.apply(v, feats)


def test_hinge_losses_hand_values():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2]; relu(1 + fake) = [0, 1, 2]
    np.testing.assert_allclose(float(hinge_d_loss(real, fake)), 2.5 / 3 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(hinge_g_loss(fake)), 1.0 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(hinge_d_loss(jnp.ones((2, 5)) * 3, -jnp.ones((2, 5)) * 3)), 0.0)


def test_adaptive_weight_hand_values():
    g_main, g_other = jnp.array([3.0, 4.0]), jnp.array([0.0, 1.0])
    np.testing.assert_allclose(float(adaptive_weight(g_main, g_other)), 5.0 / 1.0001, rtol=1e-6)
    big = jnp.array([300.0, 400.0])
    assert float(adaptive_weight(big, g_other)) == pytest.approx(10.0)             # upper clip
    np.testing.assert_allclose(float(adaptive_weight(big, g_other, clip=None)), 500 / 1.0001, rtol=1e-6)
    small, large = jnp.array([0.0, 1e-3]), jnp.array([10.0, 0.0])
    assert float(adaptive_weight(small, large)) == pytest.approx(0.01)             # lower clip
    np.testing.assert_allclose(float(adaptive_weight(small, large, clip=None)), 1e-3 / 10.0001, rtol=1e-5)
    huge = jnp.array([1e6])
    assert float(adaptive_weight(huge, jnp.zeros(1), clip=None)) == pytest.approx(1e4)  # clamp 1e4
    # pytrees: global norm over leaves; gradient is stopped
    tree_w = adaptive_weight({"w": jnp.array([3.0]), "b": jnp.array([4.0])}, {"w": jnp.array([1.0])})
    np.testing.assert_allclose(float(tree_w), 5.0 / 1.0001, rtol=1e-6)
    assert float(jax.grad(lambda s: adaptive_weight(s * g_main, g_other, clip=None))(1.0)) == 0.0
