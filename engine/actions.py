"""The controller's small actions: evaluate, the policies, the history, summaries, overlays, progress, saves."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Callable

import numpy as np
import tensorflow as tf

from data import pipeline
from data.dataset import LggDataset
from engine import steps as steps_lib
from engine.checkpoint import CheckpointManager
from engine.controller import EpochEnd, StopReason, itstime
from engine.inference import Predictor
from engine.policies import EarlyStopping, ReduceLROnPlateau
from engine.schedule import Schedule
from engine.summaries import SummaryWriter, overlay

log = logging.getLogger(__name__)


class Evaluate:
    """Streams the eval step over the validation split: summed counts, then one Dice.

    Every evaluation reads the next pass of one repeating iterator: destroying an iterator
    waits for its tf.data autotuning thread, which can sleep for seconds.
    """

    def __init__(self, *, steps: steps_lib.Steps, strategy: tf.distribute.Strategy,
                 data: LggDataset, batch_size: int, image_size: int):
        self.steps, self.strategy, self.data = steps, strategy, data
        self.batch_size, self.image_size = batch_size, image_size
        self._batches = None

    def __call__(self) -> dict[str, float]:
        """{"val_loss", "val_dice", "val_iou"}; {} when there is no validation split."""
        if not len(self.data.records):
            return {}
        if self._batches is None:
            ds = pipeline.eval_dataset(self.data.images, self.data.masks, batch_size=self.batch_size,
                                       image_size=self.image_size)
            self._batches = iter(self.strategy.experimental_distribute_dataset(ds.repeat()))
        totals = None
        for _ in range(-(-len(self.data.records) // self.batch_size)):  # one pass: every slice once
            totals = steps_lib.add_sums(totals, self.steps.evaluate(next(self._batches)))
        val = steps_lib.summarize_eval({k: float(v) for k, v in totals.items()})
        return {f"val_{k}": v for k, v in val.items()}


class Policies:
    """Reduce-on-plateau and early stopping, fed the monitored metric at each evaluated epoch end.

    The plateau policy lowers the schedule's base rate (unless the schedule is a cosine, when its
    state is kept but never applied); early stopping sets `stopped` (StopReason.EARLY_STOP),
    which ends the run, and `stop_detail`, its sentence for the log.
    """

    def __init__(self, *, monitor: str, plateau: ReduceLROnPlateau, stopper: EarlyStopping,
                 schedule: Schedule, lower_lr: bool = True):
        self.monitor, self.plateau, self.stopper = monitor, plateau, stopper
        self.schedule, self.lower_lr = schedule, lower_lr
        self.stopped: StopReason | None = None
        self.stop_detail = ""

    def __call__(self, end: EpochEnd) -> None:
        if self.monitor not in end.val:
            return
        value = end.val[self.monitor]
        if self.lower_lr:
            new_lr = self.plateau.update(value, self.schedule.base_lr)
            if new_lr != self.schedule.base_lr:
                log.info(f"Plateau in {self.monitor}: learning rate {self.schedule.base_lr:g} -> {new_lr:g}")
                self.schedule.base_lr = new_lr
        else:
            self.plateau.update(value, self.schedule.base_lr)
        if self.stopper.update(value, epoch=end.epoch):
            self.stopped = StopReason.EARLY_STOP
            self.stop_detail = (f"early stopping: no {self.monitor} improvement for "
                                f"{self.stopper.patience} evaluations")

    def state(self) -> dict:
        return {"plateau": self.plateau.state(), "early_stopping": self.stopper.state(),
                "stopped": self.stopped.value if self.stopped else None, "stop_detail": self.stop_detail}

    def restore(self, state: dict) -> None:
        self.plateau.restore(state["plateau"])
        self.stopper.restore(state["early_stopping"])
        if "stop_detail" in state:
            self.stopped = StopReason(state["stopped"]) if state["stopped"] else None
            self.stop_detail = state["stop_detail"]
        else:  # saved before the reason was typed: "stopped" held early stopping's sentence, or None
            self.stopped = StopReason.EARLY_STOP if state["stopped"] else None
            self.stop_detail = state["stopped"] or ""


class EpochReport:
    """One history.jsonl record and one log line per epoch, with the epoch's wall time."""

    def __init__(self, *, append: Callable[[dict], None], epochs: int, images_per_epoch: int,
                 learning_rate: Callable[[], float]):
        self.append, self.epochs, self.images_per_epoch = append, epochs, images_per_epoch
        self.learning_rate = learning_rate
        self._since = time.perf_counter()

    def __call__(self, end: EpochEnd) -> None:
        seconds, self._since = time.perf_counter() - self._since, time.perf_counter()
        train = end.train
        lr = self.learning_rate()
        self.append({"epoch": end.epoch, "step": end.step, "learning_rate": lr,
                     "wall_time": time.time(), "epoch_seconds": seconds,
                     "skipped_steps": train["skipped_steps"],
                     **{k: train[k] for k in ("loss", "dice", "iou")}, **end.val})
        log.info(f"epoch {end.epoch}/{self.epochs} step {end.step}: loss {train['loss']:.4f} "
                 f"dice {train['dice']:.4f}" + "".join(f" {k} {v:.4f}" for k, v in end.val.items())
                 + f" lr {lr:.3g} ({seconds:.1f}s, {self.images_per_epoch / max(seconds, 1e-9):.1f} img/s)")


class TrainScalars:
    """train/ scalars for each logging window (of the steps' own time, evaluation excluded)."""

    def __init__(self, *, writer: SummaryWriter, global_batch: int, learning_rate: Callable[[], float],
                 loss_scale: Callable[[], float]):
        self.writer, self.global_batch = writer, global_batch
        self.learning_rate, self.loss_scale = learning_rate, loss_scale

    def __call__(self, step: int, window: dict) -> None:
        seconds = max(window["seconds"], 1e-9)
        self.writer.scalars(step, {"train": {
            **{k: window[k] for k in ("loss", "dice", "iou", "skipped_steps")},
            "learning_rate": self.learning_rate(), "loss_scale": self.loss_scale(),
            "steps_per_sec": window["steps"] / seconds,
            "images_per_sec": window["steps"] * self.global_batch / seconds}})
        if window["skipped_steps"]:
            log.info(f"step {step}: {int(window['skipped_steps'])} step(s) skipped by float16 loss "
                     f"scaling (scale now {self.loss_scale():g})")


class ValScalars:
    """val/ scalars at each evaluated epoch end; the writer is flushed at every epoch end."""

    def __init__(self, writer: SummaryWriter):
        self.writer = writer

    def __call__(self, end: EpochEnd) -> None:
        if end.val:
            self.writer.scalars(end.step, {"val": {k[len("val_"):]: v for k, v in end.val.items()}})
        self.writer.flush()


def overlay_indices(positive: np.ndarray, count: int) -> np.ndarray:
    """A fixed, spread-out choice of validation slices: half with lesions, half empty."""
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    n_pos = min(len(pos), (count + 1) // 2)
    n_neg = min(len(neg), count - n_pos)
    pick = lambda idx, n: idx[np.linspace(0, len(idx) - 1, n).astype(int)] if n else idx[:0]  # noqa: E731
    return np.concatenate([pick(pos, n_pos), pick(neg, n_neg)])


class Overlays:
    """The same validation slices drawn at the model's size every `every` epochs (and the last)."""

    def __init__(self, *, model, data: LggDataset, count: int, image_size: int, writer: SummaryWriter,
                 every: int, epochs: int):
        picked = overlay_indices(data.positive, count)
        self.writer, self.every, self.epochs = writer, every, epochs
        self.predictor = Predictor(model, image_size=image_size)
        # At the model's size, through the one inference path, as evaluation sees them.
        small = pipeline.preprocess(data.images[picked], image_size).numpy() if len(picked) else None
        self.images = None if small is None else np.round(small * 255.0).astype(np.uint8)
        self.masks = (None if small is None else
                      pipeline.resize_masks(data.masks[picked], image_size).numpy()[..., 0])

    @property
    def traces(self) -> int:
        """Python traces of the overlays' compiled predictor (one per run)."""
        return self.predictor.traces

    def __call__(self, end: EpochEnd) -> None:
        if self.images is None or not itstime(end.epoch, self.every, self.epochs):
            return
        probs = self.predictor(self.images, batch_size=len(self.images))
        self.writer.images(end.step, "val/overlay",
                           overlay(self.images.astype(np.float32) / 255.0, self.masks, probs))


class Progress:
    """A one-line progress bar on a terminal, silent elsewhere (logs get the epoch line)."""

    def __init__(self, enabled: bool, *, steps_per_epoch: int, global_batch: int):
        self.enabled = enabled and sys.stderr.isatty()
        self.steps_per_epoch, self.global_batch = steps_per_epoch, global_batch

    def __call__(self, step: int, window: dict) -> None:
        if not self.enabled:
            return
        epoch, done = divmod(step, self.steps_per_epoch)
        epoch, done = (epoch, self.steps_per_epoch) if done == 0 else (epoch + 1, done)
        bar = "#" * int(30 * done / self.steps_per_epoch)
        ips = window["steps"] * self.global_batch / max(window["seconds"], 1e-9)
        sys.stderr.write(f"\repoch {epoch} [{bar:<30}] {done}/{self.steps_per_epoch} loss "
                         f"{window['loss']:.4f} dice {window['dice']:.4f} {ips:.1f} img/s ")
        sys.stderr.flush()

    def end(self, end: EpochEnd | None = None) -> None:
        if self.enabled:
            sys.stderr.write("\n")


@dataclasses.dataclass
class Checkpointer:
    """Saves the variables and the JSON state of every stateful piece, under their names."""

    manager: CheckpointManager
    checkpoint: tf.train.Checkpoint
    steps_per_epoch: int
    stateful: dict  # {"policies": Policies, "schedule": Schedule, "trainer": Trainer}
    precision: str

    def __call__(self, step: int, metrics: dict) -> None:
        state = {name: piece.state() for name, piece in self.stateful.items()}
        self.manager.save(self.checkpoint, step=step, epoch=step // self.steps_per_epoch,
                          metrics=metrics, state={**state, "precision": self.precision})

    def restore(self, state: dict) -> None:
        for name, piece in self.stateful.items():
            piece.restore(state[name])
