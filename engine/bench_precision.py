"""The benchmark's precision comparison: the run's precision against the other, calls in turn."""

from __future__ import annotations

import contextlib
import dataclasses

import keras

from engine import roofline
from engine import state as state_lib
from engine.bench_timing import Alternating, calls_for, time_eval_call, time_train_call
from engine.config import Config
from engine.runtime import Runtime


def other_precision(runtime: Runtime) -> str:
    """The precision a run's own is compared with: float32 against this device's mixed one."""
    if runtime.precision != "float32":
        return "float32"
    return "mixed_float16" if runtime.gpus else "mixed_bfloat16"


@contextlib.contextmanager
def _policy(name: str):
    """Keras' global precision policy set to `name` while models are built, then put back."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


@dataclasses.dataclass(frozen=True)
class _Variant:
    """One precision's own model, compiled steps, batches and peak."""

    steps: object  # engine.steps.Steps
    compute_dtype: str
    peak: roofline.Peak
    train_batches: object  # a distributed iterator
    eval_batch: object  # one distributed batch, kept on the device


def _variant(config: Config, runtime: Runtime, precision: str, make_train_ds, eval_ds) -> _Variant:
    # Keras fixes a layer's dtype when it is built: each precision gets a model of its own.
    with _policy(precision):
        rt = dataclasses.replace(runtime, precision=precision)
        state = state_lib.TrainState.build(config, rt)
        compute = state.model.get_layer("enc0_conv1").compute_dtype  # what the layers run in
        return _Variant(
            steps=state.steps(config, rt), compute_dtype=compute, peak=roofline.measure_peak(rt, compute),
            train_batches=iter(runtime.strategy.experimental_distribute_dataset(make_train_ds())),
            eval_batch=next(iter(runtime.strategy.experimental_distribute_dataset(eval_ds))))


def compare_precisions(config: Config, runtime: Runtime, make_train_ds, eval_ds, eval_batch: int, *,
                       forward_flops: int) -> dict:
    """The run's precision against the other one, train and eval calls alternating one by one.

    Each precision gets its own model, its own compiled steps and its own conv probe to measure
    utilisation against; alternating the timed calls makes a change in the machine's load hit
    both alike.

    Returns:
      {precision: {"compute_dtype", train figures, "eval": figures, "peak_source", "traces"},
       "speedup": {"train", "eval", "of"}: float32's median step time over the mixed precision's}.
    """
    per_call = config.steps_per_execution
    variants = {p: _variant(config, runtime, p, make_train_ds, eval_ds)
                for p in (runtime.precision, other_precision(runtime))}
    turns = {}
    for p, v in variants.items():  # bound now: a lambda would see the loop's last variant
        turns[f"{p} train"] = lambda v=v: time_train_call(v.steps, v.train_batches, per_call)
        turns[f"{p} eval"] = lambda v=v: time_eval_call(v.steps, v.eval_batch)
    rounds = Alternating(turns, warmup=calls_for(config.benchmark_warmup, per_call),
                         timed=calls_for(config.benchmark_steps, per_call)).run()
    report, medians = {}, {}
    for p, v in variants.items():
        train = rounds.timing(f"{p} train", steps_per_call=per_call, batch=runtime.global_batch)
        evaluation = rounds.timing(f"{p} eval", steps_per_call=1, batch=eval_batch)
        medians[p] = {"train": train.median, "eval": evaluation.median}
        report[p] = {"compute_dtype": v.compute_dtype, "peak_source": v.peak.source,
                     "traces": dict(v.steps.traces),
                     **train.figures(3 * forward_flops * runtime.global_batch, v.peak),
                     "eval": evaluation.figures(forward_flops * eval_batch, v.peak)}
    mixed = next(p for p in variants if p != "float32")
    report["speedup"] = {phase: medians["float32"][phase] / medians[mixed][phase]
                         for phase in ("train", "eval")}
    report["speedup"]["of"] = f"{mixed} over float32 (median step times)"
    return report
