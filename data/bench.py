"""Input-pipeline throughput: images/s of train_dataset (`python -m engine.bench_input` runs it)."""

from __future__ import annotations

import time

import numpy as np

from data import pipeline


def measure_throughput(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int = 16,
    image_size: int = 256,
    augment: pipeline.Augment | None,
    positive_fraction: float = 0.0,
    batches: int = 200,
    warmup: int = 10,
    seed: int = 0,
) -> dict:
    """Pulls batches from `train_dataset` as fast as possible and times them.

    Epochs are chained (epoch 0, 1, ...) until `warmup + batches` batches have
    been read; only the last `batches` are timed. Nothing consumes the batches,
    so this is the pipeline's ceiling, not a training step's.

    Args:
      images: uint8 [N, H, W, 3].
      masks: uint8 [N, H, W] in {0, 1}.
      batch_size: slices per batch.
      image_size: output side.
      augment: augmentation ranges, or None (the recipe's come from the caller: engine.config).
      positive_fraction: lesion-positive slices over-sampled to this fraction of each batch.
      batches: batches to time.
      warmup: batches read before timing starts (tracing, buffer fill).
      seed: pipeline seed.

    Returns:
      {"images_per_s", "batches", "seconds", "cpu_seconds_per_batch"}; the CPU
      time is the whole process's, so images_per_s / cores is what another
      process can squeeze out of this machine.

    Raises:
      ValueError: batches < 1 or warmup < 1, or fewer slices than one batch.
    """
    if batches < 1 or warmup < 1:  # timing starts after the first batch (tracing, buffer fill)
        raise ValueError(f"need batches >= 1 and warmup >= 1, got {batches}, {warmup}")
    seen, epoch = 0, 0
    start = cpu_start = None
    while seen < warmup + batches:
        ds = pipeline.train_dataset(
            images, masks, batch_size=batch_size, image_size=image_size, seed=seed, epoch=epoch,
            augment=augment, positive_fraction=positive_fraction,
        )
        for batch in ds:
            del batch  # tf.data hands over finished tensors
            seen += 1
            if seen == warmup:
                start, cpu_start = time.perf_counter(), time.process_time()
            if seen == warmup + batches:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    return {
        "images_per_s": batches * batch_size / seconds,
        "batches": batches,
        "seconds": seconds,
        "cpu_seconds_per_batch": (time.process_time() - cpu_start) / batches,
    }


if __name__ == "__main__":  # the command moved to engine, which holds the training recipe's flags
    import sys

    print("error: the input-pipeline benchmark is `python -m engine.bench_input --data_dir=DIR` "
          "(with a run's own flags: --image_size, --batch_size, ...)", file=sys.stderr)
    sys.exit(2)
