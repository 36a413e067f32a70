"""Fault injection: damaged checkpoints, diverged states, concurrent runs, kills and bad input.

Each case is a regression test for a fault an operator can cause; none may lose a saved
checkpoint, and every user error is one line naming the field or file. Real processes are used
where the fault is a process's (SIGKILL during a save, a live lock holder, the command line).
"""
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdistill import checkpoint, errors, lock, teacher, train
from test_run import ROOT, run_cli, tiny_config

CONFIG = "--config=" + str(ROOT / "configs" / "edm_mixture2d.py")
TINY = ["--config.network.hidden=32", "--config.train.batch_size=64",
        "--config.eval.num_samples=256", "--config.eval.batch_size=256",
        "--config.train.num_grid_samples=64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A healthy 40-step run with checkpoints at 20 and 40, and its two states."""
    workdir = str(tmp_path_factory.mktemp("healthy"))
    state40 = train.train(tiny_config(40), workdir)
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    state20, _ = checkpoint.read_step(mngr, 20, train.build(tiny_config(40)).abstract_state)
    mngr.close()
    return workdir, jax.device_get(state20), jax.device_get(state40)


def copy_run(trained, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    return workdir


def data_files(workdir: str, step: int) -> list[str]:
    """The array data files of a step. Which of them hold the arrays depends on how Orbax merged
    the per-process OCDBT stores (the process's own `d/` or the merged top-level `d/`), so the
    tests damage all of them."""
    state = os.path.join(workdir, "checkpoints", str(step), "state")
    files = glob.glob(os.path.join(state, "d", "*")) + glob.glob(os.path.join(state, "*", "d", "*"))
    assert files, f"no data files under {state}"
    return files


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- corrupt checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "garble", "bitflip"])
def test_damaged_array_data_falls_back_to_the_previous_step(trained, tmp_path, damage):
    """Only the array data file is damaged (the index is intact): before digests, a truncated file
    raised a bare Exception and a garbled or bit-flipped one loaded wrong values silently."""
    workdir = copy_run(trained, tmp_path)
    for path in data_files(workdir, 40):
        data = bytearray(open(path, "rb").read())
        middle = len(data) // 2
        if damage == "truncate":
            data = data[:middle]
        elif damage == "garble":
            data[middle:middle + 64] = bytes((b + 1) % 256 for b in data[middle:middle + 64])
        else:
            data[middle] ^= 0x04
        open(path, "wb").write(bytes(data))
    state, meta = train.load_state(tiny_config(40), workdir)
    assert meta["step"] == 20
    assert_trees_equal(state, trained[1])
    names = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert names[0] == "20" and names[1].startswith("40.unreadable-") and len(names) == 2
    # The damaged step keeps its files for inspection.
    assert os.path.exists(os.path.join(workdir, "checkpoints", names[1], "state"))


def test_values_that_differ_from_the_digest_fall_back(trained, tmp_path):
    """Damage the storage layer cannot see (its own checks pass) is caught by the digest: here
    the saved digest of one leaf is changed instead of the data."""
    workdir = copy_run(trained, tmp_path)
    path = os.path.join(workdir, "checkpoints", "40", "meta", "metadata")
    meta = json.load(open(path))
    meta["digest"]["net/params/block0_dense/kernel"][0] += 1
    json.dump(meta, open(path, "w"))
    _, restored = train.load_state(tiny_config(40), workdir)
    assert restored["step"] == 20
    assert any(n.startswith("40.unreadable-") for n in os.listdir(os.path.join(workdir,
                                                                               "checkpoints")))


def test_healthy_checkpoint_restores_exactly(trained, tmp_path):
    state, meta = train.load_state(tiny_config(40), copy_run(trained, tmp_path))
    assert meta["step"] == 40
    assert_trees_equal(state, trained[2])


def test_digest_sees_every_single_bit_flip():
    """Flipping any one bit of any element changes the digest (odd weight times 2**k)."""
    x = np.linspace(-3, 3, 60, dtype=np.float32).reshape(3, 4, 5)
    base, _ = checkpoint.fingerprint({"x": x})
    bits = x.view(np.uint32)
    for index in [(0, 0, 0), (1, 2, 3), (2, 3, 4)]:
        for bit in (0, 13, 31):
            flipped = bits.copy()
            flipped[index] ^= np.uint32(1 << bit)
            digest, _ = checkpoint.fingerprint({"x": flipped.view(np.float32)})
            assert digest["x"][0] != base["x"][0], (index, bit)
    # Swapping two elements keeps the plain sum but not the position-weighted one.
    swapped = x.copy()
    swapped[0, 0, 0], swapped[0, 0, 1] = x[0, 0, 1], x[0, 0, 0]
    assert checkpoint.fingerprint({"x": swapped})[0] != base


def test_digest_is_the_same_on_any_mesh():
    """Integer sums are exact in any order: a sharded array has its unsharded digest."""
    from jax.sharding import NamedSharding, PartitionSpec

    x = np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32)
    mesh = jax.make_mesh((8,), ("fsdp",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("fsdp")))
    assert checkpoint.fingerprint({"x": sharded}) == checkpoint.fingerprint({"x": x})


def test_damaged_metadata_falls_back(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    with open(os.path.join(workdir, "checkpoints", "40", "meta", "metadata"), "w") as f:
        f.write('{"step": 40, "conf')
    _, meta = train.load_state(tiny_config(40), workdir)
    assert meta["step"] == 20


def test_teacher_falls_back_without_touching_the_teacher_directory(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    for path in data_files(workdir, 40):
        open(path, "wb").write(open(path, "rb").read()[:100])
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    cfg = tiny_config(1, "ctm_mixture2d")
    cfg.teacher.update(kind="checkpoint", checkpoint=workdir)
    cfg.teacher.network = tiny_config(1).network
    params = teacher.load(cfg).params
    assert_trees_equal(params["params"], trained[1].net.emas["ema"])  # step 20's EMA
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_teacher_mismatch_lists_only_the_differing_fields(trained):
    cfg = tiny_config(1, "ctm_mixture2d")
    cfg.teacher.update(kind="checkpoint", checkpoint=trained[0])
    cfg.teacher.network = tiny_config(1).network
    cfg.teacher.network.hidden = 48
    with pytest.raises(ValueError) as e:
        teacher.load(cfg)
    message = str(e.value)
    assert "hidden: saved 32, now 48" in message and "\n" not in message
    assert "depth" not in message and "embed" not in message  # fields that agree are not listed


# --- config compatibility ----------------------------------------------------------------------

def test_another_network_is_an_error_that_touches_nothing(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    cfg = tiny_config(60)
    cfg.network.hidden = 64
    for attempt in (lambda: train.load_state(cfg, workdir), lambda: train.train(cfg, workdir)):
        with pytest.raises(errors.IncompatibleCheckpointError,
                           match=r"network\.hidden: saved 32, now 64.*--restart"):
            attempt()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert not os.path.exists(os.path.join(workdir, lock.LOCK_NAME))  # the lock was released


def test_restart_moves_the_old_run_aside(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    cfg = tiny_config(2)
    cfg.train.update(ckpt_every=2, sample_every=2)
    state = train.train(cfg, workdir, restart=True)
    assert int(state.step) == 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    aside = glob.glob(os.path.join(workdir, "replaced-*"))
    assert len(aside) == 1
    assert sorted(os.listdir(os.path.join(aside[0], "checkpoints"))) == ["20", "40"]
    assert json.load(open(os.path.join(aside[0], "metrics.json")))["step"] == 40


# --- divergence ---------------------------------------------------------------------------------

def test_a_diverged_state_is_never_kept_as_the_last_checkpoint(tmp_path):
    """lr=1e30 with a checkpoint every step: the warm-up makes step 1's update 0, step 2's weights
    about 1e27 (finite), and step 3's loss Inf. Step 2 was saved before that was known; it is set
    aside as diverged and step 1 stays the newest checkpoint."""
    cfg = tiny_config(10)
    cfg.optim.lr = 1e30
    cfg.train.update(ckpt_every=1, log_every=5)
    with pytest.raises(train.NonFiniteLossError, match=r"at step 3.*step 2.*diverged"):
        train.train(cfg, str(tmp_path))
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names[0] == "1" and names[1].startswith("2.diverged-") and len(names) == 2
    state, meta = train.load_state(cfg, str(tmp_path))
    assert meta["step"] == 1
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(state.net.params)) < 100


def test_a_diverged_final_or_preemption_save_is_caught_at_resume(tmp_path):
    """A save with no step after it (the final one, or SIGTERM's) cannot be confirmed by the run
    that wrote it; the first step of the resumed run confirms it or sets it aside."""
    cfg = tiny_config(2)
    cfg.optim.lr = 1e30
    cfg.train.update(ckpt_every=1, log_every=5)
    train.train(cfg, str(tmp_path))  # ends at step 2 with weights about 1e27: finite, diverged
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    cfg.train.num_steps = 10
    with pytest.raises(train.NonFiniteLossError, match=r"at step 3.*step 2.*diverged"):
        train.train(cfg, str(tmp_path))
    _, meta = train.load_state(cfg, str(tmp_path))
    assert meta["step"] == 1


def test_save_refuses_a_non_finite_state(tmp_path):
    mngr = checkpoint.manager(str(tmp_path))
    checkpoint.save(mngr, 1, {"w": np.ones(3, np.float32)}, {"step": 1})
    with pytest.raises(errors.NonFiniteStateError, match=r"step 2 has NaN/Inf values in w:"):
        checkpoint.save(mngr, 2, {"w": np.array([1, np.nan, 0], np.float32)}, {"step": 2})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1]
    mngr.close()


# --- final metrics ------------------------------------------------------------------------------

def test_a_finished_run_started_again_writes_missing_metrics(trained, tmp_path, monkeypatch):
    """SIGTERM during the final evaluation kills the job before metrics.json exists; the next
    start trains nothing and writes it."""
    workdir = copy_run(trained, tmp_path)
    os.remove(os.path.join(workdir, "metrics.json"))
    steps = []
    real_step = train.build

    def counting_build(*args, **kwargs):
        program = real_step(*args, **kwargs)
        step = program.step

        def counted(*a):
            steps.append(1)
            return step(*a)
        return train.Program(**{**program.__dict__, "step": counted})

    monkeypatch.setattr(train, "build", counting_build)
    train.train(tiny_config(40), workdir)
    assert not steps
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert metrics["step"] == 40 and metrics["num_modes"] == 8


# --- workdir lock -------------------------------------------------------------------------------

def test_a_live_lock_holder_stops_a_second_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"host": lock.socket.gethostname(), "pid": holder.pid,
                 "proc_start": lock._process_start_time(holder.pid), "started": "earlier"}
        (tmp_path / lock.LOCK_NAME).write_text(json.dumps(owner))
        with pytest.raises(errors.WorkdirLockedError, match=f"pid {holder.pid}"):
            train.train(tiny_config(2), str(tmp_path))
        assert not (tmp_path / "checkpoints").exists()
        assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_replaced(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps(
        {"host": lock.socket.gethostname(), "pid": dead.pid, "started": "earlier"}))
    path = lock.acquire(str(tmp_path))
    assert json.loads(open(path).read())["pid"] == os.getpid()
    lock.release(path)
    assert not os.path.exists(path)


def test_a_lock_from_another_host_names_it(tmp_path):
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps(
        {"host": "some-other-host", "pid": 1, "started": "earlier"}))
    with pytest.raises(errors.WorkdirLockedError, match="some-other-host.*delete"):
        lock.acquire(str(tmp_path))


# --- bad input ----------------------------------------------------------------------------------

BAD_FIELDS = [
    ("train.num_steps", -5), ("train.batch_size", 0), ("train.batch_size", -4),
    ("train.ckpt_every", 0), ("train.log_every", 0), ("train.sample_every", 0),
    ("train.num_grid_samples", 0), ("train.eval_every", -1), ("train.keep_checkpoints", 0),
    ("optim.lr", -1.0), ("optim.lr", 0.0), ("eval.num_samples", 0), ("eval.batch_size", 0),
    ("sample.sampler", "bogus"), ("sample.num_steps", 0), ("method.name", "nope"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_bad_field_is_named_before_anything_runs(field, value, tmp_path):
    cfg = tiny_config(2)
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(ValueError, match=f"config.{field}={value!r}"):
        train.train(cfg, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


def test_disk_full_is_one_line():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/40/state")
        except OSError as e:
            raise RuntimeError("async save failed") from e
    except RuntimeError as wrapped:
        line = errors.one_line(wrapped)
    assert line.startswith("error: the disk is full writing /ckpt/40/state") and "\n" not in line
    assert errors.one_line(RuntimeError("a bug")) is None  # bugs keep their traceback


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_errors_are_one_line(trained, tmp_path):
    """The command line's user errors: missing config file, bad value, incompatible checkpoint
    (nothing renamed), sample count."""
    assert_one_line_error(run_cli("--config=configs/missing.py", f"--workdir={tmp_path}"),
                          "configs/missing.py", "No such file")
    assert_one_line_error(run_cli(CONFIG, f"--workdir={tmp_path}", "--config.train.batch_size=0"),
                          "config.train.batch_size=0")
    workdir = copy_run(trained, tmp_path)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert_one_line_error(run_cli(CONFIG, f"--workdir={workdir}", "--mode=sample",
                                  "--config.network.hidden=64"),
                          "network.hidden: saved 32, now 64")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert_one_line_error(run_cli(CONFIG, f"--workdir={workdir}", "--mode=sample",
                                  "--num_samples=-3", *TINY), "--num_samples=-3")
    verbose = run_cli(CONFIG, f"--workdir={tmp_path}", "--config.train.batch_size=0", "--verbose")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


# --- killed processes ---------------------------------------------------------------------------

def train_cli(workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), CONFIG, f"--workdir={workdir}",
                             *TINY, *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # three compiles of a run (one in a fresh process): about 1-2 minutes
def test_sigkill_during_a_save_resumes_exactly(tmp_path):
    """A run saving every step is SIGKILLed while a save is in flight; the restart replaces the
    dead run's lock, resumes from the newest committed step and ends with the uninterrupted run's
    state (how often a run saves does not change its state, so the references save rarely)."""
    workdir = tmp_path / "killed"
    proc = train_cli(workdir, "--config.train.num_steps=40", "--config.train.ckpt_every=1",
                     "--config.train.log_every=10", "--config.train.sample_every=40")
    deadline = time.time() + 240
    in_flight = []
    while time.time() < deadline and proc.poll() is None and not in_flight:
        names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
        committed = [int(n) for n in names if n.isdigit()]
        if committed and max(committed) >= 3:
            in_flight = [n for n in names if "tmp" in n]
        time.sleep(0.005)
    assert in_flight and proc.poll() is None, "no save in flight to kill: " + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (workdir / lock.LOCK_NAME).exists()  # a SIGKILLed run cannot release its lock
    killed_at = max(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
    assert killed_at < 40
    cfg = tiny_config(40)
    resumed = train.train(cfg, str(workdir))
    straight = train.train(cfg, str(tmp_path / "straight"))
    assert int(resumed.step) == 40
    assert_trees_equal(resumed, straight)
