"""The trainer: runs N training steps from wherever the step clock stands and returns their sums."""

from __future__ import annotations

import math

import tensorflow as tf

from data import pipeline
from data.dataset import LggDataset
from data.lgg import DataError
from engine.build import TrainState
from engine.steps import Steps


class NonFiniteLossError(RuntimeError):
    """The loss went NaN or infinite outside float16's skipped steps."""


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int = 0,
          min_lr: float = 0.0, cosine: bool = False) -> float:
    """The learning rate of a step: a linear warm-up to base_lr, then base_lr or a cosine decay.

    The plateau policy lowers base_lr; during the warm-up the ramp climbs towards the lowered
    value, so a reduction is never undone by the ramp.
    """
    if step < warmup_steps:  # Warm-up: from base_lr / warmup_steps up to base_lr.
        return base_lr * (step + 1) / warmup_steps
    if not cosine:  # After it: whatever the plateau policy has left.
        return base_lr
    # Cosine: from base_lr after the warm-up down to min_lr at the last step.
    t = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(t, 1.0)))


class Trainer:
    """Owns the training data's iterator and the compiled train step.

    The data position is derived from the one clock, `state.step`: epoch and offset are
    `divmod(step, steps_per_epoch)`, and every epoch's order and augmentation are pure
    functions of (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, *, state: TrainState, steps: Steps, strategy: tf.distribute.Strategy,
                 data: LggDataset, global_batch: int, image_size: int, seed: int,
                 augment: pipeline.Augment | None, positive_fraction: float):
        self.state, self.steps, self.strategy = state, steps, strategy
        self.data, self.global_batch, self.image_size = data, global_batch, image_size
        self.seed, self.augment, self.positive_fraction = seed, augment, positive_fraction
        self.steps_per_epoch = pipeline.train_batches_per_epoch(len(data.records), global_batch)
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {len(data.records)} slices, fewer than one "
                            f"global batch of {global_batch}; lower --batch_size or add patients")
        self._iterator = None
        self._position: int | None = None  # the step the iterator's next batch belongs to

    @property
    def step(self) -> int:
        return int(self.state.step.numpy())

    def train(self, num_steps: int, *, learning_rate: float) -> dict[str, float]:
        """Runs `num_steps` steps (never across an epoch end) and returns their metric sums.

        Raises:
          NonFiniteLossError: the loss became NaN or infinite (not a float16 skipped step).
        """
        step = self.step
        epoch, offset = divmod(step, self.steps_per_epoch)
        if offset + num_steps > self.steps_per_epoch:
            raise ValueError(f"{num_steps} steps from step {step} would cross the end of epoch {epoch}")
        if self._position != step:
            ds = pipeline.train_dataset(
                self.data.images, self.data.masks, batch_size=self.global_batch,
                image_size=self.image_size, seed=self.seed, epoch=epoch, augment=self.augment,
                positive_fraction=self.positive_fraction, skip_batches=offset)
            self._iterator = iter(self.strategy.experimental_distribute_dataset(ds))
        self.state.set_learning_rate(learning_rate)
        # The host read-back is where the step's time is paid.
        sums = {k: float(v) for k, v in self.steps.train(self._iterator, tf.constant(num_steps, tf.int32)).items()}
        self._position = step + num_steps if offset + num_steps < self.steps_per_epoch else None
        if sums["nonfinite"]:
            raise NonFiniteLossError(f"the training loss or weights became NaN or infinite at step "
                                     f"{step + num_steps} (epoch {epoch})")
        return sums

