"""`python -m engine.folds RUN_DIR [RUN_DIR ...] [--split=test]`: one per-patient table over k-fold runs."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import numpy as np

from models import metrics

# Columns read from per_patient_<split>.csv (engine.evaluate.CSV_FIELDS; not imported, so this
# tool does not load TensorFlow).
PATIENT, DICE = "patient", "dice"
# Further per-patient figures summarised when the CSV has them.
EXTRA = ("hd95", "assd", "surface_dice", "lesion_f1")
WORST = 5


class FoldsError(Exception):
    """A run directory's CSV is missing or unreadable, or two folds of one cut share a patient."""


def _cut(run_dir: str) -> str:
    """Which cut of the patients a run's test fold belongs to: its split.json's seed and fold count.

    Runs of one cut must hold disjoint patients; runs of several cuts (repeated k-fold with
    other --seed) score each patient once per cut.
    """
    path = os.path.join(run_dir, "split.json")
    if not os.path.exists(path):
        return "one cut"
    try:
        with open(path) as f:
            stored = json.load(f)
        return f"seed {stored['seed']}, {stored.get('num_folds', 0)} folds"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FoldsError(f"{path} is not a split brainseg wrote ({type(e).__name__}: {e}); it says "
                         "which cut the run's patients belong to: train the fold again") from None


def _read_csv(path: str) -> dict[str, dict]:
    """One run's per-patient rows: {patient: {"dice": float, ...}}, one row per patient.

    Raises:
      FoldsError: the CSV has no patient or dice column, or lists a patient twice.
      OSError, ValueError: unreadable, or a figure that is not a number.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, header = list(reader), reader.fieldnames or []
    missing = [c for c in (PATIENT, DICE) if c not in header]
    if missing:
        raise FoldsError(f"{path} has no '{missing[0]}' column (its header: {', '.join(header) or 'none'}"
                         "); it is not a per-patient CSV of --mode=evaluate")
    scores = {}
    for row in rows:
        if row[PATIENT] in scores:
            raise FoldsError(f"{path} lists patient {row[PATIENT]} twice; --mode=evaluate writes one row "
                             "per patient: evaluate the run again")
        scores[row[PATIENT]] = {k: float(row[k]) if row.get(k) not in (None, "") else math.nan
                                for k in (DICE, *EXTRA) if k in row}
    return scores


def read_runs(run_dirs: list[str], split: str = "test") -> dict[str, dict[str, dict]]:
    """Reads each run's per-patient rows.

    Each run directory is one fold (--num_folds=k --fold=i) evaluated with --mode=evaluate, which
    wrote per_patient_<split>.csv. The folds of one cut (one --seed) have disjoint test patients,
    so together they score every patient once as held-out; a patient in two folds of one cut
    would count twice, so that is refused.

    Returns:
      {run_dir: {patient: {"dice": float, ...}}}, in the order given.

    Raises:
      FoldsError: a CSV is missing or unreadable, or a patient is in two folds of one cut.
    """
    runs: dict[str, dict[str, dict]] = {}
    owner: dict[tuple[str, str], str] = {}
    for run_dir in run_dirs:
        if run_dir in runs:
            raise FoldsError(f"{run_dir} is given twice")
        path = os.path.join(run_dir, f"per_patient_{split}.csv")
        try:
            scores = _read_csv(path)
        except FileNotFoundError:
            raise FoldsError(f"{path} is missing; run --mode=evaluate --split={split} "
                             f"--model_dir={run_dir} first") from None
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise FoldsError(f"{path}: unreadable per-patient CSV ({type(e).__name__}: {e})") from None
        if not scores:
            raise FoldsError(f"{path} holds no patients (a '{PATIENT}' and a '{DICE}' column and a row "
                             f"per patient); run --mode=evaluate --split={split} --model_dir={run_dir} again")
        cut = _cut(run_dir)
        for patient in scores:
            if (cut, patient) in owner:
                raise FoldsError(f"patient {patient} is in both {owner[cut, patient]} and {run_dir}: "
                                 "the runs are not disjoint folds (same --seed and --num_folds?)")
            owner[cut, patient] = run_dir
        runs[run_dir] = scores
    return runs


def summarize(runs: dict[str, dict[str, dict]]) -> dict:
    """Every patient's figures (averaged over the cuts that scored it), then their mean, median,
    95% bootstrap interval over patients, per institution, per cut and per run."""
    per_patient: dict[str, list[dict]] = {}
    for scores in runs.values():
        for patient, row in scores.items():
            per_patient.setdefault(patient, []).append(row)
    patient_mean = {p: {k: float(np.nanmean([r.get(k, math.nan) for r in rows]))
                        if any(not math.isnan(r.get(k, math.nan)) for r in rows) else math.nan
                        for k in (DICE, *EXTRA)} for p, rows in per_patient.items()}
    dice = {p: m[DICE] for p, m in patient_mean.items()}
    institutions: dict[str, list[float]] = {}
    for patient, value in dice.items():
        parts = patient.split("_")
        institutions.setdefault(parts[1] if len(parts) > 2 else "?", []).append(value)
    cuts: dict[str, list[float]] = {}
    for run, scores in runs.items():
        cuts.setdefault(_cut(run), []).extend(r[DICE] for r in scores.values())
    worst = sorted((d, p) for p, d in dice.items())[:WORST]
    return {
        "patients": len(dice), **metrics.summarize(list(dice.values())),
        "metrics": {k: metrics.summarize([m[k] for m in patient_mean.values()]) for k in EXTRA
                    if any(not math.isnan(m[k]) for m in patient_mean.values())},
        "institutions": {i: metrics.summarize(v) for i, v in sorted(institutions.items())},
        "cuts": {c: metrics.summarize(v) for c, v in cuts.items()},
        "worst": [(p, d, ", ".join(r for r, s in runs.items() if p in s)) for d, p in worst],
        "per_run": [(run, len(s), float(np.mean([r[DICE] for r in s.values()])) if s else math.nan)
                    for run, s in runs.items()],
    }


def format_table(summary: dict, split: str) -> str:
    ci = lambda s: f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]"  # noqa: E731
    lines = [f"per-patient Dice, {split} split of {len(summary['per_run'])} runs: "
             f"{summary['patients']} patients",
             f"  mean    {summary['mean']:.4f}  95% CI {ci(summary)} (bootstrap over patients)",
             f"  median  {summary['median']:.4f}"]
    for key, s in summary["metrics"].items():
        lines.append(f"  {key:<13} mean {s['mean']:.4f}  median {s['median']:.4f}  95% CI {ci(s)}")
    lines.append("by institution:")
    lines += [f"  {i:<4} {s['n']:>3} patients  mean {s['mean']:.4f}  median {s['median']:.4f}  {ci(s)}"
              for i, s in summary["institutions"].items()]
    if len(summary["cuts"]) > 1:
        lines.append("by cut (each scores every patient once):")
        lines += [f"  {c}: mean {s['mean']:.4f}" for c, s in summary["cuts"].items()]
    lines.append(f"worst {len(summary['worst'])}:")
    lines += [f"  {p:<28} {d:.4f}  {r}" for p, d, r in summary["worst"]]
    lines.append("per run:")
    lines += [f"  {r}  {n} patients  mean {m:.4f}" for r, n, m in summary["per_run"]]
    return "\n".join(lines)


def main(run_dirs: list[str], split: str = "test") -> int:
    """Prints the combined table; one line on stderr and exit code 2 on a FoldsError."""
    if not run_dirs:
        print("engine.folds: give at least one RUN_DIR", file=sys.stderr)
        return 2
    try:
        runs = read_runs(run_dirs, split)
    except FoldsError as e:
        print(f"engine.folds: {e}", file=sys.stderr)
        return 2
    print(format_table(summarize(runs), split))
    return 0


if __name__ == "__main__":
    from absl import app, flags

    # Defined here, not at import, so importing this module adds no flags beside engine.flags'.
    _SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test", "all"],
                               "Which per_patient_<split>.csv to combine.")
    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            print(f"engine.folds: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(lambda argv: main(argv[1:], _SPLIT.value), flags_parser=parse)
