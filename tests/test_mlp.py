"""The MLP denoiser for vector data takes the same conditioning inputs as the U-Nets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.networks import MLPDenoiser


def _init_and_perturb(net, *args, **kwargs):
    params = net.init(jax.random.key(0), *args, **kwargs)["params"]
    # The output layer starts at zero (D = c_skip x); perturb it so inputs show in the output.
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    return {"params": params}


def test_every_conditioning_input_changes_the_output():
    net = MLPDenoiser(dim=2, hidden=16, depth=2, embed=8, label_dim=4, s_embedding=True,
                      guidance_embed=True, cond_channels=3)
    x, t = jnp.ones((5, 2)), jnp.zeros((5,))
    base = dict(class_labels=jax.nn.one_hot(jnp.arange(5) % 4, 4), noise_labels_s=jnp.zeros((5,)),
                guidance=jnp.ones((5,)), cond=jnp.zeros((5, 3)))
    v = _init_and_perturb(net, x, t, base["class_labels"], noise_labels_s=base["noise_labels_s"],
                          guidance=base["guidance"], cond=base["cond"])
    f = jax.jit(lambda **kw: net.apply(v, x, t, kw.pop("class_labels"), **kw))
    out = f(**base)
    assert out.shape == (5, 2)
    for name, changed in [("class_labels", jnp.zeros((5, 4))), ("noise_labels_s", jnp.ones((5,))),
                          ("guidance", 3 * jnp.ones((5,))), ("cond", jnp.ones((5, 3)))]:
        assert float(jnp.max(jnp.abs(f(**{**base, name: changed}) - out))) > 1e-4, name
    out2, feats = net.apply(v, x, t, base["class_labels"], noise_labels_s=base["noise_labels_s"],
                            guidance=base["guidance"], cond=base["cond"], return_features=True)
    np.testing.assert_allclose(out2, out, atol=1e-6)
    assert feats.shape == (5, 16)


def test_label_dropout_zeroes_labels_in_training_only():
    net = MLPDenoiser(dim=2, hidden=16, depth=1, embed=8, label_dim=3, label_dropout=1.0)
    x, t = jnp.ones((4, 2)), jnp.zeros((4,))
    labels = jax.nn.one_hot(jnp.arange(4) % 3, 3)
    v = _init_and_perturb(net, x, t, labels)
    dropped = net.apply(v, x, t, labels, train=True, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_allclose(dropped, net.apply(v, x, t, None), rtol=1e-6)
    assert float(jnp.max(jnp.abs(net.apply(v, x, t, labels) - dropped))) > 1e-4


def test_wrong_shape_is_a_clear_error():
    net = MLPDenoiser(dim=2)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        net.init(jax.random.key(0), jnp.ones((3, 5)), jnp.zeros((3,)))


def test_image_inputs_are_flattened_and_restored():
    net = MLPDenoiser(dim=8 * 8, hidden=16, depth=1, embed=8)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    v = _init_and_perturb(net, x, jnp.zeros((3,)))
    out = net.apply(v, x, jnp.zeros((3,)))
    assert out.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(out.reshape(3, -1), net.apply(v, x.reshape(3, -1), jnp.zeros((3,))),
                               atol=1e-6)
