"""The benchmark's report as the table it prints: one column per timed phase."""

from __future__ import annotations

from engine.config import Config
from engine.runtime import Runtime

WIDTH = 18
# (label, benchmark.json key, format, scale)
ROWS = (
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
)


def _columns(report: dict) -> list[tuple[str, dict]]:
    """(heading, figures) of every timed phase in the report."""
    columns = [("train (engine)", report)]
    if "fit" in report:
        columns.append(("train (fit)", report["fit"]))
    columns.append(("eval (engine)", report["eval"]))
    for precision, figures in report.get("precisions", {}).items():
        if precision != "speedup":
            short = precision.replace("mixed_", "")
            columns += [(f"train {short}", figures), (f"eval {short}", figures["eval"])]
    return columns


def _cell(figures: dict, key: str, spec: str, scale: float) -> str:
    value = figures.get(key)
    return "n/a" if value is None else format(value * scale, spec)


def _ratios(report: dict) -> list[str]:
    """The comparisons' lines: precision speed-up, engine over fit."""
    lines = []
    if "precisions" in report:
        speedup = report["precisions"]["speedup"]
        lines.append(f"{speedup['of']}: train {speedup['train']:.2f}x, eval {speedup['eval']:.2f}x "
                     "(calls alternating one by one)")
    if "engine_vs_fit" in report:
        lines.append(f"engine/fit images/s: {report['engine_vs_fit']:.3f}x "
                     f"(from median step times: {report['engine_vs_fit_median']:.3f}x)")
    return lines


def table(report: dict, config: Config, runtime: Runtime, written_to: str) -> str:
    """The report as a readable table: what was run, one column per timed phase, the ratios.

    Args:
      report: the contents of benchmark.json.
      config: the model and benchmark flags, named in the heading.
      runtime: the device policy, named in the heading.
      written_to: the path of benchmark.json.
    """
    columns = _columns(report)
    lines = [
        f"Benchmark: U-Net base {config.base_filters} depth {config.depth} at "
        f"{config.image_size}x{config.image_size}, {report['params']:,} params, "
        f"{report['forward_flops_per_image'] / 1e9:.2f} GFLOP/image forward; "
        f"global batch {runtime.global_batch}, {runtime.precision}, jit_compile={runtime.jit_compile}, "
        f"steps_per_execution={config.steps_per_execution}, {config.benchmark_data} data, "
        f"{runtime.device}",
        "".ljust(WIDTH) + "".join(name.rjust(WIDTH) for name, _ in columns),
    ]
    for label, key, spec, scale in ROWS:
        lines.append(label.ljust(WIDTH) + "".join(_cell(col, key, spec, scale).rjust(WIDTH)
                                                 for _, col in columns))
    lines += _ratios(report)
    device_mem = report["peak_device_memory_mb"]
    lines.append(f"peak host memory {report['peak_host_memory_mb']:.0f} MB; peak device memory "
                 f"{'n/a (no GPU)' if device_mem is None else f'{device_mem:.0f} MB'}; "
                 f"peak: {report['peak_source']}")
    lines.append(f"written to {written_to}")
    return "\n".join(lines)
