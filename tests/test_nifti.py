"""NIfTI volumes: orientation, channels and intensities, masks on the input's grid, predict and evaluate."""

from __future__ import annotations

import csv
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


def _model_order(image) -> np.ndarray:
    """The test's own reading of a stored image into [slice, row, col] (nibabel, not data.nifti)."""
    to_model = ornt_transform(io_orientation(image.affine), axcodes2ornt(("S", "P", "L")))
    return nib.orientations.apply_orientation(np.asanyarray(image.dataobj), to_model)


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


# --- --mode=predict and --mode=evaluate on NIfTI -------------------------------------------------


def _shift_model(size: int = SIZE) -> keras.Model:
    """Lesion where the FLAIR of the row above is bright, nudged by the pre-contrast to the left:
    not flip-symmetric, so a volume read in another orientation gives another mask."""
    inputs = keras.Input((size, size, 3))
    layer = keras.layers.Conv2D(1, 3, padding="same", dtype="float32")
    model = keras.Model(inputs, layer(inputs))
    kernel = np.zeros((3, 3, 3, 1), np.float32)
    kernel[0, 1, 1, 0], kernel[1, 0, 0, 0] = 20.0, 4.0
    layer.set_weights([kernel, np.array([-13.0], np.float32)])
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
    """A run whose recorded inference standardises each volume and removes small 3D components."""
    path = tmp_path_factory.mktemp("nifti_run") / "run"
    path.mkdir()
    _shift_model().save(str(path / "final_model.keras"))
    (path / "inference.json").write_text(json.dumps({
        "members": ["final_model.keras"], "normalize": "volume", "min_component_voxels": 20,
        "chosen_on": "a test"}))
    return path


def _engine(tmp, run: pathlib.Path, *, mode: str, **values) -> subprocess.CompletedProcess:
    config = model_only_config(tmp, image_size=SIZE, mode=mode, model_dir=str(run), batch_size=8, **values)
    return run_engine(config_flags(config))


def _variants(source: pathlib.Path, out: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every storage of one converted volume: orientations, dtypes with offsets, FLAIR alone."""
    # data.nifti stores a Kaggle volume [col, row, slice, channel].
    model_order = np.asanyarray(nib.load(source).dataobj).transpose(2, 1, 0, 3)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {name: (model_order, axes) for name, axes in AXES.items()}
    arrays["int16_offset"] = (model_order.astype(np.int16) - 1000, AXES["ras"])
    arrays["float32"] = (model_order.astype(np.float32), AXES["lps"])
    arrays["flair_only"] = (model_order[..., 1].astype(np.float32), AXES["permuted"])
    arrays["float32_scaled"] = (model_order.astype(np.float32) / 255.0 * 3.7 - 0.25, AXES["ras"])
    paths = {}
    for name, (array, axes) in arrays.items():
        paths[name] = out / name / source.name
        paths[name].parent.mkdir()
        nib.save(_stored(array, axes), paths[name])
    return paths


def _flair_only_tree(root: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A copy of a kaggle_3m tree whose pre- and post-contrast are its FLAIR."""
    records, _ = lgg.scan(root)
    for r in records:
        folder = out / r.patient
        folder.mkdir(parents=True, exist_ok=True)
        image = tifffile.imread(r.image_path)
        tifffile.imwrite(folder / os.path.basename(r.image_path), np.repeat(image[..., 1:2], 3, axis=-1))
        shutil.copy(r.mask_path, folder)
    return out


def _predicted_tiffs(out: pathlib.Path) -> dict[str, np.ndarray]:
    """The masks predict wrote for each patient folder, stacked in slice-number order."""
    number = lambda f: int(f.name.rsplit("_", 2)[1])  # noqa: E731
    return {folder.name: np.stack([tifffile.imread(f) > 0 for f in sorted(folder.glob("*_mask.tif"), key=number)])
            for folder in sorted(out.iterdir()) if folder.is_dir()}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not (a.any() or b.any()) else 2.0 * (a & b).sum() / (a.sum() + b.sum())


def _check_variants(tree: pathlib.Path, run: pathlib.Path, tmp: pathlib.Path) -> None:
    """Predict on each storage variant of each patient equals predict on its TIFF slices."""
    converted = tmp / "nii"
    nifti.from_kaggle(tree, converted)
    tiff_masks = {}
    for name, source in (("tiff", tree), ("flair_tiff", _flair_only_tree(tree, tmp / "flair_tree"))):
        proc = _engine(tmp, run, mode="predict", input=str(source), output=str(tmp / name))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        tiff_masks[name] = _predicted_tiffs(tmp / name)
    variants = {p: _variants(converted / f"{p}.nii.gz", tmp / "variants" / p) for p in tiff_masks["tiff"]}
    for kind in next(iter(variants.values())):
        folder = tmp / f"in_{kind}"
        folder.mkdir()
        for p in variants:
            os.symlink(variants[p][kind], folder / variants[p][kind].name)
        proc = _engine(tmp, run, mode="predict", input=str(folder), output=str(tmp / f"out_{kind}"))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if kind == "flair_only":
            assert "FLAIR only (3D): pre- and post-contrast are absent" in proc.stdout
        for p in variants:
            stored = nib.load(variants[p][kind])
            mask = nib.load(tmp / f"out_{kind}" / f"{p}_mask.nii.gz")
            assert mask.shape == stored.shape[:3] and mask.get_data_dtype() == np.uint8, kind
            np.testing.assert_array_equal(mask.affine, stored.affine)
            assert mask.header.get_sform(coded=True)[1] == 4 and mask.header.get_qform(coded=True)[1] == 1
            values = np.asarray(mask.dataobj)
            assert set(np.unique(values)) <= {0, 1}
            got = _model_order(mask) > 0
            expected = tiff_masks["flair_tiff" if kind == "flair_only" else "tiff"][p]
            assert expected.any(), p
            if kind == "float32_scaled":  # windowed intensities: the same masks up to rounding
                assert _dice(got, expected) >= 0.97, (kind, p, _dice(got, expected))
            else:  # the uint8 values of the TIFFs, whatever the storage: the same masks
                np.testing.assert_array_equal(got, expected, err_msg=f"{kind} {p}")
        record = json.loads((tmp / f"out_{kind}" / "brainseg_predictions.json").read_text())
        assert record == {"written": sorted(f"{p}_mask.nii.gz" for p in variants)}


def test_predict_on_every_storage_equals_the_tiff_path(synthetic_tree, run_dir, tmp_path):
    _check_variants(synthetic_tree, run_dir, tmp_path)


@pytest.fixture
def real_tree(lgg_real_data_dir, tmp_path) -> pathlib.Path:
    """Two real patients (the first of two institutions), linked into a kaggle_3m folder."""
    root = tmp_path / "real" / "kaggle_3m"
    root.mkdir(parents=True)
    patients = lgg.find_patient_dirs(lgg_real_data_dir)
    chosen = [patients[0], next(p for p in patients if p.name.split("_")[1] != patients[0].name.split("_")[1])]
    for p in chosen:
        os.symlink(p, root / p.name)
    return root


@pytest.mark.real_data
def test_predict_on_every_storage_of_real_volumes_equals_the_tiff_path(real_tree, run_dir, tmp_path):
    _check_variants(real_tree, run_dir, tmp_path)


@pytest.fixture(scope="module")
def converted(synthetic_tree, tmp_path_factory) -> pathlib.Path:
    """The synthetic patients converted by data.nifti: a labelled NIfTI folder."""
    out = tmp_path_factory.mktemp("converted") / "nii"
    nifti.from_kaggle(synthetic_tree, out)
    return out


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]


@pytest.mark.parametrize("kind", ["2d", "4d_two_volumes", "5d", "corrupt_gzip", "not_nifti", "text_as_gzip",
                                  "mixed_with_tiff", "nii_beside_nii_gz"])
def test_bad_input_is_refused_with_one_line_and_nothing_written(converted, run_dir, tmp_path, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    good = next(converted.glob("*[0-9].nii.gz"))
    shutil.copy(good, folder / good.name)  # a good volume beside the bad one: not written either
    if kind == "mixed_with_tiff":
        bad = folder / "slice_1.tif"
        tifffile.imwrite(bad, np.zeros((256, 256, 3), np.uint8))
    elif kind == "nii_beside_nii_gz":
        bad = folder / good.name[: -len(".gz")]
        bad.write_bytes(gzip.decompress(good.read_bytes()))
    else:
        made = _bad_files(tmp_path / "bad", good)[kind]
        bad = folder / made.name
        shutil.move(made, bad)
    out = tmp_path / "out"
    proc = _engine(tmp_path, run_dir, mode="predict", input=str(folder), output=str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and bad.name in errors[0], proc.stderr
    assert not out.exists()


def test_a_single_file_input_and_the_ownership_of_masks(converted, run_dir, tmp_path):
    source = next(converted.glob("*[0-9].nii.gz"))
    out = tmp_path / "out"
    target = out / f"{nifti.stem(source)}_mask.nii.gz"
    first = _engine(tmp_path, run_dir, mode="predict", input=str(source), output=str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["brainseg_predictions.json", target.name])
    # Its own mask is replaced; a mask it did not write is never.
    again = _engine(tmp_path, run_dir, mode="predict", input=str(source), output=str(out))
    assert again.returncode == 0, again.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / target.name).write_bytes(b"a user's mask")
    refused = _engine(tmp_path, run_dir, mode="predict", input=str(source), output=str(foreign))
    assert refused.returncode == 2 and "brainseg did not write it" in _error_lines(refused)[0]
    assert (foreign / target.name).read_bytes() == b"a user's mask"
    # A mask given as --input is ground truth, not a volume.
    mask_input = _engine(tmp_path, run_dir, mode="predict", input=str(converted / target.name), output=str(out))
    assert mask_input.returncode == 2 and "ground truth" in _error_lines(mask_input)[0]


def test_predicting_in_place_skips_volumes_with_ground_truth(converted, run_dir, tmp_path):
    folder = tmp_path / "labelled"
    shutil.copytree(converted, folder)
    extra = folder / "unlabelled.nii.gz"
    shutil.copy(next(converted.glob("*[0-9].nii.gz")), extra)
    truth = {p.name: p.read_bytes() for p in folder.glob("*_mask.nii.gz")}
    proc = _engine(tmp_path, run_dir, mode="predict", input=str(folder), output=str(folder))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Skipping 2 volume(s)" in proc.stdout
    assert {p.name: p.read_bytes() for p in folder.glob("*_mask.nii.gz") if p.name in truth} == truth
    assert json.loads((folder / "brainseg_predictions.json").read_text()) == {"written": ["unlabelled_mask.nii.gz"]}


def test_a_mask_lands_on_a_grid_of_another_size(synthetic_tree, converted, run_dir, tmp_path):
    """A volume of 230x200 slices at 0.9 x 1.1 mm: its mask on its own grid, where the TIFF path's is."""
    patient = sorted(_tiff_volumes(synthetic_tree))[0]
    image = nib.load(converted / f"{patient}.nii.gz")
    cropped = np.asanyarray(image.dataobj)[20:250, 30:230]  # [col, row, slice, channel]
    affine = image.affine @ np.diag([0.9, 1.1, 3.0, 1.0])
    stored = nib.Nifti1Image(cropped, affine)
    stored.header.set_xyzt_units("mm")
    nib.save(stored, tmp_path / "small.nii.gz")
    proc = _engine(tmp_path, run_dir, mode="predict", input=str(tmp_path / "small.nii.gz"), output=str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "200x230 in-plane x 12 slices" in proc.stdout  # rows x columns: stored [col, row, slice]
    mask = nib.load(tmp_path / "out" / "small_mask.nii.gz")
    assert mask.shape == (230, 200, 12)
    np.testing.assert_array_equal(mask.affine, nib.load(tmp_path / "small.nii.gz").affine)
    tiff = _engine(tmp_path, run_dir, mode="predict", input=str(synthetic_tree), output=str(tmp_path / "tiff"))
    assert tiff.returncode == 0
    expected = _predicted_tiffs(tmp_path / "tiff")[patient]  # [slice, row, col] at 256x256
    got = _model_order(mask) > 0  # [slice, row, col] at 200x230
    assert got.shape == (12, 200, 230)
    # Resampled 200x230 -> 256 -> 200x230 and standardised on a smaller field of view: close, not equal.
    assert _dice(got, expected[:, 30:230, 20:250]) > 0.8


def _evaluate(tmp: pathlib.Path, run: pathlib.Path, data_dir, name: str) -> tuple[dict, list[dict], str]:
    """evaluate --split=all of data_dir with the run's model, in a run directory of its own."""
    own = tmp / name
    own.mkdir()
    for f in ("final_model.keras", "inference.json"):
        shutil.copy(run / f, own / f)
    proc = _engine(tmp, own, mode="evaluate", split="all", data_dir=str(data_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(own / "per_patient_all.csv") as f:
        rows = list(csv.DictReader(f))
    return json.loads((own / "eval_all.json").read_text()), rows, (own / "eval_all.md").read_text()


def _check_evaluate_equals(tree: pathlib.Path, run: pathlib.Path, tmp: pathlib.Path) -> None:
    nifti.from_kaggle(tree, tmp / "nii")
    tiff, tiff_rows, _ = _evaluate(tmp, run, tree, "on_tiff")
    volumes, volume_rows, md = _evaluate(tmp, run, tmp / "nii", "on_nifti")
    assert volume_rows == tiff_rows and len(tiff_rows) == 2
    assert any(float(r["dice"]) not in (0.0, 1.0) for r in tiff_rows)  # lesions found and missed
    differ = {"data_dir", "command", "seconds", "seconds_inference", "seconds_metrics", "model"}
    assert {k: v for k, v in volumes.items() if k not in differ} == {k: v for k, v in tiff.items() if k not in differ}
    assert volumes["distance_unit"] == "px" and "surface metrics in pixels" in md


def test_evaluate_on_nifti_equals_evaluate_on_the_tiffs(synthetic_tree, run_dir, tmp_path):
    _check_evaluate_equals(synthetic_tree, run_dir, tmp_path)


@pytest.mark.real_data
def test_evaluate_on_real_nifti_equals_evaluate_on_the_tiffs(real_tree, run_dir, tmp_path):
    _check_evaluate_equals(real_tree, run_dir, tmp_path)


def test_evaluate_gives_distances_in_mm_where_the_volumes_give_spacing(converted, run_dir, tmp_path):
    folder = tmp_path / "mm_volumes"
    folder.mkdir()
    for path in converted.glob("*.nii.gz"):  # 2 mm voxels, said in mm
        image = nib.load(path)
        scaled = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
        scaled.header.set_xyzt_units("mm")
        nib.save(scaled, folder / path.name)
    pixels, pixel_rows, _ = _evaluate(tmp_path, run_dir, converted, "px")
    mm, mm_rows, md = _evaluate(tmp_path, run_dir, folder, "mm")
    assert mm["distance_unit"] == "mm" and "surface metrics in mm" in md and "| HD95 (mm) |" in md
    for p, m in zip(pixel_rows, mm_rows):
        assert float(m["hd95"]) == pytest.approx(2 * float(p["hd95"]), rel=1e-5)
        assert float(m["assd"]) == pytest.approx(2 * float(p["assd"]), rel=1e-5)
        assert m["dice"] == p["dice"]
    assert any(float(p["hd95"]) > 0 for p in pixel_rows)


def test_evaluate_refuses_an_image_without_its_mask(converted, run_dir, tmp_path):
    folder = tmp_path / "half"
    shutil.copytree(converted, folder)
    lonely = next(folder.glob("*_mask.nii.gz"))
    lonely.unlink()
    own = tmp_path / "run"
    shutil.copytree(run_dir, own)
    proc = _engine(tmp_path, own, mode="evaluate", split="all", data_dir=str(folder))
    assert proc.returncode == 2
    errors = _error_lines(proc)
    assert len(errors) == 1 and "no mask" in errors[0] and lonely.name[: -len("_mask.nii.gz")] in errors[0]
