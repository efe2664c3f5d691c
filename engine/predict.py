"""`--mode=predict`: writes `<name>_mask.tif` for every slice under --input (see run() for the rules)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import re
import sys
import time

import numpy as np
import tifffile

from data.decode import read_page
from data.lgg import DataError
from engine import segmenter as segmenter_lib
from data.atomic import atomic_write, atomic_write_json, read_json_object
from engine.config import Config
from engine.inference import groups
from engine.runtime import Runtime
from engine.segmenter import Segmenter

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff")
MASK_STEM_SUFFIX = "_mask"
# At the --output root: the masks predict wrote there (relative paths). Only these are ever
# replaced; any other mask is a user's (ground truth) and stops predict before it writes.
RECORD_FILE = "brainseg_predictions.json"


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
    array, problem = read_page(path, lambda shape, dtype: None)
    if problem:
        raise InputImageError(problem)
    return to_rgb_uint8(array)


def write_mask(path: pathlib.Path, mask: np.ndarray) -> None:
    """Writes a uint8 0/255 mask atomically, so an interrupted run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not fsynced: a mask can be predicted again; the rename alone keeps it whole.
    atomic_write(str(path), lambda tmp: tifffile.imwrite(tmp, mask), suffix=".tif", durable=False)


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to predict on and where its mask goes."""

    source: pathlib.Path
    target: pathlib.Path


def _is_image(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.stem.lower().endswith(MASK_STEM_SUFFIX)


def _is_mask(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.stem.lower().endswith(MASK_STEM_SUFFIX)


def _walk(root: pathlib.Path):
    """Every file under root, following symlinked folders (a subset laid out by links is normal),
    each real folder once, hidden ones skipped."""
    seen = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree: walked already
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in names:
            path = pathlib.Path(folder, name)
            if not name.startswith(".") and path.is_file():
                yield path


def plan(input_dir, output_dir) -> tuple[list[Job], list[Job]]:
    """Lists the images under input_dir and their target masks under output_dir.

    Args:
      input_dir: a kaggle_3m-style tree or a plain folder of .tif slices.
      output_dir: where `<name>_mask.tif` files go, mirroring input_dir's layout.

    Returns:
      (jobs, protected): images to predict, and images skipped because their
      target is an existing ground-truth mask of the input.

    Raises:
      DataError: input_dir is not a folder or holds no images, output_dir is a file, or a
        target is a mask brainseg did not write (outside the input's own ground truth).
    """
    root, out = pathlib.Path(input_dir), pathlib.Path(output_dir)
    if not root.is_dir():
        raise DataError(f"--input={input_dir}: not a folder (expected a kaggle_3m-style folder "
                        f"or a folder of .tif slices)")
    if out.exists() and not out.is_dir():
        raise DataError(f"--output={output_dir}: exists and is not a folder")
    ours = {os.path.realpath(out / name) for name in recorded(out)}
    # An output folder nested inside the input holds this tool's earlier results, not inputs.
    nested = out.resolve() != root.resolve() and out.resolve().is_relative_to(root.resolve())
    files = sorted(p for p in _walk(root)
                   if not (nested and p.resolve().is_relative_to(out.resolve())))
    # A mask predict wrote is no ground truth: predicting again replaces it.
    ground_truth = {os.path.realpath(p) for p in files if _is_mask(p)} - ours
    jobs, protected = [], []
    for p in files:
        if not _is_image(p):
            continue
        relative = p.relative_to(root)
        job = Job(p, out / relative.parent / f"{p.stem}{MASK_STEM_SUFFIX}.tif")
        (protected if os.path.realpath(job.target) in ground_truth else jobs).append(job)
    _refuse_shared_targets(jobs + protected, input_dir)
    if not jobs and not protected:
        raise DataError(f"--input={input_dir}: no image .tif files found (files ending in "
                        f"{MASK_STEM_SUFFIX}.tif are ground truth and are not predicted on)")
    refuse_foreign(jobs, ours, output_dir)
    return jobs, protected


def refuse_foreign(jobs: list[Job], ours, output_dir) -> None:
    """Refuses targets that exist and are not in predict's own record (TIFF and NIfTI alike).

    Raises:
      DataError: naming the first such mask and how many there are.
    """
    foreign = [j.target for j in jobs if os.path.lexists(j.target) and os.path.realpath(j.target) not in ours]
    if foreign:
        raise DataError(f"--output={output_dir}: {foreign[0]} exists and brainseg did not write it "
                        f"({len(foreign)} such mask(s) in all); predict never replaces a mask it did "
                        f"not write (it lists its own in {RECORD_FILE}): use another --output")


def _refuse_shared_targets(jobs: list[Job], input_dir) -> None:
    """Two images whose masks would be one file (a.tif and a.tiff) get no mask silently lost."""
    first: dict[pathlib.Path, Job] = {}
    for job in jobs:
        other = first.setdefault(job.target, job)
        if other is not job:
            raise DataError(f"--input={input_dir}: {other.source} and {job.source} would both be "
                            f"predicted into {job.target.name}; rename or move one of them")


def recorded(output_dir) -> list[str]:
    """The masks predict recorded writing under output_dir, relative to it.

    Raises:
      DataError: the record is unreadable or not brainseg's.
    """
    path = os.path.join(output_dir, RECORD_FILE)
    stored = read_json_object(path, DataError, "move it away or use another --output")
    names = [] if stored is None else stored.get("written")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path} is not brainseg's record of its masks; move it away or use another --output")
    return names


def record(output_dir, jobs: list[Job]) -> None:
    """Adds the jobs' targets to the record before they are written, so a crash leaves them listed."""
    known = recorded(output_dir)
    names = {str(j.target.relative_to(output_dir)) for j in jobs}
    if not names <= set(known):
        os.makedirs(output_dir, exist_ok=True)
        atomic_write_json(os.path.join(output_dir, RECORD_FILE), {"written": sorted({*known, *names})})


def volumes(jobs: list[Job], protected: list[Job]) -> list[list[Job]]:
    """The volumes the slices form: a folder's images, in name order with numbers compared as
    numbers (slice 9 before slice 10). Slices skipped for their ground truth still belong to their
    volume: its standardisation, neighbours and 3D post-processing see them."""
    folders: dict[pathlib.Path, list[Job]] = {}
    for job in jobs + protected:
        folders.setdefault(job.source.parent, []).append(job)
    natural = lambda job: [(int(t), "") if t.isdigit() else (-1, t)  # noqa: E731
                           for t in re.split(r"(\d+)", job.source.name)]
    return [sorted(group, key=natural) for _, group in sorted(folders.items())]


def predict_files(segmenter: Segmenter, jobs: list[Job], protected: list[Job], *,
                  batch_size: int) -> dict:
    """Predicts and writes the mask of every job, volume by volume; a bad file never stops the others.

    Args:
      segmenter: the run's inference.
      jobs, protected: from `plan`; protected slices are read for their volume, never written.
      batch_size: slices per model call.

    Returns:
      {"written": int, "failed": [(path, reason)], "notes": {note: count}}.
    """
    written, failed, notes = 0, [], {}
    writes = {id(j) for j in jobs}

    def segment_and_write(pool, stacks: list[tuple[list[Job], np.ndarray]]) -> None:
        nonlocal written
        masks = segmenter.segment_volumes([images for _, images in stacks], batch_size=batch_size)
        targets = [(job.target, m) for (volume, _), volume_masks in zip(stacks, masks)
                   for job, m in zip(volume, volume_masks) if id(job) in writes]
        results = pool.map(_try_write, [t for t, _ in targets],
                           [np.where(m, 255, 0).astype(np.uint8) for _, m in targets])
        for (target, _), error in zip(targets, results):
            if error is None:
                written += 1
            else:
                failed.append((str(target), error))
                log.info(f"error: {target}: {error}")

    folders = volumes(jobs, protected)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for group in groups([len(v) for v in folders]):
            # The group's volumes share model batches; a folder of slices of several sizes is one
            # volume per size.
            by_shape: dict[tuple, list[tuple[list[Job], np.ndarray]]] = {}
            for volume in (folders[g] for g in group):
                decoded = list(pool.map(_try_read, [str(j.source) for j in volume]))
                sized: dict[tuple, list[int]] = {}
                for i, (image, image_notes, error) in enumerate(decoded):
                    if error is not None:
                        failed.append((str(volume[i].source), error))
                        log.info(f"error: {volume[i].source}: {error}")
                        continue
                    if id(volume[i]) in writes:
                        for note in image_notes:
                            notes[note] = notes.get(note, 0) + 1
                    sized.setdefault(image.shape, []).append(i)
                for shape, indices in sized.items():
                    by_shape.setdefault(shape, []).append(
                        ([volume[i] for i in indices], np.stack([decoded[i][0] for i in indices])))
            for stacks in by_shape.values():
                segment_and_write(pool, stacks)
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


def run(config: Config, runtime: Runtime) -> int:
    """Predicts every image under --input into --output, the models computing in the runtime's precision.

    File by file:
      - Every `.tif`/`.tiff` under `--input` (recursively; hidden folders skipped) whose name
        does not end in `_mask` is an image. `--input` may be a kaggle_3m-style tree (patient
        folders) or a plain folder of slices.
      - Files named `*_mask.tif` are ground truth: never predicted on, never overwritten. When a
        target is an existing mask of the input (`--output` is `--input` on a labelled tree),
        that image is skipped and counted; an `--output` nested inside `--input` is not read.
      - The masks predict writes are listed in `--output`'s brainseg_predictions.json: they are
        no ground truth, and predicting again replaces them. Any other existing target mask
        stops predict before it writes anything.
      - The images of one folder are one volume (a patient), in name order with numbers compared
        as numbers: the run's standardisation, neighbouring slices and 3D post-processing work
        on it. Slices of another size in the same folder form a volume of their own.
      - For `DIR/a/b.tif` the prediction goes to `OUTPUT/a/b_mask.tif`: uint8, 0 or 255, the
        input's own height and width, written atomically.
      - Accepted images: uint8 or uint16, HxW (grayscale, replicated to 3 channels) or HxWx3;
        a 16-bit slice whose values exceed 255 is rescaled by its own maximum to 0..255.
      - A bad or unreadable file is reported with its path and reason; the others are written.

    Returns:
      The exit code: 0 if every image was written (or skipped as ground truth), 1 if any failed.

    Raises:
      DataError: --input is not a folder of slices, --output is a file, or a target is a mask
        brainseg did not write.
      CheckpointError: no model where the flags point.
    """
    jobs, protected = plan(config.input, config.output)
    segmenter = segmenter_lib.segmenter(config, precision=runtime.precision)
    if protected:
        examples = ", ".join(str(j.target) for j in protected[:3])
        log.info(f"Skipping {len(protected)} image(s) whose {MASK_STEM_SUFFIX}.tif is ground truth in "
                 f"the input and is never overwritten (e.g. {examples}); use another --output to "
                 "predict them.")
    log.info(f"Predicting {len(jobs)} image(s) from {config.input} into {config.output}: "
             f"{segmenter.describe()}")
    record(config.output, jobs)
    start = time.perf_counter()
    result = predict_files(segmenter, jobs, protected, batch_size=config.eval_batch)
    seconds = time.perf_counter() - start
    if result["notes"].get("grayscale"):
        log.info(f"Note: {result['notes']['grayscale']} grayscale image(s) were replicated to 3 channels; "
            f"the model was trained on 3-channel slices (pre-contrast, FLAIR, post-contrast), so "
            f"expect lower accuracy on them.")
    if result["notes"].get("uint16 rescaled"):
        log.info(f"Note: {result['notes']['uint16 rescaled']} 16-bit image(s) were rescaled by their own "
            f"maximum to 0..255.")
    log.info(f"Wrote {result['written']} mask(s) to {config.output} in {seconds:.1f}s"
        + (f"; skipped {len(protected)} with ground truth" if protected else "")
        + (f"; {len(result['failed'])} FAILED" if result["failed"] else ""))
    if result["failed"]:
        print(f"error: {len(result['failed'])} of {len(jobs)} image(s) failed (each named above); "
              f"the others were written", file=sys.stderr, flush=True)
        return 1
    return 0
