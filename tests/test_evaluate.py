"""Evaluation: post-processing, metrics against numpy on the same predictions, and --mode=evaluate."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
import tifffile

from data.dataset import LggDataset
from data.lgg import SliceRecord
from engine import evaluate
from engine import report as report_lib
from engine.config import Config, validate
from engine.inference import Predictor
from engine.inference_spec import InferenceSpec
from engine.segmenter import Segmenter
from models import losses, postprocess
from tests.helpers import asymmetric_model, config_flags, pointwise_model, run_engine

# --- post-processing -------------------------------------------------------------------------------


def test_remove_small_components_drops_only_small_2d_islands():
    masks = np.zeros((2, 12, 12), bool)
    masks[0, 1:4, 1:4] = True   # 9 px: kept
    masks[0, 8, 8] = True       # 1 px: removed
    masks[1, 5:7, 5:7] = True   # 4 px: removed at min_size 5, kept at 4
    out = postprocess.remove_small_components(masks, 5)
    assert out[0, 1:4, 1:4].all() and not out[0, 8, 8] and not out[1].any()
    assert out.sum() == 9
    np.testing.assert_array_equal(postprocess.remove_small_components(masks, 4)[1], masks[1])
    np.testing.assert_array_equal(postprocess.remove_small_components(masks, 0), masks)
    assert masks.sum() == 14  # the input is not modified


def test_diagonal_neighbours_form_one_component():
    masks = np.zeros((1, 6, 6), bool)
    masks[0, [1, 2, 3], [1, 2, 3]] = True  # a diagonal line of 3 px
    np.testing.assert_array_equal(postprocess.remove_small_components(masks, 3), masks)
    assert not postprocess.remove_small_components(masks, 4).any()


def test_keep_largest_component_counts_in_3d():
    volume = np.zeros((4, 10, 10), bool)
    volume[0, 0:4, 0:4] = True        # 16 px in one slice
    volume[1:4, 6:9, 6:9] = True      # 3 x 9 = 27 px across three slices: the largest
    volume[3, 0, 9] = True            # a 1 px island
    out = postprocess.keep_largest_component(volume)
    assert out.sum() == 27 and out[1:4, 6:9, 6:9].all()
    assert not postprocess.keep_largest_component(np.zeros((3, 5, 5), bool)).any()
    # Small 2D components first, then the largest 3D one of what is left.
    both = postprocess.postprocess_volume(volume, min_component_size=5, keep_largest=True)
    np.testing.assert_array_equal(both, out)
    # At 10 px the 2D step removes the 9 px pieces of the 3D lesion, so the 16 px square is left.
    both = postprocess.postprocess_volume(volume, min_component_size=10, keep_largest=True)
    assert both.sum() == 16 and both[0, 0:4, 0:4].all()


def test_postprocess_rejects_bad_shapes_and_sizes():
    with pytest.raises(ValueError, match="slices, height, width"):
        postprocess.keep_largest_component(np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="min_size"):
        postprocess.remove_small_components(np.zeros((1, 5, 5), bool), -1)


# --- scoring against numpy ------------------------------------------------------------------------


def _dataset(masks: np.ndarray, patients: list[str], images: np.ndarray | None = None) -> LggDataset:
    records, numbers = [], {}
    for p in patients:
        numbers[p] = numbers.get(p, 0) + 1
        records.append(SliceRecord(p, p.split("_")[1], numbers[p], f"{p}_{numbers[p]}.tif",
                                   f"{p}_{numbers[p]}_mask.tif"))
    if images is None:
        images = np.zeros(masks.shape + (3,), np.uint8)
    return LggDataset(tuple(records), images, masks.astype(np.uint8))


def _numpy_figures(target: np.ndarray, pred: np.ndarray, patients: list[str]) -> dict:
    """The figures computed the plain way, slice by slice and patient by patient."""
    inter = pred_sum = target_sum = 0
    slice_dice, fp, empty = [], 0, 0
    for t, p in zip(target, pred):
        inter, pred_sum, target_sum = inter + (t & p).sum(), pred_sum + p.sum(), target_sum + t.sum()
        if t.any():
            slice_dice.append(2 * (t & p).sum() / (t.sum() + p.sum()))
        else:
            empty += 1
            fp += int(p.any())
    per_patient = {}
    for name in sorted(set(patients)):
        idx = [i for i, q in enumerate(patients) if q == name]
        t, p = target[idx], pred[idx]
        per_patient[name] = 1.0 if t.sum() + p.sum() == 0 else 2 * (t & p).sum() / (t.sum() + p.sum())
    return {"dice": 2 * inter / (pred_sum + target_sum),
            "iou": inter / (pred_sum + target_sum - inter),
            "positive_slice_dice_mean": np.mean(slice_dice),
            "empty_slice_fp_rate": fp / empty if empty else math.nan,
            "patient_dice_mean": np.mean(list(per_patient.values())),
            "patient_dice_median": np.median(list(per_patient.values())),
            "per_patient": per_patient}


def _random_blobs(rng, n, size, prob):
    """Random rectangles on a fraction `prob` of n slices."""
    out = np.zeros((n, size, size), bool)
    for i in range(n):
        if rng.uniform() < prob:
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(2, 8, 2)
            out[i, y:y + h, x:x + w] = True
    return out


def test_score_matches_numpy_on_random_predictions():
    rng = np.random.default_rng(0)
    patients = ["TCGA_CS_0001_20000101"] * 7 + ["TCGA_DU_0002_20000101"] * 5 + ["TCGA_HT_0003_20000101"] * 6
    target = _random_blobs(rng, len(patients), 24, 0.6)
    target[0] = True  # a full slice, and at least one empty one below
    target[1] = False
    # Predictions: the target shifted by a pixel plus random false positives.
    pred = np.roll(target, 1, axis=2) | _random_blobs(rng, len(patients), 24, 0.3)
    summary, rows = evaluate.score(_dataset(target, patients), pred)
    want = _numpy_figures(target, pred, patients)
    for key in ("dice", "iou", "positive_slice_dice_mean", "empty_slice_fp_rate",
                "patient_dice_mean", "patient_dice_median"):
        assert summary[key] == pytest.approx(want[key], rel=1e-12), key
    assert 0 < summary["dice"] < 1 and 0 < summary["empty_slice_fp_rate"] < 1
    assert [r["patient"] for r in rows] == sorted(set(patients))
    for row in rows:
        assert row["dice"] == pytest.approx(want["per_patient"][row["patient"]], rel=1e-12)
        idx = [i for i, q in enumerate(patients) if q == row["patient"]]
        assert row["slices"] == len(idx)
        assert row["positive_slices"] == int(target[idx].any(axis=(1, 2)).sum())
        assert row["true_volume"] == int(target[idx].sum())
        assert row["predicted_volume"] == int(pred[idx].sum())
    assert summary["positive_slices"] + summary["empty_slices"] == len(patients)


def test_score_edge_cases():
    patients = ["TCGA_CS_0001_20000101"] * 3 + ["TCGA_DU_0002_20000101"] * 2
    target = np.zeros((5, 8, 8), bool)
    target[0, 2:5, 2:5] = True
    target[3, 1:3, 1:3] = True
    perfect, _ = evaluate.score(_dataset(target, patients), target)
    assert perfect["dice"] == perfect["iou"] == perfect["patient_dice_mean"] == 1.0
    assert perfect["empty_slice_fp_rate"] == 0.0
    everything, rows = evaluate.score(_dataset(target, patients), np.ones_like(target))
    assert everything["empty_slice_fp_rate"] == 1.0 and everything["false_positive_slices"] == 3
    assert all(r["false_positive_slices"] == r["empty_slices"] for r in rows)
    no_empty, _ = evaluate.score(_dataset(target[[0, 3]], [patients[0], patients[3]]), target[[0, 3]])
    assert math.isnan(no_empty["empty_slice_fp_rate"])
    with pytest.raises(ValueError, match="shape"):
        evaluate.score(_dataset(target, patients), target[:, :4])


# --- the model path: predictions at the model size, scored at the original size -------------------


def _pointwise_model(size: int) -> keras.Model:
    return pointwise_model(size)


def _conv_model(size: int, seed: int = 3) -> keras.Model:
    return asymmetric_model(size, seed)


def test_predictor_matches_a_direct_computation_with_and_without_tta():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 48, 48, 3), np.uint8)
    model = _conv_model(32)

    def direct(x):  # float [B,32,32,3] -> probabilities [B,48,48]
        p = tf.sigmoid(model(x, training=False))
        return tf.image.resize(p, (48, 48), method="bilinear").numpy()[..., 0]

    small = tf.image.resize(images.astype(np.float32) / 255.0, (32, 32), method="bilinear").numpy()
    plain = Predictor(model, image_size=32)(images, batch_size=2)
    np.testing.assert_allclose(plain, direct(small), atol=1e-5)
    flips = [lambda a: a, lambda a: a[:, :, ::-1], lambda a: a[:, ::-1], lambda a: a[:, ::-1, ::-1]]
    want = np.mean([f(direct(np.ascontiguousarray(f(small)))) for f in flips], axis=0)
    tta = Predictor(model, image_size=32, tta=True)
    got = tta(images, batch_size=2)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - plain).max() > 1e-3  # the flips really changed something
    tta(images[:1], batch_size=1)
    assert tta.traces == 1  # any batch size, one trace


def _lesion_images(rng, n, size):
    """Slices whose FLAIR channel is bright (200) inside a random lesion, dim (40) elsewhere."""
    masks = _random_blobs(rng, n, size, 0.6)
    images = np.full((n, size, size, 3), 40, np.uint8)
    # The FLAIR is bright on the lesion shifted by 2 px, plus some false-positive spots.
    images[..., 1] = np.where(np.roll(masks, 2, axis=1) | _random_blobs(rng, n, size, 0.2), 200, 40)
    return images, masks


@pytest.mark.parametrize("keep_largest", [False, True])
def test_evaluate_patients_matches_numpy_on_the_same_predictions(keep_largest):
    rng = np.random.default_rng(2)
    patients = ["TCGA_CS_0001_20000101"] * 6 + ["TCGA_DU_0002_20000101"] * 6 + ["TCGA_HT_0003_20000101"] * 5
    images, masks = _lesion_images(rng, len(patients), 48)
    dataset = _dataset(masks, patients, images)
    model = _pointwise_model(32)
    segmenter = Segmenter([model], InferenceSpec(keep_largest_component=keep_largest), image_size=32,
                          sources=["test"])
    summary, rows = evaluate.score(dataset, evaluate.predict_patients(segmenter, dataset, batch_size=4))
    # The same predictions, made here: model size, probabilities resized back, threshold 0.5.
    pred = Predictor(model, image_size=32)(images, batch_size=5) > 0.5
    if keep_largest:
        for name in set(patients):
            idx = [i for i, q in enumerate(patients) if q == name]
            pred[idx] = postprocess.keep_largest_component(pred[idx])
    want = _numpy_figures(masks, pred, patients)
    for key in ("dice", "iou", "positive_slice_dice_mean", "empty_slice_fp_rate",
                "patient_dice_mean", "patient_dice_median"):
        assert summary[key] == pytest.approx(want[key], rel=1e-12), key
    assert 0.2 < summary["dice"] < 0.95  # imperfect predictions: the figures mean something
    assert {r["patient"]: r["dice"] for r in rows} == pytest.approx(want["per_patient"])
    assert all(r["dice"] == pytest.approx(losses.volume_dice(
        pred[[i for i, q in enumerate(patients) if q == r["patient"]]],
        masks[[i for i, q in enumerate(patients) if q == r["patient"]]] > 0)) for r in rows)


# --- --mode=evaluate end to end -------------------------------------------------------------------

PATIENTS = ("TCGA_CS_0001_20000101", "TCGA_DU_0002_20000101", "TCGA_EZ_0003_20000101",
            "TCGA_FG_0004_20000101", "TCGA_HT_0005_20000101")


def _write_tree(root, rng) -> None:
    """Five patients of 6 slices; lesions on slices 2-4, some missed (dim) or with bright decoys."""
    for k, patient in enumerate(PATIENTS):
        folder = root / "kaggle_3m" / patient
        folder.mkdir(parents=True)
        for n in range(1, 7):
            image = rng.integers(20, 60, (256, 256, 3)).astype(np.uint8)
            mask = np.zeros((256, 256), np.uint8)
            if 2 <= n <= 4:
                mask[80 + 8 * n:140, 90:150 + 4 * k] = 255
                # Patient k misses k lesion slices (FLAIR left dim there).
                if n - 2 >= k:
                    image[..., 1][mask > 0] = 210
            if n == 6 and k % 2:
                image[20:40, 20:40, 1] = 220  # a bright decoy on an empty slice
            tifffile.imwrite(folder / f"{patient}_{n}.tif", image)
            tifffile.imwrite(folder / f"{patient}_{n}_mask.tif", mask)
    rows = [f"{p.rsplit('_', 1)[0]},{1 + k % 2},{k}" for k, p in enumerate(PATIENTS)]
    (root / "kaggle_3m" / "data.csv").write_text("Patient,RNASeqCluster,MethylationCluster\n" + "\n".join(rows) + "\n")


def _config(tmp, **overrides) -> Config:
    values = dict(data_dir=str(tmp / "data"), model_dir=str(tmp / "run"), cache_dir=str(tmp / "cache"),
                  image_size=64, base_filters=4, depth=2, batch_size=4, precision="float32",
                  jit_compile="false", strategy="one_device", progress=False, mode="evaluate")
    values.update(overrides)
    return validate(Config(**values))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A run directory with a final model and split.json, evaluated through `python -m engine.main`."""
    tmp = tmp_path_factory.mktemp("evaluate")
    _write_tree(tmp / "data", np.random.default_rng(0))
    config = _config(tmp)
    os.makedirs(config.run_dir)
    _pointwise_model(64).save(os.path.join(config.run_dir, "final_model.keras"))
    split = {"train": [PATIENTS[4]], "val": [PATIENTS[3]], "test": list(PATIENTS[:3])}
    with open(os.path.join(config.run_dir, "split.json"), "w") as f:
        json.dump(split, f)
    proc = run_engine(config_flags(config), timeout=180)
    return config, split, proc


def test_evaluate_mode_writes_the_report(evaluated):
    config, split, proc = evaluated
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(os.path.join(config.run_dir, "eval_test.json")) as f:
        report = json.load(f)
    with open(os.path.join(config.run_dir, "per_patient_test.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["patient"] for r in rows] == split["test"]
    assert list(rows[0]) == list(evaluate.CSV_FIELDS)
    dice = {r["patient"]: float(r["dice"]) for r in rows}
    # Patient k misses k of its 3 lesion slices: the volume Dice falls with k.
    assert dice[PATIENTS[0]] > dice[PATIENTS[1]] > dice[PATIENTS[2]] > 0
    assert int(rows[1]["false_positive_slices"]) >= 1  # the decoy on its empty slice
    assert report["patients"] == 3 and report["slices"] == 18 and report["positive_slices"] == 9
    assert report["patient_dice_mean"] == pytest.approx(np.mean(list(dice.values())), abs=1e-6)
    assert report["patient_dice_median"] == pytest.approx(dice[PATIENTS[1]], abs=1e-6)
    assert report["figures"]["best"]["patient"] == PATIENTS[0]
    assert report["figures"]["worst"]["patient"] == PATIENTS[2]
    for which in ("best", "worst"):
        png = tf.io.decode_png(open(os.path.join(config.run_dir, report["figures"][which]["png"]), "rb").read())
        shown = len(report["figures"][which]["slices_shown"])
        assert shown >= 1 and png.shape[2] == 3
        assert png.shape[1] == min(shown, 4) * 256 + (min(shown, 4) - 1) * report_lib.GRID_GAP
    # The printed table carries the figures.
    assert "Per-patient (volume) Dice, mean" in proc.stdout and PATIENTS[2] in proc.stdout
    assert f"{report['dice']:.4f}" in proc.stdout


def test_evaluate_without_a_model_fails_with_one_clear_line(tmp_path):
    config = _config(tmp_path, model_dir=str(tmp_path / "never_trained"))
    proc = run_engine(config_flags(config), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # the user's mistake: not a run
    assert "Traceback" not in proc.stderr
    # TensorFlow's C++ start-up lines ignore TF_CPP_MIN_LOG_LEVEL in 2.21; everything else is ours.
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not re.match(r"[IWEF]\d{4} |WARNING: All log messages before absl", line)]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "is not a brainseg run" in lines[0] and "final_model.keras" in lines[0] and "--checkpoint" in lines[0]


def _volume_dice_from_files(truth_files, predicted_files) -> float:
    """Dice of one patient, read back from TIFFs and counted in plain numpy."""
    t = np.stack([tifffile.imread(f) > 0 for f in truth_files])
    p = np.stack([tifffile.imread(f) > 0 for f in predicted_files])
    return 1.0 if t.sum() + p.sum() == 0 else 2.0 * np.logical_and(t, p).sum() / (t.sum() + p.sum())


def test_evaluate_scores_what_predict_writes(evaluated, tmp_path):
    config, split, proc = evaluated
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "masks"
    data = os.path.join(config.data_dir, "kaggle_3m")
    predicted = run_engine(config_flags(dataclasses.replace(
        config, mode="predict", input=data, output=str(out))), timeout=180)
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    with open(os.path.join(config.run_dir, "per_patient_test.csv")) as f:
        evaluated_dice = {r["patient"]: float(r["dice"]) for r in csv.DictReader(f)}
    for patient in split["test"]:
        numbers = range(1, 7)
        truth = [os.path.join(data, patient, f"{patient}_{n}_mask.tif") for n in numbers]
        masks = [out / patient / f"{patient}_{n}_mask.tif" for n in numbers]
        assert evaluated_dice[patient] == pytest.approx(_volume_dice_from_files(truth, masks), abs=1e-6)
    assert len(set(round(d, 3) for d in evaluated_dice.values())) == 3  # three different patients


def test_split_all_scores_any_labelled_folder_and_writes_a_report(evaluated, tmp_path):
    config, split, _ = evaluated
    # Another folder, and a run directory holding only a model: no split.json is needed.
    _write_tree(tmp_path / "other", np.random.default_rng(5))
    run_dir = tmp_path / "model_only"
    run_dir.mkdir()
    shutil.copy(os.path.join(config.run_dir, "final_model.keras"), run_dir / "final_model.keras")
    other = dataclasses.replace(config, split="all", data_dir=str(tmp_path / "other"), model_dir=str(run_dir))
    proc = run_engine(config_flags(other), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "among the run's training" not in proc.stdout
    report = json.loads((run_dir / "eval_all.json").read_text())
    assert report["patients"] == len(PATIENTS) and report["data_dir"] == str(tmp_path / "other")
    assert report["model"] == [str(run_dir / "final_model.keras")]
    with open(run_dir / "per_patient_all.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["patient"] for r in rows] == list(PATIENTS)
    assert {"patient", "dice", "hd95", "assd", "surface_dice", "lesion_f1"} <= set(rows[0])
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(report["metrics"]["dice"]["mean"], abs=1e-6)
    # The report holds the JSON's numbers, and the figures it shows exist.
    md = (run_dir / "eval_all.md").read_text()
    dice = report["metrics"]["dice"]
    assert f"| Dice | {dice['mean']:.4f} | [{dice['ci_low']:.4f}, {dice['ci_high']:.4f}] | {dice['median']:.4f} |" in md
    for inst, m in report["groups"]["institution"].items():
        assert f"| {inst} | {m['dice']['n']} | {m['dice']['mean']:.4f}" in md
    assert "RNASeqCluster" in report["groups"]  # the test tree's data.csv has the cluster columns
    for png in (report["plot"], report["figures"]["best"]["png"], report["figures"]["worst"]["png"]):
        assert f"]({png})" in md and (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "python -m engine.main" in md and "--split=all" in md


def test_split_all_on_the_runs_own_data_names_the_patients_it_trained_on(evaluated):
    config, split, _ = evaluated
    proc = run_engine(config_flags(dataclasses.replace(config, split="all")), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warning = next(line for line in proc.stdout.splitlines() if "among the run's training" in line)
    assert all(p in warning for p in split["train"] + split["val"])
    assert not any(p in warning for p in split["test"])
