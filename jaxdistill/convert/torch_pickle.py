"""Reading PyTorch checkpoints as plain numpy arrays without running code stored in them.

Two formats are read:

- EDM network pickles (`network-snapshot-*.pkl`, `edm-*.pkl`; SiD's released generators are the
  same format): a plain `pickle.dump` of a dict such as `dict(ema=<EDMPrecond>, loss_fn=...,
  augment_pipe=..., dataset_kwargs=...)` (NVlabs/edm training/training_loop.py; SiD saves
  `dict(ema=G_ema)`, mingyuanzhou/SiD training/sid_training_loop.py).  Every network class is
  decorated with `torch_utils.persistence.persistent_class`, whose `__reduce__` pickles the call
  `torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = dict(type='class',
  version=6, module_src=<source text of the module>, class_name=<e.g. 'EDMPrecond'>,
  state=<the module's __dict__>) (NVlabs/edm torch_utils/persistence.py).  The official loader
  `exec`s `module_src`; here that call is replaced by a stub that keeps `class_name` and `state`
  and never looks at the source.  Submodule containers (`torch.nn.ModuleDict`) are ordinary
  pickled objects whose `__dict__` is restored into the same kind of stub.
- `torch.save` state dicts (`.bin` / `.pt` / `.pth`, e.g. DMD2's `pytorch_model.bin`), read with
  `torch.load(weights_only=True)`, torch's own allow-list unpickler.

Tensors inside EDM pickles are `torch._utils._rebuild_parameter(_rebuild_tensor_v2(storage, ...))`
with each storage pickled as `torch.storage._load_from_bytes(<legacy torch.save bytes>)`
(torch/_tensor.py `_reduce_ex_internal`, torch/storage.py `TypedStorage.__reduce__`); the bytes
are opened with `torch.load(weights_only=True)`.  Everything else a pickle may name is refused with
an error that names it.  torch is imported only when a file is read (`pip install
jaxdistill[convert]`), never when jaxdistill is imported.
"""
from __future__ import annotations

import collections
import io
import os
import pickle

import numpy as np
from numpy._core.multiarray import scalar as _numpy_scalar

# Persistent classes the EDM code base (and SiD's / DMD2's copies of it) pickles: networks
# (training/networks.py), losses (training/loss.py) and the augmentation pipe (training/augment.py).
KNOWN_PERSISTENT_CLASSES = frozenset({
    "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
    "SongUNet", "DhariwalUNet", "VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond",
    "VPLoss", "VELoss", "EDMLoss", "AugmentPipe",
})


class UnsupportedPickleError(ValueError):
    """The file names a class or function the restricted unpickler does not rebuild."""


class PickledModule:
    """A torch module read from a pickle: its class name and its `__dict__` (never executed).

    `state['_parameters']`, `state['_buffers']` and `state['_modules']` are the module's own
    tensors (numpy arrays) and submodules; other entries are its plain attributes, e.g.
    `_init_kwargs` recorded by EDM's persistence decorator.
    """

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    def __repr__(self):
        return f"PickledModule({self.class_name})"


class _PickledModuleDict(PickledModule):
    """Stands in for `torch.nn.ModuleDict`: pickle creates it with `__new__` and restores its
    `__dict__` through `__setstate__`."""

    def __setstate__(self, state):
        self.class_name = "torch.nn.ModuleDict"
        self.state = dict(state)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading PyTorch checkpoints needs torch: pip install "
                          "'jaxdistill[convert]'") from e
    return torch


def _to_numpy(tensor) -> np.ndarray:
    """float32 numpy copy of a floating tensor (fp16 / bf16 included), other dtypes unchanged."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.numpy().copy()


def _reconstruct_persistent_obj(meta):
    """Replaces `torch_utils.persistence._reconstruct_persistent_obj`: no source is executed."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or "class_name" not in meta:
        raise UnsupportedPickleError("torch_utils.persistence object without the expected "
                                     "meta dict (type='class', class_name, state)")
    name = meta["class_name"]
    if name not in KNOWN_PERSISTENT_CLASSES:
        raise UnsupportedPickleError(
            f"the pickle contains the persistent class {name!r}, which is not one of EDM's "
            f"known classes {sorted(KNOWN_PERSISTENT_CLASSES)}")
    return PickledModule(name, dict(meta.get("state") or {}))


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    del requires_grad, backward_hooks, state
    return data


def _allowed_globals() -> dict:
    torch = _torch()

    def rebuild_tensor(*args):
        return _to_numpy(torch._utils._rebuild_tensor_v2(*args))

    def load_storage(data: bytes):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    return {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): load_storage,
        ("torch.nn.modules.container", "ModuleDict"): _PickledModuleDict,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        # dnnlib.EasyDict is a dict with attribute access (NVlabs/edm dnnlib/util.py).
        ("dnnlib.util", "EasyDict"): dict,
        ("dnnlib", "EasyDict"): dict,
        # EDM keeps numpy floats as attributes (e.g. UNetBlock.skip_scale = np.sqrt(0.5)).
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self._allowed = _allowed_globals()

    def find_class(self, module, name):
        found = self._allowed.get((module, name))
        if found is None:
            raise UnsupportedPickleError(
                f"refusing to load {module}.{name} from the pickle: only EDM's persistent "
                "network objects (torch_utils.persistence), torch tensors and plain containers "
                "are rebuilt, and no code stored in the file is run")
        return found


def _check_file(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")


def load_edm_pickle(path: str) -> dict:
    """The top-level dict of an EDM-format pickle, networks as `PickledModule`s.

    Raises FileNotFoundError for a missing file and UnsupportedPickleError (a ValueError) naming
    the first class or function the file asks for that is not on the allow-list.
    """
    _check_file(path)
    with open(path, "rb") as f:
        data = _RestrictedUnpickler(f).load()
    if not isinstance(data, dict):
        raise UnsupportedPickleError(f"{path}: expected a pickled dict (EDM snapshot layout, "
                                     f"e.g. with key 'ema'), got {type(data).__name__}")
    return data


def module_tensors(module: PickledModule, prefix: str = "") -> dict[str, np.ndarray]:
    """Parameters and persistent buffers by their torch `state_dict()` names."""
    out = {}
    state = module.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in state.get("_parameters", {}).items():
        if value is not None:
            out[prefix + name] = value
    for name, value in state.get("_buffers", {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict (name -> tensor) as numpy arrays, via weights_only loading."""
    _check_file(path)
    torch = _torch()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsupportedPickleError(f"{path}: not a plain torch state dict ({e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UnsupportedPickleError(f"{path}: expected a dict of tensors (a state_dict), got "
                                     f"{type(sd).__name__}")
    return {k: _to_numpy(v) for k, v in sd.items()}
