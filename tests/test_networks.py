"""Tests of the EDM U-Nets (SongUNet = DDPM++/NCSN++, DhariwalUNet = ADM) and their layers.

Full-size networks are checked with `jax.eval_shape` (parameter counts, no compile); compiled
tests use the tiny presets with random parameters built from the abstract init shapes with numpy
(a jitted `init` of even a tiny U-Net spends ~15 s compiling threefry on a 2-core CPU).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.networks import presets
from jaxdistill.networks.dhariwal import DhariwalUNet
from jaxdistill.networks.layers import (
    Conv2d, GroupNorm, Init, UNetBlock, attention, edm_initializer, fir_down, fir_up,
    group_count, positional_embedding, resample_filter_2d)
from jaxdistill.networks.songunet import SongUNet

N, RES = 2, 16


def fast_key(seed):
    """Keys for random draws inside compiled tests: 'rbg' bits compile several times faster than
    threefry on CPU; the modules only call make_rng / jax.random, so the semantics are the same."""
    return jax.random.key(seed, impl="rbg")


def abstract_variables(net, *args, **kwargs):
    """Shapes of net.init's variables, traced without compiling or allocating."""
    return jax.eval_shape(lambda key: net.init(key, *args, **kwargs), jax.random.key(0))


def count_params(variables) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


def random_variables(net, seed=0, **kwargs):
    """Non-degenerate random variables for `net` (EDM's init zeroes the output layers)."""
    x = jnp.zeros((1, RES, RES, net.in_channels))
    labels = jnp.zeros((1, net.label_dim)) if net.label_dim else None
    shapes = abstract_variables(net, x, jnp.zeros((1,)), labels, **kwargs)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = 1 / math.sqrt(math.prod(leaf.shape[:-1]))
        elif name == "freqs":
            std = 16.0
        else:
            std = 0.1
        value = rng.normal(0.0, std, leaf.shape) + (1.0 if name == "scale" else 0.0)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def make_forward(net, train=False):
    """One jitted forward per (net, train); always returns (out, features)."""
    @jax.jit
    def forward(variables, x, t, labels=None, s=None, g=None, cond=None, rng=None):
        return net.apply(variables, x, t, labels, train=train, noise_labels_s=s, guidance=g,
                         cond=cond, return_features=True,
                         rngs={"dropout": rng} if rng is not None else {})
    return forward


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    return dict(x=jnp.asarray(rng.normal(size=(N, RES, RES, 1)), jnp.float32),
                t=jnp.array([0.3, -1.2]), labels=jax.nn.one_hot(jnp.array([0, 2]), 3),
                cond=jnp.asarray(rng.normal(size=(N, RES, RES, 1)), jnp.float32),
                s=jnp.array([-0.5, 0.7]), g=jnp.array([1.5, 3.0]))


# ----------------------------------------------------------------------------------------------
# 1. Parameter counts of the official configurations (trainable params only; buffers such as
#    NCSN++'s Fourier frequencies and the resample filters are not counted, as in torch's
#    `parameters()`).  Official counts: docs research file section 1.4, confirmed there by
#    instantiating NVlabs/edm EDMPrecond networks.

@pytest.mark.parametrize("cls,kwargs,label_dim,official", [
    # EDMPrecond(32, 3, label_dim=0, model_type='SongUNet', embedding_type='positional',
    #   encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
    #   resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2], augment_dim=9)
    (SongUNet, presets.ddpmpp_cifar10(), 0, 55_733_891),
    # same with label_dim=10 (class-conditional CIFAR-10)
    (SongUNet, presets.ddpmpp_cifar10(label_dim=10), 10, 55_735_299),
    # EDMPrecond(32, 3, label_dim=0, model_type='SongUNet', embedding_type='fourier',
    #   encoder_type='residual', decoder_type='standard', channel_mult_noise=2,
    #   resample_filter=[1,3,3,1], model_channels=128, channel_mult=[2,2,2], augment_dim=9)
    (SongUNet, presets.ncsnpp_cifar10(), 0, 56_397_827),
    # EDMPrecond(64, 3, label_dim=1000, model_type='DhariwalUNet', model_channels=192,
    #   channel_mult=[1,2,3,4])   (no augment_dim)
    (DhariwalUNet, presets.adm_imagenet64(), 1000, 295_899_267),
], ids=["ddpmpp-uncond", "ddpmpp-cond", "ncsnpp-uncond", "adm-imagenet64"])
def test_official_parameter_counts(cls, kwargs, label_dim, official):
    net = cls(**kwargs)
    res = kwargs["img_resolution"]
    labels = jnp.zeros((1, label_dim)) if label_dim else None
    variables = abstract_variables(net, jnp.zeros((1, res, res, 3)), jnp.zeros((1,)), labels)
    assert count_params(variables) == official
    if kwargs.get("embedding_type") == "fourier":
        assert variables["buffers"]["map_noise"]["freqs"].shape == (128,)


def test_edm_parameter_names():
    """Names follow EDM's modules so a checkpoint converter can map them one to one."""
    params = abstract_variables(SongUNet(**presets.ncsnpp_cifar10(label_dim=10)),
                                jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)),
                                jnp.zeros((1, 10)))["params"]
    for name in ["map_label", "map_augment", "map_layer0", "map_layer1", "enc_32x32_conv",
                 "enc_16x16_down", "enc_16x16_block0", "enc_16x16_aux_residual", "dec_8x8_in0",
                 "dec_32x32_block4", "dec_32x32_aux_norm", "dec_32x32_aux_conv"]:
        assert name in params, name
    block = params["enc_16x16_block0"]  # 16x16 encoder blocks have attention in DDPM++/NCSN++
    assert set(block) == {"norm0", "conv0", "affine", "norm1", "conv1", "norm2", "qkv", "proj"}
    assert block["qkv"]["kernel"].shape == (1, 1, 256, 768)          # HWIO
    assert set(params["enc_16x16_down"]) >= {"skip"}                  # resample_proj skip conv
    assert params["map_label"]["kernel"].shape == (10, 256)           # (in, out); NCSN++ 2*128
    adm = abstract_variables(DhariwalUNet(**presets.tiny_dhariwal()), jnp.zeros((1, RES, RES, 1)),
                             jnp.zeros((1,)))["params"]
    assert {"out_norm", "out_conv"} <= set(adm)
    assert set(adm["out_norm"]) == {"scale", "bias"}


@pytest.mark.parametrize("make", [presets.tiny_songunet, presets.tiny_dhariwal])
def test_tiny_presets_are_tiny(make):
    cls = SongUNet if make is presets.tiny_songunet else DhariwalUNet
    n = count_params(abstract_variables(cls(**make()), jnp.zeros((1, RES, RES, 1)),
                                        jnp.zeros((1,))))
    assert 5_000 < n < 100_000


# ----------------------------------------------------------------------------------------------
# 2. Compiled forward passes of the tiny presets.

TINY_VARIANTS = {
    "ddpmpp": (SongUNet, presets.tiny_songunet()),
    "ncsnpp": (SongUNet, presets.tiny_songunet(
        embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
        resample_filter=(1, 3, 3, 1))),
    "adm": (DhariwalUNet, presets.tiny_dhariwal()),
}


@pytest.fixture(scope="module")
def tiny_runs(inputs):
    runs = {}
    for name, (cls, kwargs) in TINY_VARIANTS.items():
        net = cls(**kwargs)
        variables = random_variables(net)
        forward = make_forward(net)
        runs[name] = (net, variables, forward, forward(variables, inputs["x"], inputs["t"]))
    return runs


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_tiny_forward_shapes(tiny_runs, name):
    net, _, _, (out, features) = tiny_runs[name]
    assert out.shape == (N, RES, RES, 1)
    assert features.shape == (N, RES // 2, RES // 2, 2 * net.model_channels)
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3


def test_fourier_frequencies_are_buffers(tiny_runs, inputs):
    net, variables, forward, (out, _) = tiny_runs["ncsnpp"]
    assert "map_noise" not in variables["params"]
    freqs = variables["buffers"]["map_noise"]["freqs"]
    assert freqs.shape == (net.model_channels * net.channel_mult_noise // 2,)
    changed = {"params": variables["params"], "buffers": {"map_noise": {"freqs": freqs * 0.5}}}
    assert float(jnp.abs(forward(changed, inputs["x"], inputs["t"])[0] - out).max()) > 1e-4
    with pytest.raises(ValueError, match="buffers"):
        net.apply({"params": variables["params"]}, inputs["x"], inputs["t"])


def test_wrong_input_shapes_raise(tiny_runs, inputs):
    net, variables, _, _ = tiny_runs["ddpmpp"]
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 16, 16, 1\).*\(2, 8, 8, 1\)"):
        net.apply(variables, jnp.zeros((N, 8, 8, 1)), inputs["t"])
    with pytest.raises(ValueError, match=r"\(N, 16, 16, 1\)"):
        net.apply(variables, jnp.zeros((N, RES, RES, 3)), inputs["t"])
    with pytest.raises(ValueError, match="noise_labels"):
        net.apply(variables, inputs["x"], jnp.zeros((3,)))
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(**presets.tiny_songunet(encoder_type="bogus"))


# Extended networks: class labels (label_dropout=1), CTM's second time s, guidance weight,
# low-resolution condition; SongUNet also takes the skip encoder/decoder paths here.
EXTENDED = {
    "song": (SongUNet, presets.tiny_songunet(
        label_dim=3, label_dropout=1.0, s_embedding=True, guidance_embed=True, cond_channels=1,
        embedding_type="fourier", encoder_type="skip", decoder_type="skip",
        resample_filter=(1, 3, 3, 1))),
    "adm": (DhariwalUNet, presets.tiny_dhariwal(
        label_dim=3, label_dropout=1.0, s_embedding=True, guidance_embed=True, cond_channels=1)),
}


@pytest.fixture(scope="module")
def extended_runs(inputs):
    runs = {}
    for name, (cls, kwargs) in EXTENDED.items():
        net = cls(**kwargs)
        variables = random_variables(net, noise_labels_s=jnp.zeros((1,)), guidance=jnp.zeros((1,)),
                                     cond=jnp.zeros((1, RES, RES, 1)))
        runs[name] = (net, variables, make_forward(net))
    return runs


@pytest.mark.parametrize("name", list(EXTENDED))
def test_extension_params_exist(extended_runs, name):
    net, variables, _ = extended_runs[name]
    params = variables["params"]
    for key in ["map_layer0_s", "map_layer1_s", "map_guidance", "map_label"]:
        assert key in params, key
    assert "affine_s" in params[f"enc_{RES // 2}x{RES // 2}_block0"]
    assert "affine_s" in params[f"dec_{RES // 2}x{RES // 2}_in0"]
    # the first conv sees x and the condition: in_channels + cond_channels inputs
    assert params[f"enc_{RES}x{RES}_conv"]["kernel"].shape[2] == 2
    if name == "song":
        assert set(variables["buffers"]) == {"map_noise", "map_noise_s"}


@pytest.mark.parametrize("name", list(EXTENDED))
def test_extension_inputs_change_output(extended_runs, inputs, name):
    _, variables, forward = extended_runs[name]
    base = dict(labels=inputs["labels"], s=inputs["s"], g=inputs["g"], cond=inputs["cond"])
    out = forward(variables, inputs["x"], inputs["t"], **base)[0]
    assert out.shape == (N, RES, RES, 1)
    changes = dict(labels=jnp.zeros_like(inputs["labels"]), s=inputs["s"] + 1.0,
                   g=inputs["g"] * 2.0, cond=inputs["cond"] + 1.0)
    for key, value in changes.items():
        other = forward(variables, inputs["x"], inputs["t"], **dict(base, **{key: value}))[0]
        assert float(jnp.abs(other - out).max()) > 1e-4, f"{key} does not reach the output"


@pytest.mark.parametrize("name", list(EXTENDED))
def test_missing_extension_inputs_raise(extended_runs, inputs, name):
    net, variables, _ = extended_runs[name]
    full = dict(noise_labels_s=inputs["s"], guidance=inputs["g"], cond=inputs["cond"])
    for key, pattern in [("noise_labels_s", "noise_labels_s"), ("guidance", "guidance"),
                         ("cond", "cond")]:
        kwargs = dict(full, **{key: None})
        with pytest.raises(ValueError, match=pattern):
            net.apply(variables, inputs["x"], inputs["t"], inputs["labels"], **kwargs)
    with pytest.raises(ValueError, match=r"expected cond of shape \(N, 16, 16, 1\)"):
        net.apply(variables, inputs["x"], inputs["t"], inputs["labels"],
                  **dict(full, cond=jnp.zeros((N, RES, RES, 2))))


def test_label_dropout_zeroes_labels_in_training_only(extended_runs, inputs):
    net, variables, forward = extended_runs["song"]   # label_dropout=1.0, dropout=0
    rest = dict(s=inputs["s"], g=inputs["g"], cond=inputs["cond"])
    with_labels = forward(variables, inputs["x"], inputs["t"], inputs["labels"], **rest)[0]
    unconditional = forward(variables, inputs["x"], inputs["t"], jnp.zeros_like(inputs["labels"]),
                            **rest)[0]
    assert float(jnp.abs(with_labels - unconditional).max()) > 1e-4  # labels matter in eval
    train = make_forward(net, train=True)(variables, inputs["x"], inputs["t"], inputs["labels"],
                                          **rest, rng=fast_key(3))[0]
    np.testing.assert_allclose(train, unconditional, rtol=1e-5, atol=1e-6)
    # class_labels=None means the zero ("unconditional") label vector
    none = forward(variables, inputs["x"], inputs["t"], None, **rest)[0]
    np.testing.assert_allclose(none, unconditional, rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training(tiny_runs, inputs):
    net, variables, _, (reference, _) = tiny_runs["adm"]            # dropout=0
    dropped = net.clone(dropout=0.5)
    # default call: train=False, return_features=False -> the output array alone, no dropout
    evaluation = jax.jit(lambda v, x, t: dropped.apply(v, x, t))(variables, inputs["x"],
                                                                 inputs["t"])
    np.testing.assert_allclose(evaluation, reference, rtol=1e-5, atol=1e-6)
    train = make_forward(dropped, train=True)
    a = train(variables, inputs["x"], inputs["t"], rng=fast_key(0))[0]
    b = train(variables, inputs["x"], inputs["t"], rng=fast_key(1))[0]
    assert float(jnp.abs(a - reference).max()) > 1e-3
    assert float(jnp.abs(a - b).max()) > 1e-3


# ----------------------------------------------------------------------------------------------
# 3. Formulas of the building blocks against hand computations / direct numpy definitions.

def test_resample_filters():
    np.testing.assert_allclose(resample_filter_2d([1, 1]), np.full((2, 2), 0.25))
    f = resample_filter_2d([1, 3, 3, 1])
    np.testing.assert_allclose(f.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(f[0], np.array([1, 3, 3, 1]) / 64, rtol=1e-6)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    box = resample_filter_2d([1, 1])
    down, up = jax.jit(lambda x: (fir_down(x, box, 0), fir_up(x, box, 0)))(x)
    np.testing.assert_allclose(down, x.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4)), atol=1e-6)
    np.testing.assert_allclose(up, x.repeat(2, 1).repeat(2, 2), atol=1e-6)  # nearest neighbour


def test_fir_resampling_matches_torch_definitions():
    """[1,3,3,1] with padding 1 against the scatter definition of conv_transpose2d and the
    strided correlation of conv2d (what EDM's Conv2d calls)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 6)).astype(np.float32)
    f = resample_filter_2d([1, 3, 3, 1])
    k, pad = f.shape[0], 1
    full = np.zeros((2 * 5 + k, 2 * 5 + k))
    for i in range(6):
        for j in range(6):
            full[2 * i:2 * i + k, 2 * j:2 * j + k] += x[i, j] * 4 * f
    expected_up = full[pad:pad + 12, pad:pad + 12]
    got_up, got_down = jax.jit(lambda x: (fir_up(x, f, pad), fir_down(x, f, pad)))(
        x[None, :, :, None])
    np.testing.assert_allclose(got_up[0, :, :, 0], expected_up, atol=1e-5)
    padded = np.pad(x, pad)
    expected_down = np.array([[(padded[2 * i:2 * i + k, 2 * j:2 * j + k] * f).sum()
                               for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(got_down[0, :, :, 0], expected_down, atol=1e-5)


def test_fused_down_conv_shape_and_box_filter():
    """NCSN++'s fused path: conv with padding k//2+f_pad, then filter with stride 2.  With the
    [1,1] filter it equals 2x2 average pooling of the 'same' conv."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 8, 8, 2)).astype(np.float32)
    variables = {"params": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                            "bias": rng.normal(size=(4,)).astype(np.float32)}}
    fused = Conv2d(4, 3, down=True, fused_resample=True, resample_filter=(1, 1))
    wide = Conv2d(4, 3, down=True, fused_resample=True, resample_filter=(1, 3, 3, 1))
    y, plain, y_wide = jax.jit(lambda v, x: (fused.apply(v, x), Conv2d(4, 3).apply(v, x),
                                             wide.apply(v, x)))(variables, x)
    bias = variables["params"]["bias"]
    pooled = (plain - bias).reshape(1, 4, 2, 4, 2, 4).mean(axis=(2, 4)) + bias
    np.testing.assert_allclose(y, pooled, atol=1e-5)
    assert y_wide.shape == (1, 4, 4, 4)


def test_group_norm():
    assert [group_count(c) for c in (8, 16, 128, 256)] == [2, 4, 32, 32]
    x = np.random.default_rng(0).normal(1.0, 3.0, size=(2, 4, 4, 16)).astype(np.float32)
    scale, bias = np.linspace(0.5, 2.0, 16), np.linspace(-1.0, 1.0, 16)
    y = jax.jit(GroupNorm(eps=1e-6).apply)({"params": {"scale": scale, "bias": bias}}, x)
    g = x.reshape(2, 16, 4, 4)                          # 4 groups of 4 channels
    ref = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True)
                                                             + 1e-6)
    np.testing.assert_allclose(y, ref.reshape(2, 4, 4, 16) * scale + bias, atol=1e-5)


def test_positional_embedding_values():
    # C=4: freqs (1/10000)^(i/2) = [1, 0.01] without endpoint, (1/10000)^(i/1) = [1, 1e-4] with.
    np.testing.assert_allclose(positional_embedding(jnp.array([2.0]), 4)[0],
                               [math.cos(2), math.cos(0.02), math.sin(2), math.sin(0.02)],
                               rtol=1e-6)
    np.testing.assert_allclose(positional_embedding(jnp.array([2.0]), 4, endpoint=True)[0],
                               [math.cos(2), math.cos(2e-4), math.sin(2), math.sin(2e-4)],
                               rtol=1e-6)


def test_attention_channel_layout_matches_edm():
    """EDM reshapes the NCHW qkv tensor to (N*heads, C/heads, 3, H*W); reproduce it in numpy."""
    n, h, w, c, heads = 2, 3, 4, 8, 2
    qkv = np.random.default_rng(0).normal(size=(n, h, w, 3 * c)).astype(np.float32)
    t = qkv.transpose(0, 3, 1, 2).reshape(n * heads, c // heads, 3, h * w)
    q, k, v = t[:, :, 0], t[:, :, 1], t[:, :, 2]
    logits = np.einsum("ncq,nck->nqk", q, k / np.sqrt(c // heads))
    weights = np.exp(logits - logits.max(axis=2, keepdims=True))
    weights /= weights.sum(axis=2, keepdims=True)
    a = np.einsum("nqk,nck->ncq", weights, v).reshape(n, c, h, w).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(attention(jnp.asarray(qkv), heads), a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,std", [
    ("xavier_uniform", math.sqrt(6 / 700) / math.sqrt(3)),
    ("xavier_normal", math.sqrt(2 / 700)),
    ("kaiming_uniform", math.sqrt(3 / 400) / math.sqrt(3)),
    ("kaiming_normal", math.sqrt(1 / 400)),
])
def test_edm_initializers(mode, std):
    w = jax.jit(edm_initializer(mode, 400, 300, 0.5), static_argnums=1)(fast_key(0), (400, 300))
    assert abs(float(w.std()) / (0.5 * std) - 1) < 0.02
    if mode.endswith("uniform"):
        assert float(jnp.abs(w).max()) <= 0.5 * std * math.sqrt(3) * (1 + 1e-6)
    assert not jnp.any(edm_initializer(mode, 400, 300, 0.0)(jax.random.key(0), (4, 3)))


def test_conv_fans_and_adm_zero_init_block():
    """Conv fan_in = in*k*k; ADM's init_zero makes conv1/proj exactly 0, so a fresh same-width
    block is the identity (skip_scale 1, no skip conv) while the affine bias is drawn."""
    w = jax.jit(Conv2d(64, 3).init)(fast_key(0), jnp.zeros((1, 4, 4, 64)))["params"]["kernel"]
    assert abs(float(w.std()) * math.sqrt(64 * 9) - 1) < 0.03          # kaiming_normal default
    adm = Init("kaiming_uniform", math.sqrt(1 / 3), math.sqrt(1 / 3))
    block = UNetBlock(16, attention=True, channels_per_head=8, init_spec=adm,
                      init_zero=Init("kaiming_uniform", 0.0, 0.0))
    x = np.random.default_rng(1).normal(size=(1, 4, 4, 16)).astype(np.float32)
    emb = jnp.ones((1, 8))
    variables = jax.jit(block.init)(fast_key(2), x, emb)
    params = variables["params"]
    assert "skip" not in params and block.heads == 2
    for name in ("conv1", "proj"):
        assert not jnp.any(params[name]["kernel"]) and not jnp.any(params[name]["bias"])
    assert jnp.any(params["affine"]["bias"])
    np.testing.assert_allclose(jax.jit(block.apply)(variables, x, emb), x, atol=1e-6)
