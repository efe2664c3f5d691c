"""Trained models read back for inference: a .keras file or a checkpoint, in the run's precision."""

from __future__ import annotations

import logging
import os
import zipfile

import keras
import tensorflow as tf

from engine import checkpoint as checkpoint_lib
from engine.checkpoint import CheckpointError
from models import fused_batch_norm  # noqa: F401  (registers the layer that load_model reads)

log = logging.getLogger(__name__)


def load_model(path: str, *, precision: str, build=None) -> tuple[keras.Model, str]:
    """One trained model, computing in `precision`, and where it came from.

    Args:
      path: a `.keras` model file; or a run directory, its checkpoints folder, or one checkpoint
        (weights read into `build()`).
      precision: the Keras policy the run computes in (Runtime.precision).
      build: makes the model a checkpoint's weights are read into (from the current config).

    Raises:
      CheckpointError: nothing loadable at `path`; a damaged file is named as such.
    """
    if not path.endswith(".keras"):
        model = build()
        info = checkpoint_lib.restore(tf.train.Checkpoint(model=model), path, partial=True)
        log.info(f"Model weights from checkpoint {info.path}")
        return in_precision(model, precision), info.path
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path} does not exist: train first (--mode=train with the same --run_name/--model_dir), "
            f"or name a checkpoint with --checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is damaged: not a Keras model archive (truncated or "
                              "overwritten?); train again, or name a checkpoint with --checkpoint")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # A damaged file: name it rather than show Keras' internals.
        raise CheckpointError(f"{path} is damaged and could not be loaded ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    log.info(f"Model from {path}")
    return in_precision(model, precision), path


def in_precision(model: keras.Model, policy: str) -> keras.Model:
    """The model computing in `policy` (the run's --precision, as engine.runtime resolved it).

    A .keras file keeps the policy it was trained in; predict and evaluate run in the precision
    chosen for this machine instead, so the model is rebuilt from its config with that policy
    (the logits stay float32, as models/unet.py builds them) and given the same weights.
    """
    layers = [layer for layer in model.layers if layer.name != "logits" and layer.weights]
    if policy == "float64" or all(layer.dtype_policy.name == policy for layer in layers):
        return model
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer" and layer["config"].get("name") != "logits":
            layer["config"]["dtype"] = policy
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt
