"""User-defined analytic mixtures: config.data.name='mixture' reads config.data.mixture_file."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import config as config_lib, data, errors, parallel, teacher as teacher_lib, train
from jaxdistill.data import mixtures

ROOT = pathlib.Path(__file__).resolve().parents[1]
denoise = jax.jit(mixtures.denoise)  # one compile instead of dozens of eager ones
sample = jax.jit(mixtures.sample, static_argnums=2)
# Three 2-D components with uneven weights (normalised on load) and two classes.
MIX = {"means": [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.2]], "stds": [0.1, 0.2, 0.15],
       "weights": [1.0, 2.0, 3.0], "classes": [0, 1, 1]}


def write(path, arrays):
    path = str(path)
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump({k: v.tolist() if isinstance(v, np.ndarray) else v
                       for k, v in arrays.items()}, f)
    else:
        np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def data_cfg(path):
    cfg = config_lib.base_config().data
    cfg.update(name="mixture", mixture_file=str(path))
    return cfg


def leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_npz_and_json_give_the_same_spec(tmp_path):
    specs = [data.spec(data_cfg(write(tmp_path / f"m.{ext}", MIX))) for ext in ("npz", "json")]
    for s in specs:
        assert s.shape == (2,) and s.num_classes == 2
        assert s.mixture.classes == (0, 1, 1)
        np.testing.assert_allclose(s.mixture.weights, [1 / 6, 2 / 6, 3 / 6], rtol=1e-7)
        np.testing.assert_array_equal(s.mixture.stds, np.float32([0.1, 0.2, 0.15]))
    assert specs[0].mixture.classes == specs[1].mixture.classes
    assert leaves_equal(specs[0].mixture, specs[1].mixture)
    # Image-shaped means without classes: each component is its own class.
    img = {"means": np.linspace(-1, 1, 4 * 16).reshape(4, 4, 4, 1), "stds": [0.2] * 4,
           "weights": [1, 1, 1, 1]}
    a, b = (data.spec(data_cfg(write(tmp_path / f"img.{e}", img))) for e in ("npz", "json"))
    assert a.shape == b.shape == (4, 4, 1) and a.num_classes == b.num_classes == 4
    assert a.mixture.classes is None and leaves_equal(a.mixture, b.mixture)
    np.testing.assert_array_equal(a.mixture.weights, np.full(4, 0.25, np.float32))


def test_file_of_the_shipped_ring_reproduces_it_exactly(tmp_path):
    """Batches (same seed, steps, process slices), the analytic teacher and the metrics are the
    shipped mixture2d's, bit for bit."""
    shipped = config_lib.base_config()
    shipped.teacher.kind = "analytic"
    ring = data.mixture_of(shipped.data)
    from_file = config_lib.base_config()
    from_file.teacher.kind = "analytic"
    from_file.data = data_cfg(write(tmp_path / "ring.json", {
        "means": np.asarray(ring.means), "stds": np.asarray(ring.stds),
        "weights": np.asarray(ring.weights)}))
    assert data.spec(from_file.data).num_classes == data.spec(shipped.data).num_classes == 8
    kw = {"batch_size": 16, "seed": 7, "start_step": 5, "process_index": 1, "process_count": 2}
    ours, theirs = data.batches(from_file.data, **kw), data.batches(shipped.data, **kw)
    for _ in range(3):
        a, b = next(ours), next(theirs)
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["label"], b["label"])
    mix, ref = teacher_lib.load(from_file).params, teacher_lib.load(shipped).params
    assert leaves_equal(mix, ref) and mix.classes is None
    x = jax.random.normal(jax.random.key(0), (8, 2))
    labels = jax.nn.one_hot(jnp.arange(8), 8)
    for sigma in (0.01, 0.5, 20.0):
        s = jnp.full((8,), sigma)
        np.testing.assert_array_equal(denoise(mix, x, s), denoise(ref, x, s))
        np.testing.assert_array_equal(denoise(mix, x, s, labels), denoise(ref, x, s, labels))


def test_image_mixture_from_file_is_the_shipped_one(tmp_path):
    shipped = config_lib.base_config().data
    shipped.update(name="image_mixture", std=0.2)
    mix = data.mixture_of(shipped)
    cfg = data_cfg(write(tmp_path / "digits.npz", {"means": np.asarray(mix.means),
                                                   "stds": np.asarray(mix.stds),
                                                   "weights": np.asarray(mix.weights)}))
    spec = data.spec(cfg)
    assert spec.shape == (8, 8, 1) and spec.num_classes == 10 and spec.mixture.classes is None
    # Equal leaves and classes: batches, denoiser and metrics are functions of these alone (the
    # ring test above checks that path bit for bit).
    assert leaves_equal(spec.mixture, mix)


def test_classes_make_the_data_class_conditional(tmp_path):
    cfg = data_cfg(write(tmp_path / "m.json", MIX))
    mix = data.spec(cfg).mixture
    # Batch labels are the class of each example's component (nearest mean: the modes are apart).
    batch = next(data.batches(cfg, batch_size=512, seed=0))
    nearest = np.argmin(np.linalg.norm(batch["x"][:, None] - np.asarray(mix.means)[None], axis=2),
                        axis=1)
    np.testing.assert_array_equal(batch["label"], np.array(MIX["classes"])[nearest])
    assert set(np.unique(batch["label"])) == {0, 1}
    # Conditioning on class 1 is the denoiser of that class's components alone.
    x = jax.random.normal(jax.random.key(0), (6, 2))
    sub = mixtures.GaussianMixture(mix.means[1:], mix.stds[1:], mix.weights[1:])  # scale cancels
    only0 = mixtures.GaussianMixture(mix.means[:1], mix.stds[:1], jnp.ones(1))
    for sigma in (0.1, 1.0):
        s = jnp.full((6,), sigma)
        np.testing.assert_allclose(denoise(mix, x, s, jax.nn.one_hot(jnp.ones(6, jnp.int32), 2)),
                                   denoise(sub, x, s), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(denoise(mix, x, s, jax.nn.one_hot(jnp.zeros(6, jnp.int32), 2)),
                                   denoise(only0, x, s), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(denoise(mix, x, s, jnp.zeros((6, 2))), denoise(mix, x, s),
                                   rtol=1e-6, atol=1e-6)  # null label: unconditional
    # Sampling class 1 draws its components by weight (2:3), never component 0.
    _, comp = sample(mix, jax.random.key(1), 4000, jnp.ones(4000, jnp.int32))
    counts = np.bincount(np.asarray(comp), minlength=3)
    assert counts[0] == 0 and abs(counts[1] / 4000 - 0.4) < 0.03  # 4 sigma of a binomial
    # The model's label_dim must be 0 or the file's 2 classes (not its 3 components).
    full = load_config("ctm_mixture2d")
    full.data = cfg
    full.model.label_dim = full.network.label_dim = 2
    train.validate(full)
    full.model.label_dim = full.network.label_dim = 3
    with pytest.raises(ValueError, match="config.model.label_dim=3 .* 2 classes"):
        train.validate(full)


MALFORMED = {
    "stds_shape": ("json", {**MIX, "stds": [0.1, 0.2]}, "stds has shape (2,) but means has 3"),
    "weights_shape": ("npz", {**MIX, "weights": [[1.0, 2.0, 3.0]]}, "weights has shape (1, 3)"),
    "std_zero": ("json", {**MIX, "stds": [0.1, 0.0, 0.1]},
                 "stds must be positive, but stds[1] = 0"),
    "std_negative": ("npz", {**MIX, "stds": [-0.1, 0.1, 0.1]}, "stds must be positive"),
    "std_below_float32": ("npz", {**MIX, "stds": [0.1, 1e-50, 0.1]}, "stds must be positive"),
    "means_beyond_float32": ("json", {**MIX, "means": [[0.0, 0.0], [1e39, 0.0], [2.0, 0.0]]},
                             "means has non-finite"),
    "weight_zero": ("json", {**MIX, "weights": [1.0, 0.0, 1.0]}, "weights must be positive"),
    "weight_negative": ("npz", {**MIX, "weights": [1.0, 2.0, -1.0]},
                        "weights must be positive, but weights[2] = -1"),
    "missing_key": ("json", {k: v for k, v in MIX.items() if k != "weights"}, "weights missing"),
    "missing_means": ("npz", {k: v for k, v in MIX.items() if k != "means"}, "means missing"),
    "unknown_key": ("json", {**MIX, "std": [0.1]}, "unknown key(s) ['std']"),
    "means_rank": ("npz", {**MIX, "means": np.zeros((3, 2, 2))}, "means has shape (3, 2, 2)"),
    "means_nan": ("json", {**MIX, "means": [[0.0, 0.0], [1.0, None], [2.0, 0.0]]},
                  "means has non-finite"),
    "means_ragged": ("json", {**MIX, "means": [[0.0, 0.0], [1.0], [2.0, 0.0]]},
                     "means is not a rectangular array"),
    "classes_shape": ("json", {**MIX, "classes": [0, 1]}, "classes has shape (2,)"),
    "classes_negative": ("npz", {**MIX, "classes": [0, -1, 1]},
                         "classes must be non-negative integers, but classes[1] = -1"),
    "classes_fraction": ("json", {**MIX, "classes": [0, 0.5, 1]}, "but classes[1] = 0.5"),
    "classes_gap": ("json", {**MIX, "classes": [0, 2, 2]}, "classes must use every class 0..2"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_fails_in_one_line_naming_the_field(tmp_path, case):
    ext, arrays, expected = MALFORMED[case]
    path = write(tmp_path / f"{case}.{ext}", arrays)
    with pytest.raises(ValueError) as info:
        data.spec(data_cfg(path))
    message = str(info.value)
    assert message.startswith(f"config.data.mixture_file={path}: ") and "\n" not in message
    assert expected in message
    assert errors.one_line(info.value) == "error: " + message


def test_unreadable_missing_and_misnamed_files_fail_naming_the_file(tmp_path):
    cases = []
    for name, content in (("bad.json", "{not json"), ("list.json", "[1, 2]"),
                          ("bad.npz", "PK garbage")):
        (tmp_path / name).write_text(content)
        cases.append((ValueError, str(tmp_path / name), "cannot read the file as ."))
    np.save(tmp_path / "one.npy", np.zeros(3))
    os.rename(tmp_path / "one.npy", tmp_path / "one.npz")
    cases += [(ValueError, str(tmp_path / "one.npz"), "cannot read the file as .npz"),
              (FileNotFoundError, str(tmp_path / "absent.json"), "no such file"),
              (ValueError, str(tmp_path / "m.txt"), "must end in .npz or .json"),
              (ValueError, str(tmp_path), "must end in .npz or .json")]
    (tmp_path / "dir.json").mkdir()
    cases.append((ValueError, str(tmp_path / "dir.json"), "is not a file"))
    for exc, path, expected in cases:
        with pytest.raises(exc) as info:
            data.spec(data_cfg(path))
        message = str(info.value)
        assert message.startswith(f"config.data.mixture_file={path}: "), message
        assert expected in message and "\n" not in message, message
    with pytest.raises(ValueError, match=r"^config.data.mixture_file is empty: "):
        data.spec(data_cfg(""))
    # A file given with another data name is not silently ignored.
    cfg = data_cfg(write(tmp_path / "m.json", MIX))
    cfg.name = "mixture2d"
    with pytest.raises(ValueError, match="mixture_file=.* is set but config.data.name='mixture2d'"):
        data.spec(cfg)


def test_one_dimensional_mixture_and_its_picture(tmp_path):
    from jaxdistill import visualize

    spec = data.spec(data_cfg(write(tmp_path / "line.json", {
        "means": [[-1.0], [1.0]], "stds": [0.1, 0.1], "weights": [1, 1]})))
    assert spec.shape == (1,) and spec.num_classes == 2
    x = np.array([[-1.0], [1.0], [1.0]], np.float32)
    picture = visualize.picture(x)  # the trainer's sample grid of vector data
    assert picture.shape == (128, 128, 1) and np.sum(picture < 255) == 2


def test_a_changed_file_is_read_again(tmp_path):
    path = write(tmp_path / "m.json", MIX)
    assert data.spec(data_cfg(path)).num_classes == 2
    write(path, {**MIX, "classes": [0, 1, 2], "stds": [0.1, 0.2, 0.3]})
    assert data.spec(data_cfg(path)).num_classes == 3


from jaxdistill.configs import get as load_config  # noqa: E402


from conftest import load_gmm_table  # noqa: E402,F401


TINY = {"network.hidden": 32, "network.depth": 2, "network.embed": 16, "train.num_steps": 20,
        "train.batch_size": 64, "train.log_every": 10, "train.ckpt_every": 20,
        "train.sample_every": 20, "train.num_grid_samples": 64, "eval.num_samples": 512,
        "eval.batch_size": 512}


def tiny_file_config(gmm_table, method, path):
    cfg = gmm_table.file_config(method, path)
    assert cfg.model.shape == (2,) and cfg.network.dim == 2 and cfg.data.name == "mixture"
    assert cfg.teacher.kind == "analytic" and cfg.model.label_dim == 0
    for field, value in TINY.items():
        section, name = field.split(".")
        cfg[section][name] = value
    return cfg


def check_teacher_rows(rows, mix):
    """The 35-NFE exact teacher of the file scores close to true samples of the file's mixture.
    Measured (1024 samples): log-likelihood -0.28 vs -0.02 for true samples (Heun's bias on
    std-0.1 components; stderr 0.03), sliced W 0.078, mode TV 0.02, all 3 modes; the shipped
    ring's teacher scored by this mixture misses modes and lands far lower."""
    true = mixtures.exact_metrics(mix, sample(mix, jax.random.key(9), 1024)[0],
                                  jax.random.key(0))
    assert all(r["num_modes"] == 3 for r in rows)
    heun = next(r for r in rows if r["model"] == "teacher heun" and r["steps"] == 18)
    assert heun["modes_covered"] == 3 and heun["mode_tv"] < 0.05, heun
    assert abs(heun["log_likelihood"] - true["log_likelihood"]) < 0.6, (heun, true)
    assert heun["sliced_wasserstein"] < 0.15, heun
    return true


def test_gmm_table_imports_beside_run_py():
    """Both define --workdir and --num_samples; the benchmark defines its flags only as a script,
    so importing it after run.py (as the suite does) must not clash."""
    import run  # noqa: F401
    assert hasattr(load_gmm_table(), "dataset_rows")


def test_distil_evaluate_and_score_a_file_mixture(tmp_path):
    """A tiny CTM run from the file's exact teacher (the trainer's program, no workdir):
    train.evaluate gives the exact metrics under the file's mixture, gmm_table scores it."""
    gmm_table = load_gmm_table()
    path = write(tmp_path / "three.json", MIX)
    cfg = tiny_file_config(gmm_table, "ctm", path)
    train.validate(cfg)
    teacher = teacher_lib.load(cfg)
    mix = data.spec(cfg.data).mixture
    assert leaves_equal(teacher.params, mix) and teacher.params.classes == (0, 1, 1)
    # One device: the sharded program is tested elsewhere, and compiles 8-way far slower here.
    program = train.build(cfg, parallel.make_mesh(cfg.mesh, jax.devices()[:1]), teacher=teacher)
    teacher = train.place_teacher(program, teacher)
    state = program.init(jax.random.key(0), teacher)
    before = [np.asarray(a) for a in jax.tree.leaves(state.student.params)]
    batches = data.batches(cfg.data, batch_size=cfg.train.batch_size, seed=0)
    for _ in range(cfg.train.num_steps):
        batch = parallel.shard_batch(next(batches), program.mesh)
        state, metrics = program.step(state, teacher, batch, jax.random.key(1), None)
    assert np.isfinite(float(metrics["loss"]))
    assert any(not np.array_equal(a, np.asarray(b))
               for a, b in zip(before, jax.tree.leaves(state.student.params)))

    key = jax.random.key(3)
    metrics = train.evaluate(cfg, state, key)
    k_gen, k_metric = jax.random.split(key)
    samples, _ = train.generate(cfg, state, k_gen, cfg.eval.num_samples)
    assert metrics == mixtures.exact_metrics(mix, samples, k_metric)
    assert metrics["num_modes"] == 3 and np.isfinite(metrics["log_likelihood"])

    # gmm_table's scoring of a student (its teacher rows are checked in the slow test below).
    rows = gmm_table.student_rows("CTM", cfg, state, jax.random.key(0), 0.0, 1024,
                                  step_counts=(1,))
    assert [(r["model"], r["steps"], r["num_modes"]) for r in rows] == [("CTM", 1, 3)]
    assert set(rows[0]) >= set(metrics) and rows[0]["train_steps"] == 20
    table = gmm_table.markdown({"datasets": {"three.json": rows}})
    assert table.startswith("### three.json") and table.count("| CTM |") == 1


@pytest.mark.slow
def test_gmm_table_and_run_py_on_a_file_mixture(tmp_path):
    """End to end (about 1-2 min on 2 cores): gmm_table trains and scores CTM on the file, run.py
    --mode=sample writes samples with the file's parameters, and a malformed file stops run.py
    with one line naming the field and the file."""
    gmm_table = load_gmm_table()
    path = write(tmp_path / "three.json", MIX)
    cfg = tiny_file_config(gmm_table, "ctm", path)
    rows, trained = gmm_table.dataset_rows({"ctm": cfg}, jax.random.key(0),
                                           str(tmp_path / "runs"), num_samples=1024,
                                           step_counts=(1,))
    assert [(r["model"], r["steps"]) for r in rows] == [
        ("teacher euler", 1), ("teacher heun", 1), ("teacher heun", 18), ("CTM", 1)]
    assert rows[-1]["train_steps"] == 20 and set(trained) == {"ctm"}
    check_teacher_rows(rows, data.spec(cfg.data).mixture)

    out = tmp_path / "s.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, str(ROOT / "run.py"), "--config=configs/ctm_mixture2d.py",
         "--config.data.name=mixture", *args], capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=300)
    r = run(f"--workdir={tmp_path / 'runs' / 'ctm'}", "--mode=sample", "--num_samples=100",
            f"--output={out}", f"--config.data.mixture_file={path}",
            *[f"--config.{k}={v}" for k, v in TINY.items()])
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out) as f:
        assert f["samples"].shape == (100, 2) and np.all(np.isfinite(f["samples"]))
        np.testing.assert_array_equal(f["means"], np.float32(MIX["means"]))
        np.testing.assert_array_equal(f["stds"], np.float32(MIX["stds"]))
        np.testing.assert_array_equal(f["classes"], MIX["classes"])
        np.testing.assert_allclose(f["weights"], [1 / 6, 2 / 6, 3 / 6], rtol=1e-7)
    bad = write(tmp_path / "bad.json", {**MIX, "stds": [0.1, 0.2]})
    r = run(f"--workdir={tmp_path / 'bad_run'}", f"--config.data.mixture_file={bad}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: config.data.mixture_file={bad}: stds has shape (2,) but means has 3 components: "
        "give one value per component, shape (3,)")
