"""The patient split (data.split) and its split.json in the run directory (engine.rundir)."""

import json
import os

import numpy as np
import pytest

from data import split as split_lib
from data.dataset import LggDataset
from data.lgg import DataError, SliceRecord
from engine import inputs
from engine.config import Config
from engine.rundir import RunDir, RunDirError


def _load_or_make(run_dir, dataset, **values):
    """What training does with a run's split: its split.json, or a new split that it records."""
    config = Config(**values)
    run = RunDir(str(run_dir))
    split = inputs.run_split(dataset, run, config, create=True)
    if run.read_split() is None:
        os.makedirs(run.path, exist_ok=True)
        inputs.write_split(run, config, split)
    return split


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
        split_lib.make_split(_dataset(10), val_fraction=-0.1)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        split_lib.make_split(_dataset(10), val_fraction=0.5, test_fraction=0.5)


def test_a_zero_fraction_leaves_that_part_empty_and_every_other_patient_training():
    ds = _dataset(20)
    split = split_lib.make_split(ds, val_fraction=0.0, test_fraction=0.0, seed=1)
    assert split["val"] == split["test"] == [] and split["train"] == ds.patients
    folds = [split_lib.make_split(ds, val_fraction=0.0, seed=1, num_folds=4, fold=f) for f in range(4)]
    for split in folds:
        assert split["val"] == [] and sorted(split["train"] + split["test"]) == ds.patients
    assert sorted(p for s in folds for p in s["test"]) == ds.patients
    # With only one patient with lesions, a training part alone can still be made.
    assert split_lib.make_split(_dataset(10, with_lesions=[3]), val_fraction=0.0,
                                test_fraction=0.0)["train"]


def test_split_json_is_written_then_reused(tmp_path):
    ds = _dataset(20)
    split = _load_or_make(tmp_path / "run", ds, val_fraction=0.15, test_fraction=0.15, seed=0)
    path = tmp_path / "run" / "split.json"
    stored = json.loads(path.read_text())
    assert {k: stored[k] for k in ("train", "val", "test")} == split
    assert stored["seed"] == 0
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["split.json"]  # no temp file left
    # A resumed run reuses the file even when asked for another seed (the run's split is fixed).
    stored["val"], stored["train"] = stored["val"][1:], stored["train"] + stored["val"][:1]
    path.write_text(json.dumps(stored))
    reused = _load_or_make(tmp_path / "run", ds, val_fraction=0.15, test_fraction=0.15, seed=5)
    assert reused["val"] == sorted(stored["val"]) and reused["train"] == sorted(stored["train"])


def test_split_json_naming_unknown_patients_is_a_data_error(tmp_path):
    ds = _dataset(20)
    _load_or_make(tmp_path, ds, val_fraction=0.15, test_fraction=0.15, seed=0)
    with pytest.raises(DataError) as e:
        _load_or_make(tmp_path, ds.subset(ds.patients[:15]), val_fraction=0.15,
                                     test_fraction=0.15, seed=0)
    assert str(tmp_path / "split.json") in str(e.value)
    assert "not in the dataset" in str(e.value)


@pytest.mark.parametrize("text,reason", [
    ("{not json", "is unreadable"),
    ('{"train": [], "val": []}', "unreadable split file"),
    ('{"train": ["TCGA_DU_0000_20000101"], "val": ["TCGA_DU_0000_20000101"], "test": []}', "in both train and val"),
])
def test_bad_split_json_is_a_data_error(tmp_path, text, reason):
    (tmp_path / "split.json").write_text(text)
    with pytest.raises((DataError, RunDirError), match=reason) as e:
        _load_or_make(tmp_path, _dataset(10), val_fraction=0.15, test_fraction=0.15, seed=0)
    assert str(tmp_path / "split.json") in str(e.value)


def test_folds_partition_the_patients_and_each_fold_covers_them_all():
    ds = _dataset(23)
    tests = []
    for fold in range(5):
        split = split_lib.make_split(ds, val_fraction=0.15, seed=4, num_folds=5, fold=fold)
        parts = [set(split[k]) for k in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert set().union(*parts) == set(ds.patients)
        assert len(split["val"]) == round(0.15 * 23)
        assert all(v == sorted(v) for v in split.values())
        tests.append(parts[2])
    assert sorted(len(t) for t in tests) == [4, 4, 5, 5, 5]  # near-equal chunks of 23
    assert set().union(*tests) == set(ds.patients)
    assert sum(len(t) for t in tests) == 23  # pairwise disjoint


def test_folds_are_stable_for_a_seed_and_change_with_it():
    ds = _dataset(20)
    first = split_lib.make_split(ds, seed=7, num_folds=4, fold=1)
    assert split_lib.make_split(ds, seed=7, num_folds=4, fold=1) == first
    assert split_lib.make_split(ds, seed=8, num_folds=4, fold=1)["test"] != first["test"]


def test_num_folds_zero_is_the_fraction_split():
    ds = _dataset(30)
    for seed in (0, 7):
        assert split_lib.make_split(ds, seed=seed, num_folds=0, fold=0) == split_lib.make_split(ds, seed=seed)
    # Pinned from the split code before folds existed: old seeds keep their test patients.
    assert split_lib.make_split(_dataset(20), seed=3, num_folds=0)["test"] == [
        "TCGA_CS_0003_20000101", "TCGA_CS_0005_20000101", "TCGA_DU_0008_20000101"]


def test_fold_val_and_train_get_lesions_when_the_fold_leaves_enough(caplog):
    ds = _dataset(30, with_lesions=[4, 17, 25])
    lesioned = {r.patient for r, positive in zip(ds.records, ds.positive) if positive}
    assert len(lesioned) == 3
    short = 0
    for seed in range(6):
        tests = []
        for fold in range(3):
            caplog.clear()
            split = split_lib.make_split(ds, seed=seed, num_folds=3, fold=fold)
            assert set(split["train"]) & lesioned, (seed, fold)
            if len(lesioned - set(split["test"])) >= 2:
                assert set(split["val"]) & lesioned, (seed, fold)
            else:  # one lesion patient outside the test fold: train has it, and a warning says val has none
                short += 1
                assert "no val patient has lesion-positive slices" in caplog.text
            tests.append(set(split["test"]))
        assert set().union(*tests) == set(ds.patients)
    assert short < 18  # most folds of most seeds leave two lesion patients, so the rotation is exercised


def test_impossible_folds_raise_clear_errors():
    with pytest.raises(DataError, match="--num_folds=11 is more than the 10 patients"):
        split_lib.make_split(_dataset(10), num_folds=11)
    with pytest.raises(DataError, match="--num_folds=2 leaves 2 of 4 patients"):
        split_lib.make_split(_dataset(4), val_fraction=0.5, test_fraction=0.25, num_folds=2)
    with pytest.raises(DataError, match="--num_folds=3: none of the 6 patients outside the test fold"):
        split_lib.make_split(_dataset(9, with_lesions=[]), num_folds=3, fold=0)
    with pytest.raises(ValueError, match="num_folds must be 0"):
        split_lib.make_split(_dataset(10), num_folds=1)
    with pytest.raises(ValueError, match="fold must be in"):
        split_lib.make_split(_dataset(10), num_folds=3, fold=3)


def test_split_json_records_the_fold_and_refuses_another(tmp_path):
    ds = _dataset(20)
    split = _load_or_make(tmp_path, ds, val_fraction=0.15, test_fraction=0.15, seed=0,
                                         num_folds=4, fold=2)
    stored = json.loads((tmp_path / "split.json").read_text())
    assert (stored["num_folds"], stored["fold"]) == (4, 2)
    assert split == split_lib.make_split(ds, seed=0, num_folds=4, fold=2)
    assert _load_or_make(tmp_path, ds, val_fraction=0.15, test_fraction=0.15, seed=0,
                                        num_folds=4, fold=2) == split
    for num_folds, fold in ((4, 3), (5, 2), (0, 0)):
        with pytest.raises(DataError, match="was made with --num_folds=4 --fold=2") as e:
            _load_or_make(tmp_path, ds, val_fraction=0.15, test_fraction=0.15, seed=0,
                                         num_folds=num_folds, fold=fold)
        assert str(tmp_path / "split.json") in str(e.value)


def test_split_json_from_before_folds_loads_as_the_fraction_split(tmp_path):
    ds = _dataset(20)
    split = split_lib.make_split(ds, seed=0)
    (tmp_path / "split.json").write_text(json.dumps({"seed": 0, "val_fraction": 0.15,
                                                     "test_fraction": 0.15, **split}))
    assert _load_or_make(tmp_path, ds, val_fraction=0.15, test_fraction=0.15,
                                        seed=0) == split
    with pytest.raises(DataError, match="--num_folds=0 --fold=0"):
        _load_or_make(tmp_path, ds, val_fraction=0.15, test_fraction=0.15, seed=0,
                                     num_folds=5, fold=0)
