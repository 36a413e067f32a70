"""Loading a frozen teacher for distillation: an exact analytic mixture or a trained checkpoint.

`config.teacher.kind`:
  - 'none'        no teacher (EDM teacher training itself);
  - 'analytic'    the closed-form denoiser of the data's Gaussian mixture (config.data must be a
                  mixture); its "params" are the mixture's means / stds / weights;
  - 'checkpoint'  the EMA weights of a jaxdistill run directory (`config.teacher.checkpoint`, e.g.
                  an EDM teacher trained with run.py, or an official EDM pickle converted into that
                  layout), whose network is `config.teacher.network`.
The teacher's params are returned as a plain pytree; the trainer shards them by the same rule as
the state and never gives them to an optimizer. A checkpoint teacher is verified like a run's own
checkpoints (jaxdistill.checkpoint.read_step): a corrupt newest step falls back to the previous
one with a warning, and no file of the teacher's directory is ever changed.
"""
from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp
from absl import logging

from jaxdistill import checkpoint, data

KINDS = ("none", "analytic", "checkpoint")


def load(config):
    """The teacher's variables (a pytree) for `config.teacher`, or None for kind 'none'."""
    kind = config.teacher.kind
    if kind not in KINDS:
        raise ValueError(f"config.teacher.kind={kind!r} is not one of {KINDS}")
    if kind == "none":
        return None
    if kind == "analytic":
        mix = data.mixture_of(config.data)
        if mix is None:
            raise ValueError("config.teacher.kind='analytic' needs a Gaussian-mixture data set "
                             f"(mixture2d, image_mixture or mixture), not {config.data.name!r}")
        return mix
    return _load_checkpoint(config)


def _load_checkpoint(config) -> dict:
    path = config.teacher.checkpoint
    ckpt_dir = os.path.join(path, "checkpoints") if path else ""
    if not path or not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"teacher checkpoint not found: config.teacher.checkpoint={path!r} must be a run "
            "directory containing checkpoints/<step>/ — train one with "
            "`python run.py --config=configs/edm_*.py --workdir=DIR` (or convert an official EDM "
            "pickle with `python -m jaxdistill.convert.edm_pickle EDM.pkl DIR`) and pass "
            "--config.teacher.checkpoint=DIR")
    mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_names=("state", "meta"))
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"config.teacher.checkpoint={path!r}: no checkpoint steps in "
                                    f"{ckpt_dir}; train or convert a teacher into it first")
        # Verified like the student's checkpoints, but a teacher directory belongs to another run:
        # a corrupt step is skipped with a warning, never renamed.
        problems = []
        for step in steps:
            try:
                state, meta = checkpoint.read_step(mngr, step)
                break
            except checkpoint.CorruptCheckpointError as e:
                problems.append(f"step {step}: {e}")
                logging.warning("teacher checkpoint step %d in %s is corrupt (%s); trying the "
                                "previous step", step, ckpt_dir, e)
        else:
            raise FileNotFoundError(
                f"config.teacher.checkpoint={path!r}: no readable teacher checkpoint in {ckpt_dir} "
                f"({'; '.join(problems)}): restore the teacher run directory from a copy")
    finally:
        mngr.close()
    saved_net = _normalise(meta["config"]["network"])
    wanted = _normalise(json.loads(config.teacher.network.to_json_best_effort()))
    if saved_net != wanted:
        diff = checkpoint.config_diff(saved_net, wanted)
        raise ValueError(
            f"config.teacher.network does not match the network of the teacher in {path} "
            f"(step {step}): {'; '.join(diff)}: set those "
            "config.teacher.network fields to the saved values")
    return {"params": state["ema_params"], **state.get("consts", {})}


def _normalise(net: dict) -> dict:
    # JSON turns tuples into lists; dropout / remat do not change the weights' meaning.
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in net.items()
            if k not in ("dropout", "remat", "label_dropout")}
