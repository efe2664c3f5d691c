"""Tests for the synthetic LGG dataset writer (data/synthetic.py)."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
FOLDER = re.compile(r"TCGA_(CS|DU|EZ|FG|HT)_[0-9A-Z]{4}_(19|20)\d{6}")
# The first line of the real kaggle_3m/data.csv.
REAL_HEADER = (
    "Patient,RNASeqCluster,MethylationCluster,miRNACluster,CNCluster,RPPACluster,OncosignCluster,"
    "COCCluster,histological_type,neoplasm_histologic_grade,tumor_tissue_site,laterality,"
    "tumor_location,gender,age_at_initial_pathologic,race,ethnicity,death01"
)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return pathlib.Path(synthetic.write_dataset(str(out), patients=3, seed=0, workers=1))


@pytest.fixture(scope="module")
def rendered():
    """Eight patients in memory, split back into patients by slice number."""
    plan = sorted(synthetic._patients(8, 1), key=lambda p: p.folder)
    images, masks = synthetic.render_arrays(patients=8, seed=1)
    bounds = np.cumsum([0] + [p.num_slices for p in plan])
    return [(images[a:b], masks[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def test_layout_names_shapes_and_dtypes(written):
    assert written.name == "kaggle_3m"
    folders = sorted(d for d in os.listdir(written) if (written / d).is_dir())
    assert len(folders) == 3
    for folder in folders:
        assert FOLDER.fullmatch(folder), folder
        files = set(os.listdir(written / folder))
        n = len(files) // 2
        expected = {f"{folder}_{i}.tif" for i in range(1, n + 1)} | {f"{folder}_{i}_mask.tif" for i in range(1, n + 1)}
        assert files == expected
        assert 20 <= n <= 88
        for i in (1, n // 2, n):
            image = tifffile.imread(written / folder / f"{folder}_{i}.tif")
            mask = tifffile.imread(written / folder / f"{folder}_{i}_mask.tif")
            assert image.shape == (256, 256, 3) and image.dtype == np.uint8
            assert mask.shape == (256, 256) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
            assert image.max() > 100  # the head is there
        masks = [tifffile.imread(written / folder / f"{folder}_{i}_mask.tif") for i in range(1, n + 1)]
        positive = sum(bool(m.any()) for m in masks)
        assert 0 < positive < n  # a lesion, and most masks empty


def test_data_csv_has_real_header_and_one_row_per_patient(written):
    lines = (written / "data.csv").read_text().splitlines()
    assert lines[0] == REAL_HEADER
    patients = sorted("_".join(d.split("_")[:3]) for d in os.listdir(written) if d.startswith("TCGA"))
    assert sorted(line.split(",")[0] for line in lines[1:]) == patients
    assert all(line.count(",") == REAL_HEADER.count(",") for line in lines[1:])


@pytest.mark.real_data
def test_header_matches_real_data_csv():
    data_dir = os.environ.get("LGG_DATA_DIR")
    if not data_dir:
        pytest.skip("LGG_DATA_DIR not set")
    csv = next(pathlib.Path(data_dir).rglob("data.csv"))
    assert csv.read_text().splitlines()[0].strip() == synthetic.CSV_HEADER


def test_refuses_to_overwrite(written):
    with pytest.raises(FileExistsError, match="kaggle_3m"):
        synthetic.write_dataset(str(written.parent), patients=1, seed=0, workers=1)


def test_statistics_match_the_real_data(rendered):
    slices = sum(len(m) for _, m in rendered)
    areas = np.concatenate([(m > 0).mean(axis=(1, 2)) for _, m in rendered])
    assert all(20 <= len(m) <= 88 for _, m in rendered)
    assert set(np.unique(np.concatenate([m.ravel() for _, m in rendered]))) == {0, 1}
    assert 0.2 <= (areas > 0).sum() / slices <= 0.5  # real: about a third
    assert 0.01 <= np.median(areas[areas > 0]) <= 0.035  # real: about 2%
    for _, masks in rendered:
        positive = np.flatnonzero(masks.any(axis=(1, 2)))
        assert len(positive) > 0
        assert np.all(np.diff(positive) == 1), "lesion slices must be one contiguous run"
        sizes = masks[positive].sum(axis=(1, 2))
        assert sizes.max() > 2 * sizes.min(), "the lesion should change size through the run"


def test_lesion_is_visible_on_flair_but_not_a_threshold(rendered):
    for images, masks in rendered:
        flair, lesion = images[..., 1], masks > 0
        brain = (flair > 0.2 * flair.max()) & ~lesion
        assert flair[lesion].mean() > np.median(flair[brain]) * 1.2
        # The best single FLAIR threshold, found with the labels, still
        # misses a clear part of the lesion or includes other tissue.
        hist_in = np.bincount(flair[lesion], minlength=256)
        hist_out = np.bincount(flair[~lesion], minlength=256)
        above_in = np.cumsum(hist_in[::-1])[::-1]
        above_out = np.cumsum(hist_out[::-1])[::-1]
        dice = 2 * above_in / (above_in + above_out + lesion.sum())
        assert dice.max() < 0.95


def test_some_patients_have_a_channel_replaced_by_flair():
    # Drawing 40 anatomies is cheap; only one patient is rendered.
    plan = synthetic._patients(40, 0)
    copies = [synthetic._Phantom(p).flair_copy_to for p in plan]
    assert {0, 2} <= set(copies) and copies.count(None) > 30
    p = plan[copies.index(2)]
    images, _ = synthetic._phantom(p)
    np.testing.assert_array_equal(images[..., 2], images[..., 1])
    assert not np.array_equal(images[..., 0], images[..., 1])


def test_deterministic_for_a_seed():
    a = synthetic.render_arrays(patients=1, seed=5)
    b = synthetic.render_arrays(patients=1, seed=5)
    c = synthetic.render_arrays(patients=1, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


def test_worker_processes_write_the_same_files(tmp_path):
    one = pathlib.Path(synthetic.write_dataset(str(tmp_path / "one"), patients=2, seed=2, workers=1))
    two = pathlib.Path(synthetic.write_dataset(str(tmp_path / "two"), patients=2, seed=2, workers=2))
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f


@pytest.mark.slow
def test_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "data.synthetic", "--out", str(tmp_path), "--patients", "1", "--seed", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 1 patients" in result.stdout
    folders = [d for d in os.listdir(tmp_path / "kaggle_3m") if d.startswith("TCGA")]
    assert len(folders) == 1
