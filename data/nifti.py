"""NIfTI volumes in and out under the Kaggle slices' convention (also `python -m data.nifti`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import sys

import nibabel as nib
import numpy as np
import tifffile
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from data import atomic
from data import lgg
from data.dataset import LggDataset
from data.lgg import DataError, SliceRecord

log = logging.getLogger(__name__)

# A volume in model order is an array [slice, row, col]: the Kaggle TIFFs' rows run to posterior,
# their columns to the patient's left and their slice numbers to superior (DICOM LPS, axial).
MODEL_AXES = ("S", "P", "L")
# How data.nifti stores a Kaggle volume: [col, row, slice], the usual NIfTI layout of LPS slices.
KAGGLE_STORAGE = ("L", "P", "S")
# The in-plane size of the Kaggle slices, which every slice is resampled to (slices are not).
SLICE_SIZE = 256
# Where a windowed volume's 99.5th percentile lands on the 0..255 scale: the median of the Kaggle
# volumes' own (FLAIR 143, pre-contrast 142, post-contrast 135 over the 55 development patients;
# their minimum is 0 and their maximum about 255), so the bright tail above it keeps its contrast.
KAGGLE_P995 = 140.0
SUFFIXES = (".nii.gz", ".nii")
MASK_SUFFIX = "_mask"
# Channels of a 4D volume, in its last axis: the dataset's order.
CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")


def is_nifti(path) -> bool:
    """A .nii or .nii.gz file name (any case)."""
    return str(path).lower().endswith(SUFFIXES)


def stem(path) -> str:
    """The file name without .nii / .nii.gz."""
    name = os.path.basename(str(path))
    return name[: -len(next(s for s in SUFFIXES if name.lower().endswith(s)))]


def is_mask(path) -> bool:
    return is_nifti(path) and stem(path).lower().endswith(MASK_SUFFIX)


def model_affine() -> np.ndarray:
    """The affine of a model-order array: one unit per voxel, axes (S, P, L), origin at voxel 0."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, (world, sign) in enumerate(axcodes2ornt(MODEL_AXES)):
        affine[int(world), axis] = sign
    return affine


def to_model_order(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The first three axes of a stored array brought to [slice, row, col] (MODEL_AXES)."""
    return apply_orientation(array, ornt_transform(io_orientation(affine), axcodes2ornt(MODEL_AXES)))


def from_model_order(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A model-order array brought back to the axes of the image whose affine this is."""
    return apply_orientation(array, ornt_transform(axcodes2ornt(MODEL_AXES), io_orientation(affine)))


def load(path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Reads a NIfTI-1/2 file whole and checks its shape.

    Returns:
      (image, data): data is 3D, or 4D with 3 volumes in its last axis; scaling applied.

    Raises:
      DataError: not NIfTI, unreadable (a corrupt gzip, a truncated file), or another shape.
    """
    try:
        image = nib.load(str(path))
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataError(f"{path}: not a NIfTI file ({type(image).__name__})")
        data = np.asanyarray(image.dataobj)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - nibabel, gzip and zlib each raise their own; name the file
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a readable NIfTI file ({reason})") from None
    if data.ndim == 4 and data.shape[3] != len(CHANNELS):
        raise DataError(f"{path}: 4D with {data.shape[3]} volumes; expected a 3D FLAIR volume or 3 "
                        f"volumes in the last axis ({', '.join(CHANNELS)})")
    if data.ndim not in (3, 4):
        raise DataError(f"{path}: {data.ndim}D of shape {data.shape}; expected a 3D FLAIR volume or "
                        f"4D with 3 volumes in the last axis ({', '.join(CHANNELS)})")
    if min(data.shape[:3]) < 1:
        raise DataError(f"{path}: empty volume of shape {data.shape}")
    return image, data


def to_uint8(channel: np.ndarray) -> tuple[np.ndarray, str]:
    """One volume's intensities on the 0..255 scale of the Kaggle slices.

    - Integer values within 0..255 (a uint8 volume, in any dtype): kept as they are.
    - Integer values spanning at most 256 levels (such a volume stored with an offset): shifted
      to start at 0, never stretched.
    - Anything else: the 0.5th percentile to 0 and the 99.5th to KAGGLE_P995, clipped to 0..255.
    Non-finite values count as the lowest.

    Returns:
      (uint8 array, how it was mapped: "kept", "shifted" or "windowed").
    """
    x = np.asarray(channel, np.float64)
    finite = np.isfinite(x)
    values = x[finite]
    if not len(values):
        return np.zeros(x.shape, np.uint8), "kept"
    low, high = float(values.min()), float(values.max())
    integral = np.issubdtype(channel.dtype, np.integer) or bool(np.all(values == np.round(values)))
    if integral and low >= 0 and high <= 255:
        out, how = x, "kept"
    elif integral and high - low <= 255:
        out, how = x - low, "shifted"
    else:
        low, high = np.percentile(values, [0.5, 99.5])
        out, how = (x - low) * (KAGGLE_P995 / max(high - low, 1e-12)), "windowed"
    out = np.where(finite, out, 0.0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8), how


def resize(volume: np.ndarray, size: tuple[int, int], *, mask: bool = False) -> np.ndarray:
    """Slices [D, H, W(, C)] resampled in-plane to `size` (bilinear, antialiased when shrinking).

    Images are rounded back to uint8; masks are resampled as 0/1 and thresholded at 0.5, as
    data.pipeline.resize_masks does, so a mask's edge lands where its image's edge does.
    """
    if tuple(volume.shape[1:3]) == tuple(size):
        return volume
    # TensorFlow only here: converting 256x256 data (the Kaggle slices) never needs it.
    import tensorflow as tf

    x = volume[..., None] if mask else volume
    resized = tf.image.resize(tf.constant(x, tf.float32), size, method="bilinear", antialias=True).numpy()
    if mask:
        return resized[..., 0] > 0.5
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Volume:
    """A NIfTI volume as the model reads it, and what is needed to put a mask back on its grid.

    Attributes:
      path: the file.
      image: the nibabel image (affine and header; the mask is written on its grid).
      images: uint8 [D, SLICE_SIZE, SLICE_SIZE, 3] in model order: pre-contrast, FLAIR, post-contrast.
      grid: (D, H, W): the model-order shape before in-plane resampling.
      spacing: mm between slices, rows and columns of that grid, or None where the file gives no
        spatial unit.
      flair_only: a 3D file, FLAIR standing in for pre- and post-contrast.
      intensities: how each channel was mapped to uint8 (see to_uint8).
    """

    path: str
    image: object
    images: np.ndarray
    grid: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    flair_only: bool
    intensities: tuple[str, ...]


def spacing_of(image) -> tuple[float, float, float] | None:
    """Voxel spacing in mm along (slice, row, col), or None without a spatial unit in the header."""
    unit = image.header.get_xyzt_units()[0]
    scale = {"mm": 1.0, "meter": 1000.0, "micron": 0.001}.get(unit)
    if scale is None:
        return None
    sizes = nib.affines.voxel_sizes(image.affine) * scale
    order = ornt_transform(io_orientation(image.affine), axcodes2ornt(MODEL_AXES))[:, 0].astype(int)
    out = [0.0, 0.0, 0.0]
    for stored_axis, model_axis in enumerate(order):
        out[model_axis] = float(sizes[stored_axis])
    return tuple(out)


def read_volume(path) -> Volume:
    """A NIfTI file as model-order uint8 slices: channels, orientation, intensities, in-plane size.

    A 3D file is FLAIR alone: it stands in for pre- and post-contrast, as the dataset fills a
    missing sequence. A 4D file holds pre-contrast, FLAIR and post-contrast in its last axis.

    Raises:
      DataError: see `load`.
    """
    image, data = load(path)
    data = to_model_order(data, image.affine)
    channels = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
    mapped = [to_uint8(c) for c in channels]
    if len(mapped) == 1:
        mapped = mapped * 3  # FLAIR in place of pre- and post-contrast
    stacked = np.stack([m for m, _ in mapped], axis=-1)
    return Volume(str(path), image, resize(stacked, (SLICE_SIZE, SLICE_SIZE)), tuple(data.shape[:3]),
                  spacing_of(image), data.ndim == 3, tuple(how for _, how in mapped))


def read_mask(path, volume: Volume) -> np.ndarray:
    """A ground-truth mask on `volume`'s grid, as the model's slices: bool [D, SLICE_SIZE, SLICE_SIZE].

    Raises:
      DataError: unreadable, or not a 3D mask on the image's grid (shape and affine).
    """
    image, data = load(path)
    if data.ndim != 3 or data.shape != volume.image.shape[:3] or \
            not np.allclose(image.affine, volume.image.affine, atol=1e-4):
        raise DataError(f"{path}: not on the grid of {volume.path} (shape {data.shape} against "
                        f"{volume.image.shape[:3]}, or another affine); a mask must be 3D on its image's grid")
    return resize(to_model_order(data, image.affine) > 0, (SLICE_SIZE, SLICE_SIZE), mask=True)


def mask_image(mask: np.ndarray, volume: Volume):
    """A model-order mask at the model's slice size as a uint8 0/1 image on the volume's own grid:
    the same shape (its first three axes), affine, header, and sform and qform codes."""
    reference = volume.image
    native = resize(np.asarray(mask, bool), volume.grid[1:], mask=True)
    stored = from_model_order(native.astype(np.uint8), reference.affine)
    header = reference.header.copy()
    out = type(reference)(stored, reference.affine, header=header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"], out.header["cal_max"] = 0, 1
    for get, set_ in ((reference.header.get_sform, out.header.set_sform),
                      (reference.header.get_qform, out.header.set_qform)):
        affine, code = get(coded=True)
        set_(affine, int(code))
    return out


def write_mask(path, mask: np.ndarray, volume: Volume) -> None:
    """Writes `mask_image` atomically (an interrupted run leaves no half-written file)."""
    out = mask_image(mask, volume)
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    atomic.atomic_write(str(path), lambda tmp: nib.save(out, tmp), suffix=suffix, durable=False)


# --- a labelled folder: <patient>.nii.gz and <patient>_mask.nii.gz --------------------------------


def holds_volumes(folder) -> bool:
    """Whether a folder holds NIfTI files directly (the layout `--mode=evaluate` reads).

    Raises:
      DataError: it holds Kaggle patient folders of TIFF slices as well.
    """
    root = pathlib.Path(folder)
    if not root.is_dir() or not any(is_nifti(p) for p in root.iterdir() if p.is_file()):
        return False
    try:
        patients = lgg.find_patient_dirs(root)
    except DataError:
        patients = []
    if patients:
        raise DataError(f"{folder}: holds both NIfTI files and patient folders of TIFF slices "
                        f"(e.g. {patients[0].name}); give one kind per folder")
    return True


def pairs(folder) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """Each `<patient>.nii[.gz]` of a folder with its `<patient>_mask.nii[.gz]`, by patient name.

    Raises:
      DataError: an image without a mask, a mask without an image, or a name given twice.
    """
    files = sorted(p for p in pathlib.Path(folder).iterdir() if p.is_file() and is_nifti(p)
                   and not p.name.startswith("."))
    images, masks = {}, {}
    for p in files:
        table, name = (masks, stem(p)[: -len(MASK_SUFFIX)]) if is_mask(p) else (images, stem(p))
        if name in table:
            raise DataError(f"{p}: {name} given twice (also {table[name].name})")
        table[name] = p
    for name in sorted(images.keys() ^ masks.keys()):
        if name in images:
            raise DataError(f"{images[name]}: no mask (expected {name}{MASK_SUFFIX}.nii.gz beside it)")
        raise DataError(f"{masks[name]}: a mask without its image {name}.nii.gz")
    return [(images[n], masks[n]) for n in sorted(images)]


@dataclasses.dataclass(frozen=True, eq=False)
class NiftiDataset(LggDataset):
    """An LggDataset read from NIfTI volumes, with each patient's voxel spacing where known.

    spacing: {patient: (slice, row, col) mm at the model's slice size}, or None when some volume
    gives no spatial unit (distances are then in pixels, as for the Kaggle TIFFs).
    """

    spacing: dict | None = None


def load_dataset(folder) -> NiftiDataset:
    """Every `<patient>.nii[.gz]` with its mask, as the slices the TIFF loader would give.

    Raises:
      DataError: a bad file or pairing (named).
    """
    records, images, masks, spacing = [], [], [], {}
    for image_path, mask_path in pairs(folder):
        volume = read_volume(image_path)
        patient = stem(image_path)
        found = lgg.PATIENT_DIR_RE.match(patient)
        institution = found.group(1) if found else "-"
        images.append(volume.images)
        masks.append(read_mask(mask_path, volume))
        records += [SliceRecord(patient, institution, k + 1, str(image_path), str(mask_path))
                    for k in range(len(volume.images))]
        if volume.spacing is not None:
            d, h, w = volume.grid
            spacing[patient] = (volume.spacing[0], volume.spacing[1] * h / SLICE_SIZE,
                                volume.spacing[2] * w / SLICE_SIZE)
    if not records:
        raise DataError(f"{folder}: no <patient>.nii.gz with <patient>{MASK_SUFFIX}.nii.gz found")
    patients = {r.patient for r in records}
    if spacing and len(spacing) < len(patients):
        log.warning(f"{len(patients) - len(spacing)} of {len(patients)} volumes give no spatial "
                    "unit: surface distances are in pixels for all")
    known = spacing if len(spacing) == len(patients) else None
    masks_u8 = np.concatenate(masks).astype(np.uint8)
    log.info(f"loaded {len(records)} slices ({int(masks_u8.reshape(len(masks_u8), -1).any(1).sum())} "
             f"lesion-positive) of {len(patients)} NIfTI volumes from {folder}")
    return NiftiDataset(tuple(records), np.concatenate(images), masks_u8, spacing=known)


# --- python -m data.nifti: kaggle_3m <-> NIfTI ----------------------------------------------------


def _kaggle_image(model_order: np.ndarray):
    """A model-order array as a NIfTI image stored the usual way (KAGGLE_STORAGE), no spatial unit
    (the Kaggle slices carry no spacing)."""
    image = nib.Nifti1Image(model_order, model_affine())
    image = image.as_reoriented(ornt_transform(axcodes2ornt(MODEL_AXES), axcodes2ornt(KAGGLE_STORAGE)))
    image.set_qform(image.affine, 2)
    image.set_sform(image.affine, 2)
    return image


def from_kaggle(data_dir, out_dir) -> list[str]:
    """Writes each kaggle_3m patient as `<patient>.nii.gz` (4D uint8: pre-contrast, FLAIR,
    post-contrast) and `<patient>_mask.nii.gz` (uint8 0/1), and copies data.csv.

    Returns:
      The patients written.

    Raises:
      DataError: no patients, or a bad slice (named).
    """
    records, problems = lgg.scan(data_dir)
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {data_dir}:\n{lgg.format_problems(problems)}")
    os.makedirs(out_dir, exist_ok=True)
    by_patient: dict[str, list[SliceRecord]] = {}
    for r in records:
        by_patient.setdefault(r.patient, []).append(r)
    for patient, slices in by_patient.items():
        images = np.stack([tifffile.imread(r.image_path) for r in slices])
        masks = np.stack([tifffile.imread(r.mask_path) > 0 for r in slices]).astype(np.uint8)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"{slices[0].image_path}: expected uint8 HxWx3 slices, got "
                            f"{images.dtype} {images.shape[1:]}")
        for suffix, array in (("", images), (MASK_SUFFIX, masks)):
            path = os.path.join(out_dir, f"{patient}{suffix}.nii.gz")
            atomic.atomic_write(path, lambda tmp, a=array: nib.save(_kaggle_image(a), tmp), suffix=".nii.gz")
    csv = os.path.join(lgg.find_dataset_root(data_dir), "data.csv")
    if os.path.isfile(csv):
        shutil.copyfile(csv, os.path.join(out_dir, "data.csv"))
    return sorted(by_patient)


def to_kaggle(folder, out_dir) -> list[str]:
    """Writes a folder of `<patient>.nii.gz` + mask as kaggle_3m patient folders of 256x256 TIFF
    slices, numbered from 1 (most inferior) up, as the model reads them.

    Returns:
      The patients written.
    """
    dataset = load_dataset(folder)
    for i, r in enumerate(dataset.records):
        patient_dir = os.path.join(out_dir, r.patient)
        os.makedirs(patient_dir, exist_ok=True)
        base = os.path.join(patient_dir, f"{r.patient}_{r.slice_number}")
        atomic.atomic_write(base + ".tif", lambda tmp: tifffile.imwrite(tmp, dataset.images[i]), suffix=".tif")
        atomic.atomic_write(base + "_mask.tif", lambda tmp: tifffile.imwrite(tmp, dataset.masks[i] * 255),
                            suffix=".tif")
    csv = os.path.join(folder, "data.csv")
    if os.path.isfile(csv):
        shutil.copyfile(csv, os.path.join(out_dir, "data.csv"))
    return dataset.patients


def main(argv) -> int:
    from absl import flags

    flags_ = flags.FLAGS
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    try:
        if flags_.to_kaggle:
            written = to_kaggle(flags_.data_dir, flags_.out)
        else:
            written = from_kaggle(flags_.data_dir, flags_.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} patient(s) to {flags_.out}")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    flags.DEFINE_string("data_dir", None, "A kaggle_3m folder (or, with --to_kaggle, a folder of "
                        "<patient>.nii.gz and <patient>_mask.nii.gz).", required=True)
    flags.DEFINE_string("out", None, "Folder to write into.", required=True)
    flags.DEFINE_bool("to_kaggle", False, "Convert NIfTI back to kaggle_3m patient folders of TIFF slices.")
    app.run(main)
