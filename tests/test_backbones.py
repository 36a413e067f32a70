"""CTM's pretrained GAN backbones (jaxdistill.networks.deit / efficientnet / backbones) against
the PyTorch references of tests/torch_refs.py (timm's parameter names, torch's own ops, random
init), saved as .pth and .npz and loaded through the library's loaders.  Tests that need torch
skip without it; the shape, rounding and missing-file tests do not need it.
"""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from jaxdistill.methods.ctm_config import method_config
from jaxdistill.networks import backbones, deit, efficientnet

# Tiny reference sizes (tests/torch_refs.py builds its torch models with the same numbers).
D_WIDTH, D_HEADS, D_PATCH, D_SIZE, D_HOOKS = 32, 4, 8, 32, (1, 2, 4, 5)


def torch_refs():
    import torch_refs as refs  # noqa: PLC0415  (torch is in the test extra)

    return refs


def tiny_method_config(deit_path="", effnet_path=""):
    return method_config(
        gan_backbones=("deit", "efficientnet"),
        deit=mlc.ConfigDict({"weights": deit_path, "width": D_WIDTH, "num_heads": D_HEADS,
                             "patch_size": D_PATCH, "image_size": D_SIZE, "hooks": D_HOOKS}),
        efficientnet=mlc.ConfigDict({"weights": effnet_path, "width_multiplier": 0.25,
                                     "depth_multiplier": 0.5, "image_size": 64}))


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    tr = torch_refs()
    assert (tr.D_WIDTH, tr.D_HEADS, tr.D_PATCH, tr.D_SIZE, tr.D_HOOKS) == \
        (D_WIDTH, D_HEADS, D_PATCH, D_SIZE, D_HOOKS)
    tr.torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("backbones")
    tdeit, teff = tr.TDeiT().eval(), tr.TEffNet().eval()
    return {"deit": (tdeit, tr.save(tdeit, directory, "deit")),
            "efficientnet": (teff, tr.save(teff, directory, "effnet"))}


IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Tests


def test_full_size_shapes_and_parameter_counts():
    """eval_shape only: official tap shapes and timm's parameter counts (with the heads timm adds:
    deit_base_distilled 87,338,192 = 85,798,656 + norm 1,536 + 2 heads 1,538,000; lite0
    4,652,008 = 2,958,848 + conv_head 409,600 + bn2 2,560 + classifier 1,281,000)."""
    count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))  # noqa: E731
    x = jnp.zeros((1, 224, 224, 3))
    for module, taps, n_params in (
            (deit.DeiTFeatures(), [(56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768)],
             85_798_656),
            (efficientnet.EfficientNetLiteFeatures(),
             [(56, 56, 24), (28, 28, 40), (14, 14, 112), (7, 7, 320)], 2_958_848)):
        v = jax.eval_shape(module.init, jax.random.key(0), x)
        assert count(v["params"]) == n_params
        assert [o.shape[1:] for o in jax.eval_shape(module.apply, v, x)] == taps


def paths(refs, kind):
    """Config with both reference files as .pth (kind 0) or .npz (kind 1)."""
    return tiny_method_config(refs["deit"][1][kind], refs["efficientnet"][1][kind])


@pytest.fixture(scope="module")
def built(refs):
    """{name: (backbone, variables)}: pretrained from the .pth files, random frozen parts drawn."""
    out = {}
    for name in backbones.PRETRAINED:
        bb = backbones.build(name, paths(refs, 0))
        random, _ = backbones.init_random(bb, jax.random.key(1), IMAGES.shape[1:])
        out[name] = (bb, {**bb.load(), **random})
    return out


@pytest.mark.parametrize("name", ["deit", "efficientnet"])
def test_pth_and_npz_load_the_same(refs, built, name):
    bb, variables = built[name]
    from_npz = backbones.build(name, paths(refs, 1)).load()
    jax.tree.map(np.testing.assert_array_equal, {k: variables[k] for k in from_npz}, from_npz)


@pytest.mark.parametrize("name", ["deit", "efficientnet"])
def test_features_match_torch_reference(refs, built, name):
    """Same feature maps as the torch reference (through the official input preparation), and
    the gradient of a loss on them reaches the images (the generator's GAN gradient path)."""
    bb, variables = built[name]

    @jax.jit
    def features_and_image_grad(x):
        feats, vjp = jax.vjp(lambda y: backbones.features(bb, variables, y), x)
        return feats, vjp([jnp.ones_like(f) for f in feats])[0]

    ours, grad = features_and_image_grad(IMAGES)
    tr = torch_refs()
    x = tr.torch_prepare(IMAGES, *bb.norm, bb.image_size)
    tmodel = refs[name][0]
    with tr.torch.no_grad():
        if name == "deit":
            tfeat = tr.TDeiTFeatures(tmodel).eval()
            tr.copy_readouts_to_torch(variables["postprocess"], tfeat)
            theirs = tfeat(x)
        else:
            theirs = tmodel.features(x)
    assert [o.shape[1:3] for o in ours] == [tuple(t.shape[2:]) for t in theirs]
    err = tr.max_err(ours, theirs)
    scale = max(float(t.abs().max()) for t in theirs)
    print(f"{name}: max abs error {err:.2e} (feature scale {scale:.2f})")
    assert err < 1e-4 * max(1.0, scale)
    assert float(jnp.abs(grad).sum()) > 0 and bool(jnp.all(jnp.isfinite(grad)))


def test_missing_file_names_what_to_get(tmp_path):
    with pytest.raises(FileNotFoundError, match="deit_base_distilled_patch16_224.*"
                       "config.method.deit.weights|config.method.deit.weights.*deit_base"):
        deit.load_deit_params(str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="tf_efficientnet_lite0"):
        efficientnet.load_efficientnet_variables("")
    with pytest.raises(FileNotFoundError, match="config.method.efficientnet.weights"):
        backbones.build("efficientnet", method_config()).load()


def test_mismatch_names_the_parameter(refs, tmp_path):
    _, (_, npz) = refs["deit"]
    wider = deit.DeiTFeatures(width=64, num_heads=4, patch_size=D_PATCH, image_size=D_SIZE,
                              hooks=D_HOOKS)
    with pytest.raises(ValueError, match="cls_token"):
        deit.load_deit_params(npz, wider)
    state = dict(np.load(refs["efficientnet"][1][1]))
    del state["blocks.3.1.conv_pwl.weight"]
    path = str(tmp_path / "broken.npz")
    np.savez(path, **state)
    with pytest.raises(KeyError, match=r"blocks\.3\.1\.conv_pwl\.weight"):
        efficientnet.load_efficientnet_variables(
            path, efficientnet.EfficientNetLiteFeatures(0.25, 0.5))


def test_block_specs_follow_timm_rounding():
    specs = efficientnet.block_specs()
    assert [len(s) for s in specs] == [1, 2, 2, 3, 3, 4, 1]
    assert [s[-1].cout for s in specs] == [16, 24, 40, 80, 112, 192, 320]
    tiny = efficientnet.block_specs(0.25, 0.5)
    assert [(len(s), s[0].kernel, s[0].stride, s[-1].cout) for s in tiny] == \
        [(1, 3, 1, 8), (1, 3, 2, 8), (1, 5, 2, 16), (2, 3, 2, 24), (2, 5, 1, 32), (2, 5, 2, 48),
         (1, 3, 1, 80)]   # timm's numbers for multipliers 0.25 / 0.5 (see torch_refs.TINY_EFFNET)
    assert efficientnet.make_divisible(10) == 16 and efficientnet.make_divisible(20) == 24
