"""Per-volume segmentation metrics: overlap, surface distances, lesion detection, slice-level errors.

Definitions follow MONAI's (compute_hausdorff_distance, compute_average_surface_distance,
compute_surface_dice) and the Medical Segmentation Decathlon: a mask's surface is its voxels
that touch the background (26-neighbourhood); distances are Euclidean, in pixels, between the
two surfaces, computed with scipy's exact distance transform. The Kaggle TIFFs carry no voxel
spacing, so slices are taken as 1 pixel apart; given a spacing (NIfTI volumes), distances are in mm.

Where MONAI returns NaN, a defined value is returned instead, so that every patient counts:
  - both masks empty: Dice, IoU and surface Dice 1, HD95 and ASSD 0 (nothing to find, nothing found);
  - one mask empty: Dice, IoU and surface Dice 0, HD95 and ASSD the diagonal of the volume, the
    largest distance two of its voxels can be apart.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

_FULL = np.ones((3, 3, 3), bool)


def _check(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must be [D, H, W] of one shape, got {pred.shape} and {target.shape}")
    return pred, target


def diagonal(shape, spacing=None) -> float:
    """The largest distance between two voxels of a volume of this shape, in pixels (or mm)."""
    spacing = spacing or (1.0,) * len(shape)
    return float(math.sqrt(sum(((s - 1) * d) ** 2 for s, d in zip(shape, spacing))))


def _surface(mask: np.ndarray) -> np.ndarray:
    # Padded, so that a mask touching the edge of the volume has a surface there too.
    eroded = ndimage.binary_erosion(np.pad(mask, 1), structure=_FULL)[1:-1, 1:-1, 1:-1]
    return mask & ~eroded


def surface_distances(pred, target, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface voxel of pred to target's surface, and back (both non-empty).

    Both surfaces lie inside the bounding box of pred | target, and so does the nearest target
    voxel of any pred voxel, so the distance transforms are computed on that box only: the same
    distances, at a fraction of the cost of the whole volume.
    """
    pred, target = _check(pred, target)
    both = pred | target
    box = tuple(slice(max(0, lo - 1), hi + 2) for lo, hi in
                ((np.min(i), np.max(i)) for i in np.nonzero(both)))
    sp, st = _surface(pred[box]), _surface(target[box])
    to_target = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return to_target[sp], to_pred[st]


def volume_metrics(pred, target, *, tolerance: float = 2.0, spacing=None) -> dict[str, float]:
    """Overlap, surface and volume figures of one patient's predicted and true lesion masks.

    Args:
      pred, target: boolean [D, H, W] volumes, slices in order, at the original resolution.
      tolerance: normalised surface Dice counts surface voxels within this many pixels (or mm).
      spacing: (slice, row, col) voxel spacing in mm, or None for distances in pixels.

    Returns:
      dice, iou, hd95 (95th-percentile symmetric Hausdorff distance), assd (average symmetric
      surface distance), surface_dice (at `tolerance`), true_volume and predicted_volume (pixels).
    """
    pred, target = _check(pred, target)
    p, t = int(pred.sum()), int(target.sum())
    inter = int(np.logical_and(pred, target).sum())
    out = {"true_volume": t, "predicted_volume": p}
    if p == 0 and t == 0:
        return {**out, "dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0, "surface_dice": 1.0}
    out.update(dice=2.0 * inter / (p + t), iou=inter / (p + t - inter))
    if p == 0 or t == 0:
        far = diagonal(pred.shape, spacing)
        return {**out, "hd95": far, "assd": far, "surface_dice": 0.0}
    a, b = surface_distances(pred, target, spacing)
    out.update(hd95=float(max(np.percentile(a, 95), np.percentile(b, 95))),
               assd=float((a.sum() + b.sum()) / (len(a) + len(b))),
               surface_dice=float(((a <= tolerance).sum() + (b <= tolerance).sum()) / (len(a) + len(b))))
    return out


def lesion_detection(pred, target) -> dict[str, float]:
    """Lesion-wise detection: 3D connected components (26-neighbourhood) matched by any overlap.

    A true lesion that some predicted voxel overlaps is a true positive, one that none overlaps a
    false negative; a predicted component that overlaps no true lesion is a false positive.

    Returns:
      lesions_tp, lesions_fp, lesions_fn, and lesion_f1 = 2 TP / (2 TP + FP + FN)
      (1 when there are no lesions, true or predicted).
    """
    pred, target = _check(pred, target)
    true_labels, n_true = ndimage.label(target, structure=_FULL)
    pred_labels, n_pred = ndimage.label(pred, structure=_FULL)
    tp = len(np.unique(true_labels[pred & (true_labels > 0)]))
    fp = n_pred - len(np.unique(pred_labels[target & (pred_labels > 0)]))
    fn = n_true - tp
    f1 = 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)
    return {"lesions_tp": tp, "lesions_fp": fp, "lesions_fn": fn, "lesion_f1": f1}


def slice_errors(pred, target) -> dict[str, float]:
    """Per slice: how many lesion-free slices get a prediction, and Dice on the lesion slices.

    Returns:
      empty_slices, false_positive_slices (lesion-free slices with any predicted pixel),
      positive_slices, and positive_slice_dice (mean Dice over lesion slices; NaN if none).
    """
    pred, target = _check(pred, target)
    t = target.reshape(len(target), -1)
    p = pred.reshape(len(pred), -1)
    positive = t.any(1)
    inter, sums = (t & p).sum(1), t.sum(1) + p.sum(1)
    dice = 2.0 * inter[positive] / sums[positive]
    return {"empty_slices": int((~positive).sum()),
            "false_positive_slices": int((p.any(1) & ~positive).sum()),
            "positive_slices": int(positive.sum()),
            "positive_slice_dice": float(dice.mean()) if len(dice) else math.nan}


def patient_metrics(pred, target, *, tolerance: float = 2.0, spacing=None) -> dict[str, float]:
    """Every per-patient figure the evaluation reports (see the functions above)."""
    return {**volume_metrics(pred, target, tolerance=tolerance, spacing=spacing), **lesion_detection(pred, target),
            **slice_errors(pred, target)}


def bootstrap_interval(values, *, resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """A percentile bootstrap interval of the mean of `values` (NaNs left out), or (nan, nan)."""
    values = np.asarray([v for v in values if not (isinstance(v, float) and math.isnan(v))], float)
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def summarize(values) -> dict[str, float]:
    """n, mean, median and 95% bootstrap interval of the mean, NaNs left out."""
    clean = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    lo, hi = bootstrap_interval(clean)
    return {"n": len(clean), "mean": float(np.mean(clean)) if clean else math.nan,
            "median": float(np.median(clean)) if clean else math.nan, "ci_low": lo, "ci_high": hi}
