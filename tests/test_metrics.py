"""Per-volume metrics (models.metrics) on hand-made volumes, against brute force and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models import metrics


def _cube(shape=(24, 32, 32), at=(6, 8, 8), size=8) -> np.ndarray:
    v = np.zeros(shape, bool)
    v[at[0]:at[0] + size, at[1]:at[1] + size, at[2]:at[2] + size] = True
    return v


def _surface_brute(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a background voxel (or the volume's edge) among their 26 neighbours."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for z, y, x in zip(*np.nonzero(mask)):
        out[z, y, x] = not padded[z:z + 3, y:y + 3, x:x + 3].all()
    return out


def _distances_brute(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    pa, pb = np.argwhere(_surface_brute(a)), np.argwhere(_surface_brute(b))
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


def test_a_shifted_cube_against_brute_force_and_by_hand():
    target, pred = _cube(), _cube(at=(6, 8, 10))  # the same 8-cube, 2 pixels to the right
    m = metrics.volume_metrics(pred, target, tolerance=1.0)
    assert m["dice"] == pytest.approx(2 * 6 * 64 / (2 * 512))  # 6 of 8 columns overlap
    assert m["iou"] == pytest.approx(6 * 64 / (10 * 64))
    a, b = _distances_brute(pred, target), _distances_brute(target, pred)
    assert m["hd95"] == pytest.approx(max(np.percentile(a, 95), np.percentile(b, 95)))
    assert m["assd"] == pytest.approx((a.sum() + b.sum()) / (len(a) + len(b)))
    assert m["surface_dice"] == pytest.approx(((a <= 1).sum() + (b <= 1).sum()) / (len(a) + len(b)))
    # By hand: the two faces 2 apart are the farthest points, and no surface point is farther.
    assert a.max() == b.max() == 2.0 and m["hd95"] == 2.0
    assert 0 < m["surface_dice"] < 1 and (m["true_volume"], m["predicted_volume"]) == (512, 512)


def test_identical_masks_and_empty_ones_have_the_documented_values():
    cube = _cube()
    same = metrics.volume_metrics(cube, cube)
    assert (same["dice"], same["hd95"], same["assd"], same["surface_dice"]) == (1.0, 0.0, 0.0, 1.0)
    empty = np.zeros_like(cube)
    both = metrics.volume_metrics(empty, empty)
    assert (both["dice"], both["iou"], both["hd95"], both["assd"], both["surface_dice"]) == (1, 1, 0, 0, 1)
    missed = metrics.volume_metrics(empty, cube)
    diagonal = math.sqrt(23 ** 2 + 31 ** 2 + 31 ** 2)
    assert (missed["dice"], missed["surface_dice"]) == (0.0, 0.0)
    assert missed["hd95"] == missed["assd"] == pytest.approx(diagonal)
    assert metrics.volume_metrics(cube, empty)["hd95"] == pytest.approx(diagonal)


def test_single_voxels_are_their_distance_apart():
    a, b = np.zeros((5, 9, 9), bool), np.zeros((5, 9, 9), bool)
    a[2, 1, 1], b[2, 4, 5] = True, True  # 3 and 4 apart: 5
    m = metrics.volume_metrics(a, b, tolerance=4.9)
    assert (m["dice"], m["hd95"], m["assd"], m["surface_dice"]) == (0.0, 5.0, 5.0, 0.0)
    assert metrics.volume_metrics(a, b, tolerance=5.0)["surface_dice"] == 1.0


def test_lesion_detection_counts_components_in_3d():
    target = np.zeros((10, 20, 20), bool)
    target[1:3, 1:4, 1:4] = True       # lesion 1: found
    target[6:8, 10:14, 10:14] = True   # lesion 2: missed
    pred = np.zeros_like(target)
    pred[2:4, 3:5, 3:5] = True         # overlaps lesion 1 (diagonal contact counts too)
    pred[5, 18, 18] = True             # a false positive
    pred[9, 0, 0] = True               # another
    d = metrics.lesion_detection(pred, target)
    assert (d["lesions_tp"], d["lesions_fp"], d["lesions_fn"]) == (1, 2, 1)
    assert d["lesion_f1"] == pytest.approx(2 / (2 + 2 + 1))
    assert metrics.lesion_detection(np.zeros_like(target), np.zeros_like(target))["lesion_f1"] == 1.0


def test_slice_errors_and_intervals():
    target = np.zeros((4, 6, 6), bool)
    target[0, :2, :2] = True
    pred = np.zeros_like(target)
    pred[0, :2, :1] = True   # Dice 2*2/(4+2) on the lesion slice
    pred[2, 3, 3] = True     # a false positive on an empty slice
    e = metrics.slice_errors(pred, target)
    assert e == {"empty_slices": 3, "false_positive_slices": 1, "positive_slices": 1,
                 "positive_slice_dice": pytest.approx(4 / 6)}
    s = metrics.summarize([0.2, 0.4, 0.6, 0.8, float("nan")])
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.5) and s["median"] == pytest.approx(0.5)
    assert 0.2 <= s["ci_low"] < 0.5 < s["ci_high"] <= 0.8
    assert math.isnan(metrics.summarize([0.3])["ci_low"])
