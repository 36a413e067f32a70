"""jaxdistill command line: train, sample or evaluate a config.

  python run.py --config=configs/edm_digits.py --workdir=/tmp/run            # train / resume
  python run.py --config=... --workdir=/tmp/run --mode=sample --num_samples=64 --output=s.npz
  python run.py --config=... --workdir=/tmp/run --mode=eval                  # metrics JSON
  python run.py --config=configs/edm_cifar10.py --workdir=/tmp/run --mode=ref_stats \
      --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth \
      --config.eval.ref_stats=/tmp/cifar10-32x32.npz                        # FID reference
Every config field can be overridden: --config.optim.lr=3e-4 --config.train.num_steps=100.
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **out)
    logging.info("wrote %d samples from step %d to %s", n, meta["step"], path)
    print(f"wrote {n} samples (step {meta['step']}) to {path}")


_STARTED = False


class _QuietLibraries(std_logging.Filter):
    """Keeps Orbax's per-save INFO chatter out of the console; its warnings still show."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    global _STARTED
    _STARTED = True
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    from jaxdistill import parallel, train

    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    auto=_MULTIHOST.value)
    jax.config.update("jax_threefry_partitionable", True)

    config, workdir = _CONFIG.value, _WORKDIR.value
    if _MODE.value == "train":
        train.train(config, workdir)
    elif _MODE.value == "sample":
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


def run():
    """app.run, turning ml_collections' traceback for an unknown override into a clear error.

    An unknown `--config.a.b=...` raises AttributeError while absl parses flags, before `main`
    starts; errors raised later are not touched.
    """
    try:
        app.run(main)
    except AttributeError as e:
        if _STARTED:
            raise
        overrides = " ".join(a for a in sys.argv[1:] if a.startswith("--config."))
        sys.stderr.write(f"error: unknown config field in {overrides}: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    run()
