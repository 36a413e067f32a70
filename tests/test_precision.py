"""bf16 compute with fp32 params, and rematerialised U-Net blocks."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.methods import common, edm
from jaxdistill.networks import SongUNet, presets

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_edm import load_config  # noqa: E402


def test_bf16_compute_keeps_fp32_params_and_close_loss():
    cfg = load_config("edm_image_mixture")
    cfg.train.batch_size = 8
    x0 = jax.random.normal(jax.random.key(0), (8, 8, 8, 1)) * 0.5
    state = edm.init(cfg, jax.random.key(1))
    # Move off the (near-zero) output init so the network's output matters in the loss.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                          state.net.params)

    def loss_and_grad(dtype):
        cfg.model.compute_dtype = dtype
        denoiser = common.build_denoiser(cfg)
        f = lambda p: jnp.mean(edm.edm_loss(denoiser, {"params": p}, x0, None, jax.random.key(3),
                                            p_mean=-1.2, p_std=1.2, sigma_data=0.5,
                                            train=False)[0])
        return jax.jit(jax.value_and_grad(f))(params)

    loss32, g32 = loss_and_grad("float32")
    loss16, g16 = loss_and_grad("bfloat16")
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
    # bf16 has an 8-bit mantissa: ~1% relative error on the loss, far from fp32 round-off.
    rel = abs(float(loss16) - float(loss32)) / float(loss32)
    assert 1e-6 < rel < 0.03, rel
    cos = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)))
    cos /= jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(g16))
                    * sum(jnp.vdot(b, b) for b in jax.tree.leaves(g32)))
    assert float(cos) > 0.99


def test_remat_gives_the_same_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    t = jnp.zeros((2,))
    plain = SongUNet(**presets.tiny_songunet())
    remat = SongUNet(**presets.tiny_songunet(remat=True))
    shapes = jax.eval_shape(plain.init, jax.random.key(1), x, t)
    assert jax.tree.structure(shapes) == jax.tree.structure(jax.eval_shape(remat.init,
                                                                           jax.random.key(1), x, t))
    variables = jax.tree.map(lambda s: 0.1 * jax.random.normal(jax.random.key(2), s.shape), shapes)
    grads = [jax.jit(jax.grad(lambda v, net=net: jnp.sum(net.apply(v, x, t) ** 2)))(variables)
             for net in (plain, remat)]
    for a, b in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
