"""Trainable.apply_gradients (the one update every method uses) and named random streams."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdistill import objectives
from jaxdistill.methods.trainable import ONLINE, Trainable


def test_apply_gradients_sanitises_steps_and_updates_every_ema():
    params = {"w": jnp.array([1.0, 2.0, 3.0])}
    tx = optax.sgd(0.1)
    t = Trainable.create(params, tx, consts={"buf": jnp.ones(2)}, emas=("slow", "fast"))
    grads = {"w": jnp.array([jnp.nan, jnp.inf, 2.0])}
    new, norm = t.apply_gradients(tx, grads, {"slow": 0.9, "fast": 0.5})
    # NaN -> 0 and +Inf -> 1e5 (EDM), then SGD; the norm is the sanitised gradients'.
    want = jnp.array([1.0, 2.0 - 0.1 * 1e5, 3.0 - 0.2])
    np.testing.assert_allclose(new.params["w"], want, rtol=1e-6)
    np.testing.assert_allclose(norm, np.sqrt(1e10 + 4.0), rtol=1e-6)
    # Each EMA moves towards the *updated* params with its own decay.
    np.testing.assert_allclose(new.emas["slow"]["w"], 0.9 * params["w"] + 0.1 * want, rtol=1e-6)
    np.testing.assert_allclose(new.emas["fast"]["w"], 0.5 * params["w"] + 0.5 * want, rtol=1e-6)
    np.testing.assert_array_equal(new.consts["buf"], t.consts["buf"])  # buffers never move
    assert new.weights(ONLINE) is new.params and new.weights("slow") is new.emas["slow"]
    assert new.variables() == {"params": new.params, "buf": new.consts["buf"]}


def test_apply_gradients_needs_a_decay_for_each_ema_and_names_unknown_weights():
    tx = optax.sgd(0.1)
    t = Trainable.create({"w": jnp.zeros(2)}, tx, emas=("ema",))
    with pytest.raises(ValueError, match=r"a decay for each EMA \['ema'\]"):
        t.apply_gradients(tx, {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"weights 'ema1' are not one of \['online', 'ema'\]"):
        t.weights("ema1")


def test_named_streams_are_independent_of_each_other_and_of_order():
    key = jax.random.key(3)
    a = jax.random.normal(objectives.stream(key, "noise"), (4,))
    # Drawing other streams first (a method that adds a draw) does not change this one...
    objectives.stream(key, "labels")
    np.testing.assert_array_equal(a, jax.random.normal(objectives.stream(key, "noise"), (4,)))
    # ... and different names give different draws (the name is hashed stably, not by hash()).
    b = jax.random.normal(objectives.stream(key, "sigma"), (4,))
    assert not np.allclose(a, b)
    # The same draw in every Python process: fold_in by CRC-32("noise") = 0xfda99629 (31 bits).
    np.testing.assert_array_equal(
        jax.random.key_data(objectives.stream(key, "noise")),
        jax.random.key_data(jax.random.fold_in(key, 0xFDA99629 & 0x7FFFFFFF)))
