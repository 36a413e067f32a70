"""The Teacher object: any denoise callable with frozen params, a pytree the step takes as an
argument (compiled once per denoise function), built from a mixture, a run or Python."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import teacher as teacher_lib
from jaxdistill.configs import get as load_config
from jaxdistill.data import mixtures


def gaussian_denoise(params, x, sigma, labels=None, **unused):
    """E[x0 | x] for x0 ~ N(mu, s^2 I): a user's own closed form, not the library's."""
    s2, t2 = params["std"] ** 2, sigma[:, None] ** 2
    return (t2 * params["mean"] + s2 * x) / (s2 + t2)


def test_teacher_is_a_pytree_of_its_params_with_a_static_function():
    tch = teacher_lib.Teacher(params={"mean": jnp.ones(2), "std": jnp.float32(0.5)},
                              denoise=gaussian_denoise)
    leaves, treedef = jax.tree.flatten(tch)
    assert len(leaves) == 2  # the params only; the function is static
    x, sigma = jnp.zeros((3, 2)), jnp.full((3,), 0.5)
    np.testing.assert_allclose(tch(x, sigma), jnp.full((3, 2), 0.5), rtol=1e-6)  # halfway
    traces = []

    @jax.jit
    def apply(t, x):
        traces.append(1)
        return t(x, jnp.full((x.shape[0],), 1.0))

    apply(tch, x)
    # New params of the same shapes, and a new Teacher object: no retrace.
    apply(teacher_lib.Teacher(params={"mean": jnp.zeros(2), "std": jnp.float32(2.0)},
                              denoise=gaussian_denoise), x)
    assert len(traces) == 1


def test_mixture_teacher_is_the_exact_denoiser_and_equal_loads_share_programs():
    cfg = load_config("ctm_mixture2d")
    a, b = teacher_lib.load(cfg), teacher_lib.load(cfg)
    assert a.denoise == b.denoise and hash(a.denoise) == hash(b.denoise)
    x = jax.random.normal(jax.random.key(0), (5, 2))
    sigma = jnp.full((5,), 0.3)
    np.testing.assert_array_equal(a(x, sigma), mixtures.denoise(a.params, x, sigma))


def test_a_custom_callable_teacher_distils_through_the_method_step():
    """CTM's step with a Python-defined teacher: its target comes from that function (a teacher
    that maps everything to one point pulls the student's 1-step samples towards it)."""
    from jaxdistill import data, methods

    cfg = load_config("ctm_mixture2d")
    cfg.network.hidden = 32
    cfg.optim.update(lr=3e-3, lr_rampup_images=0)
    tch = teacher_lib.Teacher(params={"mean": jnp.array([3.0, -2.0]), "std": jnp.float32(1e-3)},
                              denoise=gaussian_denoise)
    method = methods.get("ctm")
    state = method.init(cfg, jax.random.key(0), tch)
    step = jax.jit(method.train_step(cfg))
    batches = data.batches(cfg.data, batch_size=128, seed=0)

    def distance_to_point(s):
        x, _ = method.sample(cfg, s, jax.random.key(5), 512, num_steps=1, weights="online")
        return float(jnp.mean(jnp.linalg.norm(x - tch.params["mean"], axis=1)))

    before = distance_to_point(state)
    for _ in range(150):
        state, metrics = step(state, tch, next(batches), jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
    assert distance_to_point(state) < 0.5 * before
