"""Builds what every mode needs from the config: the data and its split, the model, the training state."""

from __future__ import annotations

import dataclasses
import logging
import os

import keras
import tensorflow as tf

from data import dataset as lgg_dataset
from data import lgg, synthetic, volume
from engine import checkpoint as checkpoint_lib
from engine import inference
from engine import steps as steps_lib
from engine.config import Config
from engine.rundir import FINAL_MODEL, RunDir
from engine.runtime import Runtime
from models import unet

log = logging.getLogger(__name__)


def load_dataset(config: Config) -> lgg_dataset.LggDataset:
    """Loads and validates the data, first generating the synthetic set if asked and missing.

    Raises:
      lgg.DataError: naming every bad file, or where it looked for patients.
    """
    if config.synthetic_patients:
        try:
            lgg.find_patient_dirs(config.data_dir)
        except lgg.DataError:
            write_synthetic(config.data_dir, patients=config.synthetic_patients, seed=config.seed)
    cache_dir = (config.cache_dir or lgg_dataset.default_cache_dir()) if config.decode_cache else None
    return lgg_dataset.load(config.data_dir, skip_bad_slices=config.skip_bad_slices,
                            cache_dir=cache_dir)


def write_synthetic(data_dir: str, *, patients: int, seed: int) -> None:
    """Writes the synthetic set for --synthetic_patients, into a missing or empty folder only:
    a folder with anything in it may be the user's data in a layout the loader missed.

    Raises:
      lgg.DataError: the folder is not empty, or cannot be written.
    """
    if os.path.isdir(data_dir) and os.listdir(data_dir):
        raise lgg.DataError(
            f"--synthetic_patients: {data_dir} holds no patient folders brainseg can read, but is "
            f"not empty ({', '.join(sorted(os.listdir(data_dir))[:3])}, ...); synthetic data is only "
            "written into a missing or empty folder. Point --data_dir at the kaggle_3m folder, or "
            "at a new folder for the synthetic set")
    log.info(f"No patients under {data_dir}: writing {patients} synthetic patients there "
             f"(--synthetic_patients).")
    try:
        synthetic.write_dataset(data_dir, patients=patients, seed=seed)
    except OSError as e:
        raise lgg.DataError(f"--synthetic_patients: cannot write the synthetic dataset into "
                            f"{data_dir} ({e.strerror or e}); point --data_dir at an empty or new "
                            "folder") from None


@dataclasses.dataclass(frozen=True)
class SplitData:
    """The loaded dataset and its patient split; `part(name)` is one split's slices."""

    dataset: lgg_dataset.LggDataset
    split: dict[str, list[str]]

    def part(self, name: str) -> lgg_dataset.LggDataset:
        return self.dataset.subset(self.split[name])


def load_split(config: Config, run: RunDir, *, create: bool) -> SplitData:
    """The one way any mode gets its data: the dataset, and the run's split of it.

    Args:
      config: data flags, and the split flags used when the run has no split.json yet.
      run: the run directory holding (or about to hold) split.json.
      create: True for training, which makes and records the split; False for readers
        (evaluate), which need a trained run's split.json.

    Raises:
      lgg.DataError: bad data, a split.json that does not fit it, or none where one is needed.
    """
    dataset = load_dataset(config)
    split = run.load_or_make_split(dataset, val_fraction=config.val_fraction,
                                   test_fraction=config.test_fraction, seed=config.seed,
                                   num_folds=config.num_folds, fold=config.fold, create=create)
    return SplitData(dataset, split)


def model_data(dataset: lgg_dataset.LggDataset, config: Config) -> lgg_dataset.LggDataset:
    """The same slices with their images as the model reads them (data.volume.model_inputs)."""
    images = volume.prepare(dataset.images, [r.patient for r in dataset.records],
                            normalize=config.normalize, neighbours=config.neighbours)
    return lgg_dataset.LggDataset(dataset.records, images, dataset.masks)


def build_model(config: Config, runtime: Runtime | None = None) -> keras.Model:
    return unet.build_unet(
        image_size=config.image_size, base_filters=config.base_filters, depth=config.depth,
        dropout=config.dropout, batch_norm=config.batch_norm,
        in_channels=volume.channels(config.neighbours),
        sync_batch_norm=bool(runtime and runtime.sync_batch_norm))


@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint holds as variables. `step` is the run's only clock."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable

    def checkpoint(self, *, loss_scale: bool = True) -> tf.train.Checkpoint:
        """The variables of a checkpoint: the model, Adam, the step, and float16's loss scale.

        Adam is saved under its own name whatever the precision, and the loss scale (if any)
        beside it, so that a run resumes under another --precision: restores ask for
        loss_scale=False, then `read_loss_scale`, and a float32 run continued under
        mixed_float16 starts with a fresh scale.
        """
        parts = dict(model=self.model, optimizer=steps_lib.inner_optimizer(self.optimizer),
                     step=self.step)
        if loss_scale and isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            parts["loss_scale"] = self._loss_scale()
        return tf.train.Checkpoint(**parts)

    def read_loss_scale(self, info) -> None:
        """Reads the float16 loss scale of a checkpoint, where it has one."""
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            checkpoint_lib.restore(tf.train.Checkpoint(loss_scale=self._loss_scale()), info, partial=True)

    def _loss_scale(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(scale=self.optimizer.dynamic_scale,
                                   counter=self.optimizer.step_counter)

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


def save_final_model(model: keras.Model, run: RunDir) -> str | None:
    """Writes the model atomically, so a crash never leaves a half-written final model."""
    return run.write(FINAL_MODEL, lambda tmp: model.save(tmp))


def segmenter(config: Config) -> inference.Segmenter:
    """The inference a reading mode applies (evaluate, predict, export).

    The run's own, as training recorded it in inference.json (its members, model inputs, TTA,
    threshold and post-processing), with --tta and the post-processing flags added on top; or,
    with --checkpoint, that one model; or, for a run trained before inference.json existed, its
    final model with the flags' settings.

    Raises:
      CheckpointError: nothing loadable where the flags point.
    """
    recorded = inference.read_spec(config.run_dir)
    spec = recorded or inference.InferenceSpec(normalize=config.normalize, neighbours=config.neighbours,
                                               chosen_on="flags")
    extra = dataclasses.replace(
        spec, tta=spec.tta or config.tta,
        min_component_size=max(spec.min_component_size, config.min_component_size),
        keep_largest_component=spec.keep_largest_component or config.keep_largest_component)
    if recorded is not None and extra != recorded:
        log.info("Adding the flags' --tta / post-processing to the run's recorded inference")
    paths = [config.checkpoint] if config.checkpoint else [os.path.join(config.run_dir, m) for m in spec.members]
    models, sources = [], []
    for path in paths:
        model, source = inference.load_model(path, build=lambda: build_model(config))
        models.append(model)
        sources.append(source)
    image_size = inference.model_image_size(models[0], config.image_size)
    if image_size != config.image_size and recorded is None:
        log.info(f"The model takes {image_size}x{image_size} inputs (--image_size={config.image_size} ignored)")
    return inference.Segmenter(models, extra, image_size=image_size, sources=sources)
