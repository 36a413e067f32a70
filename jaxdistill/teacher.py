"""The frozen teacher of a distillation: a `Teacher` (denoise function + frozen params).

A `Teacher` is any denoiser D(params, x, sigma, labels) with its params: built from a config
(`load`), from a run directory or converted checkpoint (`from_run`), from an analytic mixture
(`from_mixture`), or passed directly from Python as `Teacher(params, my_denoise)` (a notebook's
own callable; extra keywords a network takes, e.g. train / rng, must be accepted). It is a pytree
whose leaves are the params (the trainer shards them like the state and never gives them to an
optimizer) and whose `denoise` is static: jitted steps take the teacher as an argument and
compile once per denoise function.

`config.teacher.kind`:
  - 'none'        no teacher (EDM teacher training itself);
  - 'analytic'    the closed-form denoiser of the data's Gaussian mixture (config.data must be a
                  mixture); its "params" are the mixture's means / stds / weights;
  - 'checkpoint'  the EMA weights of a jaxdistill run directory (`config.teacher.checkpoint`, e.g.
                  an EDM teacher trained with run.py, or an official EDM pickle converted into that
                  layout), whose network is `config.teacher.network`.
A checkpoint teacher is verified like a run's own
checkpoints (jaxdistill.checkpoint.read_step): a corrupt newest step falls back to the previous
one with a warning, and no file of the teacher's directory is ever changed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import flax
import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxdistill import checkpoint, data, diffusion, networks, objectives, samplers
from jaxdistill.data.mixtures import AnalyticTeacher, GaussianMixture
from jaxdistill.networks.denoiser import EDMDenoiser

KINDS = ("none", "analytic", "checkpoint")


@flax.struct.dataclass
class Teacher:
    params: Any                                               # frozen (a pytree of arrays)
    denoise: Callable = flax.struct.field(pytree_node=False)  # D(params, x, sigma, labels, **kw)

    def __call__(self, x, sigma, labels=None, **kwargs):
        """D(x; sigma, labels) with the frozen params; `labels` one-hot (N, label_dim) or None."""
        return self.denoise(self.params, x, sigma, labels, **kwargs)


def from_mixture(mixture: GaussianMixture) -> Teacher:
    """The exact denoiser of a Gaussian mixture (jaxdistill.data.mixtures.denoise)."""
    return Teacher(params=mixture, denoise=AnalyticTeacher())


def network_denoiser(net_cfg, sigma_data: float, compute_dtype: str = "float32",
                     field: str = "config.teacher.network") -> EDMDenoiser:
    """The EDM-preconditioned network named by `net_cfg` (name + constructor fields; `field`
    names it in errors)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in net_cfg.items() if k != "name"}
    try:
        net = networks.create(net_cfg.name, **kwargs)
    except TypeError as e:
        raise ValueError(f"{field} has a field the network {net_cfg.name!r} does not take: "
                         f"{e}") from None
    return EDMDenoiser(net, sigma_data=sigma_data, compute_dtype=compute_dtype)


def load(config) -> Teacher | None:
    """The `Teacher` of `config.teacher`, or None for kind 'none'."""
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
        return from_mixture(mix)
    denoise = network_denoiser(config.teacher.network, config.model.sigma_data,
                               config.model.compute_dtype)
    return Teacher(params=_load_checkpoint(config.teacher.checkpoint, config.teacher.network),
                   denoise=denoise)


def from_run(path: str, net_cfg, *, sigma_data: float = diffusion.SIGMA_DATA,
             compute_dtype: str = "float32") -> Teacher:
    """The EMA weights of the EDM run directory `path` (or a converted checkpoint), whose network
    is `net_cfg` (an ml_collections ConfigDict: name + constructor fields)."""
    return Teacher(params=_load_checkpoint(path, net_cfg),
                   denoise=network_denoiser(net_cfg, sigma_data, compute_dtype))


def _load_checkpoint(path: str, net_cfg) -> dict:
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
    wanted = _normalise(json.loads(net_cfg.to_json_best_effort()))
    if saved_net != wanted:
        diff = checkpoint.config_diff(saved_net, wanted)
        raise ValueError(
            f"config.teacher.network does not match the network of the teacher in {path} "
            f"(step {step}): {'; '.join(diff)}: set those "
            "config.teacher.network fields to the saved values")
    net = state["net"]  # an EDM run's network Trainable (jaxdistill.methods.edm.EDMState)
    return {"params": net["emas"]["ema"], **net.get("consts", {})}


def _normalise(net: dict) -> dict:
    # JSON turns tuples into lists; dropout / remat do not change the weights' meaning.
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in net.items()
            if k not in ("dropout", "remat", "label_dropout")}


def sample(teacher: Teacher, key: jax.Array, n: int, shape, label_dim: int, sampler: str,
           num_steps: int):
    """(noise z, samples, labels): n samples of the teacher's own `sampler` on EDM's Karras grid of
    `num_steps` steps from z * sigma_max, with uniform labels (None when unconditional). Jit it;
    a fixed key gives the same samples."""
    labels = objectives.draw_labels(objectives.stream(key, "labels"), n, label_dim)
    onehot = objectives.one_hot(labels, label_dim)
    z = objectives.draw_noise(objectives.stream(key, "noise"), n, shape)
    x = samplers.sample(sampler, lambda x, s: teacher(x, s, onehot), z,
                        diffusion.karras_sigmas(num_steps), objectives.stream(key, "sampler"))
    return z, x, labels


def ode_pairs(teacher: Teacher, key: jax.Array, n: int, shape, label_dim: int, num_steps: int):
    """n (noise z, teacher ODE output y, labels) pairs: EDM's deterministic Heun sampler (churn 0)
    with `num_steps` steps, as DMD builds its regression pairs (arXiv 2311.18828, Appendix B: 256
    steps on ImageNet-64, 18 on CIFAR-10)."""
    return sample(teacher, key, n, shape, label_dim, "heun", num_steps)
