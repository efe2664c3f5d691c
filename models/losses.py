"""BCE + soft Dice loss from logits, streamed Dice/IoU counts, and per-volume Dice."""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How the per-example loss is weighted (engine.config.Config.loss builds it from the flags).

    Attributes:
      dice_smooth: added to numerator and denominator of the soft Dice, >= 0.
      bce_weight: weight of the BCE term, >= 0.
      dice_weight: weight of the (1 - Dice) term, >= 0.
    """

    dice_smooth: float
    bce_weight: float
    dice_weight: float


def _check_non_negative(name: str, value) -> None:
    # Tensors pass through unchecked: only plain Python numbers come from the config.
    if isinstance(value, (tf.Tensor, tf.Variable, np.ndarray)):
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _pixel_axes(x: tf.Tensor) -> list[int]:
    return list(range(1, x.shape.rank))


def per_example_loss(logits, masks, spec: LossSpec) -> tf.Tensor:
    """BCE plus soft-Dice loss of each example, computed from logits in float32.

    loss[b] = bce_weight * mean over pixels of BCE(sigmoid(logits), masks)
            + dice_weight * (1 - (2 * sum(p * m) + s) / (sum(p) + sum(m) + s))
    with p = sigmoid(logits), m = masks, s = dice_smooth, sums over the pixels of
    example b. BCE uses tf.nn.sigmoid_cross_entropy_with_logits, which stays
    finite for any logit. The result is a vector, so the caller decides how to
    weight examples and average over the global batch under tf.distribute.

    Args:
      logits: [B, H, W, 1] (or any [B, ...]) logits of any float dtype; cast to float32.
      masks: targets in {0, 1}, same shape as logits.
      spec: the weights. Its dice_smooth makes a near-empty prediction of an empty
        mask score close to Dice 1; with 0 such a slice scores 0 (and exactly 1 only
        when every probability underflows to 0).

    Returns:
      float32 Tensor [B].

    Raises:
      ValueError: if dice_smooth or a weight is negative or not finite, or the
        shapes of logits and masks differ.
    """
    dice_smooth, bce_weight, dice_weight = spec.dice_smooth, spec.bce_weight, spec.dice_weight
    _check_non_negative("dice_smooth", dice_smooth)
    _check_non_negative("bce_weight", bce_weight)
    _check_non_negative("dice_weight", dice_weight)
    logits = tf.cast(logits, tf.float32)
    masks = tf.cast(masks, tf.float32)
    if not logits.shape.is_compatible_with(masks.shape):
        raise ValueError(f"logits and masks must have the same shape, got {logits.shape} and "
                         f"{masks.shape}")
    axes = _pixel_axes(logits)
    bce = tf.reduce_mean(
        tf.nn.sigmoid_cross_entropy_with_logits(labels=masks, logits=logits), axis=axes)
    probs = tf.sigmoid(logits)
    intersection = tf.reduce_sum(probs * masks, axis=axes)
    total = tf.reduce_sum(probs, axis=axes) + tf.reduce_sum(masks, axis=axes)
    denominator = total + dice_smooth
    # Only reachable with dice_smooth 0: an empty mask and probabilities that
    # underflow to 0 are a perfect match. The double tf.where keeps the
    # gradient free of the NaN that 0/0 would put into it.
    nonzero = denominator > 0
    dice = tf.where(nonzero,
                    (2.0 * intersection + dice_smooth) / tf.where(nonzero, denominator, 1.0),
                    1.0)
    return bce_weight * bce + dice_weight * (1.0 - dice)


def segmentation_counts(logits, masks, weights, threshold: float = 0.5) -> dict[str, tf.Tensor]:
    """Weighted pixel counts of hard predictions, to be summed over a whole epoch.

    Dice and IoU of a split come from these sums (see `dice_iou`), not from an
    average of per-batch ratios, which would over-weight small batches and
    batches with little lesion.

    Args:
      logits: [B, H, W, 1] (or any [B, ...]) logits.
      masks: targets in {0, 1}, same shape as logits.
      weights: [B] per-slice weights; a padded slice has weight 0 and adds nothing.
      threshold: probability above which a pixel is predicted positive, in (0, 1).

    Returns:
      dict of float32 scalars: `intersection` (predicted and target), `predicted`
      and `target` pixel counts, each slice multiplied by its weight.

    Raises:
      ValueError: if threshold is not in (0, 1).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    logits = tf.cast(logits, tf.float32)
    # sigmoid(x) > t  <=>  x > log(t / (1 - t)); comparing logits avoids the
    # sigmoid rounding to exactly 1.0 for large logits (and is just x > 0 at 0.5).
    predicted = tf.cast(logits > math.log(threshold / (1.0 - threshold)), tf.float32)
    target = tf.cast(tf.cast(masks, tf.float32) > 0.5, tf.float32)
    weights = tf.cast(weights, tf.float32)
    axes = _pixel_axes(logits)

    def weighted_sum(x):
        return tf.reduce_sum(tf.reduce_sum(x, axis=axes) * weights)

    return {
        "intersection": weighted_sum(predicted * target),
        "predicted": weighted_sum(predicted),
        "target": weighted_sum(target),
    }


def dice_iou(counts) -> tuple[float, float]:
    """Dice and IoU from summed counts; an empty prediction of an empty target scores 1.0.

    Args:
      counts: mapping with `intersection`, `predicted` and `target` (tensors,
        numpy values or floats), e.g. sums of `segmentation_counts` over an epoch.

    Returns:
      (dice, iou) as Python floats.
    """
    intersection, predicted, target = (
        float(np.asarray(counts[k])) for k in ("intersection", "predicted", "target"))
    total = predicted + target
    if total == 0:
        return 1.0, 1.0
    return 2.0 * intersection / total, intersection / (total - intersection)


def volume_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean volumes (e.g. one patient's slices stacked); 1.0 when both are empty.

    Args:
      pred: boolean array of predicted lesion voxels.
      target: boolean array of the same shape.

    Returns:
      Dice as a Python float.

    Raises:
      ValueError: if the shapes differ.
    """
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and "
                         f"{target.shape}")
    total = int(pred.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, target).sum()) / total
