"""`--mode=predict` on NIfTI volumes: `<name>_mask.nii.gz` on each input's own grid (see run())."""

from __future__ import annotations

import logging
import os
import pathlib
import time

from data import nifti
from data.lgg import DataError
from engine import segmenter as segmenter_lib
from engine.config import Config
from engine.runtime import Runtime
from engine.predict import Job, _is_image, _walk, record, recorded, refuse_foreign

log = logging.getLogger(__name__)

MASK_NAME = "{stem}" + nifti.MASK_SUFFIX + ".nii.gz"


def wants(input_path) -> bool:
    """Whether --input names NIfTI: a .nii/.nii.gz file, or a folder holding them.

    Raises:
      DataError: a folder holding both NIfTI volumes and TIFF slices.
    """
    path = pathlib.Path(input_path)
    if path.is_file():
        return nifti.is_nifti(path)
    if not path.is_dir():
        return False
    volumes = tiffs = None
    for p in _walk(path):
        volumes = volumes or (p if nifti.is_nifti(p) else None)
        tiffs = tiffs or (p if _is_image(p) else None)
        if volumes and tiffs:
            raise DataError(f"--input={input_path}: holds both NIfTI volumes ({volumes}) and TIFF "
                            f"slices ({tiffs}); predict one kind per folder")
    return volumes is not None


def plan(input_path, output_dir) -> tuple[list[Job], list[Job]]:
    """The volumes under --input and their masks under --output (the rules of predict.plan).

    Returns:
      (jobs, protected): volumes to predict, and volumes skipped because their target is a
      ground-truth mask of the input.

    Raises:
      DataError: an input mask named as --input, no volume, two volumes with one target
        (a.nii and a.nii.gz), or a target predict did not write.
    """
    source, out = pathlib.Path(input_path), pathlib.Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--output={output_dir}: exists and is not a folder")
    if source.is_file():
        if nifti.is_mask(source):
            raise DataError(f"--input={input_path}: a {nifti.MASK_SUFFIX} file is ground truth, "
                            "not a volume to predict")
        root, files = source.parent, [source]
        masks = [p for p in root.iterdir() if p.is_file() and nifti.is_mask(p)]
    else:
        # An output folder nested inside the input holds earlier results, not inputs.
        nested = out.resolve() != source.resolve() and out.resolve().is_relative_to(source.resolve())
        root, files = source, sorted(p for p in _walk(source) if nifti.is_nifti(p)
                                     and not (nested and p.resolve().is_relative_to(out.resolve())))
        masks = [p for p in files if nifti.is_mask(p)]
    ours = {os.path.realpath(out / name) for name in recorded(out)}
    ground_truth = {os.path.realpath(p) for p in masks} - ours
    jobs, protected, targets = [], [], {}
    for p in files:
        if nifti.is_mask(p):
            continue
        target = out / p.relative_to(root).parent / MASK_NAME.format(stem=nifti.stem(p))
        if target in targets:
            raise DataError(f"--input={input_path}: {targets[target]} and {p} would both be "
                            f"predicted into {target}; keep one")
        targets[target] = p
        (protected if os.path.realpath(target) in ground_truth else jobs).append(Job(p, target))
    if not jobs and not protected:
        raise DataError(f"--input={input_path}: no NIfTI volume found (files ending in "
                        f"{nifti.MASK_SUFFIX}.nii.gz are ground truth and are not predicted on)")
    refuse_foreign(jobs, ours, output_dir)
    return jobs, protected


def _describe(volume: nifti.Volume) -> str:
    """One line of how a volume was read: its axes, channels and intensity mapping."""
    import nibabel as nib

    axes = "".join(nib.aff2axcodes(volume.image.affine))
    channels = ("FLAIR only (3D): pre- and post-contrast are absent, FLAIR stands in for them"
                if volume.flair_only else "pre-contrast, FLAIR, post-contrast")
    return (f"{volume.path}: {'x'.join(map(str, volume.image.shape))} stored {axes}, "
            f"{volume.grid[1]}x{volume.grid[2]} in-plane x {volume.grid[0]} slices; {channels}; "
            f"intensities {', '.join(dict.fromkeys(volume.intensities))}")


def run(config: Config, runtime: Runtime) -> int:
    """Predicts every NIfTI volume of --input into --output, the models computing in the
    runtime's precision.

    - --input is a .nii/.nii.gz file or a folder of them (recursively; hidden folders skipped);
      files named `*_mask.nii[.gz]` are ground truth, never predicted on or overwritten.
    - Each volume is read as data.nifti.read_volume reads it (channels, orientation to the
      Kaggle convention, intensities, in-plane size) and goes through the run's Segmenter.
    - `DIR/a/b.nii.gz` gets `OUTPUT/a/b_mask.nii.gz`: uint8 0/1 on b's own grid (shape,
      affine, sform and qform codes), listed in OUTPUT/brainseg_predictions.json as TIFF masks are.
    - Every volume is read and checked before anything is written: a bad one stops predict with
      its name and nothing written.

    Returns:
      0.

    Raises:
      DataError: a bad volume or folder, or a target mask brainseg did not write.
      CheckpointError: no model where the flags point.
    """
    jobs, protected = plan(config.input, config.output)
    for job in jobs:  # all checked first, so that a bad one stops predict before it writes
        nifti.load(job.source)
    segmenter = segmenter_lib.segmenter(config, precision=runtime.precision)
    if protected:
        log.info(f"Skipping {len(protected)} volume(s) whose mask is ground truth in the input "
                 f"(e.g. {protected[0].target}); use another --output to predict them.")
    log.info(f"Predicting {len(jobs)} NIfTI volume(s) from {config.input} into {config.output}: "
             f"{segmenter.describe()}")
    record(config.output, jobs)
    start = time.perf_counter()
    for job in jobs:
        volume = nifti.read_volume(job.source)
        log.info(_describe(volume))
        mask = segmenter.segment_volumes([volume.images], batch_size=config.eval_batch)[0]
        nifti.write_mask(job.target, mask, volume)
    log.info(f"Wrote {len(jobs)} mask(s) to {config.output} in {time.perf_counter() - start:.1f}s"
             + (f"; skipped {len(protected)} with ground truth" if protected else ""))
    return 0
