"""The one inference path: a trained model, uint8 slices in, probability maps at their own size out."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from data import pipeline

# Slices per group of volumes in predict and evaluate. Each volume's last batch padded alone cost
# a fifth of the model calls on the development data (81 calls of 16 for 1,034 slices in 29
# volumes, against 65); a group holds 256 slices' probabilities in memory.
GROUP_SLICES = 256


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
    """Batched probability maps for numpy slices of any size; one trace per slice size."""

    def __init__(self, model, *, image_size: int, tta: bool = False):
        self.model = model
        self.image_size = image_size
        self.tta = tta
        self.traces = 0
        self._fns = {}

    def _fn(self, images: tf.Tensor) -> tf.Tensor:
        # One trace per slice size, the batch left open: with the height and width unknown too,
        # the TTA graph ran a third slower (a bfloat16 batch of 16 at 256x256: 428 against 318 ms).
        shape = tuple(images.shape[1:])
        if shape not in self._fns:
            def fn(x):
                self.traces += 1
                return probabilities(self.model, x, image_size=self.image_size, tta=self.tta)

            self._fns[shape] = tf.function(fn, input_signature=[tf.TensorSpec([None, *shape], tf.uint8)])
        return self._fns[shape](images)

    def __call__(self, images: np.ndarray, *, batch_size: int) -> np.ndarray:
        """Probabilities of a stack of same-sized slices.

        Args:
          images: uint8 [N, H, W, C], as the model reads them (data.volume.model_inputs).
          batch_size: slices per model call.

        Returns:
          float32 [N, H, W] probabilities.
        """
        images = np.asarray(images)
        out = np.empty(images.shape[:3], np.float32)
        batch_size = min(batch_size, len(images)) or 1
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            n = len(batch)
            if n < batch_size:  # padded to the one batch shape: oneDNN builds its kernels per shape
                batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
            out[start:start + n] = self._fn(tf.constant(batch))[:n, ..., 0].numpy()
        return out


def groups(lengths: list[int], slices: int = GROUP_SLICES) -> list[list[int]]:
    """Consecutive volumes gathered until they hold `slices` slices: the model's batches run
    full across a group, and memory holds one group's probabilities."""
    out, size = [[]], 0
    for i, n in enumerate(lengths):
        if size >= slices:
            out, size = out + [[]], 0
        out[-1].append(i)
        size += n
    return [g for g in out if g]
