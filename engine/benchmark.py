"""--mode=benchmark: times the engine's train and eval steps, and Keras fit, into benchmark.json."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import time

import keras
import numpy as np
import tensorflow as tf

from data import volume
from engine import inputs, roofline
from engine import state as state_lib
from engine import steps as steps_lib
from engine.config import Config
from engine.rundir import RunDir, RunDirError
from engine.runtime import Runtime
from models import losses, unet

log = logging.getLogger(__name__)

BENCHMARK_FILE = "benchmark.json"
SYNTHETIC_BATCHES = 4  # distinct device-resident batches, cycled


@dataclasses.dataclass(frozen=True)
class Peak:
    """The rate utilisation is measured against."""

    tflops: float | None  # all replicas together; None for an unknown GPU
    source: str  # where the figure comes from
    # CPU probe only: TFLOP per second of process CPU time, so that a CPU
    # step's utilisation can also be had from its CPU time, which other
    # processes on a shared machine do not change (its wall time they do).
    tflops_per_cpu_second: float | None = None


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _per_step(start: tuple[float, float], steps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per step since `start`."""
    wall, cpu = _now()
    return (wall - start[0]) / steps, (cpu - start[1]) / steps


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-step times of one timed phase, each call ending with a host readback."""

    samples: tuple[tuple[float, float], ...]  # (wall, process CPU) seconds per step, one per call
    first_call_seconds: float  # the call that traced and compiled, with its steps
    steps_per_call: int
    batch: int  # global batch of one step

    @property
    def step_seconds(self) -> np.ndarray:
        return np.asarray([wall for wall, _ in self.samples])

    @property
    def mean(self) -> float:
        return float(np.mean(self.step_seconds))

    @property
    def compile_seconds(self) -> float:
        # The first call also ran its steps: what it took beyond them is trace and compile.
        steps_time = self.steps_per_call * float(np.median(self.step_seconds))
        return max(0.0, self.first_call_seconds - steps_time)

    @property
    def images_per_sec(self) -> float:
        return self.batch / self.mean

    def figures(self, flops_per_step: int, peak: Peak) -> dict:
        """The reported figures of this phase; images/s is the global batch over the mean step time."""
        ms = np.asarray(self.step_seconds) * 1e3
        achieved = flops_per_step / self.mean / 1e12
        cpu_per_step = float(np.mean([cpu for _, cpu in self.samples]))
        return {
            "images_per_sec": self.images_per_sec,
            "step_time_ms_mean": float(ms.mean()),
            "step_time_ms_median": float(np.median(ms)),
            "step_time_ms_p90": float(np.percentile(ms, 90)),
            "step_time_ms_p99": float(np.percentile(ms, 99)),
            "timed_steps": len(self.step_seconds) * self.steps_per_call,
            "steps_per_call": self.steps_per_call,
            "global_batch": self.batch,
            "compile_seconds": self.compile_seconds,
            # CPU time of the whole process over wall time: about the core count
            # on an idle machine, less when other processes took cores away.
            "process_cores_used": sum(cpu for _, cpu in self.samples) / sum(w for w, _ in self.samples),
            "flops_per_step": flops_per_step,
            "achieved_tflops": achieved,
            "peak_tflops": peak.tflops,
            "utilization": achieved / peak.tflops if peak.tflops else None,
            "utilization_cpu_time": (flops_per_step / cpu_per_step / 1e12 / peak.tflops_per_cpu_second
                                     if peak.tflops_per_cpu_second else None),
        }


def _calls(steps: int, per_call: int) -> int:
    return max(1, math.ceil(steps / per_call))


def measure_peak(runtime: Runtime, compute_dtype: str) -> Peak:
    """The peak to measure utilisation against: the GPU table, or the CPU conv probe.

    Args:
      runtime: the resolved device policy (GPU names, precision, replicas, workers).
      compute_dtype: the policy's compute dtype, which the CPU probe runs in.

    Returns:
      The Peak: TFLOP/s of all replicas together (None for an unknown GPU) and its source.
    """
    if runtime.gpus:
        tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
        per_gpu = roofline.gpu_peak_tflops(runtime.gpus[0], runtime.precision, tf32=tf32)
        if per_gpu is None:
            log.info(f"No peak known for {runtime.gpus[0]!r} at {runtime.precision}: utilisation is not "
                f"reported (add the device to GPU_PEAKS in engine/roofline.py).")
            return Peak(None, f"unknown GPU {runtime.gpus[0]}")
        row = roofline.gpu_peak(runtime.gpus[0])
        tf32_note = " (TF32)" if tf32 and runtime.precision == "float32" else ""
        return Peak(per_gpu * runtime.replicas,
                    f"data sheet: {row.name} dense {runtime.precision}{tf32_note} "
                    f"x {runtime.replicas} replica(s)")
    probe = roofline.conv_probe(dtype=compute_dtype)
    # Logical CPU devices share one CPU: the probe already used all of it. The
    # CPU-time rate is per process, so it is comparable only with one worker.
    return Peak(probe.tflops * runtime.num_workers,
                f"CPU probe: {probe.description}, best of 5 (median {probe.median_tflops * 1e3:.0f} "
                f"GFLOP/s, {probe.tflops_per_cpu_second * 1e3:.0f} GFLOP per CPU-second) x "
                f"{runtime.num_workers} worker(s)",
                probe.tflops_per_cpu_second if runtime.num_workers == 1 else None)


def _synthetic_arrays(config: Config, batch: int, count: int) -> dict[str, np.ndarray]:
    """`count` batches of noise images, half with a bright disc lesion; float32 like the pipeline's."""
    rng = np.random.default_rng(config.seed)
    n, s = batch * count, config.image_size
    # As many channels as the model reads: pre-contrast, FLAIR, post-contrast and the neighbours'.
    images = rng.uniform(0.0, 0.6, (n, s, s, volume.channels(config.neighbours))).astype(np.float32)
    yy, xx = np.mgrid[:s, :s]
    cy, cx = rng.uniform(0.25 * s, 0.75 * s, (2, n, 1, 1))
    radius = rng.uniform(0.03 * s, 0.15 * s, (n, 1, 1)) * (np.arange(n) % 2 == 0)[:, None, None]
    masks = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2).astype(np.float32)[..., None]
    images[..., 1:2] += 0.4 * masks
    return {"image": images, "mask": masks, "weight": np.ones(n, np.float32)}


def synthetic_dataset(config: Config, batch: int) -> tf.data.Dataset:
    """A few precomputed batches of the pipeline's shapes, cached and repeated: the step alone.

    On a GPU the strategy's distributed iterator prefetches them to the device,
    so the copy overlaps the previous step.

    Args:
      config: image size and seed.
      batch: the global batch size.

    Returns:
      An endless dataset of {"image", "mask", "weight"} batches.
    """
    arrays = _synthetic_arrays(config, batch, SYNTHETIC_BATCHES)
    return tf.data.Dataset.from_tensor_slices(arrays).batch(batch, drop_remainder=True).cache().repeat()


def pipeline_datasets(config: Config, runtime: Runtime, eval_batch: int) -> tuple:
    """The real input pipeline (decode cache, augmentation, sampling) over every slice, repeated.

    Args:
      config: data, augmentation and sampling flags.
      runtime: gives the global batch.
      eval_batch: the global eval batch size.

    Returns:
      (a function that makes the training dataset, so that engine and fit each
      get their own with the same batches; the evaluation dataset).

    Raises:
      DataError: a problem in the data, or fewer slices than one batch.
    """
    from data import pipeline

    data = inputs.model_data(inputs.load_dataset(config), config)  # standardised, with neighbours
    pipeline.steps_per_epoch(len(data.records), runtime.global_batch, what=config.data_dir)
    augment = config.augmentation

    def train_ds() -> tf.data.Dataset:
        # Epoch 0 repeated: the same work per batch as any epoch, and identical for engine and fit.
        return pipeline.train_dataset(
            data.images, data.masks, batch_size=runtime.global_batch, image_size=config.image_size,
            seed=config.seed, epoch=0, augment=augment,
            positive_fraction=config.positive_fraction).repeat()

    eval_ds = pipeline.eval_dataset(data.images, data.masks, batch_size=eval_batch,
                                    image_size=config.image_size)
    log.info(f"Input pipeline over {len(data.records)} slices from {config.data_dir} "
        f"(augmentation {'on' if augment else 'off'})")
    return train_ds, eval_ds


def _readback(outputs: dict) -> None:
    # The clock stops only once a result is on the host: dispatch is asynchronous.
    for value in outputs.values():
        value.numpy()
        return


def time_train_calls(steps: steps_lib.Steps, iterator, *, calls: int, per_call: int) -> list:
    """Times calls of the compiled train loop, each of `per_call` steps and ending in a readback.

    Args:
      steps: the engine's compiled steps.
      iterator: a distributed iterator over training batches.
      calls: how many calls.
      per_call: steps per call (--steps_per_execution).

    Returns:
      (wall, process CPU) seconds per step, one pair per call.
    """
    n = tf.constant(per_call, tf.int32)
    out = []
    for _ in range(calls):
        start = _now()
        _readback(steps.train(iterator, n))
        out.append(_per_step(start, per_call))
    return out


def time_eval_calls(steps: steps_lib.Steps, batch, *, calls: int) -> list:
    """Times calls of the compiled eval step on one distributed batch; (wall, CPU) seconds each."""
    out = []
    for _ in range(calls):
        start = _now()
        _readback(steps.evaluate(batch))
        out.append(_per_step(start, 1))
    return out


class _FitTimer(keras.callbacks.Callback):
    """Times each fit() execution from dispatch to the loss read back on the host.

    `after_each` runs, untimed, after every execution past the first `warmup`.
    """

    def __init__(self, per_call: int, warmup: int, after_each):
        super().__init__()
        self.per_call, self.warmup, self.after_each = per_call, warmup, after_each
        self.samples: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_train_batch_begin(self, batch, logs=None):
        self._start = _now()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # Keras already read the logs back; this makes sure of it.
        self.samples.append(_per_step(self._start, self.per_call))
        if len(self.samples) > self.warmup:
            self.after_each()


class FitBaseline:
    """The identical model trained by Keras compile()/fit(): same optimizer, loss, precision, jit."""

    def __init__(self, config: Config, runtime: Runtime, source: keras.Model,
                 dataset: tf.data.Dataset):
        def loss(masks, logits):
            # The engine's per-example loss; Keras weights it and averages over the batch.
            return losses.per_example_loss(logits, masks, config.loss)

        self.per_call = config.steps_per_execution
        with runtime.strategy.scope():
            self.model = state_lib.build_model(config, runtime)
            self.model.set_weights(source.get_weights())
            # Stock Keras Adam, as a fit() user writes it; compile() wraps it in a
            # LossScaleOptimizer under mixed_float16, as the engine does.
            self.model.compile(
                optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
                loss=loss, jit_compile=runtime.jit_compile,
                steps_per_execution=config.steps_per_execution)
        self.dataset = dataset.map(lambda b: (b["image"], b["mask"], b["weight"]))

    def time_calls(self, warmup: int, calls: int, after_each=lambda: None) -> tuple[float, list]:
        """One fit() over `warmup`, then `calls` timed executions each followed by `after_each`.

        Returns:
          (seconds of the first execution, which traced and compiled, with its
          steps; (wall, CPU) seconds per step of each timed execution).
        """
        timer = _FitTimer(self.per_call, warmup, after_each)
        # No strategy scope here: the model keeps the strategy it was built
        # under, and the engine's steps, called in `after_each`, must see the
        # same context they were traced in, or they would trace again.
        self.model.fit(self.dataset, epochs=1, steps_per_epoch=(warmup + calls) * self.per_call,
                       verbose=0, shuffle=False, callbacks=[timer])
        return timer.samples[0][0] * self.per_call, timer.samples[warmup:]


def _peak_device_memory_mb(runtime: Runtime) -> float | None:
    """The largest peak allocation over the GPUs since the last reset; None without a GPU."""
    if not runtime.gpus:
        return None
    return max(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"]
               for i in range(len(runtime.gpus))) / 2**20


def _reset_device_memory(runtime: Runtime) -> None:
    for i in range(len(runtime.gpus)):
        tf.config.experimental.reset_memory_stats(f"GPU:{i}")


def time_training(config: Config, runtime: Runtime, state: state_lib.TrainState, steps: steps_lib.Steps,
                  make_train_ds) -> tuple[Timing, Timing | None, object]:
    """Times the engine's train step and, with --benchmark_compare_fit, Keras fit on the same data.

    With fit, the timed calls alternate one by one (fit, engine, fit, engine,
    ...), so that a change in the load of a shared machine hits both alike and
    cancels out of their ratio.

    Returns:
      (engine timing, fit timing or None, the engine's iterator, to profile more steps from).
    """
    per_call = config.steps_per_execution
    warmup_calls = _calls(config.benchmark_warmup, per_call)
    timed_calls = _calls(config.benchmark_steps, per_call)
    iterator = iter(runtime.strategy.experimental_distribute_dataset(make_train_ds()))
    first = time_train_calls(steps, iterator, calls=1, per_call=per_call)[0][0] * per_call
    time_train_calls(steps, iterator, calls=warmup_calls - 1, per_call=per_call)
    engine, fit = [], None

    def engine_call():
        engine.extend(time_train_calls(steps, iterator, calls=1, per_call=per_call))

    if config.benchmark_compare_fit:
        baseline = FitBaseline(config, runtime, state.model, make_train_ds())
        fit_first, fit_samples = baseline.time_calls(warmup_calls, timed_calls, after_each=engine_call)
        fit = Timing(tuple(fit_samples), fit_first, per_call, runtime.global_batch)
    else:
        engine = time_train_calls(steps, iterator, calls=timed_calls, per_call=per_call)
    return Timing(tuple(engine), first, per_call, runtime.global_batch), fit, iterator


def time_evaluation(config: Config, runtime: Runtime, steps: steps_lib.Steps,
                    eval_ds: tf.data.Dataset, eval_batch: int) -> Timing:
    """Times the eval step alone, on one batch kept on the device, for --benchmark_steps calls."""
    batch = next(iter(runtime.strategy.experimental_distribute_dataset(eval_ds)))
    first = time_eval_calls(steps, batch, calls=1)[0][0]
    time_eval_calls(steps, batch, calls=config.benchmark_warmup - 1)
    timed = time_eval_calls(steps, batch, calls=config.benchmark_steps)
    return Timing(tuple(timed), first, 1, eval_batch)


def run(config: Config, runtime: Runtime) -> dict:
    """Benchmarks the training and eval steps and writes `benchmark.json` in the run directory.

    The timed steps are the very tf.functions training uses (engine.build), on
    device-resident synthetic batches (--benchmark_data=synthetic) or the real
    input pipeline (pipeline), optionally against Keras fit (see time_training).

    Args:
      config: the run's configuration (model, batch, --benchmark_* flags).
      runtime: the resolved device policy.

    Returns:
      The report written to benchmark.json.

    Raises:
      DataError: with --benchmark_data=pipeline, a problem in the data.
    """
    state_lib.check_memory(config, max(runtime.global_batch, config.eval_batch * runtime.replicas))
    if os.path.exists(config.run_dir) and not os.path.isdir(config.run_dir):
        raise RunDirError(f"--model_dir={config.run_dir} is a file: benchmark.json needs a folder")
    os.makedirs(config.run_dir, exist_ok=True)
    size = unet.unet_size(image_size=config.image_size, base_filters=config.base_filters,
                          depth=config.depth, batch_norm=config.batch_norm,
                          in_channels=volume.channels(config.neighbours))
    eval_batch = config.eval_batch * runtime.replicas
    # The data first: a bad --data_dir fails before any time is spent measuring.
    if config.benchmark_data == "pipeline":
        make_train_ds, eval_ds = pipeline_datasets(config, runtime, eval_batch)
    else:
        make_train_ds = lambda: synthetic_dataset(config, runtime.global_batch)  # noqa: E731
        eval_ds = synthetic_dataset(config, eval_batch)
    peak = measure_peak(runtime, keras.mixed_precision.global_policy().compute_dtype)
    log.info(f"Peak: {f'{peak.tflops:.3f} TFLOP/s' if peak.tflops else 'unknown'} ({peak.source})")

    state = state_lib.TrainState.build(config, runtime)
    steps = state.steps(config, runtime)
    _reset_device_memory(runtime)
    train, fit, iterator = time_training(config, runtime, state, steps, make_train_ds)
    evaluation = time_evaluation(config, runtime, steps, eval_ds, eval_batch)

    report = _report(config, runtime, size, train, evaluation, peak, eval_batch, steps)
    if fit is not None:
        report["fit"] = fit.figures(report["flops_per_step"], peak)
        report["fit_images_per_sec"] = fit.images_per_sec
        report["engine_vs_fit"] = train.images_per_sec / fit.images_per_sec
        # The same ratio from median step times: less swayed by a few steps
        # that another process slowed down.
        report["engine_vs_fit_median"] = float(
            np.median(fit.step_seconds) / np.median(train.step_seconds))
    if config.benchmark_compare_precision:
        report["precisions"] = compare_precisions(config, runtime, make_train_ds, eval_ds, eval_batch,
                                                  forward_flops=size.forward_flops_per_image)
    run = RunDir(config.run_dir, writer=runtime.is_chief)
    if config.benchmark_profile:  # the trace's folder is named by the profiler: recorded as it appears
        report["profile_dir"] = run.recording(os.path.join("plugins", "profile"), "*", lambda: profile(
            steps, iterator, config.run_dir, calls=3, per_call=config.steps_per_execution))
    run.write_json(BENCHMARK_FILE, report)
    for line in table(report, config, runtime).splitlines():
        log.info(line)
    return report


def _report(config: Config, runtime: Runtime, size, train: Timing, evaluation: Timing, peak: Peak,
            eval_batch: int, steps: steps_lib.Steps) -> dict:
    """The figures of the run's own precision, and what was measured."""
    return {
        **train.figures(3 * size.forward_flops_per_image * runtime.global_batch, peak),
        "eval": evaluation.figures(size.forward_flops_per_image * eval_batch, peak),
        "peak_source": peak.source,
        "forward_flops_per_image": size.forward_flops_per_image,
        "params": size.params,
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


def compare_precisions(config: Config, runtime: Runtime, make_train_ds, eval_ds, eval_batch: int, *,
                       forward_flops: int) -> dict:
    """The run's precision against the other one, train and eval calls alternating one by one.

    Each precision gets its own model (Keras fixes a layer's dtype when it is built), its own
    compiled steps and its own conv probe to measure utilisation against; alternating the timed
    calls makes a change in the machine's load hit both alike.

    Returns:
      {precision: {"compute_dtype", train figures, "eval": figures, "peak_source"},
       "speedup": {"train", "eval"}: float32's median step time over the mixed precision's}.
    """
    variants = {}
    for precision in (runtime.precision, other_precision(runtime)):
        with _policy(precision):
            rt = dataclasses.replace(runtime, precision=precision)
            state = state_lib.TrainState.build(config, rt)
            steps = state.steps(config, rt)
            compute = state.model.get_layer("enc0_conv1").compute_dtype  # what the layers run in
            variants[precision] = dict(
                steps=steps, compute=compute, peak=measure_peak(rt, compute),
                train=iter(runtime.strategy.experimental_distribute_dataset(make_train_ds())),
                eval=next(iter(runtime.strategy.experimental_distribute_dataset(eval_ds))))
    per_call = config.steps_per_execution
    timed = {p: {"train": [], "eval": []} for p in variants}
    firsts = {}
    for call in range(_calls(config.benchmark_warmup, per_call) + _calls(config.benchmark_steps, per_call)):
        for p, v in variants.items():  # one call of each, in turn
            train = time_train_calls(v["steps"], v["train"], calls=1, per_call=per_call)
            evaluation = time_eval_calls(v["steps"], v["eval"], calls=1)
            if call == 0:
                firsts[p] = (train[0][0] * per_call, evaluation[0][0])
            if call >= _calls(config.benchmark_warmup, per_call):
                timed[p]["train"] += train
                timed[p]["eval"] += evaluation
    report = {}
    for p, v in variants.items():
        train = Timing(tuple(timed[p]["train"]), firsts[p][0], per_call, runtime.global_batch)
        evaluation = Timing(tuple(timed[p]["eval"]), firsts[p][1], 1, eval_batch)
        report[p] = {"compute_dtype": v["compute"], "peak_source": v["peak"].source,
                     "traces": dict(v["steps"].traces),
                     **train.figures(3 * forward_flops * runtime.global_batch, v["peak"]),
                     "eval": evaluation.figures(forward_flops * eval_batch, v["peak"])}
    mixed = next(p for p in variants if p != "float32")
    report["speedup"] = {
        phase: float(median(report["float32"], phase) / median(report[mixed], phase))
        for phase in ("train", "eval")}
    report["speedup"]["of"] = f"{mixed} over float32 (median step times)"
    return report


def median(figures: dict, phase: str) -> float:
    return (figures if phase == "train" else figures["eval"])["step_time_ms_median"]


def profile(steps: steps_lib.Steps, iterator, run_dir: str, *, calls: int, per_call: int) -> str:
    """Captures a profiler trace of a few more train calls (after the timed ones, so it skews nothing).

    Returns:
      The folder TensorBoard's profile tab reads (run_dir/plugins/profile).
    """
    tf.profiler.experimental.start(run_dir)
    try:
        samples = time_train_calls(steps, iterator, calls=calls, per_call=per_call)
    finally:
        tf.profiler.experimental.stop()
    path = os.path.join(run_dir, "plugins", "profile")
    log.info(f"Profiled {calls * per_call} train steps ({np.mean([w for w, _ in samples]) * 1e3:.0f} "
        f"ms/step under the "
        f"profiler) into {path}: tensorboard --logdir {run_dir} (profile tab; needs "
        f"pip install tensorboard-plugin-profile)")
    return path


def table(report: dict, config: Config, runtime: Runtime) -> str:
    """The report as a readable table: one column per timed phase."""
    columns = [("train (engine)", report)]
    if "fit" in report:
        columns.append(("train (fit)", report["fit"]))
    columns.append(("eval (engine)", report["eval"]))
    for precision, figures in report.get("precisions", {}).items():
        if precision != "speedup":
            short = precision.replace("mixed_", "")
            columns += [(f"train {short}", figures), (f"eval {short}", figures["eval"])]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    rows = [
        ("images/s", "images_per_sec", ".2f", 1),
        ("step ms median", "step_time_ms_median", ".1f", 1),
        ("step ms p90", "step_time_ms_p90", ".1f", 1),
        ("step ms p99", "step_time_ms_p99", ".1f", 1),
        ("trace+compile s", "compile_seconds", ".2f", 1),
        ("GFLOP/step", "flops_per_step", ".1f", 1e-9),
        ("achieved TFLOP/s", "achieved_tflops", ".4f", 1),
        ("peak TFLOP/s", "peak_tflops", ".4f", 1),
        ("utilisation %", "utilization", ".1f", 100),
        ("  by CPU time %", "utilization_cpu_time", ".1f", 100),
        ("cores used", "process_cores_used", ".2f", 1),
    ]
    width = 18
    lines = [
        f"Benchmark: U-Net base {config.base_filters} depth {config.depth} at "
        f"{config.image_size}x{config.image_size}, {report['params']:,} params, "
        f"{report['forward_flops_per_image'] / 1e9:.2f} GFLOP/image forward; "
        f"global batch {runtime.global_batch}, {runtime.precision}, jit_compile={runtime.jit_compile}, "
        f"steps_per_execution={config.steps_per_execution}, {config.benchmark_data} data, "
        f"{runtime.device}",
        "".ljust(width) + "".join(name.rjust(width) for name, _ in columns),
    ]
    for label, key, spec, scale in rows:
        cells = [fmt(None if col.get(key) is None else col[key] * scale, spec)
                 for _, col in columns]
        lines.append(label.ljust(width) + "".join(c.rjust(width) for c in cells))
    if "precisions" in report:
        speedup = report["precisions"]["speedup"]
        lines.append(f"{speedup['of']}: train {speedup['train']:.2f}x, eval {speedup['eval']:.2f}x "
                     "(calls alternating one by one)")
    if "engine_vs_fit" in report:
        lines.append(f"engine/fit images/s: {report['engine_vs_fit']:.3f}x "
                     f"(from median step times: {report['engine_vs_fit_median']:.3f}x)")
    device_mem = report["peak_device_memory_mb"]
    lines.append(f"peak host memory {report['peak_host_memory_mb']:.0f} MB; peak device memory "
                 f"{'n/a (no GPU)' if device_mem is None else f'{device_mem:.0f} MB'}; "
                 f"peak: {report['peak_source']}")
    lines.append(f"written to {os.path.join(config.run_dir, BENCHMARK_FILE)}")
    return "\n".join(lines)
