"""The one TensorBoard writer, and the one function that draws prediction overlays."""

from __future__ import annotations

import contextlib
import errno

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

GREEN = np.array([0, 255, 0], np.uint8)
RED = np.array([255, 0, 0], np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a boolean [N,H,W] mask that touch the background (4-neighbourhood)."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge")
    interior = (padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1]
                & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])
    return mask & ~interior


def overlay(images: np.ndarray, masks: np.ndarray, probs: np.ndarray, *,
            heatmap: bool = True, threshold: float = 0.5) -> np.ndarray:
    """Draws FLAIR in grey with ground truth (green) and prediction (red) outlines.

    Args:
      images: float [N,H,W,3] in [0,1]; channel 1 is FLAIR.
      masks: [N,H,W] or [N,H,W,1] ground truth in {0,1}.
      probs: [N,H,W] or [N,H,W,1] predicted probabilities.
      heatmap: tint the grey image by the probability, so uncertain regions show.
      threshold: probability above which a pixel is predicted lesion.

    Returns:
      uint8 RGB [N,H,W,3].
    """
    flair = np.clip(np.asarray(images, np.float32)[..., 1], 0.0, 1.0)
    masks = np.asarray(masks).reshape(flair.shape) > 0.5
    probs = np.asarray(probs, np.float32).reshape(flair.shape)
    rgb = np.repeat(flair[..., None], 3, axis=-1)
    if heatmap:
        # A warm tint proportional to the probability; grey stays grey where p is 0.
        heat = np.stack([probs, 0.5 * probs, np.zeros_like(probs)], axis=-1)
        rgb = np.clip(0.7 * rgb + 0.5 * heat, 0.0, 1.0)
    out = (rgb * 255.0 + 0.5).astype(np.uint8)
    out[_outline(masks)] = GREEN
    out[_outline(probs > threshold)] = RED
    return out


class SummaryWriter:
    """Turns nested metric dicts into TensorBoard tags; the only writer of a run."""

    def __init__(self, logdir: str | None):
        self._logdir = logdir
        self._writer = tf.summary.create_file_writer(logdir) if logdir else None

    @contextlib.contextmanager
    def _writing(self, step: int | None = None):
        """Turns TensorFlow's I/O errors (a full or read-only disk) into an OSError naming the folder."""
        try:
            if step is None:
                yield
            else:
                with self._writer.as_default(step=step):
                    yield
        except tf.errors.OpError as e:
            reason = e.message.strip().splitlines()[0].split("; ")[-1]
            raise OSError(errno.EIO, f"TensorBoard events: {reason}", self._logdir) from None

    def scalars(self, step: int, metrics: dict[str, dict[str, float]]) -> None:
        """Writes {"train": {"loss": 0.3}} as the tag train/loss."""
        if self._writer is None:
            return
        with self._writing(step):
            for group, values in metrics.items():
                for name, value in values.items():
                    tf.summary.scalar(f"{group}/{name}", float(value))

    def images(self, step: int, tag: str, images: np.ndarray, max_outputs: int = 32) -> None:
        if self._writer is None:
            return
        with self._writing(step):
            tf.summary.image(tag, images, max_outputs=max_outputs)

    def text(self, step: int, tag: str, text: str) -> None:
        if self._writer is None:
            return
        with self._writing(step):
            tf.summary.text(tag, text)

    def hparams(self, step: int, hparams: dict, metrics: dict[str, float]) -> None:
        """Records the run's hyperparameters and final metrics for the HParams tab."""
        if self._writer is None:
            return
        # A path that is not valid UTF-8 (the run may train on one) is shown with escapes.
        hparams = {k: v.encode("utf-8", "backslashreplace").decode() if isinstance(v, str) else v
                   for k, v in hparams.items()}
        with self._writing(step):
            hparams_api.hparams(hparams)
            for name, value in metrics.items():
                tf.summary.scalar(name, float(value))

    def flush(self) -> None:
        if self._writer is not None:
            with self._writing():
                self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            with self._writing():
                self._writer.close()
