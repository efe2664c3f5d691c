"""The controller: one step clock, and at each tick what is due: evaluate, policies, save, report."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Callable

from engine import steps as steps_lib
from engine.actions import Evaluate, Overlays, Policies, Progress
from engine.summaries import SummaryWriter
from engine.trainer import Trainer, lr_at

log = logging.getLogger(__name__)


def itstime(step: int, every: int, total: int | None = None) -> bool:
    """The one answer to "is it time to log / save / evaluate" at this step or epoch."""
    return (every > 0 and step % every == 0) or (total is not None and step == total)


def steps_to_next(step: int, everies: tuple[int, ...], most: int) -> int:
    """Steps from `step` to the next step at which `itstime` holds for one of `everies` (<= most)."""
    return min([most] + [every - step % every for every in everies if every > 0])


@dataclasses.dataclass
class LoopState:
    """What the loop carries between steps besides the variables; saved in every checkpoint."""

    base_lr: float
    epoch_sums: dict | None = None  # train sums of the current epoch so far (mid-epoch saves)
    stopped: str | None = None  # why training ended early, once it has

    def state(self) -> dict:
        return {"base_lr": self.base_lr, "epoch_totals": self.epoch_sums, "stopped": self.stopped}

    def restore(self, state: dict) -> None:
        self.base_lr, self.epoch_sums, self.stopped = (
            state["base_lr"], state["epoch_totals"], state["stopped"])


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the controller checks between steps.

    The current step finishes, a checkpoint is written, and the run exits;
    a second signal falls back to the default (immediate) behaviour.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


@dataclasses.dataclass
class Controller:
    """Runs the trainer to the last step, and runs each action when the clock says it is due."""

    trainer: Trainer
    loop: LoopState
    epochs: int
    warmup_steps: int
    cosine: bool
    min_lr: float
    steps_per_execution: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    overlay_every: int
    evaluate: Evaluate
    policies: Policies
    save: Callable[[int, int, dict], None]  # (step, epoch, metrics)
    record: Callable[[dict], None]  # one history.jsonl line per epoch
    writer: SummaryWriter
    overlays: Overlays
    progress: Progress
    learning_rate: Callable[[], float]  # what the optimizer holds now
    loss_scale: Callable[[], float]
    agree_stop: Callable[[bool], bool] = lambda stop: stop  # True on all workers if on any

    def run(self, stop: StopRequest) -> str | None:
        """Trains until the last step, early stopping or a signal; returns the signal's name, if any."""
        per_epoch = self.trainer.steps_per_epoch
        total = per_epoch * self.epochs
        step = saved = self.trainer.step
        window, started, stopping = {}, time.perf_counter(), False
        self._epoch_started = started
        while step < total and self.loop.stopped is None and not stopping:
            n = steps_to_next(step, (per_epoch, self.log_every, self.checkpoint_every),
                              self.steps_per_execution)
            lr = lr_at(step, base_lr=self.loop.base_lr, warmup_steps=self.warmup_steps,
                       total_steps=total, min_lr=self.min_lr, cosine=self.cosine)
            sums = self.trainer.train(n, learning_rate=lr)
            step += n
            # A signal to any worker stops them all at this same step.
            stopping = self.agree_stop(stop.signal_name is not None)
            window = steps_lib.add_sums(window or None, {**sums, "steps": n})
            self.loop.epoch_sums = steps_lib.add_sums(self.loop.epoch_sums, sums)
            epoch, offset = divmod(step, per_epoch)
            self._show_progress(window, offset or per_epoch, epoch + (offset > 0), started)
            if itstime(step, self.log_every):
                self._train_scalars(step, window, time.perf_counter() - started)
                window, started = {}, time.perf_counter()
            if offset == 0:  # An epoch ended: evaluate, policies, record and save, report.
                self._end_epoch(step, epoch)
                saved = step
            elif stopping or itstime(step, self.checkpoint_every):
                self.save(step, epoch, {})
                saved = step
        if not stopping:
            return None
        if saved != step:
            self.save(step, step // per_epoch, {})
        self.progress.end()
        name = stop.signal_name or "SIGTERM"  # SIGTERM: another worker was preempted
        where = (f"{step % per_epoch}/{per_epoch} steps into epoch {step // per_epoch + 1}"
                 if step % per_epoch else f"end of epoch {step // per_epoch}")
        log.info(f"{stop.signal_name or 'A signal to another worker'} received: saved a "
                 f"checkpoint at step {step} ({where}); exiting. Run the same command to resume.")
        return name

    def _show_progress(self, window: dict, done: int, epoch: int, started: float) -> None:
        live = steps_lib.summarize_train(window, window["steps"])
        seconds = max(time.perf_counter() - started, 1e-9)
        self.progress.update(epoch, done, self.trainer.steps_per_epoch, live["loss"], live["dice"],
                             window["steps"] * self.trainer.global_batch / seconds)

    def _end_epoch(self, step: int, epoch: int) -> None:
        self.progress.end()
        per_epoch, seconds = self.trainer.steps_per_epoch, time.perf_counter() - self._epoch_started
        sums, self.loop.epoch_sums = self.loop.epoch_sums, None
        train = steps_lib.summarize_train(sums, per_epoch)
        metrics = self.evaluate() if itstime(epoch, self.eval_every, self.epochs) else {}
        if metrics:
            self.loop.base_lr, self.loop.stopped = self.policies(
                metrics, epoch=epoch, base_lr=self.loop.base_lr)
        self.record({"epoch": epoch, "step": step, "learning_rate": self.learning_rate(),
                     "wall_time": time.time(), "epoch_seconds": seconds,
                     "skipped_steps": sums["skipped"], **train, **metrics})
        self.save(step, epoch, metrics)
        if metrics:
            self.writer.scalars(step, {"val": {k[len("val_"):]: v for k, v in metrics.items()}})
        if itstime(epoch, self.overlay_every, self.epochs):
            self.overlays(step)
        self.writer.flush()
        log.info(f"epoch {epoch}/{self.epochs} step {step}: loss {train['loss']:.4f} "
                 f"dice {train['dice']:.4f}" + "".join(f" {k} {v:.4f}" for k, v in metrics.items())
                 + f" lr {self.learning_rate():.3g} ({seconds:.1f}s, "
                 f"{per_epoch * self.trainer.global_batch / max(seconds, 1e-9):.1f} img/s)")
        self._epoch_started = time.perf_counter()

    def _train_scalars(self, step: int, window: dict, seconds: float) -> None:
        steps = window["steps"]
        self.writer.scalars(step, {"train": {
            **steps_lib.summarize_train(window, steps), "learning_rate": self.learning_rate(),
            "loss_scale": self.loss_scale(), "skipped_steps": window["skipped"],
            "steps_per_sec": steps / max(seconds, 1e-9),
            "images_per_sec": steps * self.trainer.global_batch / max(seconds, 1e-9)}})
        if window["skipped"]:
            log.info(f"step {step}: {int(window['skipped'])} step(s) skipped by float16 loss "
                     f"scaling (scale now {self.loss_scale():g})")
