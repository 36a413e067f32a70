"""Tolerances for "this training run equals that one" across meshes, process counts or programs.

Two runs of one train step on different meshes sum the same float32 terms in a different order
(the batch split over devices, the all-reduce, other kernels and vector widths on another
machine), so losses and gradients agree to float32 reassociation error, not bit for bit.

Adam then breaks any fixed tolerance on the params: its update lr * m_hat / (sqrt(v_hat) + eps)
has derivative up to lr / eps with respect to the gradient (g / (|g| + eps) has slope
eps / (|g| + eps)^2 <= 1 / eps), so for an element whose gradient is as small as its rounding
noise, a 1e-7 change in the gradient moves the update by up to about lr (observed: 3.4e-6 after 3
steps). A tolerance of lr per step would be machine-proof but useless: every Adam update is
O(lr) anyway, and Adam is nearly blind to the gradient's scale (an all-reduce that sums instead
of averaging changes the params only where |g| ~ eps).

So these checks train in Adam's SGD regime (`sgd_regime`): with eps = EPS far above every
gradient and lr multiplied by EPS, the update is lr * m_hat * (1 + O(sqrt(v_hat) / EPS)):
momentum SGD at the configured lr, whose slope with respect to the gradient is at most lr. Every
leaf of the state (params, EMAs, first and second moments) is then a smooth function of the
gradients, and the comparison below holds at float32 tolerance while a wrong all-reduce (a
factor of devices, or one shard's gradient) changes the updates by O(1).
"""
from __future__ import annotations

import jax
import numpy as np

EPS = 1e3   # Adam's eps in the SGD regime; the gradients of the tests' small models are O(1-10).

# Relative agreement of two runs' updates. Derivation: a float32 sum of n terms reassociated
# changes by at most about n * 2^-24 of the sum of their magnitudes; the gradients here are sums
# over 64 examples and 64-128 hidden units (n * 2^-24 <= 128 * 6e-8 ~ 8e-6), chained through a
# few steps. 1e-4 leaves a factor > 10 over that, and 1000 below the O(0.1-1) of a wrong reduction.
UPDATE_RTOL = 1e-4
# Each stored float32 value is rounded once more when the update is added: half an ulp of the
# leaf's largest element (2^-24 |x|), a few ulps for the steps taken.
ULPS = 8 * 2.0**-24


def sgd_regime(config, *lr_fields: str):
    """Put `config.optim` (Adam / AdamW / RAdam) in its SGD regime, keeping the nominal lr.

    `lr_fields` are further "section.field" learning rates built from `config.optim` (DMD2's
    `method.guidance_lr`). AdamW's decoupled weight decay is applied as lr * wd * p, so wd is
    divided by EPS to keep lr * wd unchanged.
    """
    config.optim.eps = EPS
    config.optim.lr = config.optim.lr * EPS
    for field in lr_fields:
        section, name = field.split(".")
        config[section][name] = config[section][name] * EPS
    if config.optim.get("weight_decay"):
        config.optim.weight_decay = config.optim.weight_decay / EPS
    return config


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(jax.device_get(tree))


def assert_losses_close(losses, ref_losses):
    """Mean losses over 64 examples: all terms positive, so reassociation changes the mean by at
    most 64 * 2^-24 ~ 4e-6 of it; 1e-5 (float32 tolerance)."""
    np.testing.assert_allclose(np.asarray(losses, np.float64), np.asarray(ref_losses, np.float64),
                               rtol=1e-5)


def assert_updates_close(state, ref, init, *, rtol: float = UPDATE_RTOL):
    """`state` and `ref` were both trained from `init` (same config in `sgd_regime`): every leaf's
    change from `init` agrees with the reference's to `rtol` of that leaf's largest change plus a
    few ulps of its largest value (the final rounding). Integer leaves (steps, counts) are exact.
    Also checks that the params did change, so that the comparison can see a wrong gradient."""
    moved = False
    for (path, a), (_, b), (_, a0) in zip(_leaves(state), _leaves(ref), _leaves(init), strict=True):
        name = jax.tree_util.keystr(path)
        a, b, a0 = np.asarray(a), np.asarray(b), np.asarray(a0)
        assert a.shape == b.shape == a0.shape, name
        if not np.issubdtype(b.dtype, np.floating):
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        da = a.astype(np.float64) - a0
        db = b.astype(np.float64) - a0
        scale = float(np.max(np.abs(db), initial=0.0))
        atol = rtol * scale + ULPS * float(np.max(np.abs(b), initial=0.0))
        np.testing.assert_allclose(da, db, rtol=0, atol=atol, err_msg=name)
        moved |= "params" in name and scale > 1e3 * ULPS * float(np.max(np.abs(b), initial=0.0))
    assert moved, "no params changed beyond rounding: the comparison cannot see the gradients"
