"""The shipped configs by name, for notebooks and tests.

    from jaxdistill import configs
    configs.names()                          # ['ctm_cifar10', 'ctm_digits', ...]
    cfg = configs.get("ctm_mixture2d")       # = configs/ctm_mixture2d.py's get_config()
    cfg = configs.get("edm_cifar10", "cond") # = --config=configs/edm_cifar10.py:cond
    cfg = configs.get("edm_cifar10:cond")    # the same
    cfg = configs.get("dmd2_mixture2d", tiny=True)  # shrunk to run in seconds (tests, notebooks)

The files are the top-level `configs/*.py` of the repository (`run.py --config=configs/x.py` reads
the same files). A wheel ships them as `jaxdistill/shipped_configs/` (pyproject.toml maps that
package onto `configs/`); a checkout or an editable install reads `configs/` itself. The config
schema (`base_config`) is jaxdistill/config.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections as mlc

_PACKAGE = "jaxdistill.shipped_configs"


def directory() -> Path:
    """The directory holding the shipped config files."""
    here = Path(__file__).resolve().parent
    shipped = here / "shipped_configs"  # a wheel install
    if shipped.is_dir():
        return shipped
    checkout = here.parent / "configs"  # the repository (checkout, pip install -e .)
    if checkout.is_dir() and (checkout / "edm_mixture2d.py").is_file():
        return checkout
    try:  # any other layout a package finder maps (e.g. an editable install's finder)
        spec = importlib.util.find_spec(_PACKAGE)
    except ImportError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    raise FileNotFoundError(f"no shipped configs: neither {shipped} nor {checkout} exists; "
                            "reinstall jaxdistill")


def names() -> list[str]:
    """The names `get` accepts (config files without `.py`), sorted."""
    return sorted(p.stem for p in directory().glob("*.py") if not p.stem.startswith("_"))


def path(name: str) -> Path:
    """The file of the shipped config `name` (e.g. to pass as `run.py --config=...`)."""
    known = names()
    if name not in known:
        raise ValueError(f"unknown config {name!r}: the shipped configs are {', '.join(known)}")
    return directory() / f"{name}.py"


def get(name: str, arg: str | None = None, *, tiny: bool = False) -> mlc.ConfigDict:
    """The shipped config `name` (`get_config(arg)`, or `get_config()` when `arg` is None); `name`
    may also be 'name:arg' as on the command line. `tiny=True` shrinks it (see `tiny`)."""
    if arg is None and ":" in name:
        name, arg = name.split(":", 1)
    file = path(name)
    module_spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.{name}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    return shrink(cfg) if tiny else cfg


def shrink(cfg: mlc.ConfigDict, num_steps: int = 20, batch_size: int = 64) -> mlc.ConfigDict:
    """A copy of `cfg` small enough to train in seconds on a CPU: `num_steps` steps of
    `batch_size` examples (never more than the config's own), narrow networks, few evaluation and
    grid samples, one checkpoint at the end; phases counted in steps (DMD2's teacher score
    matching, the GAN start) scaled into the shorter run, DMD's regression pairs cut down.
    Data, method and sampler stay as they are; the student and a checkpoint teacher's network
    shrink alike (a checkpoint teacher must then be a tiny run too). Also available as `tiny`."""
    cfg = cfg.copy_and_resolve_references()
    tc = cfg.train
    old_steps = max(int(tc.num_steps), 1)
    steps = min(old_steps, num_steps)
    tc.update(num_steps=steps, batch_size=min(int(tc.batch_size), batch_size), log_every=steps,
              ckpt_every=steps, sample_every=steps, num_grid_samples=min(tc.num_grid_samples, 64),
              eval_every=0)
    cfg.eval.update(num_samples=min(cfg.eval.num_samples, 256),
                    batch_size=min(cfg.eval.batch_size, 256),
                    feature_batch_size=min(cfg.eval.feature_batch_size, 64))
    _shrink_network(cfg.network)
    if cfg.teacher.kind == "checkpoint":
        _shrink_network(cfg.teacher.network)
    mc = cfg.method
    for field in ("tsm_steps", "gan_start_step"):  # phase boundaries: the same share of the run
        if mc.get(field, 0) > 0:
            mc[field] = steps if mc[field] >= old_steps else max(1, mc[field] * steps // old_steps)
    if "regression_pairs" in mc:
        mc.regression_pairs = min(mc.regression_pairs, 4 * cfg.train.batch_size)
    if "regression_heun_steps" in mc:
        mc.regression_heun_steps = min(mc.regression_heun_steps, 8)
    return cfg


tiny = shrink


def _shrink_network(net: mlc.ConfigDict) -> None:
    """Fewer / narrower layers, whatever the network: the fields it has that set its size."""
    caps = {"hidden": 32, "depth": 2, "embed": 32, "model_channels": 16, "num_blocks": 1,
            "channel_mult_emb": 2}
    for field, cap in caps.items():
        if field in net:
            net[field] = min(net[field], cap)
    if "channel_mult" in net and len(net.channel_mult) > 2:
        net.channel_mult = tuple(net.channel_mult)[:2]
    if "attn_resolutions" in net:
        net.attn_resolutions = ()

