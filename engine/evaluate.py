"""`--mode=evaluate`: per-patient metrics of a split or of any labelled folder, with intervals and a report."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import shlex
import sys
import time

import numpy as np
import tensorflow as tf

from data import lgg, nifti
from data.dataset import LggDataset
from data.lgg import DataError
from engine import inputs, report, segmenter as segmenter_lib
from engine.config import Config
from engine.inference import groups
from engine.rundir import SPLIT_FILE, RunDir, RunDirError
from engine.runtime import Runtime
from engine.segmenter import Segmenter
from models import losses, metrics

log = logging.getLogger(__name__)

# Columns of per_patient_<split>.csv, in order.
CSV_FIELDS = ("patient", "institution", "slices", "dice", "iou", "hd95", "assd", "surface_dice",
              "true_volume", "predicted_volume", "lesions_tp", "lesions_fp", "lesions_fn",
              "lesion_f1", "positive_slices", "positive_slice_dice", "empty_slices",
              "false_positive_slices")
# Per-patient figures summarised with mean, median and a bootstrap interval.
SUMMARISED = ("dice", "iou", "hd95", "assd", "surface_dice", "lesion_f1", "positive_slice_dice",
              "true_volume", "predicted_volume")


def predict_patients(segmenter: Segmenter, dataset: LggDataset, *, batch_size: int) -> np.ndarray:
    """The run's final masks of every slice, at its original size, patient by patient: bool [N, H, W]."""
    pred = np.empty(dataset.masks.shape, bool)
    patients = list(dataset.patient_slices.values())
    for group in groups([len(idx) for idx in patients]):
        masks = segmenter.segment_volumes([dataset.images[patients[i]] for i in group], batch_size=batch_size)
        for i, m in zip(group, masks):
            pred[patients[i]] = m
    return pred


def score(dataset: LggDataset, predictions: np.ndarray, *, tolerance: float = 2.0,
          spacing: dict | None = None) -> tuple[dict, list[dict]]:
    """The evaluation figures of boolean predictions against the dataset's masks.

    Args:
      dataset: the evaluated slices (records and masks).
      predictions: bool [N, H, W], aligned with dataset.masks.
      tolerance: of the normalised surface Dice, in pixels (mm with a spacing).
      spacing: {patient: (slice, row, col) mm}, for surface distances in mm; None: in pixels.

    Returns:
      (summary, rows). rows: one dict per patient with the CSV_FIELDS (models.metrics). summary:
      `metrics` (n, mean, median and 95% bootstrap interval of each SUMMARISED figure over
      patients); `dice`/`iou` over all pixels; `empty_slice_fp_rate`; `patient_dice_mean` and
      `patient_dice_median`; and the counts behind them.

    Raises:
      ValueError: predictions and masks differ in shape.
    """
    target = dataset.masks > 0
    pred = np.asarray(predictions, bool)
    if pred.shape != target.shape:
        raise ValueError(f"predictions have shape {pred.shape}, masks {target.shape}")
    rows = []
    for patient, idx in dataset.patient_slices.items():
        rows.append({"patient": patient, "institution": dataset.records[idx[0]].institution,
                     "slices": len(idx), **metrics.patient_metrics(pred[idx], target[idx], tolerance=tolerance,
                                                                   spacing=(spacing or {}).get(patient))})
    dice, iou = losses.dice_iou({"intersection": int((pred & target).sum()), "predicted": int(pred.sum()),
                                 "target": int(target.sum())})
    total = lambda key: int(sum(r[key] for r in rows))  # noqa: E731
    flat_t, flat_p = target.reshape(len(target), -1), pred.reshape(len(pred), -1)
    positive = flat_t.any(1)
    slice_dice = (2.0 * (flat_t & flat_p).sum(1)[positive]
                  / (flat_t.sum(1) + flat_p.sum(1))[positive])
    empty = total("empty_slices")
    summary = {
        "patients": len(rows), "slices": len(target), "positive_slices": total("positive_slices"),
        "empty_slices": empty, "false_positive_slices": total("false_positive_slices"),
        "empty_slice_fp_rate": total("false_positive_slices") / empty if empty else math.nan,
        "dice": dice, "iou": iou,
        "positive_slice_dice_mean": float(slice_dice.mean()) if len(slice_dice) else math.nan,
        "lesions_tp": total("lesions_tp"), "lesions_fp": total("lesions_fp"), "lesions_fn": total("lesions_fn"),
        "metrics": {k: metrics.summarize([r[k] for r in rows]) for k in SUMMARISED},
    }
    summary["patient_dice_mean"] = summary["metrics"]["dice"]["mean"]
    summary["patient_dice_median"] = summary["metrics"]["dice"]["median"]
    return summary, rows


def group_rows(rows: list[dict], clinical: dict | None) -> dict[str, dict[str, dict]]:
    """The same summaries per institution, and per genomic cluster where data.csv has them.

    Returns:
      {"institution": {"CS": {metric: summary}, ...}, "RNASeqCluster": {"1": ..., ...}, ...}.
    """
    groupings: dict[str, dict[str, list[dict]]] = {"institution": {}}
    for row in rows:
        groupings["institution"].setdefault(row["institution"], []).append(row)
        for column, value in ((clinical or {}).get(lgg.clinical_id(row["patient"])) or {}).items():
            if column.endswith("Cluster") and value not in ("", "NA"):
                groupings.setdefault(column, {}).setdefault(value, []).append(row)
    return {grouping: {name: {k: metrics.summarize([r[k] for r in members]) for k in ("dice", "hd95", "lesion_f1")}
                       for name, members in sorted(groups.items())}
            for grouping, groups in groupings.items()}


def _csv_bytes(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # A patient without lesion slices has no slice Dice: an empty cell, not "nan".
        writer.writerow({k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else
                             f"{row[k]:.6f}" if isinstance(row[k], float) else row[k]) for k in CSV_FIELDS})
    return out.getvalue().encode()


def _nan_as_null(value):
    """NaN is not JSON: written as null, in nested summaries too."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_as_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_as_null(v) for v in value]
    return value


def _data(config: Config, run: RunDir) -> LggDataset:
    """The patients to score: a split of the run, or every patient of --data_dir (--split=all)."""
    if config.split != "all":
        data = inputs.load_split(config, run, create=False)
        if not data.split[config.split]:
            raise DataError(f"{run.file(SPLIT_FILE)}: the {config.split} split has no patients")
        return data.part(config.split)
    dataset = (nifti.load_dataset(config.data_dir) if nifti.holds_volumes(config.data_dir)
               else inputs.load_dataset(config))
    stored = run.read_split() or {}
    trained = {p for key in ("train", "val") for p in stored.get(key, []) if isinstance(p, str)}
    seen = sorted(set(dataset.patients) & trained)
    if seen:
        log.warning(f"{len(seen)} of the {len(dataset.patients)} patients of {config.data_dir} "
                    f"were among the run's training or validation patients, so their figures "
                    f"are not held-out: {', '.join(seen)}")
    return dataset


def _best_and_worst(segmenter: Segmenter, subset: LggDataset, predictions: np.ndarray, rows: list[dict],
                    run_dir: RunDir, name: str, batch_size: int) -> dict:
    """The overlay grids of the best and the worst patient, written as eval_<split>_<which>_patient.png."""
    indices = subset.patient_slices
    ranked = sorted(rows, key=lambda r: (-r["dice"], r["patient"]))
    figures = {}
    for which, row in (("best", ranked[0]), ("worst", ranked[-1])):
        grid, numbers = report.patient_overlay(segmenter, subset, predictions, indices[row["patient"]],
                                               batch_size=batch_size)
        png = f"eval_{name}_{which}_patient.png"
        run_dir.write(png, tf.io.encode_png(grid).numpy())
        figures[which] = {"patient": row["patient"], "dice": row["dice"], "png": png,
                          "slices_shown": numbers}
    return figures


def report_files(name: str) -> tuple[str, ...]:
    """Every file an evaluation of split `name` writes into the run directory."""
    return (f"eval_{name}.json", f"per_patient_{name}.csv", f"eval_{name}.md", f"eval_{name}_dice.png",
            f"eval_{name}_best_patient.png", f"eval_{name}_worst_patient.png")


def check_targets(run: RunDir, name: str) -> None:
    """Refuses to replace a report file the run did not record writing (a user's own eval_test.md).

    Raises:
      RunDirError: naming the first such file; nothing has been written.
    """
    ours = set(run.written() or ())
    theirs = [f for f in report_files(name) if os.path.lexists(run.file(f)) and f not in ours]
    if theirs:
        raise RunDirError(f"{run.file(theirs[0])} exists and brainseg did not write it ({len(theirs)} "
                          f"such file(s) in all); evaluate replaces only its own reports, listed in the "
                          "run's written.json: move it away")


# The flags that say which patients a run was trained and split on. Left at their defaults on an
# evaluate command, they are the run's own (its config.json): `--mode=evaluate --model_dir=RUN`
# scores RUN's test split with no other flag.
DATA_FIELDS = ("data_dir", "skip_bad_slices", "val_fraction", "test_fraction", "num_folds", "fold", "seed")


def with_run_data(config: Config, stored: dict | None) -> Config:
    """The config with each DATA_FIELDS flag left at its default taken from the run's flags."""
    if stored is None:
        return config
    defaults = Config()
    return dataclasses.replace(config, **{k: stored[k] for k in DATA_FIELDS
                                          if getattr(config, k) == getattr(defaults, k)})


def run(config: Config, runtime: Runtime) -> dict:
    """Evaluates the run's inference on --split (or every patient of --data_dir with --split=all)
    and writes eval_<split>.json, per_patient_<split>.csv, eval_<split>.md and its figures; the
    models compute in the runtime's precision.

    Returns:
      The summary written to eval_<split>.json.

    Raises:
      CheckpointError: no model where the flags point.
      DataError: the data or the split cannot be used.
      RunDirError: a report file of this split exists and the run did not write it.
    """
    start = time.perf_counter()
    config = with_run_data(config, segmenter_lib.stored_flags(config.run_dir))
    run_dir = RunDir(config.run_dir)
    check_targets(run_dir, config.split)  # before any work: a refusal costs nothing
    segmenter = segmenter_lib.segmenter(config, precision=runtime.precision)
    subset = _data(config, run_dir)
    batch_size = config.eval_batch
    predictions = predict_patients(segmenter, subset, batch_size=batch_size)
    predicted = time.perf_counter()
    spacing = getattr(subset, "spacing", None)  # NIfTI volumes that give a spatial unit
    summary, rows = score(subset, predictions, tolerance=config.surface_tolerance, spacing=spacing)
    try:
        clinical = lgg.read_clinical_table(lgg.find_dataset_root(config.data_dir))
    except DataError:  # a folder of NIfTI volumes holds its data.csv itself
        clinical = lgg.read_clinical_table(config.data_dir)
    groups = group_rows(rows, clinical)

    name = config.split
    figures = _best_and_worst(segmenter, subset, predictions, rows, run_dir, name, batch_size)
    plot = f"eval_{name}_dice.png"
    run_dir.write(plot, report.dice_plot(rows, f"per-patient Dice, {name} ({len(rows)} patients)"))
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "engine.main", *sys.argv[1:]])
    summary.update({
        "split": name, "threshold": segmenter.spec.threshold, "image_size": segmenter.image_size,
        "original_size": list(subset.masks.shape[1:3]), "inference": segmenter.describe(),
        "inference_spec": segmenter.spec.to_json(), "surface_tolerance": config.surface_tolerance,
        "distance_unit": "mm" if spacing else "px",
        "model": segmenter.sources, "data_dir": os.path.abspath(config.data_dir), "command": command,
        "groups": groups, "figures": figures, "plot": plot,
        "seconds_inference": predicted - start, "seconds_metrics": time.perf_counter() - predicted,
    })
    summary["seconds"] = time.perf_counter() - start
    run_dir.write_json(f"eval_{name}.json", _nan_as_null(summary))
    run_dir.write(f"per_patient_{name}.csv", _csv_bytes(rows))
    run_dir.write(f"eval_{name}.md", report.markdown(summary, groups, plot=plot, command=command))

    log.info(f"\nEvaluation of {name}: {summary['patients']} patients, {summary['slices']} slices "
             f"({summary['positive_slices']} with lesions) at {summary['original_size'][0]}x"
             f"{summary['original_size'][1]}; {segmenter.describe()}\n")
    log.info(report.evaluation_table(summary, rows))
    log.info(f"\nBest patient {figures['best']['patient']} (Dice {figures['best']['dice']:.4f}), worst "
             f"{figures['worst']['patient']} (Dice {figures['worst']['dice']:.4f}).")
    log.info(f"Wrote eval_{name}.json, per_patient_{name}.csv, eval_{name}.md and its figures to "
             f"{run_dir.path} ({summary['seconds']:.1f}s: inference {summary['seconds_inference']:.1f}s, "
             f"metrics {summary['seconds_metrics']:.1f}s)")
    return summary
