"""jaxdistill.convert: EDM-format pickles and DMD2-style state dicts -> teacher run directories.

The torch networks come from tests/edm_torch_mirror.py (EDM's names, random weights, EDM's
pickle layout); the converted teacher must reproduce the torch EDMPrecond's outputs.
"""
import os
import pathlib
import pickle
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (the test extra installs it)

from jaxdistill import teacher  # noqa: E402
from jaxdistill.config import base_config  # noqa: E402
from jaxdistill.convert import edm_pickle, torch_pickle  # noqa: E402
from jaxdistill.methods import common  # noqa: E402
from jaxdistill.networks import presets  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import edm_torch_mirror as mirror  # noqa: E402

# Tiny settings of the three EDM architectures, with the switches NVlabs/edm train.py passes
# for --arch=ddpmpp / ncsnpp / adm.  ADM keeps EDM's 64 channels per head: 64- and 128-channel
# levels give 1- and 2-head attention.
ARCHS = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
                   model_channels=16, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                   attn_resolutions=[8], augment_dim=9, dropout=0.13),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                   model_channels=16, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                   attn_resolutions=[8], augment_dim=9, dropout=0.13),
    "adm": dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2],
                channel_mult_emb=2, num_blocks=1, attn_resolutions=[8], dropout=0.10),
}
RES = 16
SIGMAS = np.array([0.02, 0.5, 3.0, 40.0], np.float32)


def torch_net(arch, label_dim, seed=0, res=RES, **overrides):
    torch.manual_seed(seed)
    return mirror.EDMPrecond(img_resolution=res, img_channels=3, label_dim=label_dim,
                             use_fp16=False, **{**ARCHS[arch], **overrides})


def teacher_from(run_dir, network):
    """(denoiser, variables) as a distillation run loads them (teacher.kind='checkpoint')."""
    cfg = base_config()
    cfg.teacher.kind = "checkpoint"
    cfg.teacher.checkpoint = str(run_dir)
    cfg.teacher.network = network
    res, channels = network["img_resolution"], network["in_channels"]
    cfg.model.update(shape=(res, res, channels), label_dim=network["label_dim"])
    tch = teacher.load(cfg)
    return tch.denoise, tch.params


def max_abs_error(net, run_dir, network):
    """max |D_torch - D_flax| over a batch at SIGMAS, and max |D_torch| for scale."""
    rng = np.random.default_rng(1)
    n, label_dim = len(SIGMAS), network["label_dim"]
    x = (rng.standard_normal((n, 3, RES, RES)) *
         np.sqrt(SIGMAS ** 2 + 0.25)[:, None, None, None]).astype(np.float32)
    labels = np.eye(label_dim, dtype=np.float32)[rng.integers(0, label_dim, n)] if label_dim \
        else None
    with torch.no_grad():
        want = net(torch.from_numpy(x), torch.from_numpy(SIGMAS),
                   None if labels is None else torch.from_numpy(labels)).numpy()
    denoiser, variables = teacher_from(run_dir, network)
    got = denoiser(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(SIGMAS),
                   None if labels is None else jnp.asarray(labels))
    got = np.asarray(got).transpose(0, 3, 1, 2)
    return float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))


@pytest.mark.parametrize("label_dim", [0, 10], ids=["uncond", "cond"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_converted_pickle_reproduces_torch_outputs(arch, label_dim, tmp_path, capsys):
    net = torch_net(arch, label_dim)
    pkl = tmp_path / "network-snapshot-000100.pkl"
    mirror.save_edm_pickle(pkl, net)
    run_dir = tmp_path / "teacher"
    assert edm_pickle.main([str(pkl), str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"config.teacher.checkpoint = '{run_dir}'" in printed
    network = edm_pickle.read_edm_pickle(str(pkl)).network
    err, scale = max_abs_error(net, run_dir, network)
    with capsys.disabled():
        print(f"\n{arch} label_dim={label_dim}: max |D_torch - D_flax| = {err:.2e} "
              f"(max |D| = {scale:.2f})")
    # float32 on CPU: measured 0.8e-6 .. 1.7e-6 with max |D| ~ 1.8 for all six cases; a wrong
    # name, layout or transpose gives O(1) errors with these random O(1) weights.
    assert err <= 1e-5 * max(scale, 1.0)


def test_dmd2_style_state_dict_converts_with_given_architecture(tmp_path):
    # DMD2 saves the generator's EDMPrecond.state_dict() with torch.save (pytorch_model.bin);
    # the architecture is not in the file, so it is passed (CLI: --preset).
    net = torch_net("adm", 10, seed=3)
    path = tmp_path / "pytorch_model.bin"
    torch.save(net.state_dict(), path)
    network = edm_pickle.network_config("DhariwalUNet", net.model._init_kwargs)
    edm_pickle.convert(str(path), str(tmp_path / "teacher"), network=network)
    err, scale = max_abs_error(net, tmp_path / "teacher", network)
    assert err <= 1e-5 * max(scale, 1.0)

    state = net.state_dict()
    del state["model.dec.8x8_in0.qkv.weight"]
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(ValueError, match=r"model\.dec\.8x8_in0\.qkv\.weight"):
        edm_pickle.convert(str(tmp_path / "broken.bin"), str(tmp_path / "t2"), network=network)


@pytest.mark.parametrize("arch,label_dim,preset", [
    ("ddpmpp", 0, "presets.ddpmpp_cifar10(label_dim=0, augment_dim=9)"),
    ("ddpmpp", 10, "presets.ddpmpp_cifar10(label_dim=10, augment_dim=9)"),
    ("ncsnpp", 0, "presets.ncsnpp_cifar10(label_dim=0, augment_dim=9)"),
    ("adm", 1000, "presets.adm_imagenet64(label_dim=1000)"),
])
def test_official_sizes_map_name_by_name(arch, label_dim, preset):
    # The released networks at full size, built on torch's meta device (no memory): their
    # init kwargs give the preset the configs use, and every state_dict name and shape is the
    # one the converter expects (resample filters aside).
    full = dict(ddpmpp=dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                            channel_mult_emb=4, attn_resolutions=[16]),
                ncsnpp=dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                            channel_mult_emb=4, attn_resolutions=[16]),
                adm=dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                         channel_mult_emb=4, attn_resolutions=[32, 16, 8], dropout=0.1))[arch]
    with torch.device("meta"):
        net = torch_net(arch, label_dim, res=64 if arch == "adm" else 32, **full)
    network = edm_pickle.network_config(type(net.model).__name__, net.model._init_kwargs)
    assert edm_pickle.preset_expression(network) == preset
    have = {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.endswith("resample_filter")}
    assert have == edm_pickle.expected_torch_shapes(network)


def test_dmd2_default_architecture_is_the_imagenet_ctm_teacher():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "ctm_imagenet64", pathlib.Path(__file__).parents[1] / "configs" / "ctm_imagenet64.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    wanted = module.get_config().teacher.network.to_dict()
    assert teacher._normalise(edm_pickle.preset_network("adm_imagenet64")) == \
        teacher._normalise({k: list(v) if isinstance(v, tuple) else v for k, v in wanted.items()})


# ----------------------------------------------------------------------------------------------
# Errors.

def test_missing_file_is_named(tmp_path, capsys):
    missing = tmp_path / "edm-nothing.pkl"
    with pytest.raises(FileNotFoundError, match="edm-nothing.pkl"):
        edm_pickle.convert(str(missing), str(tmp_path / "out"))
    assert edm_pickle.main([str(missing), str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err


def assert_one_line_error(excinfo, path, *phrases):
    """The error is a ValueError whose one-line message starts with the file and says what to do."""
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError), type(excinfo.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny DDPM++ as an EDM pickle and a tiny ADM as a torch.save state dict."""
    tmp = tmp_path_factory.mktemp("files")
    mirror.save_edm_pickle(tmp / "edm.pkl", torch_net("ddpmpp", 0))
    torch.save(torch_net("adm", 0).state_dict(), tmp / "pytorch_model.bin")
    return {"pkl": (tmp / "edm.pkl").read_bytes(), "bin": (tmp / "pytorch_model.bin").read_bytes()}


@pytest.mark.parametrize("kind", ["pkl", "bin"])
@pytest.mark.parametrize("keep", [1, 2, 60, 0.5, -1], ids=lambda k: f"keep{k}")
def test_truncated_file_is_one_line_error(kind, keep, tiny_files, tmp_path):
    data = tiny_files[kind]
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = tmp_path / f"net.{kind}"
    path.write_bytes(data[:cut])
    with pytest.raises(torch_pickle.UnreadableCheckpointError) as excinfo:
        edm_pickle.convert(str(path), str(tmp_path / "out"))
    phrase = "truncated or damaged zip archive" if kind == "bin" and cut >= 4 else "truncated"
    assert_one_line_error(excinfo, path, phrase, "re-download")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["edm.pkl", "pytorch_model.bin"])
def test_empty_file_is_one_line_error(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(torch_pickle.UnreadableCheckpointError) as excinfo:
        edm_pickle.convert(str(path), str(tmp_path / "out"))
    assert_one_line_error(excinfo, path, "empty (0 bytes)", "re-download")


@pytest.mark.parametrize("text,phrase", [
    ("hello world\n", "a text file, not a pickle (it starts with 'hello world')"),
    ("I am not a pickle\n", "a text file, not a pickle"),        # 'I' is pickle's INT opcode
    ("<!DOCTYPE html>\n<html><body>404</body></html>\n", "an HTML page"),
    ("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 10\n", "git lfs pull"),
])
def test_text_file_is_one_line_error(text, phrase, tmp_path):
    path = tmp_path / "edm-cifar10.pkl"
    path.write_text(text)
    with pytest.raises(torch_pickle.UnreadableCheckpointError) as excinfo:
        edm_pickle.convert(str(path), str(tmp_path / "out"))
    assert_one_line_error(excinfo, path, phrase)


def test_pickle_of_other_objects_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(torch_pickle.UnsupportedPickleError) as excinfo:
        edm_pickle.convert(str(path), str(tmp_path / "out"))
    assert_one_line_error(excinfo, path, "expected a pickled dict", "got list")
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"net": 1}))
    with pytest.raises(ValueError) as excinfo:
        edm_pickle.convert(str(path), str(tmp_path / "out"))
    assert_one_line_error(excinfo, path, "no 'ema' entry", "['net']", "--key")


def resnet_like_state_dict():
    """The state dict names of a small torchvision-style ResNet (conv1, bn1, layer1, fc)."""
    net = torch.nn.Module()
    net.conv1 = torch.nn.Conv2d(3, 8, 7, bias=False)
    net.bn1 = torch.nn.BatchNorm2d(8)
    net.layer1 = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8))
    net.fc = torch.nn.Linear(8, 10)
    return net.state_dict()


def test_unrelated_state_dict_is_refused_not_read_as_a_preset(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet_like_state_dict(), path)
    with pytest.raises(edm_pickle.UnrecognisedStateDictError) as excinfo:
        edm_pickle.convert(str(path), str(tmp_path / "out"))
    assert_one_line_error(excinfo, path, "not an EDMPrecond state dict",
                          "'model.map_layer0.weight'", "'model.out_conv.weight'", "'bn1.bias'")
    assert not (tmp_path / "out").exists()

    # One identifying key is not enough: the rest of the layout must be there too.
    partial = {f"model.{k}": v for k, v in resnet_like_state_dict().items()}
    partial["model.map_layer0.weight"] = torch.zeros(4, 4)
    torch.save(partial, path)
    with pytest.raises(edm_pickle.UnrecognisedStateDictError):
        edm_pickle.convert(str(path), str(tmp_path / "out"))


def test_state_dict_layout_is_read_from_identifying_keys(tmp_path):
    adm = {k: v.numpy() for k, v in torch_net("adm", 10).state_dict().items()}
    song = {k: v.numpy() for k, v in torch_net("ncsnpp", 0).state_dict().items()}
    assert edm_pickle.state_dict_layout(adm) == ("dhariwal", RES)
    assert edm_pickle.state_dict_layout(song) == ("songunet", RES)
    assert edm_pickle.state_dict_layout({f"module.{k}": v for k, v in adm.items()}) is None
    assert edm_pickle.state_dict_layout(
        {k: v for k, v in adm.items() if not k.startswith("model.out_")}) is None

    # A DDPM++ state dict given with the default ADM preset names the presets that fit.
    path = tmp_path / "ddpmpp.bin"
    torch.save(torch_net("ddpmpp", 0).state_dict(), path)
    with pytest.raises(edm_pickle.UnrecognisedStateDictError) as excinfo:
        edm_pickle.convert(str(path), str(tmp_path / "out"))
    assert_one_line_error(excinfo, path, "holds a SongUNet", "--preset ddpmpp_cifar10 or "
                          "ncsnpp_cifar10")
    # An ADM of another resolution than the preset's.
    path = tmp_path / "adm16.bin"
    torch.save(torch_net("adm", 1000).state_dict(), path)
    with pytest.raises(edm_pickle.UnrecognisedStateDictError) as excinfo:
        edm_pickle.convert(str(path), str(tmp_path / "out"))
    assert_one_line_error(excinfo, path, f"holds a {RES}x{RES} network", "64x64")


def test_state_dict_of_other_objects_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": torch_net("adm", 0).state_dict(), "step": 5}, path)
    with pytest.raises(torch_pickle.UnsupportedPickleError) as excinfo:
        edm_pickle.convert(str(path), str(tmp_path / "out"))
    assert_one_line_error(excinfo, path, "entry 'model' is a", "state_dict() alone")
    path = tmp_path / "arrays.npz"          # a zip archive, but not torch.save's
    np.savez(path, w=np.zeros(3))
    with pytest.raises(torch_pickle.UnreadableCheckpointError) as excinfo:
        edm_pickle.convert(str(path), str(tmp_path / "out"))
    assert_one_line_error(excinfo, path, "a zip archive that torch.load cannot read")


def test_cli_prints_one_line_and_exits_2(tiny_files, tmp_path, capsys, monkeypatch):
    import subprocess

    monkeypatch.delenv("JAXDISTILL_VERBOSE", raising=False)
    truncated = tmp_path / "edm-truncated.pkl"
    truncated.write_bytes(tiny_files["pkl"][:len(tiny_files["pkl"]) // 2])
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
    env.pop("JAXDISTILL_VERBOSE", None)
    out = subprocess.run([sys.executable, "-m", "jaxdistill.convert.edm_pickle", str(truncated),
                          str(tmp_path / "out")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {truncated}: truncated"), out.stderr

    # In process: every kind of bad input is one line; --verbose shows the exception itself.
    empty, resnet = tmp_path / "empty.pkl", tmp_path / "resnet.pth"
    empty.write_bytes(b"")
    torch.save(resnet_like_state_dict(), resnet)
    for path in (truncated, empty, resnet):
        assert edm_pickle.main([str(path), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and err.count("\n") == 1, err
    with pytest.raises(edm_pickle.UnrecognisedStateDictError):
        edm_pickle.main([str(resnet), str(tmp_path / "out"), "--verbose"])
    monkeypatch.setenv("JAXDISTILL_VERBOSE", "1")
    with pytest.raises(torch_pickle.UnreadableCheckpointError):
        edm_pickle.main([str(empty), str(tmp_path / "out")])


def test_cli_keeps_the_traceback_of_a_bug(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.delenv("JAXDISTILL_VERBOSE", raising=False)
    monkeypatch.setattr(edm_pickle, "convert", broken)
    with pytest.raises(ZeroDivisionError):
        edm_pickle.main([str(tmp_path / "x.pkl"), str(tmp_path / "out")])


def test_plain_class_in_pickle_is_refused_by_name(tmp_path, monkeypatch):
    # An EDMPrecond pickled without EDM's persistence wrapper names its class directly.
    package, module = types.ModuleType("training"), types.ModuleType("training.networks")
    module.EDMPrecond = type("EDMPrecond", (), {"__module__": "training.networks"})
    package.networks = module
    monkeypatch.setitem(sys.modules, "training", package)
    monkeypatch.setitem(sys.modules, "training.networks", module)
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"ema": module.EDMPrecond()}))
    with pytest.raises(torch_pickle.UnsupportedPickleError,
                       match=r"refusing to load training\.networks\.EDMPrecond"):
        edm_pickle.convert(str(path), str(tmp_path / "out"))


def test_unknown_persistent_class_is_refused_by_name(tmp_path):
    path = tmp_path / "unknown.pkl"
    meta = dict(type="class", version=6, module_src=mirror.STORED_SOURCE, class_name="MyUNet",
                state={})

    class Obj:
        def __reduce__(self):
            return mirror._reconstruct_persistent_obj, (meta,)

    with mirror.edm_modules(), open(path, "wb") as f:
        pickle.dump({"ema": Obj()}, f)
    with pytest.raises(torch_pickle.UnsupportedPickleError, match="'MyUNet'"):
        torch_pickle.load_edm_pickle(str(path))


def test_pickled_code_is_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Evil()}))
    with pytest.raises(torch_pickle.UnsupportedPickleError, match="system"):
        torch_pickle.load_edm_pickle(str(path))
    assert not marker.exists()


def test_other_preconditioner_is_refused(tmp_path):
    path = tmp_path / "loss.pkl"
    with mirror.edm_modules(), open(path, "wb") as f:
        pickle.dump({"ema": mirror.EDMLoss()}, f)
    with pytest.raises(ValueError, match="is a EDMLoss; only EDMPrecond"):
        edm_pickle.read_edm_pickle(str(path))


def test_shape_mismatch_names_the_parameter(tmp_path):
    net = torch_net("ddpmpp", 0)
    net.model.map_layer0.weight = torch.nn.Parameter(torch.zeros(32, 15))
    path = tmp_path / "bad.pkl"
    mirror.save_edm_pickle(path, net)
    with pytest.raises(ValueError, match=r"'model\.map_layer0\.weight' has shape \(32, 15\)"):
        edm_pickle.convert(str(path), str(tmp_path / "out"))


def test_refuses_to_overwrite_a_run_directory(tmp_path):
    net = torch_net("ddpmpp", 0)
    path = tmp_path / "net.pkl"
    mirror.save_edm_pickle(path, net)
    edm_pickle.convert(str(path), str(tmp_path / "out"))
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        edm_pickle.convert(str(path), str(tmp_path / "out"))


def test_importing_jaxdistill_does_not_import_torch():
    import subprocess

    code = ("import sys, jaxdistill, jaxdistill.convert, jaxdistill.convert.edm_pickle, "
            "jaxdistill.teacher; print('torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def tiny_ctm_setup(tmp_path_factory):
    """A converted tiny DDPM++ (presets.tiny_songunet at 32x32) and configs/ctm_cifar10.py
    pointing at it, as tests/test_ctm_cifar10.py sets up its trained tiny teacher."""
    from test_edm import load_config

    tmp = tmp_path_factory.mktemp("ctm_teacher")
    tiny = presets.tiny_songunet(img_resolution=32, in_channels=3)
    edm_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny.items()
                  if k not in ("img_resolution", "in_channels", "out_channels", "label_dim",
                               "remat")}
    torch.manual_seed(0)
    net = mirror.EDMPrecond(img_resolution=32, img_channels=3, label_dim=0,
                            model_type="SongUNet", **edm_kwargs)
    mirror.save_edm_pickle(tmp / "edm.pkl", net)
    summary = edm_pickle.convert(str(tmp / "edm.pkl"), str(tmp / "teacher"))
    cfg = load_config("ctm_cifar10")
    cfg.teacher.checkpoint = summary["out_dir"]
    cfg.teacher.network = dict(name="songunet", **tiny)
    cfg.network = dict(name="songunet", s_embedding=True, **tiny)
    cfg.method.distance = "pseudo_huber"
    cfg.method.num_heun_step = 3
    return cfg, net


def test_converted_teacher_serves_the_ctm_config(tiny_ctm_setup):
    # The pieces of a CTM run that touch the teacher, without compiling the CTM step: the
    # teacher loads against the config's teacher.network, denoises like the torch network, and
    # the student (with CTM's s-branch) is initialised from it by name.
    import jax

    cfg, net = tiny_ctm_setup
    tch = teacher.load(cfg)
    variables = tch.params
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    sigma = np.array([0.3, 5.0], np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x), torch.from_numpy(sigma)).numpy()
    got = tch(jnp.asarray(x.transpose(0, 2, 3, 1)), sigma)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=2e-5)

    student = jax.eval_shape(lambda k: common.init_variables(
        cfg, common.build_denoiser(cfg), k)[0], jax.random.key(0))
    student = common.init_from_teacher(jax.tree.map(lambda s: jnp.full(s.shape, 7.0), student),
                                       variables)
    torch_w = net.model.enc["32x32_conv"].weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(student["enc_32x32_conv"]["kernel"]), torch_w)
    assert np.all(np.asarray(student["enc_32x32_block0"]["affine_s"]["kernel"]) == 7.0)  # fresh


def test_converted_teacher_serves_the_dmd2_config(tiny_ctm_setup):
    # configs/dmd2_cifar10.py on the converted teacher: generator and fake score start as the
    # teacher, so the one-step generator G(z) = D(80 z; 80) reproduces the torch network at init.
    import jax

    from jaxdistill.methods import dmd2
    from test_edm import load_config

    ctm_cfg, net = tiny_ctm_setup
    cfg = load_config("dmd2_cifar10")
    cfg.teacher.checkpoint = ctm_cfg.teacher.checkpoint
    cfg.teacher.network = ctm_cfg.teacher.network
    cfg.network = ctm_cfg.teacher.network
    state = dmd2.init(cfg, jax.random.key(0), teacher.load(cfg))
    z = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(80 * z.transpose(0, 3, 1, 2)),
                   torch.full((2,), 80.0)).numpy().transpose(0, 2, 3, 1)
    for params in (state.generator.params, state.guide.params["fake"]):
        got = common.build_denoiser(cfg)(state.generator.variables(params), 80 * jnp.asarray(z),
                                         jnp.full((2,), 80.0))
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.mark.slow
def test_converted_teacher_trains_ctm_cifar10(tiny_ctm_setup, tmp_path):
    # One CTM step of configs/ctm_cifar10.py through the trainer on TFDS mock data (6.5 min on a
    # busy 2-core CPU, mostly compilation).
    import tensorflow_datasets as tfds

    from jaxdistill import train

    cfg, _ = tiny_ctm_setup
    cfg.train.update(batch_size=8, num_steps=1, log_every=1, ckpt_every=1, sample_every=1,
                     num_grid_samples=4)
    cfg.eval.update(num_samples=8, batch_size=8)
    with tfds.testing.mock_data(num_examples=32):
        state = train.train(cfg, str(tmp_path))
    assert int(state.step) == 1


def test_missing_teacher_names_the_converter(tmp_path):
    cfg = base_config()
    cfg.teacher.kind = "checkpoint"
    cfg.teacher.checkpoint = str(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=r"python -m jaxdistill\.convert\.edm_pickle"):
        teacher.load(cfg)
