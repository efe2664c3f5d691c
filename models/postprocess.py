"""Post-processing of binary lesion predictions: drop small 2D components, keep the largest 3D one."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Full connectivity (8 neighbours in 2D, 26 in 3D), as skimage.measure.label's default that
# Buda et al.'s largest-connected-component step uses: a diagonal touch joins two regions.
_STRUCTURE_2D = np.ones((3, 3), bool)
_STRUCTURE_3D = np.ones((3, 3, 3), bool)


def _check_stack(name: str, masks) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"{name} must be a [slices, height, width] array, got shape {masks.shape}")
    return masks.astype(bool, copy=False)


def remove_small_components(masks, min_size: int) -> np.ndarray:
    """Removes, slice by slice, predicted 2D components with fewer than `min_size` pixels.

    Args:
      masks: boolean-like [N, H, W] predictions (N slices, treated independently).
      min_size: smallest component kept, in pixels; 0 or 1 keeps everything.

    Returns:
      A new boolean [N, H, W] array.

    Raises:
      ValueError: masks is not 3-dimensional, or min_size is negative.
    """
    masks = _check_stack("masks", masks)
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    out = masks.copy()
    if min_size <= 1:
        return out
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        labels, count = ndimage.label(mask, structure=_STRUCTURE_2D)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        small = sizes < min_size
        small[0] = False  # background is not a component
        out[i][small[labels]] = False
    return out


def remove_small_volumes(volume, min_voxels: int) -> np.ndarray:
    """Removes predicted 3D components (26-connected) with fewer than `min_voxels` voxels.

    Softer than keeping the largest component: every lesion big enough stays, so a patient with
    a false-positive blob bigger than its lesion does not lose the lesion.

    Raises:
      ValueError: volume is not 3-dimensional, or min_voxels is negative.
    """
    volume = _check_stack("volume", volume)
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0, got {min_voxels}")
    if min_voxels <= 1 or not volume.any():
        return volume.copy()
    labels, count = ndimage.label(volume, structure=_STRUCTURE_3D)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def keep_largest_component(volume) -> np.ndarray:
    """Keeps only the largest 3D connected component of one patient's stacked slices.

    Buda et al. post-process each volume this way: a lower-grade glioma is one
    connected lesion, so smaller islands are taken as false positives. Ties go to
    the component found first in scan order (lowest slice, row, column).

    Args:
      volume: boolean-like [D, H, W] predictions of one patient, slices in order.

    Returns:
      A new boolean [D, H, W] array; all False if the volume is empty.

    Raises:
      ValueError: volume is not 3-dimensional.
    """
    volume = _check_stack("volume", volume)
    if not volume.any():
        return volume.copy()
    labels, count = ndimage.label(volume, structure=_STRUCTURE_3D)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def postprocess_volume(volume, *, min_component_size: int = 0, min_component_voxels: int = 0,
                       keep_largest: bool = False) -> np.ndarray:
    """Applies the configured steps to one patient's volume: small 2D components, small 3D
    components, then the largest 3D component.

    Args:
      volume: boolean-like [D, H, W] predictions of one patient.
      min_component_size: remove 2D components smaller than this (0: off).
      min_component_voxels: remove 3D components smaller than this (0: off).
      keep_largest: then keep only the largest 3D component.

    Returns:
      A new boolean [D, H, W] array.

    Raises:
      ValueError: volume is not 3-dimensional, or min_component_size is negative.
    """
    out = remove_small_volumes(remove_small_components(volume, min_component_size), min_component_voxels)
    if keep_largest:
        out = keep_largest_component(out)
    return out
