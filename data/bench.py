"""Input-pipeline throughput: `python -m data.bench` (images/s of train_dataset)."""

from __future__ import annotations

import json
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
      augment: augmentation ranges, or None.
      batches: batches to time.
      warmup: batches read before timing starts (tracing, buffer fill).
      seed: pipeline seed.

    Returns:
      {"images_per_s", "batches", "seconds", "cpu_seconds_per_batch"}; the CPU
      time is the whole process's, so images_per_s / cores is what another
      process can squeeze out of this machine.
    """
    if batches < 1 or warmup < 0:
        raise ValueError(f"need batches >= 1 and warmup >= 0, got {batches}, {warmup}")
    seen, epoch = 0, 0
    start = cpu_start = None
    while seen < warmup + batches:
        ds = pipeline.train_dataset(
            images, masks, batch_size=batch_size, image_size=image_size, seed=seed, epoch=epoch, augment=augment
        )
        for batch in ds:
            del batch  # tf.data hands over finished tensors
            seen += 1
            if seen == warmup:
                start, cpu_start = time.perf_counter(), time.process_time()
            if seen == warmup + batches:
                break
        epoch += 1
    if start is None:  # warmup == 0
        raise ValueError("warmup must be >= 1 so that timing starts after the first batch")
    seconds = time.perf_counter() - start
    return {
        "images_per_s": batches * batch_size / seconds,
        "batches": batches,
        "seconds": seconds,
        "cpu_seconds_per_batch": (time.process_time() - cpu_start) / batches,
    }


if __name__ == "__main__":
    from absl import app, flags

    from data import synthetic

    flags.DEFINE_integer("patients", 12, "Synthetic patients rendered in memory as the input.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 16, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("image_size", 256, "Output image side.", lower_bound=8)
    flags.DEFINE_integer("batches", 200, "Batches to time.", lower_bound=1)
    flags.DEFINE_integer("warmup", 10, "Batches read before timing.", lower_bound=1)
    flags.DEFINE_bool("augment", True, "Geometric augmentation (the seed recipe).")
    flags.DEFINE_float("intensity", 0.0, "Brightness, contrast and gamma range (0 = off).", lower_bound=0.0)
    FLAGS = flags.FLAGS

    def main(argv):
        del argv
        images, masks = synthetic.render_arrays(patients=FLAGS.patients, seed=0)
        # The engine's default augmentation (engine.config, the one place that holds it), with the
        # intensity ranges asked for.
        from engine.config import Config

        i = FLAGS.intensity
        aug = Config(augment=FLAGS.augment, brightness=i, contrast=i, gamma=i).augmentation
        result = measure_throughput(
            images,
            masks,
            batch_size=FLAGS.batch_size,
            image_size=FLAGS.image_size,
            augment=aug,
            batches=FLAGS.batches,
            warmup=FLAGS.warmup,
        )
        result.update(slices=len(images), batch_size=FLAGS.batch_size, image_size=FLAGS.image_size, augment=repr(aug))
        print(json.dumps(result))

    app.run(main)
