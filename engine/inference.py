"""The one inference path: a trained model, uint8 slices in, probability maps at their own size out."""

from __future__ import annotations

import logging
import os
import zipfile

import keras
import numpy as np
import tensorflow as tf

from data import pipeline
from engine import checkpoint as checkpoint_lib
from engine.checkpoint import CheckpointError
from engine.rundir import FINAL_MODEL
from models import fused_batch_norm  # noqa: F401  (registers the layer that load_model reads)

log = logging.getLogger(__name__)

THRESHOLD = 0.5


def model_image_size(model, fallback: int) -> int:
    """The square input size the model was built for (its own shape wins over flags)."""
    shape = getattr(model, "input_shape", None)
    if shape and len(shape) == 4 and isinstance(shape[1], int):
        return int(shape[1])
    return fallback


def probabilities(model, images: tf.Tensor, *, image_size: int, tta: bool = False) -> tf.Tensor:
    """Probability maps at the input's own size for a uint8 batch (graph-safe).

    Training's overlays, evaluation, prediction and the exported SavedModel all call this, so
    they agree to the last bit: data.pipeline.preprocess, the model, a float32 sigmoid, optional
    flip averaging, and a bilinear resize back to the slices' size.

    Args:
      model: a Keras model mapping float32 [B, S, S, 3] in [0, 1] to logits [B, S, S, 1].
      images: uint8 [B, H, W, 3], any H and W.
      image_size: S, the model's input size.
      tta: average the probabilities of the identity, left-right, up-down and
        both flips (each flipped back), the flips training augments with.

    Returns:
      float32 [B, H, W, 1] probabilities (bilinear resize of the model-size map).
    """
    size = tf.shape(images)[1:3]
    x = pipeline.preprocess(images, image_size)
    if tta:
        batch = tf.shape(x)[0]
        flips = ((), (2,), (1,), (1, 2))
        # One model call on the four views keeps batches large.
        views = tf.concat([tf.reverse(x, axis) if axis else x for axis in flips], axis=0)
        p = tf.sigmoid(tf.cast(model(views, training=False), tf.float32))
        parts = [p[i * batch:(i + 1) * batch] for i in range(len(flips))]
        p = tf.add_n([tf.reverse(q, axis) if axis else q for q, axis in zip(parts, flips)]) / len(flips)
    else:
        p = tf.sigmoid(tf.cast(model(x, training=False), tf.float32))
    return tf.image.resize(p, size, method="bilinear")


class Predictor:
    """Batched probability maps for numpy slices of any size; the tf.function traces once."""

    def __init__(self, model, *, image_size: int, tta: bool = False):
        self.model = model
        self.image_size = image_size
        self.tta = tta
        self.traces = 0

        def fn(images):
            self.traces += 1
            return probabilities(model, images, image_size=image_size, tta=tta)

        self._fn = tf.function(fn, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])

    def __call__(self, images: np.ndarray, *, batch_size: int) -> np.ndarray:
        """Probabilities of a stack of same-sized slices.

        Args:
          images: uint8 [N, H, W, 3].
          batch_size: slices per model call.

        Returns:
          float32 [N, H, W] probabilities.
        """
        images = np.asarray(images)
        out = np.empty(images.shape[:3], np.float32)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            out[start:start + len(batch)] = self._fn(tf.constant(batch))[..., 0].numpy()
        return out


def load_model(run_dir: str, checkpoint: str = "", *, build=None) -> tuple[keras.Model, str]:
    """The trained model evaluate, predict and export use, and where it came from.

    Args:
      run_dir: the run directory; its final model unless `checkpoint` names another.
      checkpoint: '' for the run's final model; else a `.keras` model file, a run directory,
        its checkpoints folder, or one checkpoint (weights read into `build()`).
      build: makes the model a checkpoint's weights are read into (from the current config).

    Returns:
      (model, source): the model and the file or checkpoint it was read from.

    Raises:
      CheckpointError: nothing loadable where the flags point; a damaged file is named as such.
    """
    if checkpoint and not checkpoint.endswith(".keras"):
        model = build()
        info = checkpoint_lib.restore(tf.train.Checkpoint(model=model), checkpoint, partial=True)
        log.info(f"Model weights from checkpoint {info.path}")
        return model, info.path
    path = checkpoint or os.path.join(run_dir, FINAL_MODEL)
    if not os.path.exists(path):
        flag = f"--checkpoint={checkpoint}" if checkpoint else path
        raise CheckpointError(
            f"{flag} does not exist: train first (--mode=train with the same --run_name/--model_dir), "
            f"or name a checkpoint with --checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is damaged: not a Keras model archive (truncated or "
                              "overwritten?); train again, or name a checkpoint with --checkpoint")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # A damaged file: name it rather than show Keras' internals.
        raise CheckpointError(f"{path} is damaged and could not be loaded ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    log.info(f"Model from {path}")
    return model, path
