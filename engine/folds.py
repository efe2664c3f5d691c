"""`python -m engine.folds RUN_DIR [RUN_DIR ...] [--split=test]`: one per-patient table over k-fold runs."""

from __future__ import annotations

import csv
import os
import sys

import numpy as np

# Columns read from per_patient_<split>.csv (engine.evaluate.CSV_FIELDS; not imported, so this
# tool does not load TensorFlow).
PATIENT, DICE = "patient", "dice"
WORST = 5


class FoldsError(Exception):
    """A run directory's CSV is missing or unreadable, or two runs share a patient."""


def read_runs(run_dirs: list[str], split: str = "test") -> dict[str, dict[str, float]]:
    """Reads each run's per-patient Dice.

    Each run directory is one fold (--num_folds=k --fold=i) evaluated with --mode=evaluate, which
    wrote per_patient_<split>.csv. The folds' test splits are disjoint, so together they score
    every patient once as held-out; a patient in two runs means the runs are not folds of one
    cut, and the combined figure would count it twice, so that is refused.

    Args:
      run_dirs: run directories, one per fold.
      split: which per_patient_<split>.csv to read.

    Returns:
      {run_dir: {patient: dice}}, in the order given.

    Raises:
      FoldsError: a CSV is missing or unreadable, or a patient appears in two runs.
    """
    runs: dict[str, dict[str, float]] = {}
    owner: dict[str, str] = {}
    for run_dir in run_dirs:
        if run_dir in runs:
            raise FoldsError(f"{run_dir} is given twice")
        path = os.path.join(run_dir, f"per_patient_{split}.csv")
        try:
            with open(path, newline="") as f:
                scores = {row[PATIENT]: float(row[DICE]) for row in csv.DictReader(f)}
        except FileNotFoundError:
            raise FoldsError(f"{path} is missing; run --mode=evaluate --split={split} "
                             f"--model_dir={run_dir} first") from None
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise FoldsError(f"{path}: unreadable per-patient CSV ({type(e).__name__}: {e})") from None
        for patient in scores:
            if patient in owner:
                raise FoldsError(f"patient {patient} is in both {owner[patient]} and {run_dir}: "
                                 "the runs are not disjoint folds (same --seed and --num_folds?)")
            owner[patient] = run_dir
        runs[run_dir] = scores
    return runs


def summarize(runs: dict[str, dict[str, float]]) -> dict:
    """Mean, median and worst patients over all runs, and each run's mean."""
    every = sorted(((dice, patient, run) for run, scores in runs.items()
                    for patient, dice in scores.items()))
    dice = np.array([d for d, _, _ in every])
    return {
        "patients": len(every),
        "mean": float(dice.mean()) if len(dice) else float("nan"),
        "median": float(np.median(dice)) if len(dice) else float("nan"),
        "worst": [(p, d, r) for d, p, r in every[:WORST]],
        "per_run": [(run, len(s), float(np.mean(list(s.values()))) if s else float("nan"))
                    for run, s in runs.items()],
    }


def format_table(summary: dict, split: str) -> str:
    lines = [f"per-patient Dice, {split} split of {len(summary['per_run'])} runs: "
             f"{summary['patients']} patients",
             f"  mean    {summary['mean']:.4f}",
             f"  median  {summary['median']:.4f}",
             f"worst {len(summary['worst'])}:"]
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
    _SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"],
                               "Which per_patient_<split>.csv to combine.")
    app.run(lambda argv: main(argv[1:], _SPLIT.value))
