"""The controller's small actions: evaluate, apply the policies, draw overlays, show progress."""

from __future__ import annotations

import logging
import sys

import numpy as np
import tensorflow as tf

from data import pipeline
from data.dataset import LggDataset
from engine import steps as steps_lib
from engine.inference import Predictor
from engine.policies import EarlyStopping, ReduceLROnPlateau
from engine.summaries import SummaryWriter, overlay

log = logging.getLogger(__name__)


class Evaluate:
    """Streams the eval step over the validation split: summed counts, then one Dice."""

    def __init__(self, *, steps: steps_lib.Steps, strategy: tf.distribute.Strategy,
                 data: LggDataset, batch_size: int, image_size: int):
        self.steps, self.strategy, self.data = steps, strategy, data
        self.batch_size, self.image_size = batch_size, image_size

    def __call__(self) -> dict[str, float]:
        """{"val_loss", "val_dice", "val_iou"}; {} when there is no validation split."""
        if not len(self.data.records):
            return {}
        ds = pipeline.eval_dataset(self.data.images, self.data.masks, batch_size=self.batch_size,
                                   image_size=self.image_size)
        totals = None
        for batch in self.strategy.experimental_distribute_dataset(ds):
            totals = steps_lib.add_sums(totals, self.steps.evaluate(batch))
        val = steps_lib.summarize_eval({k: float(v) for k, v in totals.items()})
        return {f"val_{k}": v for k, v in val.items()}


class Policies:
    """Reduce-on-plateau and early stopping, fed the monitored metric after each evaluation."""

    def __init__(self, *, monitor: str, plateau: ReduceLROnPlateau, stopper: EarlyStopping,
                 lower_lr: bool = True):
        """lower_lr=False keeps the plateau policy's state but never applies it (a cosine schedule)."""
        self.monitor, self.plateau, self.stopper, self.lower_lr = monitor, plateau, stopper, lower_lr

    def __call__(self, metrics: dict[str, float], *, epoch: int, base_lr: float) -> tuple[float, str | None]:
        """Returns the base learning rate for what follows, and why to stop (None: go on)."""
        value = metrics[self.monitor]
        new_lr = self.plateau.update(value, base_lr) if self.lower_lr else base_lr
        if new_lr != base_lr:
            log.info(f"Plateau in {self.monitor}: learning rate {base_lr:g} -> {new_lr:g}")
        stop = None
        if self.stopper.update(value, epoch=epoch):
            stop = (f"early stopping: no {self.monitor} improvement for "
                    f"{self.stopper.patience} evaluations")
        return new_lr, stop

    def state(self) -> dict:
        return {"plateau": self.plateau.state(), "early_stopping": self.stopper.state()}

    def restore(self, state: dict) -> None:
        self.plateau.restore(state["plateau"])
        self.stopper.restore(state["early_stopping"])


def overlay_indices(positive: np.ndarray, count: int) -> np.ndarray:
    """A fixed, spread-out choice of validation slices: half with lesions, half empty."""
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    n_pos = min(len(pos), (count + 1) // 2)
    n_neg = min(len(neg), count - n_pos)
    pick = lambda idx, n: idx[np.linspace(0, len(idx) - 1, n).astype(int)] if n else idx[:0]  # noqa: E731
    return np.concatenate([pick(pos, n_pos), pick(neg, n_neg)])


class Overlays:
    """The same validation slices drawn at the model's size each time: FLAIR, truth, prediction."""

    def __init__(self, *, model, data: LggDataset, count: int, image_size: int, writer: SummaryWriter):
        picked = overlay_indices(data.positive, count)
        self.writer = writer
        self.predictor = Predictor(model, image_size=image_size)
        # At the model's size, through the one inference path, as evaluation sees them.
        small = pipeline.preprocess(data.images[picked], image_size).numpy() if len(picked) else None
        self.images = None if small is None else np.round(small * 255.0).astype(np.uint8)
        self.masks = (None if small is None else
                      pipeline.resize_masks(data.masks[picked], image_size).numpy()[..., 0])

    def __call__(self, step: int) -> None:
        if self.images is None:
            return
        probs = self.predictor(self.images, batch_size=len(self.images))
        self.writer.images(step, "val/overlay",
                           overlay(self.images.astype(np.float32) / 255.0, self.masks, probs))


class Progress:
    """A one-line progress bar on a terminal, silent elsewhere (logs get the epoch line)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()

    def update(self, epoch: int, done: int, total: int, loss: float, dice: float, ips: float):
        if self.enabled:
            bar = "#" * int(30 * done / max(total, 1))
            sys.stderr.write(f"\repoch {epoch} [{bar:<30}] {done}/{total} loss {loss:.4f} "
                             f"dice {dice:.4f} {ips:.1f} img/s ")
            sys.stderr.flush()

    def end(self):
        if self.enabled:
            sys.stderr.write("\n")
