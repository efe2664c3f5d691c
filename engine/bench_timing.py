"""The benchmark's clocks: timed calls of the compiled steps, taken in turn, and their figures."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import tensorflow as tf

from engine import roofline

Sample = tuple[float, float]  # (wall, process CPU) seconds per step of one timed call


def now() -> tuple[float, float]:
    """The two clocks' reading: (wall, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


def per_step(since: tuple[float, float], steps: int) -> Sample:
    """(wall, process CPU) seconds per step since `since` (a `now()` reading)."""
    wall, cpu = now()
    return (wall - since[0]) / steps, (cpu - since[1]) / steps


def calls_for(steps: int, per_call: int) -> int:
    """Calls of `per_call` steps that cover `steps` steps; at least one."""
    return max(1, -(-steps // per_call))


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-step times of one timed phase, each call ending with a host readback."""

    samples: tuple[Sample, ...]  # one per timed call
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
    def median(self) -> float:
        return float(np.median(self.step_seconds))

    @property
    def compile_seconds(self) -> float:
        # The first call also ran its steps: what it took beyond them is trace and compile.
        return max(0.0, self.first_call_seconds - self.steps_per_call * self.median)

    @property
    def images_per_sec(self) -> float:
        return self.batch / self.mean

    def figures(self, flops_per_step: int, peak: roofline.Peak) -> dict:
        """The reported figures of this phase; images/s is the global batch over the mean step time."""
        ms = self.step_seconds * 1e3
        achieved = flops_per_step / self.mean / 1e12
        cpu_per_step = float(np.mean([cpu for _, cpu in self.samples]))
        return {
            "images_per_sec": self.images_per_sec,
            "step_time_ms_mean": float(ms.mean()),
            "step_time_ms_median": float(np.median(ms)),
            "step_time_ms_p90": float(np.percentile(ms, 90)),
            "step_time_ms_p99": float(np.percentile(ms, 99)),
            "timed_steps": len(self.samples) * self.steps_per_call,
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


def _readback(outputs: dict) -> None:
    # The clock stops only once a result is on the host: dispatch is asynchronous.
    for value in outputs.values():
        value.numpy()
        return


def time_train_call(steps, iterator, per_call: int) -> Sample:
    """One call of the compiled train loop (`steps.train`) over `per_call` steps, to its readback."""
    n = tf.constant(per_call, tf.int32)
    clock = now()
    _readback(steps.train(iterator, n))
    return per_step(clock, per_call)


def time_eval_call(steps, batch) -> Sample:
    """One call of the compiled eval step (`steps.evaluate`) on one batch, to its readback."""
    clock = now()
    _readback(steps.evaluate(batch))
    return per_step(clock, 1)


class Alternating:
    """Timed calls of several contenders taken in turn, one call of each per round.

    A change in the load of a shared machine then hits every contender alike and cancels out of
    their ratios. The first `warmup` rounds are untimed; the first of them traces and compiles.
    A contender whose calls another loop drives (Keras fit's own) adds its samples with `add`
    and runs the others' turns with `round` between its calls.
    """

    def __init__(self, turns: dict[str, Callable[[], Sample]], *, warmup: int, timed: int):
        if warmup < 1 or timed < 1:
            raise ValueError(f"need warmup >= 1 (the compiling call) and timed >= 1 rounds, got "
                             f"{warmup}, {timed}")
        self.turns, self.warmup, self.timed = turns, warmup, timed
        self.samples: dict[str, list[Sample]] = {}

    @property
    def rounds(self) -> int:
        return self.warmup + self.timed

    def add(self, name: str, sample: Sample) -> None:
        self.samples.setdefault(name, []).append(sample)

    def round(self) -> None:
        """One call of each contender this object drives, in turn."""
        for name, turn in self.turns.items():
            self.add(name, turn())

    def run(self) -> "Alternating":
        for _ in range(self.rounds):
            self.round()
        return self

    def timing(self, name: str, *, steps_per_call: int, batch: int) -> Timing:
        """The timed rounds of one contender, with its first (compiling) call."""
        samples = self.samples[name]
        if len(samples) != self.rounds:
            raise RuntimeError(f"{name} made {len(samples)} timed calls, expected {self.rounds}")
        return Timing(tuple(samples[self.warmup:]), samples[0][0] * steps_per_call, steps_per_call,
                      batch)
