"""Verified Orbax checkpoints of the whole train state plus JSON metadata.

A checkpoint directory holds `<step>/state` (every network, optimizer state, EMA, step) and
`<step>/meta` (the config, the method name, the step the data iterator resumes from, and the
state's fingerprint). Data pipelines are deterministic functions of the step and PRNG keys are
`fold_in(seed, step)`, so the step and the config's seed are the whole random state.

The fingerprint makes a restore trustworthy: `structure` lists every leaf's path, shape and dtype,
`digest` two 32-bit position-weighted sums of every leaf's bits. Both are computed on device
(integer sums are exact in any reduction order, so any mesh, host or machine gets the same value);
any single flipped bit changes the first sum, because it adds an odd multiple of a power of two
below 2**32. Restoring walks the steps newest first:
  - a step saved with another state structure (another network, method or optimizer) is not
    corrupt: `IncompatibleCheckpointError` lists the config fields that differ and no file is
    touched;
  - a step whose metadata or arrays cannot be read, whose digest differs, or whose values are not
    finite is corrupt: it is renamed to `<step>.unreadable-<time>` (never deleted) with a one-line
    warning and the previous step is tried.
`save` refuses a state with non-finite values, so a diverged state never reaches the disk.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxdistill.errors import IncompatibleCheckpointError, NonFiniteStateError

# Odd multipliers of the second digest (any odd number keeps single-bit flips visible).
_MIX = np.uint32(0x9E3779B1)


def manager(directory: str, *, keep: int = 3, best_metric: str = "",
            best_mode: str = "min") -> ocp.CheckpointManager:
    """Async manager keeping the last `keep` steps plus the best one by `best_metric`, if set.

    The best step is whichever saved step has the lowest (`best_mode='min'`) or highest value of
    the eval metric passed to `save`; steps saved without metrics are kept only while recent.
    """
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if best_metric:
        if best_mode not in ("min", "max"):
            raise ValueError(f"config.eval.best_mode={best_mode!r} must be 'min' or 'max'")
        policies.append(ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=1,
            keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "meta"))


# --- fingerprints ----------------------------------------------------------------------------

def leaf_name(path) -> str:
    """'params/block0/kernel': a leaf's path by key names only, the same whether the tree is the
    method's dataclass or the nested dicts Orbax restores without a target."""
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def structure(tree) -> list[list]:
    """[name, shape, dtype] of every leaf (arrays, ShapeDtypeStructs or numpy arrays)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [[leaf_name(path), list(np.shape(x)), _dtype_name(x)] for path, x in leaves]


def _dtype_name(x) -> str:
    dtype = x.dtype
    return "key" if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else str(np.dtype(dtype))


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of every element as uint32 (keys by their data; 1-, 2- and 4-byte types)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    bits = _as_uint32(x)
    if bits.ndim == 0:
        bits = bits[None]
    # Row-major position of every element, built from per-axis iotas (no reshape, so a sharded
    # leaf stays sharded); uint32 arithmetic wraps, which keeps the sums exact and order-free.
    position = jnp.zeros(bits.shape, jnp.uint32)
    for axis, size in enumerate(bits.shape):
        position = position * np.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape,
                                                                          axis)
    weight = position * np.uint32(2) + np.uint32(1)
    rotated = (bits << np.uint32(13)) | (bits >> np.uint32(19))
    digest = jnp.stack([jnp.sum(bits * weight, dtype=jnp.uint32),
                        jnp.sum(rotated * (weight * _MIX), dtype=jnp.uint32)])
    finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
              else jnp.array(True))
    return digest, finite


@jax.jit
def _fingerprints(leaves):
    pairs = [_leaf_fingerprint(x) for x in leaves]
    return jnp.stack([d for d, _ in pairs]), jnp.stack([f for _, f in pairs])


def fingerprint(tree) -> tuple[dict[str, list[int]], list[str]]:
    """({leaf name: [sum1, sum2]}, names of leaves holding NaN / Inf). Every process calls it for
    a sharded state; the result is the same everywhere."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    if not leaves:
        return {}, []
    digests, finite = _fingerprints([x for _, x in leaves])
    digests, finite = _host_value(digests), _host_value(finite)
    names = [leaf_name(path) for path, _ in leaves]
    return (dict(zip(names, digests.astype(np.int64).tolist())),
            [name for name, ok in zip(names, finite) if not ok])


def _host_value(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# --- save / restore --------------------------------------------------------------------------

def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict,
         metrics: dict | None = None) -> None:
    """Starts an async save of `state` and `meta` (plus the state's fingerprint) at `step`.

    Every process must call it. Raises NonFiniteStateError, saving nothing, when the state holds
    NaN or Inf.
    """
    digest, nonfinite = fingerprint(state)
    if nonfinite:
        raise NonFiniteStateError(
            f"the state at step {step} has NaN/Inf values in {', '.join(nonfinite[:3])}"
            f"{' ...' if len(nonfinite) > 3 else ''}: it was not saved and the checkpoints in "
            f"{mngr.directory} are kept; lower config.optim.lr or set config.optim.grad_clip")
    meta = dict(meta, structure=structure(state), digest=digest)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)),
              metrics=metrics, force=True)


class CorruptCheckpointError(Exception):
    """A step whose files cannot be read or whose contents do not match its fingerprint."""


def read_step(mngr: ocp.CheckpointManager, step: int, abstract_state=None,
              config: dict | None = None):
    """(state, meta) of one step, verified against its fingerprint.

    `abstract_state` (ShapeDtypeStructs with shardings, from jax.eval_shape) places the arrays;
    None restores them as saved. Raises IncompatibleCheckpointError when the saved structure
    differs from `abstract_state`'s, CorruptCheckpointError when the step is damaged.
    """
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001 -- any failure to read is damage
        raise CorruptCheckpointError(f"metadata unreadable ({_reason(e)})") from e
    if not isinstance(meta, dict):
        raise CorruptCheckpointError("metadata is not a JSON object")
    if abstract_state is not None and "structure" in meta:
        _check_compatible(mngr, step, meta, abstract_state, config)
    try:
        state = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state
    except Exception as e:  # noqa: BLE001 -- Orbax raises bare Exception for damaged data
        raise CorruptCheckpointError(f"arrays unreadable ({_reason(e)})") from e
    digest, nonfinite = fingerprint(state)
    if "digest" in meta and digest != meta["digest"]:
        names = sorted(n for n in set(digest) | set(meta["digest"])
                       if digest.get(n) != meta["digest"].get(n))
        raise CorruptCheckpointError(f"contents differ from the saved digest in "
                                     f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    if nonfinite:
        raise CorruptCheckpointError(f"NaN/Inf values in {', '.join(nonfinite[:3])}")
    return state, meta


def _reason(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}"


def _check_compatible(mngr, step: int, meta: dict, abstract_state, config: dict | None) -> None:
    now = structure(abstract_state)
    if meta["structure"] == now:
        return
    saved_cfg = meta.get("config") or {}
    fields = config_diff(saved_cfg, config) if config is not None else []
    if not fields:  # the same config built another state (the code changed): name the leaves
        saved = {p: (s, d) for p, s, d in meta["structure"]}
        current = {p: (s, d) for p, s, d in now}
        fields = [f"{p}: saved {saved.get(p)}, now {current.get(p)}"
                  for p in sorted(set(saved) | set(current)) if saved.get(p) != current.get(p)]
    raise IncompatibleCheckpointError(
        f"the checkpoint at step {step} in {mngr.directory} holds a different state than this "
        f"config builds ({'; '.join(fields[:6])}{' ...' if len(fields) > 6 else ''}): rerun with "
        "the config it was saved with, or pass --restart (train(..., restart=True)) to start "
        "over; nothing was changed on disk")


def config_diff(saved: dict, now: dict) -> list[str]:
    """'a.b: saved X, now Y' for every config field whose value differs (tuples == lists)."""
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    return [f"{k}: saved {flat_saved.get(k, '<absent>')!r}, now {flat_now.get(k, '<absent>')!r}"
            for k in sorted(set(flat_saved) | set(flat_now))
            if flat_saved.get(k, "<absent>") != flat_now.get(k, "<absent>")]


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, config: dict | None = None, *,
                   set_aside: bool = True):
    """(state, meta) of the newest good checkpoint, or (None, None) when there is none.

    Corrupt steps are renamed aside (`set_aside=False`: skipped and left alone, for directories
    this run does not own, such as a teacher's). An incompatible step raises
    IncompatibleCheckpointError. `config` (config_json of the current config) lets that error name
    the differing fields.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return read_step(mngr, step, abstract_state, config)
        except CorruptCheckpointError as e:
            logging.warning("checkpoint step %d in %s is corrupt (%s); falling back to the "
                            "previous step", step, mngr.directory, e)
            if set_aside:
                set_aside_step(mngr, step, "unreadable")
    return None, None


def set_aside_step(mngr: ocp.CheckpointManager, step: int, why: str) -> str:
    """Renames step `step` to `<step>.<why>-<time>` (kept for inspection, out of the manager's way).

    Every process calls it; process 0 renames.
    """
    from jax.experimental import multihost_utils

    mngr.wait_until_finished()
    path = os.path.join(str(mngr.directory), str(step))
    aside = f"{path}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        os.rename(path, aside)
        logging.warning("moved checkpoint step %d to %s", step, aside)
    multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    mngr.reload()
    return aside


def config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())
