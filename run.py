"""jaxdistill command line: train, sample or evaluate a config.

  python run.py --config=configs/edm_digits.py --workdir=/tmp/run            # train / resume
  python run.py --config=... --workdir=/tmp/run --mode=sample --num_samples=64 --output=s.npz
  python run.py --config=... --workdir=/tmp/run --mode=eval                  # metrics JSON
  python run.py --config=configs/edm_cifar10.py --workdir=/tmp/run --mode=ref_stats \
      --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth \
      --config.eval.ref_stats=/tmp/cifar10-32x32.npz                        # FID reference
Every config field can be overridden: --config.optim.lr=3e-4 --config.train.num_steps=100.
A problem the user can fix (bad field, missing file, locked workdir, incompatible checkpoint) is
one line `error: ...` with exit code 2; --verbose (or JAXDISTILL_VERBOSE=1) shows its traceback.
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxdistill import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "ref_stats"],
                          "What to do: train / resume, write samples, score samples of the "
                          "newest checkpoint, or write FID reference statistics of the config's "
                          "TFDS data set to config.eval.ref_stats.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Samples to write in --mode=sample.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .npz for --mode=sample "
                              "(default WORKDIR/samples.npz).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Cloud TPU pod slice: call "
                                "jax.distributed.initialize() with auto-detected coordinator.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 "
                                   "(multi-process GPU / CPU; or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes "
                                      "(or JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id (or JAX_PROCESS_ID).")
_RESTART = flags.DEFINE_bool("restart", False, "Train from scratch in a workdir that holds another "
                             "run, moving its checkpoints and metrics to WORKDIR/replaced-<time>/.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")
flags.mark_flags_as_required(["config", "workdir"])


def _write_samples(config, workdir: str, n: int, path: str) -> None:
    import jax
    import numpy as np

    from jaxdistill import data, train

    state, meta = train.load_state(config, workdir)
    samples, labels = train.generate(config, state, jax.random.key(config.seed + 1), n)
    out = {"samples": samples.astype(np.float32)}
    if labels is not None:
        out["labels"] = labels.astype(np.int32)
    mix = data.spec(config.data).mixture
    if mix is not None:
        out.update(means=np.asarray(mix.means), stds=np.asarray(mix.stds),
                   weights=np.asarray(mix.weights))
        if mix.classes is not None:
            out["classes"] = np.asarray(mix.classes, np.int32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **out)
    logging.info("wrote %d samples from step %d to %s", n, meta["step"], path)
    print(f"wrote {n} samples (step {meta['step']}) to {path}")


class _QuietLibraries(std_logging.Filter):
    """Keeps Orbax's per-save INFO chatter out of the console; its warnings still show, and its
    errors as their one-line message (a failed background save, e.g. a full disk, ends the run
    with one `error:` line; --verbose keeps their tracebacks)."""

    def filter(self, record):
        if "/orbax/" not in record.pathname:
            return True
        if record.levelno >= std_logging.ERROR and not errors.verbose_requested():
            record.exc_info, record.exc_text = None, None
        return record.levelno >= std_logging.WARNING


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    from jaxdistill import parallel, train

    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    auto=_MULTIHOST.value)
    jax.config.update("jax_threefry_partitionable", True)

    config, workdir = _CONFIG.value, _WORKDIR.value
    try:
        config.get("seed")
    except OSError as e:  # ml_collections defers a config file's load error to the first access
        reason = " ".join(str(e).split()).split("Attempted")[-1]
        raise FileNotFoundError(f"could not load the config file {_config_arg(sys.argv)} "
                                f"({reason.strip()}): check its path and that it defines "
                                "get_config()") from e
    if _MODE.value == "train":
        train.train(config, workdir, restart=_RESTART.value)
    elif _MODE.value == "sample":
        if _NUM_SAMPLES.value <= 0:
            raise ValueError(f"--num_samples={_NUM_SAMPLES.value}: must be positive")
        train.validate(config)
        _write_samples(config, workdir, _NUM_SAMPLES.value,
                       _OUTPUT.value or os.path.join(workdir, "samples.npz"))
    elif _MODE.value == "ref_stats":
        from jaxdistill.eval import image_metrics

        train.validate(config)
        stats = image_metrics.reference_stats(config, config.eval.ref_stats)
        print(f"wrote reference statistics of {stats['num_images']} images to "
              f"{config.eval.ref_stats}")
    else:
        train.validate(config)
        state, meta = train.load_state(config, workdir)
        metrics = train.evaluate(config, state, jax.random.key(config.seed + 2))
        metrics["step"] = int(meta["step"])
        with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics, indent=2))


def _fail(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(2)


def _parse_flags(argv):
    """absl's flag parsing, with a bad override or config file as one line (exit 2)."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 -- every parse failure is the user's input
        if errors.verbose_requested(argv):
            raise
        text = " ".join(str(e).split())
        if isinstance(e, AttributeError):
            overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
            _fail(f"error: unknown config field in {overrides}: {text}")
        if isinstance(e, flags.Error) and "Failed loading config file" not in text:
            _fail(f"error: {text}: fix the flag's value (python run.py --helpfull lists them)")
        _fail(f"error: could not load the config file {_config_arg(argv)} ({text}): check its "
              "path and that it defines get_config()")


def _config_arg(argv) -> str:
    return next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "--config")


def run():
    """app.run, printing a user's error as one line `error: ...` (exit 2) instead of a traceback.

    Errors raised inside `main` are turned into one line by jaxdistill.errors.one_line; anything
    else (a bug) keeps its traceback.
    """
    try:
        app.run(main, flags_parser=_parse_flags)
    except Exception as e:  # noqa: BLE001 -- re-raised unless it is a user error
        line = None if errors.verbose_requested() else errors.one_line(e)
        if line is None:
            raise
        _fail(line)


if __name__ == "__main__":
    run()
