"""Test session setup: 8 fake CPU devices (sharding tests), quiet logs, optional compile cache."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Shared helpers tests import (`from conftest import ROOT, load_config`): the repository root and
# the shipped configs by name (jaxdistill.configs.get(name, arg=None, tiny=False)).
import pathlib  # noqa: E402

from jaxdistill.configs import get as load_config  # noqa: E402,F401

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_gmm_table():
    """benchmarks/gmm_table.py as a module, imported once per process (it defines its absl flags
    only when run as a script, so importing it beside run.py is safe)."""
    import importlib.util
    import sys

    if "gmm_table" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gmm_table",
                                                      ROOT / "benchmarks" / "gmm_table.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["gmm_table"] = module
    return sys.modules["gmm_table"]
