"""The trainer: runs N training steps from wherever the step clock stands, and keeps their metrics."""

from __future__ import annotations

import time

import tensorflow as tf

from data import pipeline
from data.dataset import LggDataset
from data.lgg import DataError
from engine import steps as steps_lib
from engine.schedule import Schedule
from engine.state import TrainState

METRICS = ("loss", "skipped", "seconds") + steps_lib.COUNT_KEYS


class NonFiniteLossError(RuntimeError):
    """The loss went NaN or infinite outside float16's skipped steps."""


def summarize(sums: dict) -> dict[str, float]:
    """Summed step outputs as means: loss, Dice, IoU, skipped steps, steps and seconds."""
    steps = max(sums["steps"], 1)
    return {**steps_lib.summarize_train(sums, steps), "skipped_steps": sums["skipped"],
            "steps": sums["steps"], "seconds": sums["seconds"]}


def check_one_batch(num_slices: int, global_batch: int) -> None:
    """Refuses a training split with fewer slices than one global batch (an epoch of no steps).

    Raises:
      DataError: naming both numbers and the flag to change.
    """
    if pipeline.train_batches_per_epoch(num_slices, global_batch) == 0:
        raise DataError(f"the training split has {num_slices} slices, fewer than one global batch "
                        f"of {global_batch}; lower --batch_size or add patients")


class Trainer:
    """Owns the training data's iterator, the compiled train step and the sums of its outputs.

    The data position is derived from the one clock, `state.step`: epoch and offset are
    `divmod(step, steps_per_epoch)`, and every epoch's order and augmentation are pure
    functions of (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    The learning rate of each call is the schedule's at the call's first step.

    Sums are kept for two windows that the controller closes: the logging window
    (`pop_window`) and the epoch (`pop_epoch`); the epoch's sums are saved with a mid-epoch
    checkpoint (`state`), so that a resumed epoch reports all its steps.
    """

    def __init__(self, *, state: TrainState, steps: steps_lib.Steps, strategy: tf.distribute.Strategy,
                 data: LggDataset, schedule: Schedule, global_batch: int, image_size: int, seed: int,
                 augment: pipeline.Augment | None, positive_fraction: float, checkpoints: str, epochs: int):
        self.train_state, self.steps, self.strategy, self.schedule = state, steps, strategy, schedule
        self.data, self.global_batch, self.image_size = data, global_batch, image_size
        self.seed, self.augment, self.positive_fraction = seed, augment, positive_fraction
        self.checkpoints = checkpoints  # named when the run fails: what it can resume from
        self.epochs = epochs  # the data runs to the end of the last epoch
        self.steps_per_epoch = pipeline.train_batches_per_epoch(len(data.records), global_batch)
        check_one_batch(len(data.records), global_batch)
        self._iterator = None
        self.iterators = 0  # how many times the data was started: once per run, or per resume
        self._next_step: int | None = None  # the step the iterator's next batch belongs to
        self._window = self._epoch = None

    @property
    def step(self) -> int:
        return int(self.train_state.step.numpy())

    @property
    def learning_rate(self) -> float:
        """What the optimizer holds now."""
        return self.train_state.learning_rate

    def train(self, num_steps: int) -> dict[str, float]:
        """Runs `num_steps` steps (never across an epoch end).

        Returns:
          The logging window's metrics so far (see `summarize`).

        Raises:
          NonFiniteLossError: the loss or the weights became NaN or infinite (not a float16
            skipped step); the step's variables are not saved.
        """
        step = self.step
        epoch, offset = divmod(step, self.steps_per_epoch)
        if offset + num_steps > self.steps_per_epoch:
            raise ValueError(f"{num_steps} steps from step {step} would cross the end of epoch {epoch}")
        if self._next_step != step:  # the run's remaining epochs, in one iterator (see train_dataset)
            ds = pipeline.train_dataset(
                self.data.images, self.data.masks, batch_size=self.global_batch,
                image_size=self.image_size, seed=self.seed, epoch=epoch, augment=self.augment,
                positive_fraction=self.positive_fraction, skip_batches=offset,
                epochs=max(1, self.epochs - epoch))
            self._iterator = iter(self.strategy.experimental_distribute_dataset(ds))
            self.iterators += 1
        self.train_state.set_learning_rate(self.schedule(step))
        start = time.perf_counter()
        # The host read-back is where the step's time is paid.
        out = {k: float(v) for k, v in self.steps.train(self._iterator, tf.constant(num_steps, tf.int32)).items()}
        self._next_step = step + num_steps
        if out["nonfinite"]:
            raise NonFiniteLossError(
                f"the training loss or weights became NaN or infinite at step {step + num_steps} "
                f"(epoch {epoch + 1}); the last good checkpoint in {self.checkpoints} is intact. "
                "Lower --learning_rate or check the data")
        sums = {**{k: out[k] for k in METRICS if k in out}, "seconds": time.perf_counter() - start,
                "steps": num_steps}
        self._window = steps_lib.add_sums(self._window, sums)
        self._epoch = steps_lib.add_sums(self._epoch, sums)
        return summarize(self._window)

    def pop_window(self) -> dict[str, float]:
        """The logging window's metrics, and a new window."""
        window, self._window = self._window, None
        return summarize(window)

    def pop_epoch(self) -> dict[str, float]:
        """The epoch's metrics, and a new epoch."""
        epoch, self._epoch = self._epoch, None
        return summarize(epoch)

    def state(self) -> dict:
        return {"epoch_sums": self._epoch}

    def restore(self, state: dict) -> None:
        self._epoch = state["epoch_sums"]
