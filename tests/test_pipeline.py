"""Tests for the tf.data pipelines (data/pipeline.py)."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from data import pipeline

N, H = 40, 48  # slices, input side
THRESHOLD = 128  # mask = FLAIR channel > THRESHOLD
# The seed notebook's geometric augmentation.
GEO = pipeline.Augment(rotation_deg=0.2, shift=0.05, shear=0.05, zoom=0.05, hflip=True, vflip=True)


def _arrays(n=N, size=H, positive_every=1, seed=0):
    """Images whose mask is exactly `channel 1 > THRESHOLD`.

    Channel 0 holds the slice index (to identify slices after shuffling),
    channel 1 a smooth blob (gentle slope, so resampling moves values only a
    little), channel 2 noise. Slices not at multiples of positive_every get
    a dim blob and an empty mask.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = np.hypot((yy - cy) / rng.uniform(0.6, 1.2), xx - cx)
        peak = 220 if i % positive_every == 0 else 100
        images[i, ..., 1] = np.clip(peak - 9.0 * r, 0, 255).astype(np.uint8)
    images[..., 0] = np.arange(n, dtype=np.uint8)[:, None, None]
    images[..., 2] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    masks = (images[..., 1] > THRESHOLD).astype(np.uint8)
    return images, masks


def _collect(ds):
    batches = list(ds.as_numpy_iterator())
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _train(images, masks, **kw):
    args = dict(batch_size=8, image_size=32, seed=0, epoch=0, augment=GEO)
    args.update(kw)
    return pipeline.train_dataset(images, masks, **args)


def test_train_batches_have_fixed_shapes_and_unit_weights():
    images, masks = _arrays(n=43)
    ds = _train(images, masks, batch_size=8, image_size=32)
    spec = ds.element_spec
    assert spec["image"].shape == (8, 32, 32, 3) and spec["image"].dtype == tf.float32
    assert spec["mask"].shape == (8, 32, 32, 1) and spec["mask"].dtype == tf.float32
    assert spec["weight"].shape == (8,)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == pipeline.train_batches_per_epoch(43, 8) == 5  # remainder dropped
    for b in batches:
        assert b["image"].min() >= 0.0 and b["image"].max() <= 1.0
        np.testing.assert_array_equal(b["weight"], np.ones(8, np.float32))


def test_an_epoch_without_oversampling_is_a_shuffled_permutation():
    images, masks = _arrays()
    out = _collect(_train(images, masks, image_size=H, augment=None))
    ids = np.rint(out["image"][:, 0, 0, 0] * 255).astype(int)
    assert sorted(ids) == list(range(N))
    assert list(ids) != list(range(N))
    # Without augmentation a training batch is exactly the preprocessed slices.
    np.testing.assert_array_equal(out["image"], pipeline.preprocess(images[ids], H).numpy())
    np.testing.assert_array_equal(out["mask"], pipeline.resize_masks(masks[ids], H).numpy())


def test_eval_keeps_every_slice_in_order_and_pads_with_zero_weight():
    images, masks = _arrays(n=10)
    ds = pipeline.eval_dataset(images, masks, batch_size=4, image_size=32)
    assert ds.element_spec["image"].shape == (4, 32, 32, 3)
    out = _collect(ds)
    assert len(out["weight"]) == 12
    np.testing.assert_array_equal(out["weight"], [1.0] * 10 + [0.0] * 2)
    np.testing.assert_array_equal(out["image"][:10], pipeline.preprocess(images, 32).numpy())
    np.testing.assert_array_equal(out["mask"][:10], pipeline.resize_masks(masks, 32).numpy())


def test_preprocess_and_resize_masks():
    images, masks = _arrays(n=4)
    x = pipeline.preprocess(images, 24).numpy()
    m = pipeline.resize_masks(masks, 24).numpy()
    assert x.shape == (4, 24, 24, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert m.shape == (4, 24, 24, 1) and set(np.unique(m)) == {0.0, 1.0}
    np.testing.assert_allclose(pipeline.preprocess(images, H).numpy(), images / 255.0, atol=1e-6)
    # The mask still covers the same share of the slice after halving.
    np.testing.assert_allclose(m.mean(axis=(1, 2, 3)), masks.mean(axis=(1, 2)), atol=0.03)


def test_an_epoch_is_reproducible_and_epochs_and_seeds_differ():
    images, masks = _arrays()
    aug = dataclasses.replace(GEO, rotation_deg=10.0, brightness=0.1, contrast=0.1, gamma=0.1)
    a = _collect(_train(images, masks, augment=aug, epoch=3))
    b = _collect(_train(images, masks, augment=aug, epoch=3))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for other in (_collect(_train(images, masks, augment=aug, epoch=4)), _collect(_train(images, masks, augment=aug, seed=1, epoch=3))):
        assert not np.array_equal(a["image"], other["image"])


def test_skip_batches_resumes_on_the_same_batches():
    images, masks = _arrays()
    full = list(_train(images, masks, epoch=2).as_numpy_iterator())
    resumed = list(_train(images, masks, epoch=2, skip_batches=3).as_numpy_iterator())
    assert len(resumed) == len(full) - 3 == 2
    for got, want in zip(resumed, full[3:]):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert list(_train(images, masks, skip_batches=5).as_numpy_iterator()) == []
    with pytest.raises(ValueError, match="skip_batches"):
        _train(images, masks, skip_batches=6)


def test_several_epochs_in_one_dataset_are_the_epochs_one_after_another():
    images, masks = _arrays()
    together = list(_train(images, masks, epoch=2, skip_batches=3, epochs=3).as_numpy_iterator())
    apart = [b for e, skip in ((2, 3), (3, 0), (4, 0))
             for b in _train(images, masks, epoch=e, skip_batches=skip).as_numpy_iterator()]
    assert len(together) == len(apart) == 2 + 5 + 5
    for got, want in zip(together, apart):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ValueError, match="epochs"):
        _train(images, masks, epochs=0)


def test_augmentation_keeps_masks_binary_and_aligned():
    images, masks = _arrays()
    aug = dataclasses.replace(GEO, rotation_deg=30.0, shift=0.1, shear=0.1, zoom=0.1)
    out = _collect(_train(images, masks, image_size=H, augment=aug))
    plain = _collect(_train(images, masks, image_size=H, augment=None))
    assert set(np.unique(out["mask"])) == {0.0, 1.0}
    # The warp really moved things: the FLAIR channels differ.
    assert np.abs(out["image"][..., 1] - plain["image"][..., 1]).mean() > 0.02
    flair = out["image"][..., 1] * 255.0
    mask = out["mask"][..., 0] > 0.5
    # Where FLAIR is clearly on one side of the threshold the mask must agree;
    # right at the edge, bilinear vs nearest resampling may differ by a pixel.
    clear = np.abs(flair - THRESHOLD - 0.5) > 12.0
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(mask[clear], flair[clear] > THRESHOLD)
    assert (mask != (flair > THRESHOLD + 0.5)).mean() < 0.01


def test_intensity_augmentation_changes_images_not_masks():
    images, masks = _arrays()
    geo = GEO
    both = dataclasses.replace(GEO, brightness=0.2, contrast=0.2, gamma=0.2)
    a = _collect(_train(images, masks, augment=geo))
    b = _collect(_train(images, masks, augment=both))
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert np.abs(a["image"] - b["image"]).mean() > 0.01
    assert b["image"].min() >= 0.0 and b["image"].max() <= 1.0


def test_oversampling_raises_the_positive_fraction():
    images, masks = _arrays(positive_every=10)  # 4 of 40 slices positive

    def positives(**kw):
        out = _collect(_train(images, masks, image_size=H, augment=None, **kw))
        ids = np.rint(out["image"][:, 0, 0, 0] * 255).astype(int)
        return out["mask"].reshape(len(ids), -1).max(axis=1).sum(), ids

    count, _ = positives()
    assert count == 4
    count, ids = positives(positive_fraction=0.5)
    assert count == 20  # same epoch length, half of it positive
    assert set(ids[ids % 10 == 0]) == {0, 10, 20, 30}  # every positive slice is used
    with pytest.raises(ValueError, match="positive"):
        _train(images, masks * 0, positive_fraction=0.5)


def test_bad_arguments_are_rejected():
    images, masks = _arrays(n=4)
    with pytest.raises(ValueError, match="no full batch"):
        _train(images, masks, batch_size=8)
    with pytest.raises(ValueError, match="masks"):
        _train(images, masks[..., None], batch_size=2)
    with pytest.raises(ValueError, match="Augment.shift"):
        pipeline.Augment(shift=-0.1)


def test_missing_sequence_replaces_pre_and_post_contrast_by_flair():
    images, masks = _arrays()
    images[..., 0] = 0.1  # distinct channels, so a replaced one shows
    images[..., 2] = 0.9
    geo = _collect(_train(images, masks, augment=GEO))
    always = _collect(_train(images, masks, augment=dataclasses.replace(GEO, missing_sequence=1.0)))
    half = _collect(_train(images, masks, augment=dataclasses.replace(GEO, missing_sequence=0.5)))
    np.testing.assert_array_equal(always["image"][..., 0], always["image"][..., 1])
    np.testing.assert_array_equal(always["image"][..., 2], always["image"][..., 1])
    # Its own draws: FLAIR, the masks and the geometry stay exactly as without it.
    for out in (always, half):
        np.testing.assert_array_equal(out["image"][..., 1], geo["image"][..., 1])
        np.testing.assert_array_equal(out["mask"], geo["mask"])
    for channel in (0, 2):
        replaced = np.all(half["image"][..., channel] == half["image"][..., 1], axis=(1, 2))
        kept = np.all(half["image"][..., channel] == geo["image"][..., channel], axis=(1, 2))
        assert 0.2 < replaced.mean() < 0.8, replaced.mean()
        assert np.all(replaced | kept)
    with pytest.raises(ValueError, match="missing_sequence"):
        pipeline.Augment(missing_sequence=1.5)
