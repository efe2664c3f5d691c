"""Tests for data.split: patient-level, stable, lesion-positive in every part, split.json reuse."""

import json

import numpy as np
import pytest

from data import split as split_lib
from data.dataset import LggDataset
from data.lgg import DataError, SliceRecord


def _dataset(num_patients=20, *, with_lesions=None, slices=4) -> LggDataset:
    """An in-memory dataset of tiny 4x4 slices; patients in `with_lesions` get one positive slice."""
    names = [f"TCGA_{'CS' if i % 2 else 'DU'}_{i:04d}_20000101" for i in range(num_patients)]
    with_lesions = set(names if with_lesions is None else [names[i] for i in with_lesions])
    records, masks = [], []
    for name in names:
        for n in range(1, slices + 1):
            records.append(SliceRecord(name, name.split("_")[1], n, f"{name}_{n}.tif", f"{name}_{n}_mask.tif"))
            mask = np.zeros((4, 4), np.uint8)
            mask[1, 1] = name in with_lesions and n == 2
            masks.append(mask)
    masks = np.stack(masks)
    return LggDataset(tuple(records), np.zeros(masks.shape + (3,), np.uint8), masks)


def test_split_is_patient_level_complete_and_sized_by_fraction():
    ds = _dataset(20)
    split = split_lib.make_split(ds, val_fraction=0.15, test_fraction=0.25, seed=3)
    assert set(split) == {"train", "val", "test"}
    assert [len(split[k]) for k in ("train", "val", "test")] == [12, 3, 5]
    parts = [set(v) for v in split.values()]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(ds.patients)
    assert all(v == sorted(v) for v in split.values())


def test_split_is_stable_for_a_seed_and_changes_with_it():
    ds = _dataset(30)
    first = split_lib.make_split(ds, seed=7)
    assert split_lib.make_split(ds, seed=7) == first
    assert any(split_lib.make_split(ds, seed=s) != first for s in (8, 9, 10))


def test_every_split_gets_lesions_even_when_few_patients_have_them():
    ds = _dataset(30, with_lesions=[4, 17, 25])
    for seed in range(5):
        split = split_lib.make_split(ds, seed=seed)
        for name, patients in split.items():
            assert ds.positive[ds.indices_of(patients)].any(), (seed, name)


def test_impossible_splits_raise_clear_errors():
    with pytest.raises(DataError, match="only 2 patient"):
        split_lib.make_split(_dataset(10, with_lesions=[1, 2]))
    with pytest.raises(DataError, match="need at least 3 patients"):
        split_lib.make_split(_dataset(2))
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_lib.make_split(_dataset(10), val_fraction=0.0)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        split_lib.make_split(_dataset(10), val_fraction=0.5, test_fraction=0.5)


def test_split_json_is_written_then_reused(tmp_path):
    ds = _dataset(20)
    split = split_lib.load_or_make_split(tmp_path / "run", ds, val_fraction=0.15, test_fraction=0.15, seed=0)
    path = tmp_path / "run" / "split.json"
    stored = json.loads(path.read_text())
    assert {k: stored[k] for k in ("train", "val", "test")} == split
    assert stored["seed"] == 0
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["split.json"]  # no temp file left
    # A resumed run reuses the file even when asked for another seed (the run's split is fixed).
    stored["val"], stored["train"] = stored["val"][1:], stored["train"] + stored["val"][:1]
    path.write_text(json.dumps(stored))
    reused = split_lib.load_or_make_split(tmp_path / "run", ds, val_fraction=0.15, test_fraction=0.15, seed=5)
    assert reused["val"] == sorted(stored["val"]) and reused["train"] == sorted(stored["train"])


def test_split_json_naming_unknown_patients_is_a_data_error(tmp_path):
    ds = _dataset(20)
    split_lib.load_or_make_split(tmp_path, ds, val_fraction=0.15, test_fraction=0.15, seed=0)
    with pytest.raises(DataError) as e:
        split_lib.load_or_make_split(tmp_path, ds.subset(ds.patients[:15]), val_fraction=0.15,
                                     test_fraction=0.15, seed=0)
    assert str(tmp_path / "split.json") in str(e.value)
    assert "not in the dataset" in str(e.value)


@pytest.mark.parametrize("text,reason", [
    ("{not json", "unreadable split file"),
    ('{"train": [], "val": []}', "unreadable split file"),
    ('{"train": ["TCGA_DU_0000_20000101"], "val": ["TCGA_DU_0000_20000101"], "test": []}', "in both train and val"),
])
def test_bad_split_json_is_a_data_error(tmp_path, text, reason):
    (tmp_path / "split.json").write_text(text)
    with pytest.raises(DataError, match=reason) as e:
        split_lib.load_or_make_split(tmp_path, _dataset(10), val_fraction=0.15, test_fraction=0.15, seed=0)
    assert str(tmp_path / "split.json") in str(e.value)
