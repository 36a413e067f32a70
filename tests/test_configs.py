"""Every shipped config loads, validates and builds its state (shapes only, no compile)."""
import pathlib
import sys

import jax
import pytest

from jaxdistill import methods, teacher, train
from jaxdistill.methods import common
from jaxdistill.methods.trainable import Trainable

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_edm import ROOT, load_config  # noqa: E402

CONFIGS = [(p.stem, None) for p in sorted((ROOT / "configs").glob("*.py"))] + [("edm_cifar10", "cond")]
# Parameter counts of the official EDM networks for the paper configs (NVlabs/edm).
OFFICIAL_PARAMS = {("edm_cifar10", None): 55_733_891, ("edm_cifar10", "cond"): 55_735_299,
                   ("edm_imagenet64", None): 295_899_267}


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_validates_and_builds(name, arg):
    cfg = load_config(name, arg)
    train.validate(cfg)
    # A checkpoint teacher is stood in for by its shapes: a fresh EDM init of its network.
    if cfg.teacher.kind == "checkpoint":
        teacher_cfg = cfg.copy_and_resolve_references()
        teacher_cfg.unlock()
        teacher_cfg.network = teacher_cfg.teacher.network
        tch = teacher.Teacher(
            params=jax.eval_shape(lambda k: {"params": methods.edm.init(teacher_cfg, k).net.params},
                                  jax.random.key(0)),
            denoise=common.build_denoiser(teacher_cfg))
    else:
        tch = teacher.load(cfg)
    state = jax.eval_shape(lambda k, t: methods.get(cfg.method.name).init(cfg, k, t),
                           jax.random.key(0), tch)
    # The first network of a state is the one sampled (student / generator / teacher trained).
    trainables = [v for v in vars(state).values() if isinstance(v, Trainable)]
    count = sum(x.size for x in jax.tree.leaves(trainables[0].params))
    if (name, arg) in OFFICIAL_PARAMS:
        assert count == OFFICIAL_PARAMS[(name, arg)]
    for t in trainables:  # every EMA mirrors its network's params
        size = sum(x.size for x in jax.tree.leaves(t.params))
        assert all(sum(x.size for x in jax.tree.leaves(e)) == size for e in t.emas.values())
    if cfg.network.get("s_embedding"):  # CTM: the teacher's network plus the s-branch
        assert any(k.endswith("_s") for k in trainables[0].params)


@pytest.mark.parametrize("name", [p.stem for p in sorted((ROOT / "configs").glob("*mixture2d.py"))])
def test_step_reports_the_declared_metrics(name):
    """Method.metrics(config) names exactly the metrics a step returns (traced, not compiled)."""
    cfg = load_config(name)
    method = methods.get(cfg.method.name)
    tch = teacher.load(cfg)
    state = jax.eval_shape(lambda k: method.init(cfg, k, tch), jax.random.key(0))
    batch = {"x": jax.ShapeDtypeStruct((8,) + tuple(cfg.model.shape), jax.numpy.float32),
             "label": jax.ShapeDtypeStruct((8,), jax.numpy.int32)}
    _, metrics = jax.eval_shape(method.train_step(cfg), state, tch, batch, jax.random.key(0))
    assert sorted(metrics) == sorted(method.metrics(cfg))


def test_config_arg_is_checked():
    with pytest.raises(ValueError, match="uncond or cond"):
        load_config("edm_cifar10", "conditional")


@pytest.mark.parametrize("name,override,message", [
    # MSD's students must see the classes they are split by (trained unconditional before).
    ("msd_mixture2d", ("network", "label_dim", 0),
     r"config.network.label_dim=0 disagrees with config.model.label_dim=8.*set config.network.label_dim=8"),
    ("edm_mixture2d", ("network", "dim", 3),
     r"config.network.dim=3 disagrees with config.model.shape=\(2,\).*dim=2"),
    ("edm_digits", ("network", "img_resolution", 32),
     r"config.network.img_resolution=32 disagrees with config.model.shape=\(16, 16, 1\)"),
    ("ctm_digits", ("teacher.network", "label_dim", 0),
     r"config.teacher.network.label_dim=0 disagrees with config.model.label_dim=10"),
])
def test_fields_the_data_fixes_must_agree(name, override, message):
    cfg = load_config(name)
    section, field, value = override
    net = cfg.teacher.network if section == "teacher.network" else cfg.network
    net[field] = value
    with pytest.raises(ValueError, match=message):
        train.validate(cfg)


def test_a_missing_class_field_is_named_with_its_default():
    cfg = load_config("msd_mixture2d")
    del cfg.network["label_dim"]
    with pytest.raises(ValueError, match=r"config.network.label_dim=0 \(default\) disagrees"):
        train.validate(cfg)


@pytest.mark.parametrize("name,field,value,message", [
    ("dmd2_mixture2d", "dfake_gen_update_ratio", 0, r"config.method.dfake_gen_update_ratio=0"),
    ("dmd2_mixture2d", "max_step_percent", 1.5, r"config.method.min_step_percent=.*max_step"),
    ("msd_mixture2d", "num_students", 3, r"config.method.num_students=3 must divide"),
    ("ctm_mixture2d", "gan_backbones", ("bogus",), r"config.method.gan_backbones=\('bogus',\)"),
    ("ctm_mixture2d", "d_optimizer", "sgd", r"config.method.d_optimizer='sgd'"),
])
def test_method_fields_are_checked_at_start(name, field, value, message):
    """Each method's own validate() runs in train.validate, before anything is built."""
    cfg = load_config(name)
    cfg.method[field] = value
    with pytest.raises(ValueError, match=message):
        train.validate(cfg)



def test_a_distillation_without_teacher_names_the_field(tmp_path):
    cfg = load_config("ctm_mixture2d")
    cfg.teacher.kind = "none"
    with pytest.raises(ValueError, match=r"config.teacher.kind to 'analytic' or 'checkpoint'"):
        train.train(cfg, str(tmp_path))
