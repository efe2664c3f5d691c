"""--mode=benchmark through the real entry point, and the roofline's peak table and conv probe."""

import json
import math
import os
import time

import pytest

from engine import roofline
from models import unet
from tests.helpers import config_flags, run_engine, tiny_config

REQUIRED = ("images_per_sec", "step_time_ms_median", "step_time_ms_p90", "step_time_ms_p99",
            "flops_per_step", "achieved_tflops", "peak_tflops", "utilization", "compile_seconds")


def _run_benchmark(tmp_path, **overrides):
    """`python -m engine.main --mode=benchmark` on the tiny config; returns (report, stdout, config)."""
    config = tiny_config(tmp_path / "run", mode="benchmark", benchmark_warmup=1, **overrides)
    proc = run_engine(config_flags(config), timeout=240, check=True)
    with open(tmp_path / "run" / "benchmark.json") as f:
        return json.load(f), proc.stdout, config


def _check_phase(phase: dict, *, forward_flops: int, multiplier: int, batch: int, steps: int):
    for key in REQUIRED:
        assert phase[key] is not None and phase[key] >= 0, key
    assert phase["global_batch"] == batch
    assert phase["timed_steps"] == steps
    # images/s is the global batch over the mean step time; FLOPs are the model's count.
    mean_seconds = phase["step_time_ms_mean"] / 1e3
    assert phase["images_per_sec"] == pytest.approx(batch / mean_seconds, rel=1e-9)
    assert phase["flops_per_step"] == multiplier * forward_flops * batch
    assert phase["achieved_tflops"] == pytest.approx(
        phase["flops_per_step"] / mean_seconds / 1e12, rel=1e-9)
    assert phase["utilization"] == pytest.approx(
        phase["achieved_tflops"] / phase["peak_tflops"], rel=1e-9)
    assert phase["utilization_cpu_time"] > 0 and phase["process_cores_used"] > 0
    assert phase["step_time_ms_median"] <= phase["step_time_ms_p90"] <= phase["step_time_ms_p99"]


@pytest.mark.slow
def test_benchmark_synthetic_with_fit_and_profile(tmp_path):
    # 2.5D with a standardised volume: the model reads 5 channels, and so must the benchmark's batches.
    report, stdout, config = _run_benchmark(tmp_path, benchmark_steps=4, benchmark_compare_fit=True,
                                            benchmark_profile=True, benchmark_compare_precision=True,
                                            neighbours=1, normalize="volume")
    forward = unet.unet_size(image_size=config.image_size, base_filters=config.base_filters,
                             depth=config.depth, in_channels=5).forward_flops_per_image
    assert report["forward_flops_per_image"] == forward
    assert report["data"] == "synthetic"
    _check_phase(report, forward_flops=forward, multiplier=3, batch=config.batch_size, steps=4)
    _check_phase(report["eval"], forward_flops=forward, multiplier=1, batch=config.batch_size, steps=4)
    _check_phase(report["fit"], forward_flops=forward, multiplier=3, batch=config.batch_size, steps=4)
    # The same compiled functions as training: each traced exactly once.
    assert report["traces"]["train"] == 1 and report["traces"]["eval"] == 1
    assert report["fit_images_per_sec"] == report["fit"]["images_per_sec"] > 0
    assert report["engine_vs_fit"] == pytest.approx(
        report["images_per_sec"] / report["fit_images_per_sec"], rel=1e-9)
    assert report["engine_vs_fit"] > 0
    assert report["engine_vs_fit_median"] == pytest.approx(
        report["fit"]["step_time_ms_median"] / report["step_time_ms_median"], rel=1e-9)
    assert report["peak_source"].startswith("CPU probe")
    assert report["peak_host_memory_mb"] > 0 and report["peak_device_memory_mb"] is None
    # A readable table on stdout, and a trace TensorBoard's profile tab can open.
    assert "engine/fit images/s:" in stdout and "utilisation %" in stdout
    traces = [os.path.join(d, f) for d, _, files in os.walk(report["profile_dir"]) for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    # Both precisions, each in its own model, compiled once, timed as long, probed in its own dtype.
    both = report["precisions"]
    assert {p: both[p]["compute_dtype"] for p in ("float32", "mixed_bfloat16")} == {
        "float32": "float32", "mixed_bfloat16": "bfloat16"}
    for precision, dtype in (("float32", "float32"), ("mixed_bfloat16", "bfloat16")):
        assert both[precision]["traces"] == {"train": 1, "eval": 1}
        assert f", {dtype}, best of" in both[precision]["peak_source"]
        _check_phase(both[precision], forward_flops=forward, multiplier=3, batch=config.batch_size, steps=4)
    assert both["speedup"]["train"] == pytest.approx(
        both["float32"]["step_time_ms_median"] / both["mixed_bfloat16"]["step_time_ms_median"])
    assert "mixed_bfloat16 over float32 (median step times): train" in stdout


@pytest.mark.slow
def test_benchmark_pipeline_with_steps_per_execution(tmp_path):
    # 3 steps at 2 per call round up to 2 calls of 2 steps; eval has no steps_per_execution.
    report, stdout, config = _run_benchmark(
        tmp_path, benchmark_data="pipeline", benchmark_steps=3, steps_per_execution=2,
        eval_batch_size=4)
    forward = report["forward_flops_per_image"]
    assert report["data"] == "pipeline" and "Input pipeline over" in stdout
    assert report["steps_per_call"] == 2
    _check_phase(report, forward_flops=forward, multiplier=3, batch=config.batch_size, steps=4)
    _check_phase(report["eval"], forward_flops=forward, multiplier=1, batch=4, steps=3)
    assert "fit_images_per_sec" not in report and "engine_vs_fit" not in report
    assert report["traces"]["train"] == 1


@pytest.mark.slow
def test_benchmark_bad_data_dir_is_a_clean_error(tmp_path):
    config = tiny_config(tmp_path / "run", mode="benchmark", benchmark_data="pipeline",
                         data_dir=str(tmp_path / "nothing_here"), benchmark_steps=1)
    proc = run_engine(config_flags(config), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "benchmark.json")


@pytest.mark.parametrize("name, row", [
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", "L40"),
    ("Tesla T4", "T4"),
    ("Tesla V100-SXM2-16GB", "V100 SXM2"),
    ("Tesla V100-PCIE-32GB", "V100 PCIe"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA RTX A6000", "RTX A6000"),
])
def test_gpu_peak_lookup_by_device_name(name, row):
    assert roofline.gpu_peak(name).name == row


def test_gpu_peak_by_precision():
    a100 = "NVIDIA A100-SXM4-40GB"
    assert roofline.gpu_peak_tflops(a100, "mixed_float16") == 312.0
    assert roofline.gpu_peak_tflops(a100, "mixed_bfloat16") == 312.0
    assert roofline.gpu_peak_tflops(a100, "float32") == 156.0  # TF32 tensor cores, TF's default
    assert roofline.gpu_peak_tflops(a100, "float32", tf32=False) == 19.5
    assert roofline.gpu_peak_tflops("Tesla V100-SXM2-16GB", "float32") == 15.7  # no TF32 before Ampere
    assert roofline.gpu_peak_tflops("Tesla T4", "mixed_bfloat16") is None  # no bf16 tensor cores
    assert roofline.gpu_peak("Some Future GPU") is None
    assert roofline.gpu_peak_tflops("Some Future GPU", "float32") is None
    for _, peak in roofline.GPU_PEAKS:  # dense half precision is never below TF32 or FP32
        assert peak.fp16 >= (peak.tf32 or 0) and peak.fp16 >= peak.fp32


def test_conv_probe_counts_flops_and_measures_a_rate():
    probe = roofline.conv_probe(batch=2, size=16, channels=8, repeats=2, convs_per_repeat=2)
    assert probe.flops_per_conv == 2 * 2 * 16 * 16 * 8 * 8 * 9
    assert probe.tflops >= probe.median_tflops > 0 and probe.tflops_per_cpu_second > 0
    assert probe.tflops == pytest.approx(probe.flops_per_conv / probe.seconds_per_conv / 1e12)
    assert math.isfinite(probe.tflops)


def test_gpu_peak_scales_with_replicas_and_unknown_gpus_have_none(caplog):
    # The benchmark's GPU branch without a GPU: a Runtime as a GPU host would resolve it.
    import dataclasses
    import logging

    import tensorflow as tf

    from engine import benchmark
    from engine.runtime import Runtime

    gpu = Runtime(strategy=tf.distribute.get_strategy(), precision="mixed_float16", precision_reason="test",
                  jit_compile=True,
                  replicas=2, per_replica_batch=8, global_batch=16, device="GPU: 2x H100",
                  gpus=("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"), intra_threads=0,
                  inter_threads=0, is_chief=True, worker_index=0, num_workers=1, sync_batch_norm=True)
    peak = benchmark.measure_peak(gpu, "float16")
    assert peak.tflops == pytest.approx(2 * 989.4) and "H100 SXM" in peak.source
    assert peak.tflops_per_cpu_second is None
    caplog.set_level(logging.INFO)
    unknown = dataclasses.replace(gpu, gpus=("Some Future GPU",))
    assert benchmark.measure_peak(unknown, "float16").tflops is None
    assert "GPU_PEAKS" in caplog.messages[0]


class _SleepingSteps:
    """Stands in for the compiled steps: each training step takes a known 40 ms of wall time."""

    STEP_SECONDS = 0.04

    def train(self, iterator, num_steps):
        import tensorflow as tf

        time.sleep(self.STEP_SECONDS * int(num_steps))
        return {"loss": tf.constant(1.0)}


def test_benchmark_timing_agrees_with_an_independent_clock():
    from engine import benchmark

    per_call, calls, batch = 3, 5, 16
    start = time.monotonic()
    samples = benchmark.time_train_calls(_SleepingSteps(), None, calls=calls, per_call=per_call)
    elapsed = time.monotonic() - start
    assert len(samples) == calls
    wall = [w for w, _ in samples]
    # Each sample is seconds per step: the known sleep, and together what the outer clock saw.
    assert all(0.04 <= w < 0.06 for w in wall), wall
    assert sum(wall) * per_call == pytest.approx(elapsed, rel=0.05)
    # A sleeping step uses no CPU: the CPU-time clock is a clock of its own.
    assert all(cpu < 0.01 for _, cpu in samples), samples
    timing = benchmark.Timing(tuple(samples), first_call_seconds=wall[0] * per_call,
                              steps_per_call=per_call, batch=batch)
    assert timing.images_per_sec == pytest.approx(batch / _SleepingSteps.STEP_SECONDS, rel=0.2)
