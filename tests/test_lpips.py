"""LPIPS-VGG (jaxdistill.networks.lpips): shapes, metric properties, head math, weight loading.

Random params only (no pretrained weights can be downloaded); small images (12x12 resized to 16)
keep the VGG forward passes cheap on CPU.
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.networks import lpips as L

# torchvision vgg16().features: conv layer indices and (in, out) channels, written out here
# independently of the module's table.
TV_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
TV_CONV_CHANNELS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                    (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]

dist16 = jax.jit(functools.partial(L.lpips_distance, resize_to=16))


@pytest.fixture(scope="module")
def params():
    return L.init_lpips_params(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def images():
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.uniform(kx, (2, 12, 12, 3), minval=-1.0, maxval=1.0)
    y = jax.random.uniform(ky, (2, 12, 12, 3), minval=-1.0, maxval=1.0)
    return x, y


def test_vgg16_param_shapes_and_count(params):
    # 14,714,688 = sum over the 13 convs of 9*cin*cout + cout (torchvision vgg16().features).
    expected = sum(9 * i * o + o for i, o in TV_CONV_CHANNELS)
    assert expected == 14_714_688
    assert L.count_params(params["vgg"]) == 14_714_688
    assert [idx for _, idx, _, _ in L.VGG16_CONVS] == TV_CONV_INDICES
    for (name, _, cin, cout), (i, o) in zip(L.VGG16_CONVS, TV_CONV_CHANNELS):
        assert params["vgg"][name]["kernel"].shape == (3, 3, i, o), name  # HWIO
        assert params["vgg"][name]["bias"].shape == (o,), name
    # The random init has the same tree as the Flax module's own init.
    module_tree = jax.eval_shape(L.VGG16Features().init, jax.random.PRNGKey(0),
                                 jnp.zeros((1, 16, 16, 3)))["params"]
    assert (jax.tree_util.tree_map(lambda a: a.shape, dict(module_tree))
            == jax.tree_util.tree_map(lambda a: a.shape, params["vgg"]))


def test_lin_shapes_nonnegative(params):
    assert sorted(params["lin"]) == [f"lin{k}" for k in range(5)]
    for k, c in enumerate([64, 128, 256, 512, 512]):
        w = params["lin"][f"lin{k}"]
        assert w.shape == (1, 1, c, 1)
        assert bool(jnp.all(w >= 0)) and float(jnp.max(w)) > 0
    assert L.count_params(params["lin"]) == 64 + 128 + 256 + 512 + 512


def test_tap_shapes_and_layout(params):
    # relu1_2 .. relu5_3 of features[0:4], [4:9], [9:16], [16:23], [23:30] (4 pools, odd floors).
    assert L.LPIPS_TAP_INDICES == (3, 8, 15, 22, 29)
    for size, spatial in [(32, [32, 16, 8, 4, 2]), (33, [33, 16, 8, 4, 2])]:
        taps = jax.eval_shape(L.VGG16Features().apply, {"params": params["vgg"]},
                              jnp.zeros((1, size, size, 3)))
        assert [t.shape for t in taps] == [(1, s, s, c) for s, c in
                                           zip(spatial, [64, 128, 256, 512, 512])]


def test_scaling_constants_are_imagenet_stats_for_minus1_1_inputs():
    # (x01 - mean) / std with x01 = (x + 1) / 2  ==  (x - (2 mean - 1)) / (2 std).
    np.testing.assert_allclose(L.LPIPS_SHIFT, 2 * np.array(L.IMAGENET_MEAN) - 1, atol=1e-9)
    np.testing.assert_allclose(L.LPIPS_SCALE, 2 * np.array(L.IMAGENET_STD), atol=1e-9)


def test_metric_properties(params, images):
    x, y = images
    dxy, dyx, dxx = dist16(params, x, y), dist16(params, y, x), dist16(params, x, x)
    assert dxy.shape == (2,)
    assert bool(jnp.all(jnp.isfinite(dxy)))
    np.testing.assert_allclose(dxx, 0.0, atol=1e-9)
    np.testing.assert_allclose(dxy, dyx, rtol=1e-5)
    assert bool(jnp.all(dxy > 1e-4))


def test_per_example_independence(params, images):
    # Same batch shape throughout (one compile): changing example 1 leaves d[0] unchanged, and
    # reversing the batch reverses the distances.
    x, y = images
    both = dist16(params, x, y)
    x2, y2 = x.at[1].set(-x[1]), y.at[1].set(jnp.flip(y[1], 0))
    other = dist16(params, x2, y2)
    np.testing.assert_allclose(other[0], both[0], rtol=1e-5)
    assert abs(float(other[1] - both[1])) > 1e-6
    np.testing.assert_allclose(dist16(params, x[::-1], y[::-1]), both[::-1], rtol=1e-5)


def test_grayscale_equals_repeated_rgb(params, images):
    x, y = images
    xg, yg = x[..., :1], y[..., :1]
    d_gray = dist16(params, xg, yg)
    d_rgb = dist16(params, jnp.repeat(xg, 3, -1), jnp.repeat(yg, 3, -1))
    assert d_gray.shape == (2,) and bool(jnp.all(d_gray > 0))
    np.testing.assert_allclose(d_gray, d_rgb, rtol=1e-6)


def test_composition_matches_manual_pipeline(params, images):
    # resize -> (x - shift) / scale -> VGG taps -> head, written out step by step.
    x, y = images

    @jax.jit
    def manual(p, x, y):
        def feats(im):
            im = L.resize_bilinear(im, 16)
            im = (im - jnp.array([-.030, -.088, -.188])) / jnp.array([.458, .448, .450])
            return L.VGG16Features().apply({"params": p["vgg"]}, im)
        return L.lpips_head(feats(x), feats(y), p["lin"])

    np.testing.assert_allclose(dist16(params, x, y), manual(params, x, y), rtol=1e-5)


def test_resize_matches_torch_bilinear_align_corners_false():
    # torch F.interpolate([0, 1] -> 4, bilinear, align_corners=False) = [0, .25, .75, 1].
    row = jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1)
    np.testing.assert_allclose(L.resize_bilinear(row, (1, 4)).ravel(), [0, .25, .75, 1],
                               atol=1e-7)
    # Shrinking without antialiasing: 4 -> 2 takes the mean of each pixel pair.
    row = jnp.array([0.0, 1.0, 4.0, 9.0]).reshape(1, 1, 4, 1)
    np.testing.assert_allclose(L.resize_bilinear(row, (1, 2)).ravel(), [0.5, 6.5], atol=1e-6)


def _numpy_lpips_head(f0s, f1s, ws):
    total = 0.0
    for f0, f1, w in zip(f0s, f1s, ws):
        n0 = f0 / (np.sqrt((f0 ** 2).sum(-1, keepdims=True)) + 1e-10)
        n1 = f1 / (np.sqrt((f1 ** 2).sum(-1, keepdims=True)) + 1e-10)
        d = (n0 - n1) ** 2                                    # (N, H, W, C)
        per_pixel = np.tensordot(d, w.reshape(-1), axes=([3], [0]))  # 1x1 conv, 1 output
        total = total + per_pixel.mean(axis=(1, 2))          # spatial average
    return total


def test_head_matches_numpy_on_given_features():
    rng = np.random.default_rng(0)
    chans, sizes = [64, 128, 256, 512, 512], [(6, 5), (3, 4), (2, 2), (2, 1), (1, 1)]
    f0s, f1s, ws = [], [], []
    for c, (h, w) in zip(chans, sizes):
        f0 = np.maximum(rng.standard_normal((3, h, w, c)), 0).astype(np.float32)
        f1 = np.maximum(rng.standard_normal((3, h, w, c)), 0).astype(np.float32)
        f0[0, 0, 0] = 0.0  # a dead (all-zero) position in one image only
        f1[1, 0, 0] = 0.0
        f0[2, 0, 0] = f1[2, 0, 0] = 0.0  # and in both
        f0s.append(f0), f1s.append(f1)
        ws.append(rng.uniform(0, 1, (1, 1, c, 1)).astype(np.float32))
    got = jax.jit(L.lpips_head)([jnp.asarray(f) for f in f0s], [jnp.asarray(f) for f in f1s],
                       {f"lin{k}": jnp.asarray(w) for k, w in enumerate(ws)})
    want = _numpy_lpips_head(f0s, f1s, ws)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Gradient through the channel normalisation stays finite at all-zero feature vectors.
    g = jax.jit(jax.grad(lambda f: L.lpips_head(
        [f] + [jnp.asarray(a) for a in f0s[1:]], [jnp.asarray(a) for a in f1s],
        {f"lin{k}": jnp.asarray(w) for k, w in enumerate(ws)}).sum()))(jnp.asarray(f0s[0]))
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_avg_pooling_variant(params, images):
    x, y = images
    d_avg = jax.jit(functools.partial(L.lpips_distance, resize_to=16, pooling="avg"))
    a = d_avg(params, x, y)
    np.testing.assert_allclose(d_avg(params, x, x), 0.0, atol=1e-9)
    assert bool(jnp.all(a > 0))
    assert not np.allclose(a, dist16(params, x, y), rtol=1e-4)
    with pytest.raises(ValueError, match="pooling"):
        L.lpips_distance(params, x, y, resize_to=16, pooling="l2")


def test_input_validation(params, images):
    x, y = images
    with pytest.raises(ValueError, match="differ"):
        L.lpips_distance(params, x, y[:1])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        L.lpips_distance(params, x[..., :2], y[..., :2])


def _torch_layout(params):
    """Random params written the way torch stores them (OIHW), with torchvision/lpips keys."""
    vgg = {}
    for (name, _, _, _), idx in zip(L.VGG16_CONVS, TV_CONV_INDICES):
        kernel = np.asarray(params["vgg"][name]["kernel"])  # HWIO
        vgg[f"features.{idx}.weight"] = kernel.transpose(3, 2, 0, 1)  # OIHW
        vgg[f"features.{idx}.bias"] = np.asarray(params["vgg"][name]["bias"])
    vgg["classifier.0.weight"] = np.zeros((4, 8), np.float32)  # full vgg16 state dict: ignored
    lin = {f"lin{k}.model.1.weight": np.asarray(params["lin"][f"lin{k}"]).transpose(3, 2, 0, 1)
           for k in range(5)}
    return lin, vgg


def test_npz_round_trip(params, images, tmp_path):
    # Non-zero biases so that bias mapping is checked too.
    p = jax.tree_util.tree_map(lambda a: a, params)
    rng = np.random.default_rng(3)
    for name in p["vgg"]:
        p["vgg"][name] = dict(p["vgg"][name], bias=jnp.asarray(
            rng.normal(0, 0.01, p["vgg"][name]["bias"].shape).astype(np.float32)))
    lin, vgg = _torch_layout(p)
    assert lin["lin0.model.1.weight"].shape == (1, 64, 1, 1)
    assert vgg["features.0.weight"].shape == (64, 3, 3, 3)
    np.savez(tmp_path / "vgg.npz", **lin)
    np.savez(tmp_path / "vgg16.npz", **vgg)
    loaded = L.load_lpips_from_dir(str(tmp_path))
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(p)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(p)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x, y = images
    np.testing.assert_allclose(dist16(loaded, x, y), dist16(p, x, y), rtol=1e-6)
    # params_to_torch_layout is the exact inverse.
    lin2, vgg2 = L.params_to_torch_layout(loaded)
    for k, v in lin2.items():
        np.testing.assert_array_equal(v, lin[k])
    for k, v in vgg2.items():
        np.testing.assert_array_equal(v, vgg[k])


def test_loader_rejects_wrong_shapes(params, tmp_path):
    lin, vgg = _torch_layout(params)
    lin["lin0.model.1.weight"] = np.zeros((1, 63, 1, 1), np.float32)
    np.savez(tmp_path / "vgg.npz", **lin)
    np.savez(tmp_path / "vgg16.npz", **vgg)
    with pytest.raises(ValueError, match="lin0"):
        L.load_lpips_from_dir(str(tmp_path))


def test_missing_dir_and_files_messages(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        L.load_lpips_from_dir(str(missing))
    msg = str(e.value)
    for part in ["config.method.lpips_weights_dir", "vgg.pth", "vgg.npz", "weights/v0.1/vgg.pth",
                 "vgg16-397923af.pth", "vgg16.npz", "lpips", str(missing)]:
        assert part in msg, part
    with pytest.raises(FileNotFoundError, match="lpips_weights_dir"):
        L.load_lpips_from_dir(None)
    # Directory present, only the linear layers: the message names the VGG16 file as missing.
    np.savez(tmp_path / "vgg.npz", a=np.zeros(1))
    with pytest.raises(FileNotFoundError) as e:
        L.load_lpips_from_dir(str(tmp_path))
    head = str(e.value).split(" not found")[0]
    assert "'vgg16-397923af.pth' / 'vgg16.npz'" in head and "'vgg.pth'" not in head
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        L.load_lpips_params(str(tmp_path / "vgg.npz"), str(tmp_path / "vgg16-397923af.pth"))


def test_pth_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    (tmp_path / "vgg.pth").write_bytes(b"not read")
    (tmp_path / "vgg16-397923af.pth").write_bytes(b"not read")
    with pytest.raises(ImportError) as e:
        L.load_lpips_params(str(tmp_path / "vgg.pth"), str(tmp_path / "vgg16-397923af.pth"))
    assert "pip install torch==2.14.1" in str(e.value)
    assert "convert_pth_to_npz" in str(e.value)


def test_gradient_finite(params, images):
    x, y = images
    # Example 0: different images; example 1: identical images (zero distance). One call.
    y = y.at[1].set(x[1])
    grad = jax.jit(jax.grad(lambda a, b, p: L.lpips_distance(p, a, b, resize_to=16).sum()))
    g = grad(x, y, params)
    assert g.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(g[0]).max()) > 0


def test_pth_files_load_into_a_vgg_equal_to_torchvisions(tmp_path):
    """torchvision's vgg16 (random weights) saved as the .pth files the loader reads: the Flax
    VGG16 taps equal torchvision's activations after relu1_2 .. relu5_3."""
    import torch
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval()
    for m in vgg.features:
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.bias, 0.0, 0.05)
    torch.save(vgg.state_dict(), tmp_path / "vgg16-397923af.pth")
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1)
           for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, tmp_path / "vgg.pth")
    params = L.load_lpips_from_dir(str(tmp_path))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    taps = L.VGG16Features().apply({"params": params["vgg"]}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        h, want = torch.from_numpy(x), []
        for i, layer in enumerate(vgg.features[:30]):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                want.append(h.numpy().transpose(0, 2, 3, 1))
    for got, ref in zip(taps, want):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(np.asarray(params["lin"]["lin2"])[0, 0, :, 0],
                                  lin["lin2.model.1.weight"].numpy()[0, :, 0, 0])
