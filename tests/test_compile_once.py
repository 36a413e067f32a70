"""Compile once: a run traces its train step once and each sampler once, and repeated
`train.evaluate` / `train.generate` / comparison tables with the same config trace nothing.

Traces are counted two ways: the method's `train_step` / `sample` are wrapped with Python counters
(a jitted function's Python body only runs when it is traced), and a `jax.monitoring` listener
counts every jaxpr trace of any jitted function or eager op by name, so a retrace anywhere (the
teacher's samplers, metrics) fails the test. One short run per method (4 steps, evaluations and
sample grids at steps 2 and 4, the final comparison table) is shared by the assertions; the
default suite runs CTM, `-m slow` runs EDM, DMD2 and MSD.
"""
import collections
import copy
import dataclasses
import functools

import jax
import numpy as np
import pytest
from jax import monitoring

from jaxdistill import methods, teacher as teacher_lib, train
from jaxdistill.eval import compare
from test_run import tiny_config

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # jax._src.dispatch.JAXPR_TRACE_EVENT


class Traces:
    """Counts jaxpr traces by function name while active (jit traces and eager-op traces)."""

    def __init__(self):
        self.counts = collections.Counter()

    def __call__(self, event, duration, **kwargs):
        if event == TRACE_EVENT:
            self.counts[kwargs.get("fun_name")] += 1

    def __enter__(self):
        monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_duration_listener(self)


def _config(name):
    cfg = tiny_config(4, name)
    cfg.train.update(log_every=2, eval_every=2, sample_every=2, ckpt_every=4)
    if "tsm_steps" in cfg.method:
        cfg.method.tsm_steps = 2  # DMD2 / MSD: steps 1-2 teacher score matching, then DM
    return cfg


def _counting(calls, key, fn):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)
    return counted


# CTM (teacher, comparison table, teacher samplers) runs in the default suite; each run costs
# 30-60 s of compiles on 2 shared cores (MSD's vmapped students ~2 min), so the others are slow.
@pytest.fixture(scope="module", params=[
    pytest.param("edm_mixture2d", marks=pytest.mark.slow), "ctm_mixture2d",
    pytest.param("dmd2_mixture2d", marks=pytest.mark.slow),
    pytest.param("msd_mixture2d", marks=pytest.mark.slow)])
def run(request, tmp_path_factory):
    """Trains one tiny run per method, counting traces; returns what the tests check."""
    name = request.param
    cfg = _config(name)
    method = methods.get(cfg.method.name)
    calls = collections.Counter()
    compare.clear_cache()  # an earlier test may have compiled the same config's sampler
    with pytest.MonkeyPatch.context() as mp:
        counted = dataclasses.replace(
            method, sample=_counting(calls, "sample", method.sample),
            train_step=lambda config: _counting(calls, "step", method.train_step(config)))
        mp.setitem(methods.METHODS, method.name, counted)
        with Traces() as during:
            state = train.train(cfg, str(tmp_path_factory.mktemp(name)))
        trained = dict(calls)
        teacher = teacher_lib.load(cfg)
        if teacher is not None:  # placed like the trainer's (its samplers' input shardings)
            teacher = train.place_teacher(train.build(cfg, teacher=teacher), teacher)
        calls.clear()
        with Traces() as after:
            for i in range(2):
                train.evaluate(cfg, state, jax.random.key(i))
            for i in range(2):
                train.generate(cfg, state, jax.random.key(10 + i), cfg.train.num_grid_samples)
            # A fresh config with the same content (not the same object) reuses the programs.
            train.generate(_config(name), state, jax.random.key(20), cfg.train.num_grid_samples)
            if teacher is not None:
                for i in range(2):
                    compare.comparison_table(cfg, state, teacher, jax.random.key(30 + i),
                                             cfg.eval.num_samples)
        return dict(name=name, cfg=cfg, state=state, trained=trained, during=during.counts,
                    repeated=dict(calls), after=after.counts)


def test_a_run_traces_its_step_once_and_each_sampler_once(run):
    cfg = run["cfg"]
    # 4 train steps, one program.
    assert run["trained"]["step"] == 1, run["trained"]
    # Evaluations (eval.num_samples in eval.batch_size batches) and sample grids share one
    # program when their batch sizes agree; the comparison table adds the student at 1 and 2
    # steps over eval.num_samples (1 step, the shipped setting, is the evaluation's program).
    batch = min(cfg.eval.num_samples, cfg.eval.batch_size)
    programs = {(cfg.sample.num_steps, batch),
                (cfg.sample.num_steps, min(cfg.train.num_grid_samples, cfg.eval.batch_size))}
    if cfg.teacher.kind != "none":
        programs |= {(s, cfg.eval.num_samples) for s in (1, 2)}
    assert run["trained"]["sample"] == len(programs), (run["trained"], programs)
    # The teacher's own samplers: once per (sampler, steps) of the table, at most 4.
    assert run["during"]["sample_teacher"] <= 4


def test_repeated_evaluations_samples_and_tables_trace_nothing(run):
    assert run["repeated"] == {}, run["repeated"]
    assert sum(run["after"].values()) == 0, dict(run["after"])


def test_editing_the_config_after_a_call_compiles_a_new_sampler(run):
    """The cache keys a config by content: mutating the same object must not reuse a stale
    program (and the program it built before keeps its own snapshot)."""
    cfg, state, key = copy.deepcopy(run["cfg"]), run["state"], jax.random.key(7)
    x1, _ = train.generate(cfg, state, key, 256)
    cfg.sample.num_steps = 3  # same object, new content
    with Traces() as t:
        x3, _ = train.generate(cfg, state, key, 256)
    assert t.counts["sample_student"] == 1, dict(t.counts)
    assert not np.allclose(x1, x3)
    cfg.sample.num_steps = 1
    with Traces() as t:
        x1_again, _ = train.generate(cfg, state, key, 256)
    assert sum(t.counts.values()) == 0, dict(t.counts)
    np.testing.assert_array_equal(x1, x1_again)

