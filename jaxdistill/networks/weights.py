"""Reading user-supplied pretrained weights (torch state dicts as .pth, or .npz) into Flax trees.

Shared by every network with a weights file (`deit`, `efficientnet`, `lpips`, the FID Inception).  Nothing is downloaded: a missing
file raises FileNotFoundError with the caller's instructions (which file, where it goes).  torch is
imported only when a .pth file is actually read, never at module import.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Wrappers some releases put around the state dict (e.g. facebookresearch/deit's {'model': ...}).
_WRAPPER_KEYS = ("model", "state_dict")


def torch_uniform(fan_in: int) -> Callable:
    """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weight and bias)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


TORCH_PIN = "torch==2.14.1"
_SAVEZ_HINT = ("convert the file once elsewhere with numpy.savez(dst, **{k: v.numpy() for k, v in "
               "state_dict.items()}) and point at the .npz")


def timm_missing_message(what: str, config_field: str, timm_name: str, url: str,
                         origin: str = "the file timm loads") -> str:
    """What to download and where to point the config, for a timm backbone's weights."""
    return (f"{what} weights not found: set {config_field} to timm's {timm_name!r} state dict, "
            f"e.g. {url} ({origin}), or torch.save(timm.create_model({timm_name!r}, "
            f"pretrained=True).state_dict(), '{timm_name}.pth') on a machine with internet; an "
            f".npz with the same keys works without torch.  Nothing is downloaded automatically")


def read_state_dict(path: str, missing_message: str, convert_hint: str = _SAVEZ_HINT) -> dict:
    """{key: numpy array} from a torch .pth/.pt file (weights_only) or an .npz with the same keys.

    Raises FileNotFoundError(missing_message) when `path` is empty or not a file, and an
    ImportError naming `convert_hint` when a .pth must be read without torch installed.
    """
    path = os.fspath(path or "")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{missing_message} (looked for {path!r})")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    try:
        import torch  # noqa: PLC0415  (optional dependency, only for .pth files)
    except ImportError as e:
        raise ImportError(f"Reading {path!r} needs PyTorch, which jaxdistill does not depend on: "
                          f"`pip install {TORCH_PIN}`, or {convert_hint}") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPER_KEYS:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def take(state: Mapping[str, np.ndarray], key: str, shape: Sequence[int], source: str,
         layout: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> jax.Array:
    """state[key] as float32 after checking its (torch-layout) shape, then mapped by `layout`.

    Errors name the parameter and the file (`source`).
    """
    if key not in state:
        raise KeyError(f"{source}: parameter {key!r} is missing (keys found: "
                       f"{sorted(state)[:8]}...)")
    value = np.asarray(state[key], np.float32)
    if value.shape != tuple(shape):
        raise ValueError(f"{source}: parameter {key!r} has shape {value.shape}, the configured "
                         f"network expects {tuple(shape)}")
    return jnp.asarray(layout(value))


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch conv weight (O, I, kh, kw) -> Flax HWIO."""
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Flax (in, out)."""
    return w.T
