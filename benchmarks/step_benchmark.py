"""Compile time, step time, throughput, memory, FLOPs and MFU of a config's train step.

Builds the config's `train.Program` on the current devices, feeds it synthetic batches of
`config.model.shape` / `config.model.label_dim` (no data set needed) and writes one JSON object:

  python benchmarks/step_benchmark.py --config=configs/edm_cifar10.py \
      --config.train.batch_size=16 --steps=5 --output=bench.json
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/step_benchmark.py \
      --config=configs/edm_cifar10.py --config.mesh.data=8 --config.train.batch_size=8
  ... --config.model.compute_dtype=bfloat16    ... --config.network.remat=True

Every config field can be overridden with --config.a.b=value (after --config=...); a field the
config lacks cannot be set (e.g. network.remat needs the config's network dict to define it).
Definitions:
  - compile_s: wall time of `program.step.lower(state, teacher, batch, key).compile()` (teacher
    is None when the config trains a teacher, e.g. EDM);
  - step_s_*: median / min / mean over --steps timed calls of that compiled step (after one warm-up),
    each ended by `jax.block_until_ready`; images_per_s = batch_size / step_s_median;
  - *_bytes_per_device: XLA's `compiled.memory_analysis()` (per device). On CPU its
    peak_memory_in_bytes leaves out the temp buffers (measured: a jit with 4 MB of arguments and
    8 MB of temps reports a 4 MB peak), so live_bytes_upper_bound_per_device = argument + output
    - alias + temp is given as well; host_peak_rss_bytes is the process's maximum resident set;
  - flops_per_step_per_device: XLA's `compiled.cost_analysis()['flops']`, which is per device
    (shared/research/jax_apis.md h); *_global multiplies by the device count. These are the FLOPs
    XLA executes, so remat's recomputation is counted;
  - peak_flops_per_s_per_device: a jitted float32 n x n matmul (2 n^3 FLOPs) on device 0,
    median of several runs; mfu = achieved_flops_per_s_per_device / peak_flops_per_s_per_device.
    On a shared CPU host other processes slow both: the 1-minute load average is recorded at the
    start and the end (on 2 cores, a load above ~2 means the numbers are contended).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps (after one warm-up step); 0 compiles "
                              "only (compile time, memory, FLOPs).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write (the JSON is printed anyway).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "n of the n x n float32 matmul that "
                                    "measures the device's peak FLOP/s.")
_MATMUL_REPEATS = flags.DEFINE_integer("matmul_repeats", 5, "Timed runs of that matmul.")
flags.mark_flags_as_required(["config"])


def synthetic_batch(config, seed: int) -> dict:
    """Host batch {'x': float32 (B, *model.shape) in [-1, 1], 'label': int32 (B,)}."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = config.train.batch_size
    x = np.clip(0.5 * rng.standard_normal((n, *config.model.shape)), -1.0, 1.0)
    labels = rng.integers(0, max(config.model.label_dim, 1), size=(n,))
    return {"x": x.astype(np.float32), "label": labels.astype(np.int32)}


def param_count(state) -> int:
    import jax

    # Every Trainable's params (EDM's net, CTM's student + discriminator, DMD2's generator +
    # fake score / head): the trained parameters of the step.
    from jaxdistill.methods.trainable import Trainable

    trainables = [v for v in vars(state).values() if isinstance(v, Trainable)]
    return sum(int(p.size) for t in trainables for p in jax.tree.leaves(t.params))


def compile_step(program, state, teacher, batch, key, frozen):
    """(compiled step, lower s, compile s); the compiled step runs exactly what training runs."""
    t0 = time.perf_counter()
    lowered = program.step.lower(state, teacher, batch, key, frozen)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def executable_size(compiled) -> int:
    """Bytes of the serialized executable: constants baked into the program (e.g. weights closed
    over by the step) count here; arguments do not."""
    from jax.experimental import serialize_executable

    return len(serialize_executable.serialize(compiled)[0])


def time_steps(compiled, state, teacher, batch, key, frozen, steps: int):
    """Runs one warm-up and `steps` timed steps; (seconds per step, final state, last metrics)."""
    import jax

    state, metrics = jax.block_until_ready(compiled(state, teacher, batch, key, frozen))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, teacher, batch, key, frozen))
        times.append(time.perf_counter() - t0)
    return times, state, jax.device_get(metrics)


def memory_fields(compiled) -> dict:
    """Per-device sizes from XLA's memory analysis, and the runtime's peak where it reports one."""
    import jax

    ma = compiled.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    live = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes)
    return {
        "peak_memory_bytes_per_device": int(ma.peak_memory_in_bytes),
        "live_bytes_upper_bound_per_device": int(live),
        "argument_bytes_per_device": int(ma.argument_size_in_bytes),
        "output_bytes_per_device": int(ma.output_size_in_bytes),
        "alias_bytes_per_device": int(ma.alias_size_in_bytes),
        "temp_bytes_per_device": int(ma.temp_size_in_bytes),
        "generated_code_bytes": int(ma.generated_code_size_in_bytes),
        "device0_runtime_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }


def peak_matmul_flops(n: int, repeats: int) -> float:
    """FLOP/s of a jitted float32 (n, n) @ (n, n) on device 0 (median of `repeats` runs)."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


def load_teacher(config):
    """(Teacher, description). A checkpoint teacher without a path gets random weights of
    `config.teacher.network`: step time does not depend on the teacher's weight values."""
    import jax

    from jaxdistill import teacher as teacher_lib
    from jaxdistill.methods import common

    if config.teacher.kind == "checkpoint" and not config.teacher.checkpoint:
        cfg = config.copy_and_resolve_references()
        cfg.unlock()
        cfg.network = cfg.teacher.network
        denoiser = common.build_denoiser(cfg)
        params, consts = jax.jit(lambda k: common.init_variables(cfg, denoiser, k))(
            jax.random.key(config.seed))
        return (teacher_lib.Teacher(params={"params": params, **consts}, denoise=denoiser),
                "random weights of config.teacher.network")
    return teacher_lib.load(config), config.teacher.kind


def load_frozen(config):
    """(the method's frozen weights, description). CTM's pretrained GAN backbones without a
    weight file get random weights of their architecture (timing does not depend on the values)."""
    import jax

    from jaxdistill import train
    from jaxdistill.networks import backbones

    mc = config.method
    names = [n for n in mc.get("gan_backbones", ()) if n in backbones.PRETRAINED
             and mc.gan_weight > 0 and not mc[n].weights]
    if not names:
        return train.frozen_weights(config), "files"
    frozen = {"backbones": {}}
    for name in names:
        backbone = backbones.build(name, mc)
        x = backbones.prepare_images(jax.numpy.zeros((1,) + tuple(config.model.shape)),
                                     *backbone.norm, backbone.image_size)
        variables = jax.jit(backbone.module.init)(jax.random.key(0), x)
        frozen["backbones"][name] = {c: variables[c] for c in backbones.PRETRAINED_COLLECTIONS
                                     if c in variables}
    return frozen, f"random weights of {names}"


def benchmark(config, config_path: str, steps: int, matmul_size: int = 2048,
              matmul_repeats: int = 5) -> dict:
    """Measures the compiled train step of `config` on all current devices; returns the record."""
    import jax

    from jaxdistill import parallel, train

    load_start = os.getloadavg()[0]
    train.validate(config)
    teacher, teacher_source = load_teacher(config)  # None for teacher training (EDM)
    frozen, frozen_source = load_frozen(config)
    program = train.build(config, teacher=teacher, frozen=frozen)
    teacher = train.place_teacher(program, teacher)
    frozen = train.place_frozen(program, frozen)
    parallel.check_batch_size(config.train.batch_size, program.mesh)
    n_dev = program.mesh.size
    key = jax.random.key(config.seed)
    t0 = time.perf_counter()
    state = jax.block_until_ready(program.init(key, teacher))
    init_s = time.perf_counter() - t0
    n_params = param_count(state)
    batch = parallel.shard_batch(synthetic_batch(config, config.seed), program.mesh)
    compiled, lower_s, compile_only_s = compile_step(program, state, teacher, batch, key, frozen)
    executable_bytes = executable_size(compiled)
    flops = float(compiled.cost_analysis()["flops"])
    if steps > 0:
        times, state, metrics = time_steps(compiled, state, teacher, batch, key, frozen, steps)
        step_s = statistics.median(times)
    else:  # --steps=0: compile time, memory and FLOPs of a step too slow to run on this host
        times, metrics, step_s = [], None, None
    rate = (lambda v: v / step_s) if step_s else (lambda v: None)  # noqa: E731
    peak = peak_matmul_flops(matmul_size, matmul_repeats)
    batch_size = config.train.batch_size
    record = {
        "config": config_path,
        "method": config.method.name,
        "teacher": teacher_source,
        "frozen_weights": frozen_source,
        "serialized_executable_bytes": executable_bytes,
        "network": config.network.name,
        "data": "synthetic",
        "batch_size": batch_size,
        "image_shape": list(config.model.shape),
        "label_dim": config.model.label_dim,
        "compute_dtype": config.model.compute_dtype,
        "remat": bool(config.network.get("remat", False)),
        "mesh_shape": {k: int(v) for k, v in program.mesh.shape.items()},
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "device_count": n_dev,
        "jax_version": jax.__version__,
        "param_count": n_params,
        "init_s": init_s,
        "lower_s": lower_s,
        "compile_s": lower_s + compile_only_s,
        "timed_steps": steps,
        "step_s_all": times,
        "step_s_median": step_s,
        "step_s_min": min(times) if times else None,
        # Methods with alternating branches (DMD2's TTUR, CTM's GAN) differ step to step: the
        # mean over a whole cycle of timed steps is the throughput that training sees.
        "step_s_mean": statistics.mean(times) if times else None,
        "images_per_s": rate(batch_size),
        "images_per_s_per_device": rate(batch_size / n_dev),
        **memory_fields(compiled),
        "flops_per_step_per_device": flops,
        "flops_per_step_global": flops * n_dev,
        "achieved_flops_per_s_per_device": rate(flops),
        "achieved_flops_per_s_global": rate(flops * n_dev),
        "peak_flops_per_s_per_device": peak,
        "peak_flops_matmul": f"float32 {matmul_size}x{matmul_size} @ {matmul_size}x{matmul_size} "
                             f"on device 0, median of {matmul_repeats}",
        "mfu": rate(flops / peak),
        "final_loss": None if metrics is None else float(metrics["loss"]),
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "host_load_avg_1min_start": load_start,
        "host_load_avg_1min_end": os.getloadavg()[0],
    }
    if record["platform"] == "cpu" and n_dev > 1:
        record["note"] = ("host-platform CPU devices share the same cores: the per-device peak "
                          "is the whole host's, so per-device MFU understates; compare "
                          "achieved_flops_per_s_global with peak_flops_per_s_per_device.")
    return record


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    jax.config.update("jax_threefry_partitionable", True)  # as run.py trains
    config_flag = flags.FLAGS["config"]
    record = benchmark(_CONFIG.value, config_flags.get_config_filename(config_flag),
                       _STEPS.value, _MATMUL_SIZE.value, _MATMUL_REPEATS.value)
    record["config_overrides"] = config_flags.get_override_values(config_flag)
    text = json.dumps(record, indent=2)
    print(text)
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
