"""Orbax checkpoints of the whole train state plus JSON metadata (config, data position).

A checkpoint directory holds `<step>/state` (every network, optimizer state, EMA, step) and
`<step>/meta` (the config, the method name and the step the data iterator resumes from; data
pipelines are deterministic functions of the step, and PRNG keys are `fold_in(seed, step)`, so the
step and the config's seed are the whole random state). Restoring walks the steps newest first and
falls back to an older one when the newest is damaged (Orbax's `latest_step` does not check
integrity: shared/research/jax_apis.md section c). A damaged step is renamed to
`<step>.unreadable-<time>`, never deleted, so the resumed run can save that step again.
"""
from __future__ import annotations

import json
import os
import time

import orbax.checkpoint as ocp
from absl import logging

RESTORE_ERRORS = (ValueError, FileNotFoundError, KeyError, OSError)


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


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict,
         metrics: dict | None = None) -> None:
    """Starts an async save of `state` and `meta` at `step` (every process must call it)."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)),
              metrics=metrics, force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
    """(state, meta) of the newest readable checkpoint, or (None, None) when there is none.

    `abstract_state` (from jax.eval_shape, with shardings) says the structure and placement.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            out = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            return out.state, out.meta
        except RESTORE_ERRORS as e:
            logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); "
                            "falling back to the previous one", step, mngr.directory,
                            type(e).__name__, str(e)[:200])
            _set_aside(mngr, step)
    return None, None


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> None:
    """Renames an unreadable step out of the manager's way, keeping its files for inspection."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        path = os.path.join(str(mngr.directory), str(step))
        aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(path, aside)
        logging.warning("moved the unreadable checkpoint to %s", aside)
    multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    mngr.reload()


def read_meta(directory: str) -> dict | None:
    """The metadata of the newest checkpoint in `directory` without building any state."""
    if not os.path.isdir(directory):
        return None
    mngr = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"))
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except RESTORE_ERRORS:
            continue
    return None


def config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())
