"""Convert an official EDM network pickle (or a DMD2 generator state dict) into a jaxdistill
teacher run directory.

    python -m jaxdistill.convert.edm_pickle edm-cifar10-32x32-uncond-vp.pkl OUT_DIR

Sources and facts:
- Pickle layout and persistence: see `jaxdistill/convert/torch_pickle.py` (NVlabs/edm
  training/training_loop.py, torch_utils/persistence.py).  SiD's released generators
  (mingyuanzhou/SiD training/sid_training_loop.py: `dict(ema=G_ema)`, G a copy of the EDM teacher)
  are the same format.
- Architecture: the `EDMPrecond` object's inner `model` (a `SongUNet` -- DDPM++ / NCSN++ -- or a
  `DhariwalUNet` -- ADM) records its constructor keyword arguments (`_init_kwargs`, written by the
  persistence decorator); missing ones take the defaults of NVlabs/edm training/networks.py, which
  `EDM_DEFAULTS` repeats.  `EDMPrecond.sigma_data` sets `config.model.sigma_data`.
- DMD2's ImageNet-64 generator (tianweiy/DMD2, `pytorch_model.bin` written by accelerate's
  `save_state`) is a bare `state_dict()` of an `EDMPrecond(DhariwalUNet)` built by
  main/edm/edm_network.py `get_imagenet_edm_config` (64x64, label_dim 1000, model_channels 192,
  channel_mult [1,2,3,4], num_blocks 3, attention at 32/16/8, no augment, sigma_data 0.5).  It
  records no architecture, so a preset names it (default `adm_imagenet64`, i.e. exactly that
  network) and every parameter's name and shape is checked against it.  Before that, the keys
  that identify an EDMPrecond state dict (`model.map_layer0/1`, the first encoder conv
  `model.enc.<R>x<R>_conv`, and `model.out_norm/out_conv` for ADM or the full-resolution
  decoder's `model.dec.<R>x<R>_aux_norm/aux_conv` for DDPM++ / NCSN++) must be present and
  agree with the given architecture; any other state dict is refused.
- Parameter mapping (the naming rule in jaxdistill/networks/songunet.py and dhariwal.py):
  `model.enc.<name>.<...>.weight` -> params['enc_<name>'][...]['kernel'] with conv weights OIHW ->
  HWIO and linear weights (out, in) -> (in, out); GroupNorm `weight` -> `scale`; NCSN++'s random
  Fourier frequencies `model.map_noise.freqs` -> buffers['map_noise']['freqs'].  The
  `resample_filter` buffers are constants of the architecture: they are checked, not copied.

The run directory holds `checkpoints/0/{state,meta}` in the layout an EDM training run writes
(jaxdistill/checkpoint.py): state {'step', 'net': {'emas': {'ema': params}, 'consts'}} (the
layout of an EDM run's `EDMState.net`) and meta with the full config (method 'edm',
config.network = the converted network), which is what `jaxdistill.teacher.load`
reads for `config.teacher.kind='checkpoint'`.  Only the EMA weights are written (no optimizer
state), so the directory is a teacher, not a resumable EDM run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import zipfile

import flax
import jax
import numpy as np

from jaxdistill import checkpoint, errors, networks
from jaxdistill.config import base_config
from jaxdistill.convert import torch_pickle
from jaxdistill.networks import presets
from jaxdistill.networks.denoiser import EDMDenoiser
from jaxdistill.networks.layers import resample_filter_2d
from jaxdistill.teacher import _normalise

EDM_DEFAULTS = {
    "SongUNet": ("songunet", dict(
        label_dim=0, augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2),
        channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10, label_dropout=0.0,
        embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
        decoder_type="standard", resample_filter=(1, 1))),
    "DhariwalUNet": ("dhariwal", dict(
        label_dim=0, augment_dim=0, model_channels=192, channel_mult=(1, 2, 3, 4),
        channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10,
        label_dropout=0.0)),
}
REQUIRED_KWARGS = ("img_resolution", "in_channels", "out_channels")
_SEQUENCE_KWARGS = ("channel_mult", "attn_resolutions", "resample_filter")
_FLOAT_KWARGS = ("dropout", "label_dropout")

# `jaxdistill.networks.presets` functions that can name the architecture of a bare state dict.
STATE_DICT_PRESETS = ("adm_imagenet64", "ddpmpp_cifar10", "ncsnpp_cifar10")
# Network name -> (EDM class, the presets of that layout).
_LAYOUTS = {"dhariwal": ("DhariwalUNet (ADM)", ("adm_imagenet64",)),
            "songunet": ("SongUNet (DDPM++ / NCSN++)", ("ddpmpp_cifar10", "ncsnpp_cifar10"))}
_FIRST_CONV = re.compile(r"model\.enc\.(\d+)x\1_conv\.weight")


class UnrecognisedStateDictError(ValueError):
    """A torch.save state dict whose keys are not those of an EDMPrecond of the given layout."""


@dataclasses.dataclass
class Source:
    """What a checkpoint file holds: the network config, sigma_data and the torch tensors."""
    network: dict                      # config.teacher.network: name + constructor fields
    sigma_data: float
    tensors: dict                      # torch state_dict name -> numpy array
    description: str
    mismatch_hint: str = ""            # what to do when the tensors do not fit `network`


def network_config(class_name: str, init_kwargs: dict) -> dict:
    """jaxdistill network config (name + fields) for EDM's `SongUNet` / `DhariwalUNet` kwargs."""
    if class_name not in EDM_DEFAULTS:
        raise ValueError(f"EDMPrecond wraps a {class_name!r}; only {sorted(EDM_DEFAULTS)} can be "
                         "converted")
    name, defaults = EDM_DEFAULTS[class_name]
    unknown = sorted(set(init_kwargs) - set(defaults) - set(REQUIRED_KWARGS))
    if unknown:
        raise ValueError(f"{class_name} was built with arguments jaxdistill's {name!r} network "
                         f"does not have: {unknown}")
    missing = [k for k in REQUIRED_KWARGS if k not in init_kwargs]
    if missing:
        raise ValueError(f"{class_name}: the pickle records no {missing} in its init kwargs")
    kwargs = {**{k: init_kwargs[k] for k in REQUIRED_KWARGS}, **defaults,
              **{k: v for k, v in init_kwargs.items() if k not in REQUIRED_KWARGS}}
    for k in _SEQUENCE_KWARGS:
        if k in kwargs:
            kwargs[k] = tuple(int(v) for v in kwargs[k])
    for k in _FLOAT_KWARGS:
        kwargs[k] = float(kwargs[k])
    return {"name": name, **kwargs, "remat": False}


def read_edm_pickle(path: str, key: str = "ema") -> Source:
    """The `EDMPrecond` network stored under `key` of an EDM-format pickle (EDM, SiD)."""
    data = torch_pickle.load_edm_pickle(path)
    if key not in data:
        raise ValueError(f"{path}: no {key!r} entry in the pickle (keys: "
                         f"{sorted(map(str, data))[:10]}): pass --key with the entry that holds "
                         "the EDMPrecond network, or give an EDM network-snapshot-*.pkl")
    precond = data[key]
    found = getattr(precond, "class_name", type(precond).__name__)
    if found != "EDMPrecond":
        raise ValueError(f"{path}[{key!r}] is a {found}; only EDMPrecond (EDM preconditioning) "
                         "networks can be converted (VP/VE/iDDPM preconditioners use other "
                         "c_skip/c_out/c_in/c_noise)")
    model = precond.state.get("_modules", {}).get("model")
    if not isinstance(model, torch_pickle.PickledModule):
        raise ValueError(f"{path}: EDMPrecond has no 'model' submodule: "
                         f"{torch_pickle.REDOWNLOAD}")
    init_kwargs = model.state.get("_init_kwargs")
    if init_kwargs is None or model.state.get("_init_args"):
        raise ValueError(f"{path}: {model.class_name} recorded no keyword init arguments "
                         "(persistence `_init_kwargs`), so its architecture is unknown: "
                         "save it with torch.save(net.state_dict()) and convert that with "
                         "--preset")
    try:
        network = network_config(model.class_name, dict(init_kwargs))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    sigma_data = float(precond.state.get("sigma_data", 0.5))
    tensors = torch_pickle.module_tensors(precond)
    return Source(network, sigma_data, tensors,
                  f"EDMPrecond({model.class_name}) from {os.path.basename(path)}[{key!r}]",
                  "its tensors do not fit the architecture the pickle records: "
                  + torch_pickle.REDOWNLOAD)


def preset_network(preset: str, label_dim: int | None = None) -> dict:
    """Network config of a `jaxdistill.networks.presets` function for bare state dicts."""
    if preset not in STATE_DICT_PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {STATE_DICT_PRESETS}")
    kwargs = {} if label_dim is None else {"label_dim": label_dim}
    name = "dhariwal" if preset == "adm_imagenet64" else "songunet"
    return {"name": name, **getattr(presets, preset)(**kwargs)}


def state_dict_layout(tensors) -> tuple[str, int] | None:
    """(network name, img_resolution) of an EDMPrecond state dict, judged from the keys that
    identify its layout, or None when they are not all there."""
    keys = set(tensors)
    resolutions = {int(m.group(1)) for k in keys if (m := _FIRST_CONV.fullmatch(k))}
    if (len(resolutions) != 1 or not all(k.startswith("model.") for k in keys)
            or not {"model.map_layer0.weight", "model.map_layer1.weight"} <= keys):
        return None
    (res,) = resolutions
    dhariwal = {"model.out_norm.weight", "model.out_conv.weight"} <= keys
    songunet = {f"model.dec.{res}x{res}_aux_norm.weight",
                f"model.dec.{res}x{res}_aux_conv.weight"} <= keys
    if dhariwal == songunet:
        return None
    return ("dhariwal" if dhariwal else "songunet"), res


def check_state_dict_layout(path: str, tensors: dict, network: dict) -> None:
    """Refuses a state dict that is not an EDMPrecond of `network`'s kind and resolution."""
    layout = state_dict_layout(tensors)
    if layout is None:
        names = sorted(tensors)
        shown = ", ".join(repr(k) for k in names[:4]) + (", ..." if len(names) > 4 else "")
        raise UnrecognisedStateDictError(
            f"{path}: not an EDMPrecond state dict (EDM / DMD2 layout): expected the keys "
            "'model.map_layer0.weight', 'model.map_layer1.weight', "
            "'model.enc.<R>x<R>_conv.weight' and either 'model.out_norm.weight' + "
            "'model.out_conv.weight' (ADM) or 'model.dec.<R>x<R>_aux_norm.weight' + "
            f"'model.dec.<R>x<R>_aux_conv.weight' (DDPM++ / NCSN++), but its {len(names)} "
            f"entries are {shown}: give an EDM network pickle or the state_dict() of an "
            "EDMPrecond network (e.g. DMD2's pytorch_model.bin)")
    name, res = layout
    if network.get("name") not in _LAYOUTS:
        return
    if name != network["name"]:
        found, presets_of = _LAYOUTS[name]
        raise UnrecognisedStateDictError(
            f"{path}: holds a {found} state dict, but the architecture given is a "
            f"{_LAYOUTS[network['name']][0]}: pass --preset "
            f"{' or '.join(presets_of)} (or the matching network)")
    if res != network.get("img_resolution"):
        raise UnrecognisedStateDictError(
            f"{path}: holds a {res}x{res} network, but the architecture given is "
            f"{network.get('img_resolution')}x{network.get('img_resolution')}: pass the "
            "preset (or network) of the file's resolution")


def read_state_dict(path: str, network: dict, sigma_data: float = 0.5) -> Source:
    """A `torch.save`d EDMPrecond state dict (e.g. DMD2's generator) with a given architecture;
    a state dict of another layout is refused (UnrecognisedStateDictError)."""
    tensors = torch_pickle.load_state_dict(path)
    check_state_dict_layout(path, tensors, network)
    return Source(network, sigma_data, tensors,
                  f"EDMPrecond state dict from {os.path.basename(path)}",
                  "the file's architecture differs from the one given: pass the matching "
                  "--preset and --label-dim (or network)")


def read_checkpoint(path: str, *, key: str = "ema", network: dict | None = None) -> Source:
    """Reads either format: torch.save zip archives are state dicts of the architecture `network`
    (default: `adm_imagenet64`, DMD2's ImageNet-64 generator), other files EDM pickles."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        return read_state_dict(path, network or preset_network("adm_imagenet64"))
    return read_edm_pickle(path, key)


# ----------------------------------------------------------------------------------------------
# Torch names and layouts -> flax variables.

def torch_name(path: tuple) -> str:
    """EDMPrecond state_dict name of a flax variable path (collection stripped)."""
    top, *inner, leaf = path
    if top.startswith(("enc_", "dec_")):
        top = f"{top[:3]}.{top[4:]}"
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "freqs": "freqs"}[leaf]
    return ".".join(["model", top, *inner, torch_leaf])


def _torch_shape(flax_shape: tuple) -> tuple:
    if len(flax_shape) == 4:           # HWIO -> OIHW
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if len(flax_shape) == 2:           # (in, out) -> (out, in)
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def _to_flax(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)
    elif array.ndim == 2:
        array = array.T
    return np.ascontiguousarray(array, dtype=np.float32)


def build_denoiser(network: dict):
    return EDMDenoiser(networks.create(network["name"], **{k: v for k, v in network.items()
                                                           if k != "name"}))


def _image_shape(network: dict) -> tuple:
    return (network["img_resolution"], network["img_resolution"], network["in_channels"])


def flax_variable_paths(network: dict) -> dict:
    """{flax variable path (collection first): EDM state_dict name} for `network`."""
    denoiser = build_denoiser(network)
    abstract = jax.eval_shape(lambda: denoiser.init(jax.random.key(0), _image_shape(network),
                                                    network["label_dim"]))
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
    return {path: (torch_name(path[1:]), _torch_shape(leaf.shape)) for path, leaf in flat.items()}


def expected_torch_shapes(network: dict) -> dict:
    """EDM state_dict names and shapes the network of `network` is converted from, without the
    `resample_filter` buffers."""
    return dict(flax_variable_paths(network).values())


def to_flax_variables(tensors: dict, network: dict, where: str = "the checkpoint",
                      hint: str = "") -> dict:
    """{'params': ..., ['buffers': ...]} for `network` from torch state_dict tensors.

    Every variable the flax network has must be in `tensors` with the matching (torch) shape,
    and every tensor must be used, except the `resample_filter` constants, which must equal the
    filter the config implies.  Errors name the parameter, start with `where` and end with
    `hint` (what to do), if given.
    """
    def fail(message):
        raise ValueError(f"{where}: {message}" + (f": {hint}" if hint else ""))

    paths = flax_variable_paths(network)
    flat = {}
    for path, (name, want) in paths.items():
        if name not in tensors:
            fail(f"no parameter {name!r}, which the {network['name']} network needs for "
                 f"{'/'.join(path)}")
        if tuple(tensors[name].shape) != want:
            fail(f"parameter {name!r} has shape {tuple(tensors[name].shape)} in the checkpoint, "
                 f"but the {network['name']} network config expects {want}")
        flat[path] = _to_flax(tensors[name])
    used = {name for name, _ in paths.values()}
    taps = network.get("resample_filter", (1, 1))
    expected_filter = resample_filter_2d(taps)
    unexpected = []
    for name in sorted(set(tensors) - used):
        if name.endswith(".resample_filter"):
            value = np.asarray(tensors[name])
            if value.size != expected_filter.size or not np.allclose(
                    value.reshape(expected_filter.shape), expected_filter, atol=1e-7):
                fail(f"buffer {name!r} is not the resample filter {list(taps)} of the network "
                     "config")
        else:
            unexpected.append(name)
    if unexpected:
        fail(f"parameters the {network['name']} network config does not use: "
             f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    return flax.traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------
# Writing the teacher run directory.

def teacher_config(network: dict, sigma_data: float):
    """The config a converted run directory records (EDM teacher with `network`)."""
    c = base_config()
    c.method.name = "edm"
    c.model.update(shape=_image_shape(network), label_dim=network["label_dim"],
                   sigma_data=sigma_data)
    c.network = network
    return c


def write_teacher_run(out_dir: str, variables: dict, network: dict, sigma_data: float,
                      source: dict) -> None:
    """Writes `out_dir/checkpoints/0/{state,meta}` as an EDM run would; refuses to overwrite."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; choose an empty OUT_DIR")
    consts = {k: v for k, v in variables.items() if k != "params"}
    state = {"step": np.zeros((), np.int32),
             "net": {"emas": {"ema": variables["params"]}, "consts": consts}}
    config = teacher_config(network, sigma_data)
    mngr = checkpoint.manager(ckpt_dir, keep=1)
    checkpoint.save(mngr, 0, state, {
        "step": 0, "method": "edm", "config": checkpoint.config_json(config),
        "teacher": {"kind": "none", "checkpoint": ""}, "converted_from": source})
    mngr.wait_until_finished()
    mngr.close()


def preset_expression(network: dict) -> str | None:
    """`presets.xxx(...)` call whose config equals `network` as teacher.load compares them."""
    candidates = {}
    for fn in ("ddpmpp_cifar10", "ncsnpp_cifar10"):
        for label_dim in (0, 10):
            for augment_dim in (9, 0):
                candidates[f"presets.{fn}(label_dim={label_dim}, augment_dim={augment_dim})"] = \
                    {"name": "songunet", **getattr(presets, fn)(label_dim, augment_dim)}
    candidates["presets.adm_imagenet64(label_dim=1000)"] = {"name": "dhariwal",
                                                            **presets.adm_imagenet64(1000)}
    for expr, cand in candidates.items():
        if _normalise(_json_like(cand)) == _normalise(_json_like(network)):
            return expr
    return None


def _json_like(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def convert(path: str, out_dir: str, *, key: str = "ema", network: dict | None = None) -> dict:
    """Converts `path` into the teacher run directory `out_dir`; returns a summary dict.

    `network` is the architecture of a bare state dict (EDM pickles record their own).
    """
    source = read_checkpoint(path, key=key, network=network)
    variables = to_flax_variables(source.tensors, source.network, where=path,
                                  hint=source.mismatch_hint)
    num_params = int(sum(np.size(v) for v in jax.tree.leaves(variables["params"])))
    write_teacher_run(out_dir, variables, source.network, source.sigma_data,
                      {"file": os.path.abspath(path), "what": source.description})
    return {"network": source.network, "sigma_data": source.sigma_data,
            "shape": _image_shape(source.network), "label_dim": source.network["label_dim"],
            "num_params": num_params, "description": source.description,
            "preset": preset_expression(source.network), "out_dir": os.path.abspath(out_dir)}


def config_instructions(summary: dict) -> str:
    """What to set in a distillation config to use the converted teacher."""
    net = summary["network"]
    network_expr = (f"dict(name={net['name']!r}, **{summary['preset']})" if summary["preset"]
                    else "dict(" + ", ".join(f"{k}={v!r}" for k, v in net.items()) + ")")
    return "\n".join([
        f"Converted {summary['description']}: {summary['num_params']:,} parameters -> "
        f"{summary['out_dir']}",
        "Set in your config:",
        "  config.teacher.kind = 'checkpoint'",
        f"  config.teacher.checkpoint = {summary['out_dir']!r}",
        f"  config.teacher.network = {network_expr}",
        f"  config.model.shape = {tuple(summary['shape'])}",
        f"  config.model.label_dim = {summary['label_dim']}",
        f"  config.model.sigma_data = {summary['sigma_data']}",
        "or, where the config file already has this teacher network (e.g. configs/ctm_cifar10.py "
        "for the CIFAR-10 DDPM++ pickles):",
        f"  --config.teacher.kind=checkpoint --config.teacher.checkpoint={summary['out_dir']}",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdistill.convert.edm_pickle",
        description="Convert an EDM network pickle (EDM, SiD) or a DMD2 generator state dict "
                    "into a jaxdistill teacher run directory.")
    parser.add_argument("checkpoint", help="network-snapshot-*.pkl / edm-*.pkl, or a torch.save "
                                           "state dict (.bin/.pt) of an EDMPrecond")
    parser.add_argument("out_dir", help="new run directory for config.teacher.checkpoint")
    parser.add_argument("--key", default="ema", help="pickle entry holding the network")
    parser.add_argument("--preset", default="adm_imagenet64", choices=STATE_DICT_PRESETS,
                        help="architecture of a bare state dict (default: DMD2's ImageNet-64 "
                             "generator, EDM's ADM)")
    parser.add_argument("--label-dim", type=int, default=None,
                        help="label_dim for --preset (default: the preset's)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the traceback of an error (also JAXDISTILL_VERBOSE=1)")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.checkpoint, args.out_dir, key=args.key,
                          network=preset_network(args.preset, args.label_dim))
    except Exception as e:  # noqa: BLE001  user errors become one line, others keep a traceback
        message = errors.one_line(e)
        if message is None or args.verbose or errors.verbose_requested([]):
            raise
        print(message, file=sys.stderr)
        return 2
    print(config_instructions(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
