"""benchmarks/step_benchmark.py: every JSON field, consistent numbers, the true param count."""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax

from jaxdistill import train

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_edm import ROOT, load_config  # noqa: E402

FIELDS = (
    "config", "method", "teacher", "network", "data", "batch_size", "image_shape", "label_dim",
    "compute_dtype", "remat", "mesh_shape", "platform", "device_kind", "device_count",
    "jax_version", "param_count", "init_s", "lower_s", "compile_s", "timed_steps", "step_s_all",
    "step_s_median", "step_s_min", "images_per_s", "images_per_s_per_device",
    "peak_memory_bytes_per_device", "argument_bytes_per_device", "output_bytes_per_device",
    "alias_bytes_per_device", "temp_bytes_per_device", "generated_code_bytes",
    "live_bytes_upper_bound_per_device", "host_peak_rss_bytes",
    "device0_runtime_peak_bytes_in_use", "flops_per_step_per_device", "flops_per_step_global",
    "achieved_flops_per_s_per_device", "achieved_flops_per_s_global",
    "peak_flops_per_s_per_device", "peak_flops_matmul", "mfu", "final_loss", "config_overrides",
    "host_load_avg_1min_start", "host_load_avg_1min_end",
)


def test_step_benchmark_writes_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # one device
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_benchmark.py"),
                        "--config=configs/edm_mixture2d.py", "--config.train.batch_size=64",
                        "--steps=2", f"--output={out}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert json.loads(r.stdout[r.stdout.index("{"):]) == rec  # the printed JSON is the file's
    assert set(FIELDS) <= set(rec), set(FIELDS) - set(rec)

    assert rec["config"] == "configs/edm_mixture2d.py" and rec["data"] == "synthetic"
    assert rec["method"] == "edm" and rec["batch_size"] == 64 and rec["timed_steps"] == 2
    assert rec["config_overrides"] == {"train.batch_size": 64}
    assert rec["device_count"] == 1 and rec["mesh_shape"] == {"data": 1, "fsdp": 1}
    assert rec["compute_dtype"] == "float32" and rec["remat"] is False
    assert rec["jax_version"] == jax.__version__

    times = rec["step_s_all"] + [rec["compile_s"], rec["step_s_median"], rec["step_s_min"]]
    assert len(rec["step_s_all"]) == 2
    assert all(math.isfinite(t) and t > 0 for t in times)
    assert rec["step_s_min"] <= rec["step_s_median"] < rec["compile_s"]
    assert math.isclose(rec["images_per_s"], rec["batch_size"] / rec["step_s_median"],
                        rel_tol=1e-9)
    assert math.isclose(rec["images_per_s_per_device"], rec["images_per_s"], rel_tol=1e-9)

    assert rec["flops_per_step_per_device"] > 0
    assert rec["flops_per_step_global"] == rec["flops_per_step_per_device"]
    assert math.isclose(rec["achieved_flops_per_s_per_device"],
                        rec["flops_per_step_per_device"] / rec["step_s_median"], rel_tol=1e-9)
    assert rec["peak_flops_per_s_per_device"] > 0
    assert 0 < rec["mfu"] and math.isclose(
        rec["mfu"], rec["achieved_flops_per_s_per_device"] / rec["peak_flops_per_s_per_device"],
        rel_tol=1e-9)
    assert rec["peak_memory_bytes_per_device"] > 0 and rec["argument_bytes_per_device"] > 0
    assert rec["live_bytes_upper_bound_per_device"] == (
        rec["argument_bytes_per_device"] + rec["output_bytes_per_device"]
        - rec["alias_bytes_per_device"] + rec["temp_bytes_per_device"])
    assert rec["host_peak_rss_bytes"] >= rec["argument_bytes_per_device"]
    assert math.isfinite(rec["final_loss"])

    cfg = load_config("edm_mixture2d")
    cfg.train.batch_size = 64
    params = train.build(cfg).abstract_state.net.params  # EDM: no teacher
    assert rec["param_count"] == sum(p.size for p in jax.tree.leaves(params))
    # the 3-layer MLP's weights and biases alone are far more than a few parameters
    assert rec["param_count"] > 3 * 128 * 128
