"""The compiled train and eval steps: pure math, no I/O, metric dicts out."""

from __future__ import annotations

import keras
import tensorflow as tf

from engine.fused_adam import FusedAdam
from models import losses

COUNT_KEYS = ("intersection", "predicted", "target")


def build_optimizer(learning_rate: float, precision: str) -> keras.optimizers.Optimizer:
    """Adam (its update fused into one kernel), wrapped in a dynamic loss-scale optimizer under float16.

    The learning rate lives in the optimizer's own variable, which the compiled
    step reads, so the loop can change it (plateau, warm-up) without a retrace.
    """
    optimizer = FusedAdam(learning_rate=learning_rate)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def inner_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    return getattr(optimizer, "inner_optimizer", optimizer)


def loss_scale(optimizer: keras.optimizers.Optimizer) -> tf.Tensor:
    """The current dynamic loss scale (1.0 without float16 loss scaling)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return tf.convert_to_tensor(optimizer.dynamic_scale)
    return tf.constant(1.0)


class Steps:
    """Builds the tf.functions for one model, optimizer and strategy.

    Each public function traces once per run: the batch is a dict of tensors of
    fixed shape and the number of steps per call is a tensor. `traces` counts
    Python traces so tests can assert exactly that.
    """

    def __init__(self, *, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                 strategy: tf.distribute.Strategy, global_batch: int, loss: losses.LossSpec,
                 jit_compile: bool, step: tf.Variable):
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.global_batch = global_batch
        self.loss = loss
        self.step = step
        self.traces = {"train": 0, "eval": 0}
        self._scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # XLA goes on the per-replica function, as Keras' own fit does, so the
        # cross-replica loop and the all-reduce stay outside the cluster.
        self._replica_train = tf.function(self._replica_train_step, jit_compile=jit_compile)
        self._replica_eval = tf.function(self._replica_eval_step, jit_compile=jit_compile)
        self.train = tf.function(self._train_loop)
        self.evaluate = tf.function(self._eval_one)

    def _per_example_loss(self, logits, masks):
        return losses.per_example_loss(logits, masks, self.loss)

    def _replica_train_step(self, batch):
        variables = self.model.trainable_variables
        iterations_before = tf.identity(inner_optimizer(self.optimizer).iterations)
        with tf.GradientTape() as tape:
            logits = self.model(batch["image"], training=True)
            per_example = self._per_example_loss(logits, batch["mask"])
            # Averaged over the global batch: the all-reduce sums replicas.
            loss = tf.reduce_sum(per_example * batch["weight"]) / self.global_batch
            scaled = self.optimizer.scale_loss(loss) if self._scaled else loss
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        applied = inner_optimizer(self.optimizer).iterations - iterations_before
        counts = losses.segmentation_counts(logits, batch["mask"], batch["weight"])
        return {
            "loss": loss,
            "skipped": tf.cast(1 - applied, tf.float32) / self.strategy.num_replicas_in_sync,
            **counts,
        }

    def _train_loop(self, iterator, num_steps):
        """Runs `num_steps` steps in one call; returns metric sums over them."""
        self.traces["train"] += 1
        totals = {k: tf.constant(0.0) for k in ("loss", "skipped", "nonfinite") + COUNT_KEYS}
        for _ in tf.range(num_steps):
            out = self._sum_replicas(self.strategy.run(self._replica_train, args=(next(iterator),)))
            finite = tf.math.is_finite(out["loss"])
            skipped = out["skipped"] > 0.5
            totals = {
                "loss": totals["loss"] + tf.where(finite, out["loss"], 0.0),
                "skipped": totals["skipped"] + tf.cast(skipped, tf.float32),
                # A non-finite loss that loss scaling did not absorb: the loop stops the run.
                "nonfinite": totals["nonfinite"] + tf.cast(
                    tf.logical_and(tf.logical_not(finite), tf.logical_not(skipped)), tf.float32),
                **{k: totals[k] + out[k] for k in COUNT_KEYS},
            }
            self.step.assign_add(1)
        # A finite loss can still leave non-finite weights or Adam moments (an overflowing
        # gradient): checked here, before the loop can save them, so the last checkpoint is good.
        state = self.model.weights + [v for v in self.optimizer.variables
                                      if tf.as_dtype(v.dtype).is_floating]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in state])
        totals["nonfinite"] += tf.cast(tf.logical_not(finite), tf.float32)
        return totals

    def _replica_eval_step(self, batch):
        logits = self.model(batch["image"], training=False)
        per_example = self._per_example_loss(logits, batch["mask"])
        counts = losses.segmentation_counts(logits, batch["mask"], batch["weight"])
        return {
            "loss_sum": tf.reduce_sum(per_example * batch["weight"]),
            "weight_sum": tf.reduce_sum(batch["weight"]),
            **counts,
        }

    def _eval_one(self, batch):
        """One eval batch (already distributed); returns sums to stream over the epoch."""
        self.traces["eval"] += 1
        return self._sum_replicas(self.strategy.run(self._replica_eval, args=(batch,)))

    def _sum_replicas(self, per_replica: dict) -> dict:
        """Sums scalar outputs over replicas in one collective (one per key would cost a
        collective each, which every worker of a cluster waits for)."""
        keys = sorted(per_replica)
        stacked = self.strategy.run(lambda *v: tf.stack([tf.cast(x, tf.float32) for x in v]),
                                    args=tuple(per_replica[k] for k in keys))
        total = self.strategy.reduce("SUM", stacked, axis=None)
        return {k: total[i] for i, k in enumerate(keys)}


def summarize_train(totals: dict, num_steps: int) -> dict[str, float]:
    """Turns summed train-step outputs into mean loss, Dice and IoU."""
    dice, iou = losses.dice_iou({k: totals[k] for k in COUNT_KEYS})
    return {"loss": totals["loss"] / max(num_steps, 1), "dice": dice, "iou": iou}


def summarize_eval(totals: dict) -> dict[str, float]:
    """Turns summed eval outputs into loss, Dice and IoU over the whole split."""
    dice, iou = losses.dice_iou({k: totals[k] for k in COUNT_KEYS})
    return {"loss": totals["loss_sum"] / max(totals["weight_sum"], 1.0), "dice": dice, "iou": iou}


def add_sums(a: dict | None, b: dict) -> dict:
    return dict(b) if a is None else {k: a[k] + b[k] for k in a}

