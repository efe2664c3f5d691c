"""The benchmark's baseline: the same model trained by Keras compile()/fit(), in turn with the engine."""

from __future__ import annotations

import keras
import tensorflow as tf

from engine import bench_timing
from engine import state as state_lib
from engine.bench_timing import Alternating, Timing
from engine.config import Config
from engine.runtime import Runtime
from models import losses

FIT = "fit"  # the baseline's name among the contenders


class _FitTimer(keras.callbacks.Callback):
    """Times each fit() execution from dispatch to the loss read back on the host.

    After each one, untimed, it adds the sample to `rounds` and runs one call of each of the
    other contenders there.
    """

    def __init__(self, per_call: int, rounds: Alternating):
        super().__init__()
        self.per_call, self.rounds = per_call, rounds
        self._start = (0.0, 0.0)

    def on_train_batch_begin(self, batch, logs=None):
        self._start = bench_timing.now()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # Keras already read the logs back; this makes sure of it.
        self.rounds.add(FIT, bench_timing.per_step(self._start, self.per_call))
        self.rounds.round()


class FitBaseline:
    """The identical model trained by Keras compile()/fit(): same optimizer, loss, precision, jit."""

    def __init__(self, config: Config, runtime: Runtime, source: keras.Model,
                 dataset: tf.data.Dataset):
        def loss(masks, logits):
            # The engine's per-example loss; Keras weights it and averages over the batch.
            return losses.per_example_loss(logits, masks, config.loss)

        self.per_call, self.batch = config.steps_per_execution, runtime.global_batch
        with runtime.strategy.scope():
            self.model = state_lib.build_model(config, runtime)
            self.model.set_weights(source.get_weights())
            # Stock Keras Adam, as a fit() user writes it; compile() wraps it in a
            # LossScaleOptimizer under mixed_float16, as the engine does.
            self.model.compile(
                optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
                loss=loss, jit_compile=runtime.jit_compile,
                steps_per_execution=config.steps_per_execution)
        self.dataset = dataset.map(lambda b: (b["image"], b["mask"], b["weight"]))

    def time_in_turn(self, rounds: Alternating) -> Timing:
        """One fit() of `rounds.rounds` executions, each followed by one round of the others.

        Fit's own loop drives the rounds, so that what is timed is fit as its users call it.

        Returns:
          The timing of fit's timed executions (its first traced and compiled).
        """
        # No strategy scope here: the model keeps the strategy it was built
        # under, and the engine's steps, called between fit's executions, must
        # see the same context they are called in elsewhere, or they would trace again.
        self.model.fit(self.dataset, epochs=1, steps_per_epoch=rounds.rounds * self.per_call,
                       verbose=0, shuffle=False, callbacks=[_FitTimer(self.per_call, rounds)])
        return rounds.timing(FIT, steps_per_call=self.per_call, batch=self.batch)
