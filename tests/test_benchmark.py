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


# ------------------------------------------------------------------------------------------------
# benchmarks/gmm_table.py's blur metrics (jaxdistill.eval.mixture_metrics) against closed forms on
# well-separated isotropic mixtures, and the table's Markdown / budget curve. Numpy-level, seconds.

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from jaxdistill.data import mixtures  # noqa: E402
from jaxdistill.eval import mixture_metrics as mm  # noqa: E402

# Components 40 apart with stds <= 1: even at twice the std no sample is nearer another component.
MEANS3 = np.array([[0.0, 0, 0], [40, 0, 0], [0, 40, 0], [0, 0, 40]], np.float32)
STDS3 = np.array([0.5, 1.0, 0.7, 0.3], np.float32)
WEIGHTS3 = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
N = 200_000


def gmm_mix(means=MEANS3, stds=STDS3, weights=WEIGHTS3):
    return mixtures.GaussianMixture(jax.numpy.asarray(means), jax.numpy.asarray(stds),
                                    jax.numpy.asarray(weights))


from conftest import load_gmm_table  # noqa: E402,F401


def binomial_tol(p, n, z=4.0):
    return z * math.sqrt(p * (1 - p) / n)


def test_gmm_metrics_true_samples_score_as_the_data():
    mix = gmm_mix()
    x, _ = mixtures.sample(mix, jax.random.key(1), N)
    gap = mm.log_likelihood_gap(mix, x, jax.random.key(2))
    # var log p ~ D/2 + var(log w) ~ 1.7 for these weights: stderr of the difference ~ 0.005
    assert 0 < gap["log_likelihood_gap_stderr"] < 0.01, gap
    assert abs(gap["log_likelihood_gap"]) < 4 * gap["log_likelihood_gap_stderr"], gap
    assert gap["log_likelihood_gap_per_dim"] == gap["log_likelihood_gap"] / 3
    # E log p0 in closed form (separated components): sum_k w_k (log w_k - D/2 log(2 pi s_k^2) - D/2)
    w, s = WEIGHTS3.astype(float), STDS3.astype(float)
    neg_entropy = np.sum(w * (np.log(w) - 1.5 * np.log(2 * np.pi * s**2) - 1.5))
    assert abs(gap["true_log_likelihood"] - neg_entropy) < 0.02, (gap, neg_entropy)

    spread = mm.spread_ratios(mix, x)  # relative stderr 1/sqrt(2 n_k D) <= 0.3%
    np.testing.assert_allclose(spread, 1.0, atol=0.015)
    share = mm.outside_share(mix, x)
    assert abs(share - 0.001) < binomial_tol(0.001, N), share
    np.testing.assert_allclose(mm.weight_ratios(mix, x), 1.0,
                               atol=binomial_tol(0.1, N) / 0.1)

    m = mm.blur_metrics(mix, x[:4000], jax.random.key(3))
    assert m["weight_ratio_worst"] == max(m["weight_ratio_max"], 1 / m["weight_ratio_min"]) < 1.1


def test_gmm_metrics_twice_the_std():
    """Samples of the same mixture with every std doubled: E||x - mu||^2 / s^2 = 4 D instead of D,
    same normaliser, so the gap is D (4 - 1) / 2 = 4.5 nats (1.5 per dimension), spread 2, and a
    sample leaves the 99.9% region when chi2_D > q / 4."""
    mix = gmm_mix()
    x, _ = mixtures.sample(gmm_mix(stds=2 * STDS3), jax.random.key(4), N)
    gap = mm.log_likelihood_gap(mix, x, jax.random.key(5))
    assert gap["log_likelihood_gap_stderr"] < 0.02, gap
    assert abs(gap["log_likelihood_gap"] - 4.5) < 4 * gap["log_likelihood_gap_stderr"], gap
    assert abs(gap["log_likelihood_gap_per_dim"] - 1.5) < 0.03, gap
    np.testing.assert_allclose(mm.spread_ratios(mix, x), 2.0, atol=0.03)
    expected = stats.chi2.sf(stats.chi2.ppf(0.999, 3) / 4, 3)  # ~0.25
    assert abs(mm.outside_share(mix, x) - expected) < binomial_tol(expected, N)
    m = mm.blur_metrics(mix, x[:4000], jax.random.key(6))
    assert 1.9 < m["spread_ratio_mean"] < m["spread_ratio_max"] < 2.2, m  # (4000 samples)


def test_gmm_metrics_image_shaped_64_dims():
    """An image-shaped mixture (8x8x1, D = 64): the per-dimension gap, the spread ratio and the
    chi2 region use D = 64, not one axis."""
    rng = np.random.default_rng(0)
    means = (rng.choice([-1.0, 1.0], size=(3, 8, 8, 1)) * 3).astype(np.float32)  # >= 6 apart
    stds, weights = np.full(3, 0.2, np.float32), np.full(3, 1 / 3, np.float32)
    mix = gmm_mix(means, stds, weights)
    n = 20_000
    x, _ = mixtures.sample(gmm_mix(means, 1.5 * stds, weights), jax.random.key(7), n)
    gap = mm.log_likelihood_gap(mix, x, jax.random.key(8))
    # 64 (1.5^2 - 1) / 2 = 40 nats, 0.625 per dimension
    assert abs(gap["log_likelihood_gap"] - 40.0) < 4 * gap["log_likelihood_gap_stderr"], gap
    assert abs(gap["log_likelihood_gap_per_dim"] - 0.625) < 0.01, gap
    np.testing.assert_allclose(mm.spread_ratios(mix, x), 1.5, atol=0.01)
    expected = stats.chi2.sf(stats.chi2.ppf(0.999, 64) / 1.5**2, 64)
    assert 0.9 < expected < 0.99  # (chi2 with 1 or 3 degrees of freedom would give ~1)
    assert abs(mm.outside_share(mix, x) - expected) < binomial_tol(expected, n)
    x, _ = mixtures.sample(mix, jax.random.key(9), n)
    assert abs(mm.outside_share(mix, x) - 0.001) < binomial_tol(0.001, n)


def test_gmm_metrics_reweighted_component():
    """Samples of the mixture with weights w': ratios w' / w, and (separated components) the gap
    sum_k (w_k - w'_k) (log w_k - D/2 log(2 pi s_k^2) - D/2) in closed form."""
    mix = gmm_mix()
    w2 = np.array([0.4, 0.1, 0.2, 0.3], np.float32)
    x, _ = mixtures.sample(gmm_mix(weights=w2), jax.random.key(10), N)
    ratios = mm.weight_ratios(mix, x)
    np.testing.assert_allclose(ratios, w2 / WEIGHTS3, rtol=0.03)
    w, s = WEIGHTS3.astype(float), STDS3.astype(float)
    expected = np.sum((w - w2) * (np.log(w) - 1.5 * np.log(2 * np.pi * s**2) - 1.5))  # ~ -0.7
    gap = mm.log_likelihood_gap(mix, x, jax.random.key(11))
    assert abs(gap["log_likelihood_gap"] - expected) < 4 * gap["log_likelihood_gap_stderr"], (
        gap, expected)
    m = mm.blur_metrics(mix, x[:4000], jax.random.key(11), baseline=1.0)  # (no baseline needed)
    # 4000 samples: p_hat of the w' = 0.4 / 0.1 components within ~0.008 / 0.005 (one sd)
    assert abs(m["weight_ratio_min"] - 0.5) < 0.1 and abs(m["weight_ratio_max"] - 4.0) < 0.2
    assert m["weight_ratio_worst"] == m["weight_ratio_max"]
    # 400 samples x 3 dims in the smallest component: sd of its ratio ~ 1 / sqrt(2400) = 2%
    np.testing.assert_allclose([m["spread_ratio_min"], m["spread_ratio_max"]], 1.0, atol=0.08)

    # A component that gets no sample: ratio 0, worst infinite, no spread ratio for it.
    x, comp = mixtures.sample(mix, jax.random.key(12), 4000)
    x = x[np.asarray(comp) != 3]
    assert mm.weight_ratios(mix, x)[3] == 0 and np.isnan(mm.spread_ratios(mix, x)[3])
    m = mm.blur_metrics(mix, x, jax.random.key(13))
    assert m["weight_ratio_min"] == 0 and m["weight_ratio_worst"] == math.inf
    assert math.isfinite(m["spread_ratio_max"])


def test_gmm_metrics_share_the_table_sliced_wasserstein():
    """blur_metrics' distance is exact_metrics' (same reference samples and projections), and
    its baseline is true vs true at the same size. (On the widely separated mixtures above the
    distance is dominated by the +-sqrt(n) noise in how many samples each far-apart mode gets,
    not by the width, which is why the spread ratio and log-likelihood gap are reported.)"""
    mix = mixtures.ring2d()
    x, _ = mixtures.sample(gmm_mix(mix.means, 3 * mix.stds, mix.weights), jax.random.key(14),
                           4000)
    key = jax.random.key(15)
    m = mm.blur_metrics(mix, x, key)
    assert m["sliced_wasserstein"] == mixtures.exact_metrics(mix, x, key)["sliced_wasserstein"]
    assert m["sliced_wasserstein_ratio"] == m["sliced_wasserstein"] / m[
        "sliced_wasserstein_baseline"]
    assert m["sliced_wasserstein_ratio"] > 2, m  # 3x the std (measured 2.7)
    y, _ = mixtures.sample(mix, jax.random.key(18), 4000)
    assert 0.5 < mm.blur_metrics(mix, y, key)["sliced_wasserstein_ratio"] < 2  # true vs true: ~1
    # a given baseline is used as is
    assert mm.blur_metrics(mix, x, key, baseline=0.5)["sliced_wasserstein_ratio"] == (
        m["sliced_wasserstein"] / 0.5)
    # the n-sample noise floor falls with n (measured 2.5x from 500 to 8000 samples on the ring,
    # slower than n^-1/2 at these sizes)
    small = mm.sliced_wasserstein_baseline(mix, 250, jax.random.key(16), jax.random.key(17))
    large = mm.sliced_wasserstein_baseline(mix, 4000, jax.random.key(16), jax.random.key(17))
    assert 1.8 < small / large < 6, (small, large)


def test_gmm_table_markdown_and_budget_curve_sections():
    """The table prints the new columns, tolerates rows written before them (old MSD rows), and
    the budget curve gets its table; run folders and widths are what the flags say."""
    gmm_table = load_gmm_table()
    assert gmm_table.run_name("ctm", "mixture2d") == "ctm_mixture2d"
    assert gmm_table.run_name("ctm", "mixture2d", 4, 2) == "ctm_mixture2d_b4_w2"
    cfg = gmm_table.load_config("ctm_mixture2d")
    wide = gmm_table.scaled_config(cfg, 2)
    assert wide.network.hidden == 2 * cfg.network.hidden and wide.train == cfg.train

    mix = mixtures.ring2d()
    key = jax.random.key(0)
    true = gmm_table.true_row(cfg, key, 2000)
    assert true["model"] == "true samples" and abs(true["log_likelihood_gap"]) < 0.2
    x, _ = mixtures.sample(gmm_mix(mix.means, 2 * mix.stds, mix.weights), key, 2000)
    row = {"model": "CTM", "steps": 1, "nfe": 1, **gmm_table.row_metrics(cfg, x, key)}
    assert abs(row["log_likelihood_gap_per_dim"] - 1.5) < 0.15
    old = {"model": "teacher heun", "steps": 18, "nfe": 35, "log_likelihood": 0.0,
           "sliced_wasserstein": 0.03, "mode_tv": 0.01, "modes_covered": 8}
    curve = [{"data": "mixture2d", "budget": b, "width": 1.0, "hidden": 128, "train_steps": 3000,
              "train_seconds": 60.0, **row} for b in (1.0, 4.0)]
    table = gmm_table.markdown({"datasets": {"mixture2d": [true, old, row]},
                                "budget_curve": curve})
    assert "| true samples | 0 | 0 |" in table and "| CTM | 1 | 1 |" in table
    assert "gap (nats)" in table and "spread mean / max" in table and "SW / baseline" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("| CTM | 1 | 1 |"))
    assert f"| {row['log_likelihood_gap']:.3f} |" in line and "| 2.0" in line
    assert table.count("| 2-D ring (8 modes) | CTM | 128 | 4 |") == 1
    rec = json.loads(gmm_table.dumps({"a": [math.nan, math.inf, 1.0]}))
    assert rec == {"a": [None, None, 1.0]}
