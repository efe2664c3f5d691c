"""--mode=benchmark through the real entry point, and the roofline's peak table and conv probe."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from engine import roofline
from models import unet
from tests.helpers import REPO, config_flags, run_engine, session_cache_dir, synthetic_dir, tiny_config

PHASE_KEYS = ("images_per_sec", "step_time_ms_mean", "step_time_ms_median", "step_time_ms_p90",
              "step_time_ms_p99", "timed_steps", "steps_per_call", "global_batch", "compile_seconds",
              "process_cores_used", "flops_per_step", "achieved_tflops", "peak_tflops", "utilization",
              "utilization_cpu_time")


def _run_benchmark(tmp_path, **overrides):
    """`python -m engine.main --mode=benchmark` on the tiny config; returns (report, stdout, config)."""
    config = tiny_config(tmp_path / "run", mode="benchmark", benchmark_warmup=1, **overrides)
    proc = run_engine(config_flags(config), timeout=240, check=True)
    with open(tmp_path / "run" / "benchmark.json") as f:
        return json.load(f), proc.stdout, config


def _written(run_dir) -> list[str]:
    with open(os.path.join(run_dir, "written.json")) as f:
        return json.load(f)["written"]


def _check_phase(phase: dict, *, batch: int, steps: int):
    """One timed phase of benchmark.json as a user reads it: every figure there, in a sane range."""
    assert set(PHASE_KEYS) <= set(phase), set(PHASE_KEYS) - set(phase)
    assert phase["global_batch"] == batch and phase["timed_steps"] == steps
    assert all(math.isfinite(phase[k]) for k in PHASE_KEYS), phase
    assert 0 < phase["step_time_ms_median"] <= phase["step_time_ms_p90"] <= phase["step_time_ms_p99"] < 60e3
    assert 0 < phase["images_per_sec"] < 1e6 and phase["compile_seconds"] >= 0
    assert 0 < phase["achieved_tflops"] < phase["peak_tflops"] * 5 and 0 < phase["utilization"] < 5
    assert 0 < phase["utilization_cpu_time"] < 5
    assert 0 < phase["process_cores_used"] <= 1.25 * os.cpu_count()


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
    for phase in (report, report["eval"], report["fit"]):
        _check_phase(phase, batch=config.batch_size, steps=4)
    # Training counts three forward passes per image (BUILD.md); eval one.
    assert report["flops_per_step"] == 3 * forward * config.batch_size == report["fit"]["flops_per_step"]
    assert report["eval"]["flops_per_step"] == forward * config.batch_size
    # The same compiled functions as training: each traced exactly once.
    assert report["traces"]["train"] == 1 and report["traces"]["eval"] == 1
    for ratio in ("fit_images_per_sec", "engine_vs_fit", "engine_vs_fit_median"):
        assert 0 < report[ratio] < math.inf, ratio
    assert report["peak_source"].startswith("CPU probe")
    assert report["peak_host_memory_mb"] > 0 and report["peak_device_memory_mb"] is None
    # A readable table on stdout, and a trace TensorBoard's profile tab can open.
    assert "engine/fit images/s:" in stdout and "utilisation %" in stdout and "train (fit)" in stdout
    traces = [os.path.join(d, f) for d, _, files in os.walk(report["profile_dir"]) for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    # Both precisions, each in its own model, compiled once, timed as long, probed in its own dtype.
    both = report["precisions"]
    assert {p: both[p]["compute_dtype"] for p in ("float32", "mixed_bfloat16")} == {
        "float32": "float32", "mixed_bfloat16": "bfloat16"}
    for precision, dtype in (("float32", "float32"), ("mixed_bfloat16", "bfloat16")):
        assert both[precision]["traces"] == {"train": 1, "eval": 1}
        assert f", {dtype}, best of" in both[precision]["peak_source"]
        _check_phase(both[precision], batch=config.batch_size, steps=4)
        _check_phase(both[precision]["eval"], batch=config.batch_size, steps=4)
    assert both["speedup"]["train"] > 0 and both["speedup"]["eval"] > 0
    assert "mixed_bfloat16 over float32 (median step times): train" in stdout
    # Every file it wrote is in the folder's record, so --overwrite and the next benchmark know it.
    run_dir = tmp_path / "run"
    profiles = os.listdir(run_dir / "plugins" / "profile")
    assert set(_written(run_dir)) == {"benchmark.json", *(f"plugins/profile/{p}" for p in profiles)}


@pytest.mark.slow
def test_benchmark_pipeline_with_steps_per_execution(tmp_path):
    # 3 steps at 2 per call round up to 2 calls of 2 steps; eval has no steps_per_execution.
    report, stdout, config = _run_benchmark(
        tmp_path, benchmark_data="pipeline", benchmark_steps=3, steps_per_execution=2,
        eval_batch_size=4)
    assert report["data"] == "pipeline" and "Input pipeline over" in stdout
    assert report["steps_per_call"] == 2
    _check_phase(report, batch=config.batch_size, steps=4)
    _check_phase(report["eval"], batch=4, steps=3)
    assert "fit_images_per_sec" not in report and "engine_vs_fit" not in report
    assert "train (fit)" not in stdout and "images/s" in stdout
    assert report["traces"]["train"] == 1
    # Run again into the same folder: its own benchmark.json, recorded, is replaced.
    before = os.stat(tmp_path / "run" / "benchmark.json").st_mtime_ns
    again, _, _ = _run_benchmark(tmp_path, benchmark_steps=1)
    assert again["data"] == "synthetic" and again["timed_steps"] == 1
    assert os.stat(tmp_path / "run" / "benchmark.json").st_mtime_ns != before
    assert _written(tmp_path / "run") == ["benchmark.json"]


@pytest.mark.parametrize("plant", ["benchmark.json", "profile", "profile_link", "old_run"])
def test_benchmark_leaves_a_folder_of_files_it_did_not_write_alone(tmp_path, plant):
    run_dir = tmp_path / "run"
    (run_dir / "plugins").mkdir(parents=True)
    if plant == "benchmark.json":  # the user's own notes under the name the benchmark writes
        (run_dir / "benchmark.json").write_text('{"images_per_sec": 123, "mine": true}')
    elif plant == "profile":  # a trace the user captured with another tool
        (run_dir / "plugins" / "profile" / "2024_01_01").mkdir(parents=True)
    elif plant == "profile_link":  # a link to another folder is never written through
        (tmp_path / "elsewhere").mkdir()
        os.symlink(tmp_path / "elsewhere", run_dir / "plugins" / "profile")
    else:  # a training run from before brainseg recorded its files: nothing could be recorded
        (run_dir / "config.json").write_text('{"config": {}, "versions": {"brainseg": "0.1.0"}}')
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    config = tiny_config(run_dir, mode="benchmark", benchmark_warmup=1, benchmark_steps=1,
                         benchmark_profile=True)
    proc = run_engine(config_flags(config))
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in proc.stderr
    assert str(run_dir) in error and "--model_dir" in error
    # Nothing written, nothing changed: not even the record or the lock.
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


@pytest.mark.slow
def test_benchmark_bad_data_dir_is_a_clean_error(tmp_path):
    config = tiny_config(tmp_path / "run", mode="benchmark", benchmark_data="pipeline",
                         data_dir=str(tmp_path / "nothing_here"), benchmark_steps=1)
    proc = run_engine(config_flags(config), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")  # a refusal creates nothing


def _bench_input(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.bench_input", f"--data_dir={synthetic_dir()}",
                           f"--cache_dir={session_cache_dir()}", "--image_size=32", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.mark.slow
def test_input_pipeline_throughput_with_the_runs_flags():
    proc = _bench_input("--batch_size=4", "--benchmark_steps=3", "--benchmark_warmup=1",
                        "--positive_fraction=0.5", "--brightness=0.1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["batches"] == 3 and result["batch_size"] == 4 and result["slices"] > 4
    assert 0 < result["images_per_s"] < math.inf and result["cpu_seconds_per_batch"] > 0
    assert "brightness=0.1" in result["augment"] and "rotation_deg=0.2" in result["augment"]
    # Fewer slices than one batch: one line naming the folder, exit 2.
    proc = _bench_input("--batch_size=4096", "--benchmark_steps=1")
    assert proc.returncode == 2 and "no full batch of 4096" in proc.stderr, proc.stderr
    assert f"--data_dir={synthetic_dir()}" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    # The command's former name says where it went, rather than doing nothing.
    proc = subprocess.run([sys.executable, "-m", "data.bench", "--patients=24"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "python -m engine.bench_input" in proc.stderr, proc.stderr


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


def test_conv_probe_counts_flops_and_measures_a_rate():
    probe = roofline.conv_probe(batch=2, size=16, channels=8, repeats=2, convs_per_repeat=2)
    assert probe.flops_per_conv == 2 * 2 * 16 * 16 * 8 * 8 * 9
    assert probe.tflops >= probe.median_tflops > 0 and probe.tflops_per_cpu_second > 0
    assert probe.tflops == pytest.approx(probe.flops_per_conv / probe.seconds_per_conv / 1e12)
    assert math.isfinite(probe.tflops)


def _gpu_runtime(gpu: str, precision: str, replicas: int = 1):
    """The Runtime a host with `replicas` of this GPU resolves (the benchmark's GPU branch, without one)."""
    import tensorflow as tf

    from engine.runtime import Runtime

    return Runtime(strategy=tf.distribute.get_strategy(), precision=precision, precision_reason="test",
                   jit_compile=True, replicas=replicas, per_replica_batch=8, global_batch=8 * replicas,
                   device=f"GPU: {replicas}x {gpu}", gpus=(gpu,) * replicas, intra_threads=0,
                   inter_threads=0, is_chief=True, worker_index=0, num_workers=1, sync_batch_norm=True)


@pytest.mark.parametrize("gpu, precision, named", [
    ("NVIDIA H100 80GB HBM3", "mixed_float16", "data sheet: H100 SXM dense mixed_float16 x 2 replica(s)"),
    ("NVIDIA A100-SXM4-40GB", "mixed_bfloat16", "data sheet: A100 dense mixed_bfloat16 x 2 replica(s)"),
    ("NVIDIA A100-SXM4-40GB", "float32", "data sheet: A100 dense float32 (TF32) x 2 replica(s)"),
    ("Tesla V100-SXM2-16GB", "float32", "data sheet: V100 SXM2 dense float32 x 2 replica(s)"),
])
def test_a_gpu_run_reports_the_peak_of_its_device_and_precision(gpu, precision, named):
    # What benchmark.json's peak_tflops and peak_source say on a GPU host: the precision's
    # data-sheet row, for all replicas together.
    from engine import roofline

    one = roofline.measure_peak(_gpu_runtime(gpu, precision), "unused on a GPU")
    two = roofline.measure_peak(_gpu_runtime(gpu, precision, replicas=2), "unused on a GPU")
    assert two.source == named
    assert one.tflops > 0 and two.tflops == pytest.approx(2 * one.tflops)
    assert two.tflops_per_cpu_second is None  # no CPU-time utilisation on a GPU


def test_a_gpu_without_a_peak_reports_no_utilisation_and_says_how_to_add_it(caplog):
    import logging

    from engine import roofline

    caplog.set_level(logging.INFO)
    for gpu, precision in (("Some Future GPU", "mixed_float16"), ("Tesla T4", "mixed_bfloat16")):
        peak = roofline.measure_peak(_gpu_runtime(gpu, precision), "unused on a GPU")
        assert peak.tflops is None and peak.source == f"unknown GPU {gpu}"
        assert gpu in caplog.messages[-1] and "GPU_PEAKS" in caplog.messages[-1]


class _SleepingSteps:
    """Stands in for the compiled steps: each training step takes a known 40 ms of wall time."""

    STEP_SECONDS = 0.04

    def train(self, iterator, num_steps):
        import tensorflow as tf

        time.sleep(self.STEP_SECONDS * int(num_steps))
        return {"loss": tf.constant(1.0)}


def test_benchmark_timing_agrees_with_an_independent_clock():
    from engine import bench_timing

    per_call, calls, batch = 3, 5, 16
    start = time.monotonic()
    samples = [bench_timing.time_train_call(_SleepingSteps(), None, per_call) for _ in range(calls)]
    elapsed = time.monotonic() - start
    wall = [w for w, _ in samples]
    # Each sample is seconds per step: the known sleep, and together what the outer clock saw.
    assert all(0.04 <= w < 0.06 for w in wall), wall
    assert sum(wall) * per_call == pytest.approx(elapsed, rel=0.05)
    # A sleeping step uses no CPU: the CPU-time clock is a clock of its own.
    assert all(cpu < 0.01 for _, cpu in samples), samples
    timing = bench_timing.Timing(tuple(samples), first_call_seconds=wall[0] * per_call,
                                 steps_per_call=per_call, batch=batch)
    assert timing.images_per_sec == pytest.approx(batch / _SleepingSteps.STEP_SECONDS, rel=0.2)


def test_contenders_take_turns_one_call_each_and_warmup_is_not_timed():
    # The fit and the precision comparisons both rest on this: a change in load hits all alike.
    from engine import bench_timing

    order = []

    def turn(name):
        def call():
            order.append(name)
            return float(len(order)), 0.0  # a sample that says which call it was
        return call

    rounds = bench_timing.Alternating({"a": turn("a"), "b": turn("b")}, warmup=2, timed=3).run()
    assert order == ["a", "b"] * 5
    a = rounds.timing("a", steps_per_call=2, batch=4)
    assert [w for w, _ in a.samples] == [5.0, 7.0, 9.0]  # rounds 3 to 5; the first two warm up
    assert a.first_call_seconds == 1.0 * 2  # the compiling call, with its two steps
    # A contender another loop drives (Keras fit) adds its own calls and runs the others' turns.
    driven = bench_timing.Alternating({"b": turn("b")}, warmup=1, timed=1)
    for _ in range(driven.rounds):
        order.append("fit")
        driven.add("fit", (1.0, 0.0))
        driven.round()
    assert order[-4:] == ["fit", "b", "fit", "b"]
    assert len(driven.timing("fit", steps_per_call=1, batch=1).samples) == 1
