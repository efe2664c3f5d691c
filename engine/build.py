"""Builds what every mode needs from the config: the dataset, the model and the training state."""

from __future__ import annotations

import dataclasses
import logging
import os

import keras
import tensorflow as tf

from data import dataset as lgg_dataset
from data import lgg, pipeline, synthetic
from engine import steps as steps_lib
from engine.config import Config
from engine.runtime import Runtime
from models import unet

FINAL_MODEL = "final_model.keras"


def load_dataset(config: Config, log=logging.info) -> lgg_dataset.LggDataset:
    """Loads and validates the data, first generating the synthetic set if asked and missing.

    Raises:
      lgg.DataError: naming every bad file, or where it looked for patients.
    """
    if config.synthetic_patients:
        try:
            lgg.find_patient_dirs(config.data_dir)
        except lgg.DataError:
            log(f"No patients under {config.data_dir}: writing {config.synthetic_patients} "
                f"synthetic patients there (--synthetic_patients).")
            try:
                synthetic.write_dataset(config.data_dir, patients=config.synthetic_patients,
                                        seed=config.seed)
            except (FileExistsError, OSError) as e:
                raise lgg.DataError(
                    f"--synthetic_patients: cannot write the synthetic dataset into "
                    f"{config.data_dir} ({e}); point --data_dir at an empty or new folder") from None
    cache_dir = config.cache_dir or lgg_dataset.default_cache_dir()
    return lgg_dataset.load(config.data_dir, skip_bad_slices=config.skip_bad_slices,
                            cache_dir=cache_dir, log=log)


def build_model(config: Config, runtime: Runtime | None = None) -> keras.Model:
    return unet.build_unet(
        image_size=config.image_size, base_filters=config.base_filters, depth=config.depth,
        dropout=config.dropout, batch_norm=config.batch_norm,
        sync_batch_norm=bool(runtime and runtime.sync_batch_norm))


@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint holds as variables. `step` is the run's only clock."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable

    def checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step)

    @property
    def learning_rate(self) -> float:
        return float(steps_lib.inner_optimizer(self.optimizer).learning_rate.numpy())

    def set_learning_rate(self, value: float) -> None:
        steps_lib.inner_optimizer(self.optimizer).learning_rate.assign(value)


def build_train_state(config: Config, runtime: Runtime) -> TrainState:
    """Creates the model, optimizer (with its slots) and step under the strategy's scope.

    The optimizer is built eagerly so that a checkpoint restore finds every slot
    variable in place, and restoring is just reading values.
    """
    with runtime.strategy.scope():
        model = build_model(config, runtime)
        optimizer = steps_lib.build_optimizer(config.learning_rate, runtime.precision)
        optimizer.build(model.trainable_variables)
        # optimizer.iterations does not advance on float16-skipped steps, so the
        # clock that places the run in its data is a variable of its own.
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    return TrainState(model=model, optimizer=optimizer, step=step)


def make_steps(config: Config, runtime: Runtime, state: TrainState) -> steps_lib.Steps:
    return steps_lib.Steps(
        model=state.model, optimizer=state.optimizer, strategy=runtime.strategy,
        global_batch=runtime.global_batch, jit_compile=runtime.jit_compile, step=state.step,
        loss=config.loss)


def save_final_model(model: keras.Model, run_dir: str) -> str:
    """Writes the model atomically, so a crash never leaves a half-written final model."""
    path = os.path.join(run_dir, FINAL_MODEL)
    tmp = os.path.join(run_dir, f".tmp-{os.getpid()}-{FINAL_MODEL}")
    model.save(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_trained_model(config: Config, runtime: Runtime | None = None, log=logging.info) -> keras.Model:
    """The model evaluate, predict and export use: --checkpoint if given, else the run's final model.

    --checkpoint may name a run directory, its checkpoints folder or one
    checkpoint; weights are read into a model built from the current config.

    Raises:
      CheckpointError: nothing loadable where the flags point.
    """
    from engine import checkpoint as checkpoint_lib

    if config.checkpoint:
        model = build_model(config)
        info = checkpoint_lib.restore(tf.train.Checkpoint(model=model), config.checkpoint,
                                      partial=True)
        log(f"Model weights from checkpoint {info.path}")
        return model
    path = os.path.join(config.run_dir, FINAL_MODEL)
    if not os.path.exists(path):
        raise checkpoint_lib.CheckpointError(
            f"{path} does not exist: train first (--mode=train with the same --run_name/--model_dir), "
            f"or name a checkpoint with --checkpoint")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # A damaged file: name it rather than show Keras' internals.
        raise checkpoint_lib.CheckpointError(f"{path} could not be loaded ({type(e).__name__}: {e})") from None
    log(f"Model from {path}")
    return model
