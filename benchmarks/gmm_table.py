"""The analytic-teacher benchmark: every distillation method on the 2-D ring and the 8x8 image
mixture, whose exact teacher and exact metrics need no data or weights.

For each data set: the teacher's own Euler and Heun samplers at 1, 2 and 4 steps and Heun at 18
steps (35 NFE); each method's student trained with its shipped config (a fixed small CPU budget;
`--budget` scales every run's step count) and sampled at 1, 2 and 4 steps; a first row scores
true samples, the floor of every column. Metrics: mean log-likelihood under the true mixture,
sliced Wasserstein to fresh true samples, mode TV and modes covered, and the ones that show blur
(jaxdistill.eval.mixture_metrics): the log-likelihood gap to true samples (nats, total and per
dimension), the per-component spread ratio (RMS distance of the samples assigned to a component
from its mean over its std: mean and max over components), the share of samples outside every
component's 99.9% region, the component-weight ratios p_hat / p (min and max) and sliced
Wasserstein over its true-vs-true baseline. Then MSD (4 students, class-conditional ring, one class per mode) beside one
DMD2 student of the same size and of the same total steps, and beside 4 smaller students, with
the class accuracy (share of samples that land in their label's mode).

`--budgets=1,4,16 [--widths=1,2]` adds a quality-vs-training-budget curve: each method's shipped
config trained at those multiples of its train.num_steps (and student hidden widths multiplied by
`--widths`) on `--budget_data` (the ring by default), scored at 1, 2 and 4 steps, so a reader sees
whether a gap is the method or the budget:

  python benchmarks/gmm_table.py --budgets=1,4,16 --widths=1,2

Writes <out>/gmm_table.json, <out>/gmm_table.md and <out>/gmm_table.png:

  python benchmarks/gmm_table.py --out=benchmarks/results --workdir=/tmp/gmm_table

`--mixture_file=F.npz|F.json` scores the same rows on a user's mixture instead (config.data.name=
'mixture', see jaxdistill.data.mixtures.load_file): each method's shipped config for the ring (2-D
/ vector means) or the image mixture (image-shaped means), unconditional, with the network's
input size and model.shape taken from the file; written to <out>/gmm_table_<file stem>.*:

  python benchmarks/gmm_table.py --mixture_file=my_mixture.json --out=/tmp/my_table
"""
from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import time

from absl import app, flags

from jaxdistill.configs import get as load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATASETS = {"mixture2d": "2-D ring (8 modes)", "image_mixture": "image mixture 8x8 (10 modes)"}
METHOD_CONFIGS = {"ctm": "ctm_{data}", "dmd2": "dmd2_{data}"}
STEPS = (1, 2, 4)

def define_flags() -> None:
    """The command line's flags, defined only when run as a script: importing this module (tests
    call its functions) must not clash with other modules' flags of the same names (run.py's
    --workdir, --num_samples)."""
    flags.DEFINE_string("out", "benchmarks/results", "Folder for the JSON, Markdown and PNG.")
    flags.DEFINE_string("workdir", "/tmp/gmm_table", "Folder for the training runs.")
    flags.DEFINE_float("budget", 1.0, "Multiplies every config's train.num_steps.")
    flags.DEFINE_integer("num_samples", 4000, "Samples per row.")
    flags.DEFINE_list("methods", list(METHOD_CONFIGS), "Methods to run.")
    flags.DEFINE_list("sections", ["methods", "msd"], "methods: the per-data-set tables; "
                      "msd: MSD vs one student. Sections not run are kept from an existing "
                      "<out>/gmm_table.json.")
    flags.DEFINE_list("budgets", [], "Quality-vs-budget curve: multiples of each shipped config's "
                      "train.num_steps (e.g. 1,4,16); empty: no curve (an existing one is kept).")
    flags.DEFINE_list("widths", ["1"], "Curve: multiples of the student's network.hidden.")
    flags.DEFINE_list("budget_data", ["mixture2d"], "Curve: data sets (keys of DATASETS).")
    flags.DEFINE_string(
        "mixture_file", "", "A user's mixture (.npz / .json with means, stds, weights, optional "
        "classes): run the methods section on it alone, into <out>/gmm_table_<stem>.*")


def file_config(method: str, mixture_file: str):
    """The shipped config of `method` for the ring (vector means) or the image mixture (image
    means), on the mixture in `mixture_file`, unconditional."""
    from jaxdistill import data

    probe = load_config(METHOD_CONFIGS[method].format(data="mixture2d"))
    probe.data.update(name="mixture", mixture_file=mixture_file)
    shape = data.spec(probe.data).shape  # fails naming the field for a bad file
    cfg = load_config(METHOD_CONFIGS[method].format(
        data="mixture2d" if len(shape) == 1 else "image_mixture"))
    cfg.data.update(name="mixture", mixture_file=mixture_file)
    cfg.model.update(shape=shape, label_dim=0)
    cfg.network.dim = math.prod(shape)
    return cfg


def train_config(cfg, workdir: str, budget: float = 1.0):
    """(config with num_steps scaled by `budget`, trained state, training seconds). A finished
    run in `workdir` is resumed at no cost; its seconds are the ones recorded when it trained."""
    from jaxdistill import train

    cfg = copy.deepcopy(cfg)
    cfg.train.num_steps = max(1, int(cfg.train.num_steps * budget))
    record = os.path.join(workdir, "gmm_table_train.json")
    before = 0.0
    if os.path.exists(record):
        with open(record) as f:
            rec = json.load(f)
        before = rec["seconds"] if rec.get("num_steps") == cfg.train.num_steps else 0.0
    start = time.time()
    state = train.train(cfg, workdir)
    seconds = before + time.time() - start
    with open(record, "w") as f:
        json.dump({"num_steps": cfg.train.num_steps, "seconds": seconds}, f)
    return cfg, state, seconds


def run_name(method: str, data_name: str, budget: float = 1.0, width: float = 1.0) -> str:
    """The training run's folder under --workdir: the methods section's run at budget and width 1
    is also the curve's (`train.train` resumes a finished run at no cost)."""
    if budget == 1 and width == 1:
        return f"{method}_{data_name}"
    return f"{method}_{data_name}_b{budget:g}_w{width:g}"


def scaled_config(cfg, width: float = 1.0):
    """`cfg` with the student's hidden width multiplied by `width`."""
    cfg = copy.deepcopy(cfg)
    cfg.network.hidden = max(1, int(round(cfg.network.hidden * width)))
    return cfg


_BASELINES: dict = {}  # (data config, n, key) -> true-vs-true sliced Wasserstein


def row_metrics(cfg, x, key) -> dict:
    """The configured sample metrics, and for an analytic mixture the blur metrics (same key: the
    same reference samples and projections, so the sliced Wasserstein is the same number; the
    true-vs-true baseline is computed once per data set, sample count and key)."""
    import jax

    from jaxdistill import data
    from jaxdistill.eval import mixture_metrics, sample_metrics

    out = sample_metrics(cfg, x, key)
    mix = data.spec(cfg.data).mixture
    if mix is not None:
        n = x.shape[0]
        memo = (cfg.data.to_json_best_effort(sort_keys=True), n,
                tuple(jax.random.key_data(key).ravel().tolist()))
        if memo not in _BASELINES:
            _BASELINES[memo] = mixture_metrics.sliced_wasserstein_baseline(
                mix, n, *mixture_metrics.baseline_keys(key))
        out.update(mixture_metrics.blur_metrics(mix, x, key, baseline=_BASELINES[memo]))
    return out


def true_row(cfg, key, num_samples: int) -> dict:
    """True samples of the mixture (a key of their own) scored like every other row."""
    import jax

    from jaxdistill import data
    from jaxdistill.data import mixtures

    x, _ = mixtures.sample(data.spec(cfg.data).mixture, jax.random.fold_in(key, 7), num_samples)
    return {"model": "true samples", "steps": 0, "nfe": 0, **row_metrics(cfg, x, key)}


def teacher_rows(cfg, key, num_samples: int, step_counts=STEPS):
    from jaxdistill import teacher as teacher_lib
    from jaxdistill.eval import compare

    teacher = teacher_lib.load(cfg)
    rows = []
    for sampler, steps in ([(s, n) for n in step_counts for s in ("euler", "heun")]
                           + [("heun", 18)]):
        x = compare.teacher_samples(cfg, teacher, key, num_samples, sampler, steps)
        nfe = steps if sampler == "euler" else 2 * steps - 1
        rows.append({"model": f"teacher {sampler}", "steps": steps, "nfe": nfe,
                     **row_metrics(cfg, x, key)})
    return rows


def student_rows(name, cfg, state, key, seconds, num_samples: int, step_counts=STEPS):
    from jaxdistill.eval import compare

    rows = []
    for steps in step_counts:
        x = compare.student_samples(cfg, state, key, num_samples, steps)
        rows.append({"model": name, "steps": steps, "nfe": steps, "train_steps":
                     cfg.train.num_steps, "train_seconds": round(seconds, 1),
                     **row_metrics(cfg, x, key)})
    return rows


def dataset_rows(configs: dict, key, workdir: str, num_samples: int, budget: float = 1.0,
                 step_counts=STEPS):
    """(rows, {method: (config, state)}): the teacher's rows, then each method's student (trained
    in workdir/<method>) at each step count; `configs` maps a method name to its config (the
    first one's teacher gives the teacher rows)."""
    rows = teacher_rows(next(iter(configs.values())), key, num_samples, step_counts)
    trained = {}
    for method, cfg in configs.items():
        cfg, state, seconds = train_config(cfg, os.path.join(workdir, method), budget)
        rows += student_rows(method.upper(), cfg, state, key, seconds, num_samples, step_counts)
        trained[method] = (cfg, state)
    return rows, trained


def budget_rows(data_names, method_names, budgets, widths, key, num_samples: int, workdir: str,
                step_counts=STEPS):
    """The quality-vs-training-budget curve: each method's shipped config on each data set with
    the student's hidden width times each of `widths`, trained for each of `budgets` times its
    train.num_steps (ascending budget first, so an interrupted run leaves whole budgets), scored
    at `step_counts` like the table's students."""
    rows = []
    for budget in sorted(budgets):
        for width in widths:
            for data_name in data_names:
                for method in method_names:
                    base = scaled_config(
                        load_config(METHOD_CONFIGS[method].format(data=data_name)), width)
                    cfg, state, seconds = train_config(
                        base, os.path.join(workdir, run_name(method, data_name, budget, width)),
                        budget)
                    rows += [{"data": data_name, "budget": budget, "width": width,
                              "hidden": cfg.network.hidden, **r}
                             for r in student_rows(method.upper(), cfg, state, key, seconds,
                                                   num_samples, step_counts)]
    return rows


def class_accuracy(cfg, state, key, n):
    """Share of samples that land in a component of their conditioning label's class."""
    import jax
    import numpy as np

    from jaxdistill import data, methods
    from jaxdistill.data import mixtures

    labels = jax.numpy.arange(n) % cfg.model.label_dim
    sample = methods.get(cfg.method.name).sample
    x, _ = jax.jit(lambda s, k: sample(cfg, s, k, n, labels=labels))(state, key)
    mix = data.spec(cfg.data).mixture
    assign = np.argmax(np.asarray(mixtures.component_log_probs(mix, x)), axis=1)
    return float(np.mean(np.asarray(mixtures.class_of(mix, assign)) == np.asarray(labels))), x


def msd_rows(key, budget: float, num_samples: int, workdir: str):
    """MSD (4 students) vs one DMD2 student of the same network at the same total steps, and MSD
    with 4 students of half the width (TSM first), on the class-conditional ring and image
    mixture (one class per mode)."""
    import jax

    rows = []
    for data_name in DATASETS:
        base = load_config(f"msd_{data_name}")
        single = copy.deepcopy(base)          # same network, optimiser, steps and batch
        single.method.name = "dmd2"
        small = copy.deepcopy(base)
        small.network.hidden = base.network.hidden // 2
        runs = [("MSD, 4 students", base), ("DMD2, 1 student (same network)", single),
                (f"MSD, 4 students of width {small.network.hidden}", small)]
        for i, (name, cfg) in enumerate(runs):
            cfg, state, seconds = train_config(cfg, os.path.join(workdir, f"msd_{data_name}_{i}"),
                                               budget)
            acc, x = class_accuracy(cfg, state, key, num_samples)
            params = sum(int(a.size) for a in jax.tree.leaves(state.generator.params))
            rows.append({"data": data_name, "model": name, "steps": 1, "nfe": 1,
                         "train_steps": cfg.train.num_steps, "train_seconds": round(seconds, 1),
                         "generator_params": params, "class_accuracy": acc,
                         **row_metrics(cfg, x, key)})
    return rows


HEAD = ("| log-likelihood | gap (nats) | gap / dim | spread mean / max | outside 99.9% | "
        "weight ratio min-max | sliced W | SW / baseline |")


def _metric_cells(r) -> str:
    """The metric columns of HEAD for one row ("-" where a row predates a metric)."""
    def get(k, fmt=None):
        v = r.get(k)
        return "-" if v is None else (fmt or _fmt)(v)

    spread = (f"{get('spread_ratio_mean', _ratio)} / {get('spread_ratio_max', _ratio)}"
              if "spread_ratio_mean" in r else "-")
    weight = (f"{get('weight_ratio_min', _ratio)}-{get('weight_ratio_max', _ratio)}"
              if "weight_ratio_min" in r else "-")
    return " | ".join([get("log_likelihood"), get("log_likelihood_gap"),
                       get("log_likelihood_gap_per_dim"), spread,
                       get("outside_share", lambda v: f"{v:.4f}"), weight,
                       get("sliced_wasserstein"), get("sliced_wasserstein_ratio", _ratio)])


def markdown(results) -> str:
    out = []
    for data_name, rows in results["datasets"].items():
        out += [f"### {DATASETS.get(data_name, data_name)}", "",
                "| model | steps | NFE " + HEAD + " mode TV | modes |",
                "|---" * 13 + "|"]
        for r in rows:
            out.append(f"| {r['model']} | {r['steps']} | {r['nfe']} | {_metric_cells(r)} | "
                       f"{_fmt(r['mode_tv'])} | {r['modes_covered']} |")
        out.append("")
    if results.get("budget_curve"):
        out += ["### Quality vs training budget (1-step students; 2 and 4 steps in the JSON)", "",
                "Each method's shipped config at multiples of its train.num_steps (budget) and of "
                "its student's hidden width; the 35-NFE teacher's gap is in the table above.", "",
                "| data | model | hidden | budget | train steps | train s " + HEAD + " modes |",
                "|---" * 15 + "|"]
        for r in results["budget_curve"]:
            if r["steps"] == 1:
                out.append(f"| {DATASETS.get(r['data'], r['data'])} | {r['model']} | "
                           f"{r['hidden']} | {r['budget']:g} | {r['train_steps']} | "
                           f"{r['train_seconds']:.0f} | {_metric_cells(r)} | "
                           f"{r['modes_covered']} |")
        out.append("")
    if results.get("msd"):
        out += ["### MSD vs one student (class-conditional, one class per mode, 1 step)", "",
                "| data | model | generator params (all students) | train steps | class accuracy "
                + HEAD + " mode TV |", "|---" * 14 + "|"]
        for r in results["msd"]:
            out.append(f"| {DATASETS[r['data']]} | {r['model']} | {r['generator_params']} | "
                       f"{r['train_steps']} | {r['class_accuracy']:.3f} | {_metric_cells(r)} | "
                       f"{_fmt(r['mode_tv'])} |")
    return "\n".join(out) + "\n"


def _fmt(v):
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.3f}"


def _ratio(v):
    if not math.isfinite(v):
        return "inf" if v > 0 else "nan"
    return f"{v:.3g}" if abs(v) >= 100 else f"{v:.2f}"


def plot(results, path: str) -> None:
    """Per data set: sliced Wasserstein over its true-vs-true baseline (top) and the
    log-likelihood gap to true samples (bottom) against NFE; with a budget curve, a last column
    of 1-step gap and spread ratio against training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = results["datasets"]
    curve = results.get("budget_curve") or []
    cols = len(datasets) + bool(curve)
    fig, axes = plt.subplots(2, cols, figsize=(5.5 * cols, 8), squeeze=False)
    for c, (data_name, rows) in enumerate(datasets.items()):
        for model in dict.fromkeys(r["model"] for r in rows if r["nfe"] > 0):
            mine = [r for r in rows if r["model"] == model]
            style = "--" if model.startswith("teacher") else "-"
            ratio = "sliced_wasserstein_ratio" if "sliced_wasserstein_ratio" in mine[0] else \
                "sliced_wasserstein"
            for ax, key in ((axes[0, c], ratio), (axes[1, c], "log_likelihood_gap")):
                pts = sorted((r["nfe"], r[key]) for r in mine if r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=model)
        axes[0, c].set(xscale="log", yscale="log", xlabel="NFE",
                       ylabel="sliced W / true-vs-true baseline (1 = noise floor)",
                       title=DATASETS.get(data_name, data_name))
        axes[1, c].set(xscale="log", yscale="symlog", xlabel="NFE",
                       ylabel="log-likelihood gap to true samples (nats)")
        for ax in axes[:, c]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    if curve:
        ax_gap, ax_spread = axes[0, -1], axes[1, -1]
        one = [r for r in curve if r["steps"] == 1]
        for name in dict.fromkeys((r["data"], r["model"], r["hidden"]) for r in one):
            mine = sorted((r for r in one if (r["data"], r["model"], r["hidden"]) == name),
                          key=lambda r: r["train_steps"])
            label = f"{name[1]} hidden {name[2]} ({name[0]})"
            steps = [r["train_steps"] for r in mine]
            ax_gap.plot(steps, [r["log_likelihood_gap"] for r in mine], marker="o", label=label)
            ax_spread.plot(steps, [r["spread_ratio_mean"] for r in mine], marker="o", label=label)
        for data_name in dict.fromkeys(r["data"] for r in one):
            heun = [r for r in datasets.get(data_name, []) if r["model"] == "teacher heun"
                    and r["nfe"] == 35 and "log_likelihood_gap" in r]
            if heun:
                ax_gap.axhline(heun[0]["log_likelihood_gap"], ls="--", c="k", lw=1,
                               label=f"teacher 35 NFE ({data_name})")
        ax_spread.axhline(1.0, ls=":", c="k", lw=1, label="true (1)")
        ax_gap.set(xscale="log", yscale="symlog", xlabel="training steps",
                   ylabel="1-step log-likelihood gap (nats)", title="budget curve")
        ax_spread.set(xscale="log", xlabel="training steps",
                      ylabel="1-step spread ratio (mean over components)")
        for ax in (ax_gap, ax_spread):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    F = flags.FLAGS  # noqa: N806 (define_flags)
    import jax

    key = jax.random.key(0)
    budgets = [float(b) for b in F.budgets]
    widths = [float(w) for w in F.widths]
    if F.mixture_file:  # a user's mixture: its own files, the shipped results untouched
        stem = pathlib.Path(F.mixture_file).stem
        configs = {m: file_config(m, F.mixture_file) for m in F.methods}
        rows, _ = dataset_rows(configs, key, os.path.join(F.workdir, stem), F.num_samples,
                               F.budget)
        rows.insert(0, true_row(next(iter(configs.values())), key, F.num_samples))
        results = {"budget": F.budget, "num_samples": F.num_samples,
                   "mixture_file": os.path.abspath(F.mixture_file),
                   "datasets": {f"{stem} ({F.mixture_file})": rows}}
        write(results, F.out, f"gmm_table_{stem}")
        return
    path = os.path.join(F.out, "gmm_table.json")
    results = {"datasets": {}}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    results.update(budget=F.budget, num_samples=F.num_samples)
    if "methods" in F.sections:
        results["datasets"] = {}
        for data_name in DATASETS:
            teacher_cfg = load_config(METHOD_CONFIGS["ctm"].format(data=data_name))
            rows = [true_row(teacher_cfg, key, F.num_samples)]
            rows += teacher_rows(teacher_cfg, key, F.num_samples)
            for method in F.methods:
                cfg, state, seconds = train_config(
                    load_config(METHOD_CONFIGS[method].format(data=data_name)),
                    os.path.join(F.workdir, run_name(method, data_name, F.budget)), F.budget)
                rows += student_rows(method.upper(), cfg, state, key, seconds, F.num_samples)
            results["datasets"][data_name] = rows
    if budgets:
        results["budget_curve"] = budget_rows(F.budget_data, F.methods, budgets, widths, key,
                                              F.num_samples, F.workdir)
        results.update(budgets=budgets, widths=widths)
    if "msd" in F.sections:
        results["msd"] = msd_rows(key, F.budget, F.num_samples, F.workdir)
    write(results, F.out, "gmm_table")


def _finite(obj):
    """NaN / inf (an empty component's ratios) as None: the JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(results) -> str:
    return json.dumps(_finite(results), indent=2, allow_nan=False)


def write(results, out: str, name: str) -> None:
    """<out>/<name>.json, .md and .png; prints the Markdown table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        f.write(dumps(results))
    table = markdown(results)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(out, f"{name}.png"))
    print(table)


if __name__ == "__main__":
    define_flags()
    app.run(main)
