"""jaxdistill.configs: shipped configs by name, from the checkout and from a built wheel; `tiny`."""
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from setuptools import find_packages

from jaxdistill import configs, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


def test_names_are_the_config_files():
    assert configs.names() == FILES
    assert configs.directory() == ROOT / "configs"
    assert configs.path("ctm_mixture2d") == ROOT / "configs" / "ctm_mixture2d.py"


def test_get_loads_by_name_and_arg():
    assert configs.get("ctm_mixture2d").method.name == "ctm"
    assert configs.get("dmd2_cifar10").method.name == "dmd2"
    assert configs.get("edm_cifar10").model.label_dim == 0
    assert configs.get("edm_cifar10", "cond").model.label_dim == 10
    assert configs.get("edm_cifar10:cond").model.label_dim == 10
    # Each call builds a fresh config: editing one changes no other.
    a = configs.get("edm_mixture2d")
    a.train.num_steps = 1
    assert configs.get("edm_mixture2d").train.num_steps != 1


def test_unknown_name_is_one_line_listing_the_names():
    with pytest.raises(ValueError) as e:
        configs.get("ctm_mixture3d")
    msg = str(e.value)
    assert "\n" not in msg and "'ctm_mixture3d'" in msg
    assert all(name in msg for name in FILES)


@pytest.mark.parametrize("name", FILES)
def test_tiny_is_small_and_valid(name):
    full, tiny = configs.get(name), configs.get(name, tiny=True)
    train.validate(tiny)
    assert tiny.train.num_steps == min(20, full.train.num_steps)
    assert tiny.train.batch_size <= 64 and tiny.eval.num_samples <= 256
    assert tiny.train.ckpt_every == tiny.train.sample_every == tiny.train.num_steps
    for field in ("hidden", "model_channels", "num_blocks"):
        if field in full.network:
            assert tiny.network[field] <= full.network[field]
            assert tiny.network[field] < full.network[field] or full.network[field] <= 32
    assert (tiny.data, tiny.model, tiny.method.name) == (full.data, full.model, full.method.name)
    if full.method.get("tsm_steps"):  # DMD2's warm-up stays a phase of the shorter run
        assert 0 < tiny.method.tsm_steps < tiny.train.num_steps
    assert configs.tiny(full).to_dict() == tiny.to_dict()
    assert full.train.num_steps == configs.get(name).train.num_steps  # `full` left unchanged


def test_pyproject_lists_every_package_and_ships_the_configs():
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = set(find_packages(where=str(ROOT), include=["jaxdistill*"]))
    assert set(setuptools_cfg["packages"]) == on_disk | {"jaxdistill.shipped_configs"}
    assert setuptools_cfg["package-dir"] == {"jaxdistill.shipped_configs": "configs"}


def test_wheel_ships_the_configs(tmp_path):
    """Build a wheel (from a copy of the sources), unpack it as site-packages would, and load
    configs by name from it in a fresh interpreter run outside the repository."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("jaxdistill", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(tmp_path / "w"),
                    "--no-deps", "--no-build-isolation", "-q"], check=True, capture_output=True)
    (wheel,) = (tmp_path / "w").glob("jaxdistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("jaxdistill/shipped_configs/")) == \
        [f"jaxdistill/shipped_configs/{f}.py" for f in FILES]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from jaxdistill import configs; print(configs.directory()); "
            "print(configs.get('edm_cifar10', 'cond').model.label_dim, len(configs.names()))")
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert out[0] == str(site / "jaxdistill" / "shipped_configs")
    assert out[1] == f"10 {len(FILES)}"
