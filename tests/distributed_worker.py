"""Trains a tiny U-Net a few steps under a given strategy and saves loss and weights (for test_distribute).

usage: python -m tests.distributed_worker OUT.npz STRATEGY CPU_DEVICES PER_REPLICA_BATCH STEPS [DTYPE]

DTYPE float64 runs the whole model and optimizer in float64 (the loss stays float32).
"""

from __future__ import annotations

import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from engine import runtime  # noqa: E402
from engine.state import TrainState  # noqa: E402
from engine.config import Config  # noqa: E402

GLOBAL_BATCH = 8


def batches(image_size: int, count: int) -> tf.data.Dataset:
    """The same fixed global batches in every process."""
    rng = np.random.default_rng(0)
    images = rng.random((count * GLOBAL_BATCH, image_size, image_size, 3), np.float32)
    masks = (images[..., 1:2] > 0.7).astype(np.float32)
    weights = np.ones(count * GLOBAL_BATCH, np.float32)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "mask": masks, "weight": weights})
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.batch(GLOBAL_BATCH, drop_remainder=True).with_options(options)


def main(out: str, strategy: str, cpu_devices: int, per_replica_batch: int, num_steps: int,
         dtype: str = "float32") -> None:
    config = Config(image_size=32, base_filters=4, depth=2, batch_size=per_replica_batch,
                    learning_rate=1e-2, precision="float32", jit_compile="false",
                    strategy=strategy, cpu_devices=cpu_devices, seed=3, deterministic=True)
    rt = runtime.resolve(config)
    assert rt.global_batch == GLOBAL_BATCH, rt.describe()
    # Every run uses the synchronized (Keras op-by-op) BatchNorm that mirrored runs need, so the
    # runs differ only in the strategy: the fused kernel one device would use rounds differently
    # (1e-6), which Adam amplifies past this comparison's tolerance. test_unet checks the fused
    # layer against Keras' own.
    rt = dataclasses.replace(rt, sync_batch_norm=True)
    if dtype == "float64":
        keras.mixed_precision.set_global_policy("float64")
    state = TrainState.build(config, rt)
    steps = state.steps(config, rt)
    iterator = iter(rt.strategy.experimental_distribute_dataset(batches(32, num_steps)))
    losses = [float(steps.train(iterator, tf.constant(1))["loss"]) for _ in range(num_steps)]
    weights = {f"w{i}": v.numpy() for i, v in enumerate(state.model.weights)}
    np.savez(out, losses=np.array(losses), replicas=rt.replicas, step=int(state.step.numpy()), **weights)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
         *sys.argv[6:7])
