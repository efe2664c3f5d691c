"""The benchmark's batches: device-resident synthetic ones (the step alone), or the real pipeline."""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from data import volume
from engine import inputs
from engine.config import Config
from engine.runtime import Runtime

log = logging.getLogger(__name__)

SYNTHETIC_BATCHES = 4  # distinct device-resident batches, cycled


def _synthetic_arrays(config: Config, batch: int, count: int) -> dict[str, np.ndarray]:
    """`count` batches of noise images, half with a bright disc lesion; float32 like the pipeline's."""
    rng = np.random.default_rng(config.seed)
    n, s = batch * count, config.image_size
    # As many channels as the model reads: pre-contrast, FLAIR, post-contrast and the neighbours'.
    images = rng.uniform(0.0, 0.6, (n, s, s, volume.channels(config.neighbours))).astype(np.float32)
    yy, xx = np.mgrid[:s, :s]
    cy, cx = rng.uniform(0.25 * s, 0.75 * s, (2, n, 1, 1))
    radius = rng.uniform(0.03 * s, 0.15 * s, (n, 1, 1)) * (np.arange(n) % 2 == 0)[:, None, None]
    masks = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2).astype(np.float32)[..., None]
    images[..., 1:2] += 0.4 * masks
    return {"image": images, "mask": masks, "weight": np.ones(n, np.float32)}


def synthetic_dataset(config: Config, batch: int) -> tf.data.Dataset:
    """A few precomputed batches of the pipeline's shapes, cached and repeated: the step alone.

    On a GPU the strategy's distributed iterator prefetches them to the device,
    so the copy overlaps the previous step.

    Args:
      config: image size and seed.
      batch: the global batch size.

    Returns:
      An endless dataset of {"image", "mask", "weight"} batches.
    """
    arrays = _synthetic_arrays(config, batch, SYNTHETIC_BATCHES)
    return tf.data.Dataset.from_tensor_slices(arrays).batch(batch, drop_remainder=True).cache().repeat()


def pipeline_datasets(config: Config, runtime: Runtime, eval_batch: int) -> tuple:
    """The real input pipeline (decode cache, augmentation, sampling) over every slice, repeated.

    Args:
      config: data, augmentation and sampling flags.
      runtime: gives the global batch.
      eval_batch: the global eval batch size.

    Returns:
      (a function that makes the training dataset, so that engine and fit each
      get their own with the same batches; the evaluation dataset).

    Raises:
      DataError: a problem in the data, or fewer slices than one batch.
    """
    from data import pipeline

    data = inputs.model_data(inputs.load_dataset(config), config)  # standardised, with neighbours
    pipeline.steps_per_epoch(len(data.records), runtime.global_batch, what=config.data_dir)
    augment = config.augmentation

    def train_ds() -> tf.data.Dataset:
        # Epoch 0 repeated: the same work per batch as any epoch, and identical for engine and fit.
        return pipeline.train_dataset(
            data.images, data.masks, batch_size=runtime.global_batch, image_size=config.image_size,
            seed=config.seed, epoch=0, augment=augment,
            positive_fraction=config.positive_fraction).repeat()

    eval_ds = pipeline.eval_dataset(data.images, data.masks, batch_size=eval_batch,
                                    image_size=config.image_size)
    log.info(f"Input pipeline over {len(data.records)} slices from {config.data_dir} "
        f"(augmentation {'on' if augment else 'off'})")
    return train_ds, eval_ds


def datasets(config: Config, runtime: Runtime, eval_batch: int) -> tuple:
    """--benchmark_data's batches: (a function making the training dataset, the eval dataset).

    Raises:
      DataError: with --benchmark_data=pipeline, a problem in the data.
    """
    if config.benchmark_data == "pipeline":
        return pipeline_datasets(config, runtime, eval_batch)
    return (lambda: synthetic_dataset(config, runtime.global_batch)), synthetic_dataset(config, eval_batch)
