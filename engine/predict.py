"""`--mode=predict`: writes `<name>_mask.tif` for every slice in a folder; also the shared inference core.

The inference core (`probabilities`, `Predictor`) is the one path from uint8 slices
to probability maps at the slices' own size: `data.pipeline.preprocess`, the
model, a float32 sigmoid, optional flip averaging, and a bilinear resize back.
Evaluation and the exported SavedModel use it too, so all three agree.

Prediction mode, file by file:
  - Every `.tif`/`.tiff` under `--input` (recursively; hidden folders skipped)
    whose name does not end in `_mask` is an image. `--input` may be a
    kaggle_3m-style tree (patient folders) or a plain folder of slices.
  - Files named `*_mask.tif` are ground truth: never predicted on.
  - For `DIR/a/b.tif` the prediction goes to `OUTPUT/a/b_mask.tif`: uint8, 0 or
    255, the input's own height and width, written atomically.
  - Ground truth is never overwritten. When a target path is an existing
    ground-truth mask of the input (e.g. `--output` is `--input` and the folder
    is a labelled kaggle_3m tree), that image is skipped and the run says how
    many were skipped and why; use another `--output` to get their predictions.
    An alternative name (say `_pred_mask.tif`) was rejected: the data loader
    would then reject the folder for its unexpected file names. In place, a
    mask written by an earlier prediction is indistinguishable from ground
    truth and is kept too. An `--output` folder nested inside `--input` is not
    scanned as input, so its masks are simply replaced on a re-run.
  - Accepted images: uint8 or uint16, HxW (grayscale, replicated to 3 channels)
    or HxWx3; a 16-bit slice whose values exceed 255 is rescaled by its own
    maximum to 0..255. Anything else is an error naming the file.
  - A bad or unreadable file is reported with its path and reason, the other
    files are still written, and the exit code is 1.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
import tifffile

from data import pipeline
from data.lgg import DataError
from engine import build
from engine.config import Config
from engine.runtime import Runtime

IMAGE_SUFFIXES = (".tif", ".tiff")
MASK_STEM_SUFFIX = "_mask"
THRESHOLD = 0.5
# Files read and predicted per round: bounds memory on large folders while keeping batches full.
CHUNK_BATCHES = 8


def model_image_size(model, fallback: int) -> int:
    """The square input size the model was built for (its own shape wins over flags)."""
    shape = getattr(model, "input_shape", None)
    if shape and len(shape) == 4 and isinstance(shape[1], int):
        return int(shape[1])
    return fallback


def probabilities(model, images: tf.Tensor, *, image_size: int, tta: bool = False) -> tf.Tensor:
    """Probability maps at the input's own size for a uint8 batch (graph-safe).

    Args:
      model: a Keras model mapping float32 [B, S, S, 3] in [0, 1] to logits [B, S, S, 1].
      images: uint8 [B, H, W, 3], any H and W.
      image_size: S, the model's input size.
      tta: average the probabilities of the identity, left-right, up-down and
        both flips (each flipped back), the flips training augments with.

    Returns:
      float32 [B, H, W, 1] probabilities (bilinear resize of the model-size map).
    """
    size = tf.shape(images)[1:3]
    x = pipeline.preprocess(images, image_size)
    if tta:
        batch = tf.shape(x)[0]
        flips = ((), (2,), (1,), (1, 2))
        # One model call on the four views keeps batches large.
        views = tf.concat([tf.reverse(x, axis) if axis else x for axis in flips], axis=0)
        p = tf.sigmoid(tf.cast(model(views, training=False), tf.float32))
        parts = [p[i * batch:(i + 1) * batch] for i in range(len(flips))]
        p = tf.add_n([tf.reverse(q, axis) if axis else q for q, axis in zip(parts, flips)]) / len(flips)
    else:
        p = tf.sigmoid(tf.cast(model(x, training=False), tf.float32))
    return tf.image.resize(p, size, method="bilinear")


class Predictor:
    """Batched probability maps for numpy slices of any size; the tf.function traces once."""

    def __init__(self, model, *, image_size: int, tta: bool = False):
        self.model = model
        self.image_size = image_size
        self.tta = tta
        self.traces = 0

        def fn(images):
            self.traces += 1
            return probabilities(model, images, image_size=image_size, tta=tta)

        self._fn = tf.function(fn, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])

    def __call__(self, images: np.ndarray, *, batch_size: int) -> np.ndarray:
        """Probabilities of a stack of same-sized slices.

        Args:
          images: uint8 [N, H, W, 3].
          batch_size: slices per model call.

        Returns:
          float32 [N, H, W] probabilities.
        """
        images = np.asarray(images)
        out = np.empty(images.shape[:3], np.float32)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            out[start:start + len(batch)] = self._fn(tf.constant(batch))[..., 0].numpy()
        return out


class InputImageError(ValueError):
    """One input slice that cannot be predicted on; the message says why."""


def to_rgb_uint8(array: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Brings a decoded slice to uint8 HxWx3, or explains why it cannot.

    Returns:
      (image, notes): notes name the conversions worth telling the user about.

    Raises:
      InputImageError: unsupported shape or dtype.
    """
    notes = ()
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
        notes += ("grayscale",)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise InputImageError(f"unsupported image shape {array.shape}: expected HxW (grayscale) or HxWx3")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise InputImageError(f"empty image of shape {array.shape}")
    if array.dtype == np.uint16:
        peak = int(array.max())
        if peak > 255:
            array = (array.astype(np.float32) * (255.0 / peak) + 0.5).astype(np.uint8)
            notes += ("uint16 rescaled",)
        else:
            array = array.astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InputImageError(f"unsupported dtype {array.dtype}: expected uint8 or uint16")
    return np.ascontiguousarray(array), notes


def read_image(path: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Reads one slice as uint8 HxWx3.

    Raises:
      InputImageError: unreadable/truncated TIFF, or unsupported shape or dtype.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            array = tif.pages[0].asarray()
    except Exception as e:  # noqa: BLE001 - any tifffile/zlib/OS failure is a bad file, not a crash
        raise InputImageError(f"unreadable or truncated TIFF ({type(e).__name__}: {e})") from None
    return to_rgb_uint8(array)


def write_mask(path: pathlib.Path, mask: np.ndarray) -> None:
    """Writes a uint8 0/255 mask atomically, so an interrupted run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".tif", dir=path.parent)
    os.close(fd)
    try:
        tifffile.imwrite(tmp, mask)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to predict on and where its mask goes."""

    source: pathlib.Path
    target: pathlib.Path


def _is_image(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.stem.lower().endswith(MASK_STEM_SUFFIX)


def _is_mask(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.stem.lower().endswith(MASK_STEM_SUFFIX)


def plan(input_dir, output_dir) -> tuple[list[Job], list[Job]]:
    """Lists the images under input_dir and their target masks under output_dir.

    Args:
      input_dir: a kaggle_3m-style tree or a plain folder of .tif slices.
      output_dir: where `<name>_mask.tif` files go, mirroring input_dir's layout.

    Returns:
      (jobs, protected): images to predict, and images skipped because their
      target is an existing ground-truth mask of the input.

    Raises:
      DataError: input_dir is not a folder, holds no images, or output_dir is a file.
    """
    root, out = pathlib.Path(input_dir), pathlib.Path(output_dir)
    if not root.is_dir():
        raise DataError(f"--input={input_dir}: not a folder (expected a kaggle_3m-style folder "
                        f"or a folder of .tif slices)")
    if out.exists() and not out.is_dir():
        raise DataError(f"--output={output_dir}: exists and is not a folder")
    # An output folder nested inside the input holds this tool's earlier results, not inputs.
    nested = out.resolve() != root.resolve() and out.resolve().is_relative_to(root.resolve())
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and not (nested and p.resolve().is_relative_to(out.resolve())))
    ground_truth = {os.path.realpath(p) for p in files if _is_mask(p)}
    jobs, protected = [], []
    for p in files:
        if not _is_image(p):
            continue
        relative = p.relative_to(root)
        job = Job(p, out / relative.parent / f"{p.stem}{MASK_STEM_SUFFIX}.tif")
        (protected if os.path.realpath(job.target) in ground_truth else jobs).append(job)
    if not jobs and not protected:
        raise DataError(f"--input={input_dir}: no image .tif files found (files ending in "
                        f"{MASK_STEM_SUFFIX}.tif are ground truth and are not predicted on)")
    return jobs, protected


def predict_files(predictor: Predictor, jobs: list[Job], *, batch_size: int,
                  log=logging.info) -> dict:
    """Predicts and writes the mask of every job; a bad file never stops the others.

    Args:
      predictor: the inference core.
      jobs: from `plan`.
      batch_size: slices per model call (same-sized slices are batched together).
      log: receives one line per failed file.

    Returns:
      {"written": int, "failed": [(path, reason)], "notes": {note: count}}.
    """
    written, failed, notes = 0, [], {}
    chunk = max(1, batch_size * CHUNK_BATCHES)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(jobs), chunk):
            part = jobs[start:start + chunk]
            decoded = list(pool.map(_try_read, [str(j.source) for j in part]))
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, (image, image_notes, error) in enumerate(decoded):
                if error is not None:
                    failed.append((str(part[i].source), error))
                    log(f"error: {part[i].source}: {error}")
                    continue
                for note in image_notes:
                    notes[note] = notes.get(note, 0) + 1
                by_shape.setdefault(image.shape[:2], []).append(i)
            for indices in by_shape.values():
                probs = predictor(np.stack([decoded[i][0] for i in indices]), batch_size=batch_size)
                masks = np.where(probs > THRESHOLD, 255, 0).astype(np.uint8)
                results = pool.map(_try_write, [part[i].target for i in indices], list(masks))
                for i, error in zip(indices, results):
                    if error is None:
                        written += 1
                    else:
                        failed.append((str(part[i].target), error))
                        log(f"error: {part[i].target}: {error}")
    return {"written": written, "failed": failed, "notes": notes}


def _try_read(path: str):
    try:
        image, notes = read_image(path)
        return image, notes, None
    except InputImageError as e:
        return None, (), str(e)


def _try_write(path: pathlib.Path, mask: np.ndarray) -> str | None:
    try:
        write_mask(path, mask)
    except OSError as e:
        return f"cannot write the mask ({e.strerror or e})"
    return None


def run(config: Config, runtime: Runtime | None = None, *, log=logging.info) -> int:
    """Predicts every image under --input into --output.

    Returns:
      The exit code: 0 if every image was written (or skipped as ground truth), 1 if any failed.

    Raises:
      DataError: --input is not a folder of slices, or --output is a file.
      CheckpointError: no model where the flags point.
    """
    jobs, protected = plan(config.input, config.output)
    model = build.load_trained_model(config, runtime, log=log)
    image_size = model_image_size(model, config.image_size)
    predictor = Predictor(model, image_size=image_size, tta=config.tta)
    if protected:
        examples = ", ".join(str(j.target) for j in protected[:3])
        log(f"Skipping {len(protected)} image(s) whose {MASK_STEM_SUFFIX}.tif is ground truth in the "
            f"input and is never overwritten (e.g. {examples}); use another --output to predict them.")
    log(f"Predicting {len(jobs)} image(s) from {config.input} into {config.output} "
        f"(model input {image_size}x{image_size}, tta {'on' if config.tta else 'off'})")
    start = time.perf_counter()
    result = predict_files(predictor, jobs, batch_size=config.eval_batch_size or config.batch_size,
                           log=log)
    seconds = time.perf_counter() - start
    if result["notes"].get("grayscale"):
        log(f"Note: {result['notes']['grayscale']} grayscale image(s) were replicated to 3 channels; "
            f"the model was trained on 3-channel slices (pre-contrast, FLAIR, post-contrast), so "
            f"expect lower accuracy on them.")
    if result["notes"].get("uint16 rescaled"):
        log(f"Note: {result['notes']['uint16 rescaled']} 16-bit image(s) were rescaled by their own "
            f"maximum to 0..255.")
    log(f"Wrote {result['written']} mask(s) to {config.output} in {seconds:.1f}s"
        + (f"; skipped {len(protected)} with ground truth" if protected else "")
        + (f"; {len(result['failed'])} FAILED" if result["failed"] else ""))
    if result["failed"]:
        print(f"error: {len(result['failed'])} of {len(jobs)} image(s) failed (each named above); "
              f"the others were written", file=sys.stderr, flush=True)
        return 1
    return 0
