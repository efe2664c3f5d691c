"""`--mode=evaluate`: slice, pixel and per-patient (volume) figures of a split at 256x256, with overlay grids."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time

import numpy as np
import tensorflow as tf

from data.dataset import LggDataset
from data.lgg import DataError
from engine import build
from engine.config import Config
from engine.inference import THRESHOLD, Predictor
from engine.rundir import SPLIT_FILE, RunDir
from engine.summaries import overlay
from models import losses, postprocess

log = logging.getLogger(__name__)

# Columns of per_patient_<split>.csv, in order.
CSV_FIELDS = ("patient", "slices", "positive_slices", "dice", "positive_slice_dice_mean",
              "empty_slices", "false_positive_slices", "target_pixels", "predicted_pixels",
              "intersection")
# Tiles in a patient's overlay grid, and tiles per row.
GRID_TILES = 16
GRID_COLUMNS = 4
GRID_GAP = 4


def patient_slices(dataset: LggDataset) -> dict[str, np.ndarray]:
    """Each patient's slice indices, in slice order (records are sorted by patient, then slice)."""
    names = np.array([r.patient for r in dataset.records])
    return {p: np.flatnonzero(names == p) for p in dataset.patients}


def predict_patients(predictor: Predictor, dataset: LggDataset, *, batch_size: int,
                     min_component_size: int = 0, keep_largest_component: bool = False) -> np.ndarray:
    """Thresholded, post-processed predictions of every slice at its original size.

    Args:
      predictor: the inference core (model, size, TTA).
      dataset: slices to predict; images uint8 [N, H, W, 3].
      batch_size: slices per model call.
      min_component_size: remove predicted 2D components smaller than this (0: off).
      keep_largest_component: keep only the largest 3D component of each patient.

    Returns:
      bool [N, H, W].
    """
    pred = np.empty(dataset.masks.shape, bool)
    for start in range(0, len(dataset.images), batch_size):
        stop = start + batch_size
        # Thresholded per batch: only booleans are kept for the whole split.
        pred[start:stop] = predictor(dataset.images[start:stop], batch_size=batch_size) > THRESHOLD
    if min_component_size > 1 or keep_largest_component:
        for idx in patient_slices(dataset).values():
            pred[idx] = postprocess.postprocess_volume(
                pred[idx], min_component_size=min_component_size, keep_largest=keep_largest_component)
    return pred


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def score(dataset: LggDataset, predictions: np.ndarray) -> tuple[dict, list[dict]]:
    """The evaluation figures of boolean predictions against the dataset's masks.

    Args:
      dataset: the evaluated slices (records and masks).
      predictions: bool [N, H, W], aligned with dataset.masks.

    Returns:
      (summary, rows). summary: `dice` and `iou` over all pixels of the split;
      `positive_slice_dice_mean` (mean Dice over lesion-positive slices);
      `empty_slice_fp_rate` (fraction of lesion-free slices with any predicted
      pixel); `patient_dice_mean` and `patient_dice_median` (volume Dice per
      patient, models.losses.volume_dice); and the counts behind them. rows: one
      dict per patient with the CSV_FIELDS.

    Raises:
      ValueError: predictions and masks differ in shape.
    """
    target = dataset.masks > 0
    pred = np.asarray(predictions, bool)
    if pred.shape != target.shape:
        raise ValueError(f"predictions have shape {pred.shape}, masks {target.shape}")
    flat_t, flat_p = target.reshape(len(target), -1), pred.reshape(len(pred), -1)
    inter = np.count_nonzero(flat_t & flat_p, axis=1)
    t_sum, p_sum = np.count_nonzero(flat_t, axis=1), np.count_nonzero(flat_p, axis=1)
    positive = t_sum > 0
    slice_dice = np.where(positive, 2.0 * inter / np.maximum(t_sum + p_sum, 1), math.nan)
    false_positive = ~positive & (p_sum > 0)

    rows = []
    for patient, idx in patient_slices(dataset).items():
        rows.append({
            "patient": patient,
            "slices": len(idx),
            "positive_slices": int(positive[idx].sum()),
            "dice": losses.volume_dice(pred[idx], target[idx]),
            "positive_slice_dice_mean": _mean(slice_dice[idx][positive[idx]]),
            "empty_slices": int((~positive[idx]).sum()),
            "false_positive_slices": int(false_positive[idx].sum()),
            "target_pixels": int(t_sum[idx].sum()),
            "predicted_pixels": int(p_sum[idx].sum()),
            "intersection": int(inter[idx].sum()),
        })
    dice, iou = losses.dice_iou({"intersection": inter.sum(), "predicted": p_sum.sum(),
                                 "target": t_sum.sum()})
    patient_dice = [r["dice"] for r in rows]
    empty = int((~positive).sum())
    summary = {
        "patients": len(rows),
        "slices": len(target),
        "positive_slices": int(positive.sum()),
        "empty_slices": empty,
        "dice": dice,
        "iou": iou,
        "positive_slice_dice_mean": _mean(slice_dice[positive]),
        "empty_slice_fp_rate": float(false_positive.sum() / empty) if empty else math.nan,
        "false_positive_slices": int(false_positive.sum()),
        "patient_dice_mean": _mean(patient_dice),
        "patient_dice_median": float(np.median(patient_dice)) if patient_dice else math.nan,
    }
    return summary, rows


def evaluate_patients(model, dataset: LggDataset, *, image_size: int, batch_size: int,
                      tta: bool = False, min_component_size: int = 0,
                      keep_largest_component: bool = False) -> tuple[dict, list[dict]]:
    """Evaluates a model on a dataset (e.g. one split's subset) in-process, writing nothing.

    Args:
      model: a Keras model from uint8-derived [B, S, S, 3] in [0, 1] to logits.
      dataset: the slices to evaluate, with ground-truth masks.
      image_size: S, the model's input size.
      batch_size: slices per model call.
      tta: average predictions over flips.
      min_component_size: remove predicted 2D components smaller than this (0: off).
      keep_largest_component: keep only the largest 3D component of each patient.

    Returns:
      (summary, rows) as in `score`.
    """
    predictor = Predictor(model, image_size=image_size, tta=tta)
    pred = predict_patients(predictor, dataset, batch_size=batch_size,
                            min_component_size=min_component_size,
                            keep_largest_component=keep_largest_component)
    return score(dataset, pred)


def grid_slices(target: np.ndarray, pred: np.ndarray, tiles: int = GRID_TILES) -> np.ndarray:
    """Which of a patient's slices to show: those with lesion or prediction, else a spread of all."""
    interesting = np.flatnonzero(target.reshape(len(target), -1).any(1) | pred.reshape(len(pred), -1).any(1))
    pool = interesting if len(interesting) else np.arange(len(target))
    if len(pool) > tiles:
        pool = pool[np.linspace(0, len(pool) - 1, tiles).round().astype(int)]
    return pool


def tile(images: np.ndarray, columns: int = GRID_COLUMNS, gap: int = GRID_GAP) -> np.ndarray:
    """Lays uint8 [N, H, W, 3] images out in a grid with grey gaps (dark slices stay apart)."""
    n, h, w, c = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.full((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, c), 128, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = image
    return grid


def patient_overlay(predictor: Predictor, dataset: LggDataset, predictions: np.ndarray,
                    idx: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """A grid of one patient's overlays, and the slice numbers shown.

    The red outline is the final (post-processed) prediction; pixels that
    post-processing removed keep their probability tint but lose the outline.
    """
    pred, target = predictions[idx], dataset.masks[idx] > 0
    shown = idx[grid_slices(target, pred)]
    probs = predictor(dataset.images[shown], batch_size=len(shown))
    probs = np.where(predictions[shown], probs, np.minimum(probs, THRESHOLD))
    tiles = overlay(dataset.images[shown].astype(np.float32) / 255.0, dataset.masks[shown], probs)
    return tile(tiles), [dataset.records[i].slice_number for i in shown]


def _csv_bytes(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # A patient without lesion slices has no slice Dice: an empty cell, not "nan".
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                             f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return out.getvalue().encode()


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def format_table(summary: dict, rows: list[dict]) -> str:
    """The printed report: the figures, then one line per patient (best first)."""
    s = summary
    lines = [
        f"{'metric':<44}{'value':>10}",
        f"{'Dice, all pixels of the split':<44}{_fmt(s['dice']):>10}",
        f"{'IoU, all pixels of the split':<44}{_fmt(s['iou']):>10}",
        f"{'Dice, mean over lesion-positive slices':<44}{_fmt(s['positive_slice_dice_mean']):>10}"
        f"   ({s['positive_slices']} slices)",
        f"{'False-positive rate on empty slices':<44}{_fmt(s['empty_slice_fp_rate']):>10}"
        f"   ({s['false_positive_slices']} of {s['empty_slices']} slices)",
        f"{'Per-patient (volume) Dice, mean':<44}{_fmt(s['patient_dice_mean']):>10}"
        f"   ({s['patients']} patients)",
        f"{'Per-patient (volume) Dice, median':<44}{_fmt(s['patient_dice_median']):>10}",
        "",
        f"{'patient':<28}{'slices':>7}{'lesion':>7}{'dice':>9}{'slice dice':>11}{'FP empty':>10}",
    ]
    for r in sorted(rows, key=lambda r: (-r["dice"], r["patient"])):
        lines.append(f"{r['patient']:<28}{r['slices']:>7}{r['positive_slices']:>7}{_fmt(r['dice']):>9}"
                     f"{_fmt(r['positive_slice_dice_mean']):>11}"
                     f"{r['false_positive_slices']:>5}/{r['empty_slices']:<4}")
    return "\n".join(lines)


def run(config: Config) -> dict:
    """Evaluates the run's model on --split and writes the report files into the run directory.

    Returns:
      The summary written to eval_<split>.json.

    Raises:
      CheckpointError: no model where the flags point.
      DataError: the data or the split cannot be used.
    """
    start = time.perf_counter()
    model, source, image_size = build.trained_model(config)
    run = RunDir(config.run_dir)
    data = build.load_split(config, run, create=False)
    if not data.split[config.split]:
        raise DataError(f"{run.file(SPLIT_FILE)}: the {config.split} split has no patients")
    subset = data.part(config.split)
    batch_size = config.eval_batch
    predictor = Predictor(model, image_size=image_size, tta=config.tta)
    predictions = predict_patients(predictor, subset, batch_size=batch_size,
                                   min_component_size=config.min_component_size,
                                   keep_largest_component=config.keep_largest_component)
    summary, rows = score(subset, predictions)

    name = config.split
    indices = patient_slices(subset)
    ranked = sorted(rows, key=lambda r: (-r["dice"], r["patient"]))
    figures = {}
    for which, row in (("best", ranked[0]), ("worst", ranked[-1])):
        grid, numbers = patient_overlay(predictor, subset, predictions, indices[row["patient"]])
        png = f"eval_{name}_{which}_patient.png"
        run.write(png, tf.io.encode_png(grid).numpy())
        figures[which] = {"patient": row["patient"], "dice": row["dice"], "png": png,
                          "slices_shown": numbers}
    summary.update({
        "split": name, "threshold": THRESHOLD, "image_size": image_size,
        "original_size": list(subset.masks.shape[1:3]), "tta": config.tta,
        "min_component_size": config.min_component_size,
        "keep_largest_component": config.keep_largest_component,
        "model": source, "data_dir": os.path.abspath(config.data_dir),
        "figures": figures, "seconds": time.perf_counter() - start,
    })
    # NaN (e.g. no empty slices) is not JSON: written as null.
    run.write_json(f"eval_{name}.json", {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                         for k, v in summary.items()})
    run.write(f"per_patient_{name}.csv", _csv_bytes(rows))

    post = [f"2D components < {config.min_component_size} px removed"] if config.min_component_size > 1 else []
    post += ["largest 3D component kept"] if config.keep_largest_component else []
    log.info(f"\nEvaluation on the {name} split: {summary['patients']} patients, {summary['slices']} "
             f"slices ({summary['positive_slices']} with lesions) at {summary['original_size'][0]}x"
             f"{summary['original_size'][1]}; model input {image_size}; tta "
             f"{'on' if config.tta else 'off'}; post-processing: {', '.join(post) or 'none'}\n")
    log.info(format_table(summary, rows))
    log.info(f"\nBest patient {figures['best']['patient']} (Dice {figures['best']['dice']:.4f}), worst "
             f"{figures['worst']['patient']} (Dice {figures['worst']['dice']:.4f}).")
    log.info(f"Wrote eval_{name}.json, per_patient_{name}.csv, {figures['best']['png']}, "
             f"{figures['worst']['png']} to {run.path} ({summary['seconds']:.1f}s)")
    return summary
