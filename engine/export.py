"""`--mode=export`: a SavedModel whose signature maps uint8 256x256x3 slices to probability maps."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import numpy as np
import tensorflow as tf

from data import volume
from data import atomic
from engine import rundir, segmenter as segmenter_lib
from engine.config import Config
from engine.inference import probabilities
from engine.rundir import RunDirError
from engine.runtime import Runtime
from engine.segmenter import Segmenter

log = logging.getLogger(__name__)

SERVING_SIZE = 256  # the Kaggle LGG slice size
SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
METADATA_FILE = rundir.EXPORT_MARKER  # "brainseg_export.json": the mark of an export brainseg wrote
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
    """Writes the SavedModel, replacing a previous export of brainseg's in one rename.

    Args:
      segmenter: the run's inference (its members, model inputs and TTA go into the graph; the
        threshold and post-processing into brainseg_export.json).
      export_dir: destination folder.
      metadata: extra facts written to brainseg_export.json beside the SavedModel.

    Returns:
      export_dir.

    Raises:
      RunDirError: export_dir (or a folder above it) is a file, or holds something that is not
        brainseg's export; nothing is changed.
    """
    def fill(tmp: str) -> None:
        module = ServingModule(segmenter)
        tf.saved_model.save(module, tmp, signatures={SIGNATURE: module.serve})
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump({"format": "saved_model", "signature": SIGNATURE, **marker(segmenter),
                       **(metadata or {})}, f, indent=2, sort_keys=True)

    return write_export(export_dir, fill)


def write_export(export_dir: str, fill) -> str:
    """Puts a new export at export_dir in one rename: `fill(tmp)` writes it into a temporary
    folder beside export_dir, which then replaces a previous export of brainseg's.

    Raises:
      RunDirError: export_dir (or a folder above it) is a file, or holds something that is not
        brainseg's export; nothing is changed.
      OSError: a write failed (or whatever `fill` raises); the previous export, if any, is intact.
    """
    export_dir = os.path.abspath(export_dir)
    check_target(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    # What an export killed midway left: its half-written folder goes, a moved-aside one comes back;
    # each holds the marker (written first), so a user's folder of a like name is not taken.
    restored, removed = atomic.recover_dirs(parent, names=lambda n: n == os.path.basename(export_dir),
                                            alive=_alive, owned=lambda p: os.path.isfile(
                                                os.path.join(p, METADATA_FILE)))
    for path in restored:
        log.info(f"Put back {path}: an export was killed before replacing it")
    for path in removed:
        log.info(f"Removed {path}, left by an export that was killed")
    tmp = atomic.temporary_dir(export_dir)
    try:
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            f.write("{}\n")  # fill replaces it last; until then it marks the folder as this export's
        fill(tmp)
        _record_written(tmp)
        if os.path.isdir(export_dir):
            _carry_over(export_dir, tmp, rundir.export_record(export_dir) or [])
        atomic.swap_in_dir(tmp, export_dir)
    except tf.errors.OpError as e:  # TensorFlow's own file writes: a full or read-only disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(errno.EIO, f"{e.message.splitlines()[0][:200]}; the previous export, if any, "
                      "is intact", export_dir) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return export_dir


def marker(segmenter: Segmenter) -> dict:
    """What brainseg_export.json says of any export: the contract, and what a client applies after."""
    spec = segmenter.spec
    return {"input": {INPUT_NAME: f"uint8 [batch, {SERVING_SIZE}, {SERVING_SIZE}, 3]"
                      + (": the slices of one volume, in slice order"
                         if spec.normalize != "none" or spec.neighbours else "")},
            "output": {OUTPUT_NAME: f"float32 [batch, {SERVING_SIZE}, {SERVING_SIZE}, 1]"},
            "model_image_size": segmenter.image_size, "members": len(segmenter.models),
            "inference": spec.to_json(), "threshold": spec.threshold, "tensorflow": tf.__version__}


def _record_written(folder: str) -> None:
    """Adds to the export's marker what it wrote (itself included): the next export and
    --overwrite replace these, and nothing else in the folder."""
    path = os.path.join(folder, METADATA_FILE)
    with open(path) as f:
        meta = json.load(f)
    with open(path, "w") as f:
        json.dump({**meta, "written": _listing(folder)}, f, indent=2, sort_keys=True)


def _listing(folder: str) -> list[str]:
    """Every entry under folder, relative to it; folders end in '/'."""
    out = []
    for parent, dirs, files in os.walk(folder):
        rel = os.path.relpath(parent, folder)
        out += [os.path.normpath(os.path.join(rel, d)) + "/" for d in dirs]
        out += [os.path.normpath(os.path.join(rel, f)) for f in files]
    return sorted(out)


def _carry_over(old: str, new: str, recorded: list[str]) -> None:
    """Puts into the new export every entry of the old one that brainseg did not record writing
    (a user's notes.txt, or a folder of theirs), so that swapping the folders loses none: a hard
    link (the same file, not a copy) or, for a symbolic link, the same link.

    Raises:
      RunDirError: a user's file has the name of one the new export writes; nothing is replaced.
    """
    ours = set(recorded)
    for parent, dirs, files in os.walk(old):  # not into linked folders: a link is carried as a link
        for name in dirs + files:
            source = os.path.join(parent, name)
            rel = os.path.relpath(source, old)
            target = os.path.join(new, rel)
            if os.path.isdir(source) and not os.path.islink(source):
                if rel + "/" not in ours:
                    os.makedirs(target, exist_ok=True)
                continue
            if rel in ours:
                continue
            if os.path.lexists(target):
                raise RunDirError(f"{source} is not brainseg's, and the new export would replace it; "
                                  "move it away, or choose another --export_dir")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.islink(source):
                os.symlink(os.readlink(source), target)
            else:
                try:
                    os.link(source, target)
                except OSError:  # a file system without hard links
                    shutil.copy2(source, target)


def check_target(export_dir: str) -> None:
    """Refuses an --export_dir that is a file, lies under a file, is a symbolic link, or is a folder
    holding anything but brainseg's own export (marked by its brainseg_export.json, which lists
    what it wrote); an empty folder is fine. A user's files inside an export stay through the next.

    Raises:
      RunDirError: the message names the path.
    """
    above = os.path.dirname(export_dir)
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise RunDirError(f"--export_dir={export_dir}: {above} is a file, not a folder; choose "
                          "another --export_dir")
    if os.path.lexists(export_dir) and not os.path.isdir(export_dir):
        raise RunDirError(f"--export_dir={export_dir} exists and is not a folder; refusing to replace "
                          "it (choose another --export_dir)")
    if os.path.islink(export_dir):
        raise RunDirError(f"--export_dir={export_dir} is a symbolic link; brainseg replaces only a "
                          f"folder it wrote: pass the link's target ({os.path.realpath(export_dir)})")
    if (os.path.isdir(export_dir) and os.listdir(export_dir)
            and not os.path.isfile(os.path.join(export_dir, METADATA_FILE))):
        raise RunDirError(f"--export_dir={export_dir} is not a SavedModel or ONNX model brainseg exported "
                          f"(it has no {METADATA_FILE}); refusing to replace it: choose another "
                          "--export_dir")
    if os.path.isdir(export_dir) and os.listdir(export_dir) and rundir.export_record(export_dir) is None:
        raise RunDirError(f"--export_dir={export_dir} holds an export from before brainseg recorded its "
                          f"files in {METADATA_FILE}, so it cannot tell them from yours and replaces "
                          "nothing: delete it yourself or choose another --export_dir")


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


def run(config: Config, runtime: Runtime) -> str:
    """Exports the run's model (or --checkpoint) to --export_dir, default <run_dir>/saved_model
    (with --export_format=onnx: engine.export_onnx.run), in the runtime's precision (float32 unless
    --precision says otherwise).

    The serving function is the engine's own inference core, so a client needs only TensorFlow:

        serve = tf.saved_model.load("logs/demo/saved_model").signatures["serving_default"]
        probs = serve(images=tf.constant(uint8_batch))["probabilities"]  # float32 [B,256,256,1]
        masks = probs[..., 0].numpy() > 0.5

    Returns:
      The export directory.

    Raises:
      CheckpointError: no model where the flags point.
      RunDirError: --export_dir is a file or under one, holds something that is not
        brainseg's export, or the reloaded export disagrees with the engine.
    """
    if config.export_format == "onnx":
        from engine import export_onnx  # only here: its packages are an optional extra
        return export_onnx.run(config, runtime)
    export_dir = os.path.abspath(config.export_dir or os.path.join(config.run_dir, rundir.SAVED_MODEL))
    check_target(export_dir)  # before the model loads: a refusal does no work
    segmenter = segmenter_lib.segmenter(config, precision=runtime.precision)
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
