"""`--mode=export`: a SavedModel whose signature maps uint8 256x256x3 slices to probability maps."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from data import volume
from engine import inference, rundir
from engine.config import Config
from engine.inference import Segmenter, probabilities
from engine.rundir import RunDirError

log = logging.getLogger(__name__)

SERVING_SIZE = 256  # the Kaggle LGG slice size
SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
METADATA_FILE = "brainseg_export.json"
# Largest difference between the reloaded SavedModel and the engine tolerated by the self-check.
TOLERANCE = 1e-4


class ServingModule(tf.Module):
    """Holds the members' variables and the one serving function: a volume in, probabilities out."""

    def __init__(self, segmenter: Segmenter):
        super().__init__(name="brainseg")
        self.members = segmenter.models
        self._spec, self._image_size = segmenter.spec, segmenter.image_size
        self.serve = tf.function(
            self._serve,
            input_signature=[tf.TensorSpec([None, SERVING_SIZE, SERVING_SIZE, 3], tf.uint8,
                                           name=INPUT_NAME)])

    def _serve(self, images):
        # The engine's own steps, in the graph: the batch is one volume (data.volume.model_inputs).
        x = volume.model_inputs(images, normalize=self._spec.normalize, neighbours=self._spec.neighbours)
        probs = [probabilities(m, x, image_size=self._image_size, tta=self._spec.tta) for m in self.members]
        return {OUTPUT_NAME: tf.add_n(probs) / len(probs)}


def export_saved_model(segmenter: Segmenter, export_dir: str, *, metadata: dict | None = None) -> str:
    """Writes the SavedModel, replacing a previous export in one rename.

    Args:
      segmenter: the run's inference (its members, model inputs and TTA go into the graph; the
        threshold and post-processing into brainseg_export.json).
      export_dir: destination folder.
      metadata: extra facts written to brainseg_export.json beside the SavedModel.

    Returns:
      export_dir.

    Raises:
      RunDirError: export_dir exists and is not a SavedModel (it is never deleted).
    """
    export_dir = os.path.abspath(export_dir)
    if os.path.exists(export_dir) and not os.path.exists(os.path.join(export_dir, "saved_model.pb")):
        if not os.path.isdir(export_dir) or os.listdir(export_dir):
            raise RunDirError(f"--export_dir={export_dir} exists and is not a SavedModel; "
                              f"refusing to replace it (choose another --export_dir)")
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    _clean_after_killed_exports(parent, export_dir)
    tmp = tempfile.mkdtemp(prefix=f".tmp-export-{os.getpid()}-", dir=parent)
    spec = segmenter.spec
    try:
        module = ServingModule(segmenter)
        tf.saved_model.save(module, tmp, signatures={SIGNATURE: module.serve})
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump({"signature": SIGNATURE,
                       "input": {INPUT_NAME: f"uint8 [batch, {SERVING_SIZE}, {SERVING_SIZE}, 3]"
                                 + (": the slices of one volume, in slice order"
                                    if spec.normalize != "none" or spec.neighbours else "")},
                       "output": {OUTPUT_NAME: f"float32 [batch, {SERVING_SIZE}, {SERVING_SIZE}, 1]"},
                       "model_image_size": segmenter.image_size, "members": len(segmenter.models),
                       "inference": spec.to_json(), "threshold": spec.threshold,
                       "tensorflow": tf.__version__, **(metadata or {})}, f, indent=2, sort_keys=True)
        old = None
        if os.path.exists(export_dir):
            old = tempfile.mkdtemp(prefix=f".old-export-{os.getpid()}-", dir=parent)
            os.replace(export_dir, os.path.join(old, "saved_model"))
        os.replace(tmp, export_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return export_dir


def _clean_after_killed_exports(parent: str, export_dir: str) -> None:
    """Removes what an export killed midway left in `parent`: its half-written SavedModel, and
    puts back a previous export it had moved aside. Leftovers of a live export are left alone."""
    for name in sorted(os.listdir(parent)):
        match = re.match(r"^\.(tmp|old)-export-(\d+)-", name)
        if not match or _alive(int(match.group(2))):
            continue
        path = os.path.join(parent, name)
        moved = os.path.join(path, "saved_model")
        if match.group(1) == "old" and os.path.isdir(moved) and not os.path.exists(export_dir):
            os.replace(moved, export_dir)
            log.info(f"Put back {export_dir}: an export was killed before replacing it")
        shutil.rmtree(path, ignore_errors=True)
        log.info(f"Removed {path}, left by an export that was killed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_export(export_dir: str, segmenter: Segmenter, *, seed: int = 0) -> float:
    """Reloads the SavedModel and returns its largest difference from the engine on a random volume."""
    serve = tf.saved_model.load(export_dir).signatures[SIGNATURE]
    images = np.random.default_rng(seed).integers(0, 256, (3, SERVING_SIZE, SERVING_SIZE, 3), np.uint8)
    exported = serve(**{INPUT_NAME: tf.constant(images)})[OUTPUT_NAME].numpy()[..., 0]
    return float(np.abs(exported - segmenter.probabilities(images, batch_size=len(images))).max())


def run(config: Config) -> str:
    """Exports the run's model (or --checkpoint) to --export_dir, default <run_dir>/saved_model.

    The serving function is the engine's own inference core, so a client needs only TensorFlow:

        serve = tf.saved_model.load("logs/demo/saved_model").signatures["serving_default"]
        probs = serve(images=tf.constant(uint8_batch))["probabilities"]  # float32 [B,256,256,1]
        masks = probs[..., 0].numpy() > 0.5

    Returns:
      The export directory.

    Raises:
      CheckpointError: no model where the flags point.
      RunDirError: --export_dir holds something that is not a SavedModel, or the
        reloaded export disagrees with the engine.
    """
    segmenter = inference.segmenter(config)
    export_dir = config.export_dir or os.path.join(config.run_dir, rundir.SAVED_MODEL)
    export_saved_model(segmenter, export_dir,
                       metadata={"source": segmenter.sources, "brainseg": rundir.PROJECT_VERSION})
    difference = check_export(export_dir, segmenter)
    if not difference <= TOLERANCE:
        raise RunDirError(f"{export_dir}: the reloaded SavedModel differs from the engine by "
                          f"{difference:.3g} (> {TOLERANCE}); the export is not trustworthy")
    log.info(f"Exported {', '.join(segmenter.sources)} to {export_dir}: signature '{SIGNATURE}' takes "
             f"{INPUT_NAME}: uint8 [batch, {SERVING_SIZE}, {SERVING_SIZE}, 3] and returns {OUTPUT_NAME}: "
             f"float32 [batch, {SERVING_SIZE}, {SERVING_SIZE}, 1] ({segmenter.describe()}); threshold "
             f"and post-processing are in {METADATA_FILE}; reload check: max difference {difference:.2g}")
    return export_dir
