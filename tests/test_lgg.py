"""Tests for data.lgg (discovery, pairing) and data.dataset.load on hand-made, synthetic and real trees."""

import collections
import logging
import os
import pathlib
import re

import numpy as np
import pytest

from data import dataset as dataset_lib
from data import lgg
from data.lgg import DataError


def test_finds_patients_in_every_layout(fake_lgg_tree, tmp_path):
    root = fake_lgg_tree(layout="lgg-mri-segmentation/kaggle_3m")
    expected = ["TCGA_CS_0001_20000101", "TCGA_DU_0002_20010101", "TCGA_HT_0003_20020101"]
    # DIR/lgg-mri-segmentation/kaggle_3m, and DIR being that kaggle_3m itself.
    assert [p.name for p in lgg.find_patient_dirs(tmp_path)] == expected
    assert [p.name for p in lgg.find_patient_dirs(root)] == expected


@pytest.mark.parametrize("layout", ["kaggle_3m", "."])
def test_finds_kaggle_3m_and_flat_layouts(fake_lgg_tree, tmp_path, layout):
    fake_lgg_tree(layout=layout)
    dirs = lgg.find_patient_dirs(tmp_path)
    assert len(dirs) == 3
    assert lgg.find_dataset_root(tmp_path) == (tmp_path / layout if layout != "." else tmp_path)


def test_prefers_kaggle_3m_when_the_zip_holds_both_copies(fake_lgg_tree, tmp_path):
    fake_lgg_tree(layout="kaggle_3m")
    fake_lgg_tree(layout="lgg-mri-segmentation/kaggle_3m")
    records, problems = lgg.scan(tmp_path)
    assert not problems
    assert len(records) == 9  # 3 + 4 + 2 slices, not counted twice
    assert all(pathlib.Path(r.image_path).parent.parent == tmp_path / "kaggle_3m" for r in records)


def test_no_patients_says_where_it_looked_and_what_it_expects(tmp_path):
    (tmp_path / "kaggle_3m").mkdir()
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError) as e:
        lgg.scan(tmp_path)
    msg = str(e.value)
    assert "no patients found" in msg
    assert str(tmp_path / "kaggle_3m") in msg
    assert str(tmp_path / "lgg-mri-segmentation" / "kaggle_3m") in msg
    assert "TCGA_CS_4941_19960909_<n>_mask.tif" in msg


def test_missing_data_dir_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope")) + ".*does not exist"):
        dataset_lib.load(tmp_path / "nope")


def test_slices_sort_numerically_and_pair_with_their_masks(fake_lgg_tree):
    root = fake_lgg_tree({"TCGA_CS_0001_20000101": 11, "TCGA_DU_0002_20010101": 2})
    records, problems = lgg.scan(root)
    assert not problems
    assert [r.slice_number for r in records] == list(range(1, 12)) + [1, 2]
    assert [r.patient for r in records] == ["TCGA_CS_0001_20000101"] * 11 + ["TCGA_DU_0002_20010101"] * 2
    assert {r.institution for r in records} == {"CS", "DU"}
    for r in records:
        assert r.mask_path == r.image_path[:-len(".tif")] + "_mask.tif"
    # The decoded pixels prove each array slot holds the named file's contents.
    ds = dataset_lib.load(root)
    assert ds.images[:, 0, 0, 0].tolist() == [r.slice_number for r in ds.records]
    assert ds.images[:, 0, 0, 1].tolist() == [0] * 11 + [1] * 2


def test_unpaired_and_misnamed_files_are_all_reported(fake_lgg_tree):
    root = fake_lgg_tree()
    cs, du = root / "TCGA_CS_0001_20000101", root / "TCGA_DU_0002_20010101"
    (cs / "TCGA_CS_0001_20000101_2_mask.tif").unlink()
    (du / "TCGA_DU_0002_20010101_3.tif").unlink()
    (cs / "TCGA_CS_0001_20000101_2_mask.tif.bak").write_text("ignored: not a tif")
    (cs / "._TCGA_CS_0001_20000101_1.tif").write_bytes(b"ignored: a macOS resource fork")
    (du / "scan_7.tif").write_bytes(b"x")
    records, problems = lgg.scan(root)
    by_path = {p.path: p.reason for p in problems}
    assert sorted(by_path) == sorted([str(cs / "TCGA_CS_0001_20000101_2.tif"),
                                      str(du / "TCGA_DU_0002_20010101_3_mask.tif"), str(du / "scan_7.tif")])
    assert by_path[str(cs / "TCGA_CS_0001_20000101_2.tif")] == (
        "image has no mask (expected TCGA_CS_0001_20000101_2_mask.tif)")
    assert by_path[str(du / "TCGA_DU_0002_20010101_3_mask.tif")] == (
        "mask has no image (expected TCGA_DU_0002_20010101_3.tif)")
    assert "unexpected file name" in by_path[str(du / "scan_7.tif")]
    assert len(records) == 9 - 2
    with pytest.raises(DataError) as e:
        dataset_lib.load(root)
    msg = str(e.value)
    assert "3 problem(s)" in msg and "--skip_bad_slices" in msg
    for path, reason in by_path.items():
        assert f"{path}: {reason}" in msg


def test_empty_patient_folder_is_a_problem(fake_lgg_tree):
    root = fake_lgg_tree()
    (root / "TCGA_FG_0009_20030101").mkdir()
    _, problems = lgg.scan(root)
    assert [str(p) for p in problems] == [f"{root / 'TCGA_FG_0009_20030101'}: patient folder holds no slices"]


def test_skip_bad_slices_logs_each_and_counts(fake_lgg_tree, caplog):
    root = fake_lgg_tree()
    bad_image = root / "TCGA_CS_0001_20000101" / "TCGA_CS_0001_20000101_1.tif"
    bad_image.write_bytes(b"not a tiff at all")
    (root / "TCGA_HT_0003_20020101" / "TCGA_HT_0003_20020101_2_mask.tif").unlink()
    caplog.set_level(logging.INFO)
    ds = dataset_lib.load(root, skip_bad_slices=True)
    messages = caplog.messages
    assert len(ds.records) == 9 - 2
    assert all(r.image_path != str(bad_image) for r in ds.records)
    skipped = [m for m in messages if m.startswith("skipping bad input:")]
    assert len(skipped) == 2
    assert any(str(bad_image) in m and "unreadable or truncated TIFF" in m for m in skipped)
    assert any("skipped 2 problem(s)" in m and "7 good slices remain" in m for m in messages)


def test_skip_bad_slices_with_nothing_left_is_an_error(fake_lgg_tree):
    root = fake_lgg_tree({"TCGA_CS_0001_20000101": 1})
    (root / "TCGA_CS_0001_20000101" / "TCGA_CS_0001_20000101_1_mask.tif").unlink()
    with pytest.raises(DataError, match="no usable slices"):
        dataset_lib.load(root, skip_bad_slices=True)


@pytest.mark.parametrize("text,expected", [
    ("Patient,A,B\nTCGA_CS_0001,1,2\nTCGA_DU_0002,,3\n", {"TCGA_CS_0001", "TCGA_DU_0002"}),
    ("Patient;A;B\nTCGA_CS_0001;1;2\nTCGA_DU_0002;;3\n", {"TCGA_CS_0001", "TCGA_DU_0002"}),
    ("\ufeffPatient;A\r\nTCGA_CS_0001;1\r\n", {"TCGA_CS_0001"}),
    ("\x00\x01 garbage \"unbalanced\n\n", None),
])
def test_data_csv_is_read_leniently(tmp_path, text, expected):
    (tmp_path / "data.csv").write_text(text, encoding="utf-8")
    found = lgg.read_clinical_patients(tmp_path)
    if expected is None:  # garbage: no ids (an empty set or None), and never an exception
        assert not found
    else:
        assert found == expected


def test_missing_data_csv_is_not_an_error(fake_lgg_tree, caplog):
    root = fake_lgg_tree(data_csv=False)
    assert lgg.read_clinical_patients(root) is None
    caplog.set_level(logging.INFO)
    ds = dataset_lib.load(root)
    assert len(ds.records) == 9
    assert "no data.csv" in caplog.messages[-1]


def test_dataset_accessors(fake_lgg_tree):
    root = fake_lgg_tree(lesion_slices={"TCGA_DU_0002_20010101": {4}})
    ds = dataset_lib.load(root)
    assert ds.patients == ["TCGA_CS_0001_20000101", "TCGA_DU_0002_20010101", "TCGA_HT_0003_20020101"]
    assert ds.images.shape == (9, 256, 256, 3) and ds.images.dtype == np.uint8
    assert ds.masks.shape == (9, 256, 256) and ds.masks.dtype == np.uint8
    assert set(np.unique(ds.masks).tolist()) == {0, 1}
    assert ds.positive.tolist() == [False] * 6 + [True] + [False] * 2
    idx = ds.indices_of(["TCGA_HT_0003_20020101", "TCGA_CS_0001_20000101"])
    assert idx.tolist() == [0, 1, 2, 7, 8]
    assert {p: i.tolist() for p, i in ds.patient_slices.items()} == {
        "TCGA_CS_0001_20000101": [0, 1, 2], "TCGA_DU_0002_20010101": [3, 4, 5, 6],
        "TCGA_HT_0003_20020101": [7, 8]}
    sub = ds.subset(["TCGA_DU_0002_20010101"])
    assert sub.patients == ["TCGA_DU_0002_20010101"]
    assert sub.positive.tolist() == [False, False, False, True]
    np.testing.assert_array_equal(sub.images, ds.images[3:7])
    with pytest.raises(DataError, match="TCGA_XX_9999_20000101"):
        ds.indices_of(["TCGA_XX_9999_20000101"])


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dataset_lib.default_cache_dir() == str(tmp_path / "brainseg")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dataset_lib.default_cache_dir() == str(tmp_path / "home" / ".cache" / "brainseg")


def test_loads_synthetic_dataset(tmp_path):
    synthetic = pytest.importorskip("data.synthetic", reason="data/synthetic.py not written yet")
    root = pathlib.Path(synthetic.write_dataset(str(tmp_path / "syn"), patients=2, seed=0))
    on_disk = collections.Counter(
        p.parent.name for p in root.glob("TCGA_*/*.tif") if not p.name.endswith("_mask.tif"))
    ds = dataset_lib.load(tmp_path / "syn", cache_dir=str(tmp_path / "cache"))
    assert collections.Counter(r.patient for r in ds.records) == on_disk
    assert len(ds.patients) == 2
    assert 0 < ds.positive.sum() < len(ds.records)
    assert set(np.unique(ds.masks).tolist()) == {0, 1}
    for patient in ds.patients:
        numbers = [r.slice_number for r in ds.records if r.patient == patient]
        assert numbers == list(range(1, len(numbers) + 1))
    assert lgg.read_clinical_patients(root) >= {lgg.clinical_id(p) for p in ds.patients}


@pytest.mark.real_data
def test_real_subset_counts_pairing_and_order(lgg_real_data_dir):
    records, problems = lgg.scan(lgg_real_data_dir)
    assert problems == []
    assert len({r.patient for r in records}) == 55
    assert len(records) == 1934
    for r in records:
        assert os.path.basename(r.image_path) == f"{r.patient}_{r.slice_number}.tif"
        assert os.path.basename(r.mask_path) == f"{r.patient}_{r.slice_number}_mask.tif"
        assert os.path.dirname(r.image_path) == os.path.dirname(r.mask_path)
    for patient in {r.patient for r in records}:
        numbers = [r.slice_number for r in records if r.patient == patient]
        assert numbers == list(range(1, len(numbers) + 1))  # 1, 2, ..., 9, 10: numeric, not 1, 10, 11
    ds = dataset_lib.load(lgg_real_data_dir)
    assert int(ds.positive.sum()) == 694
    assert ds.images.shape == (1934, 256, 256, 3)
    assert lgg.read_clinical_patients(lgg_real_data_dir) >= {lgg.clinical_id(p) for p in ds.patients}
