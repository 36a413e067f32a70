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
import re
import zipfile

import numpy as np
from numpy._core.multiarray import scalar as _numpy_scalar

from jaxdistill import errors

# Persistent classes the EDM code base (and SiD's / DMD2's copies of it) pickles: networks
# (training/networks.py), losses (training/loss.py) and the augmentation pipe (training/augment.py).
KNOWN_PERSISTENT_CLASSES = frozenset({
    "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
    "SongUNet", "DhariwalUNet", "VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond",
    "VPLoss", "VELoss", "EDMLoss", "AugmentPipe",
})


class UnsupportedPickleError(ValueError):
    """The file names a class or function the restricted unpickler does not rebuild."""


class UnreadableCheckpointError(ValueError):
    """The file is empty, truncated, damaged, or not a pickle / torch.save archive at all."""


class TorchMissingError(errors.UserError, ImportError):
    """Reading a PyTorch checkpoint needs torch, which is not installed."""

# What to do about a file that cannot be read at all.
REDOWNLOAD = ("re-download (or re-copy) the official file: an EDM network-snapshot-*.pkl / "
              "edm-*.pkl, or a torch.save state dict such as DMD2's pytorch_model.bin")
_MAX_DETAIL = 160
# The first object torch.save pickles in its legacy (non-zip, torch < 1.6) format.
_LEGACY_TORCH_MAGIC = 0x1950a86a20f9469cfc6c


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
        raise TorchMissingError("reading PyTorch checkpoints needs torch: pip install "
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
                                     "meta dict (type='class', class_name, state): only EDM's "
                                     "persistence format (NVlabs/edm) is read")
    name = meta["class_name"]
    if name not in KNOWN_PERSISTENT_CLASSES:
        raise UnsupportedPickleError(
            f"the pickle contains the persistent class {name!r}, which is not one of EDM's "
            f"known classes {sorted(KNOWN_PERSISTENT_CLASSES)}: only networks built by EDM's "
            "training/networks.py can be converted")
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
                "are rebuilt, and no code stored in the file is run: convert an EDM-format "
                "network pickle (NVlabs/edm, SiD) or a torch.save state dict")
        return found


def _one_line(text: str, limit: int = _MAX_DETAIL) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_file(path: str):
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file: give the path of "
                                "the .pkl / .bin / .pt file itself")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found: check the path (the "
                                ".pkl / .bin / .pt file to convert)")
    if os.path.getsize(path) == 0:
        raise UnreadableCheckpointError(f"{path}: the file is empty (0 bytes): {REDOWNLOAD}")


def _head(path: str, n: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def describe_unreadable(path: str, e: BaseException) -> str:
    """One line: `path`, what is wrong with the file (judged from its first bytes and the error
    reading it raised) and what to do."""
    head, size = _head(path), os.path.getsize(path)
    cause = _one_line(f"{type(e).__name__}: {e}")
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        what = (f"a truncated or damaged zip archive (torch.save format; {size} bytes; the zip "
                "directory at its end is missing)")
    elif head.startswith(b"PK\x03\x04"):
        what = (f"a zip archive that torch.load cannot read: not a torch.save file, or damaged "
                f"({size} bytes; {cause})")
    elif head.startswith(b"version https://git-lfs"):
        return (f"{path}: a Git LFS pointer file, not the checkpoint itself: run `git lfs pull` "
                "in its repository, or download the file directly")
    elif head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        what = "an HTML page, not a pickle (a failed download?)"
    elif isinstance(e, EOFError) or "truncated" in str(e):
        what = f"truncated or not a pickle: the data ends early ({size} bytes; {cause})"
    elif _looks_like_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()[0] if head.strip() else ""
        what = f"a text file, not a pickle (it starts with {_one_line(first, 40)!r})"
    else:
        what = f"damaged or not a pickle ({size} bytes; {cause})"
    return f"{path}: {what}: {REDOWNLOAD}"


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:           # the 512-byte cut may split a character
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def load_edm_pickle(path: str) -> dict:
    """The top-level dict of an EDM-format pickle, networks as `PickledModule`s.

    Raises FileNotFoundError for a missing file, UnsupportedPickleError (a ValueError) naming
    the first class or function the file asks for that is not on the allow-list, and
    UnreadableCheckpointError (a ValueError) for an empty, truncated or otherwise damaged file or
    one that is no pickle at all.  Every message is one line that starts with `path`.
    """
    _check_file(path)
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f).load()
    except UnsupportedPickleError as e:
        raise UnsupportedPickleError(f"{path}: {e}") from e
    except (ImportError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001  anything a damaged file makes the unpickler raise
        raise UnreadableCheckpointError(describe_unreadable(path, e)) from e
    if type(data) is int and data == _LEGACY_TORCH_MAGIC:
        raise UnsupportedPickleError(
            f"{path}: a torch.save file in the legacy (torch < 1.6) format, which is not read: "
            "re-save it with torch.save(torch.load(old), new) and convert the new file")
    if not isinstance(data, dict):
        raise UnsupportedPickleError(f"{path}: expected a pickled dict (EDM snapshot layout, "
                                     f"e.g. with key 'ema'), got {type(data).__name__}: "
                                     f"{REDOWNLOAD}")
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
    """A `torch.save`d state dict (name -> tensor) as numpy arrays, via weights_only loading.

    Errors (one line, starting with `path`): UnsupportedPickleError for an archive that asks for
    a class torch's weights_only loader does not rebuild or holds something other than a dict of
    tensors, UnreadableCheckpointError for a damaged or truncated file.
    """
    _check_file(path)
    torch = _torch()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (ImportError, PermissionError):
        raise
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if refused is None:
            raise UnreadableCheckpointError(describe_unreadable(path, e)) from e
        raise UnsupportedPickleError(
            f"{path}: not a plain torch state dict: it asks for {refused.group(1)}, which "
            "torch's weights_only loader does not rebuild (and no code stored in the file is "
            "run): save the network's state_dict() alone") from e
    except Exception as e:  # noqa: BLE001  a damaged archive raises RuntimeError, EOFError, ...
        raise UnreadableCheckpointError(describe_unreadable(path, e)) from e
    if not isinstance(sd, dict):
        raise UnsupportedPickleError(f"{path}: expected a dict of tensors (a state_dict), got "
                                     f"{type(sd).__name__}: save the network's state_dict()")
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        k = not_tensors[0]
        raise UnsupportedPickleError(
            f"{path}: expected a dict of tensors (a state_dict), but entry {str(k)!r} is a "
            f"{type(sd[k]).__name__} ({len(not_tensors)} of {len(sd)} entries are not tensors): "
            "save the network's state_dict() alone")
    return {k: _to_numpy(v) for k, v in sd.items()}
