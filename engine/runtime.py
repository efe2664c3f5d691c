"""Device policy, decided once: precision, XLA, distribution strategy, threads and batch sizes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import keras
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What the hardware and the config resolved to. Nothing deeper asks "am I on a GPU?"."""

    strategy: tf.distribute.Strategy
    precision: str
    jit_compile: bool
    replicas: int
    per_replica_batch: int
    global_batch: int
    device: str
    gpus: tuple[str, ...]
    intra_threads: int
    inter_threads: int
    is_chief: bool
    worker_index: int
    num_workers: int
    sync_batch_norm: bool

    def describe(self) -> str:
        return (
            f"device={self.device} precision={self.precision} jit_compile={self.jit_compile} "
            f"strategy={type(self.strategy).__name__} replicas={self.replicas} "
            f"workers={self.num_workers} batch={self.per_replica_batch}/replica "
            f"global_batch={self.global_batch} threads(intra={self.intra_threads or 'all cores'}, "
            f"inter={self.inter_threads or 'auto'})"
        )


def _gpu_names() -> tuple[str, ...]:
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    return tuple(names)


def resolve_precision(requested: str, has_gpu: bool) -> str:
    """'auto' is mixed_float16 on a GPU (tensor cores) and float32 on a CPU."""
    if requested == "auto":
        return "mixed_float16" if has_gpu else "float32"
    return requested


def resolve_jit(requested: str, has_gpu: bool) -> bool:
    """'auto' compiles with XLA on a GPU only: on CPU it measured about 2x slower than oneDNN."""
    if requested == "auto":
        return has_gpu
    return requested == "true"


# Runs beside a worker whose strategy is starting: the start-up waits in C++ for every worker of
# TF_CONFIG, holding the GIL, so neither a thread nor a signal handler of the worker can end it.
_WATCHDOG = """
import os, signal, sys, time
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(seconds)
if os.getppid() == parent:  # still waiting: say why, then end it (137 = 128 + SIGKILL)
    print(message, file=sys.stderr, flush=True)
    os.kill(parent, signal.SIGKILL)
"""


def _multi_worker(timeout: int) -> tf.distribute.MultiWorkerMirroredStrategy:
    """MultiWorkerMirroredStrategy whose collectives fail after `timeout` seconds, in a process
    that ends with a message if the cluster does not come up within `timeout` seconds."""
    workers = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    message = (f"error: the cluster did not come up within --collective_timeout={timeout}s: not "
               f"every worker of TF_CONFIG ({workers}) is running and reachable; start them all with "
               "the same command")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), message],
                                stdin=subprocess.DEVNULL)
    try:
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    finally:
        watchdog.kill()
        watchdog.wait()


def _make_strategy(name: str, gpus: int, cpu_devices: int, timeout: int) -> tf.distribute.Strategy:
    if name == "auto":
        if os.environ.get("TF_CONFIG"):
            name = "multi_worker"
        elif gpus > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "multi_worker":
        return _multi_worker(timeout)
    if name == "mirrored":
        if gpus == 0 and cpu_devices > 1:
            return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_devices)])
        return tf.distribute.MirroredStrategy()
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def resolve(config) -> Runtime:
    """Resolves the device policy of a Config and applies it to TensorFlow and Keras.

    Must run before any other TensorFlow work in the process: thread counts and
    logical devices can only be set before the runtime initialises. Reads the
    config's precision, jit_compile, strategy, batch_size, threads,
    deterministic, seed and cpu_devices (see engine.config for each).

    Returns:
      The resolved Runtime.
    """
    c = config
    precision, jit_compile, strategy, batch_size = c.precision, c.jit_compile, c.strategy, c.batch_size
    threads, deterministic, seed, cpu_devices = c.threads, c.deterministic, c.seed, c.cpu_devices
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    physical_gpus = tf.config.list_physical_devices("GPU")
    for gpu in physical_gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if cpu_devices > 1 and not physical_gpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_devices)])
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)

    has_gpu = bool(physical_gpus)
    resolved_precision = resolve_precision(precision, has_gpu)
    keras.mixed_precision.set_global_policy(resolved_precision)
    dist = _make_strategy(strategy, len(physical_gpus), cpu_devices, c.collective_timeout)

    replicas = dist.num_replicas_in_sync
    num_workers, worker_index, is_chief = 1, 0, True
    if isinstance(dist, tf.distribute.MultiWorkerMirroredStrategy):
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}"))
        jobs = cluster.get("cluster", {})
        num_workers = len(jobs.get("chief", [])) + len(jobs.get("worker", [])) or 1
        task = cluster.get("task", {})
        kind, index = task.get("type", "worker"), int(task.get("index", 0))
        # With a "chief" job the chief is its task; without one, worker 0 is.
        is_chief = kind == "chief" if jobs.get("chief") else index == 0
        worker_index = index + (len(jobs.get("chief", [])) if kind == "worker" else 0)
    return Runtime(
        strategy=dist,
        precision=resolved_precision,
        jit_compile=resolve_jit(jit_compile, has_gpu),
        replicas=replicas,
        per_replica_batch=batch_size,
        global_batch=batch_size * replicas,
        device=("GPU: " + ", ".join(_gpu_names())) if has_gpu else "CPU",
        gpus=_gpu_names(),
        intra_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        is_chief=is_chief,
        worker_index=worker_index,
        num_workers=num_workers,
        sync_batch_norm=replicas > 1,
    )
