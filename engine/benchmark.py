"""--mode=benchmark: times the engine's train and eval steps, and Keras fit, into benchmark.json."""

from __future__ import annotations

import contextlib
import logging
import os
import resource

import keras
import numpy as np
import tensorflow as tf

from data import atomic, volume
from engine import bench_data, bench_fit, bench_precision, bench_table, roofline
from engine import state as state_lib
from engine import steps as steps_lib
from engine.bench_timing import Alternating, Timing, calls_for, time_eval_call, time_train_call
from engine.config import Config
from engine.rundir import CONFIG_FILE, RECORD_FILE, RunDir, RunDirError
from engine.runtime import Runtime
from models import unet

log = logging.getLogger(__name__)

BENCHMARK_FILE = "benchmark.json"
PROFILE = os.path.join("plugins", "profile")  # where TensorBoard's profile tab reads traces
PROFILED_CALLS = 3


def run(config: Config, runtime: Runtime) -> dict:
    """Benchmarks the training and eval steps and writes `benchmark.json` in the run directory.

    The timed steps are the very tf.functions training uses (TrainState.steps), on
    device-resident synthetic batches (--benchmark_data=synthetic) or the real
    input pipeline (pipeline), optionally against Keras fit and the other precision.

    Args:
      config: the run's configuration (model, batch, --benchmark_* flags).
      runtime: the resolved device policy.

    Returns:
      The report written to benchmark.json.

    Raises:
      RunDirError: --model_dir holds a benchmark.json or profile that brainseg did not write,
        or a run whose files it cannot record; nothing is written then.
      DataError: with --benchmark_data=pipeline, a problem in the data.
    """
    eval_batch = config.eval_batch * runtime.replicas
    state_lib.check_memory(config, max(runtime.global_batch, eval_batch))
    run_dir = RunDir(config.run_dir, writer=runtime.is_chief)
    check_target(run_dir, profile=config.benchmark_profile)
    # The data first: a bad --data_dir fails before any time is spent measuring.
    make_train_ds, eval_ds = bench_data.datasets(config, runtime, eval_batch)
    with _claimed(run_dir):
        report = measure(config, runtime, make_train_ds, eval_ds, eval_batch, run_dir)
        run_dir.write_json(BENCHMARK_FILE, report)
    for line in bench_table.table(report, config, runtime, run_dir.file(BENCHMARK_FILE)).splitlines():
        log.info(line)
    return report


def check_target(run_dir: RunDir, *, profile: bool) -> None:
    """Refuses a folder where the benchmark would replace a file that brainseg did not write.

    What the benchmark writes (benchmark.json, profiles under plugins/profile) must be absent or
    in the folder's record of brainseg's files; a run folder without that record (a run from
    before brainseg kept one) is refused too, since what is written there could not be recorded.
    Reads only: a refusal leaves nothing behind.

    Raises:
      RunDirError: the first path that is not brainseg's, named.
    """
    if not run_dir.writer:
        return
    if os.path.lexists(run_dir.path) and not os.path.isdir(run_dir.path):
        raise RunDirError(f"--model_dir={run_dir.path} is a file: benchmark.json needs a folder")
    written = run_dir.written()
    if written is None and os.path.lexists(run_dir.file(CONFIG_FILE)):
        raise RunDirError(f"{run_dir.path} holds a run from before brainseg recorded its files in "
                          f"{RECORD_FILE}, so the benchmark could not record what it writes there: "
                          "use another --model_dir")
    names = [BENCHMARK_FILE]
    if profile:  # the profiler writes into plugins/profile/<its own name>/
        folders = (os.path.dirname(PROFILE), PROFILE)
        names += [n for n in folders if os.path.islink(run_dir.file(n))]  # never written through
        if os.path.isdir(run_dir.file(PROFILE)) and not any(map(os.path.islink, map(run_dir.file, folders))):
            names += [os.path.join(PROFILE, n) for n in sorted(os.listdir(run_dir.file(PROFILE)))]
    for name in names:
        if os.path.lexists(run_dir.file(name)) and name not in (written or []):
            raise RunDirError(f"{run_dir.file(name)} was not written by brainseg (it is not in "
                              f"{RECORD_FILE}) and is left alone: move it away or use another --model_dir")


@contextlib.contextmanager
def _claimed(run_dir: RunDir):
    """The folder made, locked against a training run or another benchmark, with a record."""
    if not run_dir.writer:
        yield
        return
    os.makedirs(run_dir.path, exist_ok=True)
    with run_dir:
        run_dir.lock()
        if run_dir.written() is None:  # a new folder (check_target refused an old run's)
            atomic.atomic_write_json(run_dir.file(RECORD_FILE), {"written": []})
        yield


def measure(config: Config, runtime: Runtime, make_train_ds, eval_ds, eval_batch: int,
            run_dir: RunDir) -> dict:
    """Every timed phase the flags ask for, and the profile; returns benchmark.json's contents."""
    peak = roofline.measure_peak(runtime, keras.mixed_precision.global_policy().compute_dtype)
    log.info(f"Peak: {f'{peak.tflops:.3f} TFLOP/s' if peak.tflops else 'unknown'} ({peak.source})")
    size = unet.unet_size(image_size=config.image_size, base_filters=config.base_filters,
                          depth=config.depth, batch_norm=config.batch_norm,
                          in_channels=volume.channels(config.neighbours))
    state = state_lib.TrainState.build(config, runtime)
    steps = state.steps(config, runtime)
    _reset_device_memory(runtime)
    train, fit, iterator = time_training(config, runtime, state, steps, make_train_ds)
    evaluation = time_evaluation(config, runtime, steps, eval_ds, eval_batch)
    report = {
        **train.figures(3 * size.forward_flops_per_image * runtime.global_batch, peak),
        "eval": evaluation.figures(size.forward_flops_per_image * eval_batch, peak),
        "peak_source": peak.source,
        "forward_flops_per_image": size.forward_flops_per_image,
        "params": size.params,
        **_what_ran(config, runtime, steps),
    }
    if fit is not None:
        report["fit"] = fit.figures(report["flops_per_step"], peak)
        report["fit_images_per_sec"] = fit.images_per_sec
        report["engine_vs_fit"] = train.images_per_sec / fit.images_per_sec
        # The same ratio from median step times: less swayed by a few steps
        # that another process slowed down.
        report["engine_vs_fit_median"] = fit.median / train.median
    if config.benchmark_compare_precision:
        report["precisions"] = bench_precision.compare_precisions(
            config, runtime, make_train_ds, eval_ds, eval_batch, forward_flops=size.forward_flops_per_image)
    if config.benchmark_profile:  # the trace's folder is named by the profiler: recorded as it appears
        report["profile_dir"] = run_dir.recording(PROFILE, "*", lambda: profile(
            steps, iterator, run_dir.path if run_dir.writer else None, per_call=config.steps_per_execution))
    return report


def _what_ran(config: Config, runtime: Runtime, steps: steps_lib.Steps) -> dict:
    """The memory it took, and the device, precision and model it ran."""
    return {
        "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_memory_mb": _peak_device_memory_mb(runtime),
        "data": config.benchmark_data,
        "device": runtime.device,
        "cpu": runtime.cpu.record(),
        "precision": runtime.precision,
        "precision_reason": runtime.precision_reason,
        "jit_compile": runtime.jit_compile,
        "replicas": runtime.replicas,
        "model": {"image_size": config.image_size, "base_filters": config.base_filters,
                  "depth": config.depth, "batch_norm": config.batch_norm, "neighbours": config.neighbours},
        "traces": dict(steps.traces),
    }


def time_training(config: Config, runtime: Runtime, state: state_lib.TrainState, steps: steps_lib.Steps,
                  make_train_ds) -> tuple[Timing, Timing | None, object]:
    """Times the engine's train step and, with --benchmark_compare_fit, Keras fit on the same data.

    With fit, the calls alternate one by one (fit, engine, fit, engine, ...), so that a change
    in the load of a shared machine hits both alike and cancels out of their ratio.

    Returns:
      (engine timing, fit timing or None, the engine's iterator, to profile more steps from).
    """
    per_call = config.steps_per_execution
    iterator = iter(runtime.strategy.experimental_distribute_dataset(make_train_ds()))
    rounds = Alternating({"engine": lambda: time_train_call(steps, iterator, per_call)},
                         warmup=calls_for(config.benchmark_warmup, per_call),
                         timed=calls_for(config.benchmark_steps, per_call))
    fit = None
    if config.benchmark_compare_fit:
        fit = bench_fit.FitBaseline(config, runtime, state.model, make_train_ds()).time_in_turn(rounds)
    else:
        rounds.run()
    return rounds.timing("engine", steps_per_call=per_call, batch=runtime.global_batch), fit, iterator


def time_evaluation(config: Config, runtime: Runtime, steps: steps_lib.Steps,
                    eval_ds: tf.data.Dataset, eval_batch: int) -> Timing:
    """Times the eval step alone, on one batch kept on the device, for --benchmark_steps calls."""
    batch = next(iter(runtime.strategy.experimental_distribute_dataset(eval_ds)))
    rounds = Alternating({"eval": lambda: time_eval_call(steps, batch)},
                         warmup=max(1, config.benchmark_warmup), timed=config.benchmark_steps).run()
    return rounds.timing("eval", steps_per_call=1, batch=eval_batch)


def profile(steps: steps_lib.Steps, iterator, run_path: str | None, *, per_call: int) -> str | None:
    """Captures a profiler trace of a few more train calls (after the timed ones, so it skews nothing).

    Args:
      steps, iterator: the timed steps and their batches.
      run_path: the run directory the trace goes in; None on a worker that writes nothing (it
        still runs the calls, which every worker of a cluster takes part in).
      per_call: steps per call.

    Returns:
      The folder TensorBoard's profile tab reads (run_path/plugins/profile), or None.
    """
    if run_path is not None:
        tf.profiler.experimental.start(run_path)
    try:
        samples = [time_train_call(steps, iterator, per_call) for _ in range(PROFILED_CALLS)]
    finally:
        if run_path is not None:
            tf.profiler.experimental.stop()
    if run_path is None:
        return None
    path = os.path.join(run_path, PROFILE)
    ms = np.mean([wall for wall, _ in samples]) * 1e3
    log.info(f"Profiled {PROFILED_CALLS * per_call} train steps ({ms:.0f} ms/step under the profiler) "
             f"into {path}: tensorboard --logdir {run_path} (profile tab; needs pip install "
             "tensorboard-plugin-profile)")
    return path


def _peak_device_memory_mb(runtime: Runtime) -> float | None:
    """The largest peak allocation over the GPUs since the last reset; None without a GPU."""
    if not runtime.gpus:
        return None
    return max(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"]
               for i in range(len(runtime.gpus))) / 2**20


def _reset_device_memory(runtime: Runtime) -> None:
    for i in range(len(runtime.gpus)):
        tf.config.experimental.reset_memory_stats(f"GPU:{i}")
