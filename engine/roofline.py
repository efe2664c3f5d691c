"""Peak FLOP rates to measure utilisation against: a table of GPUs by name, or a CPU conv probe."""

from __future__ import annotations

import dataclasses
import logging
import re
import time

import tensorflow as tf

from engine.runtime import Runtime

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GpuPeak:
    """Dense (no sparsity) peaks of one GPU model, in TFLOP/s, from NVIDIA's data sheets.

    Attributes:
      name: the model the row describes, e.g. "A100 SXM/PCIe".
      fp16: float16 tensor-core peak with float32 accumulation (what TF's
        mixed_float16 convolutions use).
      bf16: bfloat16 tensor-core peak, None where there are no bf16 tensor cores.
      tf32: TF32 tensor-core peak (float32 with TF32 on, TF's default on Ampere
        and later), None before Ampere.
      fp32: plain float32 (CUDA cores) peak.
    """

    name: str
    fp16: float
    bf16: float | None
    tf32: float | None
    fp32: float


# Ordered: the first pattern that matches the device name wins, so the more
# specific names (H100 PCIe, GH200, L40S, A100) come before the ones they contain.
GPU_PEAKS: tuple[tuple[str, GpuPeak], ...] = (
    (r"GH200", GpuPeak("GH200", fp16=989.4, bf16=989.4, tf32=494.7, fp32=66.9)),
    (r"H200", GpuPeak("H200", fp16=989.4, bf16=989.4, tf32=494.7, fp32=66.9)),
    (r"H100.*PCIE", GpuPeak("H100 PCIe", fp16=756.5, bf16=756.5, tf32=378.0, fp32=51.2)),
    (r"H100.*NVL", GpuPeak("H100 NVL", fp16=835.5, bf16=835.5, tf32=417.5, fp32=60.0)),
    (r"H100", GpuPeak("H100 SXM", fp16=989.4, bf16=989.4, tf32=494.7, fp32=66.9)),
    (r"B200", GpuPeak("B200", fp16=2250.0, bf16=2250.0, tf32=1100.0, fp32=80.0)),
    (r"A100", GpuPeak("A100", fp16=312.0, bf16=312.0, tf32=156.0, fp32=19.5)),
    (r"A40\b", GpuPeak("A40", fp16=149.7, bf16=149.7, tf32=74.8, fp32=37.4)),
    (r"A30\b", GpuPeak("A30", fp16=165.0, bf16=165.0, tf32=82.0, fp32=10.3)),
    (r"A10\b", GpuPeak("A10", fp16=125.0, bf16=125.0, tf32=62.5, fp32=31.2)),
    (r"L40S", GpuPeak("L40S", fp16=362.1, bf16=362.1, tf32=183.0, fp32=91.6)),
    (r"L40\b", GpuPeak("L40", fp16=181.0, bf16=181.0, tf32=90.5, fp32=90.5)),
    (r"L4\b", GpuPeak("L4", fp16=121.0, bf16=121.0, tf32=60.0, fp32=30.3)),
    (r"RTX A6000", GpuPeak("RTX A6000", fp16=154.8, bf16=154.8, tf32=77.4, fp32=38.7)),
    # GeForce cards run fp16 with float32 accumulation at half the fp16-accumulate rate.
    (r"RTX 4090", GpuPeak("RTX 4090", fp16=165.2, bf16=165.2, tf32=82.6, fp32=82.6)),
    (r"RTX 3090", GpuPeak("RTX 3090", fp16=71.0, bf16=71.0, tf32=35.6, fp32=35.6)),
    (r"V100S", GpuPeak("V100S PCIe", fp16=130.0, bf16=None, tf32=None, fp32=16.4)),
    (r"V100.*PCIE", GpuPeak("V100 PCIe", fp16=112.0, bf16=None, tf32=None, fp32=14.0)),
    (r"V100", GpuPeak("V100 SXM2", fp16=125.0, bf16=None, tf32=None, fp32=15.7)),
    (r"\bT4\b", GpuPeak("T4", fp16=65.0, bf16=None, tf32=None, fp32=8.1)),
)


def gpu_peak(device_name: str) -> GpuPeak | None:
    """The table row for a device name such as "NVIDIA A100-SXM4-80GB"; None if unknown."""
    for pattern, peak in GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


def gpu_peak_tflops(device_name: str, precision: str, *, tf32: bool = True) -> float | None:
    """The peak that a run at `precision` can reach on the named GPU.

    Args:
      device_name: TensorFlow's device name, e.g. "NVIDIA H100 80GB HBM3".
      precision: float32, mixed_float16 or mixed_bfloat16 (the resolved policy).
      tf32: whether TF32 execution is on (tf.config.experimental.
        tensor_float_32_execution_enabled(); on by default).

    Returns:
      TFLOP/s, or None for an unknown device or a precision it has no tensor cores for.
    """
    peak = gpu_peak(device_name)
    if peak is None:
        return None
    if precision == "mixed_float16":
        return peak.fp16
    if precision == "mixed_bfloat16":
        return peak.bf16
    return peak.tf32 if (tf32 and peak.tf32) else peak.fp32


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What the CPU convolution probe measured."""

    tflops: float  # the best rate over the repetitions
    median_tflops: float
    # FLOPs per second of process CPU time (all threads): the rate one fully
    # busy core delivers, which other processes on the machine do not change.
    tflops_per_cpu_second: float
    flops_per_conv: int
    seconds_per_conv: float  # at the best rate
    description: str


def conv_probe(*, dtype: str = "float32", batch: int = 8, size: int = 128, channels: int = 64,
               repeats: int = 5, convs_per_repeat: int = 3, device: str = "/cpu:0") -> ProbeResult:
    """Measures the 3x3-convolution FLOP rate this machine actually reaches.

    A U-Net step is mostly 3x3 convolutions, so their rate (oneDNN on a CPU) is
    the fair ceiling to measure utilisation against, rather than a data-sheet
    figure for a virtual CPU whose clock and vector units are unknown.

    Args:
      dtype: compute dtype, e.g. float32 or bfloat16 (the policy's compute dtype).
      batch, size, channels: a [batch, size, size, channels] input, channels -> channels.
      repeats: timed repetitions; the best one is the peak (the least disturbed
        by other processes on a shared machine).
      convs_per_repeat: chained convolutions per timed repetition.
      device: where to run it.

    Returns:
      ProbeResult with the best and median rates in TFLOP/s, and the best rate
      per second of CPU time.
    """
    flops = 2 * batch * size * size * channels * channels * 9
    with tf.device(device):
        x = tf.random.stateless_uniform([batch, size, size, channels], seed=[1, 2], dtype=dtype)
        w = tf.random.stateless_normal([3, 3, channels, channels], seed=[3, 4], dtype=dtype) * 0.05

        @tf.function
        def convs(x, w):
            # A chain, so that no two convolutions are the same expression
            # (grappler would compute identical ones once), ending in a scalar
            # so that the readback is not a big copy.
            for _ in range(convs_per_repeat):
                x = tf.nn.conv2d(x, w, strides=1, padding="SAME")
            return tf.reduce_sum(x[:, :1, :1, :1])

        convs(x, w).numpy()  # trace and warm up oneDNN's kernel selection
        times, cpu_times = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            convs(x, w).numpy()
            times.append((time.perf_counter() - start) / convs_per_repeat)
            cpu_times.append((time.process_time() - cpu_start) / convs_per_repeat)
    times.sort()
    best, median = times[0], times[len(times) // 2]
    return ProbeResult(
        tflops=flops / best / 1e12, median_tflops=flops / median / 1e12,
        tflops_per_cpu_second=flops / max(min(cpu_times), 1e-9) / 1e12, flops_per_conv=flops,
        seconds_per_conv=best,
        description=f"3x3 conv {channels}->{channels}, {size}x{size}, batch {batch}, {dtype}")


@dataclasses.dataclass(frozen=True)
class Peak:
    """The rate utilisation is measured against."""

    tflops: float | None  # all replicas together; None for an unknown GPU
    source: str  # where the figure comes from
    # CPU probe only: TFLOP per second of process CPU time, so that a CPU
    # step's utilisation can also be had from its CPU time, which other
    # processes on a shared machine do not change (its wall time they do).
    tflops_per_cpu_second: float | None = None


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
        per_gpu = gpu_peak_tflops(runtime.gpus[0], runtime.precision, tf32=tf32)
        if per_gpu is None:
            log.info(f"No peak known for {runtime.gpus[0]!r} at {runtime.precision}: utilisation is not "
                f"reported (add the device to GPU_PEAKS in engine/roofline.py).")
            return Peak(None, f"unknown GPU {runtime.gpus[0]}")
        row = gpu_peak(runtime.gpus[0])
        # Named only where the device has TF32 (Ampere and later): before, float32 is plain FP32.
        tf32_note = " (TF32)" if tf32 and row.tf32 and runtime.precision == "float32" else ""
        return Peak(per_gpu * runtime.replicas,
                    f"data sheet: {row.name} dense {runtime.precision}{tf32_note} "
                    f"x {runtime.replicas} replica(s)")
    probe = conv_probe(dtype=compute_dtype)
    # Logical CPU devices share one CPU: the probe already used all of it. The
    # CPU-time rate is per process, so it is comparable only with one worker.
    return Peak(probe.tflops * runtime.num_workers,
                f"CPU probe: {probe.description}, best of 5 (median {probe.median_tflops * 1e3:.0f} "
                f"GFLOP/s, {probe.tflops_per_cpu_second * 1e3:.0f} GFLOP per CPU-second) x "
                f"{runtime.num_workers} worker(s)",
                probe.tflops_per_cpu_second if runtime.num_workers == 1 else None)
