"""Model inputs made per volume: intensity standardisation per patient and channel, neighbouring slices."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from data.dataset import LggDataset

NORMALIZE = ("none", "volume")
# Where each channel's 99th percentile lands after standardisation, on the 0..255 scale: high enough
# to keep a dark volume's detail, low enough that lesions brighter than it are rarely clipped.
TARGET_P99 = 0.75 * 255


def channels(neighbours: int) -> int:
    """Input channels of the model: pre-contrast, FLAIR, post-contrast, then the neighbours' FLAIR."""
    return 3 + 2 * neighbours


def model_inputs(volume, *, normalize: str, neighbours: int) -> tf.Tensor:
    """One patient's slices, in slice order, as the model reads them (graph-safe).

    Args:
      volume: uint8 [D, H, W, 3]: pre-contrast, FLAIR, post-contrast.
      normalize: "none", or "volume": each channel scaled so that its 99th percentile over the
        volume is TARGET_P99 (the Kaggle slices were windowed per patient, so the same tissue
        has a different brightness from patient to patient; a scan's FLAIR p99 ranges from
        about 40 to 190 in the development set).
      neighbours: append the FLAIR of this many slices above and below as channels (2.5D); past
        the ends of the volume the edge slice repeats.

    Returns:
      uint8 [D, H, W, 3 + 2 * neighbours].
    """
    volume = tf.convert_to_tensor(volume, tf.uint8)
    if normalize == "volume":
        volume = standardise(volume)
    if neighbours:
        depth = tf.shape(volume)[0]
        index = tf.range(depth)
        extra = []
        for offset in range(1, neighbours + 1):
            extra.append(tf.gather(volume[..., 1], tf.maximum(index - offset, 0)))
            extra.append(tf.gather(volume[..., 1], tf.minimum(index + offset, depth - 1)))
        volume = tf.concat([volume, tf.stack(extra, axis=-1)], axis=-1)
    return volume


def standardise(volume: tf.Tensor) -> tf.Tensor:
    """Scales each channel of a uint8 volume so that its 99th percentile is TARGET_P99.

    The percentile comes from the channel's 256-bin histogram, so it is exact and the same in
    every program that computes it.
    """
    flat = tf.cast(tf.reshape(volume, [-1, tf.shape(volume)[-1]]), tf.int32)
    counts = tf.math.bincount(tf.transpose(flat), minlength=256, maxlength=256, axis=-1)
    cumulative = tf.cast(tf.cumsum(counts, axis=-1), tf.float64)
    wanted = 0.99 * tf.cast(tf.shape(flat)[0], tf.float64)
    p99 = tf.cast(tf.reduce_sum(tf.cast(cumulative < wanted, tf.int32), axis=-1), tf.float32)
    gain = TARGET_P99 / tf.maximum(p99, 1.0)
    scaled = tf.cast(volume, tf.float32) * gain + 0.5
    return tf.cast(tf.clip_by_value(scaled, 0.0, 255.0), tf.uint8)


def prepare(dataset: LggDataset, *, normalize: str, neighbours: int) -> np.ndarray:
    """model_inputs for every patient of a dataset, volume by volume: uint8 [N, H, W, channels]."""
    if normalize == "none" and neighbours == 0:
        return dataset.images
    out = np.empty(dataset.images.shape[:3] + (channels(neighbours),), np.uint8)
    for idx in dataset.patient_slices.values():
        out[idx] = model_inputs(dataset.images[idx], normalize=normalize, neighbours=neighbours).numpy()
    return out
