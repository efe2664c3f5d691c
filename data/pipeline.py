"""tf.data pipelines: shuffling, joint augmentation, resizing, fixed-shape batches."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from data.dataset import class_problem
from data.lgg import DataError


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random augmentation ranges; every draw is uniform in [-range, +range].

    Every range defaults to off: `Augment()` changes nothing. The training recipe's values come
    from engine.config.Config, the one place that holds them.

    The geometric part covers the seed notebook's Keras recipe and is applied to
    image and mask together, about the image centre. Units:
      rotation_deg: degrees.
      shift: fraction of the width (x) and height (y).
      shear: shear factor k in x' = x + k * y (Keras took degrees here; a factor
        of 0.05 is about 2.9 degrees).
      zoom: fractional scale, drawn separately for x and y as Keras does.
      hflip, vflip: flip left-right / top-bottom with probability 1/2.
      brightness: added to the [0, 1] intensities.
      contrast: fractional change of the spread about each image's mean.
      gamma: log of the exponent, so 0.2 gives exponents in [e^-0.2, e^0.2].
      missing_sequence: probability that the pre-contrast (channel 0) and, independently, the
        post-contrast (channel 2) image is replaced by FLAIR (channel 1). The dataset fills a
        patient's missing sequence with FLAIR; a model that never saw that in training can miss
        such a patient's lesion entirely.
    """

    rotation_deg: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0
    hflip: bool = False
    vflip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    missing_sequence: float = 0.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "float" and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Augment.{field.name} must be a finite number >= 0, got {value!r}")
        if self.zoom >= 1:
            raise ValueError(f"Augment.zoom must be < 1, got {self.zoom!r}")
        if self.missing_sequence > 1:
            raise ValueError(f"Augment.missing_sequence must be <= 1, got {self.missing_sequence!r}")


def preprocess(images, image_size: int) -> tf.Tensor:
    """The one normalisation used by training, evaluation, prediction and export.

    Args:
      images: uint8 [B, H, W, 3], any H and W.
      image_size: output side S.

    Returns:
      float32 [B, S, S, 3] in [0, 1], resized bilinearly (half-pixel centres).
    """
    images = tf.cast(images, tf.float32) * (1.0 / 255.0)
    if tuple(images.shape[1:3]) != (image_size, image_size):
        # Bilinear at the same size samples exactly the pixel centres, so
        # skipping it changes nothing.
        images = tf.image.resize(images, [image_size, image_size], method="bilinear")
    return images


def resize_masks(masks, image_size: int) -> tf.Tensor:
    """Resizes binary masks the way `preprocess` resizes images.

    Bilinear, then thresholded at 0.5, so the mask edge lands where the
    resized image edge does.

    Args:
      masks: uint8 [B, H, W] with values {0, 1}.
      image_size: output side S.

    Returns:
      float32 [B, S, S, 1] with values {0, 1}.
    """
    masks = tf.cast(masks, tf.float32)[..., None]
    if tuple(masks.shape[1:3]) != (image_size, image_size):
        masks = tf.image.resize(masks, [image_size, image_size], method="bilinear")
        masks = tf.cast(masks >= 0.5, tf.float32)
    return masks


def train_batches_per_epoch(num_slices: int, batch_size: int) -> int:
    """Batches in one training epoch (the remainder is dropped).

    Raises:
      ValueError: num_slices < 0 or batch_size < 1.
    """
    if num_slices < 0 or batch_size < 1:
        raise ValueError(f"need num_slices >= 0 and batch_size >= 1, got {num_slices}, {batch_size}")
    return num_slices // batch_size


def steps_per_epoch(num_slices: int, global_batch: int, *, what: str) -> int:
    """Training steps in one epoch of `what`'s slices, refusing a set smaller than one batch.

    Raises:
      DataError: fewer slices than one global batch; the message names `what` and the fix.
    """
    steps = train_batches_per_epoch(num_slices, global_batch)
    if steps == 0:
        raise DataError(f"{what} has {num_slices} slices, fewer than one global batch of "
                        f"{global_batch}; lower --batch_size or add patients")
    return steps


def _epoch_order(positive, num_slices: int, *, seed: int, epoch: int, positive_fraction: float) -> np.ndarray:
    """The slice indices of one epoch, in order: a permutation, or a resample.

    With positive_fraction p > 0 the epoch keeps its length N but holds
    round(p * N) lesion-positive slices: each class is cycled through fresh
    permutations as often as needed, then everything is shuffled together.
    """
    rng = np.random.default_rng([seed, epoch])
    if positive_fraction <= 0:
        return rng.permutation(num_slices)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    n_pos = int(round(positive_fraction * num_slices))
    problem = class_problem(len(pos), num_slices, positive_fraction)
    if problem:
        raise ValueError(problem)

    def cycle(indices, count):
        reps = -(-count // len(indices)) if count else 0
        return np.concatenate([rng.permutation(indices) for _ in range(reps)] + [indices[:0]])[:count]

    return rng.permutation(np.concatenate([cycle(pos, n_pos), cycle(neg, num_slices - n_pos)]))


def _augment_key(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit key for the stateless augmentation draws of an epoch."""
    return int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _transforms(draws, size: int, aug: Augment) -> tf.Tensor:
    """Per-image projective transforms (output pixel -> input pixel), [B, 8].

    draws: uniform [B, 8] in [0, 1): rotation, shift x/y, shear, zoom x/y,
    hflip, vflip.
    """
    u = draws * 2.0 - 1.0  # [-1, 1)
    angle = u[:, 0] * (aug.rotation_deg * math.pi / 180.0)
    tx, ty = u[:, 1] * (aug.shift * size), u[:, 2] * (aug.shift * size)
    shear = u[:, 3] * aug.shear
    zx, zy = 1.0 + u[:, 4] * aug.zoom, 1.0 + u[:, 5] * aug.zoom
    fx = tf.where(draws[:, 6] < 0.5, -1.0, 1.0) if aug.hflip else tf.ones_like(zx)
    fy = tf.where(draws[:, 7] < 0.5, -1.0, 1.0) if aug.vflip else tf.ones_like(zy)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Input offset from the centre = R(angle) @ Shear @ Zoom @ Flip @ output
    # offset + shift. This samples the output->input map the op takes
    # directly; for these small symmetric ranges its inverse is distributed
    # practically the same.
    a00, a01 = cos * zx * fx, (cos * shear - sin) * zy * fy
    a10, a11 = sin * zx * fx, (sin * shear + cos) * zy * fy
    c = (size - 1) / 2.0
    a02 = c + tx - a00 * c - a01 * c
    a12 = c + ty - a10 * c - a11 * c
    zero = tf.zeros_like(a00)
    return tf.stack([a00, a01, a02, a10, a11, a12, zero, zero], axis=1)


def _warp(images, transforms, interpolation: str):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation=interpolation,
        fill_mode="NEAREST",
    )


def _augment_batch(images, masks, key, batch, aug: Augment):
    """Joint geometric (and optional intensity) augmentation of one batch.

    Each image gets its own transform; the whole batch is warped by one
    ImageProjectiveTransformV3 call for the images (bilinear) and one for the
    masks (nearest, so they stay exactly binary), both with the same
    transforms and nearest-edge fill, so the masks stay aligned. Nearest for
    the mask picks the source pixel bilinear weights most, so it equals the
    bilinear mask thresholded at 0.5 except where corners meet, and warping
    one channel nearest costs a sixth of four channels bilinear.

    Args:
      images: float32 [B, S, S, 3] in [0, 1].
      masks: float32 [B, S, S, 1] in {0, 1}.
      key: int64 scalar, the epoch's augmentation key.
      batch: int64 scalar, the batch's index in the epoch.
      aug: the ranges.

    Returns:
      (images float32 [B, S, S, 3] in [0, 1], masks float32 [B, S, S, 1] in {0, 1}).
    """
    seed = tf.stack([key, tf.cast(batch, tf.int64)])
    draws = tf.random.stateless_uniform([tf.shape(images)[0], 11], seed=seed)
    transforms = _transforms(draws[:, :8], images.shape[1], aug)
    images = _warp(images, transforms, "BILINEAR")
    masks = _warp(masks, transforms, "NEAREST")
    if aug.missing_sequence:
        images = _drop_sequences(images, seed, aug.missing_sequence)
    u = draws[:, 8:, None, None, None] * 2.0 - 1.0  # [B, 3, 1, 1, 1]: gamma, contrast, brightness
    if aug.gamma:
        # exp(g * log x) is three times cheaper than pow on CPU.
        images = tf.exp(tf.math.log(tf.maximum(images, 1e-6)) * tf.exp(u[:, 0] * aug.gamma))
    if aug.contrast:
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = (images - mean) * (1.0 + u[:, 1] * aug.contrast) + mean
    if aug.brightness:
        images = images + u[:, 2] * aug.brightness
    if aug.gamma or aug.contrast or aug.brightness:
        images = tf.clip_by_value(images, 0.0, 1.0)
    return images, masks


def _drop_sequences(images, seed, probability: float):
    """Replaces channel 0 and, independently, channel 2 by FLAIR (channel 1) with `probability`."""
    # Draws of their own (the seed's key with its lowest bit flipped), so that turning this on
    # leaves every other draw of the batch as it was.
    own_seed = tf.stack([tf.bitwise.bitwise_xor(seed[0], tf.constant(1, tf.int64)), seed[1]])
    dropped = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 2], seed=own_seed) < probability
    pre, flair, post = tf.unstack(images[..., :3], axis=-1)
    pre = tf.where(dropped[..., 0], flair, pre)
    post = tf.where(dropped[..., 1], flair, post)
    # Channels past the third are neighbouring slices' FLAIR (2.5D): never replaced.
    return tf.concat([tf.stack([pre, flair, post], axis=-1), images[..., 3:]], axis=-1)


def _check_arrays(images: np.ndarray, masks: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] < 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C >= 3], got {images.dtype} {images.shape}")
    if masks.shape != images.shape[:3] or masks.dtype != np.uint8:
        raise ValueError(f"masks must be uint8 {images.shape[:3]}, got {masks.dtype} {masks.shape}")


def _gather(images: np.ndarray, masks: np.ndarray, indices, batch_size: int):
    """Batches of slices by index, read straight from the numpy arrays.

    One Python call per batch (not per image); the arrays are not copied into
    the graph, which would double the memory and hit the 2 GB graph limit.
    """

    def take(idx):
        return images[idx], masks[idx]

    img, msk = tf.numpy_function(take, [indices], [tf.uint8, tf.uint8], stateful=False)
    img.set_shape((batch_size,) + images.shape[1:])
    msk.set_shape((batch_size,) + masks.shape[1:])
    return img, msk


def _shard_by_data(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Under several workers, each takes its replicas' part of every global batch (the batches
    are arrays in memory, not files, so there is nothing to shard by file)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def train_dataset(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    epoch: int,
    augment: Augment | None,
    positive_fraction: float = 0.0,
    skip_batches: int = 0,
    epochs: int = 1,
) -> tf.data.Dataset:
    """Training epochs of augmented, fixed-shape batches, from `epoch` on.

    Everything random is a pure function of (seed, epoch): the order of the
    slices and each batch's augmentation (keyed by its index in the epoch), so
    any epoch can be replayed exactly, and `skip_batches=k` yields the same
    batches as the full epoch minus its first k.

    A run reads all its epochs from one dataset (`epochs`), so one iterator: destroying an
    iterator waits for its tf.data autotuning thread, which can sleep for seconds (up to
    half an epoch's time was lost to that at every epoch end).

    Args:
      images: uint8 [N, H, W, 3].
      masks: uint8 [N, H, W] with values {0, 1}.
      batch_size: slices per batch; the last partial batch is dropped.
      image_size: output side S.
      seed: run seed.
      epoch: epoch number (0-based).
      augment: augmentation ranges, or None for none.
      positive_fraction: if > 0, the share of each epoch's slices that are
        lesion-positive (resampled; the epoch keeps N slices).
      skip_batches: batches to skip at the start of the first epoch (mid-epoch resume).
      epochs: how many epochs, one after the other: `epoch`, `epoch + 1`, ...

    Returns:
      A dataset of {"image": float32 [B,S,S,3], "mask": float32 [B,S,S,1],
      "weight": float32 [B] (all 1)}.

    Raises:
      ValueError: bad shapes or arguments, fewer slices than batch_size, or
        positive_fraction asking for a class that is absent.
    """
    _check_arrays(images, masks)
    if seed < 0 or epoch < 0 or epochs < 1:
        raise ValueError(f"seed and epoch must be >= 0 and epochs >= 1, got {seed}, {epoch}, {epochs}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    num_batches = train_batches_per_epoch(len(images), batch_size)
    if num_batches == 0:
        raise ValueError(f"{len(images)} slices make no full batch of {batch_size}")
    if not 0 <= skip_batches <= num_batches:
        raise ValueError(f"skip_batches must be in [0, {num_batches}], got {skip_batches}")

    positive = masks.reshape(len(masks), -1).max(axis=1) > 0 if positive_fraction > 0 else None
    orders, batches, keys = [], [], []
    for e in range(epoch, epoch + epochs):
        order = _epoch_order(positive, len(images), seed=seed, epoch=e, positive_fraction=positive_fraction)
        first = skip_batches if e == epoch else 0
        orders.append(order[: num_batches * batch_size].reshape(num_batches, batch_size)[first:])
        batches.append(np.arange(first, num_batches, dtype=np.int64))
        keys.append(np.full(num_batches - first, _augment_key(seed, e), np.int64))

    def load(indices, batch, key):
        img, msk = _gather(images, masks, indices, batch_size)
        img, msk = preprocess(img, image_size), resize_masks(msk, image_size)
        if augment is not None:
            img, msk = _augment_batch(img, msk, key, batch, augment)
        return {"image": img, "mask": msk, "weight": tf.ones([batch_size], tf.float32)}

    ds = tf.data.Dataset.from_tensor_slices(tuple(np.concatenate(a) for a in (orders, batches, keys)))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def eval_dataset(images: np.ndarray, masks: np.ndarray, *, batch_size: int, image_size: int) -> tf.data.Dataset:
    """Every slice once, in order, without augmentation.

    The last batch is padded to full size by repeating slice 0 with weight 0, so
    every batch has the same shape and padded slices count in no metric.

    Args:
      images: uint8 [N, H, W, 3].
      masks: uint8 [N, H, W] with values {0, 1}.
      batch_size: slices per batch.
      image_size: output side S.

    Returns:
      A dataset of {"image", "mask", "weight"} batches as in `train_dataset`,
      ceil(N / batch_size) of them.

    Raises:
      ValueError: bad shapes, no slices, or batch_size < 1.
    """
    _check_arrays(images, masks)
    if batch_size < 1 or len(images) == 0:
        raise ValueError(f"need batch_size >= 1 and at least one slice, got {batch_size}, {len(images)}")
    num_batches = -(-len(images) // batch_size)
    order = np.zeros(num_batches * batch_size, np.int64)
    order[: len(images)] = np.arange(len(images))
    weight = (np.arange(len(order)) < len(images)).astype(np.float32)

    def load(indices, w):
        img, msk = _gather(images, masks, indices, batch_size)
        return {"image": preprocess(img, image_size), "mask": resize_masks(msk, image_size), "weight": w}

    ds = tf.data.Dataset.from_tensor_slices((order.reshape(num_batches, batch_size), weight.reshape(num_batches, batch_size)))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _shard_by_data(ds.prefetch(tf.data.AUTOTUNE))
