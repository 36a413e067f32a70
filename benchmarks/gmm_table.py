"""The analytic-teacher benchmark: every distillation method on the 2-D ring and the 8x8 image
mixture, whose exact teacher and exact metrics need no data or weights.

For each data set: the teacher's own Euler and Heun samplers at 1, 2 and 4 steps and Heun at 18
steps (35 NFE); each method's student trained with its shipped config (a fixed small CPU budget;
`--budget` scales every run's step count) and sampled at 1, 2 and 4 steps. Metrics: mean
log-likelihood under the true mixture, sliced Wasserstein to fresh true samples, mode TV and
modes covered. Then MSD (4 students, class-conditional ring, one class per mode) beside one
DMD2 student of the same size and of the same total steps, and beside 4 smaller students, with
the class accuracy (share of samples that land in their label's mode).

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
import importlib.util
import json
import math
import os
import pathlib
import time

from absl import app, flags

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
    flags.DEFINE_string(
        "mixture_file", "", "A user's mixture (.npz / .json with means, stds, weights, optional "
        "classes): run the methods section on it alone, into <out>/gmm_table_<stem>.*")


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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
    from jaxdistill import train

    cfg = copy.deepcopy(cfg)
    cfg.train.num_steps = max(1, int(cfg.train.num_steps * budget))
    start = time.time()
    state = train.train(cfg, workdir)
    return cfg, state, time.time() - start


def teacher_rows(cfg, key, num_samples: int, step_counts=STEPS):
    from jaxdistill import teacher as teacher_lib
    from jaxdistill.eval import compare, sample_metrics

    teacher = teacher_lib.load(cfg)
    rows = []
    for sampler, steps in ([(s, n) for n in step_counts for s in ("euler", "heun")]
                           + [("heun", 18)]):
        x = compare.teacher_samples(cfg, teacher, key, num_samples, sampler, steps)
        nfe = steps if sampler == "euler" else 2 * steps - 1
        rows.append({"model": f"teacher {sampler}", "steps": steps, "nfe": nfe,
                     **sample_metrics(cfg, x, key)})
    return rows


def student_rows(name, cfg, state, key, seconds, num_samples: int, step_counts=STEPS):
    from jaxdistill.eval import compare, sample_metrics

    rows = []
    for steps in step_counts:
        x = compare.student_samples(cfg, state, key, num_samples, steps)
        rows.append({"model": name, "steps": steps, "nfe": steps, "train_steps":
                     cfg.train.num_steps, "train_seconds": round(seconds, 1),
                     **sample_metrics(cfg, x, key)})
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

    from jaxdistill.eval import sample_metrics

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
                         **sample_metrics(cfg, x, key)})
    return rows


def markdown(results) -> str:
    cols = ("log_likelihood", "sliced_wasserstein", "mode_tv", "modes_covered")
    out = []
    for data_name, rows in results["datasets"].items():
        out += [f"### {DATASETS.get(data_name, data_name)}", "",
                "| model | steps | NFE | log-likelihood | sliced W | mode TV | modes |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['model']} | {r['steps']} | {r['nfe']} | "
                       + " | ".join(_fmt(r[c]) for c in cols) + " |")
        out.append("")
    if results.get("msd"):
        out += ["### MSD vs one student (class-conditional, one class per mode, 1 step)", "",
                "| data | model | generator params (all students) | train steps | class accuracy | "
                "log-likelihood | sliced W | mode TV |", "|---|---|---|---|---|---|---|---|"]
        for r in results["msd"]:
            out.append(f"| {DATASETS[r['data']]} | {r['model']} | {r['generator_params']} | "
                       f"{r['train_steps']} | "
                       f"{r['class_accuracy']:.3f} | {_fmt(r['log_likelihood'])} | "
                       f"{_fmt(r['sliced_wasserstein'])} | {_fmt(r['mode_tv'])} |")
    return "\n".join(out) + "\n"


def _fmt(v):
    if isinstance(v, int):
        return str(v)
    return f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.3f}"


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["datasets"]), figsize=(5.5 * len(results["datasets"]),
                                                                   4))
    for ax, (data_name, rows) in zip(list(getattr(axes, "flat", [axes])),
                                     results["datasets"].items()):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r["nfe"], r["sliced_wasserstein"]) for r in rows if r["model"] == model)
            style = "--" if model.startswith("teacher") else "-"
            ax.plot(*zip(*pts), style, marker="o", label=model)
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="sliced Wasserstein (lower is better)",
               title=DATASETS.get(data_name, data_name))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    F = flags.FLAGS  # noqa: N806 (define_flags)
    import jax

    key = jax.random.key(0)
    if F.mixture_file:  # a user's mixture: its own files, the shipped results untouched
        stem = pathlib.Path(F.mixture_file).stem
        configs = {m: file_config(m, F.mixture_file) for m in F.methods}
        rows, _ = dataset_rows(configs, key, os.path.join(F.workdir, stem), F.num_samples,
                               F.budget)
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
            rows = teacher_rows(teacher_cfg, key, F.num_samples)
            for method in F.methods:
                cfg, state, seconds = train_config(
                    load_config(METHOD_CONFIGS[method].format(data=data_name)),
                    os.path.join(F.workdir, f"{method}_{data_name}"), F.budget)
                rows += student_rows(method.upper(), cfg, state, key, seconds, F.num_samples)
            results["datasets"][data_name] = rows
    if "msd" in F.sections:
        results["msd"] = msd_rows(key, F.budget, F.num_samples, F.workdir)
    write(results, F.out, "gmm_table")


def write(results, out: str, name: str) -> None:
    """<out>/<name>.json, .md and .png; prints the Markdown table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(out, f"{name}.png"))
    print(table)


if __name__ == "__main__":
    define_flags()
    app.run(main)
