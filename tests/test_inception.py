"""The Flax FID Inception against pytorch-fid's network (random weights: no download here).

pytorch-fid's `InceptionV3` is built for real (its `fid_inception_v3` with the FID block patches),
with the state dict it would download replaced by one of a randomly initialised torchvision
Inception3 (same keys) whose BatchNorm running statistics and affine params are made random and
non-trivial (He-normal weights keep activations O(1), so the errors below are meaningful). The
same state dict is saved as .pth and loaded by our loader.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdistill.eval import inception

import pytorch_fid.inception as pytorch_fid_inception  # noqa: E402  (test extra)
import torch  # noqa: E402


def _random_state_dict(seed=0):
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                          init_weights=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):  # He init: O(1) activations
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if isinstance(m, torch.nn.Linear):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return net.state_dict()


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    """(state-dict path, images in [-1, 1] NHWC, torch pool features, torch logits, torch
    forward returning (pool, logits) of [-1, 1] NHWC images)."""
    state = _random_state_dict()
    path = str(tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE)
    torch.save(state, path)
    mp = pytest.MonkeyPatch()
    mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    try:
        net = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=True)
        fc = pytorch_fid_inception.fid_inception_v3().fc
    finally:
        mp.undo()
    net.eval()

    def forward(images):
        with torch.no_grad():
            x01 = torch.from_numpy((images.transpose(0, 3, 1, 2) + 1) / 2)  # pytorch-fid: [0, 1]
            pool = net(x01)[0].flatten(1)
            return pool.numpy(), fc(pool).numpy()

    images = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
    return (path, images, *forward(images), forward)


def test_matches_pytorch_fid(torch_reference):
    path, images, pool_ref, logits_ref, _ = torch_reference
    params = inception.load_inception_params(path)
    out = jax.jit(inception.inception_outputs)(params, images)
    pool, logits = np.asarray(out["pool"]), np.asarray(out["logits"])
    err_pool = np.abs(pool - pool_ref).max()
    err_logits = np.abs(logits - logits_ref).max()
    print(f"max abs error: pool {err_pool:.2e} (max |pool| {np.abs(pool_ref).max():.2e}), "
          f"logits {err_logits:.2e} (max |logit| {np.abs(logits_ref).max():.2e})")
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    # Measured (CPU, float32): pool 7.2e-6 (|pool| <= 18), logits 9.5e-6 (|logits| <= 12).
    np.testing.assert_allclose(pool, pool_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-4)
    fc = params["fc"]
    np.testing.assert_allclose(np.asarray(out["logits_unbiased"]),
                               logits - np.asarray(fc["bias"]), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 320])
def test_matches_pytorch_fid_when_upsampling_and_downsampling(torch_reference, size):
    """Measured max abs error: 64 px pool 9.5e-6 / logits 2.8e-5; 320 px 1.1e-5 / 2.5e-5."""
    path, _, _, _, forward = torch_reference
    images = np.random.default_rng(size).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    pool_ref, logits_ref = forward(images)
    out = inception.inception_outputs(inception.load_inception_params(path), images)
    np.testing.assert_allclose(np.asarray(out["pool"]), pool_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits_ref, rtol=1e-5, atol=1e-4)


def test_npz_round_trip_and_uint8_range(torch_reference, tmp_path):
    path, images, _, _, _ = torch_reference
    params = inception.load_inception_params(path)
    npz = str(tmp_path / "inception.npz")
    inception.convert_pth_to_npz(path, npz)
    again = inception.load_inception_params(npz)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, again))
    np.savez(tmp_path / "ours.npz", **inception.params_to_state_dict(params))
    ours = inception.load_inception_params(str(tmp_path / "ours.npz"))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, ours))
    # [0, 255] input gives the same network input as [-1, 1] input.
    x = inception.preprocess(images, "[-1,1]")
    y = inception.preprocess((images + 1) * 127.5, "[0,255]")
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    assert x.shape == (2, 299, 299, 3)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        inception.load_inception_params(str(tmp_path / inception.WEIGHTS_FILE))
    msg = str(err.value)
    for needle in (inception.WEIGHTS_URL, "config.eval.inception_weights", str(tmp_path)):
        assert needle in msg


def test_edm_pickle_is_refused_with_the_reason(tmp_path):
    pkl = tmp_path / "inception-2015-12-05.pkl"
    pkl.write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle.load would execute"):
        inception.load_inception_params(str(pkl))


def test_wrong_state_dict_names_the_key():
    state = inception.params_to_state_dict(inception.init_inception_params(0))
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    with pytest.raises(ValueError, match="Mixed_6b.branch7x7_2.conv.weight"):
        inception.params_from_state_dict(state)


def test_import_does_not_import_torch():
    code = ("import sys, jaxdistill.eval, jaxdistill.eval.inception, jaxdistill.eval.fid; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
