"""Device policy, decided once: precision, XLA, distribution strategy, threads and batch sizes."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import tensorflow as tf

from engine import malloc
from engine.cluster import ClusterUnavailable


# How long a worker may go silent before the coordination service fails the cluster.
HEARTBEAT_SECONDS = 10


@dataclasses.dataclass(frozen=True)
class Cpu:
    """What /proc/cpuinfo says of the CPU (its first processor): enough to choose a precision by."""

    vendor: str = ""
    family: int = 0
    model: int = 0
    name: str = ""
    flags: frozenset[str] = frozenset()

    def record(self) -> dict:
        """How config.json and benchmark.json name the CPU."""
        decisive = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
        return {"model name": self.name, "vendor": self.vendor, "cpu family": self.family,
                "model": self.model, "flags": sorted(self.flags & decisive)}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What the hardware and the config resolved to. Nothing deeper asks "am I on a GPU?"."""

    strategy: tf.distribute.Strategy
    precision: str
    precision_reason: str
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
    cpu: Cpu = Cpu()  # what the precision was chosen by, and what benchmark.json names

    def record(self) -> dict:
        """What config.json records of the device policy."""
        return {"device": self.device, "cpu": self.cpu.record(), "precision": self.precision,
                "precision_reason": self.precision_reason, "jit_compile": self.jit_compile,
                "replicas": self.replicas, "workers": self.num_workers, "global_batch": self.global_batch}

    def describe(self) -> str:
        return (
            f"device={self.device} precision={self.precision} ({self.precision_reason}) "
            f"jit_compile={self.jit_compile} "
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


def cpu_info(path: str = "/proc/cpuinfo") -> Cpu:
    """The CPU as Linux reports it; an empty Cpu where there is no such file."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough: all cores are alike here
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return Cpu()

    def number(key: str) -> int:
        return int(fields[key]) if fields.get(key, "").isdigit() else 0

    return Cpu(vendor=fields.get("vendor_id", ""), family=number("cpu family"), model=number("model"),
               name=fields.get("model name", ""), flags=frozenset(fields.get("flags", "").split()))


# AMD's Zen 5 (family 26) runs AVX512_BF16 on full-width 512-bit units.
ZEN5_FAMILY = 26


def resolve_precision(requested: str, *, has_gpu: bool, cpu: Cpu, mode: str = "train") -> tuple[str, str]:
    """The precision a run computes in, and why.

    'auto' is mixed_float16 on a GPU (tensor cores). On a CPU it is mixed_bfloat16 where bfloat16
    measured faster than float32 (BUILD.md "Device policy" has the table by CPU): with AMX
    (amx_tile and amx_bf16), whose tile units run the convolutions, and on AMD Zen 5 or later
    with AVX512_BF16. Everywhere else float32: AVX512_BF16 on an Intel CPU without AMX measured
    1.5x slower, and Zen 4 was not measured. An export is float32 unless asked: it is served
    elsewhere.

    Returns:
      (precision, reason).
    """
    if requested != "auto":
        return requested, f"--precision={requested}"
    if mode == "export":
        return "float32", "an export runs wherever it is served: float32 unless --precision says otherwise"
    if has_gpu:
        return "mixed_float16", "a GPU: float16 on its tensor cores"
    if {"amx_tile", "amx_bf16"} <= cpu.flags:
        return "mixed_bfloat16", "the CPU has AMX (amx_tile, amx_bf16): bfloat16 convolutions run on its tile units"
    if "avx512_bf16" in cpu.flags and cpu.vendor == "AuthenticAMD" and cpu.family >= ZEN5_FAMILY:
        return "mixed_bfloat16", (f"an AMD Zen 5 or later (family {cpu.family}) with AVX512_BF16: bfloat16 "
                                  "measured faster than float32 there")
    if "avx512_bf16" in cpu.flags:
        return "float32", ("the CPU has AVX512_BF16 but no AMX and is not a Zen 5: bfloat16 measured slower "
                           "than float32 on such an Intel CPU, and was not measured on Zen 4")
    return "float32", "the CPU has no bfloat16 matrix units (no AMX, no AVX512_BF16)"


def resolve_jit(requested: str, has_gpu: bool) -> bool:
    """'auto' compiles with XLA on a GPU only: on CPU it measured about 2x slower than oneDNN."""
    if requested == "auto":
        return has_gpu
    return requested == "true"


def _multi_worker(timeout: int) -> tf.distribute.MultiWorkerMirroredStrategy:
    """MultiWorkerMirroredStrategy whose failures TensorFlow's coordination service detects.

    The service's heartbeats notice a worker that died or hangs within HEARTBEAT_SECONDS, and
    abort every collective of the others; a cluster whose workers do not all register within
    `timeout` seconds fails its start-up. The collectives themselves carry no timeout: each one
    launched with `CommunicationOptions(timeout_seconds=T)` holds a thread for T seconds, so a
    worker running hundreds of collectives a second ran out of threads within a minute.

    Raises:
      ClusterUnavailable: not every worker of TF_CONFIG registered within `timeout` seconds.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    spec = resolver.cluster_spec()
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker") if job in spec.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
        coordinated_jobs=jobs, cluster_register_timeout_in_ms=timeout * 1000,
        heartbeat_timeout_in_ms=HEARTBEAT_SECONDS * 1000)
    # Every task, the service's leader included, waits for the others at one barrier with that
    # timeout; without it the leader would wait for a missing worker forever.
    context.context().coordination_service.cluster_register_with_barrier = True
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError) as e:
        raise ClusterUnavailable(
            f"the cluster did not come up within --collective_timeout={timeout}s: not every "
            f"worker of TF_CONFIG ({spec.as_dict()}) is running and reachable; start them all "
            f"with the same command ({type(e).__name__})") from None


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


class TfConfigError(ValueError):
    """TF_CONFIG is set but is not the cluster description TensorFlow reads."""


def check_tf_config(text: str | None) -> None:
    """Refuses a TF_CONFIG that TensorFlow would fail on deep inside the strategy.

    Raises:
      TfConfigError: not JSON, or no {"cluster": {...}, "task": {"type", "index"}} object.
    """
    if not text:
        return
    try:
        value = json.loads(text)
    except ValueError as e:
        raise TfConfigError(f"TF_CONFIG is not valid JSON ({e}): expected "
                            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
                            '"index": 0}}') from None
    task = value.get("task") if isinstance(value, dict) else None
    if not (isinstance(value, dict) and isinstance(value.get("cluster"), dict) and isinstance(task, dict)
            and task.get("type") in value["cluster"] and isinstance(task.get("index"), int)
            and 0 <= task["index"] < len(value["cluster"][task["type"]])):
        raise TfConfigError(f"TF_CONFIG={text!r} does not describe a cluster and this worker's place "
                            "in it: expected {\"cluster\": {\"worker\": [...]}, \"task\": {\"type\": "
                            "\"worker\", \"index\": <its position in the list>}}")


def _task(strategy: tf.distribute.Strategy) -> tuple[int, int, bool]:
    """(workers, this worker's index, whether it is the chief) of a multi-worker strategy's TF_CONFIG."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1, 0, True
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}"))
    jobs = cluster.get("cluster", {})
    num_workers = len(jobs.get("chief", [])) + len(jobs.get("worker", [])) or 1
    task = cluster.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    # With a "chief" job the chief is its task; without one, worker 0 is.
    is_chief = kind == "chief" if jobs.get("chief") else index == 0
    return num_workers, index + (len(jobs.get("chief", [])) if kind == "worker" else 0), is_chief


def resolve(config) -> Runtime:
    """Resolves the device policy of a Config and applies it to TensorFlow and Keras.

    Must run before any other TensorFlow work in the process: thread counts and
    logical devices can only be set before the runtime initialises. Reads the
    config's precision, jit_compile, strategy, batch_size, threads, tune_malloc,
    deterministic, seed and cpu_devices (see engine.config for each).

    Returns:
      The resolved Runtime.
    """
    c = config
    precision, jit_compile, strategy, batch_size = c.precision, c.jit_compile, c.strategy, c.batch_size
    check_tf_config(os.environ.get("TF_CONFIG"))
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
    cpu = cpu_info()
    resolved_precision, precision_reason = resolve_precision(precision, has_gpu=has_gpu, cpu=cpu,
                                                             mode=c.mode)
    keras.mixed_precision.set_global_policy(resolved_precision)
    dist = _make_strategy(strategy, len(physical_gpus), cpu_devices, c.collective_timeout)
    malloc.apply(c.tune_malloc)  # after the strategy: collectives are configured at start-up

    replicas = dist.num_replicas_in_sync
    num_workers, worker_index, is_chief = _task(dist)
    return Runtime(
        strategy=dist,
        precision=resolved_precision,
        precision_reason=precision_reason,
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
        cpu=cpu,
    )
