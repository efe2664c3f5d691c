"""NIfTI volumes: orientation, channels and intensities, masks on the input's grid, predict and evaluate."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import nibabel as nib
import numpy as np
import pytest
import tifffile
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from data import lgg, nifti, synthetic
from data.lgg import DataError
from tests.helpers import REPO, config_flags, model_only_config, run_engine

SIZE = 64  # the model's input size
# Storage layouts of one volume: the usual LPS, RAS, flipped axes, axes in another order.
AXES = {"lps": ("L", "P", "S"), "ras": ("R", "A", "S"), "flipped": ("R", "P", "I"),
        "permuted": ("P", "S", "L"), "permuted_flipped": ("A", "I", "R")}


def _stored(model_order: np.ndarray, axes, **header) -> nib.Nifti1Image:
    """A model-order array stored with the given axis codes (nibabel reorients data and affine)."""
    image = nib.Nifti1Image(model_order, nifti.model_affine())
    image = image.as_reoriented(ornt_transform(axcodes2ornt(nifti.MODEL_AXES), axcodes2ornt(axes)))
    image.set_qform(image.affine, header.get("qform_code", 1))
    image.set_sform(image.affine, header.get("sform_code", 4))
    return image


# --- orientation, channels, intensities (no model) ------------------------------------------------


def test_model_axes_are_the_kaggle_convention():
    assert nib.aff2axcodes(nifti.model_affine()) == ("S", "P", "L")
    # Converted Kaggle volumes are stored [col, row, slice]: columns to the left, rows posterior.
    assert nifti.KAGGLE_STORAGE == ("L", "P", "S")


@pytest.mark.parametrize("axes", list(AXES.values()), ids=list(AXES))
def test_any_storage_reads_in_model_order_and_the_mask_goes_back_on_its_grid(tmp_path, axes):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, (5, 256, 256, 3), dtype=np.uint8)  # [slice, row, col, channel]
    path = tmp_path / "v.nii.gz"
    image = _stored(volume, axes, qform_code=1, sform_code=4)
    nib.save(image, path)
    read = nifti.read_volume(path)
    np.testing.assert_array_equal(read.images, volume)
    assert read.grid == (5, 256, 256) and not read.flair_only and read.intensities == ("kept",) * 3

    mask = volume[..., 1] > 200  # a model-order mask: where the FLAIR is bright
    out = nifti.mask_image(mask, read)
    assert out.shape == image.shape[:3] and out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, image.affine)
    assert out.header.get_sform(coded=True)[1] == 4 and out.header.get_qform(coded=True)[1] == 1
    # Voxel by voxel on the input's grid: the mask is 1 exactly where the stored FLAIR is bright.
    np.testing.assert_array_equal(np.asarray(out.dataobj), (np.asarray(image.dataobj)[..., 1] > 200))


def test_a_3d_volume_is_flair_standing_in_for_pre_and_post_contrast(tmp_path):
    flair = np.random.default_rng(1).integers(0, 200, (4, 256, 256)).astype(np.float32)
    nib.save(_stored(flair, AXES["ras"]), tmp_path / "f.nii")
    read = nifti.read_volume(tmp_path / "f.nii")
    assert read.flair_only
    for channel in range(3):
        np.testing.assert_array_equal(read.images[..., channel], flair.astype(np.uint8))


def test_intensities_map_to_the_kaggle_scale():
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 256, (6, 32, 32)).astype(np.uint8)
    volume[0, 0, 0] = 0
    same = lambda x: nifti.to_uint8(x)  # noqa: E731
    # A uint8 volume in any dtype is kept; with an offset it is shifted back, never stretched.
    for stored, how in ((volume, "kept"), (volume.astype(np.float32), "kept"),
                        (volume.astype(np.int16) - 1000, "shifted"), (volume.astype(np.uint16) + 300, "shifted")):
        out, mapped = same(stored)
        assert mapped == how and out.dtype == np.uint8
        np.testing.assert_array_equal(out, volume)
    # Anything else is windowed: 0.5th percentile to 0, 99.5th to KAGGLE_P995, the tail above kept.
    scaled = volume.astype(np.float32) / 255.0 * 3.7 - 0.25
    scaled[1, :3, :3] = 5.5  # a small bright lesion: above the 99.5th percentile
    out, mapped = same(scaled)
    low, high = np.percentile(scaled, [0.5, 99.5])
    assert mapped == "windowed"
    assert out[scaled <= low].max() == 0
    assert abs(float(np.percentile(out, 99.5)) - nifti.KAGGLE_P995) <= 1
    assert out.max() > nifti.KAGGLE_P995 + 50  # the bright tail is not clipped at the percentile
    assert np.all(np.diff(out.ravel()[np.argsort(scaled.ravel(), kind="stable")].astype(int)) >= 0)
    # Negative values, NaN and a constant volume are mapped, not refused.
    with_nan = scaled.copy()
    with_nan[0, :2] = np.nan
    out, _ = same(with_nan)
    assert (out[0, :2] == 0).all()
    assert (same(np.full((2, 4, 4), -7.5, np.float32))[0] == 0).all()


def test_inplane_resampling_keeps_a_mask_where_it_was():
    mask = np.zeros((2, 230, 200), bool)
    mask[:, 60:150, 40:120] = True
    up = nifti.resize(mask, (256, 256), mask=True)
    back = nifti.resize(up, (230, 200), mask=True)
    assert up.shape == (2, 256, 256) and back.shape == mask.shape
    assert (back ^ mask).sum() <= 0.01 * mask.sum()


def _write(path: pathlib.Path, array, affine=None) -> pathlib.Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def _bad_files(folder: pathlib.Path, good: pathlib.Path) -> dict[str, pathlib.Path]:
    """One file per kind of bad input, each named for what is wrong with it."""
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.nii.gz"
    data = good.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    not_nifti = folder / "not_nifti.nii"
    tifffile.imwrite(not_nifti, np.zeros((8, 8), np.uint8))  # a TIFF under a NIfTI name
    not_gzip = folder / "text.nii.gz"
    not_gzip.write_text("not a volume\n")
    return {"2d": _write(folder / "flat.nii.gz", np.zeros((8, 8), np.uint8)),
            "4d_two_volumes": _write(folder / "two.nii.gz", np.zeros((8, 8, 4, 2), np.uint8)),
            "5d": _write(folder / "five.nii.gz", np.zeros((8, 8, 4, 3, 2), np.uint8)),
            "corrupt_gzip": corrupt, "not_nifti": not_nifti, "text_as_gzip": not_gzip}


def test_bad_files_are_named_with_what_is_wrong(tmp_path):
    good = _write(tmp_path / "good.nii.gz", np.zeros((8, 8, 4), np.uint8))
    reasons = {"2d": "2D", "4d_two_volumes": "4D with 2 volumes", "5d": "5D", "corrupt_gzip": "not a readable",
               "not_nifti": "not a readable", "text_as_gzip": "not a readable"}
    for kind, path in _bad_files(tmp_path / "bad", good).items():
        with pytest.raises(DataError, match=reasons[kind]) as info:
            nifti.read_volume(path)
        assert str(path) in str(info.value), kind
        assert "\n" not in str(info.value)


# --- python -m data.nifti ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_tree(tmp_path_factory) -> pathlib.Path:
    """Two synthetic patients of 12 slices each: their kaggle_3m folder."""
    root = pathlib.Path(synthetic.write_dataset(str(tmp_path_factory.mktemp("syn")), patients=2, seed=3))
    for patient in lgg.find_patient_dirs(root):
        for f in patient.iterdir():
            number = int(f.stem.split("_")[4])
            if number > 12:
                f.unlink()
    return root


def _tiff_volumes(root: pathlib.Path, suffix: str = "") -> dict[str, np.ndarray]:
    """Each patient's slices (or masks, suffix="_mask") stacked in slice-number order."""
    records, problems = lgg.scan(root)
    assert not problems
    out: dict[str, list] = {}
    for r in records:
        out.setdefault(r.patient, []).append(tifffile.imread(r.mask_path if suffix else r.image_path))
    return {p: np.stack(v) for p, v in out.items()}


def test_conversion_to_nifti_and_back_is_exact(synthetic_tree, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data.nifti", f"--data_dir={synthetic_tree}",
                           f"--out={tmp_path / 'nii'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    patients = sorted(_tiff_volumes(synthetic_tree))
    assert sorted(p.name for p in (tmp_path / "nii").iterdir()) == sorted(
        [f"{p}.nii.gz" for p in patients] + [f"{p}_mask.nii.gz" for p in patients] + ["data.csv"])
    image = nib.load(tmp_path / "nii" / f"{patients[0]}.nii.gz")
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S") and image.shape == (256, 256, 12, 3)
    assert image.get_data_dtype() == np.uint8
    # Stored [col, row, slice]: a slice's rows and columns are the TIFF's, transposed.
    tiffs = _tiff_volumes(synthetic_tree)
    np.testing.assert_array_equal(np.asarray(image.dataobj)[:, :, 4], tiffs[patients[0]][4].transpose(1, 0, 2))

    proc = subprocess.run([sys.executable, "-m", "data.nifti", "--to_kaggle", f"--data_dir={tmp_path / 'nii'}",
                           f"--out={tmp_path / 'back'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for suffix in ("", "_mask"):
        before, after = _tiff_volumes(synthetic_tree, suffix), _tiff_volumes(tmp_path / "back", suffix)
        assert sorted(before) == sorted(after)
        for p in before:
            np.testing.assert_array_equal(after[p], before[p])
    assert (tmp_path / "back" / "data.csv").read_text() == (synthetic_tree / "data.csv").read_text()


def test_conversion_refuses_a_folder_without_patients(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data.nifti", f"--data_dir={tmp_path}", f"--out={tmp_path / 'o'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "no patients found" in proc.stderr
    assert not (tmp_path / "o").exists()
