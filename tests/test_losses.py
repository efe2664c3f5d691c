"""Tests for models/losses.py against numpy references on random data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from models import losses

DEFAULT = losses.LossSpec(dice_smooth=1.0, bce_weight=1.0, dice_weight=1.0)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_loss(logits, masks, smooth, bce_weight, dice_weight):
    """The loss written out directly in float64 (fine for moderate logits)."""
    p = _np_sigmoid(logits.astype(np.float64))
    m = masks.astype(np.float64)
    axes = tuple(range(1, logits.ndim))
    bce = -(m * np.log(p) + (1 - m) * np.log(1 - p)).mean(axis=axes)
    dice = (2 * (p * m).sum(axis=axes) + smooth) / (p.sum(axis=axes) + m.sum(axis=axes) + smooth)
    return bce_weight * bce + dice_weight * (1 - dice)


def _random_batch(rng, batch=4, size=16, scale=3.0):
    logits = (rng.normal(size=(batch, size, size, 1)) * scale).astype(np.float32)
    masks = (rng.uniform(size=(batch, size, size, 1)) < 0.3).astype(np.float32)
    return logits, masks


def _np_counts(logits, masks, weights, threshold=0.5):
    pred = _np_sigmoid(logits.astype(np.float64)) > threshold
    target = masks > 0.5
    w = weights.reshape(-1, *([1] * (logits.ndim - 1)))
    return {
        "intersection": float((w * (pred & target)).sum()),
        "predicted": float((w * pred).sum()),
        "target": float((w * target).sum()),
    }


@pytest.mark.parametrize("smooth,bce_weight,dice_weight", [
    (1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (1e-3, 1.0, 0.0), (10.0, 0.0, 1.0), (1.0, 0.3, 2.0)])
def test_per_example_loss_matches_numpy(smooth, bce_weight, dice_weight):
    logits, masks = _random_batch(np.random.default_rng(1))
    masks[0] = 0  # an empty slice, as most LGG slices are
    got = losses.per_example_loss(logits, masks, losses.LossSpec(
        dice_smooth=smooth, bce_weight=bce_weight, dice_weight=dice_weight))
    assert got.dtype == tf.float32 and tuple(got.shape) == (4,)
    np.testing.assert_allclose(
        got.numpy(), _np_loss(logits, masks, smooth, bce_weight, dice_weight), rtol=1e-5,
        atol=1e-6)


def test_loss_casts_float16_logits_and_works_in_tf_function():
    logits, masks = _random_batch(np.random.default_rng(2))
    compiled = tf.function(lambda x, m: losses.per_example_loss(x, m, DEFAULT))
    got = compiled(tf.constant(logits, tf.float16), tf.constant(masks))
    assert got.dtype == tf.float32
    expected = _np_loss(logits.astype(np.float16).astype(np.float32), masks, 1.0, 1.0, 1.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_loss_stable_for_huge_logits():
    rng = np.random.default_rng(3)
    masks = (rng.uniform(size=(3, 8, 8, 1)) < 0.5).astype(np.float32)
    signs = np.where(rng.uniform(size=masks.shape) < 0.5, 1.0, -1.0).astype(np.float32)
    logits = tf.Variable(1e4 * signs)
    with tf.GradientTape() as tape:
        loss = losses.per_example_loss(logits, masks, DEFAULT)
        total = tf.reduce_sum(loss)
    grad = tape.gradient(total, logits)
    assert np.all(np.isfinite(loss.numpy()))
    assert np.all(np.isfinite(grad.numpy()))
    # Each wrong pixel costs exactly |logit| = 1e4 in BCE; right ones cost ~0.
    wrong = ((signs > 0) != (masks > 0.5)).mean(axis=(1, 2, 3))
    pred = signs > 0
    inter = (pred & (masks > 0.5)).sum(axis=(1, 2, 3))
    dice = (2 * inter + 1.0) / (pred.sum(axis=(1, 2, 3)) + masks.sum(axis=(1, 2, 3)) + 1.0)
    np.testing.assert_allclose(loss.numpy(), 1e4 * wrong + 1 - dice, rtol=1e-5)


@pytest.mark.parametrize("smooth", [1.0, 0.0])
def test_perfect_empty_prediction_has_zero_loss_and_finite_gradient(smooth):
    logits = tf.Variable(tf.fill([2, 8, 8, 1], -1e4))
    with tf.GradientTape() as tape:
        loss = losses.per_example_loss(logits, tf.zeros([2, 8, 8, 1]),
                                       dataclasses.replace(DEFAULT, dice_smooth=smooth))
    grad = tape.gradient(loss, logits)
    np.testing.assert_allclose(loss.numpy(), 0.0, atol=1e-6)
    assert np.all(np.isfinite(grad.numpy()))


@pytest.mark.parametrize("kwargs,message", [
    (dict(dice_smooth=-1.0), "dice_smooth.*-1.0"),
    (dict(bce_weight=-0.5), "bce_weight.*-0.5"),
    (dict(dice_weight=float("nan")), "dice_weight.*nan"),
])
def test_loss_rejects_bad_arguments(kwargs, message):
    logits, masks = _random_batch(np.random.default_rng(4), batch=1, size=4)
    with pytest.raises(ValueError, match=message):
        losses.per_example_loss(logits, masks, dataclasses.replace(DEFAULT, **kwargs))


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        losses.per_example_loss(tf.zeros([2, 8, 8, 1]), tf.zeros([2, 8, 8]), DEFAULT)


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.1])
def test_counts_match_numpy(threshold):
    rng = np.random.default_rng(5)
    logits, masks = _random_batch(rng, batch=6)
    weights = rng.uniform(0.5, 2.0, size=6).astype(np.float32)
    got = losses.segmentation_counts(logits, masks, weights, threshold=threshold)
    expected = _np_counts(logits, masks, weights, threshold)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == tf.float32 and got[key].shape == ()
        np.testing.assert_allclose(got[key].numpy(), expected[key], rtol=1e-6)


def test_zero_weight_slices_vanish_from_counts():
    rng = np.random.default_rng(6)
    logits, masks = _random_batch(rng, batch=5)
    weights = np.array([1, 0, 1, 1, 0], np.float32)
    padded = losses.segmentation_counts(logits, masks, weights)
    kept = weights > 0
    alone = losses.segmentation_counts(logits[kept], masks[kept], np.ones(kept.sum(), np.float32))
    everything = losses.segmentation_counts(logits, masks, np.ones(5, np.float32))
    for key in padded:
        assert padded[key].numpy() == alone[key].numpy()
    # The dropped slices did hold pixels, so the weights really removed something.
    assert everything["target"].numpy() > padded["target"].numpy()


def test_streamed_counts_equal_global_dice():
    rng = np.random.default_rng(7)
    batches = [_random_batch(rng, batch=3) for _ in range(4)]
    totals = None
    for logits, masks in batches:
        counts = losses.segmentation_counts(logits, masks, np.ones(3, np.float32))
        totals = counts if totals is None else {k: totals[k] + counts[k] for k in totals}
    dice, iou = losses.dice_iou(totals)
    pred = np.concatenate([l for l, _ in batches]) > 0
    target = np.concatenate([m for _, m in batches]) > 0.5
    inter, union = (pred & target).sum(), (pred | target).sum()
    assert dice == pytest.approx(2 * inter / (pred.sum() + target.sum()), rel=1e-6)
    assert iou == pytest.approx(inter / union, rel=1e-6)


def test_streamed_dice_differs_from_mean_of_batch_ratios():
    # Batch 1: a big lesion found perfectly. Batch 2: a one-pixel lesion missed.
    masks_1 = np.zeros((1, 8, 8, 1), np.float32)
    masks_1[0, :6, :6] = 1
    logits_1 = np.where(masks_1 > 0, 5.0, -5.0).astype(np.float32)
    masks_2 = np.zeros((1, 8, 8, 1), np.float32)
    masks_2[0, 0, 0] = 1
    logits_2 = np.full_like(masks_2, -5.0)
    counts = [losses.segmentation_counts(l, m, np.ones(1, np.float32))
              for l, m in ((logits_1, masks_1), (logits_2, masks_2))]
    streamed, _ = losses.dice_iou({k: counts[0][k] + counts[1][k] for k in counts[0]})
    mean_of_ratios = np.mean([losses.dice_iou(c)[0] for c in counts])
    target = np.concatenate([masks_1, masks_2]) > 0.5
    pred = np.concatenate([logits_1, logits_2]) > 0
    assert streamed == pytest.approx(2 * (pred & target).sum() / (pred.sum() + target.sum()))
    assert abs(streamed - mean_of_ratios) > 0.4


def test_dice_iou_edge_cases():
    assert losses.dice_iou({"intersection": 0.0, "predicted": 0.0, "target": 0.0}) == (1.0, 1.0)
    assert losses.dice_iou({"intersection": 0.0, "predicted": 3.0, "target": 0.0}) == (0.0, 0.0)
    dice, iou = losses.dice_iou({"intersection": np.float32(2), "predicted": tf.constant(4.0),
                                 "target": 4})
    assert isinstance(dice, float) and isinstance(iou, float)
    # Dice and IoU of the same counts are tied by dice = 2 iou / (1 + iou).
    assert dice == pytest.approx(2 * iou / (1 + iou))


def test_volume_dice_matches_set_definition():
    rng = np.random.default_rng(8)
    pred = rng.uniform(size=(5, 16, 16)) < 0.3
    target = rng.uniform(size=(5, 16, 16)) < 0.3
    p, t = set(zip(*np.nonzero(pred))), set(zip(*np.nonzero(target)))
    assert losses.volume_dice(pred, target) == pytest.approx(2 * len(p & t) / (len(p) + len(t)))
    assert losses.volume_dice(pred, pred) == 1.0
    empty = np.zeros_like(pred)
    assert losses.volume_dice(empty, empty) == 1.0
    assert losses.volume_dice(empty, target) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        losses.volume_dice(pred, target[:4])
